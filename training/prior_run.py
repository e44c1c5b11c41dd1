"""train_prior.py's run plumbing: the sources (AE run, data cache, register banks), the run folder and --resume.

- resolve_data_dir: --data, else the data folder the AE run records.
- batch_rows: the data order, per-epoch permutations of the banks as a function of (seed, step).
- check_run_folder: --resume recovers a killed save and checks that the encoder and the data are the ones
  prior.json records (a new run's folder is claimed by infra/run_folder.py: refused when it holds anything).
- load_banks: the frozen encoder's register banks z_0 = h_phi(x_0) of the train / val splits (dataprep/latent_data.py;
  the training data of Alg. 4 / 5).
- write_settings: prior.json (what sampling must repeat: K, block offsets, conditioning, the AE run) and args.json.
- save / load_resume: the training state (atomic, every rank) and the EMA sampling weights dit/ (and cond_encoder/), with hub
  model cards (a card that cannot be written is a warning).
- parse_all / consistency_inputs: the consistency measurement of a conditional prior at validation
  (evaluation/consistency.py): its flags, and the demasker, held-out programs and oracle registers it reads.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

from dataprep.cross_tokenizer import SharedView, describe, view_from_data
from dataprep.latent_data import RegisterBank, build_bank, default_cache_dir, encoder_fingerprint
from generators import PRIOR_SETTINGS_FILE
from infra import checkpoint as C
from infra import dist_checkpoint as DC
from infra import distributed as D
from infra import guards
from training import runs as R
from schedules import register_blocks

STATE_DIR = "train_state"  # OUT/train_state: raw weights + training_state.pt (AdamW, EMA, step)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed, epoch, n):
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_rows(step, global_batch, n, seed):
    """Rows of global batch `step`: positions step*G .. (step+1)*G - 1 of the concatenated per-epoch
    permutations of range(n) (works for G > n as well). Returns (G,) int64."""
    rows, position = [], step * global_batch
    while len(rows) < global_batch:
        epoch, offset = divmod(position, n)
        take = _epoch_permutation(seed, epoch, n)[offset:offset + global_batch - len(rows)]
        rows.extend(take.tolist())
        position += len(take)
    return np.asarray(rows, dtype=np.int64)


def resolve_data_dir(args, ae):
    """--data, else the data folder recorded in the AE run's args.json ("data"; relative to the working
    directory of training, or to the run folder's parent)."""
    if args.data:
        return args.data
    for args_file in (ae / "args.json", ae.parent / "args.json"):
        recorded = json.loads(args_file.read_text()).get("data") if args_file.is_file() else None
        if recorded:
            for candidate in (Path(recorded), ae.parent.parent / recorded):
                if (candidate / "meta.json").is_file():
                    return str(candidate)
    raise ValueError(f"no --data given and the AE run {ae} records no existing data folder; pass --data <dataprep/data.py "
                     f"cache folder>")


def check_run_folder(args, env, out, encoder_dir, data_dir, meta):
    """--resume: saves killed between their two renames are recovered, the state must exist, and the encoder and
    data must be the recorded ones."""
    if args.resume:
        R.recover_for_resume(env, out / STATE_DIR, out / "dit", out / "cond_encoder")
        check_same_sources(out, encoder_dir, data_dir, meta)


def check_same_sources(out, encoder_dir, data_dir, meta):
    """--resume: the AE encoder and the data must be the ones prior.json records (fingerprint, settings)."""
    settings = C.read_json(out / PRIOR_SETTINGS_FILE, "prior settings file")
    recorded, current = settings.get("encoder_fingerprint"), encoder_fingerprint(encoder_dir)
    if recorded is None:
        raise ValueError(f"--resume: {out / PRIOR_SETTINGS_FILE} records no encoder_fingerprint, so the encoder "
                         f"{encoder_dir} cannot be checked against the one the prior was trained on; start a new "
                         f"prior with another --out-dir (or --overwrite)")
    if recorded != current:
        raise ValueError(f"--resume: the encoder {encoder_dir} (fingerprint {current[:16]}) is not the one this prior "
                         f"was trained on ({settings.get('ae')}, fingerprint {recorded[:16]}); pass --ae "
                         f"{settings.get('ae')} or start a new prior with another --out-dir")
    if settings.get("data_settings") is not None and settings["data_settings"] != meta.get("settings"):
        raise ValueError(f"--resume: the data cache {data_dir} was built with other settings than {settings['data']}, "
                         f"which this prior was trained on; pass --data {settings['data']} or start a new prior")


def load_banks(args, ae, encoder_dir, data_dir, env):
    """{"train": RegisterBank, "val": RegisterBank (when the split is not empty)}, built once and cached."""
    from dataprep.data import TokenData

    cache = args.bank_cache or default_cache_dir(ae)
    banks = {split: RegisterBank(build_bank(encoder_dir, data_dir, split, args.num_registers, cache,
                                            args.bank_batch_size, device=env.device, env=env,
                                            progress=not args.quiet))
             for split in ("train", "val") if len(TokenData(data_dir, split))}
    if "train" not in banks:
        raise ValueError(f"the train split of {data_dir} is empty")
    return banks


def conditioning_view(args, encoder_dir, data_dir, meta):
    """How the encoder reads a partially masked demasker row (Alg. 4's x^(r), dataprep/cross_tokenizer.py): the
    row itself with one tokenizer, a cross-tokenizer view with two; None for the unconditional prior."""
    if not args.conditional:
        return None
    pad_id = C.read_config(encoder_dir)["pad_token_id"]
    if bool(meta.get("shared_tokenizer", True)):
        return SharedView(meta["eos_id"], pad_id)
    return view_from_data(data_dir, pad_id=pad_id)[0]


def run_context(args, env, out, banks, frozen, view, data_dir):
    """The dict train_prior.model_inputs and validate read: flags, device, banks, the frozen conditioning encoder
    and, for the conditional prior, the token rows (train / val) x^(r) is drawn from and the encoder's view."""
    from dataprep.data import TokenData

    ctx = {"args": args, "env": env, "out": out, "device": env.device, "bank": banks["train"],
           "train_bank": banks["train"], "val_bank": banks.get("val"), "frozen_encoder": frozen, "seq_len": None}
    if args.conditional:
        ctx["tokens"], ctx["val_tokens"] = TokenData(data_dir, "train"), TokenData(data_dir, "val")
        ctx["seq_len"] = ctx["tokens"].ids.shape[1]  # the masks are drawn over the demasker's L
        ctx["view"] = view
    return ctx


def write_settings(args, out, data_dir, encoder_dir, shared_tokenizer, data_settings=None, view=None):
    """OUT/prior.json (read by generators.load_prior) and OUT/args.json."""
    settings = {"ae": str(R.resolve_ae(args.ae).resolve()), "data": str(Path(data_dir).resolve()),
                "data_settings": data_settings,
                "encoder_fingerprint": encoder_fingerprint(encoder_dir), "num_registers": args.num_registers,
                "block_offsets": not args.no_block_offsets, "max_offset": args.max_offset,
                "conditional": args.conditional, "cond_registers": args.cond_registers if args.conditional else None,
                "train_cond_encoder": args.train_cond_encoder, "shared_tokenizer": shared_tokenizer,
                "register_blocks": register_blocks(args.num_registers),
                "cross_tokenizer": describe(view) if view is not None and not view.shared else None}
    (out / PRIOR_SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    R.write_args(out, args)


def save(ctx, model, optimizer, ema, step):
    """Training state (atomic, all ranks), then the EMA sampling weights (rank 0)."""
    env, out, trainee = ctx["env"], ctx["out"], D.unwrap(model)
    parts = {"dit": {**trainee.dit.cfg.to_dict(), "crocodil_model": "latent_dit"}}
    if trainee.cond_encoder is not None:
        parts["cond_encoder"] = {**trainee.cond_encoder.cfg.to_dict(), "crocodil_model": "encoder"}
    ema_state = {key: value.detach().cpu() for key, value in ema.module.state_dict().items()}
    DC.save_checkpoint(out / STATE_DIR, model, optimizer, ctx["env"], parts=parts, extra={"step": step, "ema": ema_state})
    if env.is_main:
        ema.module.dit.save_pretrained(out / "dit")
        if ema.module.cond_encoder is not None:
            ema.module.cond_encoder.save_pretrained(out / "cond_encoder")
        guards.write_cards_or_warn(out)  # hub cards in dit/ (and cond_encoder/); a warning at worst
    D.barrier(env)


def load_resume(out, model, optimizer, ema, env):
    """--resume: weights, AdamW and EMA state from OUT/train_state (strict); the log lines after it dropped.
    Returns the step to continue from."""
    extra = DC.load_checkpoint(out / STATE_DIR, model, optimizer, env)
    ema.module.load_state_dict(extra["ema"])
    if env.is_main:
        truncate_log(out, extra["step"])
    return extra["step"]


def log_line(ctx, record):
    """Append one record to OUT/log.jsonl (rank 0); "type" is "train" or "val" as in train_ae.py."""
    R.RunLog(ctx["out"] / "log.jsonl", enabled=ctx["env"].is_main)(record)


def truncate_log(out, step):
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    R.RunLog(Path(out) / "log.jsonl").truncate(step)


# ------------------------------------------------------------------------------------------------
# The consistency measurement at validation (evaluation/consistency.py)
# ------------------------------------------------------------------------------------------------

# Off by default: every validation would decode 6 x N programs with the demasker (oracle, blank, 3 shares, copy;
# N = 8 with the tiny demasker at L = 128: 3.5 s per validation on one CPU thread, about 20 s over the six
# validations of demo.sh's conditional prior), and at paper size rank 0 would hold the 8B demasker beside the prior it trains.
CONSISTENCY_DEFAULTS = {"val_consistency": 0, "val_consistency_steps": 32}
CONSISTENCY_PRIOR_STEPS = 32  # DDIM steps of each draw: the paper's refresh (generators.conwithindisc)


def consistency_flags():
    """The flags train_prior.py reads beside config/prior_args.py's (validation only: free to change on
    --resume). Shown after the main --help."""
    p = argparse.ArgumentParser(prog="train_prior.py", add_help=False, allow_abbrev=False)
    g = p.add_argument_group("consistency of the conditional prior at validation (evaluation/consistency.py)")
    g.add_argument("--val-consistency", type=int, default=None, metavar="N", help="with --conditional: at every "
                   "validation, draw registers for the first N held-out programs given h(x_t) at revealed shares "
                   "0.25 / 0.5 / 0.75 and given the clean program, decode them with the AE run's demasker, and log "
                   "the agreement with the revealed tokens and the copy figures beside the oracle h_phi(x) and "
                   "the all-[M] condition (0 = off, the default: it costs decoding time, and rank 0 holds the "
                   "demasker)")
    g.add_argument("--val-consistency-steps", type=int, default=None, metavar="S", help="MDM steps of each of "
                   "those decodings (default 32, at most the sequence length)")
    return p


def parse_all(argv=None):
    """config/prior_args.parse_args(argv) plus the consistency flags (their run values kept on --resume unless
    given again). Errors exit with status 2, naming the flag."""
    from config.prior_args import parse_args

    argv = sys.argv[1:] if argv is None else list(argv)
    extra = consistency_flags()
    own, rest = extra.parse_known_args(argv)
    try:
        args = parse_args(rest)
    except SystemExit as stop:
        if stop.code == 0:  # --help: the consistency flags follow the main ones
            print(extra.format_help())
        raise
    for name, default in CONSISTENCY_DEFAULTS.items():
        chosen = getattr(own, name)
        setattr(args, name, chosen if chosen is not None else getattr(args, name, default))
    if args.val_consistency < 0:
        extra.error(f"--val-consistency must be an integer >= 0 (0 = off), got {args.val_consistency}")
    if args.val_consistency_steps < 1:
        extra.error(f"--val-consistency-steps must be an integer >= 1, got {args.val_consistency_steps}")
    if args.val_consistency and not args.conditional:
        extra.error("--val-consistency measures a conditional prior: add --conditional, or drop it")
    return args


def consistency_inputs(ctx):
    """What evaluation/consistency.measure reads at validation, built once on the validating rank: the AE run's
    demasker and tokenizer, the first --val-consistency held-out programs and their oracle registers (the
    validation bank: h_phi(x), the first K). Returns a dict, or None when the measurement is off."""
    args = ctx["args"]
    if not getattr(args, "val_consistency", 0) or not args.conditional or ctx["val_bank"] is None:
        return None
    if "consistency" not in ctx:
        from sample import decode_programs

        demasker, _, tokenizer = R.load_run(R.resolve_ae(args.ae), False, ctx["device"])
        cfg = demasker.cfg
        rows = np.arange(min(args.val_consistency, len(ctx["val_bank"])))
        programs = ctx["val_tokens"].batch(rows)
        ctx["consistency"] = {
            "demasker": demasker, "ids": programs["ids"], "lengths": programs["lengths"],
            "oracle": ctx["val_bank"].batch(rows),
            "to_text": lambda tokens: decode_programs(tokenizer, tokens, cfg.eos_token_id, cfg.bos_token_id)}
    return ctx["consistency"]
