"""Generation (Sec. 5.3, App. B, E, G): the headline quality vs NFE and speedup (Fig. 6 / 12), the ablations
(Fig. 11), the priors' PSNR vs t (Fig. 9) and PRDC (App. E), and the marginal trap (App. B, Theorem B.1).
Each run_* takes eval_context.Context and returns (result, text, panels).

Rows carry bootstrap 95% intervals (eval_context.score_texts); "matches the base" and the speedup intervals are
defined in eval.py's docstring and implemented once here (`match_tests`, `speedup_entry`; eval_speed reuses them
for its older point matches). Beside them fig6 reads evaluation/match.py's curve rule (`curve_match`: the NFE where
each method's curve first reaches the base at NFE = L, interpolated in log NFE, Bonferroni intervals over the
methods), the rule `eval.py speed` makes its headline. fig6 / fig11 / speed record the registers the demasker read
(--keep: eval_context.register_keep).
"""

import dataclasses
import math

import numpy as np
import torch

from evaluation import match
from evaluation import metrics as M
from evaluation.report import fmt_ci, md_table, panel
from experiments.eval_context import (REFRESH_FRACTIONS, nfe_grid, real_reference, register_keep, sampler_decoding,
                                     score_texts, sharded_samples, temperature)


# ------------------------------------------------------------------------------------------------
# Generation: Fig. 6 (headline) and the ablations of Fig. 11
# ------------------------------------------------------------------------------------------------

# The two base MDM references (docs/results.md): "base" is the paper's protocol (the MDM the guided demasker is
# fine-tuned from); "base-equal" (--base-equal) is that MDM trained on for as many more updates as the fine-tune had, so it
# has seen as many demasker updates in total as the guided demasker.
BASES = ("base", "base-equal")


def method_sampler(ctx, method, length, steps, temp, prior=None, cond_prior=None, refresh_at=(0.5,), decoding=None):
    """make_batch for sharded_samples: 'base' (plain MDM, decoded with --base-decoding's remasking, block length and
    EOS handling for this length and rule, its "chosen_adaptive" for a threshold / factor rule, else --remasking
    in one block: eval_base.base_sampler), 'conthendisc' (Alg. 2), 'conwithindisc' (Alg. 3), these two with
    --remasking in one block (the paper's setting), the demasker reading the first --keep registers of each draw
    (eval_context.register_keep; default: all the prior models).
    decoding: mdm.Decoding (None: LLaDA's fixed schedule). With an adaptive rule the NFE is per sample: the mean
    demasker calls of the batch's rows (mdm stats) plus the priors' cost."""
    from generators import conthendisc, conwithindisc
    remasking, prior_steps = ctx.args.remasking, ctx.get("prior_steps")
    adaptive = decoding is not None and decoding.rule != "fixed"
    keep = register_keep(ctx, length)
    decoding = decoding or sampler_decoding(ctx)  # the same token draw (--rng) for every method

    def nfe_of(report, stats):
        calls = float(np.mean(stats["nfe_per_sample"])) if adaptive else report["demasker_calls"]
        extra = report["nfe"] - report["demasker_calls"]
        extra_flops = report.get("nfe_flops", report["nfe"]) - report["demasker_calls"]
        return {"nfe": calls + extra, "nfe_flops": calls + extra_flops, "demasker_calls": calls}

    if method in BASES:  # its own setting: --base-decoding's choice for this length (experiments/eval_base.py); the
        from experiments.eval_base import base_sampler, base_setting  # equal-budget base (--base-equal) decoded the same way
        folder = ctx.args.base_equal if method == "base-equal" else None
        return base_sampler(ctx, base_setting(ctx, length, adaptive), length, steps, temp, decoding, folder)
    demasker, _ = ctx.ae()
    if method == "conthendisc":
        def run(idx, g, pg):
            stats = {}
            tokens, report = conthendisc(demasker, prior, len(idx), length, length, steps, temp, remasking,
                                         prior_steps=prior_steps, generator=g, prior_generator=pg,
                                         decoding=decoding, stats=stats, keep=keep)
            return tokens, nfe_of(report, stats)
        return run

    def run(idx, g, pg):
        stats = {}
        tokens, report = conwithindisc(demasker, cond_prior, len(idx), length, length, steps, temp, remasking,
                                       prior=prior, prior_steps=prior_steps, refresh_at=refresh_at,
                                       refresh_prior_steps=ctx.get("refresh_prior_steps"), generator=g,
                                       prior_generator=pg, decoding=decoding, stats=stats, keep=keep)
        return tokens, nfe_of(report, stats)
    return run


def sweep(ctx, label, length, make_sampler, steps_list, reference_features, reused=None):
    """Rows {"method", "steps", "nfe", metrics...} of one method over the NFE grid (rank 0; None elsewhere);
    reused: {steps: row} already sampled and scored by another record (reused_rows), taken as they are."""
    rows = []
    for steps in steps_list:
        if steps in (reused or {}):
            rows.append(reused[steps])
            continue
        texts, nfe, stats = sharded_samples(ctx, ctx.gen_num, make_sampler(steps),
                                            f"{label} L={length} steps={steps}", with_stats=True)
        if texts is not None:  # nfe: the paper's count (parameter ratio); nfe_flops: ours; wall-clock beside
            rows.append({"method": label, "steps": steps, "nfe": nfe, **stats,
                         **score_texts(ctx, texts, reference_features), "examples": texts[:2]})
    return rows


# Flags that change no fixed-schedule generation row (or that reused_rows compares per method): a --rows-from record
# may differ from this run in these; any other difference refuses the reuse
ROW_FREE_FLAGS = {"command", "name", "out", "overwrite", "threads", "lengths", "length", "nfe", "nfe_grid",
                  "thresholds", "factors", "caches", "cache_block_length", "methods", "guided_max_nfe",
                  "timing_repeats", "timing_batch", "timing_only", "rows_from", "base_equal", "base", "prior",
                  "cond_prior", "length_priors", "length_cond_priors", "func"}
ROW_CHECKPOINTS = {"base": ("base",), "conthendisc": ("prior",), "conwithindisc": ("prior", "cond_prior")}
SPEED_ONLY_KEYS = ("decoding", "tokens_per_step", "setting", "timing")


def reused_rows(ctx, length, folders):
    """--rows-from FILE (a speed record): {method: {steps: row}} of its fixed-schedule rows at this length whose
    samples are the ones this run would draw: the same flags but for ROW_FREE_FLAGS, the same sample count, and
    for each method the same checkpoints (folders: {"base", "prior", "cond_prior"} of this length). The rows are
    bit for bit what sweep would make (same seeds per batch, same reference programs): fig6 samples the rest."""
    if not ctx.args.rows_from:
        return {}
    from infra.atomic import read_json
    from infra.guards import resume_differences
    fix = "drop --rows-from, or give the speed record of a run with these checkpoints and flags"
    record = ctx.cached(("rows_from", ctx.args.rows_from), lambda: read_json(ctx.args.rows_from, fix))  # per length
    results = record.get("results") or {}
    if record.get("experiment") is None or "rows" not in results or "length" not in results:
        raise SystemExit(f"--rows-from {ctx.args.rows_from}: not a speed record (eval.py speed): {fix}")
    earlier, now = record.get("settings", {}), vars(ctx.args)  # a flag the record lacks counts as None
    changed = [k for k, _, _ in resume_differences({k: earlier.get(k) for k in now}, now, ROW_FREE_FLAGS)]
    if changed or results.get("num_samples") != ctx.gen_num:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in changed) or f"--num ({results.get('num_samples')} there)"
        raise SystemExit(f"--rows-from {ctx.args.rows_from}: sampled with other flags ({flags}): {fix}")
    stale = newer_than(record.get("created"), [now.get("ae"), now.get("scorer"), *folders.values()])
    if stale:
        raise SystemExit(f"--rows-from {ctx.args.rows_from}: {stale} changed after the record was made "
                         f"({record.get('created')}): {fix}")
    if results["length"] != length:
        return {}
    out = {}
    for row in results["rows"]:
        method = row["method"]
        same = method in ROW_CHECKPOINTS and all(earlier.get(f) == folders.get(f) for f in ROW_CHECKPOINTS[method])
        if row["decoding"] == "fixed" and same:
            out.setdefault(method, {})[row["steps"]] = {k: v for k, v in row.items() if k not in SPEED_ONLY_KEYS}
    return out


def newer_than(created, folders):
    """The first of `folders` holding a file modified after the ISO time `created` (a record's), else None."""
    import datetime
    from pathlib import Path
    if not created:
        return "(a record without its creation time)"
    made = datetime.datetime.fromisoformat(created).timestamp() + 1  # the record's time is rounded to seconds
    for folder in folders:
        if folder and Path(folder).is_dir() and any(f.stat().st_mtime > made for f in Path(folder).rglob("*")
                                                    if f.is_file() and not f.name.startswith(".")):
            return folder
    return None


def replicate_value(row, key, b=None):
    """row[key], or (b given) its b-th bootstrap replicate; a row without replicates gives its point value."""
    replicates = row.get(f"{key}_replicates") if b is not None else None
    value = row[key] if not replicates else replicates[b]
    return math.nan if value is None else value


def replicate_count(rows):
    """Bootstrap replicates shared by every row (0 when any row has none)."""
    counts = [min(len(r.get("mauve_replicates") or []), len(r.get("gen_ppl_replicates") or [])) for r in rows]
    return min(counts) if counts else 0


def match_tests(reference):
    """{"mauve", "gen_ppl", "both"}: test(row, b=None) -> whether row matches the base reference (eval.py's rule):
    MAUVE >= the reference's lower 95% bound, Gen-PPL <= its upper bound. At replicate b both sides take their
    b-th replicate values and the tolerances (the reference's half-widths) stay. Without intervals: >= and <=."""
    mauve_tolerance = reference["mauve"] - (reference.get("mauve_ci") or [reference["mauve"]])[0]
    ppl_tolerance = (reference.get("gen_ppl_ci") or [None, reference["gen_ppl"]])[1] - reference["gen_ppl"]
    tests = {"mauve": lambda r, b=None: replicate_value(r, "mauve", b) >=
             replicate_value(reference, "mauve", b) - mauve_tolerance,
             "gen_ppl": lambda r, b=None: replicate_value(r, "gen_ppl", b) <=
             replicate_value(reference, "gen_ppl", b) + ppl_tolerance}
    tests["both"] = lambda r, b=None: tests["mauve"](r, b) and tests["gen_ppl"](r, b)
    return tests


def best_match(reference, candidates, test, b=None):
    """(the smallest-NFE matching row, the fastest matching row) at replicate b, or (None, None)."""
    matching = [r for r in candidates if test(r, b)]
    if not matching:
        return None, None
    fastest = min(matching, key=lambda r: r.get("seconds_per_sample", math.inf))
    return min(matching, key=lambda r: r["nfe"]), fastest


def speedup_entry(reference, candidates, test, replicates=0):
    """The matched-quality speedups of `candidates` against `reference` under `test`: in NFE (reference NFE /
    the smallest matching NFE) and in wall-clock (reference seconds/sample / the fastest matching row's), with
    their bootstrap intervals over the replicate index (0 where nothing matches) and the share of replicates
    with a match. at_grid_bottom: the match is the smallest NFE swept (the speedup is bounded by the grid)."""
    def ratios(b):
        first, fastest = best_match(reference, candidates, test, b)
        if first is None:
            return 0.0, 0.0
        seconds = reference.get("seconds_per_sample"), fastest.get("seconds_per_sample")
        return reference["nfe"] / first["nfe"], seconds[0] / seconds[1] if all(seconds) else math.nan
    first, fastest = best_match(reference, candidates, test)
    entry = {"nfe": None, "steps": None, "speedup": None, "time_speedup": None}
    if first is not None:
        nfe_ratio, time_ratio = ratios(None)
        entry.update(nfe=first["nfe"], steps=first["steps"], speedup=nfe_ratio,
                     time_speedup=time_ratio if math.isfinite(time_ratio) else None,
                     seconds_per_sample=fastest.get("seconds_per_sample"),
                     at_grid_bottom=first["nfe"] <= min(r["nfe"] for r in candidates))
    if replicates:
        draws = np.array([ratios(b) for b in range(replicates)])  # (B, 2)
        entry.update(speedup_ci=M.percentile_interval(draws[:, 0]), time_speedup_ci=M.percentile_interval(draws[:, 1]),
                     matched_share=float((draws[:, 0] > 0).mean()))
    return entry


def reference_row(rows, length, method="base"):
    """The base MDM's (`method`'s) row at NFE = length (else its largest NFE), or None without such rows."""
    base = [r for r in rows if r["method"] == method]
    return max(base, key=lambda r: (r["steps"] == length, r["steps"])) if base else None


def speedups(rows, length, base="base"):
    """For each guided method: the smallest NFE at which it matches the base MDM (`base`: "base" or "base-equal")
    at NFE = length (or the base's largest NFE if length was not swept) on MAUVE, Gen-PPL and both (`match_tests`);
    speedup = base NFE / it, time_speedup = base seconds/sample / the fastest matching point's, with intervals."""
    reference = reference_row(rows, length, base)
    if reference is None:
        return {}
    tests, replicates = match_tests(reference), replicate_count(rows)
    keys = ("steps", "nfe", "mauve", "mauve_ci", "gen_ppl", "gen_ppl_ci", "seconds_per_sample", "empty_rate")
    out = {"base_reference": {"method": base, **{k: reference[k] for k in keys if k in reference}},
           "replicates": replicates}
    empty = reference.get("empty_rate", 0.0)
    if empty > 0.5:  # e.g. an undertrained MDM whose one-block low-confidence decoding fills all EOS first
        out["base_reference"]["degenerate"] = f"{100 * empty:.0f}% of the base MDM's samples are empty"
    for method in sorted({r["method"] for r in rows} - set(BASES)):
        candidates = [r for r in rows if r["method"] == method]
        out[method] = {name: speedup_entry(reference, candidates, test, replicates) for name, test in tests.items()}
    return out


def generation_table(rows):
    """Every row with its intervals: `value [lo, hi]` (bootstrap 95%), the empty share for every method."""
    def mauve(r):
        if r.get("mauve_ci") is None and len(r.get("mauve_seeds", [])) > 1:
            return f"{r['mauve']:.3f} ± {r['mauve_sd']:.3f}"
        return fmt_ci(r["mauve"], r.get("mauve_ci"), 3)
    return md_table(["method", "steps", "NFE (paper)", "NFE (FLOPs)", "s/sample", "MAUVE [95% CI]",
                     "Gen-PPL [95% CI]", "entropy", "parse", "empty", "dup"],
                    [[r["method"], r["steps"], f"{r['nfe']:.1f}", f"{r.get('nfe_flops', r['nfe']):.1f}",
                      f"{r.get('seconds_per_sample', float('nan')):.3f}", mauve(r),
                      fmt_ci(r["gen_ppl"], r.get("gen_ppl_ci"), 2), f"{r['unigram_entropy']:.2f}",
                      f"{r['parse_rate']:.2f}", fmt_ci(r["empty_rate"], r.get("empty_rate_ci"), 2),
                      f"{r['duplicate_rate']:.2f}"] for r in rows])


def ceiling_text(ceiling):
    """One sentence on the real-vs-real ceiling with its intervals."""
    size = f" ({ceiling['num_programs']} programs vs a reference of {ceiling['reference_size']})" \
        if "reference_size" in ceiling else ""
    mauve = fmt_ci(ceiling["mauve"], ceiling.get("mauve_ci"), 3) if "mauve" in ceiling else "n/a"
    ppl = fmt_ci(ceiling["gen_ppl"], ceiling.get("gen_ppl_ci"), 2)
    return (f"Real held-out programs{size}: MAUVE {mauve}, Gen-PPL {ppl}, entropy {ceiling['unigram_entropy']:.2f}, "
            f"empty {ceiling['empty_rate']:.2f}."
            + (f" Note: {ceiling['note']}." if ceiling.get("note") else ""))


def generation_panels(title, rows, ceiling=None, wallclock=False):
    """MAUVE and Gen-PPL vs NFE (log x; error bars: the 95% intervals; grey band: the real-vs-real ceiling),
    and with wallclock MAUVE vs seconds per sample."""
    methods = sorted({r["method"] for r in rows}, key=lambda m: [r["method"] for r in rows].index(m))

    def series(x, key):
        out = {}
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            bounds = [r.get(f"{key}_ci") or [math.nan, math.nan] for r in mine]
            out[m] = ([r[x] for r in mine], [r[key] for r in mine], [b[0] for b in bounds], [b[1] for b in bounds])
        return out

    def band(key, name):
        if not ceiling or key not in ceiling:
            return None
        lo, hi = ceiling.get(f"{key}_ci") or [ceiling[key], ceiling[key]]
        return (lo, hi, f"real programs ({name})")
    panels = [panel(f"{title}: MAUVE vs NFE", "NFE (log scale)", "MAUVE (higher is better)",
                    series("nfe", "mauve"), logx=True, band=band("mauve", "95% CI")),
              panel(f"{title}: Gen-PPL vs NFE", "NFE (log scale)", "Gen-PPL (log scale, lower is better)",
                    series("nfe", "gen_ppl"), logx=True, logy=True, band=band("gen_ppl", "95% CI"))]
    if wallclock and all("seconds_per_sample" in r for r in rows):
        panels.append(panel(f"{title}: MAUVE vs wall-clock", "seconds per sample (log scale)",
                            "MAUVE (higher is better)", series("seconds_per_sample", "mauve"), logx=10,
                            band=band("mauve", "95% CI")))
    return panels


def length_priors(pairs, flag):
    """{L: folder} from --length-priors / --length-cond-priors values "L=DIR" (the paper: one prior per length,
    K = 8 at L = 512 and K = 16 at L = 1024)."""
    out = {}
    for pair in pairs or []:
        length, sep, folder = pair.partition("=")
        if not sep or not length.isdigit():
            raise ValueError(f"{flag} takes L=DIR pairs (e.g. 512=runs/prior-k8), got {pair!r}")
        out[int(length)] = folder
    return out


def run_fig6(ctx):
    per_length = length_priors(ctx.args.length_priors, "--length-priors")
    per_length_cond = length_priors(ctx.args.length_cond_priors, "--length-cond-priors")
    temp = temperature(ctx, 1.0)
    result, sections, panels = {"temperature": temp, "lengths": {}, "priors": {}}, [], []
    for length in ctx.args.lengths or ctx.get("lengths"):
        prior = ctx.prior(per_length.get(length, ctx.args.prior))
        cond_folder = per_length_cond.get(length, ctx.args.cond_prior)
        cond_prior = ctx.prior(cond_folder, "--cond-prior") if cond_folder else None
        result["priors"][str(length)] = {"prior": per_length.get(length, ctx.args.prior), "cond_prior": cond_folder}
        reference_features, ceiling = real_reference(ctx, length, ctx.gen_num)
        steps_list = nfe_grid(ctx, length)
        methods = [("base", {})] + ([("base-equal", {})] if ctx.args.base_equal else [])
        guided = ctx.args.methods if ctx.args.methods is not None else ["conthendisc", "conwithindisc"]  # --methods
        if "conthendisc" in guided:
            methods.append(("conthendisc", {"prior": prior}))
        if cond_prior is not None and "conwithindisc" in guided:
            methods.append(("conwithindisc", {"prior": prior, "cond_prior": cond_prior}))
        guided_steps = [s for s in steps_list if s <= (ctx.args.guided_max_nfe or length)]
        if not guided_steps:
            raise SystemExit(f"eval.py fig6: --guided-max-nfe {ctx.args.guided_max_nfe} is below the smallest NFE of "
                             f"the grid ({steps_list[0]}): raise it or extend --nfe down to it")
        grids = {method: steps_list if method in BASES else guided_steps for method, _ in methods}
        available = reused_rows(ctx, length, {"base": ctx.args.base, "prior": per_length.get(length, ctx.args.prior),
                                              "cond_prior": cond_folder})
        reused = {m: {s: row for s, row in by_steps.items() if s in grids[m]}  # only the rows this run sweeps
                  for m, by_steps in available.items() if m in grids}
        reused = {m: by_steps for m, by_steps in reused.items() if by_steps}
        rows = []
        for method, kwargs in methods:
            rows += sweep(ctx, method, length, lambda s, m=method, k=kwargs: method_sampler(ctx, m, length, s, temp, **k),
                          grids[method], reference_features, reused.get(method))
        if ctx.env.is_main:
            entry = {"rows": rows, "real": ceiling, "speedup": speedups(rows, length),
                     "keep": register_keep(ctx, length), "registers_read": register_keep(ctx, length) or
                     prior.num_registers, "curves": curve_match(rows, length)}
            if guided_steps != steps_list:
                entry["guided_max_nfe"] = max(guided_steps)
            if reused:
                entry["rows_from"] = {"record": str(ctx.args.rows_from),
                                      "rows": {m: sorted(by_steps) for m, by_steps in reused.items()}}
            text = speedup_text(entry["speedup"], length)
            if entry["curves"]:
                text += "\n\n" + match.rule_text(entry["curves"]) + "\n\n" + match.curves_text(entry["curves"])
            if guided_steps != steps_list:
                text += (f"\n\nThe guided methods were swept up to NFE {max(guided_steps)} (--guided-max-nfe); a match "
                         f"above it is not measured here.")
            if reused:
                text += (f"\n\nRows taken from {ctx.args.rows_from} (--rows-from; the same samples, not drawn again): "
                         + "; ".join(f"{m} at NFE steps {', '.join(map(str, sorted(by_steps)))}"
                                     for m, by_steps in reused.items()) + ".")
            if ctx.args.base_equal:  # the second reference: the same speedups against the equal-budget base
                entry["speedup_equal_budget"] = speedups(rows, length, "base-equal")
                text += "\n\n" + speedup_text(entry["speedup_equal_budget"], length)
            result["lengths"][str(length)] = entry
            sections.append(f"### L = {length}\n\n{ceiling_text(ceiling)}\n\n" + generation_table(rows) + "\n\n"
                            + text)
            panels += generation_panels(f"Fig. 6 (L={length})", rows, ceiling, wallclock=True)
    if not ctx.env.is_main:
        return None, None, None
    result.update(num_samples=ctx.gen_num, bootstrap=ctx.get("bootstrap"), prior_steps=ctx.get("prior_steps"),
                  refresh_prior_steps=ctx.get("refresh_prior_steps"), refresh_at=[0.5])
    return result, "\n\n".join(sections), panels


def curve_match(rows, length):
    """evaluation/match.py's curve rule over fig6's rows: one curve per method, the base at NFE = L the
    reference; {} without base rows. The equal-budget base (another model) keeps its point speedups only."""
    reference = reference_row(rows, length)
    if reference is None:
        return {}
    curves = {m: [r for r in rows if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rows)
              if m != "base-equal"}
    return match.read_curves(reference, curves, replicate_count(rows), bases=BASES)


def speedup_phrase(entry):
    """'x6.2 [3.1, 12.4] at NFE 10.3, x5.0 [2.2, 9.9] in wall-clock' for a speedup_entry."""
    if not entry["speedup"]:
        share = entry.get("matched_share")
        return "not matched in the sweep" + (f" (matched in {100 * share:.0f}% of replicates)" if share else "")
    text = f"x{fmt_ci(entry['speedup'], entry.get('speedup_ci'), 1)} at NFE {entry['nfe']:.1f}"
    if entry.get("time_speedup") is not None and math.isfinite(entry["time_speedup"]):
        text += f", x{fmt_ci(entry['time_speedup'], entry.get('time_speedup_ci'), 1)} in wall-clock"
    if entry.get("at_grid_bottom"):
        text += " (the smallest NFE swept: bounded by the grid)"
    return text


def speedup_text(info, length):
    if not info:
        return "No base MDM rows: no speedup."
    ref = info["base_reference"]
    name = {"base": "the base MDM", "base-equal": "the equal-budget base MDM"}[ref.get("method", "base")]
    lines = [f"Speedup vs {name} at NFE {ref['nfe']:.0f} (MAUVE {fmt_ci(ref['mauve'], ref.get('mauve_ci'), 3)}, "
             f"Gen-PPL {fmt_ci(ref['gen_ppl'], ref.get('gen_ppl_ci'), 2)}). A point matches on MAUVE when its MAUVE "
             f">= the base's lower 95% bound, on Gen-PPL when its Gen-PPL <= the base's upper bound; speedup intervals: "
             f"{info.get('replicates', 0)} bootstrap replicates (0 where nothing matched):"]
    if ref.get("degenerate"):
        lines.append(f"- WARNING: the reference is degenerate ({ref['degenerate']}); a speedup against it means "
                     "nothing. Try --remasking random or a better-trained base MDM.")
    for method, tests in info.items():
        if method in ("base_reference", "replicates"):
            continue
        lines.append(f"- {method}: " + "; ".join(f"{name}: {speedup_phrase(t)}" for name, t in tests.items()))
    return "\n".join(lines)


def run_fig11(ctx):
    length = ctx.args.length or ctx.get("lengths")[0]
    temp = temperature(ctx, 1.0)
    steps_list = ctx.args.nfe or [s for s in nfe_grid(ctx, length) if s < length][-3:] or [length]
    reference_features, ceiling = real_reference(ctx, length, ctx.gen_num)
    prior = ctx.prior(ctx.args.prior)
    rows = {"registers": [], "refresh": [], "offsets": []}
    for folder in ctx.args.k_priors or [ctx.args.prior]:
        k_prior = ctx.prior(folder, "--k-priors")
        rows["registers"] += sweep(ctx, f"K={register_keep(ctx, length) or k_prior.num_registers}", length,
                                   lambda s, p=k_prior: method_sampler(ctx, "conthendisc", length, s, temp, prior=p),
                                   steps_list, reference_features)
    if ctx.args.cond_prior:
        cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
        for fraction in REFRESH_FRACTIONS:
            rows["refresh"] += sweep(ctx, f"@{fraction:g}", length, lambda s, f=fraction: method_sampler(
                ctx, "conwithindisc", length, s, temp, prior=prior, cond_prior=cond_prior, refresh_at=(f,)),
                steps_list, reference_features)
    offsets = [("offsets on", prior)]
    if prior.block_offsets:
        offsets.append(("trained on, sampled off", dataclasses.replace(prior, block_offsets=False)))
    if ctx.args.prior_no_offsets:
        offsets.append(("trained off", ctx.prior(ctx.args.prior_no_offsets, "--prior-no-offsets")))
    for label, p in offsets:
        rows["offsets"] += sweep(ctx, label, length, lambda s, p=p: method_sampler(ctx, "conthendisc", length, s,
                                                                                   temp, prior=p),
                                 steps_list, reference_features)
    if not ctx.env.is_main:
        return None, None, None
    result = {"length": length, "temperature": temp, "steps": steps_list, "real": ceiling,
              "keep": register_keep(ctx, length), **rows}
    missing = [flag for flag, given in (("--k-priors", ctx.args.k_priors), ("--cond-prior", ctx.args.cond_prior),
                                        ("--prior-no-offsets", ctx.args.prior_no_offsets)) if not given]
    text = ceiling_text(ceiling) + "\n\n" + "\n\n".join(f"### {name}\n\n" + generation_table(r)
                                                       for name, r in rows.items() if r)
    if missing:
        text += "\n\nNot run (flags not given): " + ", ".join(missing)
    panels = [p for name, r in rows.items() if r for p in generation_panels(f"Fig. 11 {name}", r, ceiling)]
    return result, f"Ablations at L={length} ({ctx.gen_num} samples per point).\n\n" + text, panels


# ------------------------------------------------------------------------------------------------
# The priors: PSNR vs t (Fig. 9) and PRDC (App. E)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def clean_registers(ctx, programs, num_registers):
    """z_0 = h_phi(x_0), the first num_registers registers (what the priors model), float32 on the device."""
    _, encoder = ctx.ae()
    z = encoder(programs["enc_ids"].to(ctx.device), attention_mask=programs["enc_mask"].to(ctx.device))
    return z[:, :num_registers].float()


@torch.no_grad()
def partial_condition(ctx, cond_prior, programs, ratio, seed):
    """h(x^(r)) for a conditional prior: each DEMASKER position masked with probability r, then the encoder's
    view of that canvas (generators.embed_canvas with the prior's cross-tokenizer view): what conditional
    training builds (train_prior.conditioning_inputs) and what ConWithinDisc presents."""
    from generators import embed_canvas
    from dataprep.latent_data import mask_positions
    ids = programs["ids"].to(ctx.device)
    u = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device)
    masked = mask_positions(u, torch.full((ids.shape[0],), ratio, device=ctx.device))
    return embed_canvas(cond_prior.encoder, ids.masked_fill(masked, -1), -1, ctx.eos_id,
                        view=getattr(cond_prior, "view", None))


def run_fig9(ctx):
    from schedules import q_sample, register_times
    priors = {"unconditional": ctx.prior(ctx.args.prior)}
    if ctx.args.cond_prior:
        priors["conditional"] = ctx.prior(ctx.args.cond_prior, "--cond-prior")
    programs = ctx.held_out(ctx.get("num"))
    points = ctx.get("psnr_points")
    times = [i / (points - 1) for i in range(points)]
    curves = {}
    for name, prior in priors.items():
        z0 = clean_registers(ctx, programs, prior.num_registers)  # (n, K, d)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(ctx.args.seed)).to(ctx.device)
        cond, cond_mask = (None, None) if not prior.conditional else \
            partial_condition(ctx, prior, programs, ctx.args.cond_ratio, ctx.args.seed + 1)
        dtype = next(prior.dit.parameters()).dtype
        values = []
        for t_value in times:
            t = register_times(torch.full((z0.shape[0],), t_value), prior.num_registers, prior.max_offset,
                               prior.block_offsets).to(ctx.device)
            with torch.no_grad():
                pred = prior.dit(q_sample(z0, t, noise).to(dtype), t, None if cond is None else cond.to(dtype),
                                 cond_mask).float()
            values.append(float(M.psnr(pred, z0).mean()))
        curves[name] = values
    result = {"t": times, "psnr_db": curves, "num_programs": programs["ids"].shape[0], "cond_ratio": ctx.args.cond_ratio,
              "psnr_convention": "10 log10(1 / MSE per entry): registers have entry mean square 1 (norm sqrt(d))"}
    table = md_table(["t"] + list(curves), [[f"{t:.2f}"] + [f"{curves[n][i]:.2f}" for n in curves]
                                           for i, t in enumerate(times)])
    panels = [panel("Fig. 9: PSNR of g(z_t, t) vs z_0", "t", "PSNR (dB)", {n: (times, v) for n, v in curves.items()})]
    return result, "PSNR in dB with peak = 1 (the RMS of a register entry).\n\n" + table, panels


def run_prdc(ctx):
    from generators import sample_registers
    num, k = ctx.get("num"), ctx.args.prdc_k
    prior = ctx.prior(ctx.args.prior)
    real_programs = ctx.held_out(num)
    real = clean_registers(ctx, real_programs, prior.num_registers).cpu().numpy()
    results = {}
    try:
        other = clean_registers(ctx, ctx.held_out(num, skip=num), prior.num_registers).cpu().numpy()
        results["real_vs_real"] = M.prdc_per_register(real, other, k)
    except ValueError as error:
        print(f"prdc: no second held-out set for the real-vs-real reference ({error})")
    generator = torch.Generator().manual_seed(ctx.args.seed)
    fake, _ = sample_registers(prior, num, ctx.get("prior_steps"), generator=generator)
    results["unconditional"] = M.prdc_per_register(real, fake.cpu().numpy(), k)
    if ctx.args.cond_prior:
        cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
        given = ctx.held_out(num, skip=num) if "real_vs_real" in results else real_programs
        cond, cond_mask = partial_condition(ctx, cond_prior, given, ctx.args.cond_ratio, ctx.args.seed + 1)
        fake, _ = sample_registers(cond_prior, num, ctx.get("prior_steps"), cond, cond_mask, generator=generator)
        results["conditional"] = M.prdc_per_register(real, fake.cpu().numpy(), k)
    names = ("precision", "recall", "density", "coverage")
    table = md_table(["samples"] + list(names), [[n] + [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in names]
                                                 for n, r in results.items()])
    result = {"k": k, "num": num, "prior_steps": ctx.get("prior_steps"), "cond_ratio": ctx.args.cond_ratio,
              **results}
    return result, f"PRDC (k={k}) per register index, mean ± sd over the {prior.num_registers} registers.\n\n" + table, []


# ------------------------------------------------------------------------------------------------
# App. B: the marginal trap
# ------------------------------------------------------------------------------------------------


def run_marginal_trap(ctx):
    """App. B with every method: base, guided (oracle registers), ConThenDisc and ConWithinDisc with priors
    trained on the trap's bank, under the fixed schedule and threshold decoding (marginal_trap.run / report)."""
    from experiments import marginal_trap
    if not ctx.env.is_main:
        return None, None, None
    result = marginal_trap.run(pairs=ctx.args.trap_pairs, choices=ctx.args.trap_choices,
                               train_steps=ctx.get("trap_steps"), num_samples=ctx.get("trap_samples"),
                               seed=ctx.args.seed, trials=ctx.get("trap_trials"),
                               thresholds=ctx.args.thresholds or marginal_trap.THRESHOLDS,
                               prior_steps=ctx.get("prior_steps"), refresh_prior_steps=ctx.get("refresh_prior_steps"),
                               prior_train_steps=ctx.args.trap_prior_steps,
                               conditionings=ctx.args.trap_conditionings or marginal_trap.DEFAULT_CONDITIONINGS)
    text, panels = marginal_trap.report(result)
    return result, text, panels


