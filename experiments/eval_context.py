"""eval.py's shared machinery: the presets, the Context that loads runs, data, priors and the scorer, and
sampling sharded over ranks with scoring of a sample set (Sec. 5's protocol: Gen-PPL pooled over tokens next
to the unigram entropy and held-out real programs of matched length; MAUVE on the scorer's features).

Statistics (ours; docs/results.md, "How to read the numbers"): every scored sample set carries seeded
percentile-bootstrap 95% intervals over its samples (--bootstrap N replicates, 0 = off): Gen-PPL (pooled over each resample's tokens), MAUVE (each replicate
resamples the method's samples with replacement and runs k-means with a new seed and --bootstrap-restarts
restarts; the reference set is fixed, being shared by every row), the parse and empty rates and the CER. The
replicate values are kept in the row (`*_replicates`) so speedups can be bootstrapped over the replicate index.
Empty samples add no token to Gen-PPL (metrics.score_without_empty) and are counted in `empty_rate`.

The experiments (experiments/eval_autoencoder.py: Fig. 4, 7, 8, Tables 1-2; experiments/eval_generation.py: Fig. 6, 11, 9, PRDC, the
marginal trap) build on this file; eval.py is the command line.
"""

from pathlib import Path

import numpy as np
import torch

from infra import distributed as D
from evaluation import metrics as M
from infra.atomic import read_json
from sample import batch_seed, decode_programs

PRESETS = {
    # num: samples (or programs) per point; lengths: the two generation lengths (Fig. 6, Tables 1/2)
    # table_*: Tables 1/2 (paper: L = 256 and 512, block sizes including 32, NFE down to 4); fig4_num: Fig. 4;
    # fig8_*: Fig. 8's program length (None: the data's L) and number of interpolated pairs
    # gen_num: samples per generation point (fig6, fig11, speed); bootstrap: replicates of every interval;
    # timing_repeats: repeats of speed's timing pass (experiments/eval_timing.py)
    "tiny": dict(table_lengths=(64, 128), table_nfe_min=8, table_blocks=(), fig4_num=48, fig8_length=None,
                 fig8_pairs=48, num=48, gen_num=256, bootstrap=200, batch_size=16, lengths=(64, 128), nfe_min=1,
                 prior_steps=32, refresh_prior_steps=16, mauve_seeds=1, trap_steps=400, trap_samples=256,
                 trap_trials=5000, psnr_points=11, timing_repeats=5),
    "small": dict(table_lengths=(128, 256), table_nfe_min=8, table_blocks=(), fig4_num=400, fig8_length=None, fig8_pairs=400,
                  num=400, gen_num=400, bootstrap=200, batch_size=32, lengths=(128, 256), nfe_min=1, prior_steps=64,
                  refresh_prior_steps=32, mauve_seeds=3, trap_steps=1500, trap_samples=1024, trap_trials=20000,
                  psnr_points=21, timing_repeats=5),
    "paper": dict(table_lengths=(256, 512), table_nfe_min=4, table_blocks=(32,), fig4_num=1000, fig8_length=256,
                  fig8_pairs=1000, num=5000, gen_num=5000, bootstrap=100, batch_size=64, lengths=(512, 1024),
                  nfe_min=16, prior_steps=128, refresh_prior_steps=32, mauve_seeds=5, trap_steps=3000,
                  trap_samples=4096, trap_trials=50000, psnr_points=21, timing_repeats=5),
}
MASK_RATIOS = [round(0.1 * i, 1) for i in range(1, 11)]   # Fig. 4's x axis
SIGMAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]       # Fig. 7 (0.75 = the CS 0.8 training noise)
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0]                        # Fig. 8
REFRESH_FRACTIONS = [0.0, 0.25, 0.5, 0.75]                  # Fig. 11 (bottom)
SPLITS = ("val", "test")                                     # held-out programs come from these, in order


# ------------------------------------------------------------------------------------------------
# Loading: runs, data, priors, scorer
# ------------------------------------------------------------------------------------------------


def _plain(models):
    """(demasker, ...) unchanged, after refusing a CADD demasker (its [M] positions expect latents: eval.py cadd)."""
    from extensions.cadd import check_cadd
    check_cadd(models[0], wanted=False)
    return models


def resolve_run(folder):
    """A train_ae.py output folder: OUT/checkpoint (if present) or the folder itself."""
    folder = Path(folder)
    return folder / "checkpoint" if (folder / "checkpoint" / "demasker").is_dir() else folder


def recorded_data_dir(run):
    """The data folder recorded in a run's args.json ("data"), or None."""
    for candidate in (Path(run) / "args.json", Path(run).parent / "args.json"):
        if candidate.is_file():
            return read_json(candidate, "pass --data the dataprep/data.py cache the run was trained on").get("data")
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
                             "<the dataprep/data.py cache the models were trained on>")
        from dataprep.data import check_tokenizer_matches, load_meta, load_tokenizer
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
        from dataprep.data import load_split
        return self.cached("data_length", lambda: int(load_split(self.data_dir, "val")["ids"].shape[1]))

    def get(self, name):
        """args.NAME unless None, else the preset's value."""
        value = getattr(self.args, name, None)
        return self.preset[name] if value is None else value

    @property
    def gen_num(self):
        """Samples per generation point (fig6, fig11, speed): --num, else the preset's gen_num."""
        return self.args.num or self.preset["gen_num"]

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
        return self.cached(("ae", str(folder)), lambda: _plain(load_run(str(folder), True, self.device, self.dtype)[:2]))

    def base(self, folder=None):
        """The base MDM of --base (or of `folder`, e.g. --base-equal's equal-budget base)."""
        from sample import load_run
        if not (folder or self.args.base):
            raise ValueError("this experiment needs --base, a train_ae.py --no-registers run (the base MDM)")
        folder = resolve_run(folder or self.args.base)
        return self.cached(("base", str(folder)), lambda: _plain(load_run(str(folder), False, self.device, self.dtype))[0])

    def prior(self, folder, flag="--prior"):
        from generators import load_prior
        if not folder:
            raise ValueError(f"this experiment needs {flag}, a train_prior.py run folder (prior.json, dit/)")
        return self.cached(("prior", str(folder)), lambda: load_prior(folder, ae=self.ae_dir, device=self.device,
                                                                       dtype=self.dtype))

    def scorer(self):
        from experiments.train_scorer import Scorer
        if not self.args.scorer:
            raise ValueError("this experiment scores text and needs --scorer: train one with "
                             "`python -m experiments.train_scorer --data DATA --out runs/scorer` (or pass a Qwen3 causal LM)")
        return self.cached("scorer", lambda: Scorer.load(self.args.scorer, device=self.device, dtype=self.dtype))

    def training_programs(self):
        """Normalised train-split programs, for the exact-duplicate rate."""
        def build():
            from dataprep.data import load_split
            split = load_split(self.data_dir, "train")
            texts = decode_programs(self.tokenizer, np.asarray(split["ids"]), self.eos_id, self.bos_id)
            return {M.normalise_program(text) for text in texts}
        return self.cached("train", build)

    # -- held-out programs ----------------------------------------------------------------
    def held_out_count(self, max_tokens=None):
        """How many held-out programs (val + test) have a BOS..EOS length <= max_tokens."""
        from dataprep.data import load_split
        total = 0
        for split_name in SPLITS:
            lengths = np.asarray(load_split(self.data_dir, split_name)["lengths"])
            total += len(lengths) if max_tokens is None else int((lengths <= max_tokens).sum())
        return total

    def held_out(self, count, max_tokens=None, skip=0):
        """`count` held-out programs (val, then test) whose BOS..EOS length <= max_tokens, after skipping the
        first `skip` such programs. Returns {"ids" (n, L) long, "enc_ids", "enc_mask", "lengths", "texts"}."""
        from dataprep.data import load_split
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
    batches on this machine, the device synchronised; speed times its rows again apart: eval_timing.py)."""
    from tqdm import tqdm

    from evaluation.nfe import clock
    env, batch_size = ctx.env, ctx.get("batch_size")
    mine = D.shard_indices(num, env.rank, env.world_size, seed=None)
    records = []
    for first in tqdm(range(0, len(mine), batch_size), desc=desc, leave=False, disable=not env.is_main):
        indices = mine[first:first + batch_size]
        seed = batch_seed(ctx.args.seed, int(indices[0]))
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        prior_generator = torch.Generator().manual_seed(seed + 1)
        started = clock(ctx.device)
        tokens, nfe = make_batch(indices, generator, prior_generator)
        seconds = (clock(ctx.device) - started) / len(indices)
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


def mauve_summary(ctx, features, reference_features, indices=None):
    """MAUVE over --mauve-seeds k-means seeds: mean, sd and the per-seed values; with bootstrap `indices`
    (B, n) also the replicate values (metrics.bootstrap_mauve) and their 95% interval `mauve_ci`."""
    values = [M.mauve(features, reference_features, seed=ctx.args.seed + 25 + s)["mauve"]
              for s in range(ctx.get("mauve_seeds"))]
    out = {"mauve": float(np.mean(values)), "mauve_sd": float(np.std(values)), "mauve_seeds": values}
    if indices is not None:
        replicates = M.bootstrap_mauve(features, reference_features, indices, seed=ctx.args.seed + 1000,
                                       restarts=ctx.args.bootstrap_restarts)
        out.update(mauve_ci=M.percentile_interval(replicates), mauve_replicates=json_values(replicates))
    return out


def json_values(values):
    """Floats for a JSON record, nan/inf as None (null)."""
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def interval_of(values, indices):
    """The bootstrap 95% interval of the mean of per-sample `values` (None without indices)."""
    return None if indices is None else M.percentile_interval(M.bootstrap_mean(values, indices))


def score_texts(ctx, texts, reference_features=None, references=None):
    """Gen-PPL (+ entropy), parse rate, duplicate rate, empty rate, MAUVE vs reference_features, and the
    mean CER / feature cosine against `references` (autoencoding) when given; with --bootstrap N > 0 the
    95% intervals `gen_ppl_ci`, `mauve_ci`, `parse_rate_ci`, `empty_rate_ci`, `cer_ci` from one set of
    resamples, and the replicate values of Gen-PPL and MAUVE."""
    import time
    scorer, batch_size = ctx.scorer(), ctx.get("batch_size")
    result, (nll_sums, counts) = M.generative_perplexity(scorer, texts, batch_size, return_scores=True)
    parsed = np.array([M.parses(t) for t in texts], dtype=np.float64)
    empty = np.array([M.is_empty(t) for t in texts], dtype=np.float64)
    result.update(parse_rate=float(parsed.mean()), duplicate_rate=M.duplicate_rate(texts, ctx.training_programs()),
                  empty_rate=float(empty.mean()), mean_chars=float(np.mean([len(t) for t in texts])))
    replicates = ctx.get("bootstrap")
    indices = M.bootstrap_indices(len(texts), replicates, ctx.args.seed + 7) if replicates else None
    started = time.perf_counter()
    if indices is not None:
        ppl = M.bootstrap_gen_ppl(nll_sums, counts, indices)
        result.update(bootstrap=replicates, gen_ppl_ci=M.percentile_interval(ppl), gen_ppl_replicates=json_values(ppl),
                      parse_rate_ci=interval_of(parsed, indices), empty_rate_ci=interval_of(empty, indices))
    if reference_features is not None:
        features = scorer.features(texts, batch_size, pool=ctx.args.features)
        result.update(mauve_summary(ctx, features, reference_features, indices))
    if references is not None:  # the semantic similarity keeps mean-pooled features (Tables 1-2's stand-in)
        features = scorer.features(texts, batch_size, pool="mean")
        source_features = scorer.features(references, batch_size, pool="mean")
        cers = np.array([M.cer(r, t) for r, t in zip(references, texts)])
        result.update(cer=float(cers.mean()), cer_ci=interval_of(cers, indices),
                      semantic_similarity=float(M.feature_cosine(features, source_features).mean()))
    if indices is not None:
        result["bootstrap_seconds"] = time.perf_counter() - started  # featurising included
    return result


def real_reference(ctx, length, count):
    """Held-out programs that fit in `length` tokens: a reference set (MAUVE's q side) and a second, disjoint
    set scored like a method (the real-data ceiling, with its intervals). Returns (reference features, ceiling
    metrics). With fewer than 2 x count such programs the available ones are split in two halves (reference,
    ceiling) and the ceiling says so in its "note"; with fewer than 4, the ceiling is the reference scored
    without MAUVE."""
    key = ("reference", length, count)

    def build():
        scorer = ctx.scorer()
        available = ctx.held_out_count(length)
        first, second = (count, count) if available >= 2 * count else (available - available // 2, available // 2)
        if first < 2:
            raise ValueError(f"only {available} held-out programs of at most {length} tokens in {ctx.data_dir}: "
                             f"MAUVE needs a reference of 2 or more; use a longer length or more held-out data "
                             f"(dataprep/data.py --val-fraction/--test-fraction)")
        reference = ctx.held_out(first, length)["texts"]
        features = scorer.features(reference, ctx.get("batch_size"), pool=ctx.args.features)
        note = None if first == count else (f"only {available} held-out programs of <= {length} tokens: reference "
                                            f"{first}, real-vs-real set {second} (not {count} each)")
        if second >= 2:
            ceiling = score_texts(ctx, ctx.held_out(second, length, skip=first)["texts"], features)
        else:
            ceiling = score_texts(ctx, reference)
            note = f"only {available} held-out programs of <= {length} tokens: no second set, no real-vs-real MAUVE"
        if note:
            print(f"real_reference: {note}")
        ceiling.update(reference_size=first, num_programs=second if second >= 2 else first,
                       **({"note": note} if note else {}))
        return features, ceiling
    return ctx.cached(key, build)


def nfe_grid(ctx, length, key="nfe_min", kind="powers"):
    """--nfe, else from the preset's `key` (nfe_min; table_nfe_min for Tables 1/2) up to the length: powers of
    two (1, 2, 4, 8, ...), or with kind "fine" (--nfe-grid fine; speed's default) also the 3 x 2^k between them
    (1, 2, 3, 4, 6, 8, 12, 16, 24, ...): every step count is allowed by a one-block schedule, and a finer grid
    lets evaluation/match.py read a speedup between grid points rather than at them."""
    if ctx.args.nfe:
        return sorted({n for n in ctx.args.nfe if 1 <= n <= length})
    kind = getattr(ctx.args, "nfe_grid", None) or kind
    start, grid, n = ctx.get(key), set(), 1
    while n < length:
        grid.update([n] + ([n + n // 2] if kind == "fine" and n >= 2 else []))
        n *= 2
    return sorted(v for v in grid if start <= v < length) + [length]


def register_keep(ctx, length):
    """How many registers the demasker reads at this length (generators' keep): --keep's L=K for this length,
    else its bare K, else None: every register the prior models (sample.py's default). A prior over all of an
    encoder's registers (train_prior.py --num-registers all) is evaluated at the paper's K with --keep 512=8
    1024=16, or --keep 8 for every length."""
    named = dict(getattr(ctx.args, "keep", None) or [])
    return named.get(length, named.get(None))


def temperature(ctx, default):
    return default if ctx.args.temperature is None else ctx.args.temperature


def sampler_decoding(ctx, **fields):
    """The mdm.Decoding every evaluated sampler runs with (base, guided, CADD alike), so that their seconds per
    sample compare: --rng (default fast: the tokens drawn at the masked candidates only, the distribution of
    LLaDA's full float64 Gumbel noise, tested in test_mdm; llada: that noise, for token parity) and `fields`."""
    from mdm import Decoding
    return Decoding(rng=ctx.args.rng, **fields)


