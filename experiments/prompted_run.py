"""experiments/train_prompted.py's run plumbing: the autoencoder it builds on, the pairs as tensors, the run folder's
checkpoints and --resume, and the finished run's record (paper App. H; beyond the paper's experiments).

- load_ae: the train_ae.py run -> its folder, the demasker's tokenizer, the encoder's own tokenizer (two tokenizers,
  App. C: Qwen3-Embedding beside LLaDA) or None (one shared tokenizer, the tiny setting), and the frozen h_phi.
- conditioning_view: how h reads a partially masked prompted canvas (Alg. 4's x^(r), the prompt always visible):
  None with one tokenizer (generators.embed_canvas reads the row itself), dataprep/cross_tokenizer.py's view with two,
  its slots per masked token measured on the training programs (cross_tokenizer.length_ratio).
- load_data: one split of the pairs (dataprep/prompts.py) as demasker canvases, the prompt's encoder rows (h_kappa's
  input) and the register bank z_0 = h_phi(target) (the prior's target and the fine-tuned demasker's guide).
- sources / record_sources: fingerprints of what the trajectory reads (the AE's encoder and demasker, the
  tokenizers, the training pairs), kept in OUT/sources.json; --resume refuses other ones before anything is written,
  naming them and the fix.
- save_state / load_state: OUT/train_state (the prior: g_psi and h_kappa, AdamW, EMA) and OUT/demasker_state (the
  demasker fine-tuning, AdamW), full state written atomically on every rank by infra/dist_checkpoint.py with the
  global RNG states. Every per-step draw is a function of (seed, step), so a resumed run is bit-exact.
- truncate_log: log.jsonl cut back to the checkpoint --resume continues from.
- write_run: dit/, kappa/ (EMA) and ae/ (the fine-tuned demasker) staged, each swapped in complete, prompted.json
  (what extensions/prompting.load_prompted_prior reads: the settings, the target, the demasker it pairs with, the
  AE encoder's fingerprint, the cross-tokenizer view) last, so a killed run never leaves a record beside
  half-written weights.
"""

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from dataprep.latent_data import encoder_fingerprint
from extensions.prompting import FINE_TUNED_BY, PROMPTED_SETTINGS_FILE
from infra import checkpoint as C
from infra import dist_checkpoint as DC
from infra import distributed as D
from infra.atomic import read_json, write_json
from schedules import register_blocks

STATES = {"prior": "train_state", "demasker": "demasker_state"}  # OUT/<folder>: one resumable state per phase
SOURCES_FILE = "sources.json"  # OUT/sources.json: the fingerprints of the AE run and the pairs (prompted_run.sources)
LOG_ORDER = {"data": 0, "prior": 1, "demasker": 2, "val": 3}  # a run's log records in the order they are written


@dataclass
class AERun:
    """The train_ae.py run a prompted prior builds on."""
    folder: Path                          # the folder holding encoder/, demasker/, tokenizer.json
    tokenizer: object                     # the demasker's
    encoder_tokenizer: Optional[object]   # the encoder's own (two tokenizers), None: shared
    encoder: torch.nn.Module              # h_phi, frozen


def load_ae(ae, device="cpu"):
    """AERun of a train_ae.py run folder (or its checkpoint/)."""
    from dataprep.tokenization import load_tokenizer
    from encoder import Encoder
    from training.runs import resolve_ae

    folder = resolve_ae(ae)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} holds no tokenizer.json; pass --ae a train_ae.py run (it writes one "
                                f"next to demasker/)")
    own = folder / "encoder_tokenizer.json"
    encoder = Encoder.from_pretrained(str(folder / "encoder"), device=device).eval().requires_grad_(False)
    return AERun(folder, load_tokenizer(str(folder / "tokenizer.json")),
                 load_tokenizer(str(own)) if own.is_file() else None, encoder)


def conditioning_view(ae, programs, encoder_seq_len):
    """None (one tokenizer), or the cross-tokenizer view of a demasker canvas with its slots per masked token
    measured on `programs` (texts) and the encoder rows capped at encoder_seq_len."""
    from dataprep.cross_tokenizer import make_view

    if ae.encoder_tokenizer is None:
        return None
    return make_view(ae.tokenizer, ae.encoder_tokenizer, texts=programs, max_length=encoder_seq_len)


@torch.no_grad()
def bank(encoder, ids, mask, num_registers, chunk=64):
    """The first K registers of h_phi for every row: (N, K, d) float32 on the CPU."""
    device = next(encoder.parameters()).device
    parts = [encoder(ids[i:i + chunk].to(device), attention_mask=mask[i:i + chunk].to(device))[:, :num_registers]
             .float().cpu() for i in range(0, len(ids), chunk)]
    return torch.cat(parts)


def load_data(args, ae, split="train"):
    """One split of the pairs: dataprep/prompts.encode_pairs' canvases and encoder rows, and "z0" (N, K, d), the
    registers of the --target (prompt + answer, or the answer) that the prior models and the demasker is guided by."""
    from dataprep.prompts import encode_pairs, load_pairs

    pairs = load_pairs(args.pairs, split)[:args.max_examples]
    data = encode_pairs(pairs, ae.tokenizer, args.seq_len, ae.encoder_tokenizer, args.encoder_seq_len)
    if len(data["pairs"]) == 0:
        raise ValueError(f"no {split} pair of {args.pairs} fits --seq-len {args.seq_len}; raise --seq-len")
    data["z0"] = bank(ae.encoder, *data[args.target], args.num_registers)
    return data


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def sources(ae, pairs, fine_tunes):
    """{name: fingerprint} of everything a training step reads besides the flags; the demasker's only when it is
    fine-tuned (`fine_tunes`: hashing LLaDA-8B's weights for nothing takes a minute)."""
    found = {"encoder": encoder_fingerprint(ae.folder / "encoder"),
             "tokenizer.json": _sha256(ae.folder / "tokenizer.json"),
             "train.jsonl": _sha256(Path(pairs) / "train.jsonl")}
    if fine_tunes:
        found["demasker"] = encoder_fingerprint(ae.folder / "demasker")
    if ae.encoder_tokenizer is not None:
        found["encoder_tokenizer.json"] = _sha256(ae.folder / "encoder_tokenizer.json")
    return found


def record_sources(out, found, args, env):
    """OUT/sources.json: written by a new run before its first step; on --resume the AE run and the pairs must be
    the ones it records (checked before anything is written; a demasker recorded and read by both is compared)."""
    path = Path(out) / SOURCES_FILE
    if not args.resume:
        if env.is_main:
            write_json(path, found)
        return
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} is missing, so nothing shows which AE run and pairs the run in "
                                f"{out} was trained on; start a new run with another --out-dir (or --overwrite)")
    check_sources(read_json(path, "start a new run with another --out-dir"), found, out, args)


def check_sources(recorded, current, out, args):
    """--resume: the AE run and the pairs must be the ones the run in `out` was trained on."""
    keys = set(recorded) | set(current)
    if not ("demasker" in recorded and "demasker" in current):
        keys.discard("demasker")  # it matters only where both the run and this resume fine-tune it
    changed = sorted(key for key in keys if recorded.get(key) != current.get(key))
    if changed:
        raise ValueError(f"--resume: {', '.join(changed)} of --ae {args.ae} / --pairs {args.pairs} differ from the "
                         f"ones the run in {out} was trained on (sha256 fingerprints); pass the --ae and --pairs of "
                         f"its args.json, or start a new run with another --out-dir")


def save_state(out, phase, model, optimizer, env, step, ema=None):
    """OUT/train_state (phase "prior": dit/ and kappa/) or OUT/demasker_state (phase "demasker"); every rank."""
    module = D.unwrap(model)
    extra = {"phase": phase, "step": step, "rng": DC.rng_states()}
    if ema is not None:
        extra["ema"] = {key: value.detach().cpu() for key, value in ema.module.state_dict().items()}
    if phase == "prior":
        parts = {name: {**getattr(module, name).cfg.to_dict(), "crocodil_model": kind}
                 for name, kind in (("dit", "latent_dit"), ("kappa", "encoder"))}
        DC.save_checkpoint(out / STATES[phase], model, optimizer, env, parts=parts, extra=extra)
    else:
        config = {**module.cfg.to_dict(), "crocodil_model": "demasker"}
        DC.save_checkpoint(out / STATES[phase], model, optimizer, env, config=config, extra=extra)


def has_state(out, phase):
    return (Path(out) / STATES[phase] / DC.TRAINING_STATE_FILE).is_file()


def load_state(out, phase, model, optimizer, env, ema=None):
    """--resume: the phase's weights, AdamW (and EMA) state strictly and the global RNG states restored. Returns the
    step to continue from (0 when the phase has not saved yet)."""
    if not has_state(out, phase):
        return 0
    extra = DC.load_checkpoint(out / STATES[phase], model, optimizer, env)
    if ema is not None:
        ema.module.load_state_dict(extra["ema"])
    DC.set_rng_states(extra["rng"])
    return int(extra["step"])


def truncate_log(out, phase, step):
    """Drop the log records written after step `step` of `phase` (the resumed run writes them again)."""
    path = Path(out) / "log.jsonl"
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and _position(line) <= (LOG_ORDER[phase], step)]
        path.write_text("".join(line + "\n" for line in kept))


def _position(line):
    """(phase order, step) of one log record: "data" first, then the prior's steps, the demasker's, "val" last."""
    record = json.loads(line)
    return LOG_ORDER[record.get("phase", record["type"])], record.get("step", 0)


def write_run(args, out, ema_trainee, demasker, ae, view, fingerprint):
    """The finished run (rank 0): dit/, kappa/ (and ae/) staged and each swapped in complete, prompted.json last.
    fingerprint: the AE encoder's (sources()["encoder"])."""
    from dataprep.cross_tokenizer import describe

    stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out))
    try:
        ema_trainee.dit.save_pretrained(stage / "dit")
        ema_trainee.kappa.save_pretrained(stage / "kappa")
        if demasker is not None:
            write_fine_tuned(args, stage / "ae", demasker, ae)
        for name in ("dit", "kappa", "ae"):
            if (stage / name).exists():
                C.swap_folder(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    settings = {"ae": str(ae.folder.resolve()), "encoder_fingerprint": fingerprint,
                "pairs": str(Path(args.pairs).resolve()), "target": args.target, "guide": args.guide,
                "demasker": "ae" if demasker is not None else str(ae.folder.resolve()),
                "num_registers": args.num_registers, "cond_registers": args.cond_registers,
                "kappa_registers": args.kappa_registers, "max_offset": args.max_offset,
                "block_offsets": not args.no_block_offsets, "register_blocks": register_blocks(args.num_registers),
                "freeze_kappa": args.freeze_kappa, "xt_drop": args.xt_drop, "seq_len": args.seq_len,
                "encoder_seq_len": args.encoder_seq_len, "shared_tokenizer": view is None,
                "cross_tokenizer": describe(view) if view is not None else None}
    write_json(out / PROMPTED_SETTINGS_FILE, settings)


def write_fine_tuned(args, folder, demasker, ae):
    """A complete AE run folder around the fine-tuned demasker: demasker/, the AE's encoder/ and tokenizer file(s),
    and args.json (the data cache the AE was trained on, for eval.py; the guide, for prompting.demasker_guide)."""
    demasker.save_pretrained(folder / "demasker")
    shutil.copytree(ae.folder / "encoder", folder / "encoder", dirs_exist_ok=True)
    for name in ("tokenizer.json", "encoder_tokenizer.json"):
        if (ae.folder / name).is_file():
            shutil.copy(ae.folder / name, folder / name)
    recorded = next((json.loads(p.read_text()).get("data") for p in (ae.folder / "args.json",
                                                                      ae.folder.parent / "args.json")
                     if p.is_file()), None)
    write_json(folder / "args.json", {"data": recorded, "fine_tuned_by": FINE_TUNED_BY, "from_ae": str(ae.folder),
                                      "demasker_steps": args.demasker_steps, "guide": args.guide})
