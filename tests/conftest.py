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


@pytest.fixture
def device():
    """The torch device of device-agnostic tests (tests/test_on_device.py): env CROCODIL_TEST_DEVICE, default
    "cpu"; scripts/gpu_check.py sets it to the GPU it checks. Skipped with the reason when CUDA is asked for but
    this torch cannot use it."""
    import os

    name = os.environ.get("CROCODIL_TEST_DEVICE", "cpu") or "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"CROCODIL_TEST_DEVICE={name} but torch {torch.__version__} sees no CUDA device "
                    f"(built with CUDA {torch.version.cuda})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        pytest.skip(f"CROCODIL_TEST_DEVICE={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev
