"""What limits the toy autoencoder: held-out CER of Alg. 6 (the MDM autoencoder) for a list of train_ae.py
configurations under a step budget, with the training wall-clock (docs/results.md, "What limits the toy
autoencoder"; paper Tables 1-2, Sec. 5.2).

Each configuration is the demo's AE run (`train_ae.py --preset tiny --warmup-steps 50`, from scratch, as
demo.sh trains it) plus its own flags, trained in a subprocess with --threads 1 for --steps optimizer steps.
At each evaluation point (--eval-at steps inside the run, each reached with train_ae's --stop-at so the LR
schedule is the full run's, and the end of the run) it autoencodes a fixed set of held-out programs:
    z_0 = h_phi(x_0), then the guided MDM from an all-[M] canvas of L tokens, one block, temperature 0,
    LLaDA's low-confidence remasking (--remasking random: a rerun scores the final checkpoints again), NFE = each
    of --nfe (L = one token per step)
and scores CER exactly as eval_autoencoder.run_table does (metrics.cer of the decoded reconstruction against
the decoded source, eval_context.Context.held_out's first --num val/test programs of <= L tokens, averaged).
Also scored: CER on as many training programs at the largest NFE (the generalisation gap) and train_ae's own
validation (masked-token CE / top-1 at mask ratio 1.0, registers only) at the end of a run.

Resumable: OUT/results.json holds every finished point (skipped on a rerun); an interrupted training resumes
from its last checkpoint (train_ae --resume; --save-interval). Wall-clock is the sum of the training
subprocesses' times (data loading and train_ae's final validation included), on whatever else the machine runs;
their CPU time (user + system) is recorded beside it: with one thread it estimates an idle core's wall-clock.
Writes OUT/results.json and OUT/results.md (infra/atomic.py), one row per (configuration, budget, evaluation point).

    python -m bench.bench_ae_budget --data runs/study/data --out runs/study/bench --sweep factors --steps 600
    python -m bench.bench_ae_budget --data runs/study/data --out runs/study/bench \\
        --config wide "--encoder-width 128" --steps 2700 --eval-at 600 1200
"""

import argparse
import functools
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from infra import guards
from infra.atomic import read_json, write_json, write_text
from evaluation.report import md_table

REPO = Path(__file__).resolve().parent.parent
DEMO_FLAGS = ["--preset", "tiny", "--warmup-steps", "50"]  # demo.sh's AE run (from scratch)
# named lists of (name, train_ae flags): one or two factors at a time against the demo's default; "channel" opens
# the register channel every way at once (no latent noise, all K registers always, half the examples all-[M])
SWEEPS = {
    "channel": [
        ("default", ""),
        ("open-channel", "--latent-cos 1 --no-nested-dropout --all-mask-prob 0.5"),
    ],
    "factors": [
        ("default", ""),
        ("no-latent-noise", "--latent-cos 1"),
        ("no-nested-dropout", "--no-nested-dropout"),
        ("enc-width-128", "--encoder-width 128"),
        ("lr-1e-2", "--lr 1e-2"),
        ("K-16", "--num-registers 16"),
        ("all-mask-0.5", "--all-mask-prob 0.5"),
        ("dem-width-128", "--demasker-width 128"),
    ],
}
NAME = re.compile(r"^[A-Za-z0-9_.+=-]+$")


# ------------------------------------------------------------------------------------------------
# Configurations and training (train_ae.py in a subprocess, one thread)
# ------------------------------------------------------------------------------------------------

def configurations(args):
    """[(name, flags list)] from --sweep and --config, in order; names unique and usable as folder names."""
    chosen = list(SWEEPS[args.sweep]) if args.sweep else []
    chosen += [tuple(pair) for pair in args.config or []]
    if not chosen:
        raise SystemExit("nothing to run: pass --sweep NAME (" + ", ".join(SWEEPS) + ") or --config NAME FLAGS")
    names = [name for name, _ in chosen]
    bad = [n for n in names if not NAME.match(n)]
    if bad:
        raise SystemExit(f"configuration names must be letters, digits and _.+=- (folder names), got {bad}")
    if len(set(names)) != len(names):
        raise SystemExit(f"configuration names must be unique, got {names}")
    return [(name, shlex.split(flags)) for name, flags in chosen]


def train_command(args, run_dir, flags, steps, stop_at):
    """The train_ae.py command line of one training segment (resumed when a checkpoint exists)."""
    command = [sys.executable, str(REPO / "train_ae.py"), *DEMO_FLAGS, *flags, "--data", str(args.data),
               "--seq-len", str(args.seq_len), "--out-dir", str(run_dir), "--max-steps", str(steps),
               "--stop-at", str(stop_at), "--threads", "1", "--eval-interval", str(steps), "--val-programs",
               str(args.val_programs), "--save-interval", str(args.save_interval), "--log-interval", "50"]
    if (run_dir / "checkpoint" / "progress.json").is_file():
        command.append("--resume")
    return command


def trained_step(run_dir):
    progress = run_dir / "checkpoint" / "progress.json"
    return read_json(progress)["step"] if progress.is_file() else 0


def train_to(args, run_dir, flags, steps, stop_at):
    """Train (or resume) run_dir up to step stop_at of a `steps` schedule; returns (wall seconds, CPU seconds of
    the subprocess: user + system, which on a shared machine is the better estimate of one idle core's time)."""
    if trained_step(run_dir) >= stop_at:
        return 0.0, 0.0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.with_name(run_dir.name + ".train.log")  # beside the run: train_ae claims its folder whole
    start, before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "a") as log:
        done = subprocess.run(train_command(args, run_dir, flags, steps, stop_at), stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO)
    if done.returncode:
        raise SystemExit(f"train_ae.py failed for {run_dir} (exit {done.returncode}); see {log_path}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.time() - start, cpu


def last_validation(run_dir):
    """train_ae's last validation record (masked-token CE / top-1 of program tokens per mask ratio; at ratio 1.0
    only the registers inform the demasker): {"step", "ratio", "ce", "acc", "ce_r1", "top1_r1"} | None."""
    log = run_dir / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    vals = [r for r in records if r.get("type") == "val"]
    if not vals:
        return None
    result = next(iter(vals[-1]["results"].values()))
    return {"step": vals[-1]["step"], "ratio": result["ratio"], "ce": result["ce"], "acc": result["acc"],
            "ce_r1": result["ce"][-1], "top1_r1": result["acc"][-1]}


# ------------------------------------------------------------------------------------------------
# Autoencoding CER (Alg. 6), as eval_autoencoder.run_table scores it
# ------------------------------------------------------------------------------------------------

def held_out_programs(data_dir, count, length):
    """eval_context.Context.held_out: the first `count` val/test programs of <= length tokens (a fixed set)."""
    from experiments.eval_context import Context
    ctx = Context(SimpleNamespace(device="cpu", dtype=None, preset="tiny", ae=None, ae_no_noise=None, base=None,
                                  data=str(data_dir)))
    return ctx.held_out(count, length), ctx


def train_programs(ctx, count, length):
    """The first `count` training programs of <= length tokens, in held_out's format (a shared tokenizer)."""
    from dataprep.data import load_split
    from sample import decode_programs
    if ctx.meta.get("encoder"):
        raise SystemExit(f"{ctx.data_dir} has a separate encoder tokenizer; this benchmark needs a shared one "
                         f"(dataprep/data.py without --encoder-tokenizer)")
    split = load_split(ctx.data_dir, "train")
    rows = np.nonzero(np.asarray(split["lengths"]) <= length)[0][:count]
    ids = torch.from_numpy(np.asarray(split["ids"][rows], dtype=np.int64))
    lengths = torch.from_numpy(np.asarray(split["lengths"][rows], dtype=np.int64))
    return {"ids": ids, "enc_ids": ids, "enc_mask": torch.arange(ids.shape[1])[None, :] < lengths[:, None],
            "texts": decode_programs(ctx.tokenizer, ids, ctx.eos_id, ctx.bos_id)}


@torch.no_grad()
def autoencode_cer(run_dir, programs, ctx, length, nfe, batch_size, remasking):
    """Mean CER of Alg. 6 (one block of `length`, temperature 0) over `programs`, and the first example. The batch
    starting at program i is seeded with i (random remasking draws its order; low-confidence uses no draw)."""
    from evaluation import metrics as M
    from mdm import autoencode
    from sample import decode_programs, load_run
    demasker, encoder, _ = load_run(str(run_dir), True, "cpu")
    demasker.eval(), encoder.eval()
    texts = []
    for first in range(0, len(programs["texts"]), batch_size):
        part = slice(first, first + batch_size)
        tokens, _ = autoencode(encoder, demasker, programs["enc_ids"][part], programs["enc_mask"][part], length,
                               length, nfe, 0.0, remasking, generator=torch.Generator().manual_seed(first))
        texts += decode_programs(ctx.tokenizer, tokens, ctx.eos_id, ctx.bos_id)
    cers = [M.cer(source, text) for source, text in zip(programs["texts"], texts)]
    return float(np.mean(cers)), {"source": programs["texts"][0], "reconstruction": texts[0]}


def reference_cers(texts):
    """What a CER means on these programs: the source with every letter, digit and _ deleted (the layout and
    punctuation kept: a reconstruction right in shape, wrong in every name), and another held-out program (the
    next one in the set: right in style only)."""
    from evaluation import metrics as M
    skeleton = float(np.mean([M.cer(t, re.sub(r"\w", "", t)) for t in texts]))
    other = float(np.mean([M.cer(t, texts[(i + 1) % len(texts)]) for i, t in enumerate(texts)]))
    return {"skeleton": skeleton, "other_program": other}


# ------------------------------------------------------------------------------------------------
# Results: one record per (configuration, budget, evaluation point); JSON and a markdown table
# ------------------------------------------------------------------------------------------------

def write_results(out, results):
    write_json(out / "results.json", results)
    rows = []
    for key, r in results["points"].items():
        nfe = [f"{r['cer'][str(n)]:.3f}" for n in results["nfe"]]
        val = r.get("val") or {}
        rows.append([r["name"], "`" + (" ".join(r["flags"]) or "(demo default)") + "`", f"{r['step']} / {r['steps']}",
                     r.get("remasking", "low_confidence"),
                     f"{r['train_wall_s'] / 60:.1f}", f"{r['train_cpu_s'] / 60:.1f}",
                     f"{r['train_cpu_s'] / max(r['step'], 1):.3f}", *nfe,
                     f"{r['train_cer']:.3f}", f"{val['ce'][0]:.2f} / {val['ce_r1']:.2f} / {val['top1_r1']:.3f}"
                     if val else "-"])
    headers = ["config", "flags", "step / of", "remasking", "wall min", "CPU min", "CPU s/step",
               *[f"CER NFE {n}" for n in results["nfe"]],
               f"train CER NFE {max(results['nfe'])}", "val CE r = 0.1 / CE r = 1 / top-1 r = 1"]
    note = (f"Held-out CER of Alg. 6 at L = {results['length']}, one block, temperature 0, "
            f"{results['num']} held-out programs (train CER: {results['num']} training programs); "
            f"train_ae.py {' '.join(DEMO_FLAGS)} + flags, 1 thread. 'step / of': evaluated at step s of a run whose "
            f"cosine schedule ends at step 'of' (s < of: mid-schedule, LR not annealed). Wall / CPU: the training subprocesses' "
            f"wall-clock and user + system time (1 thread: CPU time ~ an idle core's wall-clock).")
    if "references" in results:
        note += (f" References on the same programs: the source with every letter, digit and _ deleted "
                 f"{results['references']['skeleton']:.3f}; another held-out program "
                 f"{results['references']['other_program']:.3f}.")
    note += "\n\n"
    write_text(out / "results.md", note + md_table(headers, rows) + "\n")


def run(args):
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = read_json(path) if path.is_file() else {"points": {}}
    results.update(length=args.seq_len, nfe=args.nfe, num=args.num)
    for point in results["points"].values():  # records written before the full curves were kept
        if point.get("val") and "ce" not in point["val"]:
            point["val"] = last_validation(out / "runs" / f"{point['name']}-s{point['steps']}")
    held_out, ctx = held_out_programs(args.data, args.num, args.seq_len)
    results["references"] = reference_cers(held_out["texts"])
    seen = train_programs(ctx, args.num, args.seq_len)
    for name, flags in configurations(args):
        for steps in args.steps:
            run_dir = out / "runs" / f"{name}-s{steps}"
            wall_file = run_dir / "wall.json"
            for point in sorted({s for s in args.eval_at if s < steps} | {steps}):
                key = f"{name}@{steps}:{point}" + ("" if args.remasking == "low_confidence" else f":{args.remasking}")
                if key in results["points"]:
                    continue
                if trained_step(run_dir) > point:  # only the latest checkpoint is kept
                    print(f"{key}: skipped, {run_dir} is trained past step {point} (a mid-schedule point is scored "
                          f"while the run passes it; delete the folder to redo it)", flush=True)
                    continue
                walls = read_json(wall_file) if wall_file.is_file() else {}
                seconds, cpu = train_to(args, run_dir, flags, steps, point)
                if seconds:
                    walls[str(point)] = [seconds, cpu]
                    write_json(wall_file, walls)
                cer = {}
                for nfe in args.nfe:
                    cer[str(nfe)], example = autoencode_cer(run_dir, held_out, ctx, args.seq_len, nfe,
                                                            args.batch_size, args.remasking)
                train_cer, _ = autoencode_cer(run_dir, seen, ctx, args.seq_len, max(args.nfe), args.batch_size,
                                              args.remasking)
                wall = sum(v[0] for s, v in walls.items() if int(s) <= point)
                cpu = sum(v[1] for s, v in walls.items() if int(s) <= point)
                results["points"][key] = {"name": name, "flags": flags, "steps": steps, "step": point,
                                          "remasking": args.remasking,
                                          "train_wall_s": wall, "train_cpu_s": cpu, "cer": cer, "train_cer": train_cer,
                                          "val": last_validation(run_dir) if point == steps else None,
                                          "example": example}
                write_results(out, results)
                print(f"{key}: CER " + " ".join(f"NFE {n} {v:.3f}" for n, v in cer.items())
                      + f" | train CER {train_cer:.3f} | {wall / 60:.1f} min ({cpu / 60:.1f} CPU)", flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example:\n  python -m bench.bench_ae_budget --data runs/study/data --out "
                                       "runs/study/bench --sweep factors --steps 600")
    a = p.add_argument
    a("--data", required=True, help="dataprep/data.py cache (shared tokenizer), e.g. python -m dataprep.data --out runs/study/data "
      "--seq-len 128 --vocab-size 2048 --val-fraction 0.1 --test-fraction 0.1")
    a("--out", required=True, help="output folder: results.json, results.md, runs/<config>-s<steps>/ (train_ae runs)")
    a("--sweep", choices=sorted(SWEEPS), default=None, help="a named list of configurations (see SWEEPS in the file)")
    a("--config", nargs=2, action="append", metavar=("NAME", "FLAGS"), help="one more configuration: a name and "
      "its train_ae.py flags as one quoted string (\"\" = the demo default); repeatable")
    a("--steps", type=int, nargs="+", default=[600], help="budgets in optimizer steps: one run per configuration "
      "and budget, each with its own cosine schedule")
    a("--eval-at", type=int, nargs="*", default=[], help="also evaluate at these steps inside each run "
      "(mid-schedule, reached with --stop-at; the LR is not yet annealed there)")
    a("--seq-len", type=int, default=128, help="L: the data's row length and the autoencoded length (one block)")
    a("--nfe", type=int, nargs="+", default=[128, 16], help="decoding steps of Alg. 6 (L = one token per step); "
      "each must divide L")
    a("--num", type=int, default=64, help="held-out programs autoencoded (and training programs for train CER)")
    a("--remasking", choices=["low_confidence", "random"], default="low_confidence", help="LLaDA remasking rule "
      "(eval.py's default: low_confidence); rerun with random to score the finished runs' final checkpoints again")
    a("--batch-size", type=int, default=32, help="programs per autoencoding batch")
    a("--val-programs", type=int, default=128, help="train_ae's validation programs at the end of a run")
    a("--save-interval", type=int, default=500, help="train_ae checkpoint interval (an interrupted run resumes there)")
    args = p.parse_args(argv)
    r = functools.partial(guards.check_range, p, args)
    for name in ("steps", "seq_len", "nfe", "num", "batch_size", "val_programs", "save_interval"):
        r(name, low=1, integer=True)
    r("eval_at", low=1, integer=True)
    bad = [n for n in args.nfe if args.seq_len % n]
    if bad:
        p.error(f"--nfe {bad} must divide --seq-len {args.seq_len} (LLaDA's schedule reveals L / NFE tokens per step)")
    if not (Path(args.data) / "meta.json").is_file():
        p.error(f"--data {args.data} is not a dataprep/data.py cache (no meta.json); build it: python -m dataprep.data --out "
                f"{args.data} --seq-len {args.seq_len} --vocab-size 2048 --val-fraction 0.1 --test-fraction 0.1")
    return args


if __name__ == "__main__":
    run(parse_args())
