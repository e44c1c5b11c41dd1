"""The speed headline (issue 14; the paper's claim of Sec. 5.3: many tokens per step are safe when registers
carry the cross-token dependencies): quality against NFE and against wall-clock, measured side by side in one
run on one machine, for the base MDM, ConThenDisc and ConWithinDisc, each decoded with LLaDA's fixed schedule
over the NFE grid and with Fast-dLLM's confidence threshold (mdm.Decoding, adaptive per-sample NFE).

Every row: method, decoding, NFE (the paper's count; adaptive rules: the mean demasker calls per sample plus
the priors by parameter ratio), nfe_flops, demasker calls, tokens per step, seconds per sample, MAUVE (± sd over
k-means seeds when --mauve-seeds > 1) and Gen-PPL. The reference is the base MDM at NFE = L with the fixed
schedule; for each other row that matches it (MAUVE >= and Gen-PPL <=) the speedups in NFE and in wall-clock;
the headline is the best of each.
"""

from eval_context import nfe_grid, real_reference, score_texts, sharded_samples, temperature
from eval_generation import method_sampler
from report import md_table, panel

THRESHOLDS = [0.5, 0.7, 0.9, 0.99]


def run_speed(ctx):
    from mdm import Decoding
    length = ctx.args.length or ctx.get("lengths")[0]
    prior = ctx.prior(ctx.args.prior)
    cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior") if ctx.args.cond_prior else None
    temp = temperature(ctx, 1.0)
    reference_features, ceiling = real_reference(ctx, length, ctx.get("num"))
    methods = [("base", {}), ("conthendisc", {"prior": prior})]
    if cond_prior is not None:
        methods.append(("conwithindisc", {"prior": prior, "cond_prior": cond_prior}))
    settings = [("fixed", steps, Decoding()) for steps in nfe_grid(ctx, length)]
    settings += [(f"threshold {tau}", length, Decoding(rule="threshold", threshold=tau))
                 for tau in (ctx.args.thresholds or THRESHOLDS)]
    rows = []
    for method, kwargs in methods:
        for label, steps, decoding in settings:
            sampler = method_sampler(ctx, method, length, steps, temp, decoding=decoding, **kwargs)
            texts, nfe, stats = sharded_samples(ctx, ctx.get("num"), sampler, f"{method} {label} L={length}",
                                                with_stats=True)
            if texts is not None:
                rows.append({"method": method, "decoding": label, "steps": steps, "nfe": nfe, **stats,
                             "tokens_per_step": length / max(stats["demasker_calls"], 1e-9),
                             **score_texts(ctx, texts, reference_features), "examples": texts[:2]})
    if not ctx.env.is_main:
        return None, None, None
    headline = speed_headline(rows, length)
    result = {"length": length, "temperature": temp, "num_samples": ctx.get("num"), "rows": rows, "real": ceiling,
              "headline": headline}
    table = md_table(["method", "decoding", "NFE", "tokens/step", "s/sample", "MAUVE", "Gen-PPL"],
                     [[r["method"], r["decoding"], f"{r['nfe']:.1f}", f"{r['tokens_per_step']:.1f}",
                       f"{r['seconds_per_sample']:.3f}", f"{r['mauve']:.3f}" + (
                           f" ± {r['mauve_sd']:.3f}" if len(r["mauve_seeds"]) > 1 else ""), f"{r['gen_ppl']:.2f}"]
                      for r in rows])
    def series(x):  # one curve per method and rule: (x values, MAUVE)
        curves = {}
        for m, _ in methods:
            for rule in ("fixed", "threshold"):
                mine = [r for r in rows if r["method"] == m and r["decoding"].split()[0] == rule]
                curves[f"{m} {rule}"] = ([r[x] for r in mine], [r["mauve"] for r in mine])
        return curves
    panels = [panel(f"Speed (L={length}): MAUVE vs NFE", "NFE", "MAUVE", series("nfe"), logx=True),
              panel(f"Speed (L={length}): MAUVE vs seconds per sample", "s/sample", "MAUVE",
                    series("seconds_per_sample"), logx=True)]
    return result, table + "\n\n" + headline_text(headline), panels


def speed_headline(rows, length):
    """Matched-quality speedups against the base MDM at NFE = L (fixed schedule), in NFE and in wall-clock."""
    base = [r for r in rows if r["method"] == "base" and r["decoding"] == "fixed"]
    if not base:
        return {}
    ref = max(base, key=lambda r: (r["steps"] == length, r["steps"]))
    matched = [r for r in rows if r is not ref and r["mauve"] >= ref["mauve"] and r["gen_ppl"] <= ref["gen_ppl"]]
    out = {"reference": {k: ref[k] for k in ("nfe", "seconds_per_sample", "mauve", "gen_ppl")}, "matched": []}
    for r in matched:
        out["matched"].append({"method": r["method"], "decoding": r["decoding"], "nfe": r["nfe"],
                               "nfe_speedup": ref["nfe"] / r["nfe"],
                               "wallclock_speedup": ref["seconds_per_sample"] / r["seconds_per_sample"]})
    if out["matched"]:
        out["best_nfe"] = max(out["matched"], key=lambda m: m["nfe_speedup"])
        out["best_wallclock"] = max(out["matched"], key=lambda m: m["wallclock_speedup"])
    return out


def headline_text(headline):
    if not headline:
        return "No base MDM rows: no speedup."
    ref = headline["reference"]
    lines = [f"Reference: base MDM, fixed schedule, NFE {ref['nfe']:.0f} (MAUVE {ref['mauve']:.3f}, Gen-PPL "
             f"{ref['gen_ppl']:.2f}, {ref['seconds_per_sample']:.3f} s/sample)."]
    if not headline["matched"]:
        return "\n".join(lines + ["No other setting matched its quality (MAUVE >= and Gen-PPL <=) in this sweep."])
    for key, what in (("best_nfe", "NFE"), ("best_wallclock", "wall-clock")):
        best = headline[key]
        lines.append(f"- best {what} speedup at matched quality: {best['method']} ({best['decoding']}): "
                     f"x{best['nfe_speedup']:.1f} in NFE, x{best['wallclock_speedup']:.1f} in wall-clock")
    return "\n".join(lines)
