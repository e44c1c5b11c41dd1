"""The command line of train_ae.py: flags, the tiny / paper presets, number checks and the --resume rules.

Presets. tiny: the tiny() configs with ids from our BPE, AdamW lr 3e-3, 100 warmup steps, global batch 32, no
encoder warm-up. paper: App. C's AdamW lr 2.5e-5, wd 0.1, global batch 512, 4000 encoder warm-up steps, 3 epochs,
K = 128, FSDP2 in bf16 (train_ae.py's docstring has the reasons); the base MDM (--no-registers) from LLaDA-8B-Base,
the guided run from Qwen3-Embedding-0.6B and the base MDM run (--from-base BASE, required: the paper's recipe),
re-warming the LR over 500 steps when the demasker unfreezes (--rewarm-steps, our choice).

Every number is checked before any work (guards.check_range: argparse's message naming the flag and the valid
range, exit status 2). On --resume the run's recorded flags (OUT/checkpoint/args.json) become the defaults, and
an explicit flag outside RESUME_MUTABLE that differs from the record is refused with the list of differences.
"""

import argparse
import functools
from pathlib import Path

import torch

from infra import checkpoint as C
from infra import guards
from infra.run_folder import OVERWRITE_HELP
from training.ae_run import CHECKPOINT  # OUT/checkpoint
from dataprep.data import SPECIAL_TOKENS
from demasker import CADD_SCHEDULES, CADD_TABLES

# flags that may change on --resume (the rest would change the model, the data or the objective, and are refused):
# the stop point and LR horizon, logging / validation / saving, systems (same global batch: same batches, same
# draws; only float summation order changes), the divergence limit, and where the (content-checked) data lives
RESUME_MUTABLE = ("resume", "out_dir", "stop_at", "max_steps", "epochs", "eval_interval", "val_programs", "val_keep",
                  "log_interval", "save_interval", "threads", "device", "dtype", "parallel", "compile",
                  "activation_checkpointing", "micro_batch_size", "max_bad_steps", "data")
NOT_INHERITED = ("resume", "stop_at", "out_dir", "overwrite")  # flags of one invocation, not of the run

PRESETS = {
    "tiny": dict(seq_len=128, vocab_size=2048, num_registers=8, lr=3e-3, min_lr_ratio=0.1, weight_decay=0.1,
                 warmup_steps=100, global_batch_size=32, micro_batch_size=32, max_steps=2000, epochs=None,
                 encoder_warmup_steps=0, rewarm_steps=0, encoder_init=None, demasker_init=None, tokenizer=None,
                 encoder_tokenizer=None, parallel="ddp", activation_checkpointing=False, keep_distribution="uniform"),
    "paper": dict(seq_len=4096, vocab_size=None, num_registers=128, lr=2.5e-5, min_lr_ratio=0.1, weight_decay=0.1,
                  warmup_steps=500, global_batch_size=512, micro_batch_size=2, max_steps=None, epochs=3,
                  encoder_warmup_steps=4000, rewarm_steps=500, encoder_init="Qwen/Qwen3-Embedding-0.6B",
                  demasker_init="GSAI-ML/LLaDA-8B-Base", tokenizer="GSAI-ML/LLaDA-8B-Base",
                  encoder_tokenizer="Qwen/Qwen3-Embedding-0.6B", parallel="fsdp", activation_checkpointing=True,
                  keep_distribution="geometric"),
}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Robust encoder-demasker training (paper Sec. 4.1, Algorithm 1, App. C, App. D), and the base MDM.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags left unset take the --preset value (tiny or paper); see the module "
                                       "docstring for the mapping to Algorithm 1. On --resume, flags left unset take "
                                       "the run's recorded values, and only these may change: " + ", ".join(
                                           "--" + name.replace("_", "-") for name in RESUME_MUTABLE[2:]) + "; any other "
                                       "difference is refused.")
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="tiny", help="default hyper-parameters: tiny (CPU minutes) or "
      "paper (App. C: Qwen3-Embedding-0.6B + LLaDA-8B-Base, lr 2.5e-5, wd 0.1, batch 512, 4000 warm-up steps)")
    a("--out-dir", default="runs/ae", help="run folder: checkpoint/, log.jsonl, args.json")
    a("--resume", action="store_true", help="continue exactly from OUT/checkpoint (same batches, same random draws); "
      "unset flags take the run's values, changed model/data/objective flags are refused (see the end of --help)")
    a("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a("--stop-at", type=int, default=None, help="save and stop after this step without changing the LR schedule "
      "(split a run into jobs; continue with --resume)")
    a("--no-registers", action="store_true", help="train the base MDM f_theta(x_t) without encoder (the baseline)")
    # data
    a("--data", default=None, help="dataprep/data.py cache folder (built here if missing; default data_cache/<corpus>-L-V)")
    a("--corpus", default=None, help="folder of .py files or JSONL of {'text': ...} (default: the Python stdlib)")
    a("--seq-len", type=int, default=None, help="L, tokens per program incl. BOS/EOS (tiny 128, paper 4096)")
    a("--vocab-size", type=int, default=None, help="BPE vocabulary trained by dataprep/data.py when no --tokenizer (tiny 2048)")
    a("--tokenizer", default=None, help="demasker tokenizer.json / hub id (paper: GSAI-ML/LLaDA-8B-Base)")
    a("--encoder-tokenizer", default=None, help="encoder tokenizer (paper: Qwen/Qwen3-Embedding-0.6B); "
      "default shared with the demasker")
    a("--overlong", choices=["cut", "drop"], default="drop", help="programs longer than L: cut or drop (dataprep/data.py)")
    # models
    a("--encoder-init", default=None, help="encoder weights: hub id or folder (public Qwen3 or ours); default scratch")
    a("--demasker-init", default=None, help="demasker weights: hub id or folder (public LLaDA or ours, e.g. a "
      "trained base MDM's checkpoint/demasker, as the paper builds on its base model); default scratch (paper "
      "preset: GSAI-ML/LLaDA-8B-Base for the base MDM run)")
    a("--from-base", default=None, metavar="RUN", help="start the guided demasker from the base MDM run RUN (a "
      "train_ae.py --no-registers --out-dir, or its checkpoint/): = --demasker-init RUN/checkpoint. The paper's "
      "recipe: the guided demasker starts from the Python-fine-tuned base MDM (scripts/reproduce.sh AE_FROM_BASE=1); the "
      "paper preset with registers requires --from-base or an explicit --demasker-init")
    a("--num-registers", type=int, default=None, help="K, registers per program (tiny 8, paper 128)")
    a("--encoder-width", type=int, default=None, help="scratch encoder width d (default EncoderConfig.tiny: 64)")
    a("--encoder-layers", type=int, default=None, help="scratch encoder depth (default 2)")
    a("--demasker-width", type=int, default=None, help="scratch demasker width (default DemaskerConfig.tiny: 64)")
    a("--demasker-layers", type=int, default=None, help="scratch demasker depth (default 2)")
    # Alg. 1 / App. C-D
    a("--all-mask-prob", type=float, default=None, help="App. C all-mask utilisation: P(x_t fully masked) "
      "(default 0.25 with registers; 0 for --no-registers, where an all-[M] input carries no information)")
    a("--latent-cos", type=float, default=0.8, help="App. D robust noise: target CS(z_0, z_0 + e); 1 = no noise")
    a("--nested-dropout", action=argparse.BooleanOptionalAction, default=True,
      help="App. C nested dropout k ~ U{1..K} (--no-nested-dropout: always all K registers)")
    a("--keep-distribution", choices=["uniform", "geometric"], default=None,
      help="how nested dropout draws k: uniform over {1..K} (App. C's text; tiny preset) or uniform over the "
           "levels {1, 2, 4, ..., K} (App. E's geometric grouping, shared with the prior's register blocks; paper "
           "preset). schedules.sample_keep_levels")
    a("--encoder-warmup-steps", type=int, default=None, help="App. C staging: steps with the pretrained demasker "
      "frozen; the encoder and the new conditioning interface (register projection, START, END) train (tiny 0, "
      "paper 4000)")
    a("--rewarm-steps", type=int, default=None, help="re-warm the LR linearly over N steps when the demasker "
      "unfreezes after --encoder-warmup-steps (its AdamW moments start at zero); 0 = off (tiny 0, paper 500: our "
      "choice, the paper states none)")
    a("--register-dropout", type=float, default=0.0, help="register guidance: P(every register of an "
      "example is withheld: register_mask all False, the demasker sees only [START, END]), the null branch that "
      "sampling's guidance weight w extrapolates from (logits_null + w (logits_guided - logits_null)); 0 = off")
    a("--pad-eos-weight", type=float, default=1.0, help="loss weight of the EOS padding after a program's first EOS "
      "(ours): 1 = LLaDA (every position scored, as its SFT scores the EOS padding of answers); below 1 the "
      "padding, which dominates the targets of short programs, counts less; 0 = not scored (the first EOS always is)")
    a("--cadd", action="store_true", help="CADD beside CRoCoDiL (extensions/cadd.py; beyond the paper): every [M] position also gets "
      "a continuous latent z_t ~ N(sqrt(gamma_bar_t) w(x_0), (1 - gamma_bar_t) I) from the demasker's own embedding "
      "table w, added to E([M]); CE-only loss (the same as the base MDM). Works with and without registers; the "
      "demasker's config.json records the settings (sample with cadd.cadd_generate / eval.py cadd)")
    a("--cadd-schedule", choices=CADD_SCHEDULES, default="linear", help="with --cadd: gamma_bar_t over the mask ratio "
      "t: linear 1 - t (CADD's choice) or cosine 1 - cos(pi/2 (1 - t)), clipped to [1e-4, 1 - 1e-4]")
    a("--cadd-table", choices=CADD_TABLES, default="own", help="with --cadd: the latent table w is the demasker's own "
      "embedding, trained through the latents too (own), or the same values detached (frozen)")
    # optimization
    a("--lr", type=float, default=None, help="peak AdamW learning rate (tiny 3e-3, paper 2.5e-5)")
    a("--min-lr-ratio", type=float, default=None, help="final LR of the cosine decay as a fraction of --lr (0.1)")
    a("--warmup-steps", type=int, default=None, help="linear LR warm-up steps (tiny 100, paper 500: our choice)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay on matrices (0.1)")
    a("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this")
    a("--global-batch-size", type=int, default=None, help="programs per optimizer step over all ranks (tiny 32, "
      "paper 512); reached by gradient accumulation")
    a("--micro-batch-size", type=int, default=None, help="programs per forward per rank (tiny 32, paper 2)")
    a("--max-steps", type=int, default=None, help="optimizer steps (tiny 2000); default from --epochs")
    a("--epochs", type=float, default=None, help="passes over the train split when --max-steps is unset (paper 3)")
    a("--seed", type=int, default=0, help="seeds init, data order and every per-example random draw")
    # systems
    a("--device", default=None, help="cpu / cuda (default: cuda:LOCAL_RANK if available, else cpu)")
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="compute precision: bf16 autocast (FSDP2: bf16 params, fp32 reduce); auto = bf16 on CUDA GPUs that "
           "support it, fp32 on CPU. Weights and AdamW states stay fp32")
    a("--parallel", choices=["ddp", "fsdp"], default=None, help="under torchrun: DDP (tiny) or FSDP2 (paper)")
    a("--fsdp", dest="parallel", action="store_const", const="fsdp", help="= --parallel fsdp")
    a("--ddp", dest="parallel", action="store_const", const="ddp", help="= --parallel ddp")
    a("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
      help="recompute each block in backward (paper preset: on)")
    a("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default, one per core); 1 is "
      "faster for tiny models on a busy machine")
    a("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile each block")
    # logging
    a("--eval-interval", type=int, default=500, help="validate every N steps and at the end (0 = never)")
    a("--val-programs", type=int, default=256, help="validation programs used (Fig. 4 uses 1000)")
    a("--val-keep", type=lambda s: [int(k) for k in s.split(",")], default=None,
      help="comma list of register counts k to validate with (default: all K)")
    a("--log-interval", type=int, default=10, help="write a train record to log.jsonl every N steps")
    a("--save-interval", type=int, default=1000, help="checkpoint every N steps (and at the end)")
    a("--max-bad-steps", type=int, default=guards.DEFAULT_MAX_BAD_STEPS, help="stop with an error after this many "
      "consecutive steps with a NaN/inf loss or gradient norm (each is skipped: no update, no checkpoint)")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out-dir and --overwrite replaces it: pass one of them")
    saved = resume_defaults(p, args, argv)
    if saved is not None:
        args = p.parse_args(argv)
    resolve_init_flags(p, args)
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.no_registers and args.register_dropout:
        p.error("--register-dropout withholds registers; the base MDM (--no-registers) has none")
    if args.no_registers:
        args.encoder_init = None  # the preset's encoder is not used (checked explicit flags in resolve_init_flags)
    if args.all_mask_prob is None:
        args.all_mask_prob = 0.0 if args.no_registers else 0.25
    if args.dtype == "auto":
        args.dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    if args.max_steps is None and args.epochs is None:
        p.error("set --max-steps or --epochs")
    check_numbers(p, args)
    if saved is not None:
        guards.refuse_changed_resume_flags(p, saved, args, RESUME_MUTABLE, Path(args.out_dir) / CHECKPOINT,
                                           RESUME_MUTABLE[2:])
    return args


def resolve_init_flags(p, args):
    """Before the preset fills unset flags: --from-base becomes --demasker-init RUN/checkpoint; --no-registers
    takes no encoder (an explicit --encoder-init is an error, the paper preset's Qwen3 is dropped: the base MDM
    is LLaDA-8B-Base fine-tuned alone; the encoder tokenizer stays, so both runs share one data cache); the
    paper preset's guided run must say where its demasker starts (the paper: the Python-fine-tuned base MDM)."""
    if args.no_registers:
        if args.encoder_init:
            p.error("--no-registers trains the base MDM alone; drop --encoder-init")
        if args.from_base:
            p.error("--from-base starts a guided demasker from a base MDM run; drop it with --no-registers")
    if args.from_base and not (args.resume and args.demasker_init):  # a resumed run keeps its recorded init
        base = Path(args.from_base)
        folder = base / CHECKPOINT if (base / CHECKPOINT / "demasker").is_dir() else base
        if args.demasker_init not in (None, str(folder)):
            p.error(f"--from-base {args.from_base} and --demasker-init {args.demasker_init} both set; give one")
        if not args.resume and not (folder / "demasker" / "config.json").is_file():
            p.error(f"--from-base {args.from_base}: no base MDM checkpoint there (expected {folder}/demasker/); "
                    f"train it first: python train_ae.py --no-registers --out-dir {args.from_base} ...")
        args.demasker_init = str(folder)
    if args.preset == "paper" and not args.no_registers and args.demasker_init is None:
        p.error("--preset paper trains the guided demasker from the Python-fine-tuned base MDM, as the paper does: "
                "first `train_ae.py --preset paper --no-registers --out-dir BASE`, then pass --from-base BASE "
                "(or --demasker-init GSAI-ML/LLaDA-8B-Base to start from the public model, a departure)")


def resume_defaults(p, args, argv):
    """--resume: the run's recorded flags (OUT/checkpoint/args.json) become the parser's defaults (all but
    NOT_INHERITED: a resumed run keeps its data folder, schedule and intervals unless told otherwise); returns
    them (None when not resuming or nothing is recorded)."""
    if not args.resume:
        return None
    folder = C.find_folder(Path(args.out_dir) / CHECKPOINT)
    path = folder / "args.json" if (folder / "args.json").is_file() else Path(args.out_dir) / "args.json"
    if not path.is_file():
        return None
    saved = guards.read_run_record(p, path)  # a hand-edited record: parser.error naming the file, entry and fix
    p.set_defaults(**{key: value for key, value in saved.items() if key not in NOT_INHERITED})
    return saved


def check_numbers(p, args):
    """Every count, rate and size up front, with the flag and its valid range (parser.error, exit 2)."""
    r = functools.partial(guards.check_range, p, args)
    for name in ("max_steps", "global_batch_size", "micro_batch_size", "num_registers", "encoder_layers",
                 "demasker_layers", "val_programs", "log_interval", "save_interval", "stop_at", "max_bad_steps"):
        r(name, low=1, integer=True)
    for name in ("warmup_steps", "encoder_warmup_steps", "rewarm_steps", "eval_interval", "threads"):
        r(name, low=0, integer=True)
    r("seq_len", low=3, integer=True)  # BOS, at least one program token, EOS
    r("vocab_size", low=len(SPECIAL_TOKENS) + 1, integer=True)  # a BPE above its 4 specials
    r("epochs", low=0, low_open=True)
    r("lr", low=0, low_open=True)
    r("grad_clip", low=0, low_open=True)
    r("min_lr_ratio", low=0, high=1)
    r("weight_decay", low=0)
    r("all_mask_prob", low=0, high=1)
    r("register_dropout", low=0, high=1)
    r("pad_eos_weight", low=0, high=1)
    r("latent_cos", low=0, high=1, low_open=True)
    r("val_keep", low=1, high=args.num_registers, integer=True)
    for name in ("encoder_width", "demasker_width"):
        width = getattr(args, name)
        if width is not None and not (width == 16 or (width >= 32 and width % 32 == 0)):
            p.error(f"--{name.replace('_', '-')} must be 16 or a multiple of 32 (heads of 32), got {width}")
