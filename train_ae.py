"""Robust encoder-demasker training (paper Sec. 4.1, Algorithm 1, App. C, App. D), and the base MDM.

One optimizer step of Algorithm 1, per example of the global batch:
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
                                    latent_noise_std; --latent-cos 1 turns it off (the ablation of Fig. 7)
  line 6  L = Eq. 5                 schedules.masked_diffusion_loss: sum over masked tokens of CE / p_mask,
                                    divided by B * L (LLaDA's weights 1/p_mask, ../shared/reference/llada.md 3.2)
  line 7  AdamW step                weight decay on matrices only, gradient clipping, cosine LR with warmup
Staged training (App. C): for the first --encoder-warmup-steps steps the pretrained f_theta is frozen
(requires_grad False, so AdamW skips it entirely) while h_phi AND the demasker's new conditioning interface
(register projection, START, END) learn; then everything. New conditioning parameters are scaled at build so a
projected register's RMS (and START/END's) equals the token embeddings' RMS (match_conditioning_rms_).
--rewarm-steps N re-warms the LR linearly over N steps when f_theta unfreezes (get_lr). `--no-registers` trains
the base MDM (f_theta(x_t) without registers, Sec. 5's baseline) on the same data with the same budget; the
guided run starts from it with --from-base (the paper's recipe; required by the paper preset).
CADD beside CRoCoDiL (--cadd, issue 17; extensions/cadd.py): every [M] position also receives z_t ~ N(sqrt(gb_t) w(x_0),
(1 - gb_t) I) at t = p_mask (--cadd-schedule), added to E([M]); the loss is the same CE; works with registers too.
Register dropout (--register-dropout P, issue 14): every register of an example withheld with probability P
(the null bank of mdm.guided_logits), drawn from the example's generator (corruption.py).

Which positions count in the loss: all L positions, as in LLaDA pre-training, i.e. also BOS and the EOS
padding (predicting where the program ends is how the MDM decides its length; the paper's models "generate
similar programs of varying lengths, with BOS and EOS tokens"; LLaDA's SFT likewise masks and scores the EOS
padding of its answers). Validation scores program tokens only. --pad-eos-weight W < 1 (issue 12; ours) weighs
the padding after the first EOS by W (0: not scored), since at toy scale it dominates the targets and one-block
low-confidence decoding of the base then fills EOS first; the default 1 is LLaDA's objective, and eval.py
base-decoding handles the collapse at decoding instead (EOS revealed last, semi-autoregressive blocks).

Randomness. Every random draw of an example (t, all-mask coin, k, the mask, the latent noise) comes from a
generator seeded by (--seed, the example's position in the training stream). The stream position is a pure
function of the step, so a run gives the same numbers on 1 or N ranks, with any micro-batch, and after
--resume; data order is distributed.shard_indices' per-epoch permutation. Global RNG states (torch, numpy,
python) are saved and restored anyway, for code that draws from them.

Checkpoints (rank 0 writes, every rank calls): OUT/checkpoint/{encoder/, demasker/} (safetensors +
config.json, readable by from_pretrained), tokenizer.json, args.json, progress.json (step) and
training_state.pt (AdamW state by parameter name, step, data position, RNG states). The folder appears
atomically and is crash-safe at every instant (checkpoint.swap_folder; --resume recovers a save killed between
its renames). Failure behaviour (infra/guards.py): a step with a NaN/inf loss or gradient norm is skipped (no update,
no checkpoint) and --max-bad-steps in a row stop the run with an error naming the last good checkpoint;
--resume loads every tensor strictly and refuses changed model/data/objective flags (ae_args.RESUME_MUTABLE). The LR is a pure function
of the step (nanoGPT's get_lr), so the step is the whole scheduler state. OUT/log.jsonl holds train and
validation records (validation: masked-token CE and top-1 accuracy at mask ratios 0.1..1.0, Fig. 4). After each
save rank 0 writes hub model cards (hub.write_cards: README.md in checkpoint/encoder and checkpoint/demasker); a
card that cannot be written is a warning, never a failed save.

Presets. tiny: the tiny() configs with ids from our BPE, AdamW lr 3e-3 (measured on the stdlib at L = 128:
after 400 steps the base MDM's validation CE at 10% masking is 5.35 with 3e-3 and 5.73 with 1e-3; 2.5e-5
would barely move a tiny model in minutes), 100 warmup steps, global batch 32, no encoder warm-up (a randomly
initialised demasker cannot be usefully frozen). paper: App. C's AdamW lr 2.5e-5, wd 0.1, global batch 512,
4000 encoder warm-up steps, 3 epochs, K = 128, from Qwen3-Embedding-0.6B and LLaDA-8B-Base, FSDP2 in bf16.

Run:  python train_ae.py --preset tiny --out-dir runs/ae              (one process)
      torchrun --nproc_per_node 8 train_ae.py --preset paper ...      (DDP / FSDP2 via infra/distributed.py)
"""

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from extensions import cadd
from infra import checkpoint as C
from infra import dist_checkpoint as DC
from infra import distributed as D
from infra import guards
from infra.dist_checkpoint import check_same_tokenizers, rng_states, set_rng_states  # noqa: F401 (re-exported)
from config.ae_args import CHECKPOINT, PRESETS, RESUME_MUTABLE, parse_args  # noqa: F401 (train_ae.parse_args)
from demasker import CONDITIONING_PARAMS, Demasker, DemaskerConfig
from corruption import corrupt, example_generator, latent_noise_std  # noqa: F401 (Alg. 1 lines 2-5; re-exported)
from encoder import Encoder, EncoderConfig, register_keep_mask, sample_keep
from schedules import masked_diffusion_loss

PROGRESS = "progress.json"  # the step, readable without loading the optimizer state
VAL_RATIOS = [round(0.1 * i, 1) for i in range(1, 11)]  # Fig. 4's mask probabilities



# ------------------------------------------------------------------------------------------------
# The trained module: h_phi and f_theta as one nn.Module (one DDP/FSDP root, one forward)
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
        registers = self.encoder(enc_ids, attention_mask=enc_mask, keep=keep)  # (B, K, d), 0 beyond keep
        register_mask = register_keep_mask(keep, registers.shape[1])  # (B, K)
        if noise is not None:
            registers = registers + (noise * register_mask.unsqueeze(-1)).to(registers.dtype)
        extra = {} if latents is None else {"latents": latents}  # without CADD: the call as before
        return self.demasker(x_t, registers=registers, register_mask=register_mask, **extra)


def model_configs(args, meta, encoder_vocab):
    """Tiny-preset configs with vocabulary and special ids from the tokenizer (data meta.json)."""
    K = args.num_registers
    enc_over, dem_over = {}, {}
    if args.encoder_width:
        heads = max(1, args.encoder_width // 32)
        enc_over = dict(hidden_size=args.encoder_width, num_heads=heads, num_kv_heads=max(1, heads // 2),
                        head_dim=args.encoder_width // heads, intermediate_size=8 * args.encoder_width // 3 // 16 * 16)
    if args.encoder_layers:
        enc_over["num_layers"] = args.encoder_layers
    enc = EncoderConfig.tiny(vocab_size=encoder_vocab["vocab_size"], pad_token_id=encoder_vocab["pad_id"],
                             eos_token_id=encoder_vocab["eos_id"], mask_token_id=encoder_vocab["mask_id"],
                             num_registers=K, max_position_embeddings=args.seq_len + K, **enc_over)
    if args.demasker_width:
        heads = max(1, args.demasker_width // 32)
        dem_over = dict(d_model=args.demasker_width, n_heads=heads, n_kv_heads=heads,
                        mlp_hidden_size=8 * args.demasker_width // 3 // 16 * 16)
    if args.demasker_layers:
        dem_over["n_layers"] = args.demasker_layers
    dem = DemaskerConfig.tiny(vocab_size=meta["vocab_size"], mask_token_id=meta["mask_id"],
                              eos_token_id=meta["eos_id"], bos_token_id=meta["bos_id"], pad_token_id=meta["eos_id"],
                              register_dim=0 if args.no_registers else enc.hidden_size, max_registers=K,
                              max_sequence_length=args.seq_len, **cadd_settings(args), **dem_over)
    return enc, dem


def build_models(args, meta, encoder_vocab, resume_dir=None):
    """(encoder | None, demasker): from the checkpoint configs on --resume, public/own weights with
    --encoder-init/--demasker-init, else from scratch with the tiny configs."""
    enc_cfg, dem_cfg = model_configs(args, meta, encoder_vocab)
    encoder = None
    if resume_dir is not None:  # weights are loaded afterwards by distributed.load_checkpoint
        if not args.no_registers:
            cfg = json.loads((resume_dir / "encoder" / "config.json").read_text())
            encoder = Encoder(EncoderConfig.from_dict(cfg))
        demasker = Demasker(DemaskerConfig.from_dict(json.loads((resume_dir / "demasker" / "config.json").read_text())))
        return encoder, demasker
    if not args.no_registers:
        encoder = (Encoder.from_pretrained(part_folder(args.encoder_init, "encoder"), num_registers=args.num_registers)
                   if args.encoder_init else Encoder(enc_cfg))
    register_dim = 0 if encoder is None else encoder.cfg.hidden_size
    if args.demasker_init:
        demasker = Demasker.from_pretrained(part_folder(args.demasker_init, "demasker"), register_dim=register_dim,
                                            max_registers=args.num_registers, **cadd_settings(args))
    else:
        demasker = Demasker(dem_cfg)
    if register_dim and conditioning_is_new(args.demasker_init):
        match_conditioning_rms_(demasker)
    check_vocab(demasker.cfg, meta, encoder, encoder_vocab)
    return (encoder.float() if encoder is not None else None), demasker.float()  # fp32 master weights


def cadd_settings(args):
    """The demasker config's CADD fields from --cadd / --cadd-schedule / --cadd-table (runs saved before: none)."""
    if not getattr(args, "cadd", False):
        return {"cadd_schedule": "none", "cadd_table": "own"}
    return {"cadd_schedule": args.cadd_schedule, "cadd_table": args.cadd_table}


def cadd_batch(args, demasker, x0, t, counters, seed):
    """cadd_inputs for EncoderDemasker (x_0, t, N(0, I) noise per example from its stream position), or None."""
    if demasker.cfg.cadd_schedule == "none":
        return None
    return x0, t, cadd.training_noise(counters, seed, x0.shape[1], demasker.cfg.d_model)


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


def part_folder(name_or_path, part):
    """A run's checkpoint folder (holding encoder/ and demasker/) stands for its `part`; else unchanged."""
    return str(Path(name_or_path) / part) if (Path(name_or_path) / part / "config.json").is_file() else name_or_path


def check_vocab(dem_cfg, meta, encoder, encoder_vocab):
    """The tokenizer's ids must be the ones the models were built / trained with."""
    problems = []
    for name, ours in (("mask_id", dem_cfg.mask_token_id), ("eos_id", dem_cfg.eos_token_id)):
        if meta[name] != ours:
            problems.append(f"demasker {name} {ours} != tokenizer {meta[name]}")
    if meta["vocab_size"] > dem_cfg.vocab_size:
        problems.append(f"tokenizer vocabulary {meta['vocab_size']} > demasker vocab_size {dem_cfg.vocab_size}")
    if encoder is not None and encoder_vocab["vocab_size"] > encoder.cfg.vocab_size:
        problems.append(f"encoder tokenizer vocabulary {encoder_vocab['vocab_size']} > encoder vocab_size "
                        f"{encoder.cfg.vocab_size}")
    if problems:
        raise ValueError("tokenizer and model disagree: " + "; ".join(problems) + ". Use the tokenizer the "
                         "model was trained with (--tokenizer / --encoder-tokenizer) or train from scratch.")


# ------------------------------------------------------------------------------------------------
# Optimizer and learning rate (Alg. 1 line 7)
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


@torch.no_grad()
def match_conditioning_rms_(demasker):
    """Scale the new register projection W so that a register (norm sqrt(d): entries of RMS 1) projects to the
    token embeddings' RMS: E|W z|^2 = ||W||_F^2 for z of unit-RMS i.i.d. entries, so RMS(W z) = ||W||_F /
    sqrt(d_model); START and END are scaled to the same RMS. Called only when these parameters are new (fresh
    init, or a base MDM / public LLaDA gaining them), never on a trained guided demasker or on --resume."""
    if not demasker.cfg.register_dim:
        return
    target = demasker.wte.weight.float().pow(2).mean().sqrt()
    weight = demasker.register_proj.weight
    weight.mul_(target / (weight.float().norm() / math.sqrt(demasker.cfg.d_model)).clamp_min(1e-12))
    for vector in (demasker.start_embedding, demasker.end_embedding):
        vector.mul_(target / vector.float().pow(2).mean().sqrt().clamp_min(1e-12))


def conditioning_is_new(init):
    """True when Demasker.from_pretrained(init) creates the conditioning parameters (a public LLaDA, or our base
    MDM with register_dim 0); False for our own guided demasker (they are trained weights)."""
    if not init:
        return True
    folder = Path(part_folder(init, "demasker"))
    try:
        if folder.is_dir():
            config = C.read_config(folder)
        else:  # a hub id: its config.json only (from_pretrained has fetched the weights already)
            from huggingface_hub import hf_hub_download
            config = C.read_json(hf_hub_download(repo_id=str(init), filename="config.json"), "config")
    except Exception:  # noqa: BLE001 (unreachable config: treat it as a public model)
        return True
    return "crocodil_model" not in config or not config.get("register_dim")


# ------------------------------------------------------------------------------------------------
# Data position: global batch `step` of the stream, this rank's part
# ------------------------------------------------------------------------------------------------

class Stream:
    """Global batch s = examples perm_e[j G : (j + 1) G] with (e, j) = divmod(s, n // G) and perm_e the
    epoch's permutation; rank r holds its round-robin share (distributed.shard_indices), i.e. the batch's
    positions r, r + W, r + 2W, ... The stream counter of position p of batch s is s G + p."""

    def __init__(self, num_examples, global_batch, env, seed):
        if num_examples < global_batch:
            raise ValueError(f"the training split has {num_examples} programs, fewer than the global batch "
                             f"{global_batch}; lower --global-batch-size or use a larger corpus")
        self.n, self.G, self.env, self.seed = num_examples, global_batch, env, seed
        self.steps_per_epoch = num_examples // global_batch
        self.epoch, self.shard = None, None

    def rows(self, step):
        """(this rank's dataset indices (G/W,), their stream counters (G/W,)) for global batch `step`."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self.shard = D.shard_indices(self.n, self.env.rank, self.env.world_size, epoch, self.seed)
        per_rank = self.G // self.env.world_size
        positions = self.env.rank + self.env.world_size * np.arange(per_rank)
        return self.shard[j * per_rank:(j + 1) * per_rank], step * self.G + positions


# ------------------------------------------------------------------------------------------------
# Validation (Fig. 4): masked-token CE and top-1 accuracy against the mask ratio
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, data, args, env, amp, keeps):
    """{f"k={k}" or "base": {"ratio": [...], "ce": [...], "acc": [...]}} over the first --val-programs rows.

    Row i draws one uniform vector u_i (its own generator) and is masked where u_i < ratio, so the masks are
    nested across ratios and identical for every k and every evaluation. Registers are clean (no noise);
    scored positions: masked program tokens (BOS .. first EOS). Rows are dealt to ranks; sums all-reduced.
    """
    model.eval()
    n = min(args.val_programs, len(data)) // env.world_size * env.world_size
    rows = np.arange(env.rank, n, env.world_size)
    mask_id = D.unwrap(model).demasker.cfg.mask_token_id
    sums = {}
    for first in range(0, len(rows), args.micro_batch_size):
        picked = rows[first:first + args.micro_batch_size]
        batch = data.batch(picked)
        x0, enc_ids, enc_mask = batch["ids"], batch["encoder_ids"], batch["encoder_mask"]
        program = torch.arange(x0.shape[1])[None, :] < batch["lengths"][:, None]  # (B, L) BOS .. first EOS
        u = torch.stack([torch.rand(x0.shape[1], generator=example_generator(args.seed, int(i), stream=1))
                         for i in picked])  # (B, L)
        x0, enc_ids, enc_mask, program, u = (t.to(env.device) for t in (x0, enc_ids, enc_mask, program, u))
        for key, k in keeps:
            keep = None if k is None else torch.full((len(picked),), k, device=env.device)
            for ratio in VAL_RATIOS:
                scored = (u < ratio) & program
                x_t = torch.where(u < ratio, torch.full_like(x0, mask_id), x0)
                cadd_inputs = cadd_batch(args, D.unwrap(model).demasker, x0, torch.full((len(picked),), ratio,
                                         device=env.device), picked, args.seed + 1)
                with D.autocast(env, amp):
                    logits = model(x_t, enc_ids, enc_mask, keep, None, cadd_inputs)
                ce = nn.functional.cross_entropy(logits[scored].float(), x0[scored], reduction="sum")
                correct = (logits[scored].argmax(-1) == x0[scored]).sum()
                for name, value in (("ce", ce), ("correct", correct), ("count", scored.sum())):
                    sums[f"{key}|{ratio}|{name}"] = sums.get(f"{key}|{ratio}|{name}", 0.0) + float(value)
    sums = D.all_reduce_sum(sums, env) if sums else sums
    model.train()
    results = {}
    for key, _ in keeps:
        count = [max(1.0, sums.get(f"{key}|{r}|count", 0.0)) for r in VAL_RATIOS]
        results[key] = {"ratio": VAL_RATIOS,
                        "ce": [sums.get(f"{key}|{r}|ce", 0.0) / c for r, c in zip(VAL_RATIOS, count)],
                        "acc": [sums.get(f"{key}|{r}|correct", 0.0) / c for r, c in zip(VAL_RATIOS, count)]}
    return results


# ------------------------------------------------------------------------------------------------
# Checkpoints and RNG states
# ------------------------------------------------------------------------------------------------

def save_run(out_dir, model, optimizer, env, step, args, stream, files):
    """OUT/checkpoint, atomically: distributed.save_checkpoint builds it in a staging folder, rank 0 adds
    tokenizer.json and args.json, then checkpoint.swap_folder swaps it in (crash-safe at every instant)."""
    core = D.unwrap(model)
    parts = {"demasker": {**core.demasker.cfg.to_dict(), "crocodil_model": "demasker"}}
    if core.encoder is not None:
        parts["encoder"] = {**core.encoder.cfg.to_dict(), "crocodil_model": "encoder"}
    extra = {"step": step, "examples_seen": step * args.global_batch_size, "num_train": stream.n,
             "global_batch_size": args.global_batch_size, "seed": args.seed, "rng": rng_states(),
             "data_settings": json.dumps(stream.data_settings, sort_keys=True)}
    stage = Path(tempfile.mkdtemp(prefix=".checkpoint.stage-", dir=out_dir)) if env.is_main else None
    stage = Path(D.broadcast_object(str(stage) if stage else None, env))
    try:
        DC.save_checkpoint(stage / CHECKPOINT, model, optimizer, env, parts=parts, extra=extra)
        if env.is_main:
            for name, source in files.items():
                shutil.copyfile(source, stage / CHECKPOINT / name)
            (stage / CHECKPOINT / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
            (stage / CHECKPOINT / PROGRESS).write_text(json.dumps({"step": step, "examples_seen": extra["examples_seen"]}))
            guards.write_cards_or_warn(stage / CHECKPOINT)  # hub cards, part of the atomic copy; a warning at worst
            C.swap_folder(stage / CHECKPOINT, Path(out_dir) / CHECKPOINT)  # a complete copy at every instant
    finally:
        if env.is_main:
            shutil.rmtree(stage, ignore_errors=True)
        D.barrier(env)


# ------------------------------------------------------------------------------------------------
# Data cache
# ------------------------------------------------------------------------------------------------

def prepare_data(args, env):
    """dataprep/data.py's cache: an existing --data folder is used as is (unless --corpus is given); otherwise rank 0
    builds it (a settings match makes that a no-op). Returns (train TokenData, val TokenData, meta,
    encoder vocabulary ids, {tokenizer files copied into every checkpoint})."""
    from dataprep import data

    vocab = Path(args.tokenizer).name if args.tokenizer else args.vocab_size
    folder = Path(args.data or f"data_cache/{Path(args.corpus or 'stdlib').stem}-L{args.seq_len}-V{vocab}")
    if args.data and not args.corpus and not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"--data {folder} is not a finished dataprep/data.py cache (no meta.json). Build it first "
                                f"(python -m dataprep.data --out {folder} ...), pass --corpus to build it here, or drop --data "
                                f"to use the default cache of the standard library")
    args.data = str(folder)
    if env.is_main and (args.corpus or not (folder / "meta.json").is_file()):
        data.build_dataset(folder, args.corpus, args.seq_len, args.vocab_size or 4096, args.tokenizer,
                           args.encoder_tokenizer, overlong=args.overlong)
    D.barrier(env)
    meta = data.load_meta(folder)
    if meta["seq_len"] != args.seq_len:
        raise ValueError(f"{folder} holds programs of L={meta['seq_len']} tokens, not --seq-len {args.seq_len}; "
                         f"pass the matching --seq-len or another --data folder")
    files = {"tokenizer.json": folder / "tokenizer.json"}
    encoder_vocab = {"vocab_size": meta["vocab_size"], "pad_id": meta["eos_id"], "eos_id": meta["eos_id"],
                     "mask_id": meta["mask_id"]}
    if not meta["shared_tokenizer"]:
        files["encoder_tokenizer.json"] = folder / "encoder_tokenizer.json"
        encoder_vocab = meta["encoder"]
    return data.TokenData(folder, "train"), data.TokenData(folder, "val"), meta, encoder_vocab, files


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
    out_dir = Path(args.out_dir)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    train_data, val_data, meta, encoder_vocab, files = prepare_data(args, env)
    resume_dir = out_dir / CHECKPOINT if args.resume else None
    if resume_dir is not None:
        if env.is_main:
            C.recover_folder(resume_dir)  # a save killed between its two renames left a complete old copy
        D.barrier(env)
        if not (resume_dir / DC.TRAINING_STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume: {resume_dir} holds no checkpoint; drop --resume to start a new run")
        check_same_tokenizers(resume_dir, files)
    encoder, demasker = build_models(args, meta, encoder_vocab, resume_dir)
    core = EncoderDemasker(encoder, demasker).to(env.device)
    amp = "bf16" if args.dtype == "bfloat16" else None

    accum = D.accumulation_steps(args.global_batch_size, args.micro_batch_size, env.world_size)
    stream = Stream(len(train_data), args.global_batch_size, env, args.seed)
    stream.data_settings = meta.get("settings")
    max_steps = args.max_steps or int(args.epochs * stream.steps_per_epoch)
    start = 0
    if resume_dir is not None:  # the step decides the staging before wrap_model (infra/distributed.py's rule)
        start = json.loads((resume_dir / PROGRESS).read_text())["step"]
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
        extra = DC.load_checkpoint(resume_dir, model, optimizer, env)
        if (extra["num_train"], extra["global_batch_size"], extra["seed"]) != (stream.n, args.global_batch_size, args.seed):
            raise ValueError(f"--resume: the checkpoint's data stream (programs, global batch, seed) = "
                             f"{(extra['num_train'], extra['global_batch_size'], extra['seed'])} differs from this run's "
                             f"{(stream.n, args.global_batch_size, args.seed)}; resume with the same data and flags")
        recorded = extra.get("data_settings")
        if recorded is not None and json.loads(recorded) != stream.data_settings:
            raise ValueError(f"--resume: the data cache {args.data} was built with other settings than the run's "
                             f"(run: {recorded}; now: {json.dumps(stream.data_settings, sort_keys=True)}); resume with "
                             f"the run's data folder")
        set_rng_states(extra["rng"])
    if env.is_main:  # what this run really uses (on --resume only the RESUME_MUTABLE flags can differ)
        (out_dir / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    K = encoder.cfg.num_registers if encoder is not None else 0
    noise_std = latent_noise_std(args.latent_cos)
    distribution = getattr(args, "keep_distribution", None) or "uniform"  # runs saved before the flag: uniform
    keep_sampler = (None if distribution == "uniform"  # corruption's default, number for number as before
                    else lambda n, K, gen: sample_keep(n, K, generator=gen, distribution=distribution))
    keeps = [("base", None)] if encoder is None else [(f"k={k}", k) for k in (args.val_keep or [K])]
    log = open(out_dir / "log.jsonl", "a") if env.is_main else None
    stop = min(max_steps, args.stop_at or max_steps)
    bar = tqdm(total=max_steps, initial=start, disable=not env.is_main, dynamic_ncols=True,
               desc="encoder-demasker" if encoder is not None else "base MDM")
    tokens_per_step = args.global_batch_size * args.seq_len
    last_time = time.time()
    saved_at = start if resume_dir is not None else None

    def log_record(record):
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()

    guard = guards.BadStepGuard(args.max_bad_steps, log=log_record, last_good=lambda: (
        f"{out_dir / CHECKPOINT} (step {saved_at}), untouched" if saved_at is not None else "none was written"))
    for step in range(start, stop):
        lr = get_lr(step, args, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if staged and step == args.encoder_warmup_steps:
            set_demasker_trainable(model, True)
        rows, counters = stream.rows(step)
        step_loss = 0.0
        for micro in range(accum):
            part = slice(micro * args.micro_batch_size, (micro + 1) * args.micro_batch_size)
            batch = train_data.batch(rows[part])
            x0, enc_ids, enc_mask = batch["ids"], batch["encoder_ids"], batch["encoder_mask"]
            noisy = corrupt(x0, counters[part].tolist(), args.seed, demasker.cfg.mask_token_id, args.all_mask_prob,
                            K, args.nested_dropout, K and encoder.cfg.hidden_size, noise_std,
                            register_dropout=args.register_dropout if K else 0.0, keep_sampler=keep_sampler)
            to = lambda t: None if t is None else t.to(env.device)
            with D.grad_sync(model, enabled=micro == accum - 1):
                with D.autocast(env, amp):
                    cadd_inputs = cadd_batch(args, demasker, to(x0), to(noisy["p_mask"][:, 0]), counters[part], args.seed)
                    logits = model(to(noisy["x_t"]), to(enc_ids), to(enc_mask), to(noisy["keep"]), to(noisy["noise"]),
                                   cadd_inputs)
                masked, p_mask = pad_weighted(noisy["masked"], noisy["p_mask"], batch["lengths"],
                                              getattr(args, "pad_eos_weight", 1.0))
                loss = masked_diffusion_loss(logits, to(x0), to(masked), to(p_mask)) / accum
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
        if log and good and (done % args.log_interval == 0 or done == stop):
            log.write(json.dumps({"type": "train", "step": done, "loss": metrics["loss"], "lr": lr,
                                  "grad_norm": grad_norm, "tokens_per_s": tok_s,
                                  "demasker_frozen": staged and step < args.encoder_warmup_steps}) + "\n")
            log.flush()
        if args.eval_interval and (done % args.eval_interval == 0 or done == max_steps):
            results = evaluate(model, val_data, args, env, amp, keeps)
            if log:
                log.write(json.dumps({"type": "val", "step": done, "results": results}) + "\n")
                log.flush()
                bar.write(f"val step {done}: " + " | ".join(
                    f"{key} ce {np.mean(r['ce']):.3f} acc {np.mean(r['acc']):.3f} (ratio 1.0: ce {r['ce'][-1]:.3f} "
                    f"acc {r['acc'][-1]:.3f})" for key, r in results.items()))
        if (done % args.save_interval == 0 and guard.streak == 0) or done == stop:
            save_run(out_dir, model, optimizer, env, done, args, stream, files)
            saved_at = done
    bar.close()
    if log:
        log.close()
    del model, optimizer  # the wrapper goes before its process group (distributed.cleanup)
    D.cleanup(env)
    return core


if __name__ == "__main__":
    train(parse_args())
