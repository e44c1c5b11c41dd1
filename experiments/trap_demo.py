"""The demo's first stage: the marginal trap (App. B, Theorem B.1) as one command with a printed table.

    python -m experiments.trap_demo                       # about 2-3 minutes on 2 CPU cores
    python -m experiments.trap_demo --out trap.json --reuse   # a rerun with the same settings prints the table

Trains the trap's tiny models (experiments/marginal_trap.py: the base MDM, the encoder + guided demasker of
Alg. 1, the priors) and prints the fraction of valid samples per tokens revealed per step, with random
remasking, for the base MDM, the best factorised sampler (eq. 8), ConThenDisc and ConWithinDisc (one row per
conditioning of its prior, docs/conditioning.md), then one line on what Theorem B.1 predicts. The full
experiment (low-confidence remasking, threshold decoding, the oracle-register row) is `eval.py marginal-trap`.
"""

import argparse

import torch

from experiments import marginal_trap as T


DEMO_ROWS = (  # (key in run()'s rows, label); run() also samples the oracle-register row, not shown here
    ("base_random", "base MDM (Demasker, no registers)"),
    ("optimal_factorized_random", "best factorised sampler (eq. 8 bound)"),
    ("conthendisc_random", "ConThenDisc (Alg. 2, learned prior)"),
    ("conwithindisc_random", "ConWithinDisc, frozen h_phi (Alg. 3/4)"),
    ("conwithindisc_hmu_random", "ConWithinDisc, joint h_mu (comment iii)"),
    ("conwithindisc_xt_random", "ConWithinDisc, on x_t (comment ii)"),
)  # ConWithinDisc redraws once at half the slots revealed; its rows appear for the conditionings run() trained


def demo_table(result):
    """run() result -> {"tokens_per_step": [1, 2, ..., L], "rows": [{"method", "label", "valid": [...]}]}: the
    fraction of valid samples (random remasking) per tokens revealed per step, one row per DEMO_ROWS entry that
    the result holds."""
    rows = result["rows"]
    return {"tokens_per_step": [r["tokens_per_step"] for r in rows],
            "rows": [{"method": key.removesuffix("_random"), "label": label, "valid": [r[key] for r in rows]}
                     for key, label in DEMO_ROWS if key in rows[0]]}


def demo_text(table, length):
    """The printed table (methods as rows, tokens per step as columns) and the one-line reading."""
    width = max(len(row["label"]) for row in table["rows"])
    lines = [f"{'fraction valid / tokens per step':<{width}}" + "".join(f"{t:>7g}" for t in table["tokens_per_step"])]
    lines += [f"{row['label']:<{width}}" + "".join(f"{v:>7.3f}" for v in row["valid"]) for row in table["rows"]]
    valid = {row["method"]: row["valid"][-1] for row in table["rows"]}  # at L tokens per step (one step)
    reading = (f"Theorem B.1 predicts: a per-token (factorised) sampler that reveals coupled tokens in the same step "
               f"cannot beat the eq. 8 bound (up to sampling noise); registers drawn first carry the coupling, so "
               f"ConThenDisc stays valid with many tokens per step. Here, all {length:g} in one step: base "
               f"{valid['base']:.3f}, bound {valid['optimal_factorized']:.3f}, ConThenDisc {valid['conthendisc']:.3f}.")
    within = [row for row in table["rows"] if row["method"].startswith("conwithindisc")]
    if within and len(table["tokens_per_step"]) > 1:  # the redraw acts below L tokens per step; here at 1 per step
        reading += (" ConWithinDisc's redraw at half the slots, 1 token per step: "
                    + ", ".join(f"{row['label'].split(', ', 1)[-1]} {row['valid'][0]:.3f}" for row in within) + ".")
    return "\n".join(lines), reading


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m experiments.trap_demo",
        description="The marginal trap (App. B, Theorem B.1) in about 3 minutes on one CPU core: train the trap's "
                    "tiny base MDM, encoder + guided demasker (Alg. 1) and the latent priors, then print the "
                    "fraction of valid samples per tokens revealed per step for the base MDM, the best factorised "
                    "sampler (eq. 8), ConThenDisc and ConWithinDisc, with random remasking. The full experiment "
                    "(low-confidence remasking, threshold decoding, the oracle-register row) is eval.py marginal-trap.")
    a = parser.add_argument
    a("--pairs", type=int, default=4, help="coupled (subject, object) pairs per sequence; length L = 2 x pairs "
      "tokens, and the table's columns are the tokens per step L/T for every divisor T of L (default: 4)")
    a("--choices", type=int, default=4, help="subjects per slot A; one step over L tokens is valid by chance "
      "with probability (1/A)^pairs (default: 4, so 1/256)")
    a("--train-steps", type=int, default=400, help="training steps of the base MDM and of the encoder + guided "
      "demasker (default: 400)")
    a("--prior-train-steps", type=int, default=1500, help="training steps of each latent prior (unconditional for "
      "ConThenDisc, conditional for ConWithinDisc's redraw) on the trap's register bank (default: 1500; at 800 "
      "ConThenDisc's one-step validity varies more between seeds)")
    a("--conditioning", default=",".join(T.DEFAULT_CONDITIONINGS), help="what ConWithinDisc's conditional prior "
      "reads, one row each, comma-separated: frozen (h_phi(x_t), the frozen encoder: Alg. 3/4 as written), hmu "
      "(h_mu(x_t), an encoder initialised from h_phi and trained with the prior: Sec. 4.3.2 comment iii, "
      "train_prior.py --train-cond-encoder), xt (x_t itself through learned token embeddings: comment ii); each "
      "adds one prior training of --prior-train-steps (default: %(default)s)")
    a("--samples", type=int, default=512, help="samples per method and tokens-per-step point (default: 512)")
    a("--trials", type=int, default=5000, help="Monte Carlo reveal orders for the eq. 8 bound (default: 5000)")
    a("--seed", type=int, default=0, help="seed of the models, the training batches and the samples (default: 0)")
    a("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default, one per core; default: 1, "
      "the fastest for these tiny models)")
    a("--out", help="also write the table as JSON here (tokens_per_step, rows of {method, label, valid}, the "
      "reading, the settings and the seconds taken)")
    a("--reuse", action="store_true", help="with --out: when that file exists and was written with the same "
      "settings, print its table instead of training again (demo.sh reruns use this)")
    args = parser.parse_args(argv)
    if args.reuse and not args.out:
        parser.error("--reuse needs --out (the table to reuse)")
    conditionings = [c.strip() for c in args.conditioning.split(",") if c.strip()]
    unknown = [c for c in conditionings if c not in T.CONDITIONINGS]
    if unknown or len(set(conditionings)) != len(conditionings):
        parser.error(f"--conditioning: a comma-separated subset of {', '.join(T.CONDITIONINGS)} (each once), "
                     f"not {args.conditioning!r}")
    args.conditioning = ",".join(c for c in T.CONDITIONINGS if c in conditionings)  # canonical order
    from infra import guards
    for name in ("pairs", "train_steps", "prior_train_steps", "samples", "trials"):
        guards.check_range(parser, args, name, low=1, integer=True)
    guards.check_range(parser, args, "choices", low=2, integer=True)
    guards.check_range(parser, args, "threads", low=0, integer=True)
    return args


SETTINGS = ("pairs", "choices", "train_steps", "prior_train_steps", "samples", "trials", "seed", "conditioning")


def main(argv=None):
    """Train, print the heading, the table and the reading; write the JSON (--out). Returns the JSON payload."""
    import json
    import time
    from pathlib import Path
    args = parse_args(argv)
    settings = {name: getattr(args, name) for name in SETTINGS}  # what the numbers depend on (not --threads)
    task = T.TrapTask(args.pairs, args.choices)
    heading = (f"The marginal trap (App. B): sequences of {task.length} tokens in {args.pairs} coupled pairs over "
               f"{args.choices} choices ({task.num_valid} valid); {args.samples} samples per point, random remasking")
    if args.reuse and Path(args.out).is_file():
        try:
            saved = json.loads(Path(args.out).read_text())
        except ValueError:
            saved = {}
        if saved.get("settings") == settings:
            print(f"{heading} (reused: {args.out}, {saved['seconds']:g} s when it ran)")
            print(saved["text"])
            print(saved["reading"])
            return saved
        print(f"{args.out} was written with other settings (or is unreadable): training again")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    conditionings = tuple(c for c in args.conditioning.split(",") if c)
    print(f"{heading}; training {args.train_steps} + {args.train_steps} + {1 + len(conditionings)} x "
          f"{args.prior_train_steps} steps first ...", flush=True)
    result = T.run(pairs=args.pairs, choices=args.choices, train_steps=args.train_steps, num_samples=args.samples,
                 seed=args.seed, remaskings=("random",), trials=args.trials, thresholds=(),
                 prior_train_steps=args.prior_train_steps, log=lambda message: None, conditionings=conditionings)
    table = demo_table(result)
    text, reading = demo_text(table, task.length)
    print(text)
    print(reading)
    payload = {**table, "text": text, "reading": reading, "task": result["task"], "settings": settings,
               "threads": args.threads, "seconds": round(time.time() - start, 1), "training": result["training"]}
    if args.out:
        from infra.atomic import write_json
        write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
