"""The command line of sample.py: flags and the checks made before any model is loaded.

Every flag of every decoder (paper arXiv 2603.20210): --method base (the LLaDA baseline, Sec. 5), autoencode
(Alg. 6), conthendisc / conwithindisc (Alg. 2, 3; priors from train_prior.py), the decoding rules of mdm.py
(LLaDA's fixed schedule, confidence threshold, Fast-dLLM's factor), register guidance, and --prompt / --infill
(App. H; extensions/prompting.py), and --cadd-* for a CADD checkpoint (train_ae.py --cadd; extensions/cadd.py).
check_numbers refuses a bad number or flag combination with argparse's message naming the flag (exit status 2);
--prompt-file is read into --prompt here. APPLIES says which run each flag acts on: a flag set on the command line
where it does not act is refused (`unused_flags`; the CADD rows once the checkpoint is read, `check_run`), and
`used` gives a flag's value only where it acts (the records name only the inputs a run used). `check_guidance`
refuses --guidance on a demasker whose recorded training had no register dropout (an untrained null branch);
`check_priors` refuses a prior whose record carries no encoder fingerprint or another tokenizer layout than the
autoencoder's. --prompt-file is read as UTF-8 (a byte that is not is named with its line); --out / --trace must be
writable locations (`output_problem`).
"""

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.atomic import read_json
from infra.run_folder import location_problem, path_kind
from mdm import REMASKING, RULES

METHODS = ("base", "autoencode", "conthendisc", "conwithindisc")
GUIDED = ("conthendisc", "conwithindisc")    # registers from a prior
REGISTERS = ("autoencode",) + GUIDED         # the methods whose demasker reads registers
CANVAS = ("base",) + GUIDED                  # the methods that decode a --prompt / --infill canvas
PLAIN, PROMPT, INFILL = ("plain",), ("prompt",), ("infill",)  # the mode: no fixed tokens, --prompt(-file), --infill
MODES = PLAIN + PROMPT + INFILL


@dataclass(frozen=True)
class Where:
    """Runs a flag acts on: each field the allowed values (None: any). trace: only with --trace; cadd: True
    only on a CADD checkpoint, False never on one (None before the checkpoint is read counts as either)."""
    methods: tuple = None
    modes: tuple = None
    rules: tuple = None
    trace: bool = None
    cadd: bool = None

    def holds(self, run):
        return ((self.methods is None or run["method"] in self.methods)
                and (self.modes is None or run["mode"] in self.modes)
                and (self.rules is None or run["rule"] in self.rules)
                and (self.trace is None or run["trace"] == self.trace)
                and (self.cadd is None or run["cadd"] is None or run["cadd"] == self.cadd))


_CADD = ("a CADD checkpoint (train_ae.py --cadd) with --method base", Where(("base",), PLAIN, cadd=True))
_CANVAS = ("--method base / conthendisc / conwithindisc on a non-CADD checkpoint", Where(CANVAS, cadd=False))
_REGISTERS = "--method autoencode / conthendisc / conwithindisc (a demasker reading registers)"
# flag: (where it acts, in words; the runs it acts on). Flags not listed act on every run.
APPLIES = {
    "--threshold": ("--decoding threshold", Where(rules=("threshold",))),
    "--factor": ("--decoding factor", Where(rules=("factor",))),
    "--data": ("--method autoencode", Where(("autoencode",))),
    "--keep": (_REGISTERS, Where(REGISTERS)),
    "--guidance": (_REGISTERS, Where(REGISTERS)),
    "--prior": ("--method conthendisc / conwithindisc without --prompt / --infill", Where(GUIDED, PLAIN)),
    "--cond-prior": ("--method conwithindisc, or --infill with --method conthendisc / conwithindisc",
                     Where(("conwithindisc",), PLAIN), Where(GUIDED, INFILL)),
    "--prior-steps": ("--method conthendisc / conwithindisc without --infill (its draw takes --refresh-prior-steps)",
                      Where(GUIDED, PLAIN + PROMPT)),
    "--refresh-at": ("--method conwithindisc without --infill", Where(("conwithindisc",), PLAIN + PROMPT)),
    "--refresh-prior-steps": ("--method conwithindisc, or --infill with --method conthendisc / conwithindisc",
                              Where(("conwithindisc",), PLAIN + PROMPT), Where(GUIDED, INFILL)),
    "--block-length": ("a run without --prompt / --infill (their canvas is one block)", Where(modes=PLAIN)),
    "--prompt": _CANVAS, "--prompt-file": _CANVAS, "--infill": _CANVAS,
    "--prompted-prior": ("--prompt with --method conthendisc / conwithindisc", Where(GUIDED, PROMPT)),
    "--cfg-scale": ("--prompt / --prompt-file", Where(modes=PROMPT)),
    "--span-tokens": ("--infill", Where(modes=INFILL)),
    "--trace-samples": ("--trace", Where(trace=True)),
    "--cache": ("a non-CADD checkpoint (the CADD sampler has no key/value cache)", Where(cadd=False)),
    "--cadd-softness": _CADD, "--cadd-latents": _CADD, "--cadd-posterior-noise": _CADD,
}


def run_of(args, cadd=None):
    """The run as APPLIES reads it: method, mode, decoding rule, --trace, CADD checkpoint (None: not read yet)."""
    mode = "infill" if args.infill is not None else "prompt" if args.prompt is not None else "plain"
    return {"method": args.method, "mode": mode, "rule": args.decoding, "trace": args.trace is not None,
            "cadd": cadd}


def applies(flag, run):
    return any(where.holds(run) for where in APPLIES[flag][1:])


def used(args, flag, cadd=None):
    """The value of `flag` where it acts on this run, else None (what a record may name)."""
    return getattr(args, flag[2:].replace("-", "_")) if applies(flag, run_of(args, cadd)) else None


def unused_flags(args, cadd=None):
    """One message per flag set on the command line (args.explicit) that does not act on this run."""
    run = run_of(args, cadd)
    here = ", ".join([f"--method {run['method']}"] + {"plain": [], "prompt": ["--prompt"], "infill": ["--infill"]}[
        run["mode"]] + [f"--decoding {run['rule']}"] + (["a CADD checkpoint"] if cadd else []))
    return [f"{flag} applies to {APPLIES[flag][0]} (this run: {here}); use that or drop {flag}"
            for flag in APPLIES if flag in getattr(args, "explicit", ()) and not applies(flag, run)]


def check_run(args, cadd):
    """After the checkpoint is read: a CADD checkpoint is sampled by --method base only, and no flag set on the
    command line may be one that does not act on this run (SystemExit naming it)."""
    if cadd and args.method != "base":
        raise SystemExit(f"sample.py: error: this demasker is a CADD demasker (train_ae.py --cadd): sample.py samples "
                         f"it with --method base (CADD's sampler, extensions/cadd.py), not --method {args.method}")
    problems = unused_flags(args, cadd)
    if problems:
        raise SystemExit("sample.py: error: " + "; ".join(problems))


def recorded_args(ckpt):
    """The training flags a train_ae.py run recorded (args.json of the checkpoint or of its run), or None."""
    folder = Path(ckpt)
    for candidate in (folder / "checkpoint" / "args.json", folder / "args.json"):
        if candidate.is_file():
            return read_json(candidate, "restore it from the run, or delete it to sample without the check")
    return None


def check_guidance(args):
    """--guidance w != 1 mixes in the null branch (every register withheld), which only a demasker trained with
    train_ae.py --register-dropout p > 0 has learned: refused when the run recorded 0, a warning when unrecorded."""
    if args.guidance == 1 or args.method not in REGISTERS:
        return
    recorded = recorded_args(args.ckpt) or {}
    if "register_dropout" not in recorded:
        print(f"sample.py: warning: {args.ckpt} records no --register-dropout (args.json); --guidance {args.guidance} "
              f"needs a demasker trained with train_ae.py --register-dropout > 0 (its null branch)", file=sys.stderr)
    elif not recorded["register_dropout"]:
        raise SystemExit(f"sample.py: error: this demasker was trained with --register-dropout "
                         f"{recorded['register_dropout']:g}: its null branch is untrained; retrain with "
                         f"--register-dropout 0.1 or drop --guidance")


def check_priors(args):
    """The provenance of --prior / --cond-prior (those this run uses), from their prior.json before anything is
    loaded: the record must carry the fingerprint of the autoencoder's encoder (generators.load_prior compares it
    with --ckpt's; without one nothing shows which registers the prior samples), and its tokenizer layout (one
    shared tokenizer, or the encoder's own) must be the autoencoder run's. SystemExit naming the file and the fix."""
    from generators import PRIOR_SETTINGS_FILE, _ae_checkpoint

    ae = _ae_checkpoint(args.ckpt)
    for flag in ("--prior", "--cond-prior"):
        folder = used(args, flag)
        record = Path(folder) / PRIOR_SETTINGS_FILE if folder else None
        if record is None or not record.is_file():
            continue  # not used here, or not a prior folder (load_prior names the problem)
        retrain = f"train a prior on this autoencoder: train_prior.py --ae {args.ckpt} --out-dir NEW_FOLDER"
        try:
            settings = read_json(record, retrain)
        except ValueError as error:
            raise SystemExit(f"sample.py: error: {flag} {folder}: {error}") from None
        if not isinstance(settings, dict) or not settings.get("encoder_fingerprint"):
            raise SystemExit(f"sample.py: error: {record} records no encoder_fingerprint, so nothing shows that {flag} "
                             f"{folder} was trained on the registers of --ckpt {args.ckpt}'s encoder (a prior of another "
                             f"autoencoder decodes to garbage); {retrain}")
        shared, ours = settings.get("shared_tokenizer", True), not (ae / "encoder_tokenizer.json").is_file()
        if (ae / "encoder").is_dir() and bool(shared) != ours:
            layout = {True: "one tokenizer shared by encoder and demasker", False: "an encoder with its own tokenizer"}
            raise SystemExit(f"sample.py: error: {flag} {folder} was trained with {layout[bool(shared)]} ({record}: "
                             f"shared_tokenizer {str(bool(shared)).lower()}), but --ckpt {args.ckpt} has "
                             f"{layout[ours]}: it belongs to another autoencoder run; pass that run, or {retrain}")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Decode programs with the masked diffusion sampler (LLaDA generate). "
                    "base: the unguided MDM from an all-[M] start; autoencode: encode held-out programs with "
                    "h_phi and decode them with the guided MDM (Alg. 6), printing the CER.")
    parser.add_argument("--ckpt", "--ae", dest="ckpt", required=True,
                        help="train_ae.py output folder (demasker/, encoder/, tokenizer.json)")
    parser.add_argument("--method", choices=METHODS, default="base",
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
    parser.add_argument("--data", default=None, help="data cache folder (dataprep/data.py) holding the validation split; "
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
    parser.add_argument("--decoding", choices=RULES, default="fixed",
                        help="how many tokens each step reveals: fixed (LLaDA: steps split evenly), threshold "
                             "(every [M] whose confidence >= --threshold, at least one) or factor (Fast-dLLM's rule "
                             "with --factor); the adaptive rules ignore --steps and report NFE per sample")
    parser.add_argument("--threshold", type=float, default=0.9, help="tau of --decoding threshold (>= 0)")
    parser.add_argument("--factor", type=float, default=1.0, help="f of --decoding factor (> 0)")
    parser.add_argument("--rng", choices=["fast", "llada"], default="fast",
                        help="fast: draw tokens only at the masked candidates (same distribution); llada: "
                             "LLaDA's full float64 Gumbel draw, token-exact with its generate() for a seed")
    parser.add_argument("--guidance", type=float, default=1.0, help="register guidance weight w: logits = null + "
                        "w (guided - null), the null bank = every register withheld (1 = plain guided decoding; "
                        "a model trained with train_ae.py --register-dropout)")
    parser.add_argument("--cfg-scale", type=float, default=0.0, help="--prompt: LLaDA's classifier-free guidance, the "
                        "unconditional branch with the prompt replaced by [M]: logits = un + (s + 1)(cond - un); 0 = off")
    parser.add_argument("--cache", choices=["none", "prefix", "dual"], default="none",
                        help="approximate key/value reuse within a semi-autoregressive block (Fast-dLLM; extensions/kv_cache.py): "
                             "prefix caches the registers and finished blocks, dual also the [M] suffix; same NFE, "
                             "cheaper steps, slightly different logits. Gains only with --block-length < the length")
    parser.add_argument("--logits-eos-inf", action="store_true", help="never predict EOS (LLaDA's option)")
    parser.add_argument("--confidence-eos-eot-inf", action="store_true",
                        help="reveal EOS predictions last (acts on the choice, unlike LLaDA's flag)")
    parser.add_argument("--trace", default=None, metavar="FILE.html",
                        help="write a step-by-step trace of the first batch as one self-contained HTML page "
                             "(evaluation/decode_trace.py); samples and the random stream are unchanged")
    parser.add_argument("--trace-samples", type=int, default=2, help="samples of the first batch shown in --trace")
    parser.add_argument("--keep", type=int, default=None, help="autoencode, conthendisc, conwithindisc: the demasker "
                        "reads only the first k registers (a prior over all K: train_prior.py --num-registers all)")
    parser.add_argument("--prompt", default=None, help="App. H: a prompt (e.g. a signature + docstring) kept as the "
                        "fixed prefix of the canvas; --length is then the whole canvas, prompt included. base: the "
                        "base MDM; conthendisc / conwithindisc: registers from --prompted-prior given h_kappa(prompt)")
    parser.add_argument("--prompt-file", default=None, help="a UTF-8 text file holding the prompt (instead of --prompt)")
    parser.add_argument("--infill", default=None, metavar="TEXT", help="infilling: 'prefix<|span|>suffix' with the span "
                        "marker once; --span-tokens [M] are filled, every context token kept. base: the base MDM; "
                        "conthendisc / conwithindisc: registers from --cond-prior given the context")
    parser.add_argument("--span-tokens", type=int, default=16, help="--infill: tokens of the masked span")
    parser.add_argument("--prompted-prior", default=None, help="experiments/train_prompted.py run (App. H, Eq. 12) for --prompt "
                        "with conthendisc / conwithindisc")
    parser.add_argument("--num", type=int, default=8, help="number of programs to decode")
    parser.add_argument("--batch-size", type=int, default=8, help="programs decoded in parallel")
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed before sampling (LLaDA RNG order); "
                        "the priors' noise comes from a CPU generator seeded with it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="model dtype (default: as stored in the checkpoint)")
    parser.add_argument("--out", default=None, help="JSONL file: one record per program (text, tokens, nfe, ...)")
    parser.add_argument("--quiet", action="store_true", help="do not print the programs")
    parser.add_argument("--cadd-softness", type=float, default=0.0, help="a CADD checkpoint: the z0_hat dial, 0 = hard "
                        "w(argmax p) (mode-seeking) .. 1 = soft sum_v p_v w_v (mode-covering)")
    parser.add_argument("--cadd-latents", type=int, default=1, help="a CADD checkpoint: K latents per [M] position, "
                        "probabilities averaged (NFE counts K forward passes per step)")
    parser.add_argument("--cadd-posterior-noise", action="store_true", help="a CADD checkpoint: sample the Gaussian "
                        "posterior of the latents (mean + noise) instead of moving them to its mean")
    return parser


def parse_args(argv=None):
    """The flags (args.explicit: those set on the command line), checked before any model is loaded."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    bare = build_parser()  # the same flags without defaults: what it parses is what the command line set
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    args.explicit = {action.option_strings[0] for action in bare._actions
                     if action.option_strings and action.dest in vars(bare.parse_args(argv))}
    check_numbers(parser, args)
    return args


def output_problem(path):
    """Why `path` cannot take a file written at the end of the run (None when it can): checked before any work,
    so that a long sampling run never fails at its last line. A symlink, FIFO, device or folder at the path
    is never replaced; missing folders are created at the end, so the nearest existing one must be a
    writable folder with free space (infra/run_folder.location_problem)."""
    kind = path_kind(path)
    if kind == "folder":
        return "is a folder; pass a file path"
    if kind not in (None, "file"):
        return f"is {kind}, not a regular file, and would be replaced: remove it or pass another path"
    problem = location_problem(path)  # a file where a folder must be, a folder not writable, a full disk
    return None if problem is None else f"{problem[1]}; pass a path in a writable folder with free space"


def check_numbers(parser, args):
    """Every number checked before any model is loaded or file written (parser.error names the flag)."""
    at_least_one = ("num", "batch_size", "gen_length", "block_length", "steps", "prior_steps", "refresh_prior_steps",
                    "keep", "trace_samples", "span_tokens", "cadd_latents")
    for name in at_least_one:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not args.threshold >= 0:
        parser.error(f"--threshold must be >= 0, got {args.threshold}")
    if not args.cfg_scale >= 0:
        parser.error(f"--cfg-scale must be >= 0 (0 = off), got {args.cfg_scale}")
    if not 0 <= args.cadd_softness <= 1:
        parser.error(f"--cadd-softness must lie in [0, 1] (0 = hard, 1 = soft), got {args.cadd_softness}")
    if args.cadd_latents > 1 and args.trace is not None:
        parser.error("--trace records one canvas per sample, --cadd-latents K > 1 runs K copies of it: "
                     "drop --trace or --cadd-latents")
    if not args.factor > 0:
        parser.error(f"--factor must be > 0, got {args.factor}")
    for fraction in args.refresh_at or []:
        if not 0 <= fraction < 1:
            parser.error(f"--refresh-at fractions must lie in [0, 1) (0 = no refresh), got {fraction}")
    for flag, path in (("--out", args.out), ("--trace", args.trace)):
        if path:
            problem = output_problem(path)
            if problem:
                parser.error(f"{flag} {path} {problem}; nothing was sampled")
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.infill)) > 1:
        parser.error("pass one of --prompt, --prompt-file and --infill")
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(parser, args.prompt_file)
    problems = unused_flags(args)  # the CADD rows wait for the checkpoint (check_run)
    if problems:
        parser.error("; ".join(problems))
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; pass a function signature and docstring, e.g. --prompt "
                     "'def add(a, b):\n    \"\"\"Return a + b.\"\"\"'")


def read_prompt_file(parser, path):
    """The text of --prompt-file (UTF-8, a byte order mark dropped); parser.error naming the file, the line of a
    byte that is not UTF-8, and the fix."""
    if os.path.isdir(path):
        parser.error(f"--prompt-file {path} is a folder; pass a text file holding the prompt")
    if not os.path.isfile(path):
        parser.error(f"--prompt-file {path} does not exist; pass a text file holding the prompt")
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        parser.error(f"--prompt-file {path} cannot be read ({error.strerror}); make it readable or pass another file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        parser.error(f"--prompt-file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}); save "
                     f"it as UTF-8, or pass the prompt itself with --prompt")
