"""Writing eval.py's results: OUT/NAME.json, a section of OUT/REPORT.md, OUT/NAME.png (matplotlib, optional).

NAME.json and NAME.png are written whole or not at all (infra/atomic.py: a temporary file of this process's
own, renamed at the end); sections are appended to REPORT.md under a lock, so two eval.py runs sharing OUT
never interleave. Every experiment record holds the command, the git commit, the settings and the results, so a number
in docs/results.md can be traced to the command that produced it.

Tables show a bootstrap interval as `value [lo, hi]` (`fmt_ci`); plots draw it as error bars (or, with `fill`, as
a shaded band around the curve), a panel's `band` (the real-vs-real ceiling) as a grey horizontal band and its
`lines` (a reference's quality) as dotted horizontal lines.
"""

import math
import os
import subprocess
from pathlib import Path

from infra.atomic import temporary_path, write_json
from infra.atomic import exclusive


def md_table(headers, rows):
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ci(value, interval, digits=3):
    """'0.512 [0.401, 0.603]' (a value and its 95% interval), the value alone without one, 'n/a' for None."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if interval is not None and all(v is not None for v in interval):
        text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
    return text


def panel(title, xlabel, ylabel, series, logx=False, logy=False, band=None, fill=False, lines=()):
    """A plot panel. series: {label: (xs, ys)} or {label: (xs, ys, lows, highs)} (error bars; nan = none);
    logx: True (log base 2) or a base (e.g. 10); logy: log base 10;
    band: (lo, hi, label) drawn as a horizontal band (e.g. the real-vs-real ceiling), or None;
    fill: lows / highs drawn as a shaded band around each curve instead of error bars (curves with bands);
    lines: (y, label) pairs drawn as dashed horizontal lines (e.g. a reference's quality)."""
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "series": series, "logx": logx, "logy": logy,
            "band": band, "fill": fill, "lines": list(lines)}


def _finite(value):
    return value is not None and math.isfinite(value)


def _draw(ax, spec):
    """One panel: lines with markers, 95% error bars where the series has them, the band, log axes."""
    from matplotlib.ticker import FuncFormatter
    if spec.get("band"):
        lo, hi, label = spec["band"]
        if hi > lo:
            ax.axhspan(lo, hi, color="grey", alpha=0.2, label=label)
        else:
            ax.axhline(lo, color="grey", linestyle="--", label=label)
    for y, label in spec.get("lines", ()):
        if _finite(y):
            ax.axhline(y, color="black", linestyle=":", linewidth=1, label=label)
    for label, values in spec["series"].items():
        xs, ys = values[0], values[1]
        if spec.get("fill") and len(values) == 4 and any(_finite(v) for v in values[2]):
            line, = ax.plot(xs, ys, marker="o", label=label)
            lows = [v if _finite(v) else math.nan for v in values[2]]
            highs = [v if _finite(v) else math.nan for v in values[3]]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        elif len(values) == 4 and any(_finite(v) for v in values[2]):
            below = [y - lo if _finite(lo) and _finite(y) else 0.0 for y, lo in zip(ys, values[2])]
            above = [hi - y if _finite(hi) and _finite(y) else 0.0 for y, hi in zip(ys, values[3])]
            ax.errorbar(xs, ys, yerr=[[max(v, 0.0) for v in below], [max(v, 0.0) for v in above]], marker="o",
                        capsize=3, label=label)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 1, 2, 4 ... not 2^0, 2^1; 300 not 3 x 10^2
    if spec["logx"]:  # True: base 2 (NFE 1, 2, 4 ...); a number: that base (10 for seconds)
        ax.set_xscale("log", base=2 if spec["logx"] is True else spec["logx"])
        ax.xaxis.set_major_formatter(plain)
    if spec.get("logy"):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if high < 10 * low:  # less than a decade: label the minor ticks too, else there may be none
            ax.yaxis.set_minor_formatter(plain)
    ax.set_title(spec["title"], fontsize=10)
    ax.set(xlabel=spec["xlabel"], ylabel=spec["ylabel"])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def plot(panels, path, columns=3):
    """Line plots on a grid of `columns` per row, if matplotlib is importable; returns the path or None."""
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ncols = min(columns, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index < len(panels):
            _draw(ax, panels[index])
        else:
            ax.axis("off")
    figure.tight_layout()
    tmp = temporary_path(path)  # drawn beside it, then renamed: a reader never opens half a PNG
    try:
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        tmp.unlink(missing_ok=True)
    return path


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_experiment(out, record, text, panels):
    """record (dict with "experiment", "title", "created", "command", "preset", ...) -> OUT/NAME.json (atomic);
    appends a markdown section (title, command, text, plot) to OUT/REPORT.md. Returns the record. The record
    keeps the markdown text too ("markdown"): evaluation/results_section.py rebuilds docs/results.md's records from
    the JSONs."""
    out, name = Path(out), record["experiment"]
    out.mkdir(parents=True, exist_ok=True)
    record = {**record, "markdown": text}
    path = write_json(out / f"{name}.json", record, default=float)
    image = plot(panels, out / f"{name}.png")
    section = [f"## {name}: {record['title']}", "", f"_{record['created']}, preset {record['preset']}_", ""]
    if record.get("command"):
        section += ["```", record["command"], "```", ""]
    section += [text, ""]
    if image:
        section += [f"![{name}]({Path(image).name})", ""]
    with exclusive(out / ".REPORT.md.lock"), open(out / "REPORT.md", "a") as handle:  # two evals, one OUT
        handle.write("\n".join(section) + "\n")
    print(f"wrote {path}" + (f" and {image}" if image else "") + f"; appended to {out / 'REPORT.md'}")
    return record
