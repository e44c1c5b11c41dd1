"""Matched quality read on quality-vs-NFE curves: the speed headline's rule (ours, not the paper's).

Paper map (arXiv 2603.20210): Sec. 5.3 / Fig. 6 claim that ConThenDisc and ConWithinDisc reach the base MDM's
quality with far fewer demasker calls (NFE). The paper reads this off its plots; this file fixes, before any
number is computed, how we read it (eval.py speed states RULE above its table; fig6 reports it beside the
older point matches of eval_generation.speedups):

1. The reference is the base MDM at NFE = L (the fixed schedule, base-decoding's choice when given). Its
   quality is its POINT value (MAUVE, and Gen-PPL), not a bound of its interval: a candidate must reach what
   the base reached, and a noisy reference with a wide interval does not make a match easier.
2. A candidate is a curve: one method under one decoding rule, its quality against its measured NFE (the fixed
   schedule over the NFE grid; an adaptive rule over its thresholds or factors, the NFE being the mean calls per
   sample), sorted by NFE. Read from the smallest NFE up, the curve reaches the reference at the first point at
   or above its MAUVE (at or below its Gen-PPL); the NFE is interpolated linearly in log NFE (Gen-PPL in log
   Gen-PPL) between that point and the one before it. A curve at the reference already at its smallest NFE
   reaches it there, flagged `at_grid_bottom` (the speedup is then bounded by the grid, a lower bound).
   "both" (the headline) is the larger of the MAUVE and the Gen-PPL NFE.
3. Speedup in NFE = the reference's NFE / that NFE. In wall-clock = the reference's median seconds per sample
   / the candidate's at that NFE, interpolated log-log between the same two points (the timing pass of
   experiments/eval_timing.py; without it the quality pass's single measurement, flagged).
4. Intervals: bootstrap replicate b gives every row, the reference included, its b-th replicate value (rows keep
   them, eval_context.score_texts) and the curve is read again (speedup 0 where it never reaches the reference
   in the sweep). The interval is the percentile interval at level 1 - 0.05 / m, m = the number of curves
   compared (Bonferroni): the m intervals hold together with probability >= 95%, so the best curve, picked
   after the fact for the headline, keeps its coverage. The wall-clock interval reads every replicate's NFE on
   every timing repeat r (the reference's r-th time over the candidate's r-th, interpolated: repeat-paired).
   With B replicates a level above 1 - 2 / B is the replicates' range.
5. The bands of the plots are the rows' percentile intervals of the same replicates at the same level.
6. Beside the reference at NFE = L, the base's own fastest curve (e.g. its threshold rule in semi-AR blocks)
   is read the same way, and each guided curve is compared with it too (`vs_base_best`): the speedup of the
   registers over the base's best decoding, not only over its slowest.

Why this rule: a powers-of-two grid makes the old "smallest matching NFE" jump by factors of two (an interval
of [7.3, 7.3] was the grid, not precision); the finer grid and the interpolation make the speedup continuous;
the point value makes "reaching the base" mean what it says; Bonferroni pays for reporting the best of m
curves; and comparing with the base's own fastest decoding keeps a Fast-dLLM speedup that the base gets
without registers out of the registers' credit.
"""

import math

import numpy as np

from evaluation.metrics import percentile_interval

ALPHA = 0.05                       # family-wise error of the m intervals
METRICS = ("mauve", "gen_ppl")     # higher MAUVE and lower Gen-PPL are better
RULE = ("Matched quality (evaluation/match.py, stated before the numbers): the reference is the base MDM at "
        "NFE = L, its point MAUVE and Gen-PPL; each curve (a method under one decoding rule, quality vs measured "
        "NFE) reaches it at its first point at or above the reference's MAUVE (at or below its Gen-PPL), the NFE "
        "interpolated in log NFE between that point and the one before it; 'both' takes the larger NFE. Speedup "
        "= reference NFE / that NFE; wall-clock = reference median s/sample / the candidate's at that NFE. "
        "Intervals: bootstrap replicates of every row read again, at level 1 - 0.05/m for the m curves "
        "(Bonferroni), so the best curve keeps 95% coverage; speedup 0 where a replicate never reaches the "
        "reference.")


# ------------------------------------------------------------------------------------------------
# One curve: where it reaches a target
# ------------------------------------------------------------------------------------------------


def value(row, key, b=None):
    """row[key], or (b given) its b-th bootstrap replicate (the point value when the row has none); nan for None."""
    replicates = row.get(f"{key}_replicates") if b is not None else None
    found = replicates[b] if replicates else row.get(key)
    return math.nan if found is None else float(found)


def _scaled(key, v):
    """The scale a metric is interpolated on: MAUVE as is, Gen-PPL in log (nan stays nan)."""
    if key == "gen_ppl":
        return math.log(v) if math.isfinite(v) and v > 0 else math.nan
    return v


def crossing(xs, ys, target, higher=True):
    """The x (> 0, increasing xs) where the curve ys first reaches target (>= when higher, else <=), linear in
    log x between the first point that reaches it and the point before; xs[0] when the first point already
    does; None when no point does or the target is not finite."""
    if not math.isfinite(target):
        return None
    for i, (x, y) in enumerate(zip(xs, ys)):
        if math.isfinite(y) and (y >= target if higher else y <= target):
            if i == 0:
                return float(x)
            before = ys[i - 1]
            frac = 1.0 if not math.isfinite(before) or y == before else (target - before) / (y - before)
            frac = min(max(frac, 0.0), 1.0)
            return float(math.exp(math.log(xs[i - 1]) + frac * (math.log(x) - math.log(xs[i - 1]))))
    return None


def reached(reference, rows, b=None):
    """{"mauve", "gen_ppl", "both"}: the NFE where `rows` (sorted by NFE) reach the reference, at replicate b."""
    xs = [r["nfe"] for r in rows]
    out = {}
    for key in METRICS:
        target = _scaled(key, value(reference, key, b))
        out[key] = crossing(xs, [_scaled(key, value(r, key, b)) for r in rows], target, higher=key == "mauve")
    out["both"] = None if None in (out["mauve"], out["gen_ppl"]) else max(out["mauve"], out["gen_ppl"])
    return out


# ------------------------------------------------------------------------------------------------
# Seconds per sample at an NFE, from the timing pass
# ------------------------------------------------------------------------------------------------


def times(row):
    """The row's timing repeats (seconds per sample; experiments/eval_timing.py), else its one measurement."""
    timing = row.get("timing") or {}
    return timing.get("repeats") or [row["seconds_per_sample"]]


def seconds(row, r=None):
    """The row's median seconds per sample (r None) or its r-th timing repeat (paired by index)."""
    repeats = times(row)
    return float(np.median(repeats)) if r is None else float(repeats[r % len(repeats)])


def seconds_at(rows, x, r=None):
    """Seconds per sample at NFE x on the curve `rows`, interpolated log-log between the points around x."""
    xs, ss = [row["nfe"] for row in rows], [max(seconds(row, r), 1e-12) for row in rows]
    if x <= xs[0]:
        return ss[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            frac = (math.log(x) - math.log(xs[i - 1])) / max(math.log(xs[i]) - math.log(xs[i - 1]), 1e-12)
            return float(math.exp(math.log(ss[i - 1]) + frac * (math.log(ss[i]) - math.log(ss[i - 1]))))
    return ss[-1]


def repeat_count(reference, rows):
    return max(len(times(r)) for r in [reference, *rows])


# ------------------------------------------------------------------------------------------------
# The rule over several curves
# ------------------------------------------------------------------------------------------------


def read_curve(reference, rows, replicates=0, level=0.95):
    """The speedups of one curve (rows of one method and rule) against the reference, with intervals."""
    rows = sorted(rows, key=lambda r: r["nfe"])
    point = reached(reference, rows)
    x = point["both"]
    entry = {"nfe_grid": [r["nfe"] for r in rows], "reached_nfe": point,
             "speedups": {k: (reference["nfe"] / v if v else None) for k, v in point.items()},
             "speedup": reference["nfe"] / x if x else None, "at_grid_bottom": x is not None and x <= rows[0]["nfe"],
             "timed": all("timing" in r for r in [reference, *rows])}
    if x:
        entry["seconds_per_sample"] = seconds_at(rows, x)
        entry["wallclock_speedup"] = seconds(reference) / entry["seconds_per_sample"]
    repeats = repeat_count(reference, rows)
    draws = [reached(reference, rows, b)["both"] for b in range(replicates)] if replicates else [x]
    wall = [seconds(reference, r) / seconds_at(rows, d, r) if d else 0.0 for d in draws for r in range(repeats)]
    entry["wallclock_speedup_ci"] = percentile_interval(wall, level) if x or replicates else None
    if replicates:
        entry["speedup_ci"] = percentile_interval([reference["nfe"] / d if d else 0.0 for d in draws], level)
        entry["reached_share"] = float(np.mean([d is not None for d in draws]))
        entry["replicate_nfe"] = draws
    return entry


def read_curves(reference, curves, replicates=0, alpha=ALPHA, bases=("base",)):
    """The rule (module docstring) over curves {name: rows}: every curve's entry (`read_curve`), the level
    1 - alpha / m, the best curve of the guided methods (names whose first word is not in `bases`), the base's
    fastest curve and each guided curve against it (`vs_base_best`)."""
    m = max(len(curves), 1)
    level = 1 - alpha / m
    out = {"rule": RULE, "alpha": alpha, "m": m, "level": level, "replicates": replicates,
           "reference": {k: reference[k] for k in ("method", "decoding", "steps", "nfe", "mauve", "mauve_ci",
                                                      "gen_ppl", "gen_ppl_ci", "empty_rate") if k in reference},
           "reference_seconds": seconds(reference), "curves": {}}
    out["curves"] = {name: read_curve(reference, rows, replicates, level) for name, rows in curves.items() if rows}
    is_base = lambda name: name.split()[0] in bases  # noqa: E731
    guided = {n: e for n, e in out["curves"].items() if not is_base(n) and e["speedup"]}
    base = {n: e for n, e in out["curves"].items() if is_base(n) and e["speedup"]}
    if guided:
        out["best"] = max(guided, key=lambda n: guided[n]["speedup"])
    if base:
        out["base_best"] = max(base, key=lambda n: base[n]["speedup"])
        out["vs_base_best"] = {n: relative(base[out["base_best"]], e, curves[out["base_best"]], curves[n],
                                           replicates, level) for n, e in guided.items()}
    return out


def relative(base_entry, entry, base_rows, rows, replicates, level):
    """A guided curve against the base's fastest one: NFE ratio (base NFE at the reference's quality / the
    guided curve's) and wall-clock ratio, with replicate intervals (0 where the guided curve does not reach;
    replicates where the base curve does not are left out and counted)."""
    base_rows, rows = sorted(base_rows, key=lambda r: r["nfe"]), sorted(rows, key=lambda r: r["nfe"])
    xb, xg = base_entry["reached_nfe"]["both"], entry["reached_nfe"]["both"]
    out = {"nfe_ratio": xb / xg, "wallclock_ratio": seconds_at(base_rows, xb) / seconds_at(rows, xg)}
    if replicates:
        pairs = [(b, g) for b, g in zip(base_entry["replicate_nfe"], entry["replicate_nfe"]) if b]
        out["nfe_ratio_ci"] = percentile_interval([b / g if g else 0.0 for b, g in pairs], level)
        repeats = max(repeat_count(base_rows[0], base_rows), repeat_count(rows[0], rows))
        out["wallclock_ratio_ci"] = percentile_interval(
            [seconds_at(base_rows, b, r) / seconds_at(rows, g, r) if g else 0.0 for b, g in pairs
             for r in range(repeats)], level)
        out["base_unreached_replicates"] = replicates - len(pairs)
    return out


def bands(rows, key, level):
    """Each row's percentile interval of its replicates at `level` ([nan, nan] without replicates)."""
    out = []
    for row in rows:
        interval = percentile_interval([v for v in row.get(f"{key}_replicates") or [] if v is not None], level)
        out.append(interval or [math.nan, math.nan])
    return out


# ------------------------------------------------------------------------------------------------
# The text of the report
# ------------------------------------------------------------------------------------------------


def _ci(value_, interval, digits=1):
    text = f"{value_:.{digits}f}"
    return text + (f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "")


def curve_phrase(entry):
    """'x6.2 [3.1, 12.4] in NFE (reached at NFE 10.3), x5.0 [2.2, 9.9] in wall-clock' for one curve."""
    if not entry["speedup"]:
        share = entry.get("reached_share")
        return "does not reach the reference in the sweep" + (f" (reaches it in {100 * share:.0f}% of replicates)"
                                                             if share else "")
    bound = ">= " if entry["at_grid_bottom"] else ""
    text = (f"x{bound}{_ci(entry['speedup'], entry.get('speedup_ci'))} in NFE (reached at NFE "
            f"{entry['reached_nfe']['both']:.1f})")
    if entry.get("wallclock_speedup"):
        text += f", x{_ci(entry['wallclock_speedup'], entry.get('wallclock_speedup_ci'))} in wall-clock"
    if entry.get("reached_share") is not None and entry["reached_share"] < 1:
        text += f"; reached in {100 * entry['reached_share']:.0f}% of replicates"
    return text


def rule_text(result):
    """The rule and its level, as the report states it before the numbers."""
    return (f"{result['rule']} Here m = {result['m']} curves, level {100 * result['level']:.2f}% per interval, "
            f"{result['replicates']} bootstrap replicates.")


def curves_text(result):
    """One line per curve, the headline (best guided curve) and the comparison with the base's fastest curve."""
    ref = result["reference"]
    lines = [f"Reference: {ref.get('method', 'base')} {ref.get('decoding', '')} at NFE {ref['nfe']:.0f}: MAUVE "
             f"{ref['mauve']:.3f}, Gen-PPL {ref['gen_ppl']:.2f}, {result['reference_seconds']:.4f} s/sample."]
    lines += [f"- {name}: {curve_phrase(entry)}" + ("" if entry["timed"] else " (wall-clock: the quality pass's "
                                                    "single measurement, no timing pass)")
              for name, entry in result["curves"].items()]
    if "best" in result:
        lines.append(f"\n**Headline**: {result['best']}, {curve_phrase(result['curves'][result['best']])}.")
    else:
        lines.append("\n**Headline**: no guided curve reaches the reference in this sweep.")
    if result.get("vs_base_best"):
        lines.append(f"Against the base's fastest curve ({result['base_best']}, "
                     f"{curve_phrase(result['curves'][result['base_best']])}):")
        for name, rel in result["vs_base_best"].items():
            lines.append(f"- {name}: x{_ci(rel['nfe_ratio'], rel.get('nfe_ratio_ci'))} fewer NFE, "
                         f"x{_ci(rel['wallclock_ratio'], rel.get('wallclock_ratio_ci'))} in wall-clock")
    return "\n".join(lines)
