"""The masked-diffusion decoding loop of CRoCoDiL: LLaDA's sampler, plain and guided by registers.

Paper map (arXiv 2603.20210):
- Base MDM (Sec. 3, the LLaDA baseline of Sec. 5): `generate` with registers=None reproduces LLaDA's
  reference `generate()` (ML-GSAI/LLaDA generate.py; ../shared/reference/llada.md Sec. 3.1) token for
  token: semi-autoregressive blocks, steps split evenly over blocks, one forward of the whole sequence
  per step, Gumbel-max sampling in float64, low-confidence (or random) remasking, a per-row top-k of
  `schedules.num_transfer_tokens` tokens revealed per step.
- Guided MDM (Sec. 4.2, Alg. 6 lines 3-9; Alg. 2 lines 4-10): the same loop with the registers z_0 fed
  to the demasker at every step. With z_0 = h_phi(x_0) it is the autoencoder's decoder: `autoencode`.
- ConThenDisc / ConWithinDisc (Alg. 2, 3) reuse `mdm_loop`: ConThenDisc passes registers drawn from the
  prior; ConWithinDisc passes `refresh_registers(step, x, registers, register_mask)`, which may return new
  registers before any step (e.g. drawn from the conditional prior given h_phi(x_t)).

The paper's "Forward(x0_hat, t)" re-masking (Alg. 2/3/6) is implemented the way LLaDA does it: all masked
positions are predicted, the most confident ones are kept and the rest stay [M] ("low-confidence
remasking"); already revealed tokens are never changed.

Decoding options (`Decoding`; the defaults are LLaDA's generate() except the random stream):
- rule: "fixed" (LLaDA: steps split evenly over blocks, schedules.num_transfer_tokens tokens per step),
  "threshold" (Fast-dLLM: every masked token of the block whose confidence is >= tau, at least the most
  confident one; tau > 1 reveals exactly one per step, tau = 0 the whole block at once) or "factor"
  (Fast-dLLM's factor rule: the n most confident with (n + 1) (1 - c_(n)) < f, at least one). With the
  adaptive rules `steps` is not used: each block takes as many steps as it needs, and per-sample NFE (the
  steps in which a row still had [M] in its block) comes back through `stats`.
- rng: "fast" draws each masked candidate's token from softmax(logits / T) by inverse CDF (`fast_draw`:
  a two-level search of the float32 CDF, one uniform per candidate): the distribution of Gumbel-max, tested, at a
  fraction of its cost (float64 Gumbel noise even at the candidates only made a T = 1 step 2.4x a T = 0
  step at V = 32k; torch.multinomial was slower still);
  "llada" draws Gumbel noise for the full (B, L, V) logits in LLaDA's order, for token-exact parity:
  with generator=None every draw uses PyTorch's global RNG, so `torch.manual_seed(s); generate(...,
  decoding=Decoding(rng="llada"))` equals LLaDA's output after the same seed. Per step, and nothing else:
    1. if temperature > 0: one float64 uniform tensor of the logits' shape (B, L, V) (LLaDA's torch.rand_like);
    2. if remasking == 'random': one (B, L) uniform tensor of the default dtype (LLaDA's torch.rand).
  A `generator` (torch.Generator on the model's device) makes the same draws from it instead.
- cfg_scale (LLaDA's classifier-free guidance for prompts): the unconditional branch sees the prompt
  (x[:, :gen_start]) replaced by [M]; logits = un + (cfg_scale + 1) (cond - un). guidance (register
  guidance, trained with register dropout to a null bank): the null branch sees every register withheld
  (register_mask all False, the prefix [START, END] only); logits = null + w (guided - null); w = 1 is
  plain guided decoding and costs nothing extra.
- logits_eos_inf: EOS (and EOT, when the model's config has one) can never be predicted.
  confidence_eos_eot_inf: EOS/EOT predictions rank below every other candidate, so they are revealed
  last (LLaDA's generate() applies its flag after the tokens are chosen, where it has no effect; here it
  acts on the choice, tested).
- cache (not in the paper; off by default): "prefix" | "dual" reuse the keys and values outside the current
  block between the steps of a block (Fast-dLLM's approximate prefix / dual cache, extensions/kv_cache.py); the first
  step of every block, and every step where ConWithinDisc redraws the registers, runs the full forward.
  Only semi-autoregressive decoding (blocks shorter than the generation) gains from it. Same NFE, cheaper
  steps, approximate logits (exact with a one-layer demasker, tested).

NFE (network function evaluations) = demasker forward passes of the batch: `steps` for the fixed rule,
twice that with cfg_scale > 0 or guidance != 1 (two branches per step); returned by every decoder.

This is the lowest sampling file: generators.py (Alg. 2, 3) and sample.py (the CLI for every method) build
on it. Overhead benchmark: bench/bench_sample.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from extensions.kv_cache import CACHE_MODES, BlockCache
from schedules import num_transfer_tokens

REMASKING = ("low_confidence", "random")
RULES = ("fixed", "threshold", "factor")
RNG_MODES = ("fast", "llada")


@dataclass
class Decoding:
    """How the MDM loop chooses and reveals tokens (see the module docstring)."""
    rule: str = "fixed"              # fixed | threshold | factor
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
            raise ValueError(f"threshold must be >= 0 (0 reveals a whole block at once), got {self.threshold}")
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
# One LLaDA step
# ------------------------------------------------------------------------------------------------


def add_gumbel_noise(logits, temperature, generator=None, noise=None):
    """Gumbel-max perturbation in float64 (LLaDA add_gumbel_noise; arXiv:2409.02908 on why float64).

    argmax(exp(logits) / (-log u)^T) = argmax(logits / T + Gumbel) with u ~ U(0, 1). At T = 0 the logits
    are returned unchanged (greedy argmax) and no random number is drawn. `noise`: the uniforms u (float64,
    the logits' shape) when the caller drew them; it is overwritten. The in-place chain computes the same
    values as LLaDA's out-of-place expression, with fewer temporaries.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64, copy=True)  # a copy: the caller's logits are used again
    if noise is None:
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    noise.log_().neg_().pow_(temperature)  # (-log u)^T
    return logits.exp_().div_(noise)


def predict_candidates(x, logits, block_end, temperature, remasking, mask_id, generator=None, rng="llada",
                       eos_ids=(), confidence_eos_eot_inf=False):
    """Predict every [M] before block_end and score it. Returns (rows, cols, predicted, confidence,
    probability): (N,) each; probability is the model's probability of the predicted token, confidence
    what the fixed rule ranks by (probability, or a uniform draw with random remasking).

    Candidates are LLaDA's: masked positions before block_end. Only their rows of the logits are processed
    (prediction, Gumbel noise, softmax are row-wise, so each value is the one LLaDA computes on the full
    tensor). With rng="llada" the random numbers are drawn for the full (B, L, V) and (B, L) shapes so the
    RNG stream stays LLaDA's; with rng="fast" one per candidate (same distribution, see the module docstring).
    """
    B, L = x.shape
    rows, cols = (x[:, :block_end] == mask_id).nonzero(as_tuple=True)  # (N,), (N,) candidate positions
    candidate_logits = logits[rows, cols]  # (N, V)
    if rng == "llada":
        p = F.softmax(candidate_logits, dim=-1)  # (N, V) in the model's dtype, as LLaDA
        if temperature == 0:
            predicted = candidate_logits.argmax(dim=-1)  # (N,) greedy
        else:  # LLaDA's torch.rand_like(logits, float64): drawn in full, used at the candidates
            noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)[rows, cols]
            predicted = add_gumbel_noise(candidate_logits, temperature, noise=noise).argmax(dim=-1)  # (N,)
        probability = torch.gather(p, -1, predicted.unsqueeze(-1)).squeeze(-1)  # (N,)
    else:
        predicted, probability = fast_draw(candidate_logits, temperature, generator)
    if remasking == "low_confidence":
        confidence = probability
    elif remasking == "random":
        shape = (B, L) if rng == "llada" else rows.shape
        confidence = torch.rand(shape, device=x.device, generator=generator)
        confidence = confidence[rows, cols] if rng == "llada" else confidence.to(probability.dtype)
    else:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    if confidence_eos_eot_inf and len(eos_ids):
        is_eos = torch.isin(predicted, torch.tensor(list(eos_ids), device=predicted.device))
        # below every other candidate (scores are in [0, 1]) but above the -inf of non-candidates
        confidence = torch.where(is_eos, confidence - 2.0, confidence)
    return rows, cols, predicted, confidence, probability


def choose_fixed(confidence, k_per_row):
    """Per-row top-k of confidence (B, L) (-inf off the candidates), one torch.topk call per row exactly as
    LLaDA (same ties broken the same way). Returns (B, L) bool or None when nothing is chosen."""
    chosen_rows, chosen_cols = [], []
    for row, k in enumerate(k_per_row):
        if k > 0:
            chosen_cols.append(torch.topk(confidence[row], k=k).indices)
            chosen_rows.append(torch.full((k,), row, dtype=torch.long, device=confidence.device))
    if not chosen_rows:
        return None
    transfer = torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
    transfer[torch.cat(chosen_rows), torch.cat(chosen_cols)] = True
    return transfer


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


def fast_draw(logits, temperature, generator=None, chunk=256):
    """A token per row of logits (N, V) from softmax(logits / T) by inverse CDF, and its probability under
    softmax(logits) (what the confidence ranks by). One exp pass in float32 and one uniform per row; the CDF
    is searched in two levels (sums over chunks of `chunk` tokens, then the cumulative sum inside the chosen
    chunk only), so no (N, V) cumulative sum is formed. T = 0 is the argmax, with probability
    1 / sum(exp(logits - max)) and no softmax materialised."""
    logits = logits.float()
    N, V = logits.shape
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


def reveal_step(x, logits, block_end, k_per_row, temperature, remasking, mask_id, generator=None,
                decoding=None, eos_ids=()):
    """One step: predict every [M] before the block end and reveal some, the rest stay [M].

    x: (B, L) long current tokens; logits: (B, L, V) the model's output for x; block_end: first position
    after the current block; k_per_row: list of B ints, tokens to reveal per row (the fixed rule; ignored
    by the adaptive rules). decoding: Decoding (default LLADA). Returns (new x (B, L), revealed (B,) long).
    """
    decoding = decoding or LLADA
    B, L = x.shape
    rows, cols, predicted, candidate_confidence, probability = predict_candidates(
        x, logits, block_end, temperature, remasking, mask_id, generator, decoding.rng, eos_ids,
        decoding.confidence_eos_eot_inf)
    x0 = x.clone()
    x0[rows, cols] = predicted
    if decoding.rule == "fixed":
        confidence = torch.full((B, L), -math.inf, dtype=candidate_confidence.dtype, device=x.device)
        confidence[rows, cols] = candidate_confidence  # revealed tokens and positions past the block: -inf
        transfer = choose_fixed(confidence, k_per_row)
    else:
        candidates = torch.zeros(B, L, dtype=torch.bool, device=x.device)
        candidates[rows, cols] = True
        value = probability.float()
        if decoding.confidence_eos_eot_inf and len(eos_ids):  # EOS/EOT predictions pass no threshold
            value = torch.where(candidate_confidence < 0, 0.0, value)
        score = torch.zeros(B, L, dtype=torch.float32, device=x.device)
        score[rows, cols] = value
        transfer = choose_adaptive(score, candidates, decoding.rule, decoding.threshold, decoding.factor)
    if transfer is None:
        return x, torch.zeros(B, dtype=torch.long, device=x.device)
    return torch.where(transfer, x0, x), transfer.sum(dim=1)


# ------------------------------------------------------------------------------------------------
# The MDM loop (base, guided, and the hook ConWithinDisc needs)
# ------------------------------------------------------------------------------------------------


def check_schedule(gen_length, block_length, steps):
    """LLaDA's constraints, as errors naming the fix. Returns (num_blocks, steps_per_block)."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError(f"gen_length, block_length and steps must be >= 1, got {gen_length}, {block_length}, {steps}")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                         f"gen_length/block_length={num_blocks}")
    return num_blocks, steps // num_blocks


def _eos_ids(model):
    """EOS and, when the config has one, EOT ids of the model (for the EOS controls)."""
    cfg = getattr(model, "cfg", None)
    ids = [getattr(cfg, name, None) for name in ("eos_token_id", "eot_token_id")]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def guided_logits(model, x, gen_start, mask_id, registers, register_mask, attention_mask, decoding, cache=None):
    """The model's logits (B, L, V) for x, with classifier-free or register guidance when asked for.
    Both branches go through one batched call (2B rows), as LLaDA does for cfg. cache: kv_cache.BlockCache
    | None, passed to the model (then the logits cover cache.window only when it is set)."""
    if cache is not None:
        model = _with_cache(model, cache)
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
                     attention_mask=twice(attention_mask))
        cond, un = both[:B], both[B:]
        return un + (decoding.cfg_scale + 1) * (cond - un)
    if registers is None:
        raise ValueError("register guidance (guidance != 1) needs registers")
    shown = register_mask if register_mask is not None else torch.ones(registers.shape[:2], dtype=torch.bool,
                                                                         device=registers.device)
    both = model(torch.cat([x, x]), registers=twice(registers), register_mask=torch.cat([shown, torch.zeros_like(shown)]),
                 attention_mask=twice(attention_mask))
    guided, null = both[:B], both[B:]  # null: every register withheld, the prefix [START, END] only
    return null + decoding.guidance * (guided - null)


def _with_cache(model, cache):
    """model(...) with cache=cache added to every call."""
    return lambda *args, **kwargs: model(*args, cache=cache, **kwargs)


@torch.no_grad()
def mdm_loop(model, x, gen_start, block_length, steps, temperature=0.0, remasking="low_confidence",
             mask_id=None, registers=None, register_mask=None, attention_mask=None, generator=None,
             refresh_registers=None, decoding=None, stats=None):
    """Semi-autoregressive MDM decoding of x[:, gen_start:] in place of LLaDA's two nested loops.

    x: (B, L) long, the prompt followed by [M] up to L. Blocks of block_length are decoded left to right.
    The fixed rule decodes each block in steps / num_blocks steps, num_transfer_tokens tokens per row per
    step; the adaptive rules (decoding.rule threshold | factor) until the block has no [M] (then [M] is never
    predicted, so every step reveals a token and a block takes at most block_length steps). Every step calls
    model(x, registers=..., register_mask=..., attention_mask=...) -> logits (B, L, V) once (twice with
    guidance: see guided_logits). refresh_registers: optional callable(step, x, registers, register_mask)
    called before the model at every global step; it returns None (keep) or a new (registers, register_mask).
    stats: optional dict, filled with "nfe_per_sample" (B ints: forward passes while the row still had [M] in
    its block, x branches) and "tokens_per_step" (mean tokens revealed per row at each step).
    Returns (x (B, L), nfe): nfe = steps taken x decoding.branches.
    """
    decoding = (decoding or LLADA).check()
    gen_length = x.shape[1] - gen_start
    num_blocks, steps_per_block = check_schedule(gen_length, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    eos_ids = _eos_ids(model) if (decoding.logits_eos_inf or decoding.confidence_eos_eot_inf) else ()
    adaptive = decoding.rule != "fixed"
    B = x.shape[0]
    per_sample = torch.zeros(B, dtype=torch.long, device=x.device)
    tokens_per_step = []
    step = 0
    cache = None if decoding.cache == "none" else BlockCache(decoding.cache)
    full_logits = None  # with the cache: the last full logits, a window step writes its rows into them
    for block in range(num_blocks):
        block_start = gen_start + block * block_length
        block_end = block_start + block_length
        # (B, steps_per_block) as Python ints: one host sync per block, none per step
        schedule = None if adaptive else num_transfer_tokens(x[:, block_start:block_end] == mask_id,
                                                             steps_per_block).tolist()
        for i in range(block_length if adaptive else steps_per_block):
            active = (x[:, block_start:block_end] == mask_id).any(dim=1)  # (B,)
            if adaptive and not bool(active.any()):
                break
            refreshed = None
            if refresh_registers is not None:
                refreshed = refresh_registers(step, x, registers, register_mask)
                if refreshed is not None:
                    registers, register_mask = refreshed
            if cache is not None:  # a full forward at a block's first step and after new registers
                cache.refill() if i == 0 or refreshed is not None else cache.use(block_start, block_end, x.shape[1])
            logits = guided_logits(model, x, gen_start, mask_id, registers, register_mask, attention_mask, decoding,
                                   cache)
            if decoding.logits_eos_inf and eos_ids:
                logits[..., list(eos_ids)] = -math.inf
            if adaptive:
                logits[..., mask_id] = -math.inf  # a revealed [M] would stay a candidate for ever
            if cache is not None and cache.window is not None:  # (B, W, V) rows of the window
                lo, hi = cache.window
                full_logits[:, lo:hi] = logits
                logits = full_logits
            elif cache is not None:
                full_logits = logits
            per_sample += active.long() * decoding.branches
            x, revealed = reveal_step(x, logits, block_end, None if adaptive else [row[i] for row in schedule],
                                      temperature, remasking, mask_id, generator, decoding, eos_ids)
            tokens_per_step.append(float(revealed.float().mean()))
            step += 1
    if stats is not None:
        stats["nfe_per_sample"] = per_sample.tolist()
        stats["tokens_per_step"] = tokens_per_step
    return x, step * decoding.branches


def _model_device(model):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _resolve_mask_id(model, mask_id):
    if mask_id is not None:
        return mask_id
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "mask_token_id", None) is not None:
        return cfg.mask_token_id
    raise ValueError("mask_id is None and the model has no cfg.mask_token_id; pass mask_id=<the [M] token id>")


def generate(model, prompt, gen_length=128, block_length=128, steps=128, temperature=0.0,
             remasking="low_confidence", mask_id=None, registers=None, register_mask=None, attention_mask=None,
             generator=None, refresh_registers=None, decoding=None, stats=None):
    """LLaDA's generate(): decode gen_length tokens after `prompt` with the (guided) MDM.

    prompt: (B, P) long token ids, or an int B for unconditional generation (P = 0, all-[M] start).
    gen_length % block_length == 0 and steps % (gen_length / block_length) == 0 (LLaDA's asserts).
    temperature: Gumbel-max temperature (0 = greedy). remasking: 'low_confidence' | 'random'.
    mask_id: the [M] id (default model.cfg.mask_token_id). registers (B, k, d) | None and register_mask
    (B, k) | None are passed to the model at every step (None = base MDM). attention_mask: (B, P) bool for a
    left-padded prompt (False = pad); it is extended with True over the generated part, as in LLaDA.
    generator / RNG draw order, decoding (Decoding; default LLADA, LLaDA's generate() exactly): see the
    module docstring. refresh_registers, stats: see mdm_loop.
    Returns (tokens (B, P + gen_length) long with the prompt in front, as LLaDA returns, nfe int).
    """
    mask_id = _resolve_mask_id(model, mask_id)
    if isinstance(prompt, int):
        prompt = torch.zeros(prompt, 0, dtype=torch.long, device=_model_device(model))
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (B, P) token ids or an int batch size, got shape {tuple(prompt.shape)}")
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        if attention_mask.shape != (B, P):
            raise ValueError(f"attention_mask must cover the prompt, shape {(B, P)}; got {tuple(attention_mask.shape)}")
        attention_mask = torch.cat([attention_mask.bool(),
                                    torch.ones(B, gen_length, dtype=torch.bool, device=x.device)], dim=1)
    return mdm_loop(model, x, P, block_length, steps, temperature, remasking, mask_id, registers, register_mask,
                    attention_mask, generator, refresh_registers, decoding, stats)


@torch.no_grad()
def encode_registers(encoder, enc_ids, enc_mask=None, keep=None):
    """z_0 = h_phi(x_0) (Alg. 6 line 2) and the demasker's register_mask.

    keep: None (all K registers), an int k (the first k registers, the others dropped), or (B,) long
    (per example; registers beyond keep[b] are hidden through register_mask). Returns (registers, mask|None).
    """
    if keep is None or isinstance(keep, int):
        registers = encoder(enc_ids, attention_mask=enc_mask)  # (B, K, d)
        return (registers if keep is None else registers[:, :keep]), None
    registers = encoder(enc_ids, attention_mask=enc_mask, keep=keep)  # (B, K, d), zeros beyond keep
    K = registers.shape[1]
    register_mask = torch.arange(K, device=keep.device)[None, :] < keep[:, None]  # (B, K)
    return registers, register_mask


def autoencode(encoder, demasker, enc_ids, enc_mask, gen_length, block_length=None, steps=None, temperature=0.0,
               remasking="low_confidence", mask_id=None, keep=None, generator=None, decoding=None, stats=None):
    """The discrete-continuum-discrete autoencoder (Alg. 6): z_0 = h_phi(x_0), then the guided MDM from an
    all-[M] start of gen_length tokens, z_0 fixed at every step.

    enc_ids: (B, L_enc) the source programs in the encoder's tokenization; enc_mask: (B, L_enc) bool valid
    tokens (None = all). block_length defaults to gen_length (one block, the paper's setting), steps to
    gen_length (one token per step). keep: see encode_registers. decoding, stats: see mdm_loop.
    Returns (tokens (B, gen_length), nfe) where nfe counts demasker calls (the one encoder call is extra).
    """
    registers, register_mask = encode_registers(encoder, enc_ids, enc_mask, keep)
    return generate(demasker, enc_ids.shape[0], gen_length, block_length or gen_length, steps or gen_length,
                    temperature, remasking, mask_id, registers=registers, register_mask=register_mask,
                    generator=generator, decoding=decoding, stats=stats)
