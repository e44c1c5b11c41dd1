"""demo.sh: it parses, and its first stage is the marginal trap's CLI (experiments/trap_demo.py, tested in tests/experiments/test_marginal_trap.py)."""

import subprocess
from pathlib import Path

from experiments import trap_demo

ROOT = Path(__file__).resolve().parents[1]


def test_demo_sh_runs_the_trap_first():
    """bash -n demo.sh, and its first python stage is the trap CLI with a reusable --out (before the data build)."""
    demo = ROOT / "demo.sh"
    subprocess.run(["bash", "-n", str(demo)], check=True)
    commands = [line.strip() for line in demo.read_text().splitlines() if line.strip().startswith("python ")]
    assert commands[0].startswith("python -m experiments.trap_demo ") and "--reuse" in commands[0]
    assert commands[1].startswith("python -m dataprep.data ")
    trap_demo.parse_args(commands[0].split()[3:])  # its flags parse (the shell variable stands in for a path)
