"""CADD beside CRoCoDiL: per-token continuous augmentation of the [M] positions, as a demasker option.

CADD (Continuously Augmented Discrete Diffusion, ICLR 2026) is not part of CRoCoDiL (arXiv 2603.20210): it attacks
the same "information void" of [M] from the other side. CRoCoDiL gives the demasker one sequence-level plan (the
registers, a prefix); CADD gives every masked position its own continuous, gradually noised copy of its token's
embedding. The two are orthogonal (registers in the prefix, latents at [M]) and combine in one demasker.

Paper map (CADD):
- Prop. 1, forward marginal: a position masked at time t carries z_t ~ N(sqrt(gb_t) w(x_0), (1 - gb_t) I), an
  unmasked one z_0 (the demasker ignores latents there: CADD-RE adds nothing at unmasked positions). The time
  t is the mask ratio (LLaDA's p_mask in training, the canvas' [M] share in sampling), gb_t = gamma_bar(t):
  "linear" 1 - t (CADD's App. B.1, as CADD-RE reads it) or "cosine" 1 - cos(pi/2 (1 - t)), both clipped to
  [eps, 1 - eps] with eps = 1e-4 (CADD-RE's ClippedSchedule).
- w: the demasker's own embedding table (TABLES "own": gradients reach it through z_0) or the same values
  detached ("frozen"), divided by its RMS so that w(x) has entries of RMS ~1, the unit of the N(0, I) noise.
  Additive fusion (Key Design 3): the input at [M] is E([M]) + s z_t with s the table's RMS (detached), so the
  latent lives on the scale of the token embeddings it is added to (our choice; the paper does not say).
- Simplified loss (Key Design 3): CE only at masked positions, here LLaDA's masked_diffusion_loss (1/p_mask),
  the same objective as the base MDM, so base and CADD differ only by the latents.
- Sampling (Prop. 2, Key Designs 2 and 4): `CaddDecoder` wraps the demasker as the model of mdm_loop, so the
  MDM loop, its reveal rules and its RNG stream are untouched. At each call it first moves the latents of the
  positions still masked by the Gaussian posterior mean from t (previous call) to s (now):
      mu = sqrt(gb_s)(1 - g)/(1 - gb_t) z0_hat + sqrt(g)(1 - gb_s)/(1 - gb_t) z_t,   g = gb_t / gb_s,
  (+ sqrt((1 - gb_s)(1 - g)/(1 - gb_t)) noise with posterior_noise, CADD-RE's posterior sample), where z0_hat
  is the previous call's estimate: hard w(argmax p) (mode-seeking), soft sum_v p_v w_v (mode-covering), or
  the mix (1 - softness) hard + softness soft (the dial). z_T ~ N(0, I) at the first call. K latents per
  position (num_latents, default 1): the demasker runs on the K copies in one batch and the returned logits
  are log of the averaged probabilities (Monte Carlo p(x_s | x_t) ~ 1/K sum_k p(x_s | x_t, z^(k))); every
  copy moves toward the same z0_hat. NFE counts K forward passes per step (`cadd_generate`).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from corruption import example_generator
from demasker import CADD_SCHEDULES as SCHEDULES, CADD_TABLES as TABLES  # noqa: F401 (re-exported)

SCHEDULE_EPS = 1e-4  # CADD-RE's schedule_eps: gamma_bar in [eps, 1 - eps]
NOISE_STREAM = 2     # example_generator stream of the training latents' noise (0: corruption, 1: validation)


# ------------------------------------------------------------------------------------------------
# The continuous track: schedule, table, forward marginal (Prop. 1)
# ------------------------------------------------------------------------------------------------


def gamma_bar(t, schedule):
    """gamma_bar_t (same shape as t, a tensor of times / mask ratios in [0, 1]): 1 at t = 0 (clean), 0 at t = 1."""
    t = torch.as_tensor(t, dtype=torch.float32).clamp(0.0, 1.0)
    if schedule == "linear":
        base = 1.0 - t
    elif schedule == "cosine":
        base = 1.0 - torch.cos(0.5 * math.pi * (1.0 - t))
    else:
        raise ValueError(f"CADD schedule must be one of {SCHEDULES}, got {schedule!r}")
    return (1.0 - 2.0 * SCHEDULE_EPS) * base + SCHEDULE_EPS


def check_cadd(demasker, wanted=True):
    """A clear error when a demasker was (not) trained with train_ae.py --cadd but is used the other way."""
    schedule = getattr(demasker.cfg, "cadd_schedule", "none")
    if wanted and schedule == "none":
        raise ValueError("this demasker was trained without CADD latents (config cadd_schedule 'none'); train one "
                         "with `train_ae.py --cadd` or sample it as a plain MDM (mdm.generate)")
    if not wanted and schedule != "none":
        raise ValueError(f"this demasker is a CADD demasker (cadd_schedule {schedule!r}); its [M] positions expect "
                         f"latents: sample it with cadd.cadd_generate (eval.py cadd --cadd-run)")
    return schedule


def latent_table(demasker):
    """(w (V, D) the table in units of its RMS, s its RMS (0-dim, detached)): z_0 = w(x_0), fused as s z_t."""
    weight = demasker.wte.weight
    scale = weight.detach().float().pow(2).mean().sqrt().clamp_min(1e-12)
    table = weight.float() / scale
    return (table.detach() if demasker.cfg.cadd_table == "frozen" else table), scale


def forward_latents(z0, gb, noise):
    """z_t = sqrt(gb) z_0 + sqrt(1 - gb) noise: z0, noise (..., D); gb broadcastable to z0 without its D axis."""
    gb = torch.as_tensor(gb, dtype=z0.dtype, device=z0.device).unsqueeze(-1)
    return gb.sqrt() * z0 + (1.0 - gb).sqrt() * noise


def training_noise(counters, seed, seq_len, width):
    """N(0, I) noise (B, L, D) of the training latents, one generator per example (stream position)."""
    return torch.stack([torch.randn(seq_len, width, generator=example_generator(seed, int(c), stream=NOISE_STREAM))
                        for c in counters])


def training_latents(demasker, x0, t, noise):
    """The fused latents s z_t (B, L, D) for the demasker's `latents` argument: x0 (B, L) clean ids, t (B,)
    mask ratios (p_mask), noise (B, L, D). Gradients reach the own table unless cadd_table is 'frozen'."""
    table, scale = latent_table(demasker)
    gb = gamma_bar(t, check_cadd(demasker)).to(x0.device)[:, None]  # (B, 1)
    return scale * forward_latents(F.embedding(x0, table), gb, noise.to(table.device))


# ------------------------------------------------------------------------------------------------
# The reverse step: z0_hat and the Gaussian posterior (Prop. 2)
# ------------------------------------------------------------------------------------------------


def estimate_z0(probs, table, softness=0.0):
    """z0_hat (..., D) from probs (..., V): (1 - softness) w(argmax p) + softness sum_v p_v w_v."""
    if not 0.0 <= softness <= 1.0:
        raise ValueError(f"softness must lie in [0, 1] (0 = hard z0_hat, 1 = soft), got {softness}")
    parts = 0.0
    if softness < 1.0:
        parts = (1.0 - softness) * F.embedding(probs.argmax(dim=-1), table)
    if softness > 0.0:
        parts = parts + softness * (probs.to(table.dtype) @ table)
    return parts


def posterior_coefficients(gb_t, gb_s):
    """(a, b, var) of q(z_s | z_t, z_0) = N(a z_0 + b z_t, var I) for gb_s >= gb_t (s earlier than t)."""
    g = gb_t / gb_s  # one-step retention gamma from s to t
    a = gb_s.sqrt() * (1.0 - g) / (1.0 - gb_t)
    b = g.sqrt() * (1.0 - gb_s) / (1.0 - gb_t)
    return a, b, ((1.0 - gb_s) * (1.0 - g) / (1.0 - gb_t)).clamp_min(0.0)


class CaddDecoder(nn.Module):
    """The CADD demasker as mdm_loop's model: model(x, registers=, register_mask=, attention_mask=) -> logits.

    Holds the latents (K, B, L, D) between calls; call reset() (or make a new one) before each new canvas.
    gen_start: the first generated position (the time t is the [M] share of x[:, gen_start:]).
    """

    def __init__(self, demasker, softness=0.0, num_latents=1, posterior_noise=False, gen_start=0, generator=None):
        super().__init__()
        check_cadd(demasker)
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1 (K latents per [M] position), got {num_latents}")
        estimate_z0(torch.zeros(1, 1), torch.zeros(1, 1), softness)  # checks the dial
        self.demasker = demasker
        self.softness, self.num_latents, self.posterior_noise = softness, num_latents, posterior_noise
        self.gen_start, self.generator = gen_start, generator
        self.reset()

    @property
    def cfg(self):
        return self.demasker.cfg

    def reset(self):
        self.z, self.t, self.z0_hat = None, None, None  # (K, B, L, D), (B,), (B, L, D)

    def _noise(self, shape, device):
        return torch.randn(shape, generator=self.generator, device=self.generator.device if self.generator
                           is not None else device).to(device)

    def _move(self, t, device):
        """The posterior step of every latent from the previous time self.t to t (B,)."""
        schedule = self.cfg.cadd_schedule
        gb_t, gb_s = gamma_bar(self.t, schedule).to(device), gamma_bar(t, schedule).to(device)
        gb_s = torch.maximum(gb_s, gb_t)  # a row that revealed nothing keeps its latents (g = 1)
        a, b, var = (c[None, :, None, None] for c in posterior_coefficients(gb_t, gb_s))  # (1, B, 1, 1)
        self.z = a * self.z0_hat[None] + b * self.z
        if self.posterior_noise:
            self.z = self.z + var.sqrt() * self._noise(self.z.shape, device)

    def forward(self, x, registers=None, register_mask=None, attention_mask=None):
        B, L = x.shape
        K, D = self.num_latents, self.cfg.d_model
        t = (x[:, self.gen_start:] == self.cfg.mask_token_id).float().mean(dim=1).cpu()  # (B,)
        table, scale = latent_table(self.demasker)
        if self.z is None or self.z.shape[1:3] != (B, L):
            self.z = self._noise((K, B, L, D), x.device)  # z_T ~ N(0, I)
        else:
            self._move(t, x.device)
        repeat = lambda v: None if v is None else v.repeat(K, *([1] * (v.dim() - 1))) if K > 1 else v  # noqa: E731
        logits = self.demasker(repeat(x), registers=repeat(registers), register_mask=repeat(register_mask),
                               attention_mask=repeat(attention_mask),
                               latents=(scale * self.z).reshape(K * B, L, D))  # (K B, L, V)
        probs = F.softmax(logits.float(), dim=-1).view(K, B, L, -1).mean(dim=0)  # (B, L, V)
        real = probs.clone()
        real[..., self.cfg.mask_token_id] = 0.0  # z0_hat over real tokens only (CADD-RE excludes the mask row)
        real = real / real.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        self.z0_hat, self.t = estimate_z0(real, table.detach(), self.softness), t
        return logits if K == 1 else probs.clamp_min(1e-30).log().to(logits.dtype)


def cadd_generate(demasker, prompt, gen_length, block_length, steps, temperature=0.0, remasking="low_confidence",
                  registers=None, register_mask=None, softness=0.0, num_latents=1, posterior_noise=False,
                  generator=None, latent_generator=None, decoding=None, stats=None):
    """mdm.generate with CADD latents at [M]: returns (tokens (B, P + gen_length), nfe = steps x K x branches).
    latent_generator draws z_T (and the posterior noise); generator the tokens, as in mdm.generate."""
    from mdm import generate
    gen_start = 0 if isinstance(prompt, int) else prompt.shape[1]
    decoder = CaddDecoder(demasker, softness, num_latents, posterior_noise, gen_start, latent_generator)
    tokens, nfe = generate(decoder, prompt, gen_length, block_length, steps, temperature, remasking,
                           registers=registers, register_mask=register_mask, generator=generator,
                           decoding=decoding, stats=stats)
    if stats is not None and "nfe_per_sample" in stats:
        stats["nfe_per_sample"] = [n * num_latents for n in stats["nfe_per_sample"]]
    return tokens, nfe * num_latents
