"""Benchmark: samples/s, NFE and the prior's share of the time for the three generators
(docs/benchmarks.md).

Base MDM (mdm.generate), ConThenDisc (Alg. 2) and ConWithinDisc (Alg. 3, one refresh at 0.5) at each
--lengths, with the tiny presets' shapes and random weights (speed does not depend on training). The
prior's time is measured by timing generators.sample_registers and the encoder calls that embed x_t
(wrapped here, nothing else changed); NFE is the paper's count from generators.nfe_report (demasker
calls + prior cost in demasker-call equivalents from forward FLOPs).

    python -m bench.bench_generate --threads 1                 # docs/benchmarks.md (CPU, tiny preset)
    python -m bench.bench_generate --device cuda --batch-size 64
"""

import argparse
import time

import torch

import generators as G
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig, LatentDiT
from mdm import generate


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class PriorClock:
    """Wraps generators.sample_registers and generators.embed_canvas to sum the seconds spent in them."""

    def __init__(self, device):
        self.seconds, self.device = 0.0, device
        self.originals = {name: getattr(G, name) for name in ("sample_registers", "embed_canvas")}
        for name, function in self.originals.items():
            setattr(G, name, self.timed(function))

    def timed(self, function):
        def wrapper(*args, **kwargs):
            sync(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            return result
        return wrapper


def build(args):
    """Random tiny models with the shapes train_ae.py / train_prior.py --preset tiny produce."""
    torch.manual_seed(0)
    K = args.registers
    encoder = Encoder(EncoderConfig.tiny(vocab_size=args.vocab, num_registers=K, mask_token_id=3, eos_token_id=1,
                                         pad_token_id=1, max_position_embeddings=max(args.lengths) + K))
    demasker = Demasker(DemaskerConfig.tiny(vocab_size=args.vocab, mask_token_id=3, eos_token_id=1, bos_token_id=0,
                                            pad_token_id=1, register_dim=encoder.cfg.hidden_size, max_registers=K,
                                            max_sequence_length=max(args.lengths)))
    d = encoder.cfg.hidden_size
    prior = G.Prior(dit=LatentDiT(DiTConfig.tiny(register_dim=d, num_registers=K)), num_registers=K, max_offset=0.5)
    cond_prior = G.Prior(dit=LatentDiT(DiTConfig.tiny(register_dim=d, num_registers=K, cond_dim=d)), num_registers=K,
                         max_offset=0.5, encoder=encoder)
    for model in (demasker, prior.dit, cond_prior.dit, encoder):
        model.to(args.device).eval()
    return demasker, prior, cond_prior


def run(method, models, length, args):
    demasker, prior, cond_prior = models
    settings = (args.batch_size, length, length, length, args.temperature)
    if method == "base":
        return generate(demasker, *settings)[1]
    if method == "conthendisc":
        return G.conthendisc(demasker, prior, *settings, prior_steps=args.prior_steps)[1]["nfe"]
    return G.conwithindisc(demasker, cond_prior, *settings, prior=prior, prior_steps=args.prior_steps,
                           refresh_prior_steps=args.refresh_prior_steps)[1]["nfe"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256], help="generation lengths L (steps = L)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences generated together")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cell (after one warm-up)")
    parser.add_argument("--registers", type=int, default=8, help="K")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size of the tiny models")
    parser.add_argument("--prior-steps", type=int, default=128, help="DDIM steps of the initial draw (paper 128)")
    parser.add_argument("--refresh-prior-steps", type=int, default=32, help="DDIM steps of a refresh (paper 32)")
    parser.add_argument("--temperature", type=float, default=1.0, help="Gumbel temperature of the MDM")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build(args)
    clock = PriorClock(args.device)
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch_size}, K {args.registers}, "
          f"one block, steps = L, prior {args.prior_steps} DDIM steps, refresh {args.refresh_prior_steps}")
    print("| method | L | NFE (paper) | demasker calls | samples/s | time in prior |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for length in args.lengths:
            for method in ("base", "conthendisc", "conwithindisc"):
                run(method, models, length, args)  # warm-up
                clock.seconds, seconds = 0.0, 0.0
                for _ in range(args.repeats):
                    sync(args.device)
                    start = time.perf_counter()
                    nfe = run(method, models, length, args)
                    sync(args.device)
                    seconds += time.perf_counter() - start
                rate = args.batch_size * args.repeats / seconds
                print(f"| {method} | {length} | {nfe:.1f} | {length} | {rate:.2f} | {100 * clock.seconds / seconds:.1f}% |",
                      flush=True)


if __name__ == "__main__":
    main()
