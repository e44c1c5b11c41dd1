"""The command line of sample.py: flags and the checks made before any model is loaded.

Every flag of every decoder (paper arXiv 2603.20210): --method base (the LLaDA baseline, Sec. 5), autoencode
(Alg. 6), conthendisc / conwithindisc (Alg. 2, 3; priors from train_prior.py), the decoding rules of mdm.py
(LLaDA's fixed schedule, confidence threshold, Fast-dLLM's factor), register guidance, and --prompt / --infill
(App. H; extensions/prompting.py). check_numbers refuses a bad number or flag combination with argparse's
message naming the flag (exit status 2); --prompt-file is read into --prompt here.
"""

import argparse
import os

import torch

from mdm import REMASKING, RULES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Decode programs with the masked diffusion sampler (LLaDA generate). "
                    "base: the unguided MDM from an all-[M] start; autoencode: encode held-out programs with "
                    "h_phi and decode them with the guided MDM (Alg. 6), printing the CER.")
    parser.add_argument("--ckpt", "--ae", dest="ckpt", required=True,
                        help="train_ae.py output folder (demasker/, encoder/, tokenizer.json)")
    parser.add_argument("--method", choices=["base", "autoencode", "conthendisc", "conwithindisc"], default="base",
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
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    return args


def check_numbers(parser, args):
    """Every number checked before any model is loaded or file written (parser.error names the flag)."""
    at_least_one = ("num", "batch_size", "gen_length", "block_length", "steps", "prior_steps", "refresh_prior_steps",
                    "keep", "trace_samples", "span_tokens")
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
    if args.cfg_scale > 0 and args.prompt is None:
        parser.error("--cfg-scale guides on a prompt: pass --prompt or --prompt-file")
    if not args.factor > 0:
        parser.error(f"--factor must be > 0, got {args.factor}")
    for fraction in args.refresh_at or []:
        if not 0 <= fraction < 1:
            parser.error(f"--refresh-at fractions must lie in [0, 1) (0 = no refresh), got {fraction}")
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out} is a folder; pass a .jsonl file path")
    if sum(x is not None for x in (args.prompt, args.prompt_file, args.infill)) > 1:
        parser.error("pass one of --prompt, --prompt-file and --infill")
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            parser.error(f"--prompt-file {args.prompt_file} does not exist; pass a text file holding the prompt")
        with open(args.prompt_file, encoding="utf-8") as handle:
            args.prompt = handle.read()
    if (args.prompt is not None or args.infill is not None) and args.method == "autoencode":
        parser.error("--prompt / --infill decode a canvas with fixed tokens: use --method base, conthendisc or "
                     "conwithindisc")
    if args.prompt is not None and not args.prompt.strip():
        parser.error("the prompt is empty; pass a function signature and docstring, e.g. --prompt "
                     "'def add(a, b):\n    \"\"\"Return a + b.\"\"\"'")
