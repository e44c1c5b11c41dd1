"""The speed headline (docs/results.md; the paper's claim of Sec. 5.3: many tokens per step are safe when
registers carry the cross-token dependencies): quality against NFE and against wall-clock, measured side by side
in one run on one machine, for the base MDM, ConThenDisc and ConWithinDisc, each decoded with LLaDA's fixed
schedule over the NFE grid (the fine grid 1, 2, 3, 4, 6, 8, 12, ... up to L by default: eval_context.nfe_grid)
and with Fast-dLLM's adaptive rules, the confidence threshold (--thresholds) and the factor rule (--factors)
(mdm.Decoding, adaptive per-sample NFE); with --caches, base rows at NFE = L decoded with the approximate
key/value cache (its quality cost and speed).

The base MDM is decoded at its own best setting when --base-decoding is given (experiments/eval_base.py): its
fixed rows with the file's "chosen", its threshold / factor rows with its "chosen_adaptive" (e.g. semi-AR blocks
of 32, where one block would reveal the confident EOS tail first); every base row records its setting. The
guided methods keep one block (the paper's setting) and read the first --keep registers of each draw.

Three passes:
1. quality: every row sampled (--num, sharded over ranks) and scored (MAUVE, Gen-PPL, bootstrap replicates);
2. timing (experiments/eval_timing.py): every row's sampler timed again, alone, interleaved, --timing-repeats
   times on one batch: median seconds per sample with [min, max]. --timing-only runs this pass alone on the rows
   of the record an earlier run with the same flags wrote with --timing-repeats 0 (quality_record checks it), so
   that the quality pass can share the machine and the timing pass need not (scripts/reproduce.sh);
3. matched quality (evaluation/match.py, its rule written in the report before the numbers): one curve per
   method and rule, the speedup read where a curve first reaches the base at NFE = L (its point value),
   interpolated in log NFE, intervals over the bootstrap replicates at level 1 - 0.05/m (Bonferroni over the m
   curves), wall-clock from the timing pass (repeat-paired). This is the headline; the older point matches
   (eval_generation.match_tests: a row within the reference's interval, the best over rows) are kept beside it
   as "matches", for comparison.

Every row: method, decoding, NFE (the paper's count; adaptive rules: the mean demasker calls per sample plus
the priors by parameter ratio), nfe_flops, demasker calls, tokens per step, seconds per sample (the quality
pass) and "timing" (the timing pass), MAUVE and Gen-PPL with their bootstrap 95% intervals, the share of empty
samples.
"""

import math

from evaluation import match
from evaluation.report import fmt_ci, md_table, panel
from experiments.eval_base import base_sampler, base_setting, configuration
from experiments.eval_context import (nfe_grid, real_reference, register_keep, sampler_decoding, score_texts,
                                      sharded_samples, temperature)
from experiments.eval_generation import ceiling_text, match_tests, method_sampler, replicate_count, speedup_entry
from experiments.eval_timing import timing_pass, timing_text

THRESHOLDS = [0.5, 0.7, 0.9, 0.99]
FACTORS = [1.0]


def decodings(ctx, length, method="base"):
    """(label, steps, mdm.Decoding) of each row of a method: the fixed schedule over the grid (a guided method's
    only up to --guided-max-nfe), then the rules (--thresholds / --factors given with no value: none)."""
    grid = nfe_grid(ctx, length, kind="fine")
    if method != "base":
        grid = [steps for steps in grid if steps <= (ctx.args.guided_max_nfe or length)]
    settings = [("fixed", steps, sampler_decoding(ctx)) for steps in grid]
    settings += [(f"threshold {tau}", length, sampler_decoding(ctx, rule="threshold", threshold=tau))
                 for tau in (THRESHOLDS if ctx.args.thresholds is None else ctx.args.thresholds)]
    settings += [(f"factor {f}", length, sampler_decoding(ctx, rule="factor", factor=f))
                 for f in (FACTORS if ctx.args.factors is None else ctx.args.factors)]
    return settings


def cache_setting(ctx, length):
    """The base's chosen setting (remasking, EOS handling) in semi-autoregressive blocks of --cache-block-length
    (the largest length <= it that divides L): the approximate key/value cache reuses keys and values within
    a block, so in one block it would recompute everything at every step."""
    block = max(b for b in range(1, min(ctx.args.cache_block_length, length) + 1) if length % b == 0)
    return {**base_setting(ctx, length), "block_length": block}


def cache_rows(ctx, length):
    """With --caches: (label, steps, decoding, base setting) of the base MDM at NFE = L in blocks (cache_setting)
    without a cache (unless the base's chosen setting already is these blocks: then its fixed row is that row), then
    with each cache (extensions/kv_cache.py): its quality cost and speed against the same blocks."""
    if not ctx.args.caches:
        return []
    setting = cache_setting(ctx, length)
    # the base's own setting already in these blocks: its fixed row at NFE = L is the uncached row (not sampled twice)
    own = configuration(setting) == configuration(base_setting(ctx, length))
    return [(f"fixed, blocks of {setting['block_length']}" + (f", cache {mode}" if mode != "none" else ""), length,
             sampler_decoding(ctx, cache=mode), setting) for mode in ([] if own else ["none"]) + ctx.args.caches]


def row_plan(ctx, methods, length, temp):
    """(method, decoding label, steps, base setting or None, sampler) of every row, in the record's order."""
    plan = []
    for method, kwargs in methods:
        settings = [(*row, None) for row in decodings(ctx, length, method)]  # None: the method's own setting
        for label, steps, decoding, setting in settings + (cache_rows(ctx, length) if method == "base" else []):
            if setting is not None:  # a cache row: the base in semi-AR blocks
                sampler = base_sampler(ctx, setting, length, steps, temp, decoding)
            else:
                sampler = method_sampler(ctx, method, length, steps, temp, decoding=decoding, **kwargs)
                setting = base_setting(ctx, length, decoding.rule != "fixed") if method == "base" else None
            plan.append((method, label, steps, setting, sampler))
    return plan


def quality_rows(ctx, plan, length, reference_features):
    """Pass 1: every planned row sampled and scored; rank 0 (empty elsewhere)."""
    rows = []
    for method, label, steps, setting, sampler in plan:
        texts, nfe, stats = sharded_samples(ctx, ctx.gen_num, sampler, f"{method} {label} L={length}",
                                            with_stats=True)
        if texts is None:
            continue
        row = {"method": method, "decoding": label, "steps": steps, "nfe": nfe, **stats,
               "tokens_per_step": length / max(stats["demasker_calls"], 1e-9),
               **score_texts(ctx, texts, reference_features), "examples": texts[:2]}
        if setting is not None:
            row["setting"] = setting
        rows.append(row)
    return rows


# Flags that change neither the rows nor their samples: a --timing-only run may differ from the quality pass in these
TIMING_ONLY_FREE = ("timing_only", "timing_repeats", "timing_batch", "threads", "overwrite")


def quality_record(ctx, plan):
    """--timing-only: the record OUT/NAME.json of a speed quality pass with the same flags and the same rows."""
    from pathlib import Path

    from infra.atomic import read_json
    from infra.guards import resume_differences
    path = Path(ctx.args.out) / f"{ctx.args.name or 'speed'}.json"
    fix = "run the same command without --timing-only (with --timing-repeats 0) first"
    if not path.is_file():
        raise SystemExit(f"eval.py speed --timing-only: no quality record {path} to time: {fix}")
    record = read_json(path, fix)
    if record.get("experiment") != (ctx.args.name or "speed") or "rows" not in (record.get("results") or {}):
        raise SystemExit(f"eval.py speed --timing-only: {path} is not a speed record: {fix}")
    earlier, now = record.get("settings", {}), vars(ctx.args)  # a flag the record lacks counts as None
    changed = resume_differences({k: earlier.get(k) for k in now}, now, (*TIMING_ONLY_FREE, "func"))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({old!r} there, {new!r} here)" for k, old, new in changed)
        raise SystemExit(f"eval.py speed --timing-only: {path} was sampled with other flags: {flags}; time it "
                         f"with the quality pass's flags, or {fix}")
    rows = record["results"]["rows"]
    planned = [(method, label, steps) for method, label, steps, *_ in plan]
    recorded = [(r["method"], r["decoding"], r["steps"]) for r in rows]
    if planned != recorded:
        raise SystemExit(f"eval.py speed --timing-only: {path} has other rows than these flags make "
                         f"({len(recorded)} recorded, {len(planned)} planned): {fix}")
    return record


def curve_name(row):
    """'conthendisc threshold', 'base fixed', 'base blocks', 'base cache dual': one curve per method and rule."""
    rule = row["decoding"].split()[0].rstrip(",")
    if "cache" in row["decoding"]:
        rule = "cache " + row["decoding"].split()[-1]
    elif "blocks of" in row["decoding"]:
        rule = "blocks"
    return f"{row['method']} {rule}"


def curves_of(rows):
    """{curve name: its rows sorted by NFE}, in the rows' order."""
    curves = {}
    for row in rows:
        curves.setdefault(curve_name(row), []).append(row)
    return {name: sorted(mine, key=lambda r: r["nfe"]) for name, mine in curves.items()}


def reference_of(rows, length):
    """The base MDM's fixed-schedule row at NFE = L (else its largest), or None."""
    base = [r for r in rows if r["method"] == "base" and r["decoding"] == "fixed"]
    return max(base, key=lambda r: (r["steps"] == length, r["steps"])) if base else None


def run_speed(ctx):
    length = ctx.args.length or ctx.get("lengths")[0]
    prior = ctx.prior(ctx.args.prior)
    cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior") if ctx.args.cond_prior else None
    temp = temperature(ctx, 1.0)
    methods = [("base", {}), ("conthendisc", {"prior": prior})]
    if cond_prior is not None:
        methods.append(("conwithindisc", {"prior": prior, "cond_prior": cond_prior}))
    if ctx.args.methods is not None:  # a subset (the base is always kept: it is the reference)
        methods = [(m, kw) for m, kw in methods if m == "base" or m in ctx.args.methods]
    plan = row_plan(ctx, methods, length, temp)
    samplers = [sampler for *_, sampler in plan]
    if ctx.args.timing_only:  # the rows of an earlier quality pass (--timing-repeats 0), timed here, alone
        earlier = quality_record(ctx, plan)
        rows, ceiling = earlier["results"]["rows"], earlier["results"]["real"]
    else:
        reference_features, ceiling = real_reference(ctx, length, ctx.gen_num)
        rows = quality_rows(ctx, plan, length, reference_features)
    if not ctx.env.is_main:
        return None, None, None
    timing = None
    repeats = ctx.get("timing_repeats")
    if repeats:  # pass 2, after every quality row: the times apart from the sampling and scoring
        timed, timing = timing_pass(ctx, samplers, repeats, ctx.args.timing_batch or ctx.get("batch_size"))
        for row, entry in zip(rows, timed):
            row["timing"] = entry
    reference, curves = reference_of(rows, length), curves_of(rows)
    headline = match.read_curves(reference, curves, replicate_count(rows)) if reference else {}
    keep = register_keep(ctx, length)
    result = {"length": length, "temperature": temp, "num_samples": ctx.gen_num, "bootstrap": ctx.get("bootstrap"),
              "keep": keep, "registers_read": keep or prior.num_registers, "rows": rows, "real": ceiling,
              "timing": timing, "headline": headline, "matches": point_matches(rows, length)}
    if ctx.args.timing_only:
        result["quality_pass"] = {k: earlier.get(k) for k in ("command", "created", "git_commit")}
    text = "\n\n".join([ceiling_text(ceiling), timing_text(timing),
                        match.rule_text(headline) if headline else "No base MDM rows: no reference.",
                        rows_table(rows), match.curves_text(headline) if headline else "",
                        "Older rule, for comparison: " + matches_text(result["matches"])])
    return result, text, speed_panels(length, curves, headline, ceiling)


def rows_table(rows):
    def timed(r):
        t = r.get("timing")
        return f"{t['median']:.4f} [{t['interval'][0]:.4f}, {t['interval'][1]:.4f}]" if t else "-"
    return md_table(["method", "decoding", "NFE", "tokens/step", "s/sample (quality pass)",
                     "s/sample (timed) [min, max]", "MAUVE [95% CI]", "Gen-PPL [95% CI]", "empty"],
                    [[r["method"], r["decoding"], f"{r['nfe']:.1f}", f"{r['tokens_per_step']:.1f}",
                      f"{r['seconds_per_sample']:.4f}", timed(r), fmt_ci(r["mauve"], r.get("mauve_ci"), 3),
                      fmt_ci(r["gen_ppl"], r.get("gen_ppl_ci"), 2), f"{r['empty_rate']:.2f}"] for r in rows])


def speed_panels(length, curves, headline, ceiling):
    """Quality vs NFE per curve with its bands (the rule's level), the reference's quality as a dotted line, the
    real-vs-real band; and MAUVE vs the timed seconds per sample."""
    level = headline.get("level", 0.95)

    def series(x, key):  # {curve: (xs, values, band lows, band highs)}
        out = {}
        for name, rows in curves.items():
            band = match.bands(rows, key, level)
            xs = [match.seconds(r) if x == "seconds" else r["nfe"] for r in rows]
            order = sorted(range(len(rows)), key=lambda i: xs[i])
            out[name] = ([xs[i] for i in order], [rows[i][key] for i in order], [band[i][0] for i in order],
                         [band[i][1] for i in order])
        return out
    ref = headline.get("reference", {})
    lo, hi = ceiling.get("mauve_ci") or [ceiling.get("mauve", math.nan)] * 2
    band = (lo, hi, "real programs (95% CI)") if math.isfinite(lo) else None
    bands = f"bands: {100 * level:.2f}% (Bonferroni)"
    return [panel(f"Speed (L={length}): MAUVE vs NFE, {bands}", "NFE (log scale)", "MAUVE (higher is better)",
                  series("nfe", "mauve"), logx=True, band=band, fill=True,
                  lines=[(ref.get("mauve"), "base at NFE = L")]),
            panel(f"Speed (L={length}): Gen-PPL vs NFE, {bands}", "NFE (log scale)",
                  "Gen-PPL (log scale, lower is better)", series("nfe", "gen_ppl"), logx=True, logy=True, fill=True,
                  lines=[(ref.get("gen_ppl"), "base at NFE = L")]),
            panel(f"Speed (L={length}): MAUVE vs wall-clock (timed medians)", "seconds per sample (log scale)",
                  "MAUVE (higher is better)", series("seconds", "mauve"), logx=10, band=band, fill=True,
                  lines=[(ref.get("mauve"), "base at NFE = L")])]


# ------------------------------------------------------------------------------------------------
# The older rule, kept for comparison: the best row within the reference's interval
# ------------------------------------------------------------------------------------------------


def point_matches(rows, length):
    """Matched-quality speedups against the base MDM at NFE = L (fixed schedule), in NFE and in wall-clock; a row
    matches on MAUVE and Gen-PPL together (eval_generation.match_tests); the best of each with its interval."""
    ref = reference_of(rows, length)
    if ref is None:
        return {}
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


def matches_text(matches):
    if not matches:
        return "no base MDM rows."
    if not matches["matched"]:
        return ("a row matches when its MAUVE >= the reference's lower 95% bound and its Gen-PPL <= its upper bound; "
                "none did.")
    by_nfe, by_time = matches["best_nfe"], matches["best_wallclock"]
    return (f"a row matches when its MAUVE >= the reference's lower 95% bound and its Gen-PPL <= its upper bound "
            f"(no interpolation, no correction for the best of many rows, quality-pass seconds): best in NFE "
            f"{by_nfe['method']} ({by_nfe['decoding']}) "
            f"x{fmt_ci(by_nfe['nfe_speedup'], by_nfe.get('nfe_speedup_ci'), 1)}"
            f"; best in wall-clock {by_time['method']} ({by_time['decoding']}) "
            f"x{fmt_ci(by_time['wallclock_speedup'], by_time.get('wallclock_speedup_ci'), 1)}.")
