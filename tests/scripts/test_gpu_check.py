"""Tests for scripts/gpu_check.py: the whole check in --tiny mode on CPU, end to end as a subprocess (every part ok,
every figure finite), so that the GPU check cannot rot between the rare runs on a GPU (docs/gpu.md)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from scripts import gpu_check as GC  # noqa: E402


def numbers(value, where=""):
    """Every number in a JSON value, with its path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from numbers(item, f"{where}[{i}]")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").is_file() else None
    return done, report, out


def test_tiny_check_passes_every_part_with_finite_figures(tiny_run):
    done, report, out = tiny_run
    assert report is not None, done.stdout[-3000:] + done.stderr[-3000:]
    failed = {name: part.get("error") for name, part in report["parts"].items() if part["status"] != "ok"}
    assert not failed and done.returncode == 0, failed
    assert list(report["parts"]) == list(GC.PARTS)
    bad = [(path, x) for path, x in numbers(report["parts"]) if not math.isfinite(x)]
    assert not bad
    parts = report["parts"]
    assert parts["tests"]["passed"] > 0 and parts["tests"]["failed"] == 0
    assert parts["sdpa"]["calls"] > 0 and all(case["ok"] for case in parts["sdpa"]["cases"])
    train = parts["train_ae"]
    assert train["tokens_per_s"] > 0 and train["params"] > 0 and train["peak_memory_gib"] > 0
    assert train["mfu"] is None  # no GPU peak on a CPU
    assert train["memory_plan"]["predicted_total_gib"] > 0
    assert all(parts["train_prior"][n]["status"] == "ok" for n in ("unconditional", "conditional", "prompted"))
    variants = parts["sample"]["variants"]
    methods = {name.split()[0] for name in variants}
    assert {"base", "autoencode", "conthendisc", "conwithindisc", "prompt", "infill"} <= methods
    assert all(v["status"] == "ok" and v["s_per_sample"] > 0 and v["s_per_step"] > 0 for v in variants.values())
    assert {"ddp", "fsdp", "fsdp --resume"} <= set(parts["torchrun"]) and parts["torchrun"]["backend"] == "gloo"
    md = (out / "gpu_check.md").read_text()
    assert "| train_ae | ok |" in md and "| sample variant |" in md
    assert report["info"]["torch"] and report["info"]["device"] == "cpu"


def test_a_failing_part_is_recorded_and_the_next_runs(tmp_path):
    """A part that fails (here: train_prior without the AE run of an unselected train_ae) is recorded with its
    error, the other selected parts still run, and the exit code is 1."""
    code = GC.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--parts", "sdpa,train_prior"])
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert code == 1
    assert report["parts"]["train_prior"]["status"] == "failed"
    assert "needs the AE run" in report["parts"]["train_prior"]["error"]
    assert report["parts"]["sdpa"]["status"] == "ok" and report["parts"]["tests"]["status"] == "skipped"


def test_bad_flags_are_refused(capsys):
    for argv in (["--parts", "nope"], ["--budget", "sdpa=x"], ["--set", "unknown=1"]):
        with pytest.raises(SystemExit):
            GC.parse_args(argv)
    assert "--set" in capsys.readouterr().err


def test_peak_table():
    assert GC.bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert GC.bf16_peak_flops("NVIDIA H200") == 989e12
    assert GC.bf16_peak_flops("cpu") is None
