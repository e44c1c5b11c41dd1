"""Shared test set-up. The tests mirror the source layout (tests/infra/ tests infra/, ...); tests/ and
tests/experiments/ are importable so that one test module can reuse another's module-scoped fixtures (the
tiny runs of test_eval.py, test_train_prior.py, experiments/test_eval_prompt.py)."""

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
for folder in (TESTS.parent, TESTS / "experiments"):  # the repository root (its modules), fixtures
    sys.path.insert(0, str(folder))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on 2 shared cores more threads only spin (measured: tiny
    training steps up to ~50x slower with 2 threads while another process is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
