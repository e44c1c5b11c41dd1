"""Benchmark: sampler overhead of mdm.generate outside the model forwards (target: < 5% at L = 256;
docs/benchmarks.md).

Every demasker forward is timed on its own (with a device synchronize on CUDA); the overhead is
(loop time - forward time) / loop time, i.e. the share of each step spent in the sampler itself (Gumbel
noise, softmax, top-k, bookkeeping). The model is the tiny Demasker (random weights) unless --ckpt is given.
Each setting runs with both random streams (--rng): "fast" draws the Gumbel noise only at the masked
candidates, "llada" for the full (B, L, V) logits (token-exact LLaDA parity); the last column is the step
time at temperature 1 over the step time at temperature 0 (target for fast: <= 1.10 at V = 32k;
docs/decoding.md).

    python -m bench.bench_sample                        # docs/benchmarks.md: L = 256, CPU, several settings
    python -m bench.bench_sample --vocab 32768 --batch-size 8 --block-length 32
    python -m bench.bench_sample --device cuda --batch-size 16
"""

import argparse
import time

import torch

from demasker import Demasker, DemaskerConfig
from mdm import Decoding, generate


class TimedModel(torch.nn.Module):
    """Wraps a model; accumulates the wall time spent inside its forward calls."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seconds, self.calls = model, 0.0, 0
        self.cfg = model.cfg  # mdm.generate reads cfg.mask_token_id

    def _sync(self, x):
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    def forward(self, x, **kwargs):
        self._sync(x)
        start = time.perf_counter()
        logits = self.model(x, **kwargs)
        self._sync(x)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return logits


def measure(timed, batch_size, gen_length, block_length, steps, temperature, remasking, registers, repeats,
            decoding):
    """Best-of-repeats (loop seconds, forward seconds, nfe) for one setting."""
    best = None
    for _ in range(repeats):
        timed.seconds = 0.0
        device = next(timed.parameters()).device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        _, nfe = generate(timed, batch_size, gen_length, block_length, steps, temperature, remasking,
                          registers=registers, decoding=decoding)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
        if best is None or total < best[0]:
            best = (total, timed.seconds, nfe)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="demasker folder (Demasker.from_pretrained); default: "
                        "DemaskerConfig.tiny() with random weights")
    parser.add_argument("--d-model", type=int, default=None, help="override the tiny config's width "
                        "(n_heads kept, MLP 2.7x) to see how the overhead shrinks as the model grows")
    parser.add_argument("--n-layers", type=int, default=None, help="override the tiny config's depth")
    parser.add_argument("--vocab", type=int, default=None, help="override the tiny config's vocabulary size "
                        "(the Gumbel noise scales with it; LLaDA's is 126464)")
    parser.add_argument("--rng", nargs="+", default=["fast", "llada"], choices=["fast", "llada"],
                        help="random streams to time (see mdm.Decoding)")
    parser.add_argument("--gen-length", type=int, default=256, help="tokens generated per sequence (L)")
    parser.add_argument("--steps", type=int, default=64, help="sampling steps (= NFE) per run")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 8], help="batch sizes to time")
    parser.add_argument("--block-length", type=int, nargs="+", default=[256, 32], help="block lengths to time")
    parser.add_argument("--registers", type=int, default=8, help="registers fed to the demasker (0 = base MDM)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting; the fastest is reported")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {"max_sequence_length": args.gen_length}
    if args.d_model:
        overrides.update(d_model=args.d_model, mlp_hidden_size=int(2.6875 * args.d_model))
    if args.n_layers:
        overrides["n_layers"] = args.n_layers
    if args.vocab:
        overrides["vocab_size"] = args.vocab
    model = (Demasker.from_pretrained(args.ckpt, device=args.device) if args.ckpt
             else Demasker(DemaskerConfig.tiny(**overrides)).to(args.device))
    timed = TimedModel(model.eval())
    cfg = model.cfg
    print(f"device={args.device} threads={torch.get_num_threads()} model: d_model={cfg.d_model} "
          f"layers={cfg.n_layers} vocab={cfg.vocab_size} L={args.gen_length} steps={args.steps} "
          f"registers={args.registers}")
    print(f"{'batch':>5} {'block':>5} {'rng':>5} {'temp':>4} {'remasking':>14} {'step ms':>8} {'fwd ms':>8} "
          f"{'overhead':>8} {'T1/T0':>6}")
    for batch_size in args.batch_size:
        registers = (torch.randn(batch_size, args.registers, cfg.register_dim, device=args.device)
                     if args.registers and cfg.register_dim else None)
        for block_length in args.block_length:
            for rng in args.rng:
                decoding = Decoding(rng=rng)
                step_t0 = None
                for temperature, remasking in [(0.0, "low_confidence"), (1.0, "low_confidence"), (0.0, "random")]:
                    generate(timed, batch_size, args.gen_length, block_length, args.steps, temperature, remasking,
                             registers=registers, decoding=decoding)  # warm-up
                    total, forward, nfe = measure(timed, batch_size, args.gen_length, block_length, args.steps,
                                                  temperature, remasking, registers, args.repeats, decoding)
                    step = total / nfe
                    step_t0 = step if temperature == 0.0 and remasking == "low_confidence" else step_t0
                    ratio = f"{step / step_t0:>6.2f}" if temperature == 1.0 else ""
                    print(f"{batch_size:>5} {block_length:>5} {rng:>5} {temperature:>4.1f} {remasking:>14} "
                          f"{1e3 * step:>8.2f} {1e3 * forward / nfe:>8.2f} {100 * (total - forward) / total:>7.1f}% "
                          f"{ratio}", flush=True)


if __name__ == "__main__":
    main()
