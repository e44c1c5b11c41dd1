"""Alg. 1 lines 2-5 of the robust encoder-demasker training step: the random corruption of one example.

Paper map (arXiv 2603.20210):
- line 2  t ~ U[0, 1]
- line 3  x_t = mask(x_0, t)    schedules.mask_tokens (p_mask = (1 - eps) t + eps); App. C all-mask
                                utilisation: with probability all_mask_prob x_t is ALL [M] (p_mask = 1)
- App. C  nested dropout        k ~ U{1..K} (encoder.sample_keep); only registers 1..k are exposed
- line 5  e ~ N(0, sigma^2 I)   App. D: sigma from the target cosine similarity (latent_noise_std)
- register dropout (not in the paper; for register guidance, docs/decoding.md): with probability
  register_dropout every register of the example is withheld (keep = 0: register_mask all False, the demasker
  sees only [START, END]), so the same demasker also learns the null branch that register guidance
  (extensions/decoding.guided_logits) extrapolates away from.

Every draw of an example comes from its own generator, seeded by (seed, stream, example position in the
training stream) (example_generator), so a run gives the same numbers on 1 or N ranks, with any micro-batch,
and after --resume. Draw order per example: t, all-mask coin, k, the (1, L) mask uniforms, the (K, d) noise,
then the register-dropout coin (drawn last and only when register_dropout > 0, so register_dropout = 0 draws
nothing extra and leaves every other draw where it was). train_ae.py re-exports these names.
"""

import math

import numpy as np
import torch

from encoder import sample_keep
from schedules import mask_tokens


def latent_noise_std(target_cos):
    """sigma such that CS(z, z + e) ~= target_cos for a register of norm sqrt(d) and e ~ N(0, sigma^2 I_d).

    z . (z + e) = d + z.e and |z + e|^2 = d + 2 z.e + |e|^2. With e independent of z, z.e ~ N(0, d sigma^2)
    is O(sqrt(d)) and |e|^2 = d sigma^2 (1 + O(1/sqrt(d))), so
        CS = (d + z.e) / (sqrt(d) sqrt(d + 2 z.e + |e|^2)) -> 1 / sqrt(1 + sigma^2)   (d -> infinity),
    hence sigma = sqrt(1 / c^2 - 1): 0.75 for c = 0.8. The mean CS over random draws is above c by O(1/d)
    (Jensen; ~0.005 at d = 64, ~0.0003 at d = 1024, the paper's width). c = 1 gives sigma = 0 (no noise).
    """
    if not 0.0 < target_cos <= 1.0:
        raise ValueError(f"--latent-cos must lie in (0, 1], got {target_cos} (1 = no latent noise)")
    return math.sqrt(1.0 / target_cos ** 2 - 1.0)


def example_generator(seed, index, stream=0):
    """A CPU torch.Generator for one example: seeded by (seed, stream, index) through numpy's SeedSequence
    (stream 0 = training examples by stream position, 1 = validation rows)."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))


def corrupt(x0, counters, seed, mask_id, all_mask_prob, num_registers=0, nested_dropout=True,
            register_dim=0, noise_std=0.0, register_dropout=0.0, keep_sampler=None):
    """Alg. 1 lines 2, 3 and 5 (+ App. C all-mask and nested dropout, + register dropout) on the CPU.

    x0: (B, L) long clean ids; counters: B stream positions (see example_generator). keep_sampler: None =
    encoder.sample_keep (k ~ U{1..K}), else a function (batch, K, generator) -> (batch,) long, drawn at k's
    place in the order. Returns dict x_t (B, L), masked (B, L) bool, p_mask (B, L), keep (B,) long | None
    (0 = every register withheld by register dropout), noise (B, K, d) | None.
    """
    sampler = keep_sampler or (lambda n, K, gen: sample_keep(n, K, generator=gen))
    rows = {"x_t": [], "masked": [], "p_mask": [], "keep": [], "noise": []}
    for b, counter in enumerate(counters):
        gen = example_generator(seed, counter)
        t = torch.rand((), generator=gen).item()  # line 2: t ~ U[0, 1]
        all_mask = torch.rand((), generator=gen).item() < all_mask_prob
        keep = None
        if num_registers:  # App. C nested dropout: k
            keep = sampler(1, num_registers, gen) if nested_dropout else torch.tensor([num_registers])
        x_t, masked, p_mask = mask_tokens(x0[b:b + 1], t, mask_id, generator=gen)  # line 3: (1, L) each
        if all_mask:  # App. C: x_t = the fully masked sequence, weight 1 / p_mask = 1
            x_t = torch.full_like(x_t, mask_id)
            masked, p_mask = torch.ones_like(masked), torch.ones_like(p_mask)
        for name, value in (("x_t", x_t), ("masked", masked), ("p_mask", p_mask)):
            rows[name].append(value)
        if num_registers and noise_std > 0:  # line 5: e ~ N(0, sigma^2 I), (1, K, d)
            rows["noise"].append(torch.randn(1, num_registers, register_dim, generator=gen) * noise_std)
        if num_registers and register_dropout > 0 and torch.rand((), generator=gen).item() < register_dropout:
            keep = torch.zeros_like(keep)  # the null bank: register_mask all False
        if keep is not None:
            rows["keep"].append(keep)
    return {name: torch.cat(parts) if parts else None for name, parts in rows.items()}
