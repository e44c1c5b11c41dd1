"""Robust encoder-demasker training (paper Sec. 4.1, Algorithm 1, App. C, App. D), and the base MDM.

One optimizer step of Algorithm 1, per example of the global batch (`training_loss` below):
  line 1  x_0 ~ p_data              a program from dataprep/data.py's memmapped cache, BOS .. EOS padded with EOS to L
  line 2  t ~ U[0, 1]
  line 3  x_t = mask(x_0, t)        schedules.mask_tokens: each token becomes [M] with p_mask = (1 - eps) t + eps
          all-mask utilisation      App. C: with probability --all-mask-prob (0.25) x_t is ALL [M] (p_mask = 1),
                                    so the demasker must read the registers instead of token correlations
                                    (0 by default for --no-registers: the base MDM cannot use it)
  line 4  z_0 = h_phi(x_0)          encoder.py on the clean program (its own ids and validity mask)
          nested dropout            App. C: k ~ U{1..K} (--keep-distribution geometric: k in {1, 2, 4, ..., K},
                                    App. E's grouping; the paper preset); only registers 1..k are exposed
  line 5  e ~ N(0, sigma^2 I)       App. D: sigma from the target cosine similarity --latent-cos (0.8), see
                                    corruption.latent_noise_std; --latent-cos 1 turns it off (the ablation of Fig. 7)
  line 6  L = Eq. 5                 schedules.masked_diffusion_loss: sum over masked tokens of CE / p_mask,
                                    divided by B * L (LLaDA's weights 1 / p_mask)
  line 7  AdamW step                weight decay on matrices only, gradient clipping, cosine LR with warmup
Lines 2, 3 and 5 are drawn per example on the CPU by corruption.corrupt; lines 4 and 6 are EncoderDemasker.

Staged training (App. C): for the first --encoder-warmup-steps steps the pretrained f_theta is frozen
(requires_grad False, so AdamW skips it entirely) while h_phi AND the demasker's new conditioning interface
(register projection, START, END) learn; then everything, with the LR re-warmed over --rewarm-steps (get_lr).
`--no-registers` trains the base MDM (f_theta(x_t) without registers, Sec. 5's baseline) on the same data with
the same budget; the guided run starts from it with --from-base (the paper's recipe; required by the paper preset).
Beyond the paper: --cadd adds CADD's per-token latents at [M] (extensions/cadd.py); --register-dropout P withholds
every register of an example with probability P (the null bank of mdm.guided_logits' guidance).

Which positions count in the loss: all L positions, as in LLaDA pre-training, i.e. also BOS and the EOS
padding (predicting where the program ends is how the MDM decides its length; the paper's models "generate
similar programs of varying lengths, with BOS and EOS tokens"). Validation scores program tokens only.
--pad-eos-weight W < 1 (ours) weighs the padding after the first EOS by W (0: not scored; pad_weighted).

Randomness. Every random draw of an example (t, all-mask coin, k, the mask, the latent noise) comes from a
generator seeded by (--seed, the example's position in the training stream), and the position is a pure function
of the step, so a run gives the same numbers on 1 or N ranks, with any micro-batch, and after --resume.

Plumbing lives elsewhere: config/ae_args.py (flags, presets, number checks, --resume rules), training/ae_setup.py
(data cache, model building), training/ae_run.py (data stream, Fig. 4 validation, atomic checkpoints and resume),
training/runs.py (log.jsonl, run folder), infra/run_folder.py (an existing run is refused unless --resume or
--overwrite, one writer at a time, --overwrite staged), infra/guards.py (a NaN/inf step is skipped; --max-bad-steps
in a row stop the run), infra/distributed.py (DDP / FSDP2). Run folder: OUT/checkpoint/{encoder/, demasker/}
(safetensors + config.json + model card, readable by from_pretrained), tokenizer.json, args.json, progress.json and
training_state.pt; OUT/log.jsonl holds train and validation records (Fig. 4: masked-token CE and top-1 accuracy at
mask ratios 0.1 .. 1.0).

Presets. tiny: the tiny() configs with ids from our BPE, AdamW lr 3e-3 (measured on the stdlib at L = 128:
after 400 steps the base MDM's validation CE at 10% masking is 5.35 with 3e-3 and 5.73 with 1e-3), 100 warmup
steps, global batch 32, no encoder warm-up (a randomly initialised demasker cannot be usefully frozen). paper:
App. C's AdamW lr 2.5e-5, wd 0.1, global batch 512, 4000 encoder warm-up steps, 3 epochs, K = 128, from
Qwen3-Embedding-0.6B and LLaDA-8B-Base, FSDP2 in bf16.

Run:  python train_ae.py --preset tiny --out-dir runs/ae              (one process)
      torchrun --nproc_per_node 8 train_ae.py --preset paper ...      (DDP / FSDP2 via infra/distributed.py)
"""

import math
import time

import torch
import torch.nn as nn

from config.ae_args import CHECKPOINT, PRESETS, RESUME_MUTABLE, parse_args  # noqa: F401 (train_ae.parse_args)
from corruption import corrupt, example_generator, latent_noise_std  # noqa: F401 (Alg. 1 lines 2-5; re-exported)
from demasker import CONDITIONING_PARAMS, Demasker, DemaskerConfig  # noqa: F401
from encoder import Encoder, EncoderConfig, register_keep_mask, sample_keep  # noqa: F401
from extensions import cadd
from infra import distributed as D
from infra import guards
from infra.run_folder import claim
from training import runs as R
from training.ae_run import PROGRESS, VAL_RATIOS, Stream, evaluate, load_resume, save_run, saved_step, val_summary  # noqa: F401
from training.ae_setup import (build_models, cadd_batch, cadd_settings, check_vocab, conditioning_is_new,  # noqa: F401
                            match_conditioning_rms_, model_configs, part_folder, prepare_data)
from infra.dist_checkpoint import check_same_tokenizers, rng_states, set_rng_states  # noqa: F401 (re-exported)
from schedules import masked_diffusion_loss


# ------------------------------------------------------------------------------------------------
# Alg. 1: the model f_theta(x_t, h_phi(x_0) + e) and the loss of one micro-batch
# ------------------------------------------------------------------------------------------------

class EncoderDemasker(nn.Module):
    """f_theta(x_t, h_phi(x_0) + e) of Alg. 1; with encoder=None it is the base MDM f_theta(x_t)."""

    def __init__(self, encoder, demasker):
        super().__init__()
        self.encoder = encoder
        self.demasker = demasker

    def forward(self, x_t, enc_ids=None, enc_mask=None, keep=None, noise=None, cadd_inputs=None):
        """x_t (B, L); enc_ids/enc_mask (B, Le) clean program for h_phi; keep (B,) registers exposed;
        noise (B, K, d) | None added to the exposed registers (App. D); cadd_inputs: None, or (x_0 (B, L),
        t (B,) mask ratios, noise (B, L, D)) for the CADD latents at [M] (extensions/cadd.py, --cadd). -> logits (B, L, V)."""
        latents = None if cadd_inputs is None else cadd.training_latents(self.demasker, *cadd_inputs)
        if self.encoder is None:
            return self.demasker(x_t) if latents is None else self.demasker(x_t, latents=latents)
        registers = self.encoder(enc_ids, attention_mask=enc_mask, keep=keep)  # (B, K, d), line 4: 0 beyond keep
        register_mask = register_keep_mask(keep, registers.shape[1])  # (B, K)
        if noise is not None:  # line 5: z_0 + e on the exposed registers
            registers = registers + (noise * register_mask.unsqueeze(-1)).to(registers.dtype)
        extra = {} if latents is None else {"latents": latents}  # the CADD latents only with --cadd
        return self.demasker(x_t, registers=registers, register_mask=register_mask, **extra)


def training_loss(model, batch, counters, args, corruption, env, amp):
    """Alg. 1 lines 2-6 on one micro-batch: corrupt x_0 (t, the mask, k, the latent noise, drawn per example from
    its stream counter), encode x_0 and keep k registers, demask x_t, and Eq. 5. batch: TokenData.batch rows
    (ids (B, L), encoder_ids / encoder_mask (B, Le), lengths (B,)); counters (B,) stream positions; corruption:
    the settings of corruption_settings. Returns the scalar loss."""
    x0, enc_ids, enc_mask = batch["ids"], batch["encoder_ids"], batch["encoder_mask"]
    demasker, c = D.unwrap(model).demasker, corruption
    noisy = corrupt(x0, counters.tolist(), args.seed, demasker.cfg.mask_token_id, args.all_mask_prob,
                    c["K"], args.nested_dropout, c["d"], c["noise_std"], register_dropout=c["register_dropout"],
                    keep_sampler=c["keep_sampler"])
    to = lambda t: None if t is None else t.to(env.device)  # noqa: E731
    with D.autocast(env, amp):
        cadd_inputs = cadd_batch(args, demasker, to(x0), to(noisy["p_mask"][:, 0]), counters, args.seed)
        logits = model(to(noisy["x_t"]), to(enc_ids), to(enc_mask), to(noisy["keep"]), to(noisy["noise"]),
                       cadd_inputs)
    masked, p_mask = pad_weighted(noisy["masked"], noisy["p_mask"], batch["lengths"],
                                  getattr(args, "pad_eos_weight", 1.0))
    return masked_diffusion_loss(logits, to(x0), to(masked), to(p_mask))  # Eq. 5


def corruption_settings(args, encoder):
    """What corruption.corrupt needs besides the data: K registers of width d (0 for the base MDM), the latent
    noise std (App. D), register dropout, and how nested dropout draws k (uniform, or App. E's levels)."""
    K = encoder.cfg.num_registers if encoder is not None else 0
    distribution = getattr(args, "keep_distribution", None) or "uniform"  # an args.json without the flag: uniform
    keep_sampler = (None if distribution == "uniform"  # corruption's default draw
                    else lambda n, K, gen: sample_keep(n, K, generator=gen, distribution=distribution))
    return {"K": K, "d": K and encoder.cfg.hidden_size, "noise_std": latent_noise_std(args.latent_cos),
            "register_dropout": args.register_dropout if K else 0.0, "keep_sampler": keep_sampler}


def pad_weighted(masked, p_mask, lengths, weight):
    """--pad-eos-weight: the Eq. 5 term of a padding position (index >= the row's BOS..first-EOS length) scaled
    by `weight`, written as CE / (p_mask / weight); weight 0 drops it from the sum (it still counts in LLaDA's
    B * L denominator). masked, p_mask (B, L); lengths (B,). Returns (masked, p_mask), unchanged at weight 1."""
    if weight == 1:
        return masked, p_mask
    pad = torch.arange(masked.shape[1])[None, :] >= lengths[:, None]  # (B, L) after the first EOS
    if weight == 0:
        return masked & ~pad, p_mask
    return masked, torch.where(pad, p_mask / weight, p_mask)


# ------------------------------------------------------------------------------------------------
# Optimizer, learning rate and staging (Alg. 1 line 7, App. C)
# ------------------------------------------------------------------------------------------------

def make_optimizer(model, args):
    """AdamW; weight decay on matrices (linears, embeddings, suffix registers), none on 1-D parameters
    (norm weights, START/END embeddings), as nanoGPT. Built after wrap_model (FSDP2 swaps parameters)."""
    params = [p for p in D.unwrap(model).parameters()]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def get_lr(step, args, max_steps):
    """Linear warmup to --lr over --warmup-steps, then cosine decay to lr * --min-lr-ratio at max_steps; with
    --rewarm-steps N (and an encoder warm-up of W steps) steps W .. W + N - 1 are scaled by (step - W + 1) / (N + 1):
    the unfrozen demasker's AdamW moments start at zero, so its first updates are ~lr per weight (re-warm)."""
    if step < args.warmup_steps:
        lr = args.lr * (step + 1) / (args.warmup_steps + 1)
    else:
        progress = min(1.0, (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps))
        min_lr = args.lr * args.min_lr_ratio
        lr = min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - min_lr)
    warm, rewarm = getattr(args, "encoder_warmup_steps", 0) or 0, getattr(args, "rewarm_steps", 0) or 0
    if warm and rewarm and not getattr(args, "no_registers", False) and warm <= step < warm + rewarm:
        lr *= (step - warm + 1) / (rewarm + 1)
    return lr


def set_demasker_trainable(model, trainable):
    """App. C staging: the pretrained f_theta frozen (no gradients, skipped by AdamW) while h_phi warms up. The
    NEW conditioning interface (register projection, START, END: demasker.CONDITIONING_PARAMS) trains with the
    encoder throughout: frozen at its random init, the encoder would learn through a random projection."""
    for name, param in D.unwrap(model).demasker.named_parameters():
        param.requires_grad_(bool(trainable) or name.startswith(CONDITIONING_PARAMS))


# ------------------------------------------------------------------------------------------------
# Training loop
# ------------------------------------------------------------------------------------------------

def train(args):
    """Run Algorithm 1 (or the base MDM) as configured by parse_args; returns the unwrapped EncoderDemasker."""
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    env = D.setup(device=args.device)
    D.enable_tf32(env)
    torch.manual_seed(args.seed)
    with claim(args.out_dir, args.resume, args.overwrite, env) as out_dir:  # infra/run_folder.py: the folder's rule
        train_data, val_data, meta, encoder_vocab, files = prepare_data(args, env)
        resume_dir = out_dir / CHECKPOINT if args.resume else None
        if resume_dir is not None:
            R.recover_for_resume(env, resume_dir)
            check_same_tokenizers(resume_dir, files)
        encoder, demasker = build_models(args, meta, encoder_vocab, resume_dir)
        core = EncoderDemasker(encoder, demasker).to(env.device)
        amp = "bf16" if args.dtype == "bfloat16" else None

        accum = D.accumulation_steps(args.global_batch_size, args.micro_batch_size, env.world_size)
        stream = Stream(len(train_data), args.global_batch_size, env, args.seed)
        stream.data_settings = meta.get("settings")
        max_steps = args.max_steps or int(args.epochs * stream.steps_per_epoch)
        start = saved_step(resume_dir) if resume_dir is not None else 0  # decides the staging before wrap_model
        staged = encoder is not None and args.encoder_warmup_steps > 0
        # frozen at wrap time and at loading when no demasker update has happened yet (start <= warm-up steps):
        # then the checkpoint holds no AdamW state for it; the loop unfreezes it at step == warm-up steps
        set_demasker_trainable(core, not staged or start > args.encoder_warmup_steps)
        model = D.wrap_model(core, env, mode=args.parallel if env.distributed else "none",
                             mixed_precision=amp if args.parallel == "fsdp" else None,
                             activation_checkpointing=args.activation_checkpointing)
        D.maybe_compile(model, args.compile, env)
        optimizer = make_optimizer(model, args)
        if resume_dir is not None:
            load_resume(resume_dir, model, optimizer, env, stream, args)
        if env.is_main:  # what this run really uses (on --resume only the RESUME_MUTABLE flags can differ)
            R.write_args(out_dir, args)

        corruption = corruption_settings(args, encoder)
        K = corruption["K"]
        keeps = [("base", None)] if encoder is None else [(f"k={k}", k) for k in (args.val_keep or [K])]
        log = R.RunLog(out_dir / "log.jsonl", enabled=env.is_main, create=True)
        stop = min(max_steps, args.stop_at or max_steps)
        bar = tqdm(total=max_steps, initial=start, disable=not env.is_main, dynamic_ncols=True,
                   desc="encoder-demasker" if encoder is not None else "base MDM")
        tokens_per_step = args.global_batch_size * args.seq_len
        last_time = time.time()
        saved_at = start if resume_dir is not None else None
        guard = guards.BadStepGuard(args.max_bad_steps, log=log,
                                    last_good=lambda: R.last_good(out_dir / CHECKPOINT, saved_at))
        for step in range(start, stop):
            lr = get_lr(step, args, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if staged and step == args.encoder_warmup_steps:
                set_demasker_trainable(model, True)
            rows, counters = stream.rows(step)
            step_loss = 0.0
            for micro in range(accum):  # gradient accumulation; the gradients are synchronised on the last one
                part = slice(micro * args.micro_batch_size, (micro + 1) * args.micro_batch_size)
                with D.grad_sync(model, enabled=micro == accum - 1):
                    loss = training_loss(model, train_data.batch(rows[part]), counters[part], args, corruption, env,
                                         amp) / accum
                    loss.backward()
                step_loss += loss.item()
            grad_norm = D.clip_grad_norm(model, args.grad_clip)  # global: the same on every rank
            done = step + 1
            metrics = D.all_reduce_mean({"loss": step_loss}, env)  # a NaN on any rank is a NaN on all
            good = guard.check(done, metrics["loss"], grad_norm)
            if good:  # a non-finite step never reaches the weights or the AdamW moments
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            now = time.time()
            tok_s, last_time = tokens_per_step / max(now - last_time, 1e-9), now
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
            if good and (done % args.log_interval == 0 or done == stop):
                log({"type": "train", "step": done, "loss": metrics["loss"], "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": tok_s, "demasker_frozen": staged and step < args.encoder_warmup_steps})
            if args.eval_interval and (done % args.eval_interval == 0 or done == max_steps):
                results = evaluate(model, val_data, args, env, amp, keeps)
                log({"type": "val", "step": done, "results": results})
                if env.is_main:
                    bar.write(val_summary(done, results))
            if (done % args.save_interval == 0 and guard.streak == 0) or done == stop:
                save_run(out_dir, model, optimizer, env, done, args, stream, files)
                saved_at = done
        bar.close()
        del model, optimizer  # the wrapper goes before its process group (distributed.cleanup)
        D.cleanup(env)
    return core


if __name__ == "__main__":
    train(parse_args())
