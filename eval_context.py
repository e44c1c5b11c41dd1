"""eval.py's shared machinery: the presets, the Context that loads runs, data, priors and the scorer, and
sampling sharded over ranks with scoring of a sample set (Sec. 5's protocol: Gen-PPL pooled over tokens next
to the unigram entropy and held-out real programs of matched length; MAUVE on the scorer's features).

The experiments (eval_autoencoder.py: Fig. 4, 7, 8, Tables 1-2; eval_generation.py: Fig. 6, 11, 9, PRDC, the
marginal trap) build on this file; eval.py is the command line.
"""

from pathlib import Path

import numpy as np
import torch

import distributed as D
import metrics as M
from atomic import read_json
from sample import batch_seed, decode_programs

PRESETS = {
    # num: samples (or programs) per point; lengths: the two generation lengths (Fig. 6, Tables 1/2)
    # table_*: Tables 1/2 (paper: L = 256 and 512, block sizes including 32, NFE down to 4); fig4_num: Fig. 4;
    # fig8_*: Fig. 8's program length (None: the data's L) and number of interpolated pairs
    "tiny": dict(table_lengths=(64, 128), table_nfe_min=8, table_blocks=(), fig4_num=48, fig8_length=None, fig8_pairs=48, num=48, batch_size=16, lengths=(64, 128), nfe_min=8, prior_steps=32, refresh_prior_steps=16,
                 mauve_seeds=1, trap_steps=400, trap_samples=256, trap_trials=5000, psnr_points=11),
    "small": dict(table_lengths=(128, 256), table_nfe_min=8, table_blocks=(), fig4_num=400, fig8_length=None, fig8_pairs=400,
                  num=400, batch_size=32, lengths=(128, 256), nfe_min=8, prior_steps=64, refresh_prior_steps=32,
                  mauve_seeds=3, trap_steps=1500, trap_samples=1024, trap_trials=20000, psnr_points=21),
    "paper": dict(table_lengths=(256, 512), table_nfe_min=4, table_blocks=(32,), fig4_num=1000, fig8_length=256,
                  fig8_pairs=1000, num=5000, batch_size=64, lengths=(512, 1024), nfe_min=16, prior_steps=128,
                  refresh_prior_steps=32, mauve_seeds=5, trap_steps=3000, trap_samples=4096, trap_trials=50000,
                  psnr_points=21),
}
MASK_RATIOS = [round(0.1 * i, 1) for i in range(1, 11)]   # Fig. 4's x axis
SIGMAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]       # Fig. 7 (0.75 = the CS 0.8 training noise)
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]                        # Fig. 8
REFRESH_FRACTIONS = [0.0, 0.25, 0.5, 0.75]                  # Fig. 11 (bottom)
SPLITS = ("val", "test")                                     # held-out programs come from these, in order


# ------------------------------------------------------------------------------------------------
# Loading: runs, data, priors, scorer
# ------------------------------------------------------------------------------------------------


def resolve_run(folder):
    """A train_ae.py output folder: OUT/checkpoint (if present) or the folder itself."""
    folder = Path(folder)
    return folder / "checkpoint" if (folder / "checkpoint" / "demasker").is_dir() else folder


def recorded_data_dir(run):
    """The data folder recorded in a run's args.json ("data"), or None."""
    for candidate in (Path(run) / "args.json", Path(run).parent / "args.json"):
        if candidate.is_file():
            return read_json(candidate, "pass --data the data.py cache the run was trained on").get("data")
    return None


class Context:
    """Everything one subcommand needs, loaded lazily: runs, held-out programs, the scorer, the train set."""

    def __init__(self, args, needs_data=True):
        self.args = args
        self.env = D.setup(device=args.device)
        self.device = self.env.device
        self.dtype = getattr(torch, args.dtype) if args.dtype else None
        self.preset = PRESETS[args.preset]
        self.ae_dir = resolve_run(args.ae) if args.ae else None
        self._cache = {}
        self.data_dir = self.meta = self.tokenizer = self.bos_id = self.eos_id = None
        if not needs_data:  # e.g. the marginal trap: a synthetic corpus, no Python data
            return
        data = args.data or (recorded_data_dir(self.ae_dir) if self.ae_dir else None) \
            or (recorded_data_dir(resolve_run(args.base)) if args.base else None)
        if data is None:
            raise ValueError("no --data given and no data folder recorded in the runs' args.json; pass --data "
                             "<the data.py cache the models were trained on>")
        from data import check_tokenizer_matches, load_meta, load_tokenizer
        self.data_dir = Path(data)
        self.meta = load_meta(self.data_dir)
        for flag in ("ae", "ae_no_noise", "base"):  # data and checkpoints belong together (tokenizer sha256)
            if getattr(args, flag):
                check_tokenizer_matches(self.data_dir, resolve_run(getattr(args, flag)),
                                        f"the --{flag.replace('_', '-')} run")
        self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        self.bos_id, self.eos_id = self.meta["bos_id"], self.meta["eos_id"]
        self._cache = {}

    @property
    def data_length(self):
        """L of the data cache's demasker rows."""
        from data import load_split
        return self.cached("data_length", lambda: int(load_split(self.data_dir, "val")["ids"].shape[1]))

    def get(self, name):
        """args.NAME unless None, else the preset's value."""
        value = getattr(self.args, name, None)
        return self.preset[name] if value is None else value

    def cached(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # -- models ---------------------------------------------------------------------------
    def ae(self, folder=None):
        """(demasker, encoder) of --ae (or of `folder`)."""
        from sample import load_run
        folder = resolve_run(folder) if folder else self.ae_dir
        if folder is None:
            raise ValueError("this experiment needs --ae, a train_ae.py run folder (encoder/, demasker/)")
        return self.cached(("ae", str(folder)), lambda: load_run(str(folder), True, self.device, self.dtype)[:2])

    def base(self):
        from sample import load_run
        if not self.args.base:
            raise ValueError("this experiment needs --base, a train_ae.py --no-registers run (the base MDM)")
        folder = resolve_run(self.args.base)
        return self.cached(("base", str(folder)), lambda: load_run(str(folder), False, self.device, self.dtype)[0])

    def prior(self, folder, flag="--prior"):
        from generators import load_prior
        if not folder:
            raise ValueError(f"this experiment needs {flag}, a train_prior.py run folder (prior.json, dit/)")
        return self.cached(("prior", str(folder)), lambda: load_prior(folder, ae=self.ae_dir, device=self.device,
                                                                       dtype=self.dtype))

    def scorer(self):
        from train_scorer import Scorer
        if not self.args.scorer:
            raise ValueError("this experiment scores text and needs --scorer: train one with "
                             "`python train_scorer.py --data DATA --out runs/scorer` (or pass a Qwen3 causal LM)")
        return self.cached("scorer", lambda: Scorer.load(self.args.scorer, device=self.device, dtype=self.dtype))

    def training_programs(self):
        """Normalised train-split programs, for the exact-duplicate rate."""
        def build():
            from data import load_split
            split = load_split(self.data_dir, "train")
            texts = decode_programs(self.tokenizer, np.asarray(split["ids"]), self.eos_id, self.bos_id)
            return {M.normalise_program(text) for text in texts}
        return self.cached("train", build)

    # -- held-out programs ----------------------------------------------------------------
    def held_out(self, count, max_tokens=None, skip=0):
        """`count` held-out programs (val, then test) whose BOS..EOS length <= max_tokens, after skipping the
        first `skip` such programs. Returns {"ids" (n, L) long, "enc_ids", "enc_mask", "lengths", "texts"}."""
        from data import load_split
        chosen = {"ids": [], "enc_ids": [], "enc_len": [], "lengths": []}
        needed = skip + count
        for split_name in SPLITS:
            split = load_split(self.data_dir, split_name)
            fits = np.arange(len(split["lengths"])) if max_tokens is None else \
                np.nonzero(np.asarray(split["lengths"]) <= max_tokens)[0]
            fits = fits[:needed - len(chosen["ids"])]
            shared = split["encoder_ids"] is None
            for row in fits:
                chosen["ids"].append(np.asarray(split["ids"][row], dtype=np.int64))
                chosen["lengths"].append(int(split["lengths"][row]))
                chosen["enc_ids"].append(chosen["ids"][-1] if shared else np.asarray(split["encoder_ids"][row], np.int64))
                chosen["enc_len"].append(chosen["lengths"][-1] if shared else int(split["encoder_lengths"][row]))
            if len(chosen["ids"]) >= needed:
                break
        if len(chosen["ids"]) < needed:
            fit = f" of at most {max_tokens} tokens" if max_tokens else ""
            raise ValueError(f"only {len(chosen['ids'])} held-out programs{fit} in {self.data_dir} (val + test), "
                             f"{needed} needed; lower --num or use longer --lengths")
        ids = torch.from_numpy(np.stack(chosen["ids"][skip:]))
        enc_ids = torch.from_numpy(np.stack(chosen["enc_ids"][skip:]))
        enc_len = torch.tensor(chosen["enc_len"][skip:])
        return {"ids": ids, "enc_ids": enc_ids, "enc_mask": torch.arange(enc_ids.shape[1])[None, :] < enc_len[:, None],
                "lengths": torch.tensor(chosen["lengths"][skip:]),
                "texts": decode_programs(self.tokenizer, ids, self.eos_id, self.bos_id)}


# ------------------------------------------------------------------------------------------------
# Sampling, sharded over ranks, and scoring of a sample set
# ------------------------------------------------------------------------------------------------


def sharded_samples(ctx, num, make_batch, desc, with_stats=False):
    """Run make_batch(indices, generator, prior_generator) -> (tokens (B, L), nfe float | {"nfe", "nfe_flops"})
    over this rank's round-robin share of range(num), decode, gather on rank 0. Returns (texts, mean NFE) on rank
    0, else (None, None); with_stats: (texts, mean NFE, {"nfe_flops", "seconds_per_sample"}) (wall-clock of the
    batches on this machine, the same run for every method)."""
    import time

    from tqdm import tqdm
    env, batch_size = ctx.env, ctx.get("batch_size")
    mine = D.shard_indices(num, env.rank, env.world_size, seed=None)
    records = []
    for first in tqdm(range(0, len(mine), batch_size), desc=desc, leave=False, disable=not env.is_main):
        indices = mine[first:first + batch_size]
        seed = batch_seed(ctx.args.seed, int(indices[0]))
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        prior_generator = torch.Generator().manual_seed(seed + 1)
        started = time.perf_counter()
        tokens, nfe = make_batch(indices, generator, prior_generator)
        seconds = (time.perf_counter() - started) / len(indices)
        calls = nfe.get("demasker_calls", nfe["nfe"]) if isinstance(nfe, dict) else nfe
        nfe, nfe_flops = (nfe["nfe"], nfe.get("nfe_flops", nfe["nfe"])) if isinstance(nfe, dict) else (nfe, nfe)
        texts = decode_programs(ctx.tokenizer, tokens, ctx.eos_id, ctx.bos_id)
        records += [(int(i), text, float(nfe), float(nfe_flops), seconds, float(calls))
                    for i, text in zip(indices, texts)]
    gathered = D.gather_objects(records, env)
    if gathered is None:
        return (None, None, None) if with_stats else (None, None)
    gathered.sort()
    texts, nfe = [r[1] for r in gathered], float(np.mean([r[2] for r in gathered]))
    if not with_stats:
        return texts, nfe
    return texts, nfe, {"nfe_flops": float(np.mean([r[3] for r in gathered])),
                        "seconds_per_sample": float(np.mean([r[4] for r in gathered])),
                        "demasker_calls": float(np.mean([r[5] for r in gathered]))}


def mauve_summary(ctx, features, reference_features):
    """MAUVE over --mauve-seeds k-means seeds: mean, sd and the per-seed values."""
    values = [M.mauve(features, reference_features, seed=ctx.args.seed + 25 + s)["mauve"]
              for s in range(ctx.get("mauve_seeds"))]
    return {"mauve": float(np.mean(values)), "mauve_sd": float(np.std(values)), "mauve_seeds": values}


def score_texts(ctx, texts, reference_features=None, references=None):
    """Gen-PPL (+ entropy), parse rate, duplicate rate, empty rate, MAUVE vs reference_features, and the
    mean CER / feature cosine against `references` (autoencoding) when given."""
    scorer = ctx.scorer()
    result = M.generative_perplexity(scorer, texts, ctx.get("batch_size"))
    result.update(parse_rate=M.parse_rate(texts), duplicate_rate=M.duplicate_rate(texts, ctx.training_programs()),
                  empty_rate=float(np.mean([not t.strip() for t in texts])),
                  mean_chars=float(np.mean([len(t) for t in texts])))
    if reference_features is not None or references is not None:
        features = scorer.features(texts, ctx.get("batch_size"), pool=ctx.args.features)
        if reference_features is not None:
            result.update(mauve_summary(ctx, features, reference_features))
        if references is not None:
            source_features = scorer.features(references, ctx.get("batch_size"), pool=ctx.args.features)
            result["cer"] = float(np.mean([M.cer(r, t) for r, t in zip(references, texts)]))
            result["semantic_similarity"] = float(M.feature_cosine(features, source_features).mean())
    return result


def real_reference(ctx, length, count):
    """Held-out programs that fit in `length` tokens: a reference set (MAUVE's q side) and a second, disjoint
    set scored like a method (the real-data ceiling). Returns (reference features, ceiling metrics)."""
    key = ("reference", length, count)

    def build():
        scorer = ctx.scorer()
        reference = ctx.held_out(count, length)["texts"]
        features = scorer.features(reference, ctx.get("batch_size"), pool=ctx.args.features)
        try:
            other = ctx.held_out(count, length, skip=count)["texts"]
            ceiling = score_texts(ctx, other, features)
        except ValueError as error:  # too few held-out programs for a second set
            ceiling = {"note": str(error), **score_texts(ctx, reference)}
        return features, ceiling
    return ctx.cached(key, build)


def nfe_grid(ctx, length, key="nfe_min"):
    """--nfe, else powers of two from the preset's `key` (nfe_min; table_nfe_min for Tables 1/2) up to the length."""
    if ctx.args.nfe:
        return sorted({n for n in ctx.args.nfe if 1 <= n <= length})
    grid, n = [], ctx.get(key)
    while n < length:
        grid.append(n)
        n *= 2
    return grid + [length]


def temperature(ctx, default):
    return default if ctx.args.temperature is None else ctx.args.temperature


