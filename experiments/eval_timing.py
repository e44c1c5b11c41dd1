"""The timing pass of `eval.py speed` (ours): wall-clock as a measurement, apart from the quality passes.

Paper map (arXiv 2603.20210): Sec. 5.3 reports speed in NFE; a wall-clock speedup is ours, and a number a
reviewer can check only when the times are measured, not taken from the batches of the quality passes (those
run once per row, at different moments, possibly beside another job). So, after every row has been sampled and
scored, each row's sampler (the same make_batch: model, settings, decoding) is timed again in one pass:

- R repeats (--timing-repeats, the preset's timing_repeats: 5; 0 = no pass) of one fixed batch of
  --timing-batch samples (default: the preset's batch size);
- interleaved: repeat r runs every row once, the order rotated by r (row r mod n first), so a slow drift of the
  machine (another job starting, the clock speed) falls on every row alike, and no row always runs first;
  one untimed warm-up round comes before (first-call allocations, caches);
- repeat r of every row decodes the seeds of quality batch r (sample.batch_seed of its first index), so the
  rows' r-th repeats decode the same random streams and their ratio is a paired comparison;
- a batch's time is read with the device synchronised (evaluation/nfe.clock) and divided by its size.

Per row: "timing" = {"median", "interval" ([min, max] of the repeats), "repeats", "nfe" (mean NFE of the timed
batches)}. The pass records the machine's load (os.getloadavg before and after, the CPU count, torch's threads):
a load above the threads in use means another job shared the machine, and the report says so. The speedups'
intervals from the repeats (repeat-paired ratios) are evaluation/match.py's. Under torchrun only rank 0 times
(the other ranks wait): the rows are timed on one device, alone.
"""

import os

import numpy as np
import torch
from tqdm import tqdm

from evaluation.nfe import clock
from sample import batch_seed


def load():
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def timed_call(ctx, make_batch, repeat, batch):
    """(seconds per sample, NFE) of one batch: the seeds of quality batch `repeat`, the device synchronised."""
    first = repeat * batch
    indices = list(range(first, first + batch))
    seed = batch_seed(ctx.args.seed, first)
    generator = torch.Generator(device=ctx.device).manual_seed(seed)
    prior_generator = torch.Generator().manual_seed(seed + 1)
    started = clock(ctx.device)
    _, nfe = make_batch(indices, generator, prior_generator)
    elapsed = clock(ctx.device) - started
    return elapsed / batch, float(nfe["nfe"] if isinstance(nfe, dict) else nfe)


def round_order(count, repeat):
    """Row indices of repeat `repeat`: 0..count-1 rotated by repeat (row repeat mod count first)."""
    return [(repeat + i) % count for i in range(count)]


def timing_pass(ctx, samplers, repeats, batch, warmup=True):
    """Time every sampler R times, interleaved (module docstring). samplers: make_batch callables, one per row.
    Returns (per-row timing dicts, the pass's record)."""
    loads, seconds, nfes = [load()], [[] for _ in samplers], [[] for _ in samplers]
    progress = tqdm(total=len(samplers) * (repeats + bool(warmup)), desc="timing pass", leave=False)
    if warmup:
        for make_batch in samplers:
            timed_call(ctx, make_batch, 0, batch)
            progress.update()
    for repeat in range(repeats):
        for index in round_order(len(samplers), repeat):
            value, nfe = timed_call(ctx, samplers[index], repeat, batch)
            seconds[index].append(value)
            nfes[index].append(nfe)
            progress.update()
    progress.close()
    loads.append(load())
    rows = [{"median": float(np.median(s)), "interval": [float(min(s)), float(max(s))], "repeats": s,
             "nfe": float(np.mean(n))} for s, n in zip(seconds, nfes)]
    threads = torch.get_num_threads()
    record = {"repeats": repeats, "batch": batch, "warmup": warmup, "order": "round-robin, rotated by the repeat",
              "load_before": loads[0], "load_after": loads[1], "cpu_count": os.cpu_count(),
              "torch_threads": threads, "device": str(ctx.device)}
    busy = [v for v in loads if v is not None and v > threads + 0.5]
    record["shared_machine"] = bool(busy) if str(ctx.device) == "cpu" else None
    return rows, record


def _load(value):
    return "n/a" if value is None else f"{value:.2f}"


def timing_text(record):
    """One sentence on how the times were measured, with a warning when the machine was shared."""
    if record is None:
        return ("Wall-clock: no timing pass (--timing-repeats 0); the seconds are the quality passes' single "
                "measurements, taken at different moments.")
    text = (f"Wall-clock: a separate timing pass after the quality passes, {record['repeats']} repeats of a batch "
            f"of {record['batch']} per row, interleaved (round-robin, rotated), one warm-up round; median and "
            f"[min, max] per row; speedup intervals from repeat-paired ratios. Device {record['device']}, "
            f"{record['torch_threads']} torch threads, 1-minute load {_load(record['load_before'])} before, "
            f"{_load(record['load_after'])} after.")
    if record.get("shared_machine"):
        text += (" WARNING: the load exceeded the threads in use: another job shared the machine, the times are "
                 "not clean (run `speed` alone).")
    return text
