"""Training throughput and peak memory of train_ae.py (Alg. 1 and the base MDM), tiny preset.

Each configuration runs the real `train_ae.train()` in a fresh subprocess (so peak memory is its own) on
dataprep/data.py's standard-library cache, for --steps optimizer steps; tokens/s is the median of the per-step
figures train_ae writes to log.jsonl (global batch x L / wall time of the step, data loading and the
per-example random draws included), skipping the first --skip steps (allocator and cache warm-up).
Peak memory: the process's max RSS (resource.getrusage, CPU) or torch.cuda.max_memory_allocated (GPU).

    python -m bench.bench_train                   # CPU, tiny preset, L=128, 1 thread and torch's default
    python -m bench.bench_train --threads 2 --steps 40 --configs guided
Figures go into docs/benchmarks.md with the command that produced them.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"base": ["--no-registers"], "guided": []}


def worker(argv):
    """Run one configuration in this process; print one JSON line with the measurements."""
    import torch

    import train_ae

    args = train_ae.parse_args(argv)
    start = time.time()
    train_ae.train(args)
    records = [json.loads(line) for line in open(Path(args.out_dir) / "log.jsonl")]
    speeds = [r["tokens_per_s"] for r in records if r["type"] == "train"]
    result = {"steps": len(speeds), "wall_s": time.time() - start, "speeds": speeds,
              "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "threads": torch.get_num_threads(), "tokens_per_step": args.global_batch_size * args.seq_len}
    if torch.cuda.is_available():
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    print("BENCH " + json.dumps(result))


def main():
    if sys.argv[1:2] == ["--worker"]:  # a child run: every other flag belongs to train_ae.py
        return worker(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="base,guided", help="comma list of: " + ", ".join(CONFIGS))
    parser.add_argument("--threads", default="1,0", help="comma list of torch CPU thread counts (0 = torch default)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--data", default=None, help="dataprep/data.py cache (default: train_ae's stdlib cache for L)")
    parser.add_argument("--seq-len", type=int, default=128, help="L")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--extra", default="", help="more train_ae.py flags, e.g. '--demasker-width 128'")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            for threads in args.threads.split(","):
                flags = ["--preset", "tiny", "--seq-len", str(args.seq_len), "--max-steps", str(args.steps),
                         "--eval-interval", "0", "--log-interval", "1", "--save-interval", str(10 ** 9),
                         "--threads", threads, "--device", args.device, "--out-dir", f"{tmp}/{config}-{threads}",
                         *(["--data", args.data] if args.data else []), *CONFIGS[config], *args.extra.split()]
                done = subprocess.run([sys.executable, "-m", "bench.bench_train", "--worker", *flags], capture_output=True,
                                      text=True, cwd=Path(__file__).resolve().parent.parent)
                lines = [l for l in done.stdout.splitlines() if l.startswith("BENCH ")]
                if done.returncode or not lines:
                    sys.exit(f"{config} (threads {threads}) failed:\n{done.stderr[-3000:]}")
                result = json.loads(lines[-1][6:])
                speeds = result["speeds"][args.skip:] or result["speeds"]
                speed = statistics.median(speeds)
                rows.append((config, result["threads"], speed, result["tokens_per_step"] / speed,
                             result["max_rss_mb"], result.get("cuda_max_allocated_mb")))
    print(f"\ntrain_ae.py tiny preset, L={args.seq_len}, device {args.device}, {args.steps} steps "
          f"(median of steps {args.skip + 1}..{args.steps}) {args.extra}")
    print("| model | threads | tokens/s | s/step | peak RSS (MB) |" + (" CUDA peak (MB) |" if rows[0][5] else ""))
    print("|---|---|---|---|---|" + ("---|" if rows[0][5] else ""))
    for config, threads, speed, step_s, rss, cuda in rows:
        name = "base MDM (--no-registers)" if config == "base" else "encoder + guided demasker"
        print(f"| {name} | {threads} | {speed:.0f} | {step_s:.3f} | {rss:.0f} |" + (f" {cuda:.0f} |" if cuda else ""))


if __name__ == "__main__":
    main()
