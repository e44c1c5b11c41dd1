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

Random numbers (for exact parity with LLaDA). With generator=None every draw uses PyTorch's global RNG in
LLaDA's order, so `torch.manual_seed(s); generate(...)` equals LLaDA's output after the same seed.
Per step, and nothing else:
  1. if temperature > 0: one float64 uniform tensor of the logits' shape (B, L, V) (LLaDA's torch.rand_like);
  2. if remasking == 'random': one (B, L) uniform tensor of the default dtype (LLaDA's torch.rand).
A `generator` (torch.Generator on the model's device) makes the same draws from it instead.

NFE (network function evaluations) = number of demasker forward calls = `steps`; returned by every decoder.

This is the lowest sampling file: generators.py (Alg. 2, 3) and sample.py (the CLI for every method) build
on it. Overhead benchmark: bench/bench_sample.py.
"""

import math

import torch
import torch.nn.functional as F

from schedules import num_transfer_tokens

REMASKING = ("low_confidence", "random")


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


def reveal_step(x, logits, block_end, k_per_row, temperature, remasking, mask_id, generator=None):
    """One LLaDA step: predict every [M], keep the k most confident before the block end, remask the rest.

    x: (B, L) long current tokens; logits: (B, L, V) the model's output for x; block_end: first position
    after the current block; k_per_row: list of B ints, tokens to reveal per row at this step.
    Returns the new x (B, L).

    Candidates are LLaDA's: masked positions before block_end (later positions get confidence -inf). Only
    their rows of the logits are processed (prediction, Gumbel noise, softmax are row-wise, so each value
    is the one LLaDA computes on the full tensor), but the random numbers are drawn for the full (B, L, V)
    and (B, L) shapes so the RNG stream stays LLaDA's.
    """
    B, L = x.shape
    mask_index = x == mask_id  # (B, L)
    rows, cols = mask_index[:, :block_end].nonzero(as_tuple=True)  # (N,), (N,) candidate positions
    candidate_logits = logits[rows, cols]  # (N, V)
    noise = None
    if temperature != 0:  # LLaDA's torch.rand_like(logits, float64): drawn in full, used at the candidates
        noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)[rows, cols]
    predicted = add_gumbel_noise(candidate_logits, temperature, noise=noise).argmax(dim=-1)  # (N,)
    if remasking == "low_confidence":
        p = F.softmax(candidate_logits, dim=-1)  # (N, V) in the model's dtype, as LLaDA
        candidate_confidence = torch.gather(p, -1, predicted.unsqueeze(-1)).squeeze(-1)  # (N,)
    elif remasking == "random":
        candidate_confidence = torch.rand((B, L), device=x.device, generator=generator)[rows, cols]  # (N,)
    else:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    confidence = torch.full((B, L), -math.inf, dtype=candidate_confidence.dtype, device=x.device)
    confidence[rows, cols] = candidate_confidence  # revealed tokens and positions past the block: -inf
    x0 = x.clone()
    x0[rows, cols] = predicted

    # Per-row top-k, one torch.topk call per row exactly as LLaDA (same ties broken the same way).
    chosen_rows, chosen_cols = [], []
    for row, k in enumerate(k_per_row):
        if k > 0:
            chosen_cols.append(torch.topk(confidence[row], k=k).indices)
            chosen_rows.append(torch.full((k,), row, dtype=torch.long, device=x.device))
    if not chosen_rows:
        return x
    transfer = torch.zeros_like(mask_index)
    transfer[torch.cat(chosen_rows), torch.cat(chosen_cols)] = True
    return torch.where(transfer, x0, x)


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


@torch.no_grad()
def mdm_loop(model, x, gen_start, block_length, steps, temperature=0.0, remasking="low_confidence",
             mask_id=None, registers=None, register_mask=None, attention_mask=None, generator=None,
             refresh_registers=None):
    """Semi-autoregressive MDM decoding of x[:, gen_start:] in place of LLaDA's two nested loops.

    x: (B, L) long, the prompt followed by [M] up to L. Blocks of block_length are decoded left to right,
    each in steps / num_blocks steps; every step calls model(x, registers=..., register_mask=...,
    attention_mask=...) -> logits (B, L, V) once and reveals num_transfer_tokens tokens per row.
    refresh_registers: optional callable(step, x, registers, register_mask) called before the model at
    every global step 0..steps-1; it returns None (keep) or a new (registers, register_mask) pair.
    Returns (x (B, L), nfe).
    """
    gen_length = x.shape[1] - gen_start
    num_blocks, steps_per_block = check_schedule(gen_length, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
    nfe, step = 0, 0
    for block in range(num_blocks):
        block_start = gen_start + block * block_length
        block_end = block_start + block_length
        # (B, steps_per_block) as Python ints: one host sync per block, none per step
        schedule = num_transfer_tokens(x[:, block_start:block_end] == mask_id, steps_per_block).tolist()
        for i in range(steps_per_block):
            if refresh_registers is not None:
                refreshed = refresh_registers(step, x, registers, register_mask)
                if refreshed is not None:
                    registers, register_mask = refreshed
            logits = model(x, registers=registers, register_mask=register_mask, attention_mask=attention_mask)
            nfe += 1
            x = reveal_step(x, logits, block_end, [row[i] for row in schedule], temperature, remasking,
                            mask_id, generator)
            step += 1
    return x, nfe


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
             generator=None, refresh_registers=None):
    """LLaDA's generate(): decode gen_length tokens after `prompt` with the (guided) MDM.

    prompt: (B, P) long token ids, or an int B for unconditional generation (P = 0, all-[M] start).
    gen_length % block_length == 0 and steps % (gen_length / block_length) == 0 (LLaDA's asserts).
    temperature: Gumbel-max temperature (0 = greedy). remasking: 'low_confidence' | 'random'.
    mask_id: the [M] id (default model.cfg.mask_token_id). registers (B, k, d) | None and register_mask
    (B, k) | None are passed to the model at every step (None = base MDM). attention_mask: (B, P) bool for a
    left-padded prompt (False = pad); it is extended with True over the generated part, as in LLaDA.
    generator / RNG draw order: see the module docstring. refresh_registers: see mdm_loop.
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
                    attention_mask, generator, refresh_registers)


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
               remasking="low_confidence", mask_id=None, keep=None, generator=None):
    """The discrete-continuum-discrete autoencoder (Alg. 6): z_0 = h_phi(x_0), then the guided MDM from an
    all-[M] start of gen_length tokens, z_0 fixed at every step.

    enc_ids: (B, L_enc) the source programs in the encoder's tokenization; enc_mask: (B, L_enc) bool valid
    tokens (None = all). block_length defaults to gen_length (one block, the paper's setting), steps to
    gen_length (one token per step). keep: see encode_registers.
    Returns (tokens (B, gen_length), nfe) where nfe counts demasker calls (the one encoder call is extra).
    """
    registers, register_mask = encode_registers(encoder, enc_ids, enc_mask, keep)
    return generate(demasker, enc_ids.shape[0], gen_length, block_length or gen_length, steps or gen_length,
                    temperature, remasking, mask_id, registers=registers, register_mask=register_mask,
                    generator=generator)
