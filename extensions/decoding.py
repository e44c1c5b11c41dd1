"""The decoding options of the MDM loop (mdm.py): `Decoding`, and all that it adds to LLaDA's generate().

None of these is in the CRoCoDiL paper's algorithms; all are off in `LLADA` (LLaDA's generate(), token for
token), and the default `Decoding()` differs from it only in the random stream (with which [M] is never
predicted, MDLM's zero-masking, so the loop counts its candidates without a host sync). The loop of mdm.py meets them
through `StepLogits` (its model call) and `adaptive_transfer` (the rule of `mdm.reveal_step`), and reports
through `DecodeStats`. Nothing here imports mdm.py (which imports this file and re-exports its names).
Command lines and measured speed / quality of every option: docs/decoding.md.

- rule "threshold" | "factor" (Fast-dLLM, Wu et al. 2025): "threshold" reveals every masked token of the
  block whose confidence is >= tau, at least the most confident one (tau > 1 reveals exactly one per step,
  tau = 0 the whole block at once); "factor" the n most confident with (n + 1) (1 - c_(n)) < f, at least
  one. `steps` is then not used: each block takes as many steps as it needs ([M] is never predicted, so
  every step reveals a token and a block takes at most block_length steps). `choose_adaptive`.
- rng "fast": [M] itself is never predicted (its logit is -inf: MDLM's zero-masking; LLaDA leaves it, and a
  revealed [M] stays [M]), so every step of the fixed rule reveals exactly its scheduled count and mdm.py
  finds the candidates without waiting for the device. Each masked candidate's token is drawn from
  softmax(logits / T) by inverse CDF (`fast_draw`:
  a two-level search of the float32 CDF, one uniform per candidate): the distribution of Gumbel-max
  (tests/test_mdm.py) at a fraction of its cost (float64 Gumbel noise even at the candidates only made a
  T = 1 step 2.4x a T = 0 step at V = 32k; torch.multinomial was slower still).
- cfg_scale (LLaDA's classifier-free guidance for prompts): the unconditional branch sees the prompt
  (x[:, :gen_start]) replaced by [M]; logits = un + (cfg_scale + 1) (cond - un). guidance (register
  guidance, trained with register dropout to a null bank, corruption.py): the null branch sees every register
  withheld (register_mask all False, the prefix [START, END] only); logits = null + w (guided - null);
  w = 1 is plain guided decoding and costs nothing extra. `guided_logits`.
- logits_eos_inf: EOS (and EOT, when the model's config has one) is never predicted.
  confidence_eos_eot_inf: EOS/EOT predictions rank below every other candidate, so they are revealed last
  (LLaDA's generate() applies its flag after the tokens are chosen, where it has no effect; here it acts
  on the choice, tested).
- cache "prefix" | "dual": approximate key/value reuse within a block (extensions/kv_cache.py).
- stats: per-sample NFE (forward passes while the row still had [M] in its block, x branches) and the mean
  tokens revealed per row at each step. `DecodeStats`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from extensions.kv_cache import CACHE_MODES, CachedModel

# ------------------------------------------------------------------------------------------------
# The options
# ------------------------------------------------------------------------------------------------

RULES = ("fixed", "threshold", "factor")
RNG_MODES = ("fast", "llada")


@dataclass
class Decoding:
    """How mdm.mdm_loop chooses and reveals tokens (the options are explained in the module docstring).
    The defaults are LLaDA's generate() except the random stream; LLADA below is LLaDA's exactly."""
    rule: str = "fixed"              # fixed (LLaDA) | threshold | factor (Fast-dLLM's adaptive rules)
    threshold: float = 0.9           # tau of the threshold rule
    factor: float = 1.0              # f of the factor rule
    rng: str = "fast"                # fast | llada (token-exact parity with LLaDA's generate)
    cfg_scale: float = 0.0           # classifier-free guidance on the prompt (0 = off)
    guidance: float = 1.0            # register guidance weight w (1 = plain guided decoding)
    logits_eos_inf: bool = False     # never predict EOS / EOT
    confidence_eos_eot_inf: bool = False  # reveal EOS / EOT predictions last
    cache: str = "none"              # none | prefix | dual (approximate key/value reuse within a block)

    def check(self):
        if self.rule not in RULES:
            raise ValueError(f"decoding rule must be one of {RULES}, got {self.rule!r}")
        if self.rng not in RNG_MODES:
            raise ValueError(f"rng must be one of {RNG_MODES}, got {self.rng!r}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0 (0 reveals a whole block at once), "
                             f"got {self.threshold}")
        if self.factor <= 0:
            raise ValueError(f"factor must be > 0, got {self.factor}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (0 = off), got {self.cfg_scale}")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {self.cache!r}")
        return self

    @property
    def branches(self):
        """Forward passes per step: 2 with classifier-free or register guidance, else 1."""
        return 2 if self.cfg_scale > 0 or self.guidance != 1 else 1


LLADA = Decoding(rng="llada")  # LLaDA's generate(), token for token


# ------------------------------------------------------------------------------------------------
# The model call of one step: guidance, EOS and [M] bans, KV cache
# ------------------------------------------------------------------------------------------------


def eos_ids(model):
    """EOS and, when the config has one, EOT ids of the model (for the EOS controls)."""
    cfg = getattr(model, "cfg", None)
    ids = [getattr(cfg, name, None) for name in ("eos_token_id", "eot_token_id")]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def guided_logits(model, x, gen_start, mask_id, registers, register_mask, attention_mask, decoding):
    """The model's logits (B, L, V) for x, with classifier-free or register guidance when asked for.
    Both branches go through one batched call (2B rows), as LLaDA does for cfg."""
    if decoding.branches == 1:
        return model(x, registers=registers, register_mask=register_mask, attention_mask=attention_mask)
    if decoding.cfg_scale > 0 and decoding.guidance != 1:
        raise ValueError("use classifier-free guidance (cfg_scale) or register guidance (guidance), not both")
    B = x.shape[0]
    twice = lambda t: None if t is None else torch.cat([t, t])  # noqa: E731
    if decoding.cfg_scale > 0:  # the unconditional branch: the prompt replaced by [M]
        if gen_start == 0:
            raise ValueError("cfg_scale > 0 needs a prompt (the unconditional branch masks it)")
        un_x = x.clone()
        un_x[:, :gen_start] = mask_id
        both = model(torch.cat([x, un_x]), registers=twice(registers), register_mask=twice(register_mask),
                     attention_mask=twice(attention_mask))  # (2B, L, V)
        cond, un = both[:B], both[B:]
        return un + (decoding.cfg_scale + 1) * (cond - un)
    if registers is None:
        raise ValueError("register guidance (guidance != 1) needs registers")
    shown = register_mask if register_mask is not None else torch.ones(registers.shape[:2], dtype=torch.bool,
                                                                         device=registers.device)  # (B, k)
    both = model(torch.cat([x, x]), registers=twice(registers),
                 register_mask=torch.cat([shown, torch.zeros_like(shown)]),
                 attention_mask=twice(attention_mask))  # (2B, L, V)
    guided, null = both[:B], both[B:]  # null: every register withheld, the prefix [START, END] only
    return null + decoding.guidance * (guided - null)


class StepLogits:
    """model(x) -> logits (B, L, V) at one step of mdm.mdm_loop, under the decoding options: guidance
    (`guided_logits`), EOS never predicted (logits_eos_inf), [M] never predicted (the adaptive rules: a
    revealed [M] would stay a candidate for ever) and the KV cache (a full forward when `fresh`, else only the
    window of the block, written into the last full logits). `eos_ids`: what the EOS controls act on."""

    def __init__(self, model, decoding, gen_start, mask_id, attention_mask):
        self.decoding, self.gen_start, self.mask_id = decoding, gen_start, mask_id
        self.attention_mask = attention_mask
        wants_eos = decoding.logits_eos_inf or decoding.confidence_eos_eot_inf
        self.eos_ids = eos_ids(model) if wants_eos else ()
        self.cached = None if decoding.cache == "none" else CachedModel(model, decoding.cache)
        self.model = model if self.cached is None else self.cached
        self._eos_index = None

    def eos_index(self, device):
        """eos_ids as a (n,) long tensor on `device`, made once (not copied from the host at every step)."""
        if self._eos_index is None or self._eos_index.device != device:
            self._eos_index = torch.tensor(self.eos_ids, dtype=torch.long, device=device)
        return self._eos_index

    def __call__(self, x, registers, register_mask, block_start, block_end, fresh):
        if self.cached is not None:
            self.cached.prepare(fresh, block_start, block_end, x.shape[1])
        logits = guided_logits(self.model, x, self.gen_start, self.mask_id, registers, register_mask,
                               self.attention_mask, self.decoding)
        if self.decoding.logits_eos_inf and self.eos_ids:
            logits.index_fill_(-1, self.eos_index(logits.device), -math.inf)
        if self.decoding.rule != "fixed" or self.decoding.rng == "fast":  # [M] is never predicted (MDLM)
            logits[..., self.mask_id] = -math.inf
        return logits if self.cached is None else self.cached.full_logits(logits)


# ------------------------------------------------------------------------------------------------
# Adaptive parallel rules (Fast-dLLM)
# ------------------------------------------------------------------------------------------------


def choose_adaptive(probability, candidates, rule, threshold, factor):
    """Fast-dLLM's parallel rules on probability (B, L) (the candidates' own probabilities, 0 elsewhere) and
    candidates (B, L) bool. threshold: every candidate with p >= tau; factor: the n most confident with
    (n + 1) (1 - p_(n)) < f. Every row with a candidate reveals at least its most confident one."""
    ranked = probability.masked_fill(~candidates, -1.0)
    best = ranked.argmax(dim=1, keepdim=True)  # (B, 1)
    if rule == "threshold":
        transfer = candidates & (probability >= threshold)
    else:
        sorted_p, order = ranked.sort(dim=1, descending=True)  # (B, L)
        n = torch.arange(1, probability.shape[1] + 1, device=probability.device)[None, :]  # (1, L)
        ok = ((n + 1) * (1 - sorted_p) < factor) & (sorted_p >= 0)  # (B, L), prefix-closed as p decreases
        ok = ok.long().cumprod(dim=1).bool()
        transfer = torch.zeros_like(candidates).scatter(1, order, ok)
    has = candidates.any(dim=1, keepdim=True)
    return transfer | (torch.zeros_like(candidates).scatter(1, best, True) & has)


def adaptive_transfer(shape, rows, cols, confidence, probability, decoding, eos_ids=()):
    """The adaptive rule's (B, L) bool choice among the candidates (rows, cols) (N,) each, from their
    probability (N,); confidence (N,) is below 0 where confidence_eos_eot_inf pushed an EOS/EOT down."""
    candidates = torch.zeros(shape, dtype=torch.bool, device=rows.device)  # (B, L)
    candidates[rows, cols] = True
    value = probability.float()
    if decoding.confidence_eos_eot_inf and len(eos_ids):  # EOS/EOT predictions pass no threshold
        value = torch.where(confidence < 0, 0.0, value)
    score = torch.zeros(shape, dtype=torch.float32, device=rows.device)  # (B, L)
    score[rows, cols] = value
    return choose_adaptive(score, candidates, decoding.rule, decoding.threshold, decoding.factor)


# ------------------------------------------------------------------------------------------------
# The "fast" random stream
# ------------------------------------------------------------------------------------------------


def fast_draw(logits, temperature, generator=None, chunk=256):
    """A token per row of logits (N, V) from softmax(logits / T) by inverse CDF, and its probability under
    softmax(logits) (what the confidence ranks by). One exp pass in float32 and one uniform per row; the CDF
    is searched in two levels (sums over chunks of `chunk` tokens, then the cumulative sum inside the chosen
    chunk only), so no (N, V) cumulative sum is formed. T = 0 is the argmax, with probability
    1 / sum(exp(logits - max)) and no softmax materialised."""
    logits = logits.float()
    N, V = logits.shape
    if N == 0:  # no [M] left before the block end (more steps than masked tokens): nothing to draw
        return torch.zeros(0, dtype=torch.long, device=logits.device), logits.new_zeros(0)
    top = logits.max(dim=-1, keepdim=True).values  # (N, 1)
    if temperature == 0:
        return logits.argmax(dim=-1), 1.0 / (logits - top).exp_().sum(dim=-1)
    weights = (logits - top).div_(temperature).exp_() if temperature != 1 else (logits - top).exp_()  # (N, V)
    pad = (-V) % chunk
    if pad:
        weights = F.pad(weights, (0, pad))
    chunks = weights.view(N, -1, chunk)  # (N, V / chunk, chunk)
    chunk_cdf = chunks.sum(dim=-1).cumsum(dim=-1)  # (N, C) unnormalised CDF over chunks
    total = chunk_cdf[:, -1:]  # (N, 1)
    u = torch.rand(N, 1, device=logits.device, generator=generator) * total
    which = torch.searchsorted(chunk_cdf, u).clamp_(max=chunk_cdf.shape[1] - 1)  # (N, 1) chunk of the draw
    before = torch.where(which > 0, chunk_cdf.gather(1, (which - 1).clamp(min=0)), torch.zeros_like(u))
    inside = chunks.gather(1, which[:, :, None].expand(N, 1, chunk)).squeeze(1).cumsum(dim=-1)  # (N, chunk)
    offset = torch.searchsorted(inside, u - before).clamp_(max=chunk - 1)  # (N, 1)
    predicted = (which * chunk + offset).squeeze(-1).clamp_(max=V - 1)  # (N,)
    chosen = logits.gather(-1, predicted[:, None]).squeeze(-1)
    if temperature == 1:  # the draw's own normaliser is softmax's
        return predicted, (chosen - top.squeeze(-1)).exp() / total.squeeze(-1)
    return predicted, (chosen - torch.logsumexp(logits, dim=-1)).exp()


# ------------------------------------------------------------------------------------------------
# Statistics of a decoding run
# ------------------------------------------------------------------------------------------------


class DecodeStats:
    """Fills the caller's `stats` dict (None: records nothing) with "nfe_per_sample" (B ints: forward passes
    while the row still had [M] in its block, x branches) and "tokens_per_step" (mean tokens revealed per
    row at each step). The per-step tensors are kept and read once at the end: no host sync per step."""

    def __init__(self, stats, batch_size, branches, device):
        self.stats, self.branches = stats, branches
        self.per_sample = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.revealed = []

    def step(self, active, revealed):
        """active (B,) bool: rows with [M] left in the block before the step; revealed (B,) long."""
        if self.stats is not None:
            self.per_sample += active.long() * self.branches
            self.revealed.append(revealed)

    def write(self):
        if self.stats is not None:
            self.stats["nfe_per_sample"] = self.per_sample.tolist()
            means = torch.stack(self.revealed).float().mean(dim=1) if self.revealed else torch.zeros(0)  # (steps,)
            self.stats["tokens_per_step"] = means.tolist()
