"""Every quantitative claim of the paper's Sec. 5 and App. D-G, for any checkpoints, as one command each.

Paper map (arXiv 2603.20210) -> subcommand -> what it measures (evaluation/metrics.py holds the metric definitions):
  Fig. 4      fig4            masked-token CE and top-1 vs mask ratio: base MDM vs guided with k registers
  Table 1/2   table1, table2  MDM autoencoder (Alg. 6) at two lengths, sweeping block size x NFE: Gen-PPL,
                              CER, a semantic similarity (cosine of the scorer's mean-pooled features of
                              reconstruction and source; our stand-in for CodeBERTScore) and the parse rate
  Fig. 7      fig7            latent-noise robustness: N(0, sigma^2) added to the registers, top-1 / CE at 90%
                              masking, for AEs trained with (--ae) and without (--ae-no-noise) latent noise
  Fig. 8      fig8            register interpolation z = renorm((1-a) z_A + a z_B), a in {0,.25,.5,.75,1}:
                              MAUVE and Gen-PPL of the decoded programs per a
  Fig. 6/12   fig6            THE HEADLINE: MAUVE and Gen-PPL vs NFE for the base MDM, ConThenDisc and
                              ConWithinDisc at two lengths, whole sequence one block, same seeds, and the
                              speedup = NFE_base(L) / the smallest NFE at which a guided method matches the
                              base MDM's quality at NFE = L (MAUVE, Gen-PPL, and both; "matches" below),
                              with the time-to-quality (wall-clock) speedup beside it, each with an interval
                              (--rows-from OUT/speed.json: speed's fixed rows at a shared length, not drawn again)
  Fig. 9      fig9            PSNR(g(z_t, t), z_0) vs t, unconditional vs conditional prior (r = 0.5)
  App. E      prdc            PRDC (k = 5) per register index, averaged, for both priors' samples
  Fig. 11     fig11           ablations: number of registers K (one prior per K), refresh fraction
                              {0, .25, .5, .75}, block offsets on/off (a second prior trained without)
  App. B      marginal-trap   fraction of valid samples vs tokens revealed per step on a synthetic corpus
                              with pairs that must co-occur: base, guided (oracle registers), ConThenDisc and
                              ConWithinDisc (priors trained on the trap's bank), fixed schedule and threshold
                              decoding (experiments/marginal_trap.py; Theorem B.1)
  Sec. 5      base-decoding   the base MDM at NFE = L with each of LLaDA's options (remasking x blocks x EOS
                              handling) on selection programs disjoint from fig6's references; the best
                              setting per L goes to OUT/base-decoding.json, which fig6 / speed take with
                              --base-decoding (experiments/eval_base.py)
  Sec. 5      speed           quality vs NFE (a fine NFE grid) and wall-clock with fixed, threshold and factor
                              decoding, then a separate timing pass (experiments/eval_timing.py; or later, alone
                              on the machine: --timing-only on the record of a --timing-repeats 0 run); the headline
                              read on the curves by the matched-quality rule of evaluation/match.py
                              (experiments/eval_speed.py)
  CADD        cadd            beyond the paper (experiments/eval_cadd.py): base MDM vs CADD (per-token latents,
                              hard / soft z0_hat) vs CRoCoDiL vs CADD + registers: masked-token CE per ratio,
                              quality vs NFE (with --scorer), the marginal trap (--cadd-trap)
  App. H      prompt          (experiments/eval_prompt.py) signature + docstring -> body on held-out functions:
                              base MDM vs ConThenDisc / ConWithinDisc with a prompted prior, CER, token F1,
                              parse rate, Gen-PPL vs NFE; infilling rows with --cond-prior
  Sec. 4.3.2  consistency     (ours; experiments/eval_consistency.py) does the conditional prior read its condition?
                              agreement of registers drawn given h(x_t) with the revealed tokens per revealed share,
                              copy given the clean h(x) (cosine / MSE to h_phi(x), CER), beside the oracle h_phi(x),
                              the all-[M] condition and the unconditional prior (evaluation/consistency.py)

Every subcommand writes OUT/NAME.json (NAME: the subcommand, or --name for a second run of it into the same OUT;
settings, checkpoints, command, results), appends a section to
OUT/REPORT.md and, when matplotlib is importable, draws OUT/NAME.png. Several subcommands share one OUT; an
existing NAME.json of the same subcommand is refused before any work unless --overwrite, and one process at a
time writes it (infra/run_folder.claim_result). Generated texts are scored with the
reference scorer (--scorer, experiments/train_scorer.py): Gen-PPL pooled over tokens (MDLM), always next to the unigram
entropy and the same numbers for held-out real programs of matched length; MAUVE features are its final
hidden state at the last valid token (--features last, MAUVE's convention; mean pooling is --features mean).
An empty sample (nothing between BOS and EOS) is scored as empty text: it adds no token to Gen-PPL, and the
share of empty samples (empty_rate) is a column of every generation table. Real references are held-out
programs (val, then test split) whose BOS..EOS length fits the generated length. The parse rate (ast.parse)
and the exact-duplicate rate against the training split are ours, not the paper's.

Statistics (ours): --bootstrap N (preset default 200 at tiny; 0 = off) seeded percentile-bootstrap
95% intervals over each row's samples: Gen-PPL pooled over each resample's tokens, MAUVE with each replicate
resampling the method's samples and a new k-means seed (--bootstrap-restarts restarts; the reference set fixed,
as it is shared by every row), the parse / empty rates, CER; the real-vs-real ceiling gets its interval too.
The speed headline (`speed`, and beside fig6's own speedups) is read on curves: evaluation/match.py states the
rule (the reference's point value, the first crossing interpolated in log NFE, Bonferroni-level bands) and
experiments/eval_timing.py times every row back to back, several repeats, after the quality passes. The
point rule below is kept in the records as "matches".
--keep K (or L=K) makes every generator subcommand feed the demasker the first K registers of each bank (a
prior over all of an encoder's registers evaluated at the paper's K); default: all that the prior models.
"Matches the base": a point matches the base reference (the base MDM at NFE = L) on MAUVE when its MAUVE >=
the reference's lower 95% bound, on Gen-PPL when its Gen-PPL <= the reference's upper bound, and on "both"
when both hold: it is not detectably worse than the base. The speedup's interval bootstraps over the replicate
index b: every row (the reference too) takes its b-th replicate values, the tolerances (the reference's lower
MAUVE and upper Gen-PPL half-widths) stay, the matching NFE is recomputed, and the 2.5/97.5 percentiles of
NFE_base / NFE_match_b (0 where nothing matches in replicate b) give the interval; the same for wall-clock
(base seconds/sample / the fastest matching point's). NFE and seconds are the measured means (not resampled).

Sampling is sharded over ranks under torchrun (infra/distributed.py: round-robin sample indices, gathered on
rank 0, which scores and writes). Batch b of every method uses the same seeds, so methods see the same
random streams. Presets set sample counts and sweeps: tiny (minutes on CPU), small (~an hour), paper.

    python eval.py fig6 --ae runs/ae --base runs/base --prior runs/prior --cond-prior runs/cprior \\
                        --scorer runs/scorer --preset tiny
    torchrun --nproc_per_node 8 eval.py fig6 ... --preset paper

Files: eval.py (this command line and the output record), config/eval_args.py (the flags and their checks),
experiments/eval_context.py (presets, loading, sharded sampling, scoring), experiments/eval_autoencoder.py
(Fig. 4, 7, 8, Tables 1-2), experiments/eval_generation.py (Fig. 6, 11, 9, PRDC, App. B), experiments/eval_speed.py
(`speed`), experiments/eval_timing.py (its timing pass), evaluation/match.py (the matched-quality rule),
experiments/eval_base.py, eval_cadd.py, eval_prompt.py, eval_consistency.py.
"""


import datetime
import sys
from pathlib import Path

import torch

from config.eval_args import COUNTS, NO_DATA, TITLES, check_numbers, parse_args  # noqa: F401 (eval.parse_args)
from evaluation.report import git_commit, write_experiment
from experiments.eval_autoencoder import run_fig4, run_fig7, run_fig8, run_table
from experiments.eval_base import run_base_decoding
from experiments.eval_cadd import run_cadd
from experiments.eval_consistency import run_consistency
from experiments.eval_context import ALPHAS, PRESETS, SIGMAS, Context  # noqa: F401 (re-exported)
from experiments.eval_generation import (run_fig6, run_fig9, run_fig11, run_marginal_trap, run_prdc, speedup_text,  # noqa: F401
                                         speedups)
from experiments.eval_prompt import run_prompt
from experiments.eval_speed import run_speed
from infra import distributed as D
from infra.atomic import read_json
from infra.run_folder import claim_result

RUNS = {"fig4": run_fig4, "table1": lambda ctx: run_table(ctx, 0), "table2": lambda ctx: run_table(ctx, 1),
        "fig7": run_fig7, "fig8": run_fig8, "fig6": run_fig6, "fig9": run_fig9, "prdc": run_prdc, "fig11": run_fig11,
        "speed": run_speed, "base-decoding": run_base_decoding, "marginal-trap": run_marginal_trap, "cadd": run_cadd,
        "prompt": run_prompt, "consistency": run_consistency}
EXPERIMENTS = {name: (TITLES[name], RUNS[name]) for name in TITLES}  # subcommand -> (title, run(ctx))


def write_outputs(ctx, name, title, result, text, panels):
    """OUT/NAME.json, a section of OUT/REPORT.md and OUT/NAME.png (report.write_experiment)."""
    command = "python eval.py " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "eval.py" else None
    quality_pass = result.get("quality_pass") if isinstance(result, dict) else None
    if quality_pass and quality_pass.get("command") and command:  # speed --timing-only: both commands, in order
        command = quality_pass["command"] + "\n" + command
    scorer_info = None
    if ctx.args.scorer and (Path(ctx.args.scorer) / "scorer.json").is_file():
        scorer_info = read_json(Path(ctx.args.scorer) / "scorer.json", "retrain it with experiments/train_scorer.py")
    record = {"experiment": name, "title": title, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": command, "git_commit": git_commit(), "preset": ctx.args.preset,
              "settings": {k: v for k, v in vars(ctx.args).items() if k not in ("func", "overwrite")},
              "resolved": {k: ctx.preset[k] for k in ctx.preset}, "data": str(ctx.data_dir) if ctx.data_dir else None,
              "world_size": ctx.env.world_size, "scorer": scorer_info, "results": result}
    return write_experiment(ctx.args.out, record, text, panels)


def main(argv=None):
    """Parse the subcommand, load what it needs (experiments/eval_context.Context), run it, write its record."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or args.command  # the record's name (--name: a second run of one subcommand beside the first)
    # --timing-only rewrites the speed record it times (experiments/eval_speed.quality_record checks it first)
    with claim_result(args.out, name, args.overwrite or args.timing_only):  # infra/run_folder.py: NAME.json kept unless --overwrite
        ctx = Context(args, needs_data=args.command not in NO_DATA)
        title, run = EXPERIMENTS[args.command]
        try:
            result, text, panels = run(ctx)
            record = None
            if ctx.env.is_main and result is not None:
                record = write_outputs(ctx, name, title, result, text, panels)
        except BaseException:
            D.cleanup(ctx.env, barrier=False)
            raise
        D.cleanup(ctx.env)
        return record


if __name__ == "__main__":
    main()
