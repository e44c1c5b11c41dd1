"""run_state.py: the global RNG states round-trip through torch.save / torch.load(weights_only=True), and a
resumed run refuses a data cache whose tokenizer differs from the checkpoint's copy."""

import random

import numpy as np
import pytest
import torch

import run_state as R


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(R.rng_states(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    R.set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_a_different_tokenizer_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tokenizer.json").write_text('{"a": 1}')
    (tmp_path / "same.json").write_text('{"a": 1}')
    (tmp_path / "other.json").write_text('{"a": 2}')
    R.check_same_tokenizers(tmp_path / "run", {"tokenizer.json": tmp_path / "same.json"})
    R.check_same_tokenizers(tmp_path / "run", {"encoder_tokenizer.json": tmp_path / "other.json"})  # not saved: ok
    with pytest.raises(ValueError, match="not the tokenizer"):
        R.check_same_tokenizers(tmp_path / "run", {"tokenizer.json": tmp_path / "other.json"})
