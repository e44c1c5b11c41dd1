"""train_ae.py's run plumbing: the data stream, validation (Fig. 4), checkpoints and --resume.

- Stream: global batch s of the training stream and this rank's share of it; the stream counter of each example
  seeds its random draws (corruption.example_generator), so a run is the same on any number of ranks.
- evaluate: masked-token CE and top-1 accuracy at mask ratios 0.1 .. 1.0 (paper Fig. 4), per register count k.
- save_run / load_resume: OUT/checkpoint written atomically (distributed.save_checkpoint into a staging folder,
  tokenizer.json, args.json, progress.json and hub model cards added, then checkpoint.swap_folder), and read back
  strictly with the data stream and the global RNG states checked / restored.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from corruption import example_generator
from infra import checkpoint as C
from infra import dist_checkpoint as DC
from infra import distributed as D
from infra import guards
from infra.atomic import read_json
from training.ae_setup import cadd_batch
from training.runs import recorded
from infra.dist_checkpoint import rng_states, set_rng_states

CHECKPOINT = "checkpoint"  # OUT/checkpoint: encoder/, demasker/, tokenizer.json, args.json, progress.json, training_state.pt
PROGRESS = "progress.json"  # the step, readable without loading the optimizer state
VAL_RATIOS = [round(0.1 * i, 1) for i in range(1, 11)]  # Fig. 4's mask probabilities


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


def val_summary(step, results):
    """One progress-bar line for a validation record: mean CE / top-1 over the ratios, and at ratio 1.0."""
    return f"val step {step}: " + " | ".join(
        f"{key} ce {np.mean(r['ce']):.3f} acc {np.mean(r['acc']):.3f} (ratio 1.0: ce {r['ce'][-1]:.3f} "
        f"acc {r['acc'][-1]:.3f})" for key, r in results.items())


# ------------------------------------------------------------------------------------------------
# Checkpoints and --resume
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
            (stage / CHECKPOINT / "args.json").write_text(json.dumps(recorded(args), indent=2) + "\n")
            (stage / CHECKPOINT / PROGRESS).write_text(json.dumps({"step": step, "examples_seen": extra["examples_seen"]}))
            guards.write_cards_or_warn(stage / CHECKPOINT)  # hub cards, part of the atomic copy; a warning at worst
            C.swap_folder(stage / CHECKPOINT, Path(out_dir) / CHECKPOINT)  # a complete copy at every instant
    finally:
        if env.is_main:
            shutil.rmtree(stage, ignore_errors=True)
        D.barrier(env)


def saved_step(resume_dir):
    """The step of the checkpoint in resume_dir (progress.json); a file edited since the save is refused naming it
    and the fix (the same step is in training_state.pt, which the load then checks against it)."""
    path = Path(resume_dir) / PROGRESS
    fix = "restore it from a good copy of the run, or start a new run with another --out-dir"
    progress = read_json(path, fix)
    step = progress.get("step") if isinstance(progress, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{path} holds no step count (\"step\": a whole number >= 0; got {step!r}): it was edited; "
                         f"{fix}")
    return step


def load_resume(resume_dir, model, optimizer, env, stream, args):
    """--resume: every tensor and the AdamW state loaded strictly (distributed.load_checkpoint), the data stream
    (programs, global batch, seed, data settings) checked to be the run's, the global RNG states restored."""
    extra = DC.load_checkpoint(resume_dir, model, optimizer, env)
    if extra.get("step") is not None and extra["step"] != saved_step(resume_dir):
        raise ValueError(f"{Path(resume_dir) / PROGRESS} says step {saved_step(resume_dir)}, but the checkpoint's "
                         f"training state was saved at step {extra['step']}: the file was edited; write "
                         f"\"step\": {extra['step']} back into it")
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
    return extra
