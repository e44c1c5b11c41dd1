"""Data-parallel scaling on CPU: training tokens/s with 1 vs 2 processes (docs/benchmarks.md).

One optimizer step of the tiny encoder + demasker (Alg. 1 shape: z_0 = h_phi(x_0), demasker
on masked x_t with the registers, LLaDA's 1/p_mask-weighted loss) is timed in
  - 1 process (the baseline),
  - 2 processes with gloo under DDP and under FSDP2 (distributed.wrap_model),
each process with the same micro-batch (weak scaling: 2 processes do twice the work per
step). Scaling efficiency = tokens/s(2 processes) / (2 x tokens/s(1 process, 1 thread)); one
process with 2 threads is timed too, as the alternative way to use two cores.
Every process uses --threads intra-op threads; on a 2-core machine use 1 so that two
processes do not oversubscribe the cores.

    python -m bench.bench_distributed                 # the table in docs/benchmarks.md
    python -m bench.bench_distributed --steps 20 --batch 8 --seq-len 256
"""

import argparse
import os
import socket
import tempfile
import time

import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from infra import distributed as D
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig


class TinyAutoencoder(nn.Module):
    """h_phi and f_theta side by side (tiny presets, shared vocabulary)."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder(EncoderConfig.tiny(num_registers=8))
        self.demasker = Demasker(DemaskerConfig.tiny(register_dim=self.encoder.cfg.hidden_size))

    def forward(self, x0, xt):
        registers = self.encoder(x0)  # (B, K, d)
        return self.demasker(xt, registers=registers)  # (B, L, V)


def masked_diffusion_loss(model, x0, mask_id, generator):
    """LLaDA's loss: mask with p ~ U(eps, 1), CE on masked tokens / p, over B * L."""
    p_mask = (1 - 1e-3) * torch.rand(x0.shape[0], 1, generator=generator) + 1e-3  # (B, 1)
    masked = torch.rand(x0.shape, generator=generator) < p_mask  # (B, L)
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model(x0, xt).float()  # (B, L, V)
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
    return (ce * masked / p_mask).sum() / x0.numel()


def run(env, mode, args):
    """Time args.steps optimizer steps after args.warmup; returns tokens/s over all ranks."""
    torch.manual_seed(0)
    model = D.wrap_model(TinyAutoencoder(), env, mode=mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    mask_id = D.unwrap(model).demasker.cfg.mask_token_id
    generator = torch.Generator().manual_seed(1000 + env.rank)
    elapsed = 0.0
    for step in range(args.warmup + args.steps):
        x0 = torch.randint(0, mask_id, (args.batch, args.seq_len), generator=generator)
        D.barrier(env)
        start = time.perf_counter()
        masked_diffusion_loss(model, x0, mask_id, generator).backward()
        D.clip_grad_norm(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        D.barrier(env)
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
    tokens = args.steps * args.batch * args.seq_len * env.world_size
    return tokens / elapsed


def _worker(rank, world, port, mode, args, out_file):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    env = D.setup(device="cpu")
    tokens_per_s = run(env, mode, args)
    if env.is_main:
        with open(out_file, "w") as handle:
            handle.write(str(tokens_per_s))
    D.cleanup(env)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world, mode, args):
    with tempfile.TemporaryDirectory() as folder:
        out_file = os.path.join(folder, "tokens_per_s")
        mp.spawn(_worker, args=(world, _free_port(), mode, args, out_file), nprocs=world, join=True)
        with open(out_file) as handle:
            return float(handle.read())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per process (examples)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--single-threads", type=int, default=2,
                        help="also time 1 process with this many threads (the other way to use the "
                             "cores); 0 skips it")
    parser.add_argument("--modes", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"],
                        help="data-parallel wrappers to time with 2 processes")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    single = run(D.setup(device="cpu"), "none", args)
    rows = [(f"1 process, {args.threads} thread(s)", "none", single, None)]
    if args.single_threads:
        torch.set_num_threads(args.single_threads)
        threaded = run(D.setup(device="cpu"), "none", args)
        rows.append((f"1 process, {args.single_threads} threads", "none", threaded, threaded / (2 * single)))
        torch.set_num_threads(args.threads)
    for mode in args.modes:
        tokens_per_s = spawn(2, mode, args)
        rows.append((f"2 processes, {args.threads} thread(s) each", mode, tokens_per_s,
                     tokens_per_s / (2 * single)))
    print(f"tiny encoder + demasker, micro-batch {args.batch} x {args.seq_len} tokens per process, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| processes | wrapper | tokens/s | tokens/s / (2 x 1 process) |")
    print("|---|---|---|---|")
    for processes, mode, tokens_per_s, efficiency in rows:
        shown = "baseline" if efficiency is None else f"{efficiency:.0%}"
        print(f"| {processes} | {mode} | {tokens_per_s:,.0f} | {shown} |")


if __name__ == "__main__":
    main()
