"""Decoders of CRoCoDiL: the LLaDA masked-diffusion sampler, plain and guided by registers.

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

CLI: `python sample.py --ckpt RUN --method base|autoencode ...` prints decoded programs (autoencode: source,
reconstruction and CER) and writes JSONL; see --help. Overhead benchmark: bench_sample.py.
`--method conthendisc|conwithindisc --ae RUN --prior DIR [--cond-prior DIR]` runs the hybrid generators of
generators.py (Alg. 2, 3) with priors trained by train_prior.py; their NFE follows the paper (generators.py).
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from metrics import cer, levenshtein  # noqa: F401  (CER, Tables 1-2: moved to metrics.py, re-exported)
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


# ------------------------------------------------------------------------------------------------
# Decoding to text and the character error rate
# ------------------------------------------------------------------------------------------------


def program_ids(ids, eos_id, bos_id=None):
    """Token ids of one program: a leading BOS dropped, everything from the first EOS on dropped."""
    ids = [int(i) for i in ids]
    if bos_id is not None and ids and ids[0] == bos_id:
        ids = ids[1:]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return ids


def decode_programs(tokenizer, tokens, eos_id, bos_id=None):
    """(B, L) token ids -> B strings via tokenizer.decode, each cut at its first EOS (variable lengths)."""
    rows = tokens.tolist() if torch.is_tensor(tokens) else tokens
    return [tokenizer.decode(program_ids(row, eos_id, bos_id)) for row in rows]


# ------------------------------------------------------------------------------------------------
# Command line: python sample.py --ckpt DIR --method base|autoencode ...
# ------------------------------------------------------------------------------------------------


def load_run(ckpt, need_encoder, device="cpu", dtype=None):
    """(demasker, encoder | None, tokenizer) from a train_ae.py run (OUT or OUT/checkpoint: demasker/, encoder/,
    tokenizer.json).
    A folder that is itself a demasker checkpoint (config.json) also works for --method base."""
    from pathlib import Path

    from data import load_tokenizer
    from demasker import Demasker
    from encoder import Encoder

    folder = Path(ckpt)
    if (folder / "checkpoint" / "demasker").is_dir():  # a run folder: its latest checkpoint
        folder = folder / "checkpoint"
    demasker_dir = folder / "demasker" if (folder / "demasker").is_dir() else folder
    if not (demasker_dir / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no demasker/ (or config.json); pass --ckpt a train_ae.py output folder")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        tokenizer_file = demasker_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; train_ae.py writes one next to demasker/")
    demasker = Demasker.from_pretrained(str(demasker_dir), dtype=dtype, device=device).eval()
    encoder = None
    if need_encoder:
        if not (folder / "encoder").is_dir():
            raise FileNotFoundError(f"{folder} has no encoder/; --method autoencode needs an encoder-demasker "
                                    f"checkpoint (train_ae.py without --no-registers)")
        encoder = Encoder.from_pretrained(str(folder / "encoder"), dtype=dtype, device=device).eval()
    return demasker, encoder, load_tokenizer(str(tokenizer_file))


def through_first_eos(ids, eos_id):
    """(B, L) ids BOS..EOS padded with EOS -> (B, L) bool, True up to and including the first EOS (the
    encoder's attention_mask: the program and its EOS are valid, the EOS padding is not)."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]


def validation_sources(data_dir, num, tokenizer, demasker_cfg, encoder_cfg):
    """Held-out programs for --method autoencode: the first `num` of data.py's validation split.

    Uses data.load_split(data_dir, "val") -> mapping with "ids" (N, L) demasker token ids (BOS..EOS padded
    with EOS to L) and, when the encoder has its own tokenizer, "encoder_ids" (N, L_enc) in the same layout.
    Returns {"texts": [str], "enc_ids": (n, L_enc) long, "enc_mask": (n, L_enc) bool, "length": L}.
    """
    from data import load_split

    split = load_split(data_dir, "val")
    ids = torch.as_tensor(np.asarray(split["ids"][:num]), dtype=torch.long)  # (n, L)
    if ids.shape[0] < num:
        raise ValueError(f"the validation split of {data_dir} has only {ids.shape[0]} programs; lower --num")
    has_own = "encoder_ids" in split and split["encoder_ids"] is not None
    enc_ids = torch.as_tensor(np.asarray(split["encoder_ids"][:num]), dtype=torch.long) if has_own else ids
    texts = decode_programs(tokenizer, ids, demasker_cfg.eos_token_id, demasker_cfg.bos_token_id)
    enc_eos = encoder_cfg.eos_token_id if has_own else demasker_cfg.eos_token_id
    return {"texts": texts, "enc_ids": enc_ids, "enc_mask": through_first_eos(enc_ids, enc_eos),
            "length": ids.shape[1]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Decode programs with the masked diffusion sampler (LLaDA generate). "
                    "base: the unguided MDM from an all-[M] start; autoencode: encode held-out programs with "
                    "h_phi and decode them with the guided MDM (Alg. 6), printing the CER.")
    parser.add_argument("--ckpt", "--ae", dest="ckpt", required=True,
                        help="train_ae.py output folder (demasker/, encoder/, tokenizer.json)")
    parser.add_argument("--method", choices=["base", "autoencode", "conthendisc", "conwithindisc"], default="base",
                        help="base = unconditional MDM; autoencode = reconstruct validation programs (Alg. 6); "
                             "conthendisc = registers from --prior, then the guided MDM (Alg. 2); conwithindisc = "
                             "the guided MDM with registers redrawn from --cond-prior given x_t (Alg. 3, App. G)")
    parser.add_argument("--prior", default=None, help="train_prior.py run (unconditional): conthendisc's registers, "
                        "and conwithindisc's initial ones (without it: --cond-prior given the all-[M] canvas)")
    parser.add_argument("--cond-prior", default=None, help="train_prior.py --conditional run, for conwithindisc")
    parser.add_argument("--prior-steps", type=int, default=128, help="DDIM steps of the initial register draw "
                        "(paper: 128)")
    parser.add_argument("--refresh-at", type=float, nargs="*", default=[0.5],
                        help="conwithindisc: fractions of the MDM steps before which the registers are redrawn "
                             "(default one refresh at 0.5, App. G; 0 or nothing = no refresh = ConThenDisc)")
    parser.add_argument("--refresh-prior-steps", type=int, default=32, help="DDIM steps of each redraw (paper: 32)")
    parser.add_argument("--data", default=None, help="data cache folder (data.py) holding the validation split; "
                        "autoencode only")
    parser.add_argument("--gen-length", "--length", dest="gen_length", type=int, default=None,
                        help="tokens to generate (default: the data sequence length for autoencode, 256 otherwise)")
    parser.add_argument("--block-length", type=int, default=None,
                        help="semi-autoregressive block length (default: gen-length, one block as in the paper)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps = NFE (default: gen-length, one token per step)")
    parser.add_argument("--temperature", type=float, default=0.0, help="Gumbel-max temperature (0 = greedy)")
    parser.add_argument("--remasking", choices=REMASKING, default="low_confidence",
                        help="which predictions to keep each step: most confident, or random")
    parser.add_argument("--keep", type=int, default=None, help="autoencode: use only the first k registers")
    parser.add_argument("--num", type=int, default=8, help="number of programs to decode")
    parser.add_argument("--batch-size", type=int, default=8, help="programs decoded in parallel")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed before sampling (LLaDA RNG order); "
                        "the priors' noise comes from a CPU generator seeded with it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="model dtype (default: as stored in the checkpoint)")
    parser.add_argument("--out", default=None, help="JSONL file: one record per program (text, tokens, nfe, ...)")
    parser.add_argument("--quiet", action="store_true", help="do not print the programs")
    return parser.parse_args(argv)


def hybrid_generator(args, dtype):
    """ConThenDisc / ConWithinDisc (generators.py) with the priors named on the command line, as (a callable
    (demasker, count, gen_length, block_length, steps, temperature, remasking) -> (tokens, nfe report), the
    CPU generator of the priors' noise)."""
    from generators import conthendisc, conwithindisc, load_prior

    prior = load_prior(args.prior, ae=args.ckpt, device=args.device, dtype=dtype) if args.prior else None
    prior_generator = torch.Generator().manual_seed(args.seed)  # re-seeded per batch by main()
    if args.method == "conthendisc":
        if prior is None:
            raise ValueError("--method conthendisc needs --prior, a train_prior.py run folder")
        return (lambda demasker, count, *settings: conthendisc(demasker, prior, count, *settings,
                                                               prior_steps=args.prior_steps,
                                                               prior_generator=prior_generator)), prior_generator
    if args.cond_prior is None:
        raise ValueError("--method conwithindisc needs --cond-prior, a train_prior.py --conditional run folder")
    cond_prior = load_prior(args.cond_prior, ae=args.ckpt, device=args.device, dtype=dtype)
    return (lambda demasker, count, *settings: conwithindisc(
        demasker, cond_prior, count, *settings, prior=prior, prior_steps=args.prior_steps, refresh_at=args.refresh_at,
        refresh_prior_steps=args.refresh_prior_steps, prior_generator=prior_generator)), prior_generator


def batch_seed(seed, first_index):
    """The seed of the batch whose first sample index is first_index: the same on any number of ranks."""
    import numpy as np
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def show(record, autoencoding):
    from tqdm import tqdm
    tqdm.write(f"===== program {record['index']} (NFE {record['nfe']:.4g})"
               + (f", CER {record['cer']:.3f}" if autoencoding else ""))
    if autoencoding:
        tqdm.write("--- source\n" + record["source"] + "\n--- reconstruction")
    tqdm.write(record["text"])


def main(argv=None):
    """Decode args.num programs in batches. Under torchrun the batches are dealt round-robin to the ranks and
    gathered on rank 0, which prints and writes; batch b is seeded by batch_seed(seed, its first index), so
    the output does not depend on the number of ranks."""
    from tqdm import tqdm

    import distributed as D

    args = parse_args(argv)
    env = D.setup(device=args.device)
    args.device = str(env.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    autoencoding = args.method == "autoencode"
    demasker, encoder, tokenizer = load_run(args.ckpt, autoencoding, args.device, dtype)
    cfg = demasker.cfg
    hybrid, prior_generator = (hybrid_generator(args, dtype) if args.method in ("conthendisc", "conwithindisc")
                               else (None, None))
    sources = None
    if autoencoding:
        if args.data is None:
            raise ValueError("--method autoencode needs --data, the data cache folder written by data.py")
        sources = validation_sources(args.data, args.num, tokenizer, cfg, encoder.cfg)
        gen_length = args.gen_length or sources["length"]
    else:
        gen_length = args.gen_length or 256
    block_length, steps = args.block_length or gen_length, args.steps or gen_length
    check_schedule(gen_length, block_length, steps)

    records, start = [], time.time()
    mine = list(range(0, args.num, args.batch_size))[env.rank::env.world_size]
    for first in tqdm(mine, desc=f"{args.method} L={gen_length} steps={steps}", disable=not env.is_main):
        count = min(args.batch_size, args.num - first)
        seed = batch_seed(args.seed, first)
        torch.manual_seed(seed)  # the MDM's draws (LLaDA's generate uses the global RNG)
        if prior_generator is not None:
            prior_generator.manual_seed(seed + 1)
        if autoencoding:
            enc_ids = sources["enc_ids"][first:first + count].to(args.device)
            enc_mask = sources["enc_mask"][first:first + count].to(args.device)
            tokens, nfe = autoencode(encoder, demasker, enc_ids, enc_mask, gen_length, block_length, steps,
                                     args.temperature, args.remasking, keep=args.keep)
        elif hybrid is not None:
            tokens, report = hybrid(demasker, count, gen_length, block_length, steps, args.temperature, args.remasking)
            nfe = report["nfe"]
        else:
            tokens, nfe = generate(demasker, count, gen_length, block_length, steps, args.temperature, args.remasking)
        texts = decode_programs(tokenizer, tokens, cfg.eos_token_id, cfg.bos_token_id)
        for i, text in enumerate(texts):
            record = {"index": first + i, "method": args.method, "text": text, "tokens": tokens[i].tolist(),
                      "nfe": nfe, "gen_length": gen_length, "block_length": block_length, "steps": steps,
                      "temperature": args.temperature, "remasking": args.remasking, "seed": args.seed}
            if hybrid is not None:
                record.update(nfe_counts=report, prior=args.prior, cond_prior=args.cond_prior,
                              prior_steps=args.prior_steps)
                if args.method == "conwithindisc":
                    record.update(refresh_at=args.refresh_at, refresh_prior_steps=args.refresh_prior_steps)
            if autoencoding:
                record["source"] = sources["texts"][first + i]
                record["cer"] = cer(record["source"], text)
            if not args.quiet and not env.distributed:
                show(record, autoencoding)
            records.append(record)
    gathered = D.gather_objects(records, env)
    D.cleanup(env)
    if gathered is None:  # not rank 0
        return None
    gathered.sort(key=lambda record: record["index"])
    if not args.quiet and env.distributed:
        for record in gathered:
            show(record, autoencoding)
    if args.out:
        with open(args.out + ".tmp", "w") as out:
            out.writelines(json.dumps(record) + "\n" for record in gathered)
        os.replace(args.out + ".tmp", args.out)
    errors = [record["cer"] for record in gathered] if autoencoding else []
    summary = (f"{args.num} programs on {env.world_size} rank(s), NFE {gathered[-1]['nfe']:.4g} per batch, "
               f"{time.time() - start:.1f}s")
    if errors:
        summary += f", mean CER {sum(errors) / len(errors):.4f}"
    print(summary)
    return errors


if __name__ == "__main__":
    main()
