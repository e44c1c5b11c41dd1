"""Behaviour preservation across a refactor: run a fixed set of commands, fingerprint what they write.

A refactor (files moved, plumbing taken out of the model files) must not change a single weight or token.
This script runs the project's command lines on a small standard-library corpus with fixed seeds: data
preparation, a few optimizer steps of every trainer (and a resume), every sampling method of sample.py,
and eval.py subcommands on the tiny checkpoints. Each output file is reduced to a fingerprint:

  *.safetensors         name, dtype, shape and bytes of every tensor (weights bit-exact)
  *.json / *.jsonl      the parsed records without wall-clock, date, command-line and commit fields
                        (samples token-exact, metrics to the last bit)
  token arrays (*.bin, *.npy), tokenizer.json   raw bytes

and the fingerprints go to one JSON file. Record before the change, compare after it:

    python scripts/check_behaviour.py --record /tmp/before.json
    ... refactor ...
    python scripts/check_behaviour.py --compare /tmp/before.json     # exit 1 and a list of what differs

About two to three minutes on 2 CPU cores. Where the command lines themselves move (a script into a
folder), edit `cli()` below: the step names, and so the fingerprints' keys, stay the same.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# How each command line is started, relative to the repository root.
CLI = {
    "data": ["-m", "dataprep.data"],
    "prompts": ["-m", "dataprep.prompts"],
    "train_ae": ["train_ae.py"],
    "train_prior": ["train_prior.py"],
    "train_scorer": ["-m", "experiments.train_scorer"],
    "train_prompted": ["-m", "experiments.train_prompted"],
    "sample": ["sample.py"],
    "eval": ["eval.py"],
}

# Keys whose values change from run to run (wall-clock, dates, the command line, the commit): dropped.
VOLATILE = ("time", "second", "wall", "per_s", "tokens_per", "samples_per", "date", "elapsed", "command",
            "commit", "created", "markdown", "argv", "host", "throughput", "duration", "started", "finished", "_ms", "python",
            "torch_version", "version")


def cli(name):
    return [sys.executable, *CLI[name]]


def without(argv, flag):
    """argv less one flag and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def steps(work):
    """(step name, argv) in order; every path under `work`."""
    w = str(work)
    data = ["--data", f"{w}/data"]
    ae_small = [*data, "--seq-len", "64", "--num-registers", "4", "--global-batch-size", "4",
                "--micro-batch-size", "4", "--warmup-steps", "2", "--eval-interval", "3", "--save-interval", "3",
                "--val-programs", "8", "--threads", "1", "--seed", "3"]
    prior = ["--ae", f"{w}/ae", "--data", f"{w}/data", "--global-batch-size", "4", "--depth", "1",
             "--num-registers", "4", "--eval-interval", "2", "--val-examples", "8", "--quiet", "--threads", "1"]
    run = ["--steps", "8", "--num", "3", "--batch-size", "3", "--device", "cpu", "--quiet", "--seed", "5"]
    gen = ["--gen-length", "32", *run]
    latent = [*gen, "--prior-steps", "4"]
    ev = ["--num", "4", "--batch-size", "4", "--device", "cpu", "--bootstrap", "5", "--threads", "1",
          "--prior-steps", "2", "--refresh-prior-steps", "2"]
    return [
        ("data", cli("data") + ["--out", f"{w}/data", "--seq-len", "64", "--vocab-size", "400",
                                "--max-files", "150", "--val-fraction", "0.1"]),
        ("prompts", cli("prompts") + ["--out", f"{w}/pairs", "--max-files", "150"]),
        ("ae", cli("train_ae") + ae_small + ["--out-dir", f"{w}/ae", "--max-steps", "3"]),
        ("ae_resume", cli("train_ae") + ["--out-dir", f"{w}/ae", "--resume", "--max-steps", "6"]),
        ("base", cli("train_ae") + without(ae_small, "--num-registers")
         + ["--out-dir", f"{w}/base", "--no-registers", "--max-steps", "4"]),
        ("cadd", cli("train_ae") + without(ae_small, "--num-registers")
         + ["--out-dir", f"{w}/cadd", "--no-registers", "--cadd", "--max-steps", "3"]),
        ("prior", cli("train_prior") + prior + ["--out-dir", f"{w}/prior", "--max-steps", "4"]),
        ("cprior", cli("train_prior") + prior + ["--out-dir", f"{w}/cprior", "--max-steps", "4", "--conditional"]),
        ("scorer", cli("train_scorer") + [*data, "--out", f"{w}/scorer", "--steps", "4", "--batch-size", "4",
                                          "--device", "cpu", "--threads", "1"]),
        ("pprior", cli("train_prompted") + ["--ae", f"{w}/ae", "--pairs", f"{w}/pairs", "--out-dir", f"{w}/pprior",
                                            "--seq-len", "64", "--num-registers", "4", "--steps", "2",
                                            "--batch-size", "4", "--threads", "1"]),
        ("s_base", cli("sample") + ["--ckpt", f"{w}/base", "--method", "base", *gen, "--out", f"{w}/s/base.jsonl"]),
        ("s_base_threshold", cli("sample") + ["--ckpt", f"{w}/base", *gen, "--decoding", "threshold",
                                              "--threshold", "0.5", "--block-length", "16",
                                              "--out", f"{w}/s/base_threshold.jsonl"]),
        ("s_base_random", cli("sample") + ["--ckpt", f"{w}/base", *gen, "--temperature", "1", "--remasking", "random",
                                           "--out", f"{w}/s/base_random.jsonl"]),
        ("s_base_cache", cli("sample") + ["--ckpt", f"{w}/base", *gen, "--block-length", "16", "--cache", "prefix",
                                          "--out", f"{w}/s/base_cache.jsonl"]),
        ("s_autoencode", cli("sample") + ["--ckpt", f"{w}/ae", "--method", "autoencode", "--data", f"{w}/data",
                                          *run, "--out", f"{w}/s/autoencode.jsonl"]),
        ("s_conthendisc", cli("sample") + ["--ae", f"{w}/ae", "--method", "conthendisc", "--prior", f"{w}/prior",
                                           *latent, "--temperature", "1", "--out", f"{w}/s/conthendisc.jsonl"]),
        ("s_conwithindisc", cli("sample") + ["--ae", f"{w}/ae", "--method", "conwithindisc", "--prior",
                                             f"{w}/prior", "--cond-prior", f"{w}/cprior", "--refresh-prior-steps",
                                             "2", *latent, "--out", f"{w}/s/conwithindisc.jsonl"]),
        ("s_prompted", cli("sample") + ["--ae", f"{w}/ae", "--method", "conthendisc", "--prompt",
                                        "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"", "--prompted-prior",
                                        f"{w}/pprior", *latent, "--out", f"{w}/s/prompted.jsonl"]),
        ("s_infill", cli("sample") + ["--ckpt", f"{w}/base", "--infill", "def f(x):\n<|span|>\n    return x\n",
                                      "--span-tokens", "6", *gen, "--out", f"{w}/s/infill.jsonl"]),
        ("e_fig4", cli("eval") + ["fig4", "--ae", f"{w}/ae", "--base", f"{w}/base", "--data", f"{w}/data",
                                  *ev, "--out", f"{w}/e"]),
        ("e_fig6", cli("eval") + ["fig6", "--ae", f"{w}/ae", "--base", f"{w}/base", "--prior", f"{w}/prior",
                                  "--cond-prior", f"{w}/cprior", "--scorer", f"{w}/scorer", "--data", f"{w}/data",
                                  "--lengths", "64", "--nfe", "4", "8", *ev, "--out", f"{w}/e"]),
        ("e_table1", cli("eval") + ["table1", "--ae", f"{w}/ae", "--scorer", f"{w}/scorer", "--data", f"{w}/data",
                                    "--length", "64", "--nfe", "8", "--blocks", "64", *ev, "--out", f"{w}/e"]),
        ("e_trap", cli("eval") + ["marginal-trap", "--trap-steps", "20", "--trap-samples", "16",
                                  "--trap-prior-steps", "20", *ev, "--out", f"{w}/e"]),
    ]


def canonical(value, work):
    """A JSON value without its volatile keys, the scratch folder's path written as <work>; floats kept exact."""
    if isinstance(value, dict):
        return {k: canonical(v, work) for k, v in sorted(value.items())
                if not any(part in k.lower() for part in VOLATILE)}
    if isinstance(value, list):
        return [canonical(v, work) for v in value]
    if isinstance(value, str):
        return value.replace(str(work), "<work>")
    return value


def digest(data):
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(path, work):
    """A short hash of what matters in one output file, or None for files that are not compared."""
    name = path.name
    if name.endswith(".safetensors"):
        from safetensors.numpy import load_file
        tensors = load_file(str(path))
        h = hashlib.sha256()
        for key in sorted(tensors):
            t = tensors[key]
            h.update(f"{key}|{t.dtype}|{t.shape}|".encode())
            h.update(t.tobytes())
        return h.hexdigest()[:16]
    if name == "tokenizer.json" or name.endswith((".bin", ".npy")):
        return digest(path.read_bytes())
    if name.endswith(".jsonl"):
        records = [canonical(json.loads(line), work) for line in path.read_text().splitlines() if line.strip()]
        return digest(json.dumps(records, sort_keys=True).encode())
    if name.endswith(".json"):
        return digest(json.dumps(canonical(json.loads(path.read_text()), work), sort_keys=True).encode())
    return None


def run_all(work):
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    for name, argv in steps(work):
        start = time.time()
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        print(f"{name:18s} {time.time() - start:6.1f}s  exit {done.returncode}", flush=True)
        if done.returncode != 0:
            sys.exit(f"step {name} failed:\n$ {' '.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    prints = {}
    for path in sorted(work.rglob("*")):
        if path.is_file() and (fp := fingerprint(path, work)) is not None:
            prints[str(path.relative_to(work))] = fp
    return prints


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--record", metavar="FILE.json", help="run the commands and write their fingerprints here")
    what.add_argument("--compare", metavar="FILE.json", help="run the commands and compare with this record")
    parser.add_argument("--work", default="/tmp/crocodil_behaviour",
                        help="scratch folder for the runs (deleted and rebuilt); its path is written as <work> in "
                             "the fingerprints, so record and compare may use different folders")
    args = parser.parse_args(argv)
    prints = run_all(Path(args.work))
    if args.record:
        Path(args.record).write_text(json.dumps(prints, indent=1, sort_keys=True) + "\n")
        print(f"{len(prints)} fingerprints written to {args.record}")
        return 0
    before = json.loads(Path(args.compare).read_text())
    missing = sorted(set(before) - set(prints))
    new = sorted(set(prints) - set(before))
    changed = sorted(k for k in set(before) & set(prints) if before[k] != prints[k])
    for label, keys in (("missing", missing), ("new", new), ("changed", changed)):
        for key in keys:
            print(f"{label:8s} {key}")
    same = len(set(before) & set(prints)) - len(changed)
    print(f"{same} identical, {len(changed)} changed, {len(missing)} missing, {len(new)} new")
    return 1 if (missing or new or changed) else 0


if __name__ == "__main__":
    sys.exit(main())
