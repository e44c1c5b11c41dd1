"""One command that checks crocodil on a GPU and measures it (docs/gpu.md). The parts, in order:
  tests        pytest tests/test_on_device.py with CROCODIL_TEST_DEVICE = --device
  sdpa         which SDPA backend runs each attention call the models make (tests/test_on_device.py::test_sdpa_backends)
  train_ae     dataprep.data, then train_ae.py in a worker: tokens/s, parameters, MFU, peak memory vs scripts/memory_plan
  train_prior  train_prior.py unconditional and --conditional; dataprep.prompts + experiments.train_prompted
  sample       every sample.py method, plain, --cache prefix, --decoding threshold: seconds per sample and per step
  torchrun     torchrun --nproc_per_node 1 train_ae.py --parallel ddp, --parallel fsdp, then --resume
Each part has a time budget; a failure is recorded with its traceback tail and the next part runs. Writes
OUT/gpu_check.json, OUT/gpu_check.md and OUT/logs/; exit code 1 when any part failed or ran out of time.

    python -m scripts.gpu_check --out runs/gpu_check                  # full mode on cuda: about 8 min on one H100
    python -m scripts.gpu_check --tiny --device cpu --out /tmp/gc      # CPU-sized (tests/scripts/test_gpu_check.py)
"""

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("tests", "sdpa", "train_ae", "train_prior", "sample", "torchrun")
BUDGETS = {"tests": 45, "sdpa": 25, "train_ae": 140, "train_prior": 90, "sample": 120, "torchrun": 60}  # s, full mode
GIB = 2 ** 30
PROMPT, INFILL = 'def double(x):\n    """Double x."""', "def double(x):\n<|span|>\n    return y"
# full: demasker 2048 x 20 (~1.0B) and an encoder of Qwen3-0.6B's width and depth, 1024 x 28 (our 32-wide heads,
# ~0.33B), L = 512, K = 128, bf16, activation checkpointing. tiny: the tiny presets at L = 32 in float32.
FULL = dict(seq_len=512, registers=128, vocab=4096, max_files=300, encoder_width=1024, encoder_layers=28,
            demasker_width=2048, demasker_layers=20, train_steps=30, skip=5, global_batch=16, micro_batch=8,
            lr=3e-4, dtype="bfloat16", checkpointing=True, prior_preset="paper", prior_steps=10, prior_batch=64,
            prior_registers=8, amp="bf16", prompt_files=20, prompted_steps=2, prompted_len=512, sample_len=512,
            sample_steps=64, sample_block=128, sample_batch=4, sample_batches=1, ddim_steps=16, refresh_ddim=8,
            threshold=0.1, span=32, sample_dtype="bfloat16", tr_encoder_width=512, tr_encoder_layers=4,
            tr_demasker_width=1024, tr_demasker_layers=8, tr_registers=16, tr_steps=4, tr_more=2, tr_batch=8,
            tr_micro=4, sdpa_paper=True, sdpa_paper_len=4096, threads=0)
TINY = dict(FULL, seq_len=32, registers=4, vocab=512, max_files=40, encoder_width=None, encoder_layers=None,
            demasker_width=None, demasker_layers=None, train_steps=4, skip=1, global_batch=8, micro_batch=4, lr=3e-3,
            dtype="float32", prior_preset="tiny", prior_steps=3, prior_batch=8, prior_registers=4, amp="none",
            prompt_files=12, prompted_len=256, sample_len=32, sample_steps=8, sample_block=16, sample_batch=2,
            ddim_steps=2, refresh_ddim=2, threshold=0.01, span=6, sample_dtype="float32", tr_encoder_width=None,
            tr_encoder_layers=None, tr_demasker_width=None, tr_demasker_layers=None, tr_registers=4, tr_steps=2,
            tr_more=1, tr_batch=4, tr_micro=2, sdpa_paper=False, threads=1)


class PartFailed(Exception):
    """A part failed; args: (message, figures of what finished)."""


class PartTimeout(PartFailed):
    """A part ran past its budget."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Full-mode sizes (--set): " + ", ".join(f"{k}={v}" for k, v in FULL.items()))
    a = p.add_argument
    a("--out", default="runs/gpu_check", help="results folder: gpu_check.json, gpu_check.md, logs/ (default %(default)s)")
    a("--device", default="cuda", help="device to check: cuda, cuda:N or cpu (default %(default)s)")
    a("--tiny", action="store_true", help="CPU-sized mode: tiny models at L = 32, a few steps, float32 (the test "
      "suite runs it; under a minute on a CPU)")
    a("--parts", default=",".join(PARTS), help="comma list of parts to run (always in the order " + ", ".join(PARTS)
      + "; default all). A part whose input comes from an unselected part fails with that reason")
    a("--budget", action="append", default=[], metavar="PART=SECONDS", help="override one part's time budget "
      "(full mode: " + ", ".join(f"{k} {v}s" for k, v in BUDGETS.items()) + "; tiny: 150s each); repeatable")
    a("--set", action="append", default=[], metavar="NAME=VALUE",
      help="override one size of the mode (names in the epilog, e.g. --set demasker_layers=12); repeatable")
    a("--work", default=None, help="folder for the bulky runs (data cache, checkpoints, samples; ~35 GB in full "
      "mode); default: a new temporary folder, deleted at the end")
    a("--keep-work", action="store_true", help="keep the default temporary --work folder (a given --work is kept)")
    a("--worker", default=None, metavar="JOB.json", help="internal, used by the parts: run one job file in this "
      "process (train_ae.py, whose peak memory is then its own, or a list of CLI main() calls)")
    args = p.parse_args(argv)
    if any(name not in PARTS for name in args.parts.split(",")):
        p.error(f"--parts {args.parts!r}: choose from {', '.join(PARTS)}")
    if any(k not in PARTS or not re.fullmatch(r"\d+(\.\d*)?", v) for k, _, v in (b.partition("=") for b in args.budget)):
        p.error(f"--budget {args.budget}: expected PART=SECONDS with PART in {', '.join(PARTS)}")
    if any(item.partition("=")[0] not in FULL for item in args.set):
        p.error(f"--set {args.set}: unknown size; the names are listed at the end of --help")
    return args


def run(jobs, deadline, env=None):
    """Run [(cmd, log)] at once (cwd = the repository root, output appended to log); at the deadline kill their
    process groups (the processes they started, torchrun's workers included). Returns [(exit code, seconds)]."""
    started, procs, results = time.time(), [], []
    if deadline - started <= 1:
        raise PartTimeout("no budget left for: " + "; ".join(shlex.join(map(str, c)) for c, _ in jobs))
    env = env or dict(os.environ, TQDM_MININTERVAL="10", PYTHONUNBUFFERED="1")
    with contextlib.ExitStack() as stack:
        for cmd, log in jobs:
            f = stack.enter_context(open(log, "ab"))
            f.write(f"\n$ {shlex.join(map(str, cmd))}\n".encode())
            f.flush()
            procs.append(subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True))
        for proc in procs:
            try:
                results.append((proc.wait(timeout=max(0.1, deadline - time.time())), time.time() - started))
            except subprocess.TimeoutExpired:
                for other in (p for p in procs if p.poll() is None):
                    os.killpg(other.pid, signal.SIGKILL)
                    other.wait()
                raise PartTimeout("ran past the part's budget: " + "; ".join(shlex.join(map(str, c)) for c, _ in jobs))
    return results


def tail(path, chars=1500):
    with contextlib.suppress(OSError):
        text = Path(path).read_text(errors="replace")[-chars:].replace("\r", "\n")
        return "\n".join(line for line in text.splitlines() if line.strip())
    return ""


def error_tail(exc=None, chars=1500):
    return (traceback.format_exc() if exc is None else "".join(traceback.format_exception(exc)))[-chars:]


def worker(job_file):
    """Run a job file: {"kind": "train_ae", "argv", "results"} or {"kind": "calls", "calls": [{"name", "module",
    "argv"}], "results", "deadline", "threads"}. Results are rewritten before and after every call, so a
    crash loses only the call in progress (left "running"); after a CUDA error the worker leaves with exit code 3."""
    import torch

    job = json.loads(Path(job_file).read_text())
    path = Path(job["results"])
    results = json.loads(path.read_text()) if path.is_file() else {}

    def save():
        path.with_suffix(".tmp").write_text(json.dumps(results, indent=1))
        path.with_suffix(".tmp").replace(path)

    if job["kind"] == "train_ae":
        import train_ae
        started = time.time()
        core = train_ae.train(train_ae.parse_args(job["argv"]))
        count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else None  # noqa: E731
        results.update(seconds=time.time() - started, params=count(core), encoder_params=count(core.encoder),
                       demasker_params=count(core.demasker),
                       max_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            results.update(cuda_max_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                           cuda_max_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
        return save()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    for call in job["calls"]:
        name = call["name"]
        if results.get(name, {}).get("status", "running") != "running":
            continue  # done by an earlier worker
        if time.time() > job["deadline"]:
            results[name] = {"status": "skipped", "error": "the part's budget ran out"}
            continue
        results[name] = {"status": "running"}
        save()
        print(f"\n=== {name}: python -m {call['module']} {shlex.join(call['argv'])}", flush=True)
        started = time.time()
        try:
            importlib.import_module(call["module"]).main(call["argv"])
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            results[name] = {"status": "ok", "seconds": time.time() - started}
        except (Exception, SystemExit) as exc:  # noqa: BLE001 (a CLI refusing its flags too: recorded, next)
            traceback.print_exc()
            results[name] = {"status": "failed", "seconds": time.time() - started,
                             "error": error_tail(exc) if isinstance(exc, Exception) else f"SystemExit: {exc}"}
            if "CUDA error" in str(exc) or "CUBLAS_STATUS" in str(exc):  # a fresh process for the rest
                save()
                os._exit(3)
        save()
    save()


def device_info(device):
    import importlib.util

    import torch
    info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "missing_packages": [name for name in ("numpy", "tqdm", "tokenizers",
            "safetensors", "huggingface_hub", "pytest") if importlib.util.find_spec(name) is None]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info.update(device_name=torch.cuda.get_device_name(index), capability=list(torch.cuda.get_device_capability(index)),
                    gpu_memory_gib=torch.cuda.get_device_properties(index).total_memory / GIB)
    else:
        info.update(device_name=f"cpu ({platform.machine()}, {os.cpu_count()} cores)", cuda_available=torch.cuda.is_available())
    return info


def bf16_peak_flops(device_name):
    """Dense bf16 tensor-core peak (FLOP/s) of known GPUs, else None."""
    name = (device_name or "").upper()
    if "H100" in name:
        return 756e12 if "PCIE" in name else 989e12  # H100 SXM: 989 TFLOP/s dense
    return 989e12 if "H200" in name else 312e12 if "A100" in name else None


def read_log(path, kind="train"):
    lines = Path(path).read_text().splitlines() if Path(path).is_file() else []
    return [r for r in map(json.loads, filter(str.strip, lines)) if r.get("type") == kind]


def train_flags(s, prefix=""):
    """train_ae.py flags of the model sizes (prefix "tr_": the torchrun part's)."""
    names = ("encoder_width", "encoder_layers", "demasker_width", "demasker_layers")
    return ["--num-registers", str(s[prefix + "registers"])] + [
        x for name in names if s[prefix + name] for x in ("--" + name.replace("_", "-"), str(s[prefix + name]))]


def sample_figures(path, cfg, batch_size):
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    last = max(r["index"] for r in records) // batch_size
    batch = [r for r in records if r["index"] // batch_size == last]  # the last batch (warm when there are two)
    tokens = [t for r in records for t in r["tokens"]]
    if any(not 0 <= t < cfg["vocab_size"] for t in tokens):
        raise ValueError(f"{path}: token ids outside [0, {cfg['vocab_size']})")
    calls = max(r["demasker_calls"] for r in batch)
    return {"samples": len(records), "s_per_sample": batch[-1]["seconds_per_sample"], "demasker_calls": calls,
            "s_per_step": batch[-1]["seconds_per_sample"] * len(batch) / max(1, calls),
            "nfe": statistics.mean(float(r["nfe"]) for r in records),
            "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in records),
            "mask_tokens_left": tokens.count(cfg["mask_token_id"])}


def fmt(x):
    return "n/a" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


class Check:
    """One run of the check: sizes, budgets, folders, device facts, and the parts (part_NAME(deadline) -> figures,
    among them a one-line "summary"; PartFailed / PartTimeout carry the figures of what finished)."""

    def __init__(self, args):
        self.args, self.tiny, self.device = args, args.tiny, args.device
        self.size = dict(TINY if args.tiny else FULL)
        for name, _, value in (item.partition("=") for item in args.set):
            with contextlib.suppress(ValueError):
                value = json.loads({"true": "true", "false": "false", "none": "null"}.get(value.lower(), value))
            self.size[name] = value
        self.budgets = {part: 150.0 for part in PARTS} if args.tiny else dict(BUDGETS)
        self.budgets.update({k: float(v) for k, _, v in (item.partition("=") for item in args.budget)})
        self.out, self.logs = Path(args.out).resolve(), Path(args.out).resolve() / "logs"
        # outside OUT by default, so that a killed run leaves no checkpoints among the results
        self.work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
        self.data, self.ae = self.work / "data", self.work / "ae"
        for folder in (self.out, self.logs, self.work):
            folder.mkdir(parents=True, exist_ok=True)
        self.info = device_info(args.device)

    def fresh(self, *names):
        for name in names:
            shutil.rmtree(self.work / name, ignore_errors=True)

    def worker(self, job, deadline, log):
        return run([([sys.executable, "-m", "scripts.gpu_check", "--worker", job], log)], deadline)[0]

    def calls(self, label, calls, deadline):
        """CLI main() calls in one worker process (one start-up, one CUDA context). A call in which the worker dies
        (CUDA fault, OOM killer) or leaves after a CUDA error is recorded as failed and a new worker takes the rest.
        Returns ({call name: result}, timed out)."""
        job, path, log = self.work / f"{label}.job.json", self.work / f"{label}.results.json", self.logs / f"{label}.log"
        path.unlink(missing_ok=True)
        job.write_text(json.dumps({"kind": "calls", "calls": calls, "results": str(path), "deadline": deadline,
                                   "threads": self.size["threads"]}, indent=1))
        for _ in range(2 * len(calls) + 1):
            try:
                (rc, _), timed_out = self.worker(job, deadline, log), False
            except PartTimeout:
                rc, timed_out = None, True
            results = json.loads(path.read_text()) if path.is_file() else {}
            running = [name for name, r in results.items() if r["status"] == "running"]
            for name in running:
                results[name] = ({"status": "timeout", "error": "ran past the part's budget"} if timed_out else
                                 {"status": "failed", "error": f"the worker died here (exit code {rc}):\n{tail(log)}"})
            path.write_text(json.dumps(results, indent=1))
            if timed_out or rc == 0:
                return results, timed_out
            if not running and rc != 3:
                raise PartFailed(f"the worker failed (exit code {rc}):\n{tail(log)}")
        return results, False

    def pytest(self, log, deadline, *extra, **env):
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_on_device.py", *extra]
        return run([(cmd, log)], deadline, dict(os.environ, CROCODIL_TEST_DEVICE=self.device, **env))[0]

    def part_tests(self, deadline):
        log = self.logs / "tests.log"
        rc, seconds = self.pytest(log, deadline)
        text = tail(log, 20000)
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
        counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|error)",
                                                         summary[-1] if summary else ""))
        figures = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "xfailed", "xpassed")}
        figures.update(failed=figures["failed"] + counts.get("error", 0), seconds_pytest=seconds,
                       failed_tests=re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M))
        figures["summary"] = ", ".join(f"{figures[k]} {k}" for k in ("passed", "failed", "skipped", "xfailed", "xpassed"))
        if rc != 0 or figures["failed"] or not figures["passed"]:
            raise PartFailed(f"pytest exit code {rc}, {figures['summary']} on {self.device}:\n{tail(log)}", figures)
        return figures

    def part_sdpa(self, deadline):
        """tests/test_on_device.py::test_sdpa_backends at this run's shapes; it writes the table of attention calls."""
        report, log = self.logs / "sdpa.json", self.logs / "sdpa.log"
        report.unlink(missing_ok=True)
        keys = ("registers", "encoder_width", "demasker_width", "seq_len", "prior_registers", "sdpa_paper", "sdpa_paper_len")
        rc, _ = self.pytest(log, deadline, "-k", "sdpa", CROCODIL_SDPA_REPORT=str(report),
                            CROCODIL_SDPA_SIZES=json.dumps({**{k: self.size[k] for k in keys}, "tiny": self.tiny}))
        cases = json.loads(report.read_text()) if report.is_file() else []
        figures = {"calls": len(cases), "flash_ok": sum("FLASH_ATTENTION" in c["ok"] for c in cases),
                   "defaults": sorted({c["default"] for c in cases}), "cases": cases,
                   "backend_note": "math/cpu" if self.device == "cpu" else "CUDA kernels, per call in cases"}
        figures["summary"] = (f"{len(cases)} attention calls; flash ok in {figures['flash_ok']}; torch's choice: "
                              f"{', '.join(figures['defaults'])}; {figures['backend_note']}")
        if rc != 0 or not cases:
            raise PartFailed(f"pytest -k sdpa exit code {rc}:\n{tail(log)}", figures)
        return figures

    def build_data(self):
        """The stdlib token cache at the run's L (shared with the torchrun part), built in this process."""
        from dataprep import data
        s = self.size
        if not (self.data / "meta.json").is_file():
            argv = ["--out", str(self.data), "--seq-len", str(s["seq_len"]), "--vocab-size", str(s["vocab"]),
                    "--max-files", str(s["max_files"]), "--overlong", "cut", "--val-fraction", "0.2"]
            with open(self.logs / "data.log", "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                print(f"$ python -m dataprep.data {shlex.join(argv)}", flush=True)
                try:
                    data.main(argv)
                except BaseException as exc:  # noqa: BLE001 (argparse's SystemExit too)
                    raise PartFailed(f"dataprep.data failed: {error_tail(exc)}") from None
        return json.loads((self.data / "meta.json").read_text())

    def part_train_ae(self, deadline):
        s, started = self.size, time.time()
        meta = self.build_data()
        figures = {"data_seconds": time.time() - started, "train_programs": meta["splits"]["train"]["programs"],
                   "val_programs": meta["splits"]["val"]["programs"], "vocab_size": meta["vocab_size"]}
        argv = ["--preset", "tiny", "--data", str(self.data), "--seq-len", str(s["seq_len"]), *train_flags(s),
                "--max-steps", str(s["train_steps"]), "--global-batch-size", str(s["global_batch"]),
                "--micro-batch-size", str(s["micro_batch"]), "--lr", str(s["lr"]), "--eval-interval", "0",
                "--log-interval", "1", "--save-interval", str(10 ** 9), "--device", self.device, "--dtype", s["dtype"],
                "--threads", str(s["threads"]), "--out-dir", str(self.ae),
                "--activation-checkpointing" if s["checkpointing"] else "--no-activation-checkpointing"]
        figures["command"] = "python train_ae.py " + shlex.join(argv)
        self.fresh("ae")  # a kept --work may hold an older run
        job, path = self.work / "train_ae.job.json", self.work / "train_ae.results.json"
        path.unlink(missing_ok=True)
        job.write_text(json.dumps({"kind": "train_ae", "argv": argv, "results": str(path)}))
        rc, figures["worker_seconds"] = self.worker(job, deadline, self.logs / "train_ae.log")
        records = read_log(self.ae / "log.jsonl")
        if rc != 0 or not path.is_file() or not records:
            raise PartFailed(f"train_ae.py failed (exit code {rc}):\n{tail(self.logs / 'train_ae.log')}", figures)
        measured = json.loads(path.read_text())
        speed = statistics.median([r["tokens_per_s"] for r in records][s["skip"]:] or [records[-1]["tokens_per_s"]])
        peak = bf16_peak_flops(self.info.get("device_name")) if self.device.startswith("cuda") else None
        plan = self.memory_plan()
        figures.update(measured, steps=len(records), tokens_per_s=speed, tokens_per_step=s["global_batch"] * s["seq_len"],
                       s_per_step=s["global_batch"] * s["seq_len"] / speed, final_loss=records[-1]["loss"],
                       bf16_peak_flops=peak, mfu=6 * measured["params"] * speed / peak if peak else None,
                       mfu_note="6 * params * text tokens/s / dense bf16 peak; neither the recompute of activation "
                                "checkpointing nor the K + 2 prefix / K - 1 register positions are counted",
                       peak_memory_gib=measured.get("cuda_max_allocated_gib", measured["max_rss_gib"]), memory_plan=plan)
        figures["summary"] = (f"{fmt(speed)} tokens/s, {fmt(measured['params'] / 1e6)}M params, MFU {fmt(figures['mfu'])}, "
                              f"peak {fmt(figures['peak_memory_gib'])} GiB (plan {fmt(plan['predicted_without_fsdp_gib'])}"
                              f" GiB without FSDP buffers, {fmt(plan['predicted_total_gib'])} with)")
        if not all(math.isfinite(r["loss"]) for r in records):
            raise PartFailed(f"non-finite training loss: {[r['loss'] for r in records]}", figures)
        return figures

    def memory_plan(self):
        """scripts/memory_plan.plan for this run's configs (read back from the checkpoint) on 1 GPU, no overhead
        allowance (max_memory_allocated excludes the CUDA context). The plan is written for FSDP2 in bf16; its FSDP
        term (unsharded unit buffers) has no counterpart in one plain process: the total without it is given too."""
        from demasker import DemaskerConfig
        from encoder import EncoderConfig
        from scripts import memory_plan as MP

        s, ckpt = self.size, self.ae / "checkpoint"
        enc = EncoderConfig.from_dict(json.loads((ckpt / "encoder" / "config.json").read_text()))
        dem = DemaskerConfig.from_dict(json.loads((ckpt / "demasker" / "config.json").read_text()))
        params, rows = MP.plan(enc, dem, s["seq_len"], s["global_batch"], 1, self.info.get("gpu_memory_gib") or 80,
                               [s["micro_batch"]], 0.0)
        gib = {k: v / GIB for k, v in next(r for r in rows if r["checkpointing"] == bool(s["checkpointing"])).items()
               if k in ("states", "fsdp", "enc", "dem", "logits", "total")}
        return {"predicted_total_gib": gib["total"], "predicted_without_fsdp_gib": gib["total"] - gib["fsdp"],
                "components_gib": gib, "inputs": {"seq_len": s["seq_len"], "num_registers": enc.num_registers, "gpus": 1,
                                                  "micro_batch": s["micro_batch"], "overhead_gib": 0, "dtype": s["dtype"],
                                                  "params": params["total"], "activation_checkpointing": s["checkpointing"]},
                "note": "FSDP2 plan: bf16 activations, fp32 master weights, grads and AdamW; " + (
                    "a tiny float32 CPU run: its max RSS does not map to the plan" if self.tiny else
                    "compare with cuda_max_allocated_gib")}

    def part_train_prior(self, deadline):
        s, w = self.size, self.work
        if not (self.ae / "checkpoint" / "encoder" / "config.json").is_file():
            raise PartFailed("needs the AE run of part train_ae (none finished)")
        common = ["--ae", str(self.ae), "--preset", s["prior_preset"], "--max-steps", str(s["prior_steps"]),
                  "--global-batch-size", str(s["prior_batch"]), "--num-registers", str(s["prior_registers"]),
                  "--eval-interval", "0", "--val-examples", "16", "--log-interval", "1", "--device", self.device,
                  "--amp", s["amp"], "--quiet", "--threads", str(s["threads"])]
        prompted = ["--ae", str(self.ae), "--pairs", str(w / "pairs"), "--out-dir", str(w / "pprior"), "--seq-len",
                    str(s["prompted_len"]), "--num-registers", str(s["prior_registers"]), "--steps", str(s["prompted_steps"]),
                    "--batch-size", "4", "--max-examples", "8", "--warmup-steps", "0", "--freeze-kappa",
                    "--log-interval", "1", "--threads", str(s["threads"]), "--device", self.device]
        calls = [{"name": "unconditional", "module": "train_prior", "argv": common + ["--out-dir", str(w / "prior")]},
                 {"name": "conditional", "module": "train_prior", "argv": common + ["--conditional", "--out-dir",
                                                                                     str(w / "cprior")]},
                 {"name": "pairs", "module": "dataprep.prompts", "argv": ["--out", str(w / "pairs"), "--max-files",
                                                                          str(s["prompt_files"])]},
                 {"name": "prompted", "module": "experiments.train_prompted", "argv": prompted}]
        self.fresh("prior", "cprior", "pprior", "pairs")
        results, timed_out = self.calls("train_prior", calls, deadline)
        figures = {}
        for call, folder in zip(calls, ("prior", "cprior", None, "pprior")):
            r = figures[call["name"]] = dict(results.get(call["name"], {"status": "failed", "error": "not run"}))
            records = read_log(w / folder / "log.jsonl") if folder else []
            if records:
                r.update(steps=len(records), final_loss=records[-1].get("loss"))
                if r["final_loss"] is not None and not math.isfinite(r["final_loss"]):
                    r.update(status="failed", error=f"non-finite loss {r['final_loss']}")
        failed = [f"{n}: {r.get('error', '')[-600:]}" for n, r in figures.items() if r["status"] != "ok"]
        figures["summary"] = ", ".join(f"{n} {r['status']} {fmt(r.get('seconds'))}s" for n, r in figures.items())
        if failed:
            raise (PartTimeout if timed_out else PartFailed)("; ".join(failed), figures)
        return figures

    def sample_calls(self):
        """One sample.py call per method and option (each flag only where it acts: sample.py refuses the others)."""
        s, w = self.size, self.work
        val = json.loads((self.data / "meta.json").read_text())["splits"]["val"]["programs"]
        draw, refresh = ["--prior-steps", str(s["ddim_steps"])], ["--refresh-prior-steps", str(s["refresh_ddim"])]
        steps, prior, cprior = ["--steps", str(s["sample_steps"])], str(w / "prior"), str(w / "cprior")
        methods = {"base": ["--method", "base"], "autoencode": ["--method", "autoencode", "--data", str(self.data)],
                   "conthendisc": ["--method", "conthendisc", "--prior", prior, *draw],
                   "conwithindisc": ["--method", "conwithindisc", "--prior", prior, "--cond-prior", cprior, *draw,
                                     *refresh]}
        options = {"": [], "+cache prefix": ["--cache", "prefix"],
                   "+threshold": ["--decoding", "threshold", "--threshold", str(s["threshold"])]}
        variants = [(f"{m} {o}".strip(), margs + steps + ["--block-length", str(s["sample_block"])] + oargs)
                    for m, margs in methods.items() for o, oargs in options.items()]
        pprior = ["--prompted-prior", str(w / "pprior"), *draw]
        infill = ["--infill", INFILL, "--span-tokens", str(s["span"])]
        variants += [("prompt base", ["--method", "base", "--prompt", PROMPT, *steps]),
                     ("prompt conthendisc", ["--method", "conthendisc", "--prompt", PROMPT, *pprior, *steps]),
                     ("prompt conwithindisc", ["--method", "conwithindisc", "--prompt", PROMPT, *pprior, *refresh, *steps]),
                     ("infill base", ["--method", "base", *infill]),
                     ("infill conwithindisc", ["--method", "conwithindisc", "--cond-prior", cprior, *refresh, *infill])]
        if not self.tiny:  # CUDA kernels, cuBLAS heuristics and the page cache warm up outside the figures
            variants.insert(0, ("warm-up (base)", variants[0][1]))
        calls, num = [], s["sample_batches"] * s["sample_batch"]
        for name, extra in variants:
            out = w / "samples" / (re.sub(r"[^a-z0-9]+", "_", name).strip("_") + ".jsonl")
            argv = ["--ckpt", str(self.ae), "--length", str(s["sample_len"]), "--num",
                    str(min(num, val) if name.startswith("autoencode") else num), "--batch-size", str(s["sample_batch"]),
                    "--temperature", "1", "--device", self.device, "--quiet", "--out", str(out), *extra]
            calls.append({"name": name, "module": "sample", "argv": argv + ["--dtype", s["sample_dtype"]], "out": str(out)})
        return calls

    def part_sample(self, deadline):
        if not (self.ae / "checkpoint" / "demasker" / "config.json").is_file():
            raise PartFailed("needs the AE run of part train_ae (none finished)")
        cfg = json.loads((self.ae / "checkpoint" / "demasker" / "config.json").read_text())
        calls = self.sample_calls()
        results, timed_out = self.calls("sample", calls, deadline)
        variants, findings = {}, []
        for call in calls:
            r = variants[call["name"]] = dict(results.get(call["name"], {"status": "failed", "error": "not run"}))
            if r["status"] == "ok":
                try:
                    r.update(sample_figures(call["out"], cfg, self.size["sample_batch"]))
                except Exception as exc:  # noqa: BLE001
                    r.update(status="failed", error=error_tail(exc))
            if r["status"] != "ok":  # a finding (a dtype that crashes: rerun with --set sample_dtype=float32)
                lines = (r.get("error") or r["status"]).strip().splitlines()
                findings.append(f"{call['name']} ({self.size['sample_dtype']}): {lines[-1] if lines else r['status']}")
        figures = {"variants": variants, "ok": len(calls) - len(findings), "total": len(calls), "findings": findings,
                   "summary": f"{len(calls) - len(findings)}/{len(calls)} variants ok"}
        if findings:
            raise (PartTimeout if timed_out else PartFailed)("failed variants:\n" + "\n".join(findings), figures)
        return figures

    def part_torchrun(self, deadline):
        s, ddp, fsdp = self.size, self.work / "tr_ddp", self.work / "tr_fsdp"
        self.build_data()
        every = ["--device", self.device, "--threads", str(s["threads"])]
        flags = ["--preset", "tiny", "--data", str(self.data), "--seq-len", str(s["seq_len"]), *train_flags(s, "tr_"),
                 "--global-batch-size", str(s["tr_batch"]), "--micro-batch-size", str(s["tr_micro"]), "--lr", str(s["lr"]),
                 "--eval-interval", "0", "--log-interval", "1", "--dtype", s["dtype"], "--max-steps", str(s["tr_steps"]),
                 *every]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "train_ae.py"]
        runs = {"ddp": (flags + ["--parallel", "ddp", "--out-dir", str(ddp)], ddp),
                "fsdp": (flags + ["--parallel", "fsdp", "--out-dir", str(fsdp)], fsdp),
                "fsdp --resume": (["--resume", "--parallel", "fsdp", "--max-steps", str(s["tr_steps"] + s["tr_more"]),
                                   "--out-dir", str(fsdp)] + every, fsdp)}
        logs = {name: self.logs / f"torchrun_{name.replace(' --', '_')}.log" for name in runs}
        self.fresh("tr_ddp", "tr_fsdp")
        # ddp and fsdp side by side (small models: start-up dominates), then the resume of the fsdp run
        outcomes = run([(launcher + runs[n][0], logs[n]) for n in ("ddp", "fsdp")], deadline)
        outcomes += run([(launcher + runs["fsdp --resume"][0], logs["fsdp --resume"])], deadline)
        figures = {"backend": "nccl" if self.device.startswith("cuda") else "gloo"}
        for (name, (argv, folder)), (rc, seconds) in zip(runs.items(), outcomes):
            records = read_log(folder / "log.jsonl")
            r = figures[name] = {"status": "ok" if rc == 0 else "failed", "seconds": seconds, "exit_code": rc,
                                 "steps": [rec["step"] for rec in records]}
            if len(records) > 1:
                r["tokens_per_s"] = statistics.median(rec["tokens_per_s"] for rec in records[1:])
            resumed = list(range(s["tr_steps"] + 1, s["tr_steps"] + s["tr_more"] + 1))
            if rc == 0 and name.endswith("--resume") and r["steps"][-s["tr_more"]:] != resumed:
                r.update(status="failed", error=f"the steps after --resume {r['steps']} do not continue the count")
            if rc != 0:
                r["error"] = tail(logs[name])
        runs_only = {n: r for n, r in figures.items() if n != "backend"}
        figures["summary"] = ", ".join(f"{n} {r['status']}" for n, r in runs_only.items()) + f" ({figures['backend']})"
        failed = [f"{n}: {r.get('error', '')[-600:]}" for n, r in runs_only.items() if r["status"] != "ok"]
        if failed:
            raise PartFailed("; ".join(failed), figures)
        return figures


def markdown(report):
    info, parts, missing = report["info"], report["parts"], report["info"].get("missing_packages")
    last_line = lambda p: ((p.get("error") or p.get("reason") or "").strip().splitlines() or [""])[-1]  # noqa: E731
    lines = [f"# crocodil GPU check ({'tiny' if report['tiny'] else 'full'} mode)", "",
             f"{info.get('device_name')} (`--device {info['device']}`), torch {info['torch']}, CUDA {info.get('cuda')}, "
             f"commit {(info.get('git_commit') or '?')[:10]}, {report['seconds']:.0f} s in all."
             + (f" Missing packages: {', '.join(missing)}." if missing else ""), "",
             "| part | status | seconds | figures |", "|---|---|---|---|"]
    lines += [f"| {n} | {p['status']} | {fmt(p.get('seconds'))} | {p.get('summary') or last_line(p)[:160]} |"
              for n, p in parts.items()]
    if parts.get("sample", {}).get("variants"):
        lines += ["", "| sample variant | status | s/sample | s/step | NFE | tokens/step |", "|---|---|---|---|---|---|"]
        lines += [f"| {n} | {r['status']} | {fmt(r.get('s_per_sample'))} | {fmt(r.get('s_per_step'))} | {fmt(r.get('nfe'))} "
                  f"| {fmt(r.get('tokens_per_step'))} |" for n, r in parts["sample"]["variants"].items()]
    if parts.get("sdpa", {}).get("cases"):
        lines += ["", "| attention call | q (B, H, T, D) | mask | torch's choice | runs alone | why |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['call']} | {tuple(c['q'])} | {c['mask']}{' causal' if c['is_causal'] else ''} | {c['default']} | "
                  f"{', '.join(c['ok'])} | {c['reason']} |" for c in parts["sdpa"]["cases"]]
    failures = [(n, p) for n, p in parts.items() if p["status"] not in ("ok", "skipped")]
    lines += ["", "Failures (tracebacks in gpu_check.json, logs in logs/):"] if failures else []
    lines += [f"- {n}: {last_line(p)[:300] or p['status']}" for n, p in failures]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    started, check = time.time(), Check(args)
    report = {"tiny": check.tiny, "info": check.info, "argv": sys.argv[1:] if argv is None else list(argv),
              "sizes": check.size, "budgets_s": check.budgets, "seconds": 0.0, "parts": {}}
    for name in PARTS:
        part, part_start = {"status": "ok"}, time.time()
        if name not in args.parts.split(","):
            part = {"status": "skipped", "reason": "not in --parts"}
        else:
            print(f"[gpu_check] part {name} (budget {check.budgets[name]:.0f}s)", flush=True)
            try:
                part.update(getattr(check, f"part_{name}")(part_start + check.budgets[name]))
            except PartFailed as exc:
                part.update(exc.args[1] if len(exc.args) > 1 else {})  # the figures of what did finish
                part.update(status="timeout" if isinstance(exc, PartTimeout) else "failed", error=str(exc.args[0])[-3000:])
            except Exception:  # noqa: BLE001 (any failure is recorded; the next part runs)
                part.update(status="failed", error=error_tail(chars=3000))
            part.update(seconds=time.time() - part_start, budget_s=check.budgets[name])
            print(f"[gpu_check] part {name}: {part['status']} in {part['seconds']:.1f}s {part.get('summary', '')}", flush=True)
        report["parts"][name], report["seconds"] = part, time.time() - started
        (check.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (check.out / "gpu_check.md").write_text(markdown(report))
        if name == "sample" and not args.work and not args.keep_work:
            check.fresh("ae", "prior", "cprior", "pprior", "samples")  # the disk: only torchrun (data) is left
    if not args.work and not args.keep_work:
        shutil.rmtree(check.work, ignore_errors=True)
    elif args.keep_work:
        print(f"[gpu_check] run folders kept in {check.work}")
    print(markdown(report))
    return 1 if any(p["status"] not in ("ok", "skipped") for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
