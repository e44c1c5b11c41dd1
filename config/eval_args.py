"""The command line of eval.py: one subcommand per figure or table, the flags they share, the number checks.

TITLES maps each subcommand to the paper's figure / table it reproduces (eval.py's docstring has the full map);
every flag says which subcommands read it. check_numbers refuses a bad count, rate or path with argparse's
message naming the flag (exit status 2) before any checkpoint is loaded.
"""

import argparse
import re
from pathlib import Path

import torch

from infra.run_folder import check_folder
from experiments.eval_context import ALPHAS, PRESETS, SIGMAS

DESCRIPTION = "Every quantitative claim of the paper's Sec. 5 and App. D-G, for any checkpoints, as one command each."

TITLES = {
    "fig4": "Guided demasker: masked-token CE and top-1 vs mask ratio (Fig. 4)",
    "table1": "MDM autoencoder sweep at the first length (Table 1)",
    "table2": "MDM autoencoder sweep at the second length (Table 2)",
    "fig7": "Robustness to latent noise (Fig. 7, App. D)",
    "fig8": "Register-space interpolation (Fig. 8, App. D)",
    "fig6": "Text generation: MAUVE and Gen-PPL vs NFE, and the speedup (Fig. 6 / 12)",
    "fig9": "PSNR of the prior's prediction vs t (Fig. 9, App. E)",
    "prdc": "PRDC of prior samples per register (App. E)",
    "fig11": "Ablations: registers K, refresh fraction, block offsets (Fig. 11, App. G)",
    "speed": "The speed headline: quality vs NFE and wall-clock, fixed and threshold decoding",
    "base-decoding": "The base MDM's decoding chosen on selection programs: every LLaDA option at NFE = L",
    "marginal-trap": "The marginal trap: valid samples vs tokens per step (App. B, Theorem B.1)",
    "cadd": "CADD beside CRoCoDiL: per-token latents vs registers (beyond the paper)",
    "prompt": "Prompted generation and infilling through the registers (App. H)",
    "consistency": "Does the conditional prior read its condition? Agreement and copy (ConWithinDisc's prior)",
}

NO_DATA = ("marginal-trap",)  # subcommands that read no data cache (each asks only for what it uses)


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    a = common.add_argument
    a("--ae", help="train_ae.py run folder (encoder/, demasker/, tokenizer.json; OUT or OUT/checkpoint)")
    a("--ae-no-noise", help="fig7: a second AE run trained without latent noise (train_ae.py --latent-cos 1)")
    a("--base", help="base MDM run (train_ae.py --no-registers)")
    a("--base-equal", help="fig6: a second base MDM with the guided demasker's total budget (the --base run trained "
      "on for as many steps as the guided fine-tune: train_ae.py --no-registers --demasker-init BASE/checkpoint); its "
      "rows are 'base-equal', decoded like --base, and the speedups are reported against both")
    a("--prior", help="unconditional train_prior.py run (ConThenDisc; initial registers of ConWithinDisc)")
    a("--cond-prior", help="conditional train_prior.py --conditional run (ConWithinDisc; prompt: the infilling rows)")
    a("--prompted-prior", help="prompt: experiments/train_prompted.py run (App. H, Eq. 12: the prior conditioned on h_kappa(c))")
    a("--pairs", help="prompt: dataprep/prompts.py --out folder (prompt/answer pairs; the test split is scored)")
    a("--span-fraction", type=float, default=0.3, help="prompt: share of each program masked as the infilling span")
    a("--prior-no-offsets", help="fig11: a prior trained with --no-block-offsets")
    a("--length-priors", nargs="*", metavar="L=DIR", help="fig6: a prior per generation length (the paper: K = 8 at "
      "L = 512, K = 16 at L = 1024); lengths not named use --prior")
    a("--length-cond-priors", nargs="*", metavar="L=DIR", help="fig6: a conditional prior per length (else --cond-prior)")
    a("--thresholds", type=float, nargs="*", help="speed: confidence thresholds tau of the adaptive rule "
      "(default: 0.5 0.7 0.9 0.99; the flag alone: no threshold rows); base-decoding: its threshold rows (default: 0.5 0.7 0.9); marginal-trap: its "
      "threshold rows (default: 0.1 0.3 0.5 0.7 0.9 0.99)")
    a("--factors", type=float, nargs="*", help="speed, base-decoding: f of Fast-dLLM's factor rule (the n most "
      "confident with (n + 1)(1 - c_(n)) < f), one row each (default: 1.0; speed, the flag alone: no factor rows)")
    a("--caches", nargs="+", choices=["prefix", "dual"], default=[], help="speed: extra base MDM rows at NFE = L "
      "with the approximate key/value cache (extensions/kv_cache.py), for its cost and speed")
    a("--cache-block-length", type=int, default=32, help="speed: the --caches rows (and an uncached row beside them, "
      "unless the base's chosen setting already uses these blocks) "
      "decode the base MDM with its chosen remasking and EOS handling in semi-autoregressive blocks of this length "
      "(the cache reuses keys / values within a block; Fast-dLLM's blocks are 32), the largest that fits L if not")
    a("--methods", nargs="*", choices=["conthendisc", "conwithindisc"], default=None, help="speed, fig6: only these "
      "guided methods beside the base MDM (default: both; the flag with no name: the base MDM alone)")
    a("--k-priors", nargs="*", help="fig11: priors trained with different --num-registers (default: --prior)")
    a("--scorer", help="experiments/train_scorer.py output folder, or a Qwen3 causal LM folder / hub id (Gen-PPL, MAUVE)")
    a("--data", help="dataprep/data.py cache (default: the 'data' recorded in the AE run's args.json)")
    a("--out", default="results", help="output folder for NAME.json, REPORT.md and plots (shared by subcommands; "
      "an existing NAME.json of this subcommand is refused unless --overwrite)")
    a("--name", help="the record's name: OUT/NAME.json, NAME.png (default: the subcommand). A second run of one "
      "subcommand into the same OUT, e.g. fig6 --name fig6-hmu --cond-prior runs/cprior_mu beside fig6")
    a("--overwrite", action="store_true", help="replace this subcommand's NAME.json / NAME.png in --out (kept until "
      "the new result is complete; REPORT.md gets a new section)")
    a("--preset", choices=sorted(PRESETS), default="tiny", help="sample counts and sweeps: tiny (minutes on CPU), "
      "small (about an hour on CPU), paper (the paper's sizes, GPUs)")
    a("--num", type=int, help="samples / programs per point (default: the preset's; fig6, fig11, speed: its gen_num, "
      "256 at tiny)")
    a("--batch-size", type=int, help="sequences per forward (default: the preset's)")
    a("--seed", type=int, default=0, help="seed of every random stream (masks, noise, sampling, k-means)")
    a("--lengths", type=int, nargs="+", help="fig6, base-decoding: generation lengths (default: the preset's two)")
    a("--length", type=int, help="one length for table1/table2 (default: the preset's first/second), fig11 (the "
      "first) and fig8 (the data's L)")
    a("--nfe", type=int, nargs="+", help="NFE (= MDM steps) grid (default: powers of two from the preset's nfe_min, 1 "
      "at tiny, up to the length; speed: the fine grid)")
    a("--nfe-grid", choices=["powers", "fine"], help="the default NFE grid: powers of two (fig6, fig11, cadd) or fine, "
      "2^k and 3 x 2^k: 1, 2, 3, 4, 6, 8, 12, ... (speed), on which evaluation/match.py reads the matched-quality NFE")
    a("--keep", type=keep_arg, nargs="+", metavar="K|L=K", help="fig6, fig11, speed, cadd (and fig8, prompt): the "
      "demasker reads the first K registers of each draw (the paper: K = 8 at L = 512, 16 at L = 1024, from a "
      "prior over all of them: --keep 512=8 1024=16); default: every register the prior models, as sample.py")
    a("--timing-repeats", type=int, help="speed: repeats of the timing pass after the quality rows, every row timed "
      "interleaved with the others (experiments/eval_timing.py; default: the preset's, 5; 0 = no timing pass)")
    a("--timing-only", action="store_true", help="speed: no quality pass; time the rows of OUT/NAME.json, the record "
      "of the same command run earlier with --timing-repeats 0 (e.g. beside other jobs), alone on the machine, and "
      "rewrite it with the timing pass and the wall-clock speedups (scripts/reproduce.sh); refused when its flags "
      "differ from these other than --threads and the timing flags")
    a("--timing-batch", type=int, help="speed: samples per timed batch (default: the preset's batch size)")
    a("--guided-max-nfe", type=int, help="fig6, speed: sweep ConThenDisc / ConWithinDisc only up to this NFE "
      "(default: the length, as the base); the speedup is decided at the bottom of the grid, and a CPU budget can "
      "skip their costliest points (scripts/reproduce.sh at tiny: 64)")
    a("--blocks", type=int, nargs="+", help="table1/table2: block lengths (default: L/8, L/4, L/2, L); "
      "base-decoding (fixed and adaptive rows), cadd --cadd-select: semi-autoregressive block lengths tried beside "
      "the whole sequence (default: 32)")
    a("--base-decoding", metavar="FILE", help="fig6/speed/cadd: decode the base MDM rows (and cadd's CADD rows) with "
      "the setting chosen per length in FILE (OUT/base-decoding.json of `eval.py base-decoding`: remasking, block "
      "length, EOS handling; its chosen_adaptive for speed's threshold / factor rows); default: --remasking, one "
      "block. The guided methods keep --remasking and one block")
    a("--rows-from", metavar="FILE", help="fig6: take the fixed-schedule rows that a speed record (OUT/speed.json) "
      "sampled with the same checkpoints, seeds, sample count and scoring flags at one of these lengths, instead of "
      "sampling them again (the same samples bit for bit; refused when other flags differ). scripts/reproduce.sh "
      "passes it: fig6 at L = 128 repeats speed's rows")
    a("--fig6-num", type=int, help="base-decoding: samples per point of the fig6 run whose reference programs the "
      "selection set must avoid (default: the preset's generation samples)")
    a("--selection-split", choices=["auto", "val", "train"], default="auto", help="base-decoding: real programs "
      "to choose on: val (held-out val programs after fig6's references; an error if too few), train (the last "
      "training programs), auto (val when enough remain, else train)")
    a("--steps", type=int, help="fig8, consistency: MDM steps for decoding (default: the length)")
    a("--revealed-shares", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="consistency: shares r of each "
      "program's tokens revealed to the conditional prior, one agreement row each (the copy row is r = 1)")
    a("--canvas", choices=["random", "confidence", "both"], default="both", help="consistency: which positions are "
      "revealed: random (each independently, the training masks), confidence (the canvas ConWithinDisc's refresh "
      "reads: ConThenDisc's own decoding with --prior's registers stopped at share r, else the order of the oracle "
      "registers' decoding of the program) or both (default)")
    a("--registers", type=int, nargs="+", help="fig4: register counts k (default: 1, 2, 4, ..., K)")
    a("--sigmas", type=float, nargs="+", help=f"fig7: noise std list (default: {SIGMAS})")
    a("--fig7-ratio", type=float, default=0.9, help="fig7: mask ratio (paper: 0.9)")
    a("--alphas", type=float, nargs="+", help=f"fig8: interpolation weights (default: {ALPHAS})")
    a("--temperature", type=float, help="Gumbel temperature (default: 1.0 for generation, 0 for autoencoding)")
    a("--remasking", choices=["low_confidence", "random"], default="low_confidence", help="LLaDA remasking of the "
      "guided methods (and of the base MDM without --base-decoding)")
    a("--rng", choices=["fast", "llada"], default="fast", help="the token draw of every sampler: fast (at the "
      "masked candidates only, same distribution) or llada (LLaDA's float64 Gumbel noise over the whole (B, L, V) "
      "logits, token parity with its generate(); 3.6x slower per step at T = 1 with the tiny demasker, V = 2048)")
    a("--prior-steps", type=int, help="DDIM steps of a prior draw (default: the preset's; paper 128)")
    a("--refresh-prior-steps", type=int, help="DDIM steps of a ConWithinDisc refresh (default: preset; paper 32)")
    a("--cond-ratio", type=float, default=0.5, help="fig9/prdc: mask ratio r of the conditioning (paper: 0.5)")
    a("--prdc-k", type=int, default=5, help="prdc: nearest neighbours k (paper: 5)")
    a("--mauve-seeds", type=int, help="k-means seeds averaged per MAUVE value (default: the preset's)")
    a("--features", choices=["mean", "last"], default="last", help="MAUVE features: the scorer's final state at the "
      "last valid token (default, MAUVE's GPT-2 convention) or mean-pooled over the tokens")
    a("--bootstrap", type=int, help="bootstrap replicates of every 95%% interval (default: the preset's, 200 at "
      "tiny; 0 = no intervals)")
    a("--bootstrap-restarts", type=int, default=1, help="k-means restarts of each MAUVE bootstrap replicate (the "
      "point value keeps 5; 1 keeps 200 replicates at 256 samples to seconds per row)")
    a("--trap-pairs", type=int, default=4, help="marginal-trap: pairs per sequence (length 2 x pairs)")
    a("--trap-choices", type=int, default=4, help="marginal-trap: subjects per slot (A)")
    a("--trap-steps", type=int, help="marginal-trap: training steps per model (default: the preset's)")
    a("--trap-samples", type=int, help="marginal-trap: samples per point (default: the preset's)")
    a("--trap-conditionings", nargs="+", choices=["frozen", "hmu", "xt"], help="marginal-trap: what ConWithinDisc's "
      "conditional prior reads of the canvas, one row each: frozen h_phi (Alg. 4), hmu (an encoder trained with the "
      "prior, Sec. 4.3.2 comment iii), xt (the canvas itself, comment ii; docs/conditioning.md); default: frozen hmu")
    a("--trap-prior-steps", type=int, help="marginal-trap: training steps of each prior on the trap's register bank "
      "(ConThenDisc, ConWithinDisc; default: 2 x --trap-steps)")
    a("--cadd-run", help="cadd: a train_ae.py --no-registers --cadd run (CADD's latents at [M], no registers)")
    a("--cadd-ae", help="cadd: a train_ae.py --cadd run with registers (CADD + CRoCoDiL's encoder)")
    a("--cadd-prior", help="cadd: a train_prior.py run over --cadd-ae's encoder (CADD + registers generation)")
    a("--cadd-softness", type=float, nargs="+", default=[0.0, 1.0], help="cadd: z0_hat dials to decode with, "
      "0 = hard (embedding of the argmax), 1 = soft (expected embedding), between = their mix (default: 0 1)")
    a("--cadd-latents", type=int, default=1, help="cadd: K latents per [M] position, probabilities averaged "
      "(Monte Carlo); NFE counts K forward passes per step (default 1)")
    a("--cadd-posterior-noise", action="store_true", help="cadd: sample the Gaussian posterior (mean + noise) "
      "instead of moving the latents to its mean")
    a("--cadd-select", action="store_true", help="cadd: choose CADD's own decoding (z0_hat softness x remasking x "
      "block length x EOS handling, at NFE = L) on base-decoding's selection set by its rule, and add 'cadd_best' rows "
      "decoded with it (costly: one NFE = L sweep per setting)")
    a("--cadd-trap", action="store_true", help="cadd: also train a CADD demasker on the marginal-trap corpus "
      "(--trap-*) and compare its valid-sample fraction with the base MDM and the factorised bound")
    a("--cadd-trap-schedule", choices=["linear", "cosine"], default="linear", help="cadd: gamma_bar of the trap's "
      "CADD demasker")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (torchrun: cuda:rank)")
    a("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default, one per core); 1 when several "
      "jobs share the cores (measured: two generation jobs on 2 cores run 3x slower with 2 threads each than with 1)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: as stored)")
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, title in TITLES.items():
        commands.add_parser(name, parents=[common], help=title, description=title)
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    check_input_files(parser, args)
    return args


def check_input_files(parser, args):
    """The JSON records a flag reads (--base-decoding, --rows-from) must be files, checked before any work."""
    made_by = {"base_decoding": "`python eval.py base-decoding ... --out OUT` writes OUT/base-decoding.json",
               "rows_from": "`python eval.py speed ... --out OUT` writes OUT/speed.json"}
    for name, how in made_by.items():
        path = getattr(args, name)
        if path and not Path(path).is_file():
            parser.error(f"--{name.replace('_', '-')} {path}: no such file ({how})")


def keep_arg(text):
    """--keep values: K (every length) or L=K (one length) -> (L | None, K)."""
    length, sep, count = text.rpartition("=")
    try:
        return (int(length) if sep else None), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or L=K (e.g. 8 or 512=8), got {text!r}") from None


COUNTS = ("num", "batch_size", "lengths", "length", "nfe", "blocks", "steps", "registers", "prior_steps",
          "refresh_prior_steps", "mauve_seeds", "prdc_k", "trap_pairs", "trap_choices", "trap_steps", "trap_samples",
          "fig6_num", "trap_prior_steps", "guided_max_nfe",
          "bootstrap_restarts", "cadd_latents", "timing_batch", "cache_block_length")


def check_numbers(parser, args):
    """Every number checked before anything is loaded (parser.error names the flag and the valid range)."""
    def each(name):
        value = getattr(args, name)
        return [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    for name in COUNTS:
        for value in each(name):
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for length, count in args.keep or []:
        if count < 1 or (length is not None and length < 1):
            given = f"{count}" if length is None else f"{length}={count}"
            parser.error(f"--keep needs K >= 1 (and L >= 1 in L=K), got {given}")
    if len([length for length, _ in args.keep or [] if length is None]) > 1:
        parser.error("--keep takes one bare K (every length) at most; name the others as L=K")
    if args.timing_repeats is not None and args.timing_repeats < 0:
        parser.error(f"--timing-repeats must be >= 0 (0 = no timing pass), got {args.timing_repeats}")
    if args.timing_only and args.command != "speed":
        parser.error(f"--timing-only times the rows of a speed record; eval.py {args.command} has no timing pass")
    if args.timing_only and args.timing_repeats == 0:
        parser.error("--timing-only with --timing-repeats 0 would time nothing: give --timing-repeats >= 1 (or leave "
                     "it out: the preset's 5)")
    if args.bootstrap is not None and args.bootstrap < 0:
        parser.error(f"--bootstrap must be >= 0 (0 = no intervals), got {args.bootstrap}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    for name in ("temperature", "sigmas"):
        for value in each(name):
            if not value >= 0:
                parser.error(f"--{name} must be >= 0, got {value}")
    if not 0 < args.fig7_ratio <= 1:
        parser.error(f"--fig7-ratio must be in (0, 1], got {args.fig7_ratio}")
    for value in args.cadd_softness:
        if not 0 <= value <= 1:
            parser.error(f"--cadd-softness values must lie in [0, 1] (0 = hard, 1 = soft), got {value}")
    if not 0 < args.span_fraction < 1:
        parser.error(f"--span-fraction must lie in (0, 1), got {args.span_fraction}")
    if not 0 <= args.cond_ratio <= 1:
        parser.error(f"--cond-ratio must be in [0, 1], got {args.cond_ratio}")
    for value in args.revealed_shares:
        if not 0 < value < 1:
            parser.error(f"--revealed-shares must lie in (0, 1) (the copy row is r = 1), got {value}")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.name):
        parser.error(f"--name must be a plain file name (letters, digits, '_', '.', '-'), got {args.name!r}")
    try:  # a symlink, FIFO, device or file where the folder goes: refused before anything is loaded
        check_folder(args.out, "--out")
    except OSError as error:  # a file in the way, a read-only or full location
        parser.error(str(error))
