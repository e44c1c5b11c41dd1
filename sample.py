"""sample.py: the command line for every decoder of CRoCoDiL, and decoding tokens to text.

Methods (paper arXiv 2603.20210): `base` (the LLaDA baseline, Sec. 5), `autoencode` (Alg. 6: z_0 = h_phi(x_0),
then the guided MDM; prints source, reconstruction and CER), `conthendisc` / `conwithindisc` (Alg. 2, 3, the
hybrid generators of generators.py with priors trained by train_prior.py; NFE as the paper counts it).
With --prompt / --prompt-file (App. H: the prompt as the fixed prefix; ConThenDisc / ConWithinDisc with a
experiments/train_prompted.py prior) or --infill 'prefix<|span|>suffix' (the span decoded, the context fixed; registers from
the conditional prior given the context) the methods decode a canvas with fixed tokens (extensions/prompting.py).
The decoding loop itself (LLaDA's sampler, exact parity, RNG order) lives in mdm.py; its functions are
re-exported here for old imports.

    python sample.py --ckpt RUN --method base|autoencode ...        # writes JSONL; see --help
    python sample.py --method conthendisc|conwithindisc --ae RUN --prior DIR [--cond-prior DIR]
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from mdm import (REMASKING, RULES, Decoding, _model_device, _resolve_mask_id, add_gumbel_noise, autoencode,  # noqa: F401
                 check_schedule, encode_registers, generate, mdm_loop, reveal_step)  # (re-exported)
from evaluation.metrics import cer, levenshtein  # noqa: F401  (CER, Tables 1-2: moved to evaluation/metrics.py, re-exported)
from extensions.cadd import check_cadd


# ------------------------------------------------------------------------------------------------
# Decoding to text and the character error rate
# ------------------------------------------------------------------------------------------------


def program_ids(ids, eos_id, bos_id=None):
    """Token ids of one program: a leading BOS dropped, everything from the first EOS on dropped."""
    ids = [int(i) for i in ids]
    if bos_id is not None and ids and ids[0] == bos_id:
        ids = ids[1:]
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return ids


def decode_programs(tokenizer, tokens, eos_id, bos_id=None):
    """(B, L) token ids -> B strings via tokenizer.decode, each cut at its first EOS (variable lengths)."""
    rows = tokens.tolist() if torch.is_tensor(tokens) else tokens
    return [tokenizer.decode(program_ids(row, eos_id, bos_id)) for row in rows]


# ------------------------------------------------------------------------------------------------
# Command line: python sample.py --ckpt DIR --method base|autoencode ...
# ------------------------------------------------------------------------------------------------


def run_folder(ckpt):
    """A train_ae.py run folder -> its latest checkpoint folder (OUT/checkpoint), else the folder itself."""
    from pathlib import Path
    folder = Path(ckpt)
    return folder / "checkpoint" if (folder / "checkpoint" / "demasker").is_dir() else folder


def load_run(ckpt, need_encoder, device="cpu", dtype=None):
    """(demasker, encoder | None, tokenizer) from a train_ae.py run (OUT or OUT/checkpoint: demasker/, encoder/,
    tokenizer.json).
    A folder that is itself a demasker checkpoint (config.json) also works for --method base."""

    from dataprep.data import load_tokenizer
    from demasker import Demasker
    from encoder import Encoder

    folder = run_folder(ckpt)
    demasker_dir = folder / "demasker" if (folder / "demasker").is_dir() else folder
    if not (demasker_dir / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no demasker/ (or config.json); pass --ckpt a train_ae.py output folder")
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        tokenizer_file = demasker_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {folder}; train_ae.py writes one next to demasker/")
    demasker = Demasker.from_pretrained(str(demasker_dir), dtype=dtype, device=device).eval()
    encoder = None
    if need_encoder:
        if not (folder / "encoder").is_dir():
            raise FileNotFoundError(f"{folder} has no encoder/; --method autoencode needs an encoder-demasker "
                                    f"checkpoint (train_ae.py without --no-registers)")
        encoder = Encoder.from_pretrained(str(folder / "encoder"), dtype=dtype, device=device).eval()
    return demasker, encoder, load_tokenizer(str(tokenizer_file))


def through_first_eos(ids, eos_id):
    """(B, L) ids BOS..EOS padded with EOS -> (B, L) bool, True up to and including the first EOS (the
    encoder's attention_mask: the program and its EOS are valid, the EOS padding is not)."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]


def validation_sources(data_dir, num, tokenizer, demasker_cfg, encoder_cfg):
    """Held-out programs for --method autoencode: the first `num` of dataprep/data.py's validation split.

    Uses data.load_split(data_dir, "val") -> mapping with "ids" (N, L) demasker token ids (BOS..EOS padded
    with EOS to L) and, when the encoder has its own tokenizer, "encoder_ids" (N, L_enc) in the same layout.
    Returns {"texts": [str], "enc_ids": (n, L_enc) long, "enc_mask": (n, L_enc) bool, "length": L}.
    """
    from dataprep.data import load_split

    split = load_split(data_dir, "val")
    ids = torch.as_tensor(np.asarray(split["ids"][:num]), dtype=torch.long)  # (n, L)
    if ids.shape[0] < num:
        raise ValueError(f"the validation split of {data_dir} has only {ids.shape[0]} programs; lower --num")
    has_own = "encoder_ids" in split and split["encoder_ids"] is not None
    enc_ids = torch.as_tensor(np.asarray(split["encoder_ids"][:num]), dtype=torch.long) if has_own else ids
    texts = decode_programs(tokenizer, ids, demasker_cfg.eos_token_id, demasker_cfg.bos_token_id)
    enc_eos = encoder_cfg.eos_token_id if has_own else demasker_cfg.eos_token_id
    return {"texts": texts, "enc_ids": enc_ids, "enc_mask": through_first_eos(enc_ids, enc_eos),
            "length": ids.shape[1]}


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


def hybrid_generator(args, dtype):
    """ConThenDisc / ConWithinDisc (generators.py) with the priors named on the command line, as (a callable
    (demasker, count, gen_length, block_length, steps, temperature, remasking) -> (tokens, nfe report), the
    CPU generator of the priors' noise)."""
    from generators import conthendisc, conwithindisc, load_prior

    prior = load_prior(args.prior, ae=args.ckpt, device=args.device, dtype=dtype) if args.prior else None
    prior_generator = torch.Generator().manual_seed(args.seed)  # re-seeded per batch by main()
    if args.method == "conthendisc":
        if prior is None:
            raise ValueError("--method conthendisc needs --prior, a train_prior.py run folder")
        return (lambda demasker, count, *settings, **options: conthendisc(
            demasker, prior, count, *settings, prior_steps=args.prior_steps, prior_generator=prior_generator,
            **options)), prior_generator
    if args.cond_prior is None:
        raise ValueError("--method conwithindisc needs --cond-prior, a train_prior.py --conditional run folder")
    cond_prior = load_prior(args.cond_prior, ae=args.ckpt, device=args.device, dtype=dtype)
    return (lambda demasker, count, *settings, **options: conwithindisc(
        demasker, cond_prior, count, *settings, prior=prior, prior_steps=args.prior_steps, refresh_at=args.refresh_at,
        refresh_prior_steps=args.refresh_prior_steps, prior_generator=prior_generator, **options)), prior_generator


def conditional_generator(args, tokenizer, cfg, gen_length, dtype):
    """--prompt / --infill (extensions/prompting.py, App. H): (a callable (model, count, steps, temperature, remasking,
    decoding, stats) -> (tokens, nfe report), the priors' CPU generator, the canvas (L,))."""
    from extensions import prompting as PR
    from dataprep.prompts import encoder_rows, parse_infill, prompt_canvas

    mask_id = cfg.mask_token_id
    try:
        if args.infill is not None:
            canvas, _ = parse_infill(args.infill, tokenizer, args.span_tokens, gen_length, mask_id)
        else:
            canvas, _ = prompt_canvas(args.prompt, tokenizer, gen_length, mask_id)
    except ValueError as error:
        raise SystemExit(f"sample.py: error: {error}")
    prior_generator = torch.Generator().manual_seed(args.seed)
    rows = lambda count: canvas[None].expand(count, -1).to(args.device)  # noqa: E731
    if args.method == "base":
        fn = PR.base_infill if args.infill is not None else PR.base_prompted
        return (lambda model, count, steps, temp, remasking, **o: fn(model, rows(count), steps, temp, remasking, **o)), \
            None, canvas
    if args.infill is not None:
        from generators import load_prior
        if args.cond_prior is None:
            raise SystemExit("sample.py: error: --infill with a guided method needs --cond-prior (train_prior.py "
                             "--conditional): the registers are drawn given the context")
        cond_prior = load_prior(args.cond_prior, ae=args.ckpt, device=args.device, dtype=dtype)
        return (lambda model, count, steps, temp, remasking, **o: PR.infill(
            model, cond_prior, rows(count), steps, temp, remasking, prior_steps=args.refresh_prior_steps,
            prior_generator=prior_generator, keep=args.keep, **o)), prior_generator, canvas
    if args.prompted_prior is None:
        raise SystemExit(f"sample.py: error: --prompt with --method {args.method} needs --prompted-prior (experiments/train_prompted.py)")
    pprior = PR.load_prompted_prior(args.prompted_prior, ae=args.ckpt, device=args.device, dtype=dtype)
    prompt_ids, prompt_mask = encoder_rows([args.prompt], tokenizer, gen_length, shared=True)
    fn = PR.conthendisc_prompted if args.method == "conthendisc" else PR.conwithindisc_prompted
    extra = {} if args.method == "conthendisc" else {"refresh_at": args.refresh_at,
                                                     "refresh_prior_steps": args.refresh_prior_steps}
    return (lambda model, count, steps, temp, remasking, **o: fn(
        model, pprior, rows(count), prompt_ids.expand(count, -1), prompt_mask.expand(count, -1), steps, temp,
        remasking, prior_steps=args.prior_steps, prior_generator=prior_generator, keep=args.keep, **extra, **o)), \
        prior_generator, canvas


def batch_seed(seed, first_index):
    """The seed of the batch whose first sample index is first_index: the same on any number of ranks."""
    import numpy as np
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def show(record, autoencoding):
    from tqdm import tqdm
    tqdm.write(f"===== program {record['index']} (NFE {record['nfe']:.4g})"
               + (f", CER {record['cer']:.3f}" if autoencoding else ""))
    if autoencoding:
        tqdm.write("--- source\n" + record["source"] + "\n--- reconstruction")
    tqdm.write(record["text"])


def main(argv=None):
    """Decode args.num programs in batches. Under torchrun the batches are dealt round-robin to the ranks and
    gathered on rank 0, which prints and writes; batch b is seeded by batch_seed(seed, its first index), so
    the output does not depend on the number of ranks."""
    from tqdm import tqdm

    from infra import distributed as D

    args = parse_args(argv)
    env = D.setup(device=args.device)
    args.device = str(env.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    autoencoding = args.method == "autoencode"
    demasker, encoder, tokenizer = load_run(args.ckpt, autoencoding, args.device, dtype)
    check_cadd(demasker, wanted=False)  # a CADD demasker expects latents at [M]: eval.py cadd samples it
    cfg = demasker.cfg
    conditional = canvas = None
    if args.prompt is not None or args.infill is not None:
        conditional, prior_generator, canvas = conditional_generator(args, tokenizer, cfg, args.gen_length or 256, dtype)
        hybrid = None
    else:
        hybrid, prior_generator = (hybrid_generator(args, dtype) if args.method in ("conthendisc", "conwithindisc")
                                   else (None, None))
    sources = None
    if autoencoding:
        if args.data is None:
            raise ValueError("--method autoencode needs --data, the data cache folder written by dataprep/data.py")
        from dataprep.data import check_tokenizer_matches
        check_tokenizer_matches(args.data, run_folder(args.ckpt), "the AE run")  # data and checkpoint belong together
        sources = validation_sources(args.data, args.num, tokenizer, cfg, encoder.cfg)
        gen_length = args.gen_length or sources["length"]
    else:
        gen_length = args.gen_length or 256
    block_length, steps = args.block_length or gen_length, args.steps or gen_length
    if canvas is not None:  # --prompt / --infill: one block over the canvas, one token per [M] by default
        block_length, steps = gen_length, args.steps or int((canvas == cfg.mask_token_id).sum())
    check_schedule(gen_length, block_length, steps)
    if args.keep is not None and encoder is not None and args.keep > encoder.cfg.num_registers:
        raise SystemExit(f"sample.py: error: --keep {args.keep} but the encoder has K={encoder.cfg.num_registers} "
                         f"registers; choose 1 <= --keep <= {encoder.cfg.num_registers}")
    decoding = Decoding(rule=args.decoding, threshold=args.threshold, factor=args.factor, rng=args.rng,
                        guidance=args.guidance, cfg_scale=args.cfg_scale, logits_eos_inf=args.logits_eos_inf,
                        confidence_eos_eot_inf=args.confidence_eos_eot_inf, cache=args.cache).check()
    trace = None

    records, start = [], time.time()
    mine = list(range(0, args.num, args.batch_size))[env.rank::env.world_size]
    for first in tqdm(mine, desc=f"{args.method} L={gen_length} steps={steps}", disable=not env.is_main):
        count = min(args.batch_size, args.num - first)
        seed = batch_seed(args.seed, first)
        torch.manual_seed(seed)  # the MDM's draws (LLaDA's generate uses the global RNG)
        if prior_generator is not None:
            prior_generator.manual_seed(seed + 1)
        model = demasker
        if args.trace and first == 0:  # the first batch, recorded by a wrapper (no change to the samples)
            from evaluation.decode_trace import Trace
            model = trace = Trace(demasker, cfg.mask_token_id, label=args.method)
        stats = {}
        started = time.time()
        if autoencoding:
            enc_ids = sources["enc_ids"][first:first + count].to(args.device)
            enc_mask = sources["enc_mask"][first:first + count].to(args.device)
            tokens, nfe = autoencode(encoder, model, enc_ids, enc_mask, gen_length, block_length, steps,
                                     args.temperature, args.remasking, keep=args.keep, decoding=decoding, stats=stats)
        elif conditional is not None:
            tokens, report = conditional(model, count, steps, args.temperature, args.remasking,
                                         decoding=decoding, stats=stats)
            nfe = report["nfe"]
        elif hybrid is not None:
            tokens, report = hybrid(model, count, gen_length, block_length, steps, args.temperature, args.remasking,
                                    decoding=decoding, stats=stats, keep=args.keep)
            nfe = report["nfe"]
        else:
            tokens, nfe = generate(model, count, gen_length, block_length, steps, args.temperature, args.remasking,
                                   decoding=decoding, stats=stats)
        seconds_per_sample = (time.time() - started) / count
        if model is trace and trace is not None:
            trace.finish(tokens)
        texts = decode_programs(tokenizer, tokens, cfg.eos_token_id, cfg.bos_token_id)
        for i, text in enumerate(texts):
            record = {"index": first + i, "method": args.method, "text": text, "tokens": tokens[i].tolist(),
                      "nfe": nfe, "gen_length": gen_length, "block_length": block_length, "steps": steps,
                      "temperature": args.temperature, "remasking": args.remasking, "seed": args.seed,
                      "decoding": args.decoding, "demasker_calls": stats["nfe_per_sample"][i],
                      "tokens_per_step": gen_length / max(1, len(stats["tokens_per_step"])),
                      "seconds_per_sample": round(seconds_per_sample, 4)}
            if conditional is not None:
                record.update(prompt=args.prompt, infill=args.infill, nfe_counts=report,
                              prompted_prior=args.prompted_prior, cond_prior=args.cond_prior)
            if hybrid is not None:
                record.update(nfe_counts=report, nfe_flops=report.get("nfe_flops"), nfe_count=report.get("nfe_count"),
                              prior=args.prior, cond_prior=args.cond_prior,
                              prior_steps=args.prior_steps)
                if args.method == "conwithindisc":
                    record.update(refresh_at=args.refresh_at, refresh_prior_steps=args.refresh_prior_steps)
            if autoencoding:
                record["source"] = sources["texts"][first + i]
                record["cer"] = cer(record["source"], text)
            if not args.quiet and not env.distributed:
                show(record, autoencoding)
            records.append(record)
    gathered = D.gather_objects(records, env)
    D.cleanup(env)
    if trace is not None:  # rank 0 decodes the first batch
        from evaluation.decode_trace import panel, write_html
        shown = range(min(args.trace_samples, len(trace.steps[0]["canvas"])))
        path = write_html(args.trace, [panel(trace, i, tokenizer, cfg.eos_token_id, f"{args.method} #{i}", cfg.bos_token_id)
                                       for i in shown], title=f"crocodil {args.method}: decoding trace")
        print(f"trace: {path}")
    if gathered is None:  # not rank 0
        return None
    gathered.sort(key=lambda record: record["index"])
    if not args.quiet and env.distributed:
        for record in gathered:
            show(record, autoencoding)
    if args.out:  # a temporary file of our own, renamed at the end: an existing file is replaced whole or kept
        from infra.atomic import write_text
        write_text(args.out, "".join(json.dumps(record) + "\n" for record in gathered))
    errors = [record["cer"] for record in gathered] if autoencoding else []
    summary = (f"{args.num} programs on {env.world_size} rank(s), NFE {gathered[-1]['nfe']:.4g} per batch, "
               f"{time.time() - start:.1f}s")
    if errors:
        summary += f", mean CER {sum(errors) / len(errors):.4f}"
    print(summary)
    return errors


if __name__ == "__main__":
    main()
