"""extensions/decoding.py: the fast token draw at its edges (the rest of the decoding options is tested
through mdm's loop in tests/test_mdm.py and tests/extensions/test_kv_cache.py)."""

import torch

from extensions.decoding import fast_draw


def test_fast_draw_with_no_candidates_draws_nothing():
    """More steps than [M] (a fixed schedule over a short infilling span): a step can have no candidate."""
    for temperature in (0.0, 1.0):
        tokens, probability = fast_draw(torch.zeros(0, 20), temperature)
        assert tokens.shape == (0,) and tokens.dtype == torch.long and probability.shape == (0,)


def test_fast_draw_returns_the_probability_of_the_drawn_token():
    logits = torch.randn(5, 700, generator=torch.Generator().manual_seed(0))
    tokens, probability = fast_draw(logits, 1.0, torch.Generator().manual_seed(1))
    expected = torch.softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    assert torch.allclose(probability, expected, atol=1e-6)
    greedy, _ = fast_draw(logits, 0.0)
    assert torch.equal(greedy, logits.argmax(dim=-1))
