"""Train the latent prior g_psi on register banks: unconditional (Alg. 5) or conditional (Alg. 4).

Paper map (arXiv 2603.20210, App. E):
- Alg. 5 (ConThenDisc's prior): z_0 = h_phi(x_0) from the frozen encoder (dataprep/latent_data.py banks),
  t ~ U, z_t = sqrt(ab(t)) z_0 + sqrt(1 - ab(t)) eps (cosine DDPM, schedules.q_sample), loss
  ||g_psi(z_t, t) - z_0||^2 (x0-prediction; prior_loss), here the mean over registers AND entries (each register
  has norm sqrt(d), so an entry's mean square is 1 and the loss reads as a relative error).
- App. E block offsets: the K registers form geometric blocks 1, 2, 4, ...; block b is noised at
  clip(t + Delta_b, 0, 1) with the base time t ~ U[-max_offset, 1] (schedules.sample_base_times /
  register_times), so every block sees all of [0, 1] and later blocks are always noisier.
  --no-block-offsets is the ablation of App. G (iii).
- Alg. 4 / App. E (`--conditional`, ConWithinDisc's prior): r ~ U[0, 1], x^(r) masks each position with
  probability r, the conditioning is the encoder's registers of x^(r) with the masked positions hidden
  (latent_data.visible_view, the same view generators.py builds from x_t), and the DiT cross-attends to
  them. The encoder is frozen (h_phi) unless --train-cond-encoder, which trains a second encoder h_mu
  initialised from h_phi jointly with the DiT (Sec. 4.3.2, comment (iii)).
- Only the first --num-registers K registers of each bank are modelled (paper: K = 8 out of banks of 128
  for generation, App. G (i)); `--num-registers all` models the whole bank (the paper's 1024 x 128 latent),
  of which a demasker may read the first k. The conditioning uses --cond-registers registers of x^(r).
- Training (get_lr and make_optimizer shared with train_ae.py): AdamW with weight decay on matrices only, linear
  warmup then cosine decay, gradient clipping, an EMA of the weights (DiT / PixArt keep one at 0.9999; the
  effective decay is min(decay, (1 + step) / (10 + step)) so short runs are not dominated by the initial
  weights). The EMA weights are the model used for sampling. Presets: config/prior_args.py (the paper states
  no optimiser settings for the prior; ours follow DiT).
- Validation (App. E, Fig. 9): on fixed held-out banks with fixed noise, MSE and PSNR(g(z_t, t), z_0)
  at base times t = 0, 0.1, ..., 1 (PSNR with peak 1 = the RMS of a register entry; metrics.psnr); the
  conditional prior is validated at r = 0.5, the paper's inference ratio. MSE cannot see whether the prior
  reads its condition: with --val-consistency N (off by default, training/prior_run.py says why) the
  conditional prior's validation also logs evaluation/consistency.py's agreement (registers drawn given
  h(x_t) at revealed shares 0.25 / 0.5 / 0.75, decoded by the AE run's demasker: the share of revealed tokens
  reproduced) and copy (given the clean h(x): cosine / MSE to h_phi(x), CER), beside the oracle z = h_phi(x)
  and the all-[M] condition, with bootstrap intervals over the N programs ("consistency" in the val record).

Randomness is a function of (seed, step) only: batch rows come from a stream of per-epoch permutations and each
step draws t, the noise and the masks for the whole global batch from a generator seeded by (seed, step), each
rank taking its rows. So resuming needs no RNG state and any number of ranks (or micro-batches) follows the
same trajectory up to float summation order.

Run folder (--out-dir; plumbing in training/prior_run.py, flags in config/prior_args.py; a folder that holds anything
is refused unless --resume or --overwrite, one writer at a time: infra/run_folder.py):
    prior.json        settings sampling must repeat (K, offsets, conditioning) + pointer to the AE run
    args.json         the command line
    dit/              EMA weights, LatentDiT.save_pretrained (read by generators.load_prior), and a model card
    cond_encoder/     EMA h_mu (only with --train-cond-encoder)
    train_state/      raw weights + training_state.pt (AdamW, EMA, step), atomic; `--resume` continues bit-exactly
    log.jsonl         {"type": "train", "step", "loss", "lr", ...} and {"type": "val", "step", "val_mse", "psnr", ...,
                      "consistency" (with --val-consistency)}

    python train_prior.py --ae runs/ae --out-dir runs/prior --max-steps 2000
    python train_prior.py --ae runs/ae --out-dir runs/cprior --conditional --max-steps 2000 --val-consistency 8
    torchrun --nproc_per_node 8 train_prior.py --ae RUN --out-dir OUT --preset paper --num-registers all
"""

import copy
import functools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from config.prior_args import parse_args, resolve_ae  # noqa: F401 (train_prior.resolve_ae)
from dataprep.cross_tokenizer import masked_view
from infra import distributed as D
from infra import guards
from infra.run_folder import claim
from training import runs as R
from training.prior_run import (CONSISTENCY_PRIOR_STEPS, STATE_DIR, batch_rows, check_run_folder,  # noqa: F401
                             check_same_sources, conditioning_view, consistency_inputs, load_banks, load_resume,
                             log_line, parse_all, resolve_data_dir, run_context, save, truncate_log, write_settings)
from latent_dit import DiTConfig, LatentDiT
from schedules import q_sample, register_times, sample_base_times

VAL_TIMES = [round(0.1 * i, 1) for i in range(11)]
VAL_SEED = 987654321


# ------------------------------------------------------------------------------------------------
# The trainable module: the DiT and (optionally) the conditioning encoder h_mu
# ------------------------------------------------------------------------------------------------


class PriorTrainee(nn.Module):
    """g_psi, plus h_mu when the conditioning encoder is trained (one module, so DDP syncs both)."""

    def __init__(self, dit, cond_encoder=None):
        super().__init__()
        self.dit = dit
        self.cond_encoder = cond_encoder

    def forward(self, z_t, t, cond=None, cond_ids=None, cond_attention=None, cond_hide=None):
        """z_t (B, K, d), t (B, K); cond (B, S, c) precomputed by a frozen encoder, or the x^(r) view
        (cond_ids, cond_attention, cond_hide) (B, L) for h_mu. Returns z0_hat (B, K, d)."""
        if self.cond_encoder is not None:
            cond = self.cond_encoder(cond_ids, attention_mask=cond_attention, hide=cond_hide)
        return self.dit(z_t, t, cond, None)


def prior_loss(model, z0, t, noise, **cond):
    """Alg. 4/5 line 5-7: MSE between g(q_sample(z0, t, noise), t) and z0, mean over every entry."""
    z_t = q_sample(z0, t, noise)
    return F.mse_loss(model(z_t, t, **cond).float(), z0)


class EMA:
    """Exponential moving average of a module's parameters, kept as a second module (for sampling)."""

    def __init__(self, module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module, decay):
        for average, current in zip(self.module.parameters(), module.parameters()):
            average.lerp_(current.detach().to(average.dtype), 1.0 - decay)


def ema_decay(decay, step):
    return min(decay, (1.0 + step) / (10.0 + step))


# ------------------------------------------------------------------------------------------------
# Per-step randomness (a function of (seed, step); the rows: prior_run.batch_rows) and the model inputs
# ------------------------------------------------------------------------------------------------


def step_draws(seed, step, global_batch, num_registers, dim, max_offset, offsets, seq_len=None):
    """Every random number of one step, for the whole global batch: base times (G,), noise (G, K, d) and,
    for the conditional prior (seq_len given), mask ratios r (G,) and uniforms (G, L)."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    draws = {"t": sample_base_times(global_batch, max_offset, offsets, generator=g),
             "noise": torch.randn(global_batch, num_registers, dim, generator=g)}
    if seq_len is not None:
        draws["r"] = torch.rand(global_batch, generator=g)
        draws["u"] = torch.rand(global_batch, seq_len, generator=g)
    return draws


def conditioning_inputs(view, tokens, rows, uniforms, ratios, device):
    """x^(r) of Alg. 4 drawn in the DEMASKER's token space (what the demasker's canvas x_t looks like when
    ConWithinDisc refreshes), then the encoder's view of it (dataprep/cross_tokenizer.py: the row itself with one
    tokenizer; visible runs re-tokenised and hidden slots for masked runs with two). Returns (ids,
    attention_mask, hide) on the device, each (B, L_enc)."""
    ids = tokens.batch(rows)["ids"]  # (B, L) demasker ids
    enc_ids, attention_mask, hide = masked_view(view, ids, uniforms, ratios, length=getattr(view, "max_length", None))
    return enc_ids.to(device), attention_mask.to(device), hide.to(device)


def model_inputs(ctx, rows, t_base, noise, r=None, u=None):
    """(z0, t (B, K), noise, cond kwargs) on the device for these bank rows and their draws."""
    a = ctx["args"]
    device = ctx["device"]
    z0 = ctx["bank"].batch(rows).to(device)
    t = register_times(t_base, a.num_registers, a.max_offset, not a.no_block_offsets).to(device)
    kwargs = {}
    if a.conditional:
        ids, attention, hide = conditioning_inputs(ctx["view"], ctx["tokens"], rows, u, r, device)
        if ctx["frozen_encoder"] is not None:
            with torch.no_grad():
                kwargs["cond"] = ctx["frozen_encoder"](ids, attention_mask=attention, hide=hide).float()
        else:
            kwargs.update(cond_ids=ids, cond_attention=attention, cond_hide=hide)
    return z0, t, noise.to(device), kwargs


# ------------------------------------------------------------------------------------------------
# Validation: MSE and PSNR as a function of t (Fig. 9)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model, ctx):
    """EMA model on the first --val-examples held-out banks, fixed noise (and r = 0.5 masks)."""
    from evaluation.metrics import psnr

    a, bank = ctx["args"], ctx["val_bank"]
    n = min(len(bank), a.val_examples)
    rows = np.arange(n)
    g = torch.Generator().manual_seed(VAL_SEED)
    noise = torch.randn(n, a.num_registers, bank.dim, generator=g)
    u = torch.rand(n, ctx["seq_len"], generator=g) if a.conditional else None
    r = torch.full((n,), 0.5)
    tokens = ctx.get("tokens")
    ctx["tokens"], ctx["bank"] = ctx.get("val_tokens"), bank  # model_inputs reads the val split
    mse, psnr_db = [], []
    try:
        for t_value in VAL_TIMES:
            errors, ratios = [], []
            for first in range(0, n, a.micro_batch_size):
                part = slice(first, min(n, first + a.micro_batch_size))
                z0, t, eps, kwargs = model_inputs(ctx, rows[part], torch.full((len(rows[part]),), t_value),
                                                  noise[part], r[part], None if u is None else u[part])
                pred = model(q_sample(z0, t, eps), t, **kwargs).float()
                errors.append((pred - z0).pow(2).flatten(1).mean(1).cpu())
                ratios.append(psnr(pred, z0).cpu())
            mse.append(float(torch.cat(errors).mean()))
            psnr_db.append(float(torch.cat(ratios).mean()))
    finally:
        ctx["tokens"], ctx["bank"] = tokens, ctx["train_bank"]
    result = {"val_mse": float(np.mean(mse)), "t": VAL_TIMES, "mse": mse, "psnr": psnr_db, "val_examples": n}
    inputs = consistency_inputs(ctx)  # None unless --val-consistency N with --conditional
    if inputs is not None:
        result["consistency"] = validate_consistency(model, ctx, inputs)
    return result


def validate_consistency(model, ctx, inputs):
    """evaluation/consistency.measure on the EMA prior (its h_mu, or the frozen h_phi, reads the canvas through
    the training view), the held-out programs of prior_run.consistency_inputs, fixed seeds."""
    from evaluation.consistency import measure
    from generators import Prior

    a = ctx["args"]
    encoder = model.cond_encoder if model.cond_encoder is not None else ctx["frozen_encoder"]
    prior = Prior(model.dit, a.num_registers, a.max_offset, not a.no_block_offsets, encoder=encoder,
                  shared_tokenizer=ctx["view"].shared, view=ctx["view"])
    return measure(inputs["demasker"], prior, inputs["ids"], inputs["lengths"], inputs["oracle"],
                   steps=a.val_consistency_steps, refresh_prior_steps=CONSISTENCY_PRIOR_STEPS, seed=VAL_SEED,
                   batch_size=a.micro_batch_size, to_text=inputs["to_text"])


# ------------------------------------------------------------------------------------------------
# Models and the training loop
# ------------------------------------------------------------------------------------------------


def build_models(args, encoder_dir, device):
    """(PriorTrainee, frozen conditioning encoder | None, cond encoder config | None)."""
    from infra.checkpoint import read_config
    from encoder import Encoder

    encoder_cfg = read_config(encoder_dir)
    preset = DiTConfig.paper if args.preset == "paper" else DiTConfig.tiny
    overrides = {key: value for key, value in (("hidden_size", args.hidden_size), ("depth", args.depth),
                                               ("num_heads", args.num_heads)) if value is not None}
    cfg = preset(register_dim=encoder_cfg["hidden_size"], num_registers=args.num_registers,
                 cond_dim=encoder_cfg["hidden_size"] if args.conditional else None, **overrides)
    torch.manual_seed(args.seed)
    dit = LatentDiT(cfg)
    frozen, trained = None, None
    if args.conditional:
        if not 1 <= args.cond_registers <= encoder_cfg["num_registers"]:
            raise ValueError(f"--cond-registers must lie in [1, {encoder_cfg['num_registers']}] (the encoder's K)")
        encoder = Encoder.from_pretrained(str(encoder_dir), num_registers=args.cond_registers, device=device)
        if args.train_cond_encoder:
            trained = encoder.float().train()
        else:
            frozen = encoder.eval().requires_grad_(False)
    return PriorTrainee(dit, trained).to(device), frozen


def main(argv=None):
    from dataprep.data import load_meta
    from train_ae import get_lr, make_optimizer

    args = parse_all(argv)  # config/prior_args.py's flags and the consistency flags (training/prior_run.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = D.setup(device=args.device)
    D.enable_tf32(env)
    with claim(args.out_dir, args.resume, args.overwrite, env) as out:  # infra/run_folder.py: the folder's rule
        ae = resolve_ae(args.ae)
        encoder_dir = ae / "encoder"
        data_dir = resolve_data_dir(args, ae)
        meta = load_meta(data_dir)
        shared_tokenizer = bool(meta.get("shared_tokenizer", True))
        check_run_folder(args, env, out, encoder_dir, data_dir, meta)
        banks = load_banks(args, ae, encoder_dir, data_dir, env)  # z_0 = h_phi(x_0) of every program, cached
        model, frozen = build_models(args, encoder_dir, env.device)
        view = conditioning_view(args, encoder_dir, data_dir, meta)  # how h reads Alg. 4's x^(r) (None: unconditional)
        if env.is_main:
            if not args.resume:
                write_settings(args, out, data_dir, encoder_dir, shared_tokenizer, meta.get("settings"), view)
            else:  # what the run really uses (only RESUME_MUTABLE flags can differ from the record)
                R.write_args(out, args)
        ema = EMA(model)
        model = D.wrap_model(model, env, mode="ddp")
        D.maybe_compile(model, args.compile, env)
        optimizer = make_optimizer(model, args)  # train_ae.py's AdamW: decay on matrices only
        micro = args.micro_batch_size or args.global_batch_size // env.world_size
        accum = D.accumulation_steps(args.global_batch_size, micro, env.world_size)
        args.micro_batch_size = micro
        start = load_resume(out, model, optimizer, ema, env) if args.resume else 0

        ctx = run_context(args, env, out, banks, frozen, view, data_dir)  # what model_inputs and validate read
        G = args.global_batch_size
        stop = min(args.max_steps, args.stop_at or args.max_steps)
        n, dim, per_rank = len(banks["train"]), banks["train"].dim, G // env.world_size
        bar = tqdm(total=args.max_steps, initial=start, desc="prior" + (" (conditional)" if args.conditional else ""),
                   disable=args.quiet or not env.is_main, dynamic_ncols=True)
        began = time.time()
        saved_at = start if args.resume else None
        guard = guards.BadStepGuard(args.max_bad_steps, log=functools.partial(log_line, ctx),
                                    last_good=lambda: R.last_good(out / STATE_DIR, saved_at))
        for step in range(start, stop):
            lr = get_lr(step, args, args.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = batch_rows(step, G, n, args.seed)
            draws = step_draws(args.seed, step, G, args.num_registers, dim, args.max_offset, not args.no_block_offsets,
                               ctx["seq_len"])
            model.train()
            step_loss = 0.0
            for m in range(accum):  # this rank's rows of the global batch, in micro-batches
                part = slice(env.rank * per_rank + m * micro, env.rank * per_rank + (m + 1) * micro)
                r, u = (draws["r"][part], draws["u"][part]) if args.conditional else (None, None)
                z0, t, noise, kwargs = model_inputs(ctx, rows[part], draws["t"][part], draws["noise"][part], r, u)
                with D.grad_sync(model, enabled=m == accum - 1), D.autocast(env, args.amp):
                    loss = prior_loss(model, z0, t, noise, **kwargs) / accum
                    loss.backward()
                step_loss += loss.item()
            grad_norm = D.clip_grad_norm(model, args.grad_clip if args.grad_clip > 0 else float("inf"))  # global norm
            done = step + 1
            metrics = D.all_reduce_mean({"loss": step_loss}, env)  # a NaN on any rank is a NaN on every rank
            good = guard.check(done, metrics["loss"], grad_norm)
            if good:  # a non-finite step never reaches the weights, the AdamW moments or the EMA
                optimizer.step()
                ema.update(D.unwrap(model), ema_decay(args.ema_decay, step))
            optimizer.zero_grad(set_to_none=True)

            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.2e}")
            if good and (done % args.log_interval == 0 or done == stop):
                log_line(ctx, {"type": "train", "step": done, "loss": metrics["loss"], "lr": lr, "grad_norm": grad_norm,
                               "seconds": round(time.time() - began, 2)})
            if (done % args.save_interval == 0 and guard.streak == 0) or done == stop:
                save(ctx, model, optimizer, ema, done)
                saved_at = done
            if ctx["val_bank"] is not None and ((args.eval_interval and done % args.eval_interval == 0) or done == stop):
                if env.is_main:
                    result = validate(ema.module, ctx)
                    log_line(ctx, {"type": "val", "step": done, **result})
                    if not args.quiet:
                        bar.write(f"val step {done}: MSE {result['val_mse']:.4f}, PSNR(t = 0, 0.1, .., 1) "
                                  + " ".join(f"{p:.1f}" for p in result["psnr"]))
                        if "consistency" in result:
                            from evaluation.consistency import summary_line
                            bar.write(f"val step {done}: {summary_line(result['consistency'])}")
                D.barrier(env)
        bar.close()
        del model, optimizer  # the wrapper goes before its process group (distributed.cleanup)
        D.cleanup(env)
        return Path(args.out_dir)


if __name__ == "__main__":
    main()
