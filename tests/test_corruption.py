"""corruption.py: Alg. 1's random corruption of one example (latent noise, nested dropout, all-mask, register
dropout), a pure function of (seed, stream position)."""

import math

import pytest
import torch

import corruption as X
import train_ae as T
from encoder import Encoder, EncoderConfig


# ------------------------------------------------------------------------------------------------
# Alg. 1 lines 2-5
# ------------------------------------------------------------------------------------------------

class Spy(torch.nn.Module):
    """A demasker stand-in that records what it receives (registers, register_mask) into `seen`."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, x_t, registers=None, register_mask=None):
        self.seen.update(registers=registers, register_mask=register_mask)
        return torch.zeros(*x_t.shape, 3)


def test_latent_noise_std_formula():
    assert X.latent_noise_std(0.8) == pytest.approx(0.75)
    assert X.latent_noise_std(1.0) == 0.0
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="latent-cos"):
            X.latent_noise_std(bad)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_latent_noise_hits_target_cosine(target):
    """The noise corrupt() draws, added to random registers of norm sqrt(d), gives mean CS within 0.01."""
    K, d, B = 8, 1024, 64
    noisy = X.corrupt(torch.zeros(B, 4, dtype=torch.long), list(range(B)), 0, 1, 0.0, K, True, d,
                      X.latent_noise_std(target))
    z = torch.nn.functional.normalize(torch.randn(B, K, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    z = z * math.sqrt(d)
    cos = torch.nn.functional.cosine_similarity(z, z + noisy["noise"], dim=-1)  # (B, K)
    assert abs(cos.mean().item() - target) < 0.01
    assert noisy["noise"].std().item() == pytest.approx(X.latent_noise_std(target), rel=0.02)


def test_nested_dropout_exposes_exactly_k_registers():
    K, d, B = 6, 32, 600
    noisy = X.corrupt(torch.zeros(B, 4, dtype=torch.long), list(range(B)), 0, 1, 0.0, K, True, d, 0.75)
    keep = noisy["keep"]
    counts = torch.bincount(keep, minlength=K + 1)
    assert counts[0] == 0 and counts[1:].min() > B / K * 0.6  # k ~ U{1..K}
    # what the demasker receives: registers 0..k-1 exposed (noisy, non-zero), the rest zero and masked
    seen = {}

    torch.manual_seed(0)
    model = T.EncoderDemasker(Encoder(EncoderConfig.tiny(hidden_size=d, num_heads=2, num_kv_heads=1,
                                                         head_dim=16, num_registers=K)), Spy(seen))
    ids = torch.randint(1, 100, (8, 10))
    model(ids, ids, torch.ones_like(ids, dtype=torch.bool), keep[:8], noisy["noise"][:8])
    exposed = seen["register_mask"]
    assert torch.equal(exposed.sum(1), keep[:8])
    assert torch.equal(exposed, torch.arange(K)[None, :] < keep[:8, None])  # always the FIRST k
    norms = seen["registers"].norm(dim=-1)
    assert bool((norms[exposed] > 0).all()) and bool((norms[~exposed] == 0).all())
    # without nested dropout every example keeps all K
    full = X.corrupt(torch.zeros(4, 4, dtype=torch.long), list(range(4)), 0, 1, 0.0, K, False, d, 0.0)
    assert torch.equal(full["keep"], torch.full((4,), K)) and full["noise"] is None


@pytest.mark.parametrize("prob", [0.0, 0.25, 0.6])
def test_all_mask_rate(prob):
    """Rows fully masked by the all-mask coin have p_mask exactly 1 (a drawn t gives (1-eps)t+eps < 1)."""
    B, L, mask_id = 2000, 16, 7
    x0 = torch.randint(8, 50, (B, L))
    noisy = X.corrupt(x0, list(range(B)), 3, mask_id, prob)
    forced = (noisy["p_mask"] == 1.0).all(1)
    assert bool((noisy["x_t"][forced] == mask_id).all()) and bool(noisy["masked"][forced].all())
    rate = forced.float().mean().item()
    assert abs(rate - prob) < 4 * math.sqrt(prob * (1 - prob) / B) + 1e-9
    # the other rows are ordinary LLaDA masking: masked fraction tracks p_mask
    rest = ~forced
    assert torch.equal(noisy["x_t"][rest] == mask_id, noisy["masked"][rest])
    frac = noisy["masked"][rest].float().mean(1)
    assert abs((frac - noisy["p_mask"][rest][:, 0]).mean().item()) < 0.02
    assert noisy["keep"] is None and noisy["noise"] is None  # no registers asked for


def test_corruption_depends_on_stream_position_only():
    """Same counters -> same draws, whatever the batch composition (world-size / micro-batch independence)."""
    x0 = torch.randint(8, 50, (6, 16))
    whole = X.corrupt(x0, [10, 11, 12, 13, 14, 15], 0, 7, 0.25, 4, True, 8, 0.75)
    parts = [X.corrupt(x0[i:i + 2], [10 + i, 11 + i], 0, 7, 0.25, 4, True, 8, 0.75) for i in (0, 2, 4)]
    for name in whole:
        assert torch.equal(whole[name], torch.cat([p[name] for p in parts]))
    assert not torch.equal(whole["x_t"], X.corrupt(x0, [20, 21, 22, 23, 24, 25], 0, 7, 0.25, 4, True, 8, 0.75)["x_t"])


def test_register_dropout_one_withholds_every_register_zero_changes_nothing():
    """Issue 14 item 2: P = 1 -> keep = 0 for every example (register_mask all False: the demasker sees only
    [START, END], and the noise on withheld registers is zeroed); P = 0 -> exactly the draws of a run without it;
    0 < P < 1 -> the rate P, and the other draws of an example unchanged."""
    K, d, B = 4, 8, 400
    x0 = torch.randint(8, 50, (B, 12))
    args = (x0, list(range(B)), 0, 7, 0.25, K, True, d, 0.75)
    plain = X.corrupt(*args)
    assert all(torch.equal(plain[name], X.corrupt(*args, register_dropout=0.0)[name]) for name in plain)
    dropped = X.corrupt(*args, register_dropout=1.0)
    assert bool((dropped["keep"] == 0).all())
    for name in ("x_t", "masked", "p_mask", "noise"):
        assert torch.equal(dropped[name], plain[name]), name  # the coin is drawn last
    half = X.corrupt(*args, register_dropout=0.3)
    nulled = half["keep"] == 0
    assert abs(nulled.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / B)
    assert torch.equal(half["keep"][~nulled], plain["keep"][~nulled])
    seen = {}

    torch.manual_seed(0)
    model = T.EncoderDemasker(Encoder(EncoderConfig.tiny(hidden_size=d * 4, num_heads=2, num_kv_heads=1,
                                                         head_dim=16, num_registers=K)), Spy(seen))
    ids = torch.randint(1, 100, (8, 10))
    noise = torch.randn(8, K, d * 4)
    model(ids, ids, torch.ones_like(ids, dtype=torch.bool), dropped["keep"][:8], noise)
    assert not bool(seen["register_mask"].any()) and bool((seen["registers"] == 0).all())
