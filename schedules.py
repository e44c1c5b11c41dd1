"""Noise schedules of CRoCoDiL: discrete masking for the demasker, Gaussian noise for the register prior.

Paper map (arXiv 2603.20210):
- Discrete side (Sec. 3, Eq. 5, Alg. 1 line 3, Alg. 2/3/6 "Forward"): LLaDA's linear masking schedule.
  A token is masked with probability p_mask = (1 - eps) t + eps, t ~ U[0, 1]; the loss of Eq. 5 weights each
  masked token by w = 1 / p_mask (LLaDA GUIDELINES.md: sum(CE(masked) / p_mask) / (B * L)).
  The sampler reveals the same number of tokens at each step of a block (LLaDA's get_num_transfer_tokens).
- Continuous side (App. E, Alg. 4/5): cosine DDPM schedule (Nichol & Dhariwal 2021) in continuous time
  t in [0, 1], x0-prediction, deterministic DDIM sampling (Song et al. 2021, Eq. 12).
- App. E block-wise timestep offsets: the K registers are split into geometric blocks; block b is noised
  at the effective time t_b = clip(t + Delta_b, 0, 1) with Delta_1 < Delta_2 < ...
- Nested dropout (App. C) and the blocks share one set of boundaries, `nested_levels(K)` = 1, 2, 4, ..., K.
  Our reading of the paper, which says two things: App. C draws "k in {1, ..., K}" (uniform), while App. E
  groups the registers by "the same geometric grouping used by nested dropout (1, 2, 4, 8, ...)". We read
  (1, 2, 4, 8, ...) as the nested-dropout LEVELS, the numbers k of registers the demasker may be shown, so
  that a prior block is exactly what one level adds to the previous one: blocks {1}, {2}, {3, 4}, {5..8},
  ..., sizes 1, 1, 2, 4, ..., (the last one ends at K when K is not a power of two). `sample_keep_levels`
  offers both draws of k: "uniform" (App. C as written, k ~ U{1..K}) and "geometric" (k uniform over the
  levels {1, 2, 4, ..., K}, App. E's grouping; the paper preset). With "uniform" the block boundaries are
  the same levels (the prior's ordering does not depend on how k was drawn). Blocks of sizes 1, 2, 4, ...
  truncated at K (K = 8 -> [1, 2, 4, 1]) would match neither statement (tests/test_schedules.py).

Conventions: t = 0 is clean, t = 1 is fully masked / pure noise (the paper's and LLaDA's direction).
"""

import math

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------
# Discrete masking (LLaDA linear schedule)
# ------------------------------------------------------------------------------------------------

MASK_EPS = 1e-3  # LLaDA forward_process eps: p_mask never reaches 0, so the weight 1/p_mask stays <= 1000


def mask_probability(t, eps=MASK_EPS):
    """Per-token masking probability at time t: p_mask = (1 - eps) t + eps (LLaDA forward_process; paper
    Eq. 1 with alpha_t = 1 - p_mask). Works on floats and tensors."""
    return (1.0 - eps) * t + eps


def mask_tokens(x0, t, mask_id, eps=MASK_EPS, generator=None, maskable=None):
    """Forward masking q(x_t | x_0) of Alg. 1 line 3: each token independently becomes [M] with prob p_mask.

    x0: (B, L) long clean tokens. t: (B,) times in [0, 1] (or a float for the whole batch).
    maskable: optional (B, L) bool; False positions are never masked (e.g. a fixed prompt).
    Returns x_t (B, L) long, masked (B, L) bool, p_mask (B, L) float (LLaDA returns the same triple).
    Random numbers: one torch.rand((B, L)) draw, as in LLaDA's forward_process.
    """
    B, L = x0.shape
    t = torch.as_tensor(t, dtype=torch.float32, device=x0.device)
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"mask_tokens: t must be a float or shape ({B},), got {tuple(t.shape)}")
    p_mask = mask_probability(t, eps)[:, None].expand(B, L)  # (B, L)
    masked = torch.rand((B, L), generator=generator, device=x0.device) < p_mask  # (B, L)
    if maskable is not None:
        masked = masked & maskable
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return x_t, masked, p_mask


def loss_weight(p_mask):
    """Eq. 5 weight of a masked token: w = 1 / p_mask (LLaDA; the paper writes 1 / alpha_t)."""
    return 1.0 / p_mask


def masked_diffusion_loss(logits, x0, masked, p_mask):
    """Eq. 5 / Alg. 1 line 6, LLaDA's normalisation: sum over masked tokens of CE / p_mask, divided by B * L.

    logits: (B, L, V); x0: (B, L) long; masked: (B, L) bool; p_mask: (B, L) float.
    Unmasked positions contribute nothing but still count in the B * L denominator (LLaDA pre-training).
    The cross-entropy is computed in fp32 whatever the logits dtype.
    """
    B, L = x0.shape
    token_ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")  # (N_masked,)
    return (token_ce * loss_weight(p_mask[masked].float())).sum() / (B * L)


def num_transfer_tokens(mask_index, steps):
    """How many masked tokens to reveal at each of `steps` steps (LLaDA get_num_transfer_tokens).

    mask_index: (B, L) bool, the masked positions of one block. With n masks in a row, every step reveals
    n // steps tokens and the first n % steps steps reveal one more (the linear schedule reveals an equal
    expected number per step). Returns (B, steps) long; each row sums to its mask count.
    """
    mask_num = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base = mask_num // steps  # (B, 1)
    remainder = mask_num % steps  # (B, 1)
    step_ids = torch.arange(steps, device=mask_index.device)[None, :]  # (1, steps)
    return base + (step_ids < remainder).long()  # (B, steps)


# ------------------------------------------------------------------------------------------------
# Cosine DDPM schedule and DDIM (App. E)
# ------------------------------------------------------------------------------------------------

COSINE_S = 0.008  # Nichol & Dhariwal's offset s


def alpha_bar(t, s=COSINE_S):
    """Cosine schedule in continuous time: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) pi / 2).

    This is the continuous form of Nichol & Dhariwal's "squaredcos_cap_v2" (DiT gaussian_diffusion.py).
    Clipping: t is clamped to [0, 1]; alpha_bar(0) = 1 and alpha_bar(1) = 0 are set exactly (zero terminal
    SNR, Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed": at t = 1 the state
    is pure noise, which x0-prediction handles); the result is clamped to [0, 1]. The discrete table's
    beta <= 0.999 clip only affects its last step and has no counterpart here. Computed in float64, returned
    as float64 (callers cast).
    """
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
    f = lambda u: torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    ab = (f(t) / f(torch.zeros_like(t))).clamp(0.0, 1.0)
    ab = torch.where(t <= 0, torch.ones_like(ab), ab)
    return torch.where(t >= 1, torch.zeros_like(ab), ab)


def _coef(t, like):
    """alpha_bar(t) cast to `like`'s dtype/device, shaped to broadcast over the last (feature) dim.
    t: (B,) -> (B, 1, ..., 1); (B, K) -> (B, K, 1) when like is (B, K, d)."""
    ab = alpha_bar(t).to(device=like.device, dtype=torch.float64)
    while ab.dim() < like.dim():
        ab = ab.unsqueeze(-1)
    return ab


def q_sample(z0, t, noise):
    """Forward noising q(z_t | z_0) = N(sqrt(ab) z_0, (1 - ab) I) (DDPM; Alg. 5 line 4, Alg. 4 line 4).

    z0, noise: (B, K, d). t: (B,) one time per example, or (B, K) per-register times (App. E offsets).
    """
    ab = _coef(t, z0)
    return (ab.sqrt() * z0 + (1 - ab).sqrt() * noise).to(z0.dtype)


def ddim_step(z_t, z0_hat, t, t_next, eta=0.0, noise=None, generator=None):
    """One DDIM update t -> t_next (< t) for an x0-predicting denoiser (DDIM Eq. 12, DiT ddim_sample).

    eps_hat = (z_t - sqrt(ab_t) z0_hat) / sqrt(1 - ab_t)
    sigma   = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)
    z_s     = sqrt(ab_s) z0_hat + sqrt(1 - ab_s - sigma^2) eps_hat + sigma * noise
    eta = 0 (default) is the deterministic DDIM ODE; eta = 1 is ancestral DDPM sampling.
    z_t, z0_hat: (B, K, d); t, t_next: (B,) or (B, K) (per-register times broadcast over d).
    Registers whose time does not move (t_next >= t, e.g. a block clipped at 1 or 0) are returned unchanged:
    that is the exact value of the update at s = t and avoids 0/0 at ab = 1.
    """
    ab_t, ab_s = _coef(t, z_t), _coef(t_next, z_t)
    eps_hat = (z_t - ab_t.sqrt() * z0_hat) / (1 - ab_t).clamp_min(1e-12).sqrt()
    ratio = torch.where(ab_s > 0, ab_t / ab_s.clamp_min(1e-300), torch.ones_like(ab_s)).clamp(max=1.0)
    sigma = eta * ((1 - ab_s) / (1 - ab_t).clamp_min(1e-12)).sqrt() * (1 - ratio).sqrt()
    z_s = ab_s.sqrt() * z0_hat + (1 - ab_s - sigma ** 2).clamp_min(0).sqrt() * eps_hat
    if eta > 0:
        if noise is None:
            noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
        z_s = z_s + sigma * noise
    moves = torch.as_tensor(t_next, device=z_t.device) < torch.as_tensor(t, device=z_t.device)
    while moves.dim() < z_t.dim():
        moves = moves.unsqueeze(-1)
    return torch.where(moves, z_s.to(z_t.dtype), z_t)


def ddim_timesteps(steps, t_end=0.0):
    """Decreasing time grid for `steps` DDIM steps: (steps + 1,) float64 from 1 to t_end, evenly spaced.

    Step i goes from grid[i] to grid[i + 1] and costs one denoiser call. It starts at t = 1 (pure noise,
    "trailing" spacing, Lin et al. 2024) and ends at t_end. With block offsets use
    t_end = -max_offset (see register_times) so that every block ends at effective time 0.
    """
    if steps < 1:
        raise ValueError(f"ddim_timesteps: steps must be >= 1, got {steps}")
    return torch.linspace(1.0, t_end, steps + 1, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# App. E block-wise timestep offsets over geometric register blocks
# ------------------------------------------------------------------------------------------------


NESTED_DROPOUT = ("uniform", "geometric")  # how k is drawn (module docstring); the paper preset: geometric


def nested_levels(K):
    """The nested-dropout levels 1, 2, 4, ..., and K (K itself always included): the values geometric nested
    dropout draws k from, and the last register of every prior block. K = 8 -> [1, 2, 4, 8]; K = 7 ->
    [1, 2, 4, 7]."""
    if K < 1:
        raise ValueError(f"nested_levels: K must be >= 1, got {K}")
    levels, level = [], 1
    while level < K:
        levels.append(level)
        level *= 2
    return levels + [K]


def sample_keep_levels(batch_size, K, distribution="uniform", generator=None, device=None):
    """Nested dropout's k per example (App. C), (B,) long in [1, K].

    "uniform": k ~ U{1, ..., K} (App. C as written; one torch.randint draw per batch).
    "geometric": k uniform over nested_levels(K) = {1, 2, 4, ..., K} (App. E's grouping)."""
    if distribution == "uniform":
        return torch.randint(1, K + 1, (batch_size,), generator=generator, device=device)
    if distribution == "geometric":
        levels = torch.tensor(nested_levels(K), device=device)
        index = torch.randint(0, len(levels), (batch_size,), generator=generator, device=device)
        return levels[index]
    raise ValueError(f"nested dropout distribution must be one of {NESTED_DROPOUT}, got {distribution!r}")


def register_blocks(K):
    """App. E's register blocks, bounded by the nested-dropout levels: block b holds registers
    levels[b-1] + 1 .. levels[b]. Sizes: K = 8 -> [1, 1, 2, 4]; K = 7 -> [1, 1, 2, 3]; K = 1 -> [1]."""
    levels = nested_levels(K)
    return [hi - lo for lo, hi in zip([0] + levels[:-1], levels)]


def block_offsets(num_blocks, max_offset):
    """Offsets Delta_b of App. E, increasing in the block index with Delta_1 = 0.

    Our choice (the paper does not give values): linear in the block index, Delta_b = max_offset (b-1)/(B-1),
    so the last block is max_offset ahead of the first. Returns (num_blocks,) float64.
    """
    if max_offset < 0:
        raise ValueError(f"block_offsets: max_offset must be >= 0, got {max_offset}")
    if num_blocks == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.linspace(0.0, max_offset, num_blocks, dtype=torch.float64)


def block_time_offsets(K, max_offset):
    """Per-register offsets (K,) float64: every register of block b gets Delta_b (App. E)."""
    sizes = register_blocks(K)
    offsets = block_offsets(len(sizes), max_offset)
    return torch.repeat_interleave(offsets, torch.tensor(sizes))


def base_time_range(max_offset, enabled=True):
    """Range (lo, hi) of the base time t that makes every block span its full range [0, 1] (App. E:
    "all blocks are trained across the full range of diffusion times").

    With t in [0, 1] block b would never see effective times below Delta_b, so we draw the base time from
    [-max_offset, 1]: then clip(t + Delta_b, 0, 1) covers [0, 1] for every b (the first block rests at 0
    for t < 0, the last one at 1 for t > 1 - max_offset). Training samples t ~ U(lo, hi); DDIM sampling
    walks t from hi = 1 down to lo (ddim_timesteps(steps, t_end=lo)).
    """
    return (-max_offset if enabled else 0.0), 1.0


def sample_base_times(batch_size, max_offset, enabled=True, generator=None, device=None):
    """Base times t ~ U(base_time_range(max_offset, enabled)), shape (B,) float32 (Alg. 4/5 "sample t")."""
    lo, hi = base_time_range(max_offset, enabled)
    u = torch.rand(batch_size, generator=generator, device=device)
    return lo + (hi - lo) * u


def register_times(t, K, max_offset, enabled=True):
    """Effective per-register times t_b = clip(t + Delta_b, 0, 1) of App. E.

    t: (B,) base times (see base_time_range). Returns (B, K) float32. Later blocks are always at a time >=
    earlier ones (strictly larger unless clipped). enabled=False (the ablation) gives every register clip(t).
    The same function maps a base time of the DDIM grid to per-register times when sampling.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    offsets = block_time_offsets(K, max_offset if enabled else 0.0).to(t.device)  # (K,)
    return (t[:, None] + offsets[None, :]).clamp(0.0, 1.0).float()  # (B, K)
