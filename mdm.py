"""The masked-diffusion decoding loop of CRoCoDiL: LLaDA's sampler, plain and guided by registers.

Paper map (arXiv 2603.20210):
- Base MDM (Sec. 3; the LLaDA baseline of Sec. 5): `generate` with registers=None is LLaDA's reference
  generate() (ML-GSAI/LLaDA generate.py) token for token: semi-autoregressive blocks, steps split evenly
  over the blocks, one forward of the whole sequence per step, Gumbel-max sampling in float64,
  low-confidence (or random) remasking, a per-row top-k of `schedules.num_transfer_tokens` tokens per step.
- Guided MDM (Sec. 4.2, Alg. 6 lines 3-9; Alg. 2 lines 4-10): the same loop with the registers z_0 fed to
  the demasker at every step. With z_0 = h_phi(x_0) it is the autoencoder's decoder: `autoencode`.
- ConThenDisc / ConWithinDisc (Alg. 2, 3; generators.py) reuse `mdm_loop` with registers from the prior;
  ConWithinDisc also passes `refresh_registers`, which may redraw them before any step (Alg. 3 line 6).
- The paper's "Forward(x0_hat, t)" re-masking (Alg. 2/3/6) is LLaDA's low-confidence remasking: every [M] is
  predicted, the most confident predictions are kept, the rest stay [M]; revealed tokens never change.

Reading order: `mdm_loop`, `reveal_step` (one step), `generate` / `autoencode` (the entry points). The
options (`Decoding`: adaptive rules, fast random stream, guidance, EOS controls, KV cache, statistics) live
in extensions/decoding.py and extensions/kv_cache.py; the loop meets them in its model call (`StepLogits`)
and in the rule that picks the tokens to reveal (`reveal_step`).

Random stream (Decoding.rng). "llada" draws, per step and nothing else: (1) if temperature > 0, one float64
uniform tensor of the logits' shape (B, L, V) (LLaDA's torch.rand_like); (2) with remasking='random', one
(B, L) uniform tensor of the default dtype (LLaDA's torch.rand). With generator=None the draws use the
global RNG, so `torch.manual_seed(s); generate(..., decoding=LLADA)` equals LLaDA's output after the same
seed (tests/test_sample.py). "fast" (the default): one uniform per candidate, the same distribution, and
[M] never predicted (MDLM's zero-masking; LLaDA's models give it almost no mass).

Host-device syncs: the fixed rule syncs once per block (its schedule); each step then runs without waiting
for the device (tests/test_mdm.py counts). The adaptive rules sync once per step: whether the block is done.

NFE = demasker forward passes of the batch: `steps` for the fixed rule, twice that with cfg_scale > 0 or
guidance != 1 (two branches per step); returned by every decoder. bench/bench_sample.py times the loop.
"""

import math

import torch
import torch.nn.functional as F

# Decoding: the loop's options (defaults: LLaDA's but the random stream); LLADA: LLaDA's generate() exactly
from extensions.decoding import (  # noqa: F401  (RULES, RNG_MODES, choose_adaptive, guided_logits: exported)
    LLADA, RNG_MODES, RULES, DecodeStats, Decoding, StepLogits, adaptive_transfer, choose_adaptive, fast_draw,
    guided_logits)
from schedules import num_transfer_tokens

REMASKING = ("low_confidence", "random")  # LLaDA's remasking strategies


# ------------------------------------------------------------------------------------------------
# The MDM loop (base, guided, and the hook ConWithinDisc needs)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def mdm_loop(model, x, gen_start, block_length, steps, temperature=0.0, remasking="low_confidence",
             mask_id=None, registers=None, register_mask=None, attention_mask=None, generator=None,
             refresh_registers=None, decoding=None, stats=None):
    """Semi-autoregressive MDM decoding of x[:, gen_start:]: LLaDA's two nested loops.

    x: (B, L) long, the prompt followed by [M] up to L. Blocks of block_length are decoded left to right,
    each in steps / num_blocks steps (`block_schedule`; the adaptive rules: until the block has no [M]).
    Every step calls model(x, registers=..., register_mask=..., attention_mask=...) -> logits (B, L, V)
    once (twice with guidance). refresh_registers: optional callable(step, x, registers, register_mask)
    called before the model at every global step; it returns None (keep) or a new (registers,
    register_mask). stats: optional dict, filled as extensions/decoding.DecodeStats says.
    Returns (x (B, L), nfe): nfe = steps taken x decoding.branches.
    """
    decoding = (decoding or LLADA).check()
    num_blocks, steps_per_block = check_schedule(x.shape[1] - gen_start, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    forward = StepLogits(model, decoding, gen_start, mask_id, attention_mask)  # model(x) under the options
    record = DecodeStats(stats, x.shape[0], decoding.branches, x.device)
    step = 0
    for block in range(num_blocks):
        block_start = gen_start + block * block_length
        block_end = block_start + block_length
        schedule, candidates = block_schedule(x[:, :block_end] == mask_id, block_start, steps_per_block,
                                              decoding.rule)
        for i, k_per_row in enumerate(schedule):
            active = (x[:, block_start:block_end] == mask_id).any(dim=1)  # (B,) rows with [M] in the block
            if k_per_row is None:  # an adaptive rule: one host sync per step, to know when the block is done
                left_in_block, candidates = candidate_counts(x, block_start, block_end, mask_id)
                if left_in_block == 0:
                    break
            elif decoding.rng == "llada":
                candidates = None  # LLaDA may predict [M] (a revealed [M] stays [M]): count with a sync
            new = None if refresh_registers is None else refresh_registers(step, x, registers, register_mask)
            if new is not None:  # ConWithinDisc (Alg. 3 line 6): registers redrawn given x_t
                registers, register_mask = new
            fresh = i == 0 or new is not None  # the KV cache runs a full forward
            logits = forward(x, registers, register_mask, block_start, block_end, fresh)  # (B, L, V) f_theta
            # Alg. 6 lines 5-7: x0_hat ~ f_theta(x_t, t, z_0), then x_t = Forward(x0_hat, t)
            x, revealed = reveal_step(x, logits, block_end, k_per_row, temperature, remasking, mask_id,
                                      generator, decoding, forward.eos_index(x.device), candidates)  # (B, L), (B,)
            record.step(active, revealed)
            if k_per_row is not None and candidates is not None:
                candidates -= sum(k_per_row)  # the fixed rule reveals exactly k_per_row: no sync needed
            step += 1
    record.write()
    return x, step * decoding.branches


def block_schedule(masked, block_start, steps, rule):
    """Tokens each row reveals at each step of a block: `steps` lists of B ints (LLaDA's
    get_num_transfer_tokens: the block's [M] split evenly over its steps), or block_length Nones for the
    adaptive rules, which decide per step. masked: (B, block_end) bool, [M] before the block end.
    Returns (schedule, candidates): candidates is the number of [M] before the block end (the fixed rule;
    None for the adaptive rules). One host sync per block for both."""
    if rule != "fixed":
        return [None] * (masked.shape[1] - block_start), None
    per_row = num_transfer_tokens(masked[:, block_start:], steps)  # (B, steps)
    counts = torch.cat([per_row, masked.sum(dim=1, keepdim=True)], dim=1).tolist()  # (B, steps + 1)
    return [[row[i] for row in counts] for i in range(steps)], sum(row[-1] for row in counts)


def candidate_counts(x, block_start, block_end, mask_id):
    """(number of [M] in the block, number of [M] before the block end): one host sync."""
    masked = x[:, :block_end] == mask_id  # (B, block_end)
    return torch.stack([masked[:, block_start:].sum(), masked.sum()]).tolist()


def check_schedule(gen_length, block_length, steps):
    """LLaDA's constraints, as errors naming the fix. Returns (num_blocks, steps_per_block)."""
    if gen_length < 1 or block_length < 1 or steps < 1:
        raise ValueError(f"gen_length, block_length and steps must be >= 1, "
                         f"got {gen_length}, {block_length}, {steps}")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                         f"gen_length/block_length={num_blocks}")
    return num_blocks, steps // num_blocks


# ------------------------------------------------------------------------------------------------
# One LLaDA step
# ------------------------------------------------------------------------------------------------


def reveal_step(x, logits, block_end, k_per_row, temperature, remasking, mask_id, generator=None,
                decoding=None, eos_ids=(), candidates=None):
    """One step: predict every [M] before the block end and reveal some, the rest stay [M].

    x: (B, L) long current tokens; logits: (B, L, V) the model's output for x; block_end: first position
    after the current block; k_per_row: list of B ints, tokens to reveal per row (the fixed rule; ignored
    by the adaptive rules). decoding: Decoding (default LLADA). candidates: the number of [M] before the
    block end when the caller knows it (no host sync; see predict_candidates), else None.
    Returns (new x (B, L), revealed (B,) long).
    """
    decoding = decoding or LLADA
    B, L = x.shape
    rows, cols, predicted, confidence, probability = predict_candidates(
        x, logits, block_end, temperature, remasking, mask_id, generator, decoding.rng, eos_ids,
        decoding.confidence_eos_eot_inf, candidates)  # (N,) each
    x0 = x.clone()
    x0[rows, cols] = predicted  # (B, L)
    if decoding.rule == "fixed":  # LLaDA: the k most confident candidates per row
        ranked = torch.full((B, L), -math.inf, dtype=confidence.dtype, device=x.device)
        ranked[rows, cols] = confidence  # revealed tokens and positions past the block: -inf
        transfer = choose_fixed(ranked, k_per_row)
    else:
        transfer = adaptive_transfer((B, L), rows, cols, confidence, probability, decoding, eos_ids)
    if transfer is None:
        return x, torch.zeros(B, dtype=torch.long, device=x.device)
    return torch.where(transfer, x0, x), transfer.sum(dim=1)


def predict_candidates(x, logits, block_end, temperature, remasking, mask_id, generator=None, rng="llada",
                       eos_ids=(), confidence_eos_eot_inf=False, candidates=None):
    """Predict every [M] before block_end and score it. Returns (rows, cols, predicted, confidence,
    probability): (N,) each; probability is the model's probability of the predicted token, confidence
    what the fixed rule ranks by (probability, or a uniform draw with random remasking).

    Candidates are LLaDA's: masked positions before block_end. Only their rows of the logits are processed
    (prediction, Gumbel noise, softmax are row-wise, so each value is the one LLaDA computes on the full
    tensor). With rng="llada" the random numbers are drawn for the full (B, L, V) and (B, L) shapes so the
    RNG stream stays LLaDA's; with rng="fast" one per candidate (same distribution, fast_draw).
    candidates: N when the caller knows it (mdm_loop's fixed rule counts on the host: N falls by the tokens
    revealed each step: with rng="fast" [M] is never predicted, so a revealed position never stays [M]), so the
    positions are found without a host-device sync (torch.nonzero_static); None: torch.nonzero, which waits
    for the device.
    """
    B, L = x.shape
    masked = x[:, :block_end] == mask_id  # (B, block_end)
    if candidates is None:
        rows, cols = masked.nonzero(as_tuple=True)  # (N,), (N,) candidate positions, row-major
    else:
        rows, cols = torch.nonzero_static(masked, size=candidates).unbind(dim=1)  # the same, no sync
    candidate_logits = logits[rows, cols]  # (N, V)
    if rng == "llada":
        p = F.softmax(candidate_logits, dim=-1)  # (N, V) in the model's dtype, as LLaDA
        if temperature == 0:
            predicted = candidate_logits.argmax(dim=-1)  # (N,) greedy
        else:  # LLaDA's torch.rand_like(logits, float64): drawn in full, used at the candidates
            noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device,
                               generator=generator)[rows, cols]  # (N, V)
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
        is_eos = torch.isin(predicted, torch.as_tensor(eos_ids, device=predicted.device))
        # below every other candidate (scores are in [0, 1]) but above the -inf of non-candidates
        confidence = torch.where(is_eos, confidence - 2.0, confidence)
    return rows, cols, predicted, confidence, probability


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


# ------------------------------------------------------------------------------------------------
# Entry points: LLaDA's generate() and the autoencoder (Alg. 6)
# ------------------------------------------------------------------------------------------------


def generate(model, prompt, gen_length=128, block_length=128, steps=128, temperature=0.0,
             remasking="low_confidence", mask_id=None, registers=None, register_mask=None,
             attention_mask=None, generator=None, refresh_registers=None, decoding=None, stats=None):
    """LLaDA's generate(): decode gen_length tokens after `prompt` with the (guided) MDM.

    prompt: (B, P) long token ids, or an int B for unconditional generation (P = 0, all-[M] start).
    gen_length % block_length == 0 and steps % (gen_length / block_length) == 0 (LLaDA's asserts).
    temperature: Gumbel-max temperature (0 = greedy). remasking: 'low_confidence' | 'random'.
    mask_id: the [M] id (default model.cfg.mask_token_id). registers (B, k, d) | None and register_mask
    (B, k) | None are passed to the model at every step (None = base MDM). attention_mask: (B, P) bool for
    a left-padded prompt (False = pad); it is extended with True over the generated part, as in LLaDA.
    generator / RNG draw order, decoding (Decoding; default LLADA, LLaDA's generate() exactly): see the
    module docstring. refresh_registers, stats: see mdm_loop.
    Returns (tokens (B, P + gen_length) long with the prompt in front, as LLaDA returns, nfe int).
    """
    mask_id = _resolve_mask_id(model, mask_id)
    if isinstance(prompt, int):
        prompt = torch.zeros(prompt, 0, dtype=torch.long, device=_model_device(model))
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be (B, P) token ids or an int batch size, "
                         f"got shape {tuple(prompt.shape)}")
    B, P = prompt.shape
    x = torch.full((B, P + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :P] = prompt
    if attention_mask is not None:
        if attention_mask.shape != (B, P):
            raise ValueError(f"attention_mask must cover the prompt, shape {(B, P)}; "
                             f"got {tuple(attention_mask.shape)}")
        attention_mask = torch.cat([attention_mask.bool(),
                                    torch.ones(B, gen_length, dtype=torch.bool, device=x.device)], dim=1)
    return mdm_loop(model, x, P, block_length, steps, temperature, remasking, mask_id, registers,
                    register_mask, attention_mask, generator, refresh_registers, decoding, stats)


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


def autoencode(encoder, demasker, enc_ids, enc_mask, gen_length, block_length=None, steps=None,
               temperature=0.0, remasking="low_confidence", mask_id=None, keep=None, generator=None,
               decoding=None, stats=None):
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
    raise ValueError("mask_id is None and the model has no cfg.mask_token_id; "
                     "pass mask_id=<the [M] token id>")
