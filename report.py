"""Writing eval.py's results: OUT/NAME.json, a section of OUT/REPORT.md, OUT/NAME.png (matplotlib, optional).

NAME.json and NAME.png are written whole or not at all (atomic.py: a temporary file of this process's
own, renamed at the end); sections are appended to REPORT.md under a lock, so two eval.py runs sharing OUT
never interleave. Every experiment record holds the command, the git commit, the settings and the results, so a number
in the README can be traced to the command that produced it.
"""

import os
import subprocess
from pathlib import Path

from atomic import temporary_path, write_json
from locks import exclusive


def md_table(headers, rows):
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def panel(title, xlabel, ylabel, series, logx=False):
    return {"title": title, "xlabel": xlabel, "ylabel": ylabel, "series": series, "logx": logx}


def plot(panels, path):
    """One row of line plots, if matplotlib is importable; returns the path or None."""
    if not panels:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, spec in zip(axes[0], panels):
        for label, (xs, ys) in spec["series"].items():
            ax.plot(xs, ys, marker="o", label=label)
        if spec["logx"]:
            ax.set_xscale("log", base=2)
        ax.set(title=spec["title"], xlabel=spec["xlabel"], ylabel=spec["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
    appends a markdown section (title, command, text, plot) to OUT/REPORT.md. Returns the record."""
    out, name = Path(out), record["experiment"]
    out.mkdir(parents=True, exist_ok=True)
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
