"""Train the prompt-conditioned prior of App. H (Eq. 12) and fine-tune the guided demasker on prompted canvases.

Paper map (arXiv 2603.20210, App. H; the recipe is the paper's, the experiment is beyond it):
- Eq. 12: L(phi, psi, kappa) = || g_psi(z_t, t, h_kappa(c)) - z_0 ||^2. z_0 = h_phi(x) from the FROZEN AE encoder
  (the registers the guided demasker reads), with x prompt + answer (--target program, default) or the answer
  alone (--target answer); c the prompt (signature + docstring, dataprep/prompts.py). h_kappa is a second encoder
  initialised from h_phi, trained jointly with g_psi, or frozen (--freeze-kappa). z_t, t, block offsets and the x0
  loss are Alg. 5's (train_prior.py: schedules.q_sample, sample_base_times, register_times, mean over every entry).
- ConWithinDisc with a prompt refreshes from G_psi(eps, h(x_t), h_kappa(c)): one DiT serves both generators.
  Its conditioning is [h(x^(r)) ; h_kappa(c)] (prompting.join_cond): x^(r) is the prompted canvas with each
  position after the prompt masked with probability r ~ U[0, 1] (Alg. 4's draw, the prompt always visible)
  read by the frozen h_phi with [M] hidden (generators.embed_canvas, the view of sampling); with probability
  --xt-drop the h(x^(r)) half is withheld (mask False), which is what ConThenDisc with a prompt feeds.
- The guided demasker (App. H: "fine-tuned on prompt + partially masked answer"), with --demasker-steps N:
  LLaDA's masked-diffusion loss (schedules.mask_tokens with the prompt never masked, masked_diffusion_loss)
  on the canvas BOS prompt answer EOS..., guided by the first K registers of h_phi(--guide), with App. D's latent
  noise (--latent-cos, as train_ae.py). The result is a complete AE run folder OUT/ae (demasker/, the AE's
  encoder/ and tokenizer files).
- The pair must agree: the prior samples the registers the demasker that decodes was trained on. The AE's own
  demasker (--demasker-steps 0) read h_phi of whole programs, i.e. of prompt + answer: --target program, the
  default. --target answer needs the demasker fine-tuned on the answer's registers (--demasker-steps N; --guide
  defaults to --target and may not differ). prompted.json records the target, the demasker it pairs with and the
  AE encoder's fingerprint; extensions/prompting.load_prompted_prior refuses any other pairing.
- Two tokenizers (App. C, e.g. Qwen3-Embedding's beside LLaDA's): h_phi and h_kappa read the encoder's own tokens
  (dataprep/prompts.encode_pairs' encoder rows); h(x^(r)) reads the demasker canvas through
  dataprep/cross_tokenizer.py's view, its slots per masked token measured on the training programs.

Systems, as train_prior.py: the same script under `python` (one process) and `torchrun` (DDP over gloo or NCCL,
infra/distributed.py; each rank takes its slice of every global batch, gradients averaged). Every random number
of a step (rows, times, noise, masks) is drawn for the whole global batch from a generator seeded by (seed, step),
so any number of ranks follows one trajectory and --resume continues bit-exactly from OUT/train_state (the prior)
or OUT/demasker_state (the fine-tuning): weights, AdamW, EMA and the global RNG states (experiments/prompted_run.py,
infra/dist_checkpoint.py). --stop-at counts the prior's steps, then the demasker's. The run folder follows
infra/run_folder.py (refused when it holds anything unless --resume or --overwrite; one writer at a time).

Run folder (--out-dir): args.json, sources.json (the fingerprints --resume checks), log.jsonl ({"type": "data" |
"prior" | "demasker" | "skipped" | "val"}), train_state/ (and demasker_state/), and once finished dit/ and kappa/
(EMA weights), ae/ with --demasker-steps, and prompted.json last (what prompting.load_prompted_prior needs).

    python -m dataprep.prompts --out runs/pairs
    python -m experiments.train_prompted --ae runs/ae --pairs runs/pairs --out-dir runs/prompted --steps 1000
    torchrun --nproc_per_node 2 -m experiments.train_prompted --ae runs/ae --pairs runs/pairs --out-dir OUT
"""

import argparse
import functools
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from corruption import latent_noise_std
from experiments.prompted_run import (STATES, bank, conditioning_view, has_state, load_ae, load_data,  # noqa: F401
                                      load_state, record_sources, save_state, sources, truncate_log, write_run)
from extensions.prompting import join_cond
from generators import embed_canvas
from infra import checkpoint as C
from infra import distributed as D
from infra import guards
from infra.run_folder import OVERWRITE_HELP, claim
from schedules import mask_tokens, masked_diffusion_loss, q_sample, register_times, sample_base_times
from training import runs as R

# flags that may change on --resume (the rest would change the trajectory and are refused); --ae and --pairs are
# paths: what they hold is checked instead (prompted_run.sources). --steps / --demasker-steps extend a phase, as
# train_prior.py's --max-steps (the cosine schedule then follows the new length)
RESUME_MUTABLE = ("ae", "pairs", "out_dir", "resume", "stop_at", "steps", "demasker_steps", "save_interval",
                  "log_interval", "device", "threads", "max_bad_steps")
NOT_INHERITED = ("ae", "pairs", "out_dir", "resume", "stop_at", "overwrite")


class PromptedTrainee(nn.Module):
    """g_psi and h_kappa as one module (DDP syncs both): z0_hat = g(z_t, t, [h(x^(r)) ; h_kappa(c)])."""

    def __init__(self, dit, kappa):
        super().__init__()
        self.dit, self.kappa = dit, kappa

    def forward(self, z_t, t, prompt_ids, prompt_mask, xt_cond, xt_shown):
        kappa = self.kappa(prompt_ids, attention_mask=prompt_mask).float()  # (B, Kk, d)
        cond, cond_mask = join_cond(xt_cond, xt_shown, kappa)
        return self.dit(z_t, t, cond, cond_mask)


def step_generator(seed, step, stream=0):
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


def masked_answer_canvas(ids, prompt_len, ratios, uniforms, mask_id):
    """x^(r): every position after the prompt masked where uniforms < r. ids (B, L); prompt_len, ratios (B,)."""
    after = torch.arange(ids.shape[1])[None, :] >= prompt_len[:, None]  # (B, L)
    return ids.masked_fill(after & (uniforms < ratios[:, None]), mask_id)


# ------------------------------------------------------------------------------------------------
# One step of each phase: the draws for the whole global batch, the loss on this rank's slice
# ------------------------------------------------------------------------------------------------


def prior_draws(g, batch, n, num_registers, dim, seq_len, args):
    """Every random number of one prior step for the global batch: rows (G,), t (G, K), noise (G, K, d), mask
    ratios r (G,) and uniforms u (G, L) of x^(r), and shown (G,) (the h(x^(r)) half given)."""
    rows = torch.randint(n, (batch,), generator=g)
    t = register_times(sample_base_times(batch, args.max_offset, not args.no_block_offsets, generator=g),
                       num_registers, args.max_offset, not args.no_block_offsets)
    noise = torch.randn(batch, num_registers, dim, generator=g)
    ratios, uniforms = torch.rand(batch, generator=g), torch.rand(batch, seq_len, generator=g)
    return {"rows": rows, "t": t, "noise": noise, "r": ratios, "u": uniforms,
            "shown": torch.rand(batch, generator=g) >= args.xt_drop}


def prior_step(trainee, encoder, data, draws, mask_id, eos_id, view=None):
    """One Eq. 12 loss on the rows of `draws` (this rank's slice of prior_draws)."""
    device = next(encoder.parameters()).device
    rows = draws["rows"]
    z0, t, noise = (x.to(device) for x in (data["z0"][rows], draws["t"], draws["noise"]))
    x_r = masked_answer_canvas(data["ids"][rows], data["prompt_len"][rows], draws["r"], draws["u"], mask_id)
    shown = draws["shown"]
    if bool(shown.any()):
        xt_cond, _ = embed_canvas(encoder, x_r, mask_id, eos_id, view)  # (B, Kc, d), frozen h_phi
    else:  # every row withholds h(x^(r)): no encoder call
        xt_cond = torch.zeros(len(rows), encoder.cfg.num_registers, encoder.cfg.hidden_size, device=device)
    prompt_ids, prompt_mask = (x[rows].to(device) for x in data["prompt"])
    pred = trainee(q_sample(z0, t, noise), t, prompt_ids, prompt_mask, xt_cond, shown.to(device))
    return F.mse_loss(pred.float(), z0)


def demasker_draws(g, data, batch, mask_id, noise_std):
    """Every random number of one fine-tuning step for the global batch: the rows' canvases x0 (G, L), x_t, masked,
    p_mask (the prompt never masked) and the guiding registers with App. D's latent noise (G, K, d)."""
    rows = torch.randint(len(data["pairs"]), (batch,), generator=g)
    x0 = data["ids"][rows]
    maskable = torch.arange(x0.shape[1])[None, :] >= data["prompt_len"][rows][:, None]
    x_t, masked, p_mask = mask_tokens(x0, torch.rand(batch, generator=g), mask_id, generator=g, maskable=maskable)
    registers = data["z0"][rows]
    registers = registers + noise_std * torch.randn(registers.shape, generator=g)
    return {"x0": x0, "x_t": x_t, "masked": masked, "p_mask": p_mask, "registers": registers}


def demasker_step(demasker, draws, device):
    """One masked-diffusion loss (LLaDA's normalisation, B * L of this rank's slice) on prompted canvases."""
    x0, x_t, masked, p_mask, registers = (draws[k].to(device) for k in ("x0", "x_t", "masked", "p_mask", "registers"))
    return masked_diffusion_loss(demasker(x_t, registers=registers), x0, masked, p_mask)


def rank_slice(draws, env, batch):
    """This rank's rows of a global batch's draws: positions rank * G/W .. (rank + 1) * G/W - 1."""
    per = batch // env.world_size
    return {key: value[env.rank * per:(env.rank + 1) * per] for key, value in draws.items()}


def global_batch(args, n, env):
    """G = --batch-size pairs per step over all ranks (at most the n training pairs), divisible by the ranks."""
    batch = min(args.batch_size, n)
    if batch % env.world_size:
        raise ValueError(f"the global batch {batch} (--batch-size {args.batch_size}, at most the {n} training pairs) "
                         f"is not divisible by the {env.world_size} processes; pass a --batch-size that is a "
                         f"multiple of {env.world_size}")
    return batch


# ------------------------------------------------------------------------------------------------
# The optimisation loop of a phase, and the two phases
# ------------------------------------------------------------------------------------------------


def optimise(phase, model, loss_fn, total, lr, limit, ctx, ema=None):
    """AdamW + warm-up/cosine (train_ae.get_lr) over `total` steps, from the phase's checkpoint (--resume) up to
    `limit`; global gradient clipping; a non-finite step skipped (guards.BadStepGuard: no update, no EMA, no
    checkpoint); the EMA (train_prior.ema_decay); checkpoints every --save-interval and at the stop. Returns
    whether the phase is complete."""
    from train_ae import get_lr
    from train_prior import ema_decay

    args, env, out, log = ctx["args"], ctx["env"], ctx["out"], ctx["log"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                  betas=(0.9, 0.95))
    schedule = SimpleNamespace(lr=lr, warmup_steps=min(args.warmup_steps, total // 10), min_lr_ratio=0.1)
    start = load_state(out, phase, model, optimizer, env, ema) if args.resume else 0
    if args.resume and env.is_main and phase == ctx["resume_phase"]:
        truncate_log(out, phase, start)
    stop, saved_at = min(total, limit), (start if args.resume and start else None)
    guard = guards.BadStepGuard(args.max_bad_steps, log=lambda record: log({**record, "phase": phase}),
                                last_good=lambda: R.last_good(out / STATES[phase], saved_at))
    began = time.time()
    for step in range(start, stop):
        current = get_lr(step, schedule, total)
        for group in optimizer.param_groups:
            group["lr"] = current
        model.train()
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = D.clip_grad_norm(model, 1.0)
        done = step + 1
        metrics = D.all_reduce_mean({"loss": float(loss.detach())}, env)  # a NaN on any rank is one on every rank
        good = guard.check(done, metrics["loss"], norm)
        if good:
            optimizer.step()
            if ema is not None:
                ema.update(D.unwrap(model), ema_decay(args.ema_decay, step))
        if good and (done % args.log_interval == 0 or done in (1, stop)):
            log({"type": phase, "step": done, "loss": round(metrics["loss"], 5), "lr": current,
                 "seconds": round(time.time() - began, 1)})
        if (done % args.save_interval == 0 and guard.streak == 0) or done == stop:
            save_state(out, phase, model, optimizer, env, done, ema)
            saved_at = done
    return max(start, stop) >= total


def train_prior_part(ctx, data, h_xt, view):
    """Eq. 12: g_psi and h_kappa (one DDP module) on the frozen banks. Returns (EMA trainee, phase complete)."""
    from encoder import Encoder
    from latent_dit import DiTConfig, LatentDiT
    from train_prior import EMA

    args, env, ae = ctx["args"], ctx["env"], ctx["ae"]
    d = ae.encoder.cfg.hidden_size
    torch.manual_seed(args.seed)
    dit = LatentDiT(DiTConfig.tiny(register_dim=d, num_registers=args.num_registers, cond_dim=d,
                                   **({"hidden_size": args.hidden_size} if args.hidden_size else {}),
                                   **({"depth": args.depth} if args.depth else {})))
    kappa = Encoder.from_pretrained(str(ae.folder / "encoder"), num_registers=args.kappa_registers).float()
    kappa.requires_grad_(not args.freeze_kappa)
    trainee = PromptedTrainee(dit, kappa).to(env.device)
    ema = EMA(trainee)
    model = D.wrap_model(trainee, env, mode="ddp")
    batch = global_batch(args, len(data["pairs"]), env)
    mask_id, eos_id = ae.tokenizer.mask_id, ae.tokenizer.eos_id

    def loss_fn(step):
        draws = prior_draws(step_generator(args.seed, step), batch, len(data["pairs"]), args.num_registers, d,
                            data["ids"].shape[1], args)
        return prior_step(model, h_xt, data, rank_slice(draws, env, batch), mask_id, eos_id, view)

    complete = optimise("prior", model, loss_fn, args.steps, args.lr, ctx["limit"], ctx, ema)
    return ema.module.eval(), complete


def finetune_demasker(ctx, data):
    """The guided demasker on prompted canvases (one DDP module). Returns (demasker, phase complete)."""
    from demasker import Demasker

    args, env, ae = ctx["args"], ctx["env"], ctx["ae"]
    demasker = Demasker.from_pretrained(str(ae.folder / "demasker")).float().to(env.device).train()
    model = D.wrap_model(demasker, env, mode="ddp")
    noise_std = latent_noise_std(args.latent_cos)
    batch = global_batch(args, len(data["pairs"]), env)

    def loss_fn(step):
        draws = demasker_draws(step_generator(args.seed, step, stream=1), data, batch, ae.tokenizer.mask_id,
                               noise_std)
        return demasker_step(model, rank_slice(draws, env, batch), env.device)

    complete = optimise("demasker", model, loss_fn, args.demasker_steps, args.demasker_lr,
                        ctx["limit"] - args.steps, ctx)
    return demasker.eval(), complete


@torch.no_grad()
def register_error(model, encoder, data, mask_id, eos_id, shown, view=None, seed=12345):
    """Validation on the first 256 rows: MSE of z0_hat against z_0 at t = 0.5 and at t = 1 (pure noise: what the
    prompt alone tells) with the h(x^(r)) half withheld (shown False) or given at r = 0.5."""
    out = {}
    device = next(model.parameters()).device
    n = min(256, len(data["pairs"]))
    g = torch.Generator().manual_seed(seed)
    z0 = data["z0"][:n]
    noise = torch.randn(z0.shape, generator=g).to(device)
    x_r = masked_answer_canvas(data["ids"][:n], data["prompt_len"][:n], torch.full((n,), 0.5),
                               torch.rand(n, data["ids"].shape[1], generator=g), mask_id)
    xt_cond, _ = embed_canvas(encoder, x_r, mask_id, eos_id, view)
    z0 = z0.to(device)
    prompt_ids, prompt_mask = (x[:n].to(device) for x in data["prompt"])
    for t_value in (0.5, 1.0):
        t = torch.full(z0.shape[:2], t_value, device=device)
        pred = model(q_sample(z0, t, noise), t, prompt_ids, prompt_mask, xt_cond,
                     torch.full((n,), shown, device=device)).float()
        out[f"mse_t{t_value}"] = float(F.mse_loss(pred, z0))
    return out


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the prompt-conditioned latent prior of App. H (Eq. 12: g_psi "
                                            "conditioned on h_kappa(prompt), and on h(x_t) for ConWithinDisc) and "
                                            "optionally fine-tune the guided demasker on prompt + masked answer.",
                                epilog="On --resume, flags left unset take the run's recorded values (OUT/args.json) "
                                       "and only these may change: " + ", ".join(
                                           "--" + m.replace("_", "-") for m in RESUME_MUTABLE[4:]) + "; --ae and "
                                       "--pairs may point elsewhere if they hold the same files (checked).")
    a = p.add_argument
    a("--ae", required=True, help="train_ae.py run (encoder/, demasker/, tokenizer.json): h_phi and f_theta")
    a("--pairs", required=True, help="dataprep/prompts.py --out folder (train.jsonl, val.jsonl)")
    a("--out-dir", required=True, help="run folder to write (prompted.json, dit/, kappa/, log.jsonl, ae/)")
    a("--resume", action="store_true", help="continue exactly from OUT/train_state (and OUT/demasker_state)")
    a("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a("--stop-at", type=int, default=None, help="save and stop after this many steps of the run (the prior's, then "
      "the demasker's) without changing the LR schedules; continue with --resume")
    a("--seq-len", type=int, default=128, help="L: canvas tokens (BOS prompt answer EOS); longer pairs are dropped")
    a("--encoder-seq-len", type=int, default=None, help="cap of the encoder rows with two tokenizers (default L)")
    a("--num-registers", type=int, default=8, help="K: registers of the target modelled by the prior (first K)")
    a("--cond-registers", type=int, default=None, help="registers of h(x_t) in the conditioning (default K)")
    a("--kappa-registers", type=int, default=None, help="registers of h_kappa(c) in the conditioning (default K)")
    a("--target", choices=["answer", "program"], default="program",
      help="the prior's z_0: registers of prompt + answer (default: what the AE's own demasker reads) or of the "
           "answer (needs a demasker fine-tuned on them: --demasker-steps N)")
    a("--guide", choices=["answer", "program"], default=None,
      help="the registers that guide the demasker fine-tuning; must equal --target (its default)")
    a("--freeze-kappa", action="store_true", help="keep h_kappa = h_phi frozen (default: trained with the DiT)")
    a("--xt-drop", type=float, default=0.5, help="probability that the h(x^(r)) half is withheld in training "
      "(that is ConThenDisc's conditioning; the rest trains ConWithinDisc's refresh)")
    a("--max-offset", type=float, default=0.2, help="App. E block offset of the last register block")
    a("--no-block-offsets", action="store_true", help="all registers at the same time (App. G ablation)")
    a("--hidden-size", type=int, default=None, help="DiT width (default: the tiny preset's)")
    a("--depth", type=int, default=None, help="DiT blocks (default: the tiny preset's)")
    a("--steps", "--max-steps", dest="steps", type=int, default=1000, help="optimizer steps of the prior")
    a("--batch-size", "--global-batch-size", dest="batch_size", type=int, default=32,
      help="pairs per step over all ranks (at most the training pairs; a multiple of the ranks)")
    a("--lr", type=float, default=1e-3, help="peak learning rate of the prior (and h_kappa)")
    a("--warmup-steps", type=int, default=50, help="linear warm-up steps (at most a tenth of the run)")
    a("--ema-decay", type=float, default=0.999, help="EMA of the prior's weights (the saved model)")
    a("--demasker-steps", type=int, default=0, help="fine-tuning steps of the guided demasker (0 = none)")
    a("--demasker-lr", type=float, default=3e-4, help="peak learning rate of the demasker fine-tuning")
    a("--latent-cos", type=float, default=0.8, help="App. D latent noise on the guiding registers (1 = none)")
    a("--max-examples", type=int, default=None, help="use only the first N training pairs (tests, overfitting)")
    a("--log-interval", type=int, default=50, help="steps between log lines")
    a("--save-interval", type=int, default=500, help="checkpoint every N steps of a phase (and at its end)")
    a("--seed", type=int, default=0, help="seed of the initialisation and of every per-step draw")
    a("--device", default=None, help="cpu / cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    a("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    a("--max-bad-steps", type=int, default=guards.DEFAULT_MAX_BAD_STEPS, help="stop with an error after this many "
      "consecutive steps with a NaN/inf loss or gradient norm (each is skipped: no update, no EMA, no checkpoint)")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    record = Path(args.out_dir) / "args.json"
    saved = C.read_json(record, "run record") if args.resume and record.is_file() else None
    if saved is not None:  # the run's flags become the defaults; explicit changes are refused below
        p.set_defaults(**{key: value for key, value in saved.items() if key not in NOT_INHERITED})
        args = p.parse_args(argv)
    check_numbers(p, args)
    check_pair(p, args)
    args.cond_registers = args.cond_registers or args.num_registers
    args.kappa_registers = args.kappa_registers or args.num_registers
    args.encoder_seq_len = args.encoder_seq_len or args.seq_len
    if saved is not None:
        guards.refuse_changed_resume_flags(p, saved, args, RESUME_MUTABLE, Path(args.out_dir), RESUME_MUTABLE[4:])
    return args


def check_numbers(p, args):
    """Every count and rate up front, naming the flag and its valid range (parser.error, exit 2)."""
    r = functools.partial(guards.check_range, p, args)
    for name in ("seq_len", "num_registers", "steps", "batch_size", "log_interval", "save_interval", "max_bad_steps"):
        r(name, low=1, integer=True)
    for name in ("cond_registers", "kappa_registers", "max_examples", "hidden_size", "depth", "stop_at",
                 "encoder_seq_len"):
        r(name, low=1, integer=True)  # None (unset) is not checked
    for name in ("demasker_steps", "warmup_steps", "threads"):
        r(name, low=0, integer=True)
    r("xt_drop", low=0, high=1)
    r("max_offset", low=0, high=1, high_open=True)
    r("ema_decay", low=0, high=1, high_open=True)
    r("latent_cos", low=0, high=1, low_open=True)
    for name in ("lr", "demasker_lr"):
        r(name, low=0, low_open=True)


def check_pair(p, args):
    """The prior must sample the registers the demasker that decodes is guided by (module docstring): --guide
    defaults to --target; the AE's own demasker (--demasker-steps 0) reads the program's registers."""
    if args.guide is None:
        args.guide = args.target if args.demasker_steps else "program"
    if not args.demasker_steps and args.target != "program":
        p.error(f"--target {args.target} with --demasker-steps 0: the prior would sample the {args.target}'s registers "
                f"for the AE's own demasker, which is guided by h_phi of whole programs (prompt + answer); pass "
                f"--target program (the default), or fine-tune the demasker on the {args.target}'s registers with "
                f"--demasker-steps N")
    if not args.demasker_steps and args.guide != "program":
        p.error(f"--guide {args.guide} fine-tunes the demasker and needs --demasker-steps N; the AE's own demasker "
                f"(--demasker-steps 0) is guided by h_phi of whole programs: drop --guide")
    if args.guide != args.target:
        p.error(f"--target {args.target} but --guide {args.guide}: the prior would sample registers of the "
                f"{args.target} for a demasker fine-tuned on registers of the {args.guide}; drop --guide (it "
                f"defaults to --target) or pass the same kind to both")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = D.setup(device=args.device)
    D.enable_tf32(env)
    with claim(args.out_dir, args.resume, args.overwrite, env) as out:  # infra/run_folder.py
        trainee = train(args, out, env)
        D.cleanup(env)
        return trainee


def train(args, out, env):
    """One run written into `out` (the folder main() claimed): the prior, the demasker fine-tuning, the record.
    Returns the EMA trainee when the run is complete (on rank 0), else None (--stop-at)."""
    from encoder import Encoder

    ae = load_ae(args.ae, env.device)
    K_enc = ae.encoder.cfg.num_registers
    for name in ("num_registers", "cond_registers", "kappa_registers"):
        if getattr(args, name) > K_enc:
            raise SystemExit(f"experiments/train_prompted.py: error: --{name.replace('_', '-')} {getattr(args, name)} "
                             f"but the encoder has K={K_enc} registers; choose at most {K_enc}")
    if args.resume:  # saves killed between their two renames put back; the prior's state must exist
        R.recover_for_resume(env, out / STATES["prior"], out / STATES["demasker"], out / "dit", out / "kappa",
                             out / "ae")
    found = sources(ae, args.pairs, fine_tunes=args.demasker_steps > 0)
    record_sources(out, found, args, env)  # --resume: the run's AE and pairs, else refused
    if env.is_main:
        R.write_args(out, args)  # on --resume: what the run really uses (only RESUME_MUTABLE flags differ)
    run_log = R.RunLog(out / "log.jsonl", enabled=env.is_main)

    def log(record):
        run_log(record)
        if env.is_main:
            print(json.dumps(record), flush=True)

    data = load_data(args, ae)
    view = conditioning_view(ae, [pair.program for pair in data["pairs"]], args.encoder_seq_len)
    if not args.resume:
        log({"type": "data", "train_pairs": len(data["pairs"]), "dropped_too_long": data["dropped"]})
    ctx = {"args": args, "env": env, "out": out, "ae": ae, "log": log,
           "limit": args.stop_at or args.steps + args.demasker_steps,
           "resume_phase": "demasker" if args.resume and has_state(out, "demasker") else "prior"}
    h_xt = Encoder.from_pretrained(str(ae.folder / "encoder"), num_registers=args.cond_registers,
                                   device=env.device).eval().requires_grad_(False)
    trainee, complete = train_prior_part(ctx, data, h_xt, view)
    demasker = None
    if complete and args.demasker_steps:
        demasker, complete = finetune_demasker(ctx, data)
    if not complete:
        return None  # --stop-at: train_state (demasker_state) holds the run; continue it with --resume
    if env.is_main:
        mask_id, eos_id = ae.tokenizer.mask_id, ae.tokenizer.eos_id
        for split in ("train", "val"):
            try:
                part = data if split == "train" else load_data(args, ae, "val")
            except ValueError:
                continue
            for shown in (False, True):
                record = register_error(trainee, h_xt, part, mask_id, eos_id, shown, view)
                log({"type": "val", "split": split, "xt_shown": shown, **record})
        write_run(args, out, trainee, demasker, ae, view, found["encoder"])
    D.barrier(env)
    return trainee if env.is_main else None


if __name__ == "__main__":
    main()
