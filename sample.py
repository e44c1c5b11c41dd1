"""sample.py: the command line for every decoder of CRoCoDiL (paper arXiv 2603.20210), and tokens to text.

Methods: `base` (the LLaDA baseline of Sec. 5, from an all-[M] canvas), `autoencode` (Alg. 6: z_0 = h_phi(x_0) of
held-out programs, then the guided MDM; prints source, reconstruction and CER), `conthendisc` (Alg. 2: registers
from the unconditional prior, then the guided MDM), `conwithindisc` (Alg. 3, App. G: registers redrawn from the
conditional prior given x_t while decoding); priors from train_prior.py, NFE counted as the paper does
(generators.py). --prompt (App. H: a fixed prefix; guided methods with an experiments/train_prompted.py prior)
and --infill 'prefix<|span|>suffix' (registers from the conditional prior given the context) decode a canvas
with fixed tokens (extensions/prompting.py). A CADD checkpoint (train_ae.py --cadd) is sampled by --method base
with CADD's latents at [M] (extensions/cadd.py, --cadd-*).

main(): load the models (training/runs.py), pick the method, generate batch by batch (per-batch seeds: the same
output on any number of ranks), decode each program up to its first EOS, write one JSONL record per program.
Flags, and which run each acts on (a flag set where it does not act is an error): config/sample_args.py.
The decoding loop (LLaDA's sampler and RNG order, the decoding rules) is mdm.py.

    python sample.py --ckpt RUN --method base|autoencode ...        # writes JSONL; see --help
    python sample.py --method conthendisc|conwithindisc --ae RUN --prior DIR [--cond-prior DIR]
"""
import json
import time

import numpy as np
import torch

from config.sample_args import (check_guidance, check_numbers, check_priors, check_run, parse_args,  # noqa: F401
                                used)  # (re-exported)
from evaluation.metrics import cer, levenshtein  # noqa: F401 (re-exported)
from extensions.cadd import cadd_generate, check_cadd  # noqa: F401 (check_cadd: re-exported)
from training.runs import heldout_programs, load_run, run_folder, through_first_eos  # noqa: F401 (re-exported)
from mdm import (REMASKING, RULES, Decoding, _model_device, _resolve_mask_id, add_gumbel_noise, autoencode,  # noqa: F401
                 check_schedule, encode_registers, generate, mdm_loop, reveal_step)  # (re-exported)


# ------------------------------------------------------------------------------------------------
# Tokens to text, and the held-out programs of --method autoencode
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


def validation_sources(data_dir, num, tokenizer, demasker_cfg, encoder_cfg):
    """Held-out programs for --method autoencode: the first `num` of the validation split (training/runs.py
    heldout_programs) and their texts. Returns {"texts": [str], "enc_ids": (n, L_enc) long, "enc_mask": (n, L_enc)
    bool, "length": L}."""
    ids, enc_ids, enc_mask = heldout_programs(data_dir, num, demasker_cfg, encoder_cfg)
    texts = decode_programs(tokenizer, ids, demasker_cfg.eos_token_id, demasker_cfg.bos_token_id)
    return {"texts": texts, "enc_ids": enc_ids, "enc_mask": enc_mask, "length": ids.shape[1]}


# ------------------------------------------------------------------------------------------------
# Picking the method: one sampler (model, first index, count, decoding, stats) -> (tokens, nfe, report)
# ------------------------------------------------------------------------------------------------


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


def pick_method(args, demasker, encoder, tokenizer, dtype):
    """The chosen method as (kind, sampler, the priors' CPU generator | None, held-out sources | None, (gen_length,
    block_length, steps)); kind is "autoencode", "conditional" (--prompt / --infill), "hybrid", "cadd" (--method base
    on a CADD checkpoint: the generator draws its latents) or "base"."""
    cfg = demasker.cfg
    generator = sources = canvas = None
    if is_cadd(demasker):
        kind, generator = "cadd", torch.Generator().manual_seed(args.seed)  # re-seeded per batch by main()
    elif args.prompt is not None or args.infill is not None:
        kind = "conditional"
        conditional, generator, canvas = conditional_generator(args, tokenizer, cfg, args.gen_length or 256, dtype)
    elif args.method in ("conthendisc", "conwithindisc"):
        kind = "hybrid"
        hybrid, generator = hybrid_generator(args, dtype)
    else:
        kind = "autoencode" if args.method == "autoencode" else "base"
    if kind == "autoencode":
        if args.data is None:
            raise ValueError("--method autoencode needs --data, the data cache folder written by dataprep/data.py")
        from dataprep.data import check_tokenizer_matches
        check_tokenizer_matches(args.data, run_folder(args.ckpt), "the AE run")  # data and checkpoint belong together
        sources = validation_sources(args.data, args.num, tokenizer, cfg, encoder.cfg)
    gen_length = args.gen_length or (sources["length"] if sources is not None else 256)
    block_length, steps = args.block_length or gen_length, args.steps or gen_length
    if canvas is not None:  # --prompt / --infill: one block over the canvas, one token per [M] by default
        block_length, steps = gen_length, args.steps or int((canvas == cfg.mask_token_id).sum())
    check_schedule(gen_length, block_length, steps)
    if args.keep is not None and encoder is not None and args.keep > encoder.cfg.num_registers:
        raise SystemExit(f"sample.py: error: --keep {args.keep} but the encoder has K={encoder.cfg.num_registers} "
                         f"registers; choose 1 <= --keep <= {encoder.cfg.num_registers}")
    settings = (args.temperature, args.remasking)

    def sampler(model, first, count, decoding, stats):
        if kind == "autoencode":
            enc_ids = sources["enc_ids"][first:first + count].to(args.device)
            enc_mask = sources["enc_mask"][first:first + count].to(args.device)
            tokens, nfe = autoencode(encoder, model, enc_ids, enc_mask, gen_length, block_length, steps, *settings,
                                     keep=args.keep, decoding=decoding, stats=stats)
            return tokens, nfe, None
        if kind == "cadd":
            tokens, nfe = cadd_generate(model, count, gen_length, block_length, steps, *settings,
                                        softness=args.cadd_softness, num_latents=args.cadd_latents,
                                        posterior_noise=args.cadd_posterior_noise, latent_generator=generator,
                                        decoding=decoding, stats=stats)
            return tokens, nfe, None
        if kind == "conditional":
            tokens, report = conditional(model, count, steps, *settings, decoding=decoding, stats=stats)
        elif kind == "hybrid":
            tokens, report = hybrid(model, count, gen_length, block_length, steps, *settings, decoding=decoding,
                                    stats=stats, keep=args.keep)
        else:
            tokens, nfe = generate(model, count, gen_length, block_length, steps, *settings, decoding=decoding,
                                   stats=stats)
            return tokens, nfe, None
        return tokens, report["nfe"], report

    return kind, sampler, generator, sources, (gen_length, block_length, steps)


# ------------------------------------------------------------------------------------------------
# The command line: generate, decode, write
# ------------------------------------------------------------------------------------------------

def is_cadd(demasker):
    """Whether the demasker was trained with train_ae.py --cadd (it expects CADD's latents at [M])."""
    return getattr(demasker.cfg, "cadd_schedule", "none") != "none"


def batch_seed(seed, first_index):
    """The seed of the batch whose first sample index is first_index: the same on any number of ranks."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def record_of(args, kind, index, text, tokens, nfe, report, stats, i, lengths, seconds_per_sample, sources):
    """The JSONL record of program `index` (row i of its batch): text, tokens, NFE and the settings of its method;
    an input (prior, prompt) is named only where the run used it (`used`: None otherwise)."""
    gen_length, block_length, steps = lengths
    record = {"index": index, "method": args.method, "text": text, "tokens": tokens.tolist(),
              "nfe": nfe, "gen_length": gen_length, "block_length": block_length, "steps": steps,
              "temperature": args.temperature, "remasking": args.remasking, "seed": args.seed,
              "decoding": args.decoding, "demasker_calls": stats["nfe_per_sample"][i],
              "tokens_per_step": gen_length / max(1, len(stats["tokens_per_step"])),
              "seconds_per_sample": round(seconds_per_sample, 4)}
    if kind == "conditional":
        record.update(prompt=args.prompt, infill=args.infill, nfe_counts=report,
                      prompted_prior=used(args, "--prompted-prior"), cond_prior=used(args, "--cond-prior"))
    if kind == "hybrid":
        record.update(nfe_counts=report, nfe_flops=report.get("nfe_flops"), nfe_count=report.get("nfe_count"),
                      prior=used(args, "--prior"), cond_prior=used(args, "--cond-prior"),
                      prior_steps=used(args, "--prior-steps"))
        if args.method == "conwithindisc":
            record.update(refresh_at=args.refresh_at, refresh_prior_steps=args.refresh_prior_steps)
    if kind == "cadd":
        record.update(cadd_softness=args.cadd_softness, cadd_latents=args.cadd_latents,
                      cadd_posterior_noise=args.cadd_posterior_noise)
    if kind == "autoencode":
        record["source"] = sources["texts"][index]
        record["cer"] = cer(record["source"], text)
    return record


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

    args = parse_args(argv)  # refuses a flag that acts on no run of this method, mode and decoding rule
    check_guidance(args)
    check_priors(args)  # a prior record without the encoder's fingerprint, or of another tokenizer layout
    env = D.setup(device=args.device)
    args.device = str(env.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    autoencoding = args.method == "autoencode"
    demasker, encoder, tokenizer = load_run(args.ckpt, autoencoding, args.device, dtype)
    check_run(args, is_cadd(demasker))  # a CADD checkpoint: --method base only, and the --cadd-* flags act
    cfg = demasker.cfg
    kind, sampler, prior_generator, sources, lengths = pick_method(args, demasker, encoder, tokenizer, dtype)
    gen_length, _, steps = lengths
    decoding = Decoding(rule=args.decoding, threshold=args.threshold, factor=args.factor, rng=args.rng,
                        guidance=args.guidance, cfg_scale=args.cfg_scale, logits_eos_inf=args.logits_eos_inf,
                        confidence_eos_eot_inf=args.confidence_eos_eot_inf, cache=args.cache).check()

    trace, records, start = None, [], time.time()
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
        stats, started = {}, time.time()
        tokens, nfe, report = sampler(model, first, count, decoding, stats)
        seconds_per_sample = (time.time() - started) / count
        if model is trace and trace is not None:
            trace.finish(tokens)
        texts = decode_programs(tokenizer, tokens, cfg.eos_token_id, cfg.bos_token_id)
        for i, text in enumerate(texts):
            record = record_of(args, kind, first + i, text, tokens[i], nfe, report, stats, i, lengths,
                               seconds_per_sample, sources)
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
        try:
            write_text(args.out, "".join(json.dumps(record) + "\n" for record in gathered))
        except OSError as error:  # checked before the work (config/sample_args.output_problem); a disk filled since
            raise SystemExit(f"sample.py: error: --out {args.out} could not be written ({error.strerror}); the "
                             f"programs are lost, any earlier {args.out} is kept: free space or pass another --out "
                             f"and sample again") from None
    errors = [record["cer"] for record in gathered] if autoencoding else []
    summary = (f"{args.num} programs on {env.world_size} rank(s), NFE {gathered[-1]['nfe']:.4g} per batch, "
               f"{time.time() - start:.1f}s")
    if errors:
        summary += f", mean CER {sum(errors) / len(errors):.4f}"
    print(summary)
    return errors


if __name__ == "__main__":
    main()
