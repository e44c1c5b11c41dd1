"""evaluation/match.py: the matched-quality rule read on curves (interpolation in log NFE, the point value of the
reference, Bonferroni levels, wall-clock from paired timing repeats, the base's own fastest curve)."""

import math

import numpy as np
import pytest

from evaluation import match
from evaluation.metrics import percentile_interval


def row(method, nfe, mauve, ppl, seconds=None, mauve_reps=None, ppl_reps=None, repeats=None, **extra):
    out = {"method": method, "nfe": nfe, "steps": nfe, "mauve": mauve, "gen_ppl": ppl, **extra,
           "seconds_per_sample": seconds if seconds is not None else nfe / 100}
    if mauve_reps is not None:
        out.update(mauve_replicates=mauve_reps, gen_ppl_replicates=ppl_reps or [ppl] * len(mauve_reps))
    if repeats is not None:
        out["timing"] = {"median": float(np.median(repeats)), "repeats": repeats}
    return out


def test_crossing_is_interpolated_in_log_nfe_between_grid_points():
    """The old rule took the smallest grid NFE with a match (a powers-of-two step); the curve reaches the target
    between 4 and 8 here, halfway in MAUVE, so at sqrt(4 x 8) in log NFE."""
    xs, ys = [1, 2, 4, 8, 16], [0.1, 0.2, 0.4, 0.8, 0.9]
    assert match.crossing(xs, ys, 0.6) == pytest.approx(math.sqrt(32))
    assert match.crossing(xs, ys, 0.8) == pytest.approx(8)
    assert match.crossing(xs, ys, 0.05) == 1  # the first point already: the grid's bottom
    assert match.crossing(xs, ys, 0.95) is None and match.crossing(xs, ys, math.nan) is None
    # the FIRST time it is reached, reading from the smallest NFE, even if it dips after
    assert match.crossing([1, 2, 4, 8], [0.1, 0.7, 0.3, 0.9], 0.6) == pytest.approx(2 ** (5 / 6))
    # lower is better (Gen-PPL): the first point at or below the target
    assert match.crossing([1, 2, 4], [30.0, 20.0, 10.0], 15.0, higher=False) == pytest.approx(2 * 2 ** 0.5)


def test_the_reference_point_value_not_its_lower_bound_must_be_reached():
    """A point inside the reference's interval but below its value does not reach it (the old rule matched it)."""
    reference = row("base", 64, 0.6, 20.0, mauve_ci=[0.5, 0.7], gen_ppl_ci=[18.0, 22.0])
    curve = [row("g", 4, 0.55, 19.0), row("g", 16, 0.7, 15.0)]
    entry = match.read_curve(reference, curve)
    # MAUVE 0.55 -> 0.7 crosses 0.6 a third of the way (in log NFE) from 4 to 16; Gen-PPL is below 20 at 4 already
    assert entry["reached_nfe"]["mauve"] == pytest.approx(4 * 4 ** (1 / 3))
    assert entry["reached_nfe"]["gen_ppl"] == 4 and entry["reached_nfe"]["both"] == entry["reached_nfe"]["mauve"]
    assert entry["speedup"] == pytest.approx(64 / (4 * 4 ** (1 / 3))) and not entry["at_grid_bottom"]
    from experiments.eval_generation import match_tests
    assert match_tests(reference)["both"](curve[0])  # the old rule calls NFE 4 a match: x16 on the grid


def test_replicate_intervals_use_the_bonferroni_level_and_count_unreached_as_zero():
    reps = lambda *v: list(v)  # noqa: E731
    reference = row("base", 64, 0.6, 20.0, mauve_reps=reps(0.6, 0.6, 0.6, 0.9))
    fast = [row("g", 4, 0.5, 15.0, mauve_reps=reps(0.5, 0.7, 0.5, 0.5)),
            row("g", 16, 0.8, 15.0, mauve_reps=reps(0.8, 0.8, 0.7, 0.8))]
    flat = [row("h", 8, 0.61, 15.0, mauve_reps=reps(0.61, 0.61, 0.61, 0.61))]
    out = match.read_curves(reference, {"g fixed": fast, "h fixed": flat}, replicates=4)
    assert out["m"] == 2 and out["level"] == pytest.approx(0.975)
    g = out["curves"]["g fixed"]
    # replicates: 0 -> interpolated (0.5 -> 0.8 at 0.6: a third), 1 -> NFE 4, 2 -> half way, 3 -> never (0.9)
    draws = [4 * 4 ** (1 / 3), 4.0, 4 * 4 ** 0.5, None]
    assert g["replicate_nfe"][:3] == pytest.approx(draws[:3]) and g["replicate_nfe"][3] is None
    assert g["reached_share"] == 0.75
    ratios = [64 / d if d else 0.0 for d in draws]
    assert g["speedup_ci"] == pytest.approx(percentile_interval(ratios, 0.975))
    h = out["curves"]["h fixed"]
    assert h["at_grid_bottom"] and h["speedup"] == 8 and "x>= 8.0" in match.curve_phrase(h)
    assert out["best"] == "g fixed"  # x10.1 > x8: picked after the fact, its interval holds with h's at 95%


def test_wallclock_reads_the_timing_pass_paired_by_repeat():
    """Seconds at the reached NFE: log-log between the two points around it; repeat r over repeat r."""
    reference = row("base", 64, 0.6, 20.0, repeats=[1.0, 2.0, 1.0])
    curve = [row("g", 4, 0.4, 15.0, repeats=[0.1, 0.2, 0.1]), row("g", 16, 0.8, 15.0, repeats=[0.4, 0.8, 0.4])]
    entry = match.read_curve(reference, curve, level=0.95)
    assert entry["reached_nfe"]["both"] == pytest.approx(8)  # half way from 0.4 to 0.8, at sqrt(4 x 16)
    assert entry["seconds_per_sample"] == pytest.approx(0.2)  # sqrt(0.1 x 0.4) at the median
    assert entry["wallclock_speedup"] == pytest.approx(1.0 / 0.2) and entry["timed"]
    # paired repeats: 1.0 / 0.2, 2.0 / 0.4, 1.0 / 0.2 (a drifting machine slows both alike): no spread
    assert entry["wallclock_speedup_ci"] == pytest.approx([5.0, 5.0])
    untimed = match.read_curve(row("base", 64, 0.6, 20.0, seconds=1.0), [row("g", 8, 0.7, 15.0, seconds=0.5)])
    assert not untimed["timed"] and untimed["wallclock_speedup"] == 2.0


def test_guided_curves_are_compared_with_the_base_fastest_curve_too():
    """A base threshold curve that reaches its own NFE = L quality at NFE 16 makes a guided curve at NFE 8 a x2
    speedup over the base's best decoding, not x8 over its slowest."""
    reference = row("base", 64, 0.6, 20.0, decoding="fixed")
    curves = {"base fixed": [row("base", 32, 0.5, 25.0), reference],
              "base threshold": [row("base", 16, 0.65, 19.0)],
              "conthendisc fixed": [row("conthendisc", 8, 0.7, 18.0)],
              "conwithindisc fixed": [row("conwithindisc", 8, 0.1, 18.0)]}
    out = match.read_curves(reference, curves)
    assert out["best"] == "conthendisc fixed" and out["curves"]["conthendisc fixed"]["speedup"] == 8
    assert out["base_best"] == "base threshold" and set(out["vs_base_best"]) == {"conthendisc fixed"}
    assert out["vs_base_best"]["conthendisc fixed"]["nfe_ratio"] == 2
    text = match.curves_text(out)
    assert "**Headline**: conthendisc fixed, x>= 8.0" in text and "does not reach the reference" in text
    assert "x2.0 fewer NFE" in text and match.RULE in match.rule_text(out)


def test_bands_are_the_replicates_percentiles_at_the_level():
    rows = [row("g", 4, 0.5, 10.0, mauve_reps=[0.1, 0.2, 0.3, 0.4]), row("g", 8, 0.5, 10.0)]
    bands = match.bands(rows, "mauve", 0.9)
    assert bands[0] == pytest.approx(percentile_interval([0.1, 0.2, 0.3, 0.4], 0.9))
    assert all(math.isnan(v) for v in bands[1])
