"""The command line of train_prior.py: flags, the tiny / paper presets, number checks and the --resume rules.

Presets (flags left unset take these; App. E gives the prior's architecture and objective but no optimiser
settings, so both are our choices, see PRESETS). Every number is checked before any work (guards.check_range:
argparse's message naming the flag and its valid range, exit status 2). On --resume the run's recorded flags
(OUT/args.json) become the defaults, and an explicit flag outside RESUME_MUTABLE that differs from the record is
refused with the list of differences.
"""

import argparse
import functools
from pathlib import Path

from infra import checkpoint as C
from infra import guards
from infra.run_folder import OVERWRITE_HELP
from training.runs import resolve_ae  # noqa: F401 (re-exported)

# flags that may change on --resume; any other difference from OUT/args.json is refused. --ae and --data are paths:
# what they hold is checked instead (the encoder fingerprint and the data settings recorded in prior.json)
RESUME_MUTABLE = ("ae", "data", "out_dir", "resume", "stop_at", "max_steps", "micro_batch_size", "eval_interval",
                  "val_examples", "log_interval", "save_interval", "bank_cache", "bank_batch_size", "amp", "compile",
                  "device", "threads", "quiet", "max_bad_steps")
NOT_INHERITED = ("ae", "data", "out_dir", "resume", "stop_at", "overwrite")

# Optimisation presets (flags left unset take these). App. E states the prior's architecture and objective but no
# optimiser settings, so the paper preset is our choice for a ~400M DiT, after DiT (Peebles & Xie: AdamW lr 1e-4,
# no weight decay, EMA 0.9999, global batch 256) with the warm-up + cosine decay of train_ae.py, 100k steps (25.6M
# banks, ~10 passes over a 2.5M-program corpus) and bf16 autocast. tiny: CPU minutes on toy banks (a 64-wide DiT
# wants a 10x larger LR and a short EMA).
PRESETS = {
    "tiny": dict(max_steps=2000, global_batch_size=64, lr=1e-3, min_lr_ratio=0.1, warmup_steps=100,
                 weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, amp="none"),
    "paper": dict(max_steps=100_000, global_batch_size=256, lr=1e-4, min_lr_ratio=0.1, warmup_steps=1000,
                  weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, amp="bf16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the latent DiT prior over encoder register banks: unconditional "
                                            "(Alg. 5, ConThenDisc) or --conditional on h(x^(r)) (Alg. 4, ConWithinDisc). "
                                            "Flag names follow train_ae.py.",
                                epilog="On --resume, flags left unset take the run's recorded values (OUT/args.json) and only these may change: " + ", ".join("--" + m.replace("_", "-") for m in RESUME_MUTABLE[2:]) + "; --ae and --data may point elsewhere if they hold the same encoder and data (checked). Any other difference is refused.")
    a = p.add_argument
    a("--ae", required=True, help="train_ae.py run folder (or its checkpoint/); its encoder/ (frozen) makes the banks")
    a("--data", default=None, help="dataprep/data.py cache folder (default: the one recorded in the AE run's args.json)")
    a("--out-dir", "--out", dest="out_dir", required=True, help="run folder to write (see the module docstring)")
    a("--resume", action="store_true", help="continue exactly from OUT/train_state")
    a("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a("--stop-at", type=int, default=None, help="save and stop after this step without changing the LR schedule "
      "(split a run into jobs; continue with --resume)")
    # model
    a("--preset", choices=sorted(PRESETS), default="tiny",
      help="DiT size and optimisation: tiny (64 wide, 2 blocks; CPU minutes) or paper (App. E: 28 blocks, ~409M "
           "unconditional; AdamW lr 1e-4, wd 0, EMA 0.9999, batch 256, 100k steps, bf16: our choice after DiT, the "
           "paper states none)")
    a("--hidden-size", type=int, default=None, help="override the preset's DiT width")
    a("--depth", type=int, default=None, help="override the preset's number of DiT blocks")
    a("--num-heads", type=int, default=None, help="override the preset's attention heads")
    a("--num-registers", type=registers_arg, default=8, help="K: the first K registers of each bank are modelled; "
      "'all' = every register of the encoder (the paper's latent is 1024 x 128; the demasker then reads the first k "
      "at sampling). Default 8 (paper: 8 of 128 for generation at L = 512, App. G (i))")
    a("--conditional", action="store_true", help="train P(z | h(x^(r))) for ConWithinDisc (Alg. 4)")
    a("--cond-registers", type=int, default=None,
      help="registers of h(x^(r)) the conditional DiT cross-attends to (default: --num-registers)")
    a("--train-cond-encoder", action="store_true",
      help="train a second encoder h_mu (initialised from h_phi) on x^(r) jointly with the DiT (comment (iii))")
    a("--max-offset", type=float, default=0.2,
      help="App. E block offset of the last register block (blocks get 0 .. max-offset, linearly; our choice)")
    a("--no-block-offsets", action="store_true", help="ablation (App. G (iii)): every register at the same time")
    # optimization (names and meaning as train_ae.py; get_lr / make_optimizer are shared)
    a("--max-steps", "--steps", dest="max_steps", type=int, default=None, help="optimizer steps (tiny 2000, "
      "paper 100000)")
    a("--global-batch-size", type=int, default=None, help="register banks per optimizer step over all ranks "
      "(tiny 64, paper 256)")
    a("--micro-batch-size", type=int, default=None, help="banks per forward per rank (default: global batch / "
      "world size, no accumulation)")
    a("--lr", type=float, default=None, help="peak AdamW learning rate (tiny 1e-3; paper 1e-4, as DiT/PixArt)")
    a("--min-lr-ratio", type=float, default=None, help="final LR of the cosine decay as a fraction of --lr (0.1)")
    a("--warmup-steps", type=int, default=None, help="linear LR warm-up steps (tiny 100, paper 1000)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay on matrices (0, as DiT; PixArt: 0.03)")
    a("--grad-clip", type=float, default=None, help="clip the global gradient norm to this (1.0; 0 = off)")
    a("--ema-decay", type=float, default=None, help="EMA decay of the sampling weights (tiny 0.999, paper 0.9999 "
      "as DiT/PixArt); the effective decay is min(this, (1 + step) / (10 + step))")
    a("--seed", type=int, default=0, help="seeds the init, the data order and every noise / mask draw")
    # validation and logging
    a("--eval-interval", type=int, default=250, help="validate every N steps and at the end (0 = only at the end)")
    a("--val-examples", type=int, default=256, help="held-out register banks used for validation")
    a("--log-interval", type=int, default=25, help="write a train record to log.jsonl every N steps")
    a("--save-interval", type=int, default=500, help="checkpoint every N steps (and at the end)")
    # banks and systems
    a("--bank-cache", default=None, help="register bank folder (default: <ae>/register_banks)")
    a("--bank-batch-size", type=int, default=64, help="programs per encoder call when building banks")
    a("--amp", choices=["none", "bf16"], default=None, help="bf16 autocast for the forward (weights stay fp32; "
      "tiny none, paper bf16)")
    a("--compile", action="store_true", help="torch.compile each DiT block")
    a("--device", default=None, help="cpu / cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    a("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default); 1 is faster for tiny "
      "models on a busy machine")
    a("--quiet", action="store_true", help="no progress bar or validation lines")
    a("--max-bad-steps", type=int, default=guards.DEFAULT_MAX_BAD_STEPS, help="stop with an error after this many "
      "consecutive steps with a NaN/inf loss or gradient norm (each is skipped: no update, no EMA, no checkpoint)")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    saved_path = Path(args.out_dir) / "args.json"
    saved = guards.read_run_record(p, saved_path) if args.resume and saved_path.is_file() else None
    if saved is not None:  # the run's flags become the defaults; explicit changes are refused below
        p.set_defaults(**{key: value for key, value in saved.items() if key not in NOT_INHERITED})
        args = p.parse_args(argv)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.num_registers == "all":
        args.num_registers = encoder_registers(p, args.ae)
    args.cond_registers = args.cond_registers or args.num_registers
    if args.train_cond_encoder and not args.conditional:
        p.error("--train-cond-encoder needs --conditional")
    check_numbers(p, args)
    if saved is not None:
        guards.refuse_changed_resume_flags(p, saved, args, RESUME_MUTABLE, Path(args.out_dir), RESUME_MUTABLE[2:])
    return args


def registers_arg(text):
    """--num-registers: a count, or 'all' (resolved against the AE run's encoder in parse_args)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'all', got {text!r}") from None


def encoder_registers(p, ae):
    """K of the AE run's encoder (its config.json), for --num-registers all."""
    try:
        return int(C.read_json(resolve_ae(ae) / "encoder" / "config.json", "encoder config")["num_registers"])
    except (FileNotFoundError, C.CheckpointError, KeyError) as error:
        p.error(f"--num-registers all: cannot read the encoder's K from --ae {ae} ({error})")


def check_numbers(p, args):
    """Every count and rate up front, naming the flag and its valid range (parser.error, exit 2)."""
    r = functools.partial(guards.check_range, p, args)
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "num_registers", "cond_registers",
                 "hidden_size", "depth", "num_heads", "val_examples", "log_interval", "save_interval",
                 "bank_batch_size", "stop_at", "max_bad_steps"):
        r(name, low=1, integer=True)
    for name in ("warmup_steps", "eval_interval", "threads"):
        r(name, low=0, integer=True)
    r("lr", low=0, low_open=True)
    r("min_lr_ratio", low=0, high=1)
    r("weight_decay", low=0)
    r("grad_clip", low=0)
    r("ema_decay", low=0, high=1, high_open=True)
    r("max_offset", low=0, high=1, high_open=True)
    if args.hidden_size and args.num_heads and args.hidden_size % args.num_heads:
        p.error(f"--hidden-size {args.hidden_size} must be divisible by --num-heads {args.num_heads}")
