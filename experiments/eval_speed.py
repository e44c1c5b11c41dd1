"""The speed headline (docs/results.md; the paper's claim of Sec. 5.3: many tokens per step are safe when
registers carry the cross-token dependencies): quality against NFE and against wall-clock, measured side by side
in one run on one machine, for the base MDM, ConThenDisc and ConWithinDisc, each decoded with LLaDA's fixed schedule
over the NFE grid and with Fast-dLLM's confidence threshold (mdm.Decoding, adaptive per-sample NFE); with
--caches, base rows at NFE = L decoded with the approximate key/value cache (its quality cost and speed).

Every row: method, decoding, NFE (the paper's count; adaptive rules: the mean demasker calls per sample plus
the priors by parameter ratio), nfe_flops, demasker calls, tokens per step, seconds per sample, MAUVE and
Gen-PPL with their bootstrap 95% intervals, and the share of empty samples. The reference is the base MDM at
NFE = L with the fixed schedule; a row matches it when its MAUVE >= the reference's lower 95% bound and its
Gen-PPL <= the reference's upper bound (eval.py's "matches", eval_generation.match_tests); for each matching
row the speedups in NFE and in wall-clock; the headline is the best of each, with an interval bootstrapped over
the replicate index (eval_generation.speedup_entry: the best matching row recomputed in every replicate).
"""

import math

from experiments.eval_context import nfe_grid, real_reference, sampler_decoding, score_texts, sharded_samples, temperature
from experiments.eval_generation import ceiling_text, match_tests, method_sampler, replicate_count, speedup_entry
from evaluation.report import fmt_ci, md_table, panel

THRESHOLDS = [0.5, 0.7, 0.9, 0.99]


def run_speed(ctx):
    length = ctx.args.length or ctx.get("lengths")[0]
    prior = ctx.prior(ctx.args.prior)
    cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior") if ctx.args.cond_prior else None
    temp = temperature(ctx, 1.0)
    reference_features, ceiling = real_reference(ctx, length, ctx.gen_num)
    methods = [("base", {}), ("conthendisc", {"prior": prior})]
    if cond_prior is not None:
        methods.append(("conwithindisc", {"prior": prior, "cond_prior": cond_prior}))
    if ctx.args.methods is not None:  # a subset (the base is always kept: it is the reference)
        methods = [(m, kw) for m, kw in methods if m == "base" or m in ctx.args.methods]
    settings = [("fixed", steps, sampler_decoding(ctx)) for steps in nfe_grid(ctx, length)]
    settings += [(f"threshold {tau}", length, sampler_decoding(ctx, rule="threshold", threshold=tau))
                 for tau in (ctx.args.thresholds or THRESHOLDS)]
    # the approximate key/value cache (extensions/kv_cache.py): extra base rows at NFE = L, for its quality cost and speed
    cached = [(f"fixed, cache {mode}", length, sampler_decoding(ctx, cache=mode)) for mode in (ctx.args.caches or [])]
    rows = []
    for method, kwargs in methods:
        for label, steps, decoding in settings + (cached if method == "base" else []):
            sampler = method_sampler(ctx, method, length, steps, temp, decoding=decoding, **kwargs)
            texts, nfe, stats = sharded_samples(ctx, ctx.gen_num, sampler, f"{method} {label} L={length}",
                                                with_stats=True)
            if texts is not None:
                rows.append({"method": method, "decoding": label, "steps": steps, "nfe": nfe, **stats,
                             "tokens_per_step": length / max(stats["demasker_calls"], 1e-9),
                             **score_texts(ctx, texts, reference_features), "examples": texts[:2]})
    if not ctx.env.is_main:
        return None, None, None
    headline = speed_headline(rows, length)
    result = {"length": length, "temperature": temp, "num_samples": ctx.gen_num, "bootstrap": ctx.get("bootstrap"),
              "rows": rows, "real": ceiling, "headline": headline}
    table = md_table(["method", "decoding", "NFE", "tokens/step", "s/sample", "MAUVE [95% CI]", "Gen-PPL [95% CI]",
                      "empty"],
                     [[r["method"], r["decoding"], f"{r['nfe']:.1f}", f"{r['tokens_per_step']:.1f}",
                       f"{r['seconds_per_sample']:.3f}", fmt_ci(r["mauve"], r.get("mauve_ci"), 3),
                       fmt_ci(r["gen_ppl"], r.get("gen_ppl_ci"), 2), f"{r['empty_rate']:.2f}"] for r in rows])

    def series(x, key):  # one curve per method and rule: (x values, values, 95% lows, highs)
        curves = {}
        for m, _ in methods:
            for rule in ("fixed", "threshold"):
                mine = [r for r in rows if r["method"] == m and r["decoding"].split()[0] == rule]
                bounds = [r.get(f"{key}_ci") or [math.nan, math.nan] for r in mine]
                curves[f"{m} {rule}"] = ([r[x] for r in mine], [r[key] for r in mine], [b[0] for b in bounds],
                                         [b[1] for b in bounds])
        return curves
    lo, hi = ceiling.get("mauve_ci") or [ceiling.get("mauve", math.nan)] * 2
    band = (lo, hi, "real programs (95% CI)") if math.isfinite(lo) else None
    panels = [panel(f"Speed (L={length}): MAUVE vs NFE", "NFE (log scale)", "MAUVE (higher is better)",
                    series("nfe", "mauve"), logx=True, band=band),
              panel(f"Speed (L={length}): MAUVE vs wall-clock", "seconds per sample (log scale)",
                    "MAUVE (higher is better)", series("seconds_per_sample", "mauve"), logx=10, band=band),
              panel(f"Speed (L={length}): Gen-PPL vs wall-clock", "seconds per sample (log scale)",
                    "Gen-PPL (log scale, lower is better)", series("seconds_per_sample", "gen_ppl"), logx=10,
                    logy=True)]
    return result, ceiling_text(ceiling) + "\n\n" + table + "\n\n" + headline_text(headline), panels


def speed_headline(rows, length):
    """Matched-quality speedups against the base MDM at NFE = L (fixed schedule), in NFE and in wall-clock; a row
    matches on MAUVE and Gen-PPL together (eval_generation.match_tests); the best of each with its interval."""
    base = [r for r in rows if r["method"] == "base" and r["decoding"] == "fixed"]
    if not base:
        return {}
    ref = max(base, key=lambda r: (r["steps"] == length, r["steps"]))
    test, replicates = match_tests(ref)["both"], replicate_count(rows)
    candidates = [r for r in rows if r is not ref]
    keys = ("nfe", "seconds_per_sample", "mauve", "mauve_ci", "gen_ppl", "gen_ppl_ci", "empty_rate")
    out = {"reference": {k: ref[k] for k in keys if k in ref}, "replicates": replicates, "matched": []}
    for r in candidates:
        if test(r):
            out["matched"].append({"method": r["method"], "decoding": r["decoding"], "nfe": r["nfe"],
                                   "nfe_speedup": ref["nfe"] / r["nfe"],
                                   "wallclock_speedup": ref["seconds_per_sample"] / r["seconds_per_sample"]})
    if out["matched"]:
        entry = speedup_entry(ref, candidates, test, replicates)
        out["best_nfe"] = {**max(out["matched"], key=lambda m: m["nfe_speedup"]),
                           "nfe_speedup_ci": entry.get("speedup_ci")}
        out["best_wallclock"] = {**max(out["matched"], key=lambda m: m["wallclock_speedup"]),
                                 "wallclock_speedup_ci": entry.get("time_speedup_ci")}
        out["matched_share"] = entry.get("matched_share")
    return out


def headline_text(headline):
    if not headline:
        return "No base MDM rows: no speedup."
    ref = headline["reference"]
    mauve, ppl = fmt_ci(ref["mauve"], ref.get("mauve_ci"), 3), fmt_ci(ref["gen_ppl"], ref.get("gen_ppl_ci"), 2)
    lines = [f"Reference: base MDM, fixed schedule, NFE {ref['nfe']:.0f} (MAUVE {mauve}, Gen-PPL {ppl}, "
             f"{ref['seconds_per_sample']:.3f} s/sample). A setting matches when its MAUVE >= the reference's lower "
             f"95% bound and its Gen-PPL <= its upper bound."]
    if not headline["matched"]:
        return "\n".join(lines + ["No other setting matched its quality in this sweep."])
    share = headline.get("matched_share")
    by_nfe, by_time = headline["best_nfe"], headline["best_wallclock"]  # each with the interval of its own ranking
    lines.append(f"- best NFE speedup at matched quality: {by_nfe['method']} ({by_nfe['decoding']}): "
                 f"x{fmt_ci(by_nfe['nfe_speedup'], by_nfe.get('nfe_speedup_ci'), 1)} in NFE, "
                 f"x{by_nfe['wallclock_speedup']:.1f} in wall-clock")
    lines.append(f"- best wall-clock speedup at matched quality: {by_time['method']} ({by_time['decoding']}): "
                 f"x{by_time['nfe_speedup']:.1f} in NFE, "
                 f"x{fmt_ci(by_time['wallclock_speedup'], by_time.get('wallclock_speedup_ci'), 1)} in wall-clock")
    if share is not None:
        lines.append(f"(intervals over {headline['replicates']} bootstrap replicates of the best matching setting; "
                     f"a match in {100 * share:.0f}% of them, 0 counted where none matched)")
    return "\n".join(lines)
