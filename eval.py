"""Every quantitative claim of the paper's Sec. 5 and App. D-G, for any checkpoints, as one command each.

Paper map (arXiv 2603.20210) -> subcommand -> what it measures (metrics.py holds the metric definitions):
  Fig. 4      fig4            masked-token CE and top-1 vs mask ratio: base MDM vs guided with k registers
  Table 1/2   table1, table2  MDM autoencoder (Alg. 6) at two lengths, sweeping block size x NFE: Gen-PPL,
                              CER, a semantic similarity (cosine of the scorer's mean-pooled features of
                              reconstruction and source; our stand-in for CodeBERTScore) and the parse rate
  Fig. 7      fig7            latent-noise robustness: N(0, sigma^2) added to the registers, top-1 / CE at 90%
                              masking, for AEs trained with (--ae) and without (--ae-no-noise) latent noise
  Fig. 8      fig8            register interpolation z = renorm((1-a) z_A + a z_B), a in {0,.25,.5,.75,1}:
                              MAUVE and Gen-PPL of the decoded programs per a
  Fig. 6/12   fig6            THE HEADLINE: MAUVE and Gen-PPL vs NFE for the base MDM, ConThenDisc and
                              ConWithinDisc at two lengths, whole sequence one block, same seeds, and the
                              speedup = NFE_base(L) / the smallest NFE at which a guided method matches the
                              base MDM's quality at NFE = L (MAUVE >=, Gen-PPL <=, and both)
  Fig. 9      fig9            PSNR(g(z_t, t), z_0) vs t, unconditional vs conditional prior (r = 0.5)
  App. E      prdc            PRDC (k = 5) per register index, averaged, for both priors' samples
  Fig. 11     fig11           ablations: number of registers K (one prior per K), refresh fraction
                              {0, .25, .5, .75}, block offsets on/off (a second prior trained without)
  App. B      marginal-trap   fraction of valid samples vs tokens revealed per step on a synthetic corpus
                              with pairs that must co-occur, base vs guided (marginal_trap.py; Theorem B.1)

Every subcommand writes OUT/NAME.json (settings, checkpoints, command, results), appends a section to
OUT/REPORT.md and, when matplotlib is importable, draws OUT/NAME.png. Generated texts are scored with the
reference scorer (--scorer, train_scorer.py): Gen-PPL pooled over tokens (MDLM), always next to the unigram
entropy and the same numbers for held-out real programs of matched length; MAUVE features are its mean-
pooled final hidden states. Real references are held-out programs (val, then test split) whose BOS..EOS
length fits the generated length. The parse rate (ast.parse) and the exact-duplicate rate against the
training split are ours, not the paper's.

Sampling is sharded over ranks under torchrun (distributed.py: round-robin sample indices, gathered on
rank 0, which scores and writes). Batch b of every method uses the same seeds, so methods see the same
random streams. Presets set sample counts and sweeps: tiny (minutes on CPU), small (~an hour), paper.

    python eval.py fig6 --ae runs/ae --base runs/base --prior runs/prior --cond-prior runs/cprior \\
                        --scorer runs/scorer --preset tiny
    torchrun --nproc_per_node 8 eval.py fig6 ... --preset paper
"""

import argparse
import dataclasses
import datetime
import math
import sys
from pathlib import Path

import numpy as np
import torch

import distributed as D
import metrics as M
from atomic import read_json
from report import git_commit, md_table, panel, write_experiment
from sample import autoencode, batch_seed, check_schedule, decode_programs, generate

PRESETS = {
    # num: samples (or programs) per point; lengths: the two generation lengths (Fig. 6, Tables 1/2)
    "tiny": dict(num=48, batch_size=16, lengths=(64, 128), nfe_min=8, prior_steps=32, refresh_prior_steps=16,
                 mauve_seeds=1, trap_steps=400, trap_samples=256, trap_trials=5000, psnr_points=11),
    "small": dict(num=400, batch_size=32, lengths=(128, 256), nfe_min=8, prior_steps=64, refresh_prior_steps=32,
                  mauve_seeds=3, trap_steps=1500, trap_samples=1024, trap_trials=20000, psnr_points=21),
    "paper": dict(num=5000, batch_size=64, lengths=(512, 1024), nfe_min=16, prior_steps=128,
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

    def __init__(self, args):
        self.args = args
        self.env = D.setup(device=args.device)
        self.device = self.env.device
        self.dtype = getattr(torch, args.dtype) if args.dtype else None
        self.preset = PRESETS[args.preset]
        self.ae_dir = resolve_run(args.ae) if args.ae else None
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


def sharded_samples(ctx, num, make_batch, desc):
    """Run make_batch(indices, generator, prior_generator) -> (tokens (B, L), nfe float) over this rank's
    round-robin share of range(num), decode, gather on rank 0. Returns (texts, mean NFE) on rank 0, else
    (None, None)."""
    from tqdm import tqdm
    env, batch_size = ctx.env, ctx.get("batch_size")
    mine = D.shard_indices(num, env.rank, env.world_size, seed=None)
    records = []
    for first in tqdm(range(0, len(mine), batch_size), desc=desc, leave=False, disable=not env.is_main):
        indices = mine[first:first + batch_size]
        seed = batch_seed(ctx.args.seed, int(indices[0]))
        generator = torch.Generator(device=ctx.device).manual_seed(seed)
        prior_generator = torch.Generator().manual_seed(seed + 1)
        tokens, nfe = make_batch(indices, generator, prior_generator)
        texts = decode_programs(ctx.tokenizer, tokens, ctx.eos_id, ctx.bos_id)
        records += [(int(i), text, float(nfe)) for i, text in zip(indices, texts)]
    gathered = D.gather_objects(records, env)
    if gathered is None:
        return None, None
    gathered.sort()
    return [text for _, text, _ in gathered], float(np.mean([nfe for _, _, nfe in gathered]))


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


def nfe_grid(ctx, length):
    """--nfe, else powers of two from the preset's nfe_min up to the length (whole sequence one block)."""
    if ctx.args.nfe:
        return sorted({n for n in ctx.args.nfe if 1 <= n <= length})
    grid, n = [], ctx.get("nfe_min")
    while n < length:
        grid.append(n)
        n *= 2
    return grid + [length]


def temperature(ctx, default):
    return default if ctx.args.temperature is None else ctx.args.temperature


# ------------------------------------------------------------------------------------------------
# Masked-token prediction (Fig. 4, Fig. 7)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def masked_token_curves(ctx, programs, models, ratios, noise_std=0.0):
    """{name: {"ce": [...], "top1": [...]}} over `ratios` for models = {name: (demasker, encoder|None, keep)}.

    Program i draws one uniform vector from a generator seeded by (seed, i) and is masked where u < ratio,
    so masks are nested across ratios and identical for every model. Scored: masked positions of the
    program (BOS .. first EOS). noise_std: N(0, sigma^2) added to every register entry (Fig. 7), the same
    draw for every model. Programs are dealt to ranks; sums are all-reduced."""
    env, batch_size = ctx.env, ctx.get("batch_size")
    n = programs["ids"].shape[0]
    mine = D.shard_indices(n, env.rank, env.world_size, seed=None)
    sums = {}
    for first in range(0, len(mine), batch_size):
        rows = mine[first:first + batch_size]
        x0 = programs["ids"][rows].to(ctx.device)
        L = x0.shape[1]
        program = torch.arange(L, device=ctx.device)[None, :] < programs["lengths"][rows].to(ctx.device)[:, None]
        draws = [torch.Generator().manual_seed(batch_seed(ctx.args.seed, int(i))) for i in rows]
        u = torch.stack([torch.rand(L, generator=g) for g in draws]).to(ctx.device)  # (B, L)
        for name, (demasker, encoder, keep) in models.items():
            registers = None
            if encoder is not None:
                registers = encoder(programs["enc_ids"][rows].to(ctx.device),
                                    attention_mask=programs["enc_mask"][rows].to(ctx.device))[:, :keep]
                if noise_std > 0:
                    noise = torch.stack([torch.randn(registers.shape[1:], generator=torch.Generator().manual_seed(
                        batch_seed(ctx.args.seed + 1, int(i)))) for i in rows])
                    registers = registers + noise_std * noise.to(registers.device, registers.dtype)
            for ratio in ratios:
                masked = u < ratio
                x_t = x0.masked_fill(masked, demasker.cfg.mask_token_id)
                ce, correct, count = M.masked_prediction_stats(demasker(x_t, registers=registers), x0,
                                                               masked & program)
                for key, value in (("ce", ce), ("correct", correct), ("count", count)):
                    sums[f"{name}|{ratio}|{key}"] = sums.get(f"{name}|{ratio}|{key}", 0.0) + value
    sums = D.all_reduce_sum(sums, env)
    curves = {}
    for name in models:
        counts = [max(sums.get(f"{name}|{r}|count", 0.0), 1.0) for r in ratios]
        curves[name] = {"ce": [sums.get(f"{name}|{r}|ce", 0.0) / c for r, c in zip(ratios, counts)],
                        "top1": [sums.get(f"{name}|{r}|correct", 0.0) / c for r, c in zip(ratios, counts)],
                        "scored_tokens": [int(c) for c in counts]}
    return curves


def register_counts(ctx, encoder):
    """--registers, else 1, 2, 4, ... up to the encoder's K (Fig. 4: K = 8, 64, 128 of 128)."""
    K = encoder.cfg.num_registers
    if ctx.args.registers:
        bad = [k for k in ctx.args.registers if not 1 <= k <= K]
        if bad:
            raise ValueError(f"--registers {bad} outside [1, {K}] (the encoder's K)")
        return sorted(set(ctx.args.registers))
    counts, k = [], 1
    while k < K:
        counts.append(k)
        k *= 2
    return counts + [K]


def run_fig4(ctx):
    programs = ctx.held_out(ctx.get("num"))
    demasker, encoder = ctx.ae()
    models = {f"guided_k{k}": (demasker, encoder, k) for k in register_counts(ctx, encoder)}
    if ctx.args.base:
        models = {"base": (ctx.base(), None, None), **models}
    curves = masked_token_curves(ctx, programs, models, MASK_RATIOS)
    result = {"mask_ratios": MASK_RATIOS, "models": curves, "num_programs": programs["ids"].shape[0]}
    rows = [[name] + [f"{c:.3f} / {a:.3f}" for c, a in zip(v["ce"], v["top1"])] for name, v in curves.items()]
    table = md_table(["model"] + [f"r={r}" for r in MASK_RATIOS], rows)
    panels = [panel("Fig. 4: masked-token CE", "mask ratio", "cross-entropy (nats)",
                    {n: (MASK_RATIOS, v["ce"]) for n, v in curves.items()}),
              panel("Fig. 4: top-1 accuracy", "mask ratio", "top-1",
                    {n: (MASK_RATIOS, v["top1"]) for n, v in curves.items()})]
    return result, "CE / top-1 of masked program tokens per mask ratio.\n\n" + table, panels


def run_fig7(ctx):
    if not ctx.args.ae_no_noise:
        raise ValueError("fig7 compares two AEs: --ae (trained with latent noise) and --ae-no-noise (trained with "
                         "--latent-cos 1)")
    programs = ctx.held_out(ctx.get("num"))
    ratio = ctx.args.fig7_ratio
    models = {"latent_noise": (*ctx.ae(), None), "no_latent_noise": (*ctx.ae(ctx.args.ae_no_noise), None)}
    sigmas = ctx.args.sigmas or SIGMAS
    series = {name: {"ce": [], "top1": []} for name in models}
    for sigma in sigmas:
        curves = masked_token_curves(ctx, programs, models, [ratio], noise_std=sigma)
        for name in models:
            series[name]["ce"].append(curves[name]["ce"][0])
            series[name]["top1"].append(curves[name]["top1"][0])
    result = {"mask_ratio": ratio, "sigmas": sigmas, "expected_cos": [1 / math.sqrt(1 + s * s) for s in sigmas],
              "models": series, "num_programs": programs["ids"].shape[0]}
    if ctx.args.base:
        result["base"] = masked_token_curves(ctx, programs, {"base": (ctx.base(), None, None)}, [ratio])["base"]
    rows = [[f"{s:g}", f"{1 / math.sqrt(1 + s * s):.2f}"]
            + [f"{series[n]['top1'][i]:.3f} / {series[n]['ce'][i]:.3f}" for n in models] for i, s in enumerate(sigmas)]
    table = md_table(["sigma", "E[cos]", "with noise: top-1 / CE", "without: top-1 / CE"], rows)
    panels = [panel("Fig. 7: top-1 at 90% masking", "sigma", "top-1", {n: (sigmas, v["top1"]) for n, v in series.items()}),
              panel("Fig. 7: CE at 90% masking", "sigma", "CE", {n: (sigmas, v["ce"]) for n, v in series.items()})]
    return result, f"Registers + N(0, sigma^2) per entry, mask ratio {ratio}.\n\n" + table, panels


# ------------------------------------------------------------------------------------------------
# The autoencoder sweeps (Tables 1-2) and interpolation (Fig. 8)
# ------------------------------------------------------------------------------------------------


def block_grid(ctx, length):
    if ctx.args.blocks:
        return sorted({b for b in ctx.args.blocks if 1 <= b <= length and length % b == 0})
    return sorted({b for b in (length // 8, length // 4, length // 2, length) if b >= 1})


def run_table(ctx, index):
    length = ctx.args.length or ctx.get("lengths")[index]
    programs = ctx.held_out(ctx.get("num"), length)
    sources = programs["texts"]
    demasker, encoder = ctx.ae()
    temp = temperature(ctx, 0.0)
    rows = []
    for block in block_grid(ctx, length):
        for nfe in nfe_grid(ctx, length):
            try:
                check_schedule(length, block, nfe)
            except ValueError:
                continue  # e.g. fewer steps than blocks: not a valid LLaDA schedule

            def make_batch(indices, generator, _):
                tokens, calls = autoencode(encoder, demasker, programs["enc_ids"][indices].to(ctx.device),
                                           programs["enc_mask"][indices].to(ctx.device), length, block, nfe, temp,
                                           ctx.args.remasking, generator=generator)
                return tokens, calls
            texts, _ = sharded_samples(ctx, len(sources), make_batch, f"autoencode L={length} block={block} nfe={nfe}")
            if texts is not None:
                rows.append({"block": block, "nfe": nfe, **score_texts(ctx, texts, references=sources),
                             "examples": [{"source": s, "reconstruction": t} for s, t in list(zip(sources, texts))[:2]]})
    if not ctx.env.is_main:
        return None, None, None
    reference = score_texts(ctx, sources)
    result = {"length": length, "temperature": temp, "num_programs": len(sources), "rows": rows,
              "sources": reference}
    table = md_table(["block", "NFE", "Gen-PPL", "semantic sim.", "CER", "parse", "entropy"],
                     [[r["block"], r["nfe"], f"{r['gen_ppl']:.2f}", f"{r['semantic_similarity']:.3f}",
                       f"{r['cer']:.3f}", f"{r['parse_rate']:.2f}", f"{r['unigram_entropy']:.2f}"] for r in rows])
    note = (f"Autoencoder (Alg. 6) at L={length}, {len(sources)} held-out programs, temperature {temp}. Sources: "
            f"Gen-PPL {reference['gen_ppl']:.2f}, parse rate {reference['parse_rate']:.2f}. Semantic similarity = "
            f"cosine of the scorer's mean-pooled features (our stand-in for CodeBERTScore).\n\n")
    panels = [panel(f"Table {index + 1}: CER vs NFE (L={length})", "NFE", "CER",
                    {f"block {b}": ([r["nfe"] for r in rows if r["block"] == b], [r["cer"] for r in rows if r["block"] == b])
                     for b in sorted({r["block"] for r in rows})}, logx=True)]
    return result, note + table, panels


def run_fig8(ctx):
    length = ctx.args.length or ctx.data_length  # 3 x num held-out programs must fit
    num = ctx.get("num")
    a, b = ctx.held_out(num, length), ctx.held_out(num, length, skip=num)
    reference_features, ceiling = real_reference(ctx, length, num)
    demasker, encoder = ctx.ae()
    steps = ctx.args.steps or length
    temp = temperature(ctx, 0.0)
    d = encoder.cfg.hidden_size
    with torch.no_grad():
        z_a = encoder(a["enc_ids"].to(ctx.device), attention_mask=a["enc_mask"].to(ctx.device)).float()
        z_b = encoder(b["enc_ids"].to(ctx.device), attention_mask=b["enc_mask"].to(ctx.device)).float()
    rows = []
    for alpha in ctx.args.alphas or ALPHAS:
        mixed = (1 - alpha) * z_a + alpha * z_b  # (n, K, d), renormalised per register as the encoder does
        mixed = torch.nn.functional.normalize(mixed, dim=-1) * math.sqrt(d)

        def make_batch(indices, generator, _):
            registers = mixed[torch.as_tensor(indices, device=ctx.device)].to(next(demasker.parameters()).dtype)
            return generate(demasker, len(indices), length, length, steps, temp, ctx.args.remasking,
                            registers=registers, generator=generator)
        texts, _ = sharded_samples(ctx, num, make_batch, f"interpolate alpha={alpha}")
        if texts is not None:
            row = {"alpha": alpha, **score_texts(ctx, texts, reference_features)}
            row["cer_to_a"] = float(np.mean([M.cer(s, t) for s, t in zip(a["texts"], texts)]))
            row["cer_to_b"] = float(np.mean([M.cer(s, t) for s, t in zip(b["texts"], texts)]))
            rows.append(row)
    if not ctx.env.is_main:
        return None, None, None
    result = {"length": length, "steps": steps, "temperature": temp, "num_pairs": num, "rows": rows,
              "real": ceiling}
    table = md_table(["alpha", "MAUVE", "Gen-PPL", "entropy", "CER to A", "CER to B", "parse"],
                     [[r["alpha"], f"{r['mauve']:.3f}", f"{r['gen_ppl']:.2f}", f"{r['unigram_entropy']:.2f}",
                       f"{r['cer_to_a']:.3f}", f"{r['cer_to_b']:.3f}", f"{r['parse_rate']:.2f}"] for r in rows])
    note = (f"{num} pairs of held-out programs, L={length}, {steps} steps. Real held-out programs: MAUVE "
            f"{ceiling.get('mauve', float('nan')):.3f}, Gen-PPL {ceiling['gen_ppl']:.2f}.\n\n")
    alphas = [r["alpha"] for r in rows]
    panels = [panel("Fig. 8: MAUVE along the interpolation", "alpha", "MAUVE", {"MAUVE": (alphas, [r["mauve"] for r in rows])}),
              panel("Fig. 8: Gen-PPL", "alpha", "Gen-PPL", {"Gen-PPL": (alphas, [r["gen_ppl"] for r in rows])})]
    return result, note + table, panels


# ------------------------------------------------------------------------------------------------
# Generation: Fig. 6 (headline) and the ablations of Fig. 11
# ------------------------------------------------------------------------------------------------


def method_sampler(ctx, method, length, steps, temp, prior=None, cond_prior=None, refresh_at=(0.5,)):
    """make_batch for sharded_samples: 'base' (plain MDM), 'conthendisc' (Alg. 2), 'conwithindisc' (Alg. 3)."""
    from generators import conthendisc, conwithindisc
    remasking, prior_steps = ctx.args.remasking, ctx.get("prior_steps")
    if method == "base":
        base = ctx.base()
        return lambda idx, g, pg: generate(base, len(idx), length, length, steps, temp, remasking, generator=g)
    demasker, _ = ctx.ae()
    if method == "conthendisc":
        def run(idx, g, pg):
            tokens, report = conthendisc(demasker, prior, len(idx), length, length, steps, temp, remasking,
                                         prior_steps=prior_steps, generator=g, prior_generator=pg)
            return tokens, report["nfe"]
        return run

    def run(idx, g, pg):
        tokens, report = conwithindisc(demasker, cond_prior, len(idx), length, length, steps, temp, remasking,
                                       prior=prior, prior_steps=prior_steps, refresh_at=refresh_at,
                                       refresh_prior_steps=ctx.get("refresh_prior_steps"), generator=g,
                                       prior_generator=pg)
        return tokens, report["nfe"]
    return run


def sweep(ctx, label, length, make_sampler, steps_list, reference_features):
    """Rows {"method", "steps", "nfe", metrics...} of one method over the NFE grid (rank 0; None elsewhere)."""
    rows = []
    for steps in steps_list:
        texts, nfe = sharded_samples(ctx, ctx.get("num"), make_sampler(steps), f"{label} L={length} steps={steps}")
        if texts is not None:
            rows.append({"method": label, "steps": steps, "nfe": nfe, **score_texts(ctx, texts, reference_features),
                         "examples": texts[:2]})
    return rows


def speedups(rows, length):
    """For each guided method: the smallest NFE at which it matches the base MDM at NFE = length (or the
    base's largest NFE if length was not swept): MAUVE >=, Gen-PPL <=, and both. speedup = base NFE / it."""
    base = [r for r in rows if r["method"] == "base"]
    if not base:
        return {}
    reference = max(base, key=lambda r: (r["steps"] == length, r["steps"]))
    tests = {"mauve": lambda r: r["mauve"] >= reference["mauve"],
             "gen_ppl": lambda r: r["gen_ppl"] <= reference["gen_ppl"]}
    tests["both"] = lambda r: tests["mauve"](r) and tests["gen_ppl"](r)
    out = {"base_reference": {k: reference[k] for k in ("steps", "nfe", "mauve", "gen_ppl")}}
    empty = reference.get("empty_rate", 0.0)
    if empty > 0.5:  # e.g. an undertrained MDM whose one-block low-confidence decoding fills all EOS first
        out["base_reference"]["degenerate"] = f"{100 * empty:.0f}% of the base MDM's samples are empty"
    for method in sorted({r["method"] for r in rows} - {"base"}):
        out[method] = {}
        for name, test in tests.items():
            matching = sorted((r for r in rows if r["method"] == method and test(r)), key=lambda r: r["nfe"])
            first = matching[0] if matching else None
            out[method][name] = {"nfe": first["nfe"] if first else None, "steps": first["steps"] if first else None,
                                 "speedup": reference["nfe"] / first["nfe"] if first else None}
    return out


def generation_table(rows):
    return md_table(["method", "steps", "NFE", "MAUVE", "Gen-PPL", "entropy", "parse", "dup"],
                    [[r["method"], r["steps"], f"{r['nfe']:.1f}", f"{r['mauve']:.3f}" + (
                        f" ± {r['mauve_sd']:.3f}" if len(r["mauve_seeds"]) > 1 else ""), f"{r['gen_ppl']:.2f}",
                      f"{r['unigram_entropy']:.2f}", f"{r['parse_rate']:.2f}", f"{r['duplicate_rate']:.2f}"]
                     for r in rows])


def generation_panels(title, rows):
    methods = sorted({r["method"] for r in rows}, key=lambda m: [r["method"] for r in rows].index(m))
    series = lambda key: {m: ([r["nfe"] for r in rows if r["method"] == m], [r[key] for r in rows if r["method"] == m])
                          for m in methods}
    return [panel(f"{title}: MAUVE", "NFE", "MAUVE", series("mauve"), logx=True),
            panel(f"{title}: Gen-PPL", "NFE", "Gen-PPL", series("gen_ppl"), logx=True)]


def run_fig6(ctx):
    prior = ctx.prior(ctx.args.prior)
    cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior") if ctx.args.cond_prior else None
    temp = temperature(ctx, 1.0)
    result, sections, panels = {"temperature": temp, "lengths": {}}, [], []
    for length in ctx.args.lengths or ctx.get("lengths"):
        reference_features, ceiling = real_reference(ctx, length, ctx.get("num"))
        steps_list = nfe_grid(ctx, length)
        methods = [("base", {}), ("conthendisc", {"prior": prior})]
        if cond_prior is not None:
            methods.append(("conwithindisc", {"prior": prior, "cond_prior": cond_prior}))
        rows = []
        for method, kwargs in methods:
            rows += sweep(ctx, method, length, lambda s, m=method, k=kwargs: method_sampler(ctx, m, length, s, temp, **k),
                          steps_list, reference_features)
        if ctx.env.is_main:
            result["lengths"][str(length)] = {"rows": rows, "real": ceiling, "speedup": speedups(rows, length)}
            sections.append(f"### L = {length}\n\nReal held-out programs: MAUVE {ceiling.get('mauve', float('nan')):.3f}, "
                            f"Gen-PPL {ceiling['gen_ppl']:.2f}, entropy {ceiling['unigram_entropy']:.2f}.\n\n"
                            + generation_table(rows) + "\n\n" + speedup_text(result["lengths"][str(length)]["speedup"], length))
            panels += generation_panels(f"Fig. 6 (L={length})", rows)
    if not ctx.env.is_main:
        return None, None, None
    result.update(num_samples=ctx.get("num"), prior_steps=ctx.get("prior_steps"),
                  refresh_prior_steps=ctx.get("refresh_prior_steps"), refresh_at=[0.5])
    return result, "\n\n".join(sections), panels


def speedup_text(info, length):
    if not info:
        return "No base MDM rows: no speedup."
    ref = info["base_reference"]
    lines = [f"Speedup vs the base MDM at NFE {ref['nfe']:.0f} (MAUVE {ref['mauve']:.3f}, Gen-PPL {ref['gen_ppl']:.2f}):"]
    if ref.get("degenerate"):
        lines.append(f"- WARNING: the reference is degenerate ({ref['degenerate']}); a speedup against it means "
                     "nothing. Try --remasking random or a better-trained base MDM.")
    for method, tests in info.items():
        if method == "base_reference":
            continue
        parts = [f"{name}: " + (f"x{t['speedup']:.1f} at NFE {t['nfe']:.1f}" if t["speedup"] else "not matched in the sweep")
                 for name, t in tests.items()]
        lines.append(f"- {method}: " + "; ".join(parts))
    return "\n".join(lines)


def run_fig11(ctx):
    length = ctx.args.length or ctx.get("lengths")[0]
    temp = temperature(ctx, 1.0)
    steps_list = ctx.args.nfe or [s for s in nfe_grid(ctx, length) if s < length][-3:] or [length]
    reference_features, ceiling = real_reference(ctx, length, ctx.get("num"))
    prior = ctx.prior(ctx.args.prior)
    rows = {"registers": [], "refresh": [], "offsets": []}
    for folder in ctx.args.k_priors or [ctx.args.prior]:
        k_prior = ctx.prior(folder, "--k-priors")
        rows["registers"] += sweep(ctx, f"K={k_prior.num_registers}", length,
                                   lambda s, p=k_prior: method_sampler(ctx, "conthendisc", length, s, temp, prior=p),
                                   steps_list, reference_features)
    if ctx.args.cond_prior:
        cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
        for fraction in REFRESH_FRACTIONS:
            rows["refresh"] += sweep(ctx, f"@{fraction:g}", length, lambda s, f=fraction: method_sampler(
                ctx, "conwithindisc", length, s, temp, prior=prior, cond_prior=cond_prior, refresh_at=(f,)),
                steps_list, reference_features)
    offsets = [("offsets on", prior)]
    if prior.block_offsets:
        offsets.append(("trained on, sampled off", dataclasses.replace(prior, block_offsets=False)))
    if ctx.args.prior_no_offsets:
        offsets.append(("trained off", ctx.prior(ctx.args.prior_no_offsets, "--prior-no-offsets")))
    for label, p in offsets:
        rows["offsets"] += sweep(ctx, label, length, lambda s, p=p: method_sampler(ctx, "conthendisc", length, s,
                                                                                   temp, prior=p),
                                 steps_list, reference_features)
    if not ctx.env.is_main:
        return None, None, None
    result = {"length": length, "temperature": temp, "steps": steps_list, "real": ceiling, **rows}
    missing = [flag for flag, given in (("--k-priors", ctx.args.k_priors), ("--cond-prior", ctx.args.cond_prior),
                                        ("--prior-no-offsets", ctx.args.prior_no_offsets)) if not given]
    text = "\n\n".join(f"### {name}\n\n" + generation_table(r) for name, r in rows.items() if r)
    if missing:
        text += "\n\nNot run (flags not given): " + ", ".join(missing)
    panels = [p for name, r in rows.items() if r for p in generation_panels(f"Fig. 11 {name}", r)]
    return result, f"Ablations at L={length} ({ctx.get('num')} samples per point).\n\n" + text, panels


# ------------------------------------------------------------------------------------------------
# The priors: PSNR vs t (Fig. 9) and PRDC (App. E)
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def clean_registers(ctx, programs, num_registers):
    """z_0 = h_phi(x_0), the first num_registers registers (what the priors model), float32 on the device."""
    _, encoder = ctx.ae()
    z = encoder(programs["enc_ids"].to(ctx.device), attention_mask=programs["enc_mask"].to(ctx.device))
    return z[:, :num_registers].float()


@torch.no_grad()
def partial_condition(ctx, cond_prior, programs, ratio, seed):
    """h(x^(r)) for a conditional prior: each encoder position masked with probability r and hidden
    (latent_data.mask_positions + generators.embed_canvas: the view conditional training builds)."""
    from generators import embed_canvas
    from latent_data import mask_positions
    enc_ids = programs["enc_ids"].to(ctx.device)
    u = torch.rand(enc_ids.shape, generator=torch.Generator().manual_seed(seed)).to(ctx.device)
    masked = mask_positions(u, torch.full((enc_ids.shape[0],), ratio, device=ctx.device))
    eos = ctx.eos_id if ctx.meta.get("shared_tokenizer", True) else cond_prior.encoder.cfg.eos_token_id
    return embed_canvas(cond_prior.encoder, enc_ids.masked_fill(masked, -1), -1, eos)


def run_fig9(ctx):
    from schedules import q_sample, register_times
    priors = {"unconditional": ctx.prior(ctx.args.prior)}
    if ctx.args.cond_prior:
        priors["conditional"] = ctx.prior(ctx.args.cond_prior, "--cond-prior")
    programs = ctx.held_out(ctx.get("num"))
    points = ctx.get("psnr_points")
    times = [i / (points - 1) for i in range(points)]
    curves = {}
    for name, prior in priors.items():
        z0 = clean_registers(ctx, programs, prior.num_registers)  # (n, K, d)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(ctx.args.seed)).to(ctx.device)
        cond, cond_mask = (None, None) if not prior.conditional else \
            partial_condition(ctx, prior, programs, ctx.args.cond_ratio, ctx.args.seed + 1)
        dtype = next(prior.dit.parameters()).dtype
        values = []
        for t_value in times:
            t = register_times(torch.full((z0.shape[0],), t_value), prior.num_registers, prior.max_offset,
                               prior.block_offsets).to(ctx.device)
            with torch.no_grad():
                pred = prior.dit(q_sample(z0, t, noise).to(dtype), t, None if cond is None else cond.to(dtype),
                                 cond_mask).float()
            values.append(float(M.psnr(pred, z0).mean()))
        curves[name] = values
    result = {"t": times, "psnr_db": curves, "num_programs": programs["ids"].shape[0], "cond_ratio": ctx.args.cond_ratio,
              "psnr_convention": "10 log10(1 / MSE per entry): registers have entry mean square 1 (norm sqrt(d))"}
    table = md_table(["t"] + list(curves), [[f"{t:.2f}"] + [f"{curves[n][i]:.2f}" for n in curves]
                                           for i, t in enumerate(times)])
    panels = [panel("Fig. 9: PSNR of g(z_t, t) vs z_0", "t", "PSNR (dB)", {n: (times, v) for n, v in curves.items()})]
    return result, "PSNR in dB with peak = 1 (the RMS of a register entry).\n\n" + table, panels


def run_prdc(ctx):
    from generators import sample_registers
    num, k = ctx.get("num"), ctx.args.prdc_k
    prior = ctx.prior(ctx.args.prior)
    real_programs = ctx.held_out(num)
    real = clean_registers(ctx, real_programs, prior.num_registers).cpu().numpy()
    results = {}
    try:
        other = clean_registers(ctx, ctx.held_out(num, skip=num), prior.num_registers).cpu().numpy()
        results["real_vs_real"] = M.prdc_per_register(real, other, k)
    except ValueError as error:
        print(f"prdc: no second held-out set for the real-vs-real reference ({error})")
    generator = torch.Generator().manual_seed(ctx.args.seed)
    fake, _ = sample_registers(prior, num, ctx.get("prior_steps"), generator=generator)
    results["unconditional"] = M.prdc_per_register(real, fake.cpu().numpy(), k)
    if ctx.args.cond_prior:
        cond_prior = ctx.prior(ctx.args.cond_prior, "--cond-prior")
        given = ctx.held_out(num, skip=num) if "real_vs_real" in results else real_programs
        cond, cond_mask = partial_condition(ctx, cond_prior, given, ctx.args.cond_ratio, ctx.args.seed + 1)
        fake, _ = sample_registers(cond_prior, num, ctx.get("prior_steps"), cond, cond_mask, generator=generator)
        results["conditional"] = M.prdc_per_register(real, fake.cpu().numpy(), k)
    names = ("precision", "recall", "density", "coverage")
    table = md_table(["samples"] + list(names), [[n] + [f"{r[m]:.3f} ± {r[m + '_std']:.3f}" for m in names]
                                                 for n, r in results.items()])
    result = {"k": k, "num": num, "prior_steps": ctx.get("prior_steps"), "cond_ratio": ctx.args.cond_ratio,
              **results}
    return result, f"PRDC (k={k}) per register index, mean ± sd over the {prior.num_registers} registers.\n\n" + table, []


# ------------------------------------------------------------------------------------------------
# App. B: the marginal trap
# ------------------------------------------------------------------------------------------------


def run_marginal_trap(ctx):
    import marginal_trap
    if not ctx.env.is_main:
        return None, None, None
    result = marginal_trap.run(pairs=ctx.args.trap_pairs, choices=ctx.args.trap_choices,
                               train_steps=ctx.get("trap_steps"), num_samples=ctx.get("trap_samples"),
                               seed=ctx.args.seed, trials=ctx.get("trap_trials"))
    keys = [k for k in result["rows"][0] if k not in ("steps", "tokens_per_step") and not k.endswith("_distinct")]
    table = md_table(["tokens/step"] + keys, [[f"{r['tokens_per_step']:g}"] + [f"{r[k]:.3f}" for k in keys]
                                               for r in result["rows"]])
    x = [r["tokens_per_step"] for r in result["rows"]]
    panels = [panel("App. B: valid samples vs tokens per step", "tokens revealed per step", "fraction valid",
                    {k: (x, [r[k] for r in result["rows"]]) for k in keys}, logx=True)]
    task = result["task"]
    note = (f"{task['pairs']} pairs over {task['choices']} choices ({task['num_valid']} valid sequences of "
            f"{task['length']} tokens); fraction of valid samples. optimal_factorized_random = the best any "
            f"factorised demasker can do with random remasking (App. B, eq. 8).\n\n")
    return result, note + table, panels


# ------------------------------------------------------------------------------------------------
# Output: JSON, REPORT.md, plots
# ------------------------------------------------------------------------------------------------


def write_outputs(ctx, name, title, result, text, panels):
    """OUT/NAME.json, a section of OUT/REPORT.md and OUT/NAME.png (report.write_experiment)."""
    command = "python eval.py " + " ".join(sys.argv[1:]) if Path(sys.argv[0]).name == "eval.py" else None
    scorer_info = None
    if ctx.args.scorer and (Path(ctx.args.scorer) / "scorer.json").is_file():
        scorer_info = read_json(Path(ctx.args.scorer) / "scorer.json", "retrain it with train_scorer.py")
    record = {"experiment": name, "title": title, "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": command, "git_commit": git_commit(), "preset": ctx.args.preset,
              "settings": {k: v for k, v in vars(ctx.args).items() if k != "func"},
              "resolved": {k: ctx.preset[k] for k in ctx.preset}, "data": str(ctx.data_dir),
              "world_size": ctx.env.world_size, "scorer": scorer_info, "results": result}
    return write_experiment(ctx.args.out, record, text, panels)


EXPERIMENTS = {
    "fig4": ("Guided demasker: masked-token CE and top-1 vs mask ratio (Fig. 4)", run_fig4),
    "table1": ("MDM autoencoder sweep at the first length (Table 1)", lambda ctx: run_table(ctx, 0)),
    "table2": ("MDM autoencoder sweep at the second length (Table 2)", lambda ctx: run_table(ctx, 1)),
    "fig7": ("Robustness to latent noise (Fig. 7, App. D)", run_fig7),
    "fig8": ("Register-space interpolation (Fig. 8, App. D)", run_fig8),
    "fig6": ("Text generation: MAUVE and Gen-PPL vs NFE, and the speedup (Fig. 6 / 12)", run_fig6),
    "fig9": ("PSNR of the prior's prediction vs t (Fig. 9, App. E)", run_fig9),
    "prdc": ("PRDC of prior samples per register (App. E)", run_prdc),
    "fig11": ("Ablations: registers K, refresh fraction, block offsets (Fig. 11, App. G)", run_fig11),
    "marginal-trap": ("The marginal trap: valid samples vs tokens per step (App. B, Theorem B.1)", run_marginal_trap),
}


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    a = common.add_argument
    a("--ae", help="train_ae.py run folder (encoder/, demasker/, tokenizer.json; OUT or OUT/checkpoint)")
    a("--ae-no-noise", help="fig7: a second AE run trained without latent noise (train_ae.py --latent-cos 1)")
    a("--base", help="base MDM run (train_ae.py --no-registers)")
    a("--prior", help="unconditional train_prior.py run (ConThenDisc; initial registers of ConWithinDisc)")
    a("--cond-prior", help="conditional train_prior.py --conditional run (ConWithinDisc)")
    a("--prior-no-offsets", help="fig11: a prior trained with --no-block-offsets")
    a("--k-priors", nargs="*", help="fig11: priors trained with different --num-registers (default: --prior)")
    a("--scorer", help="train_scorer.py output folder, or a Qwen3 causal LM folder / hub id (Gen-PPL, MAUVE)")
    a("--data", help="data.py cache (default: the 'data' recorded in the AE run's args.json)")
    a("--out", default="results", help="output folder for NAME.json, REPORT.md and plots")
    a("--preset", choices=sorted(PRESETS), default="tiny", help="sample counts and sweeps: tiny (minutes on CPU), "
      "small (about an hour on CPU), paper (the paper's sizes, GPUs)")
    a("--num", type=int, help="samples / programs per point (default: the preset's)")
    a("--batch-size", type=int, help="sequences per forward (default: the preset's)")
    a("--seed", type=int, default=0, help="seed of every random stream (masks, noise, sampling, k-means)")
    a("--lengths", type=int, nargs="+", help="fig6: generation lengths (default: the preset's two)")
    a("--length", type=int, help="one length for table1/table2 (default: the preset's first/second), fig11 (the "
      "first) and fig8 (the data's L)")
    a("--nfe", type=int, nargs="+", help="NFE (= MDM steps) grid (default: powers of two up to the length)")
    a("--blocks", type=int, nargs="+", help="table1/table2: block lengths (default: L/8, L/4, L/2, L)")
    a("--steps", type=int, help="fig8: MDM steps for decoding (default: the length)")
    a("--registers", type=int, nargs="+", help="fig4: register counts k (default: 1, 2, 4, ..., K)")
    a("--sigmas", type=float, nargs="+", help=f"fig7: noise std list (default: {SIGMAS})")
    a("--fig7-ratio", type=float, default=0.9, help="fig7: mask ratio (paper: 0.9)")
    a("--alphas", type=float, nargs="+", help=f"fig8: interpolation weights (default: {ALPHAS})")
    a("--temperature", type=float, help="Gumbel temperature (default: 1.0 for generation, 0 for autoencoding)")
    a("--remasking", choices=["low_confidence", "random"], default="low_confidence", help="LLaDA remasking")
    a("--prior-steps", type=int, help="DDIM steps of a prior draw (default: the preset's; paper 128)")
    a("--refresh-prior-steps", type=int, help="DDIM steps of a ConWithinDisc refresh (default: preset; paper 32)")
    a("--cond-ratio", type=float, default=0.5, help="fig9/prdc: mask ratio r of the conditioning (paper: 0.5)")
    a("--prdc-k", type=int, default=5, help="prdc: nearest neighbours k (paper: 5)")
    a("--mauve-seeds", type=int, help="k-means seeds averaged per MAUVE value (default: the preset's)")
    a("--features", choices=["mean", "last"], default="mean", help="MAUVE features: mean-pooled or last-token state")
    a("--trap-pairs", type=int, default=4, help="marginal-trap: pairs per sequence (length 2 x pairs)")
    a("--trap-choices", type=int, default=4, help="marginal-trap: subjects per slot (A)")
    a("--trap-steps", type=int, help="marginal-trap: training steps per model (default: the preset's)")
    a("--trap-samples", type=int, help="marginal-trap: samples per point (default: the preset's)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (torchrun: cuda:rank)")
    a("--dtype", choices=["float32", "bfloat16", "float16"], help="model dtype (default: as stored)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (title, _) in EXPERIMENTS.items():
        commands.add_parser(name, parents=[common], help=title, description=title)
    args = parser.parse_args(argv)
    check_numbers(parser, args)
    return args


COUNTS = ("num", "batch_size", "lengths", "length", "nfe", "blocks", "steps", "registers", "prior_steps",
          "refresh_prior_steps", "mauve_seeds", "prdc_k", "trap_pairs", "trap_choices", "trap_steps", "trap_samples")


def check_numbers(parser, args):
    """Every number checked before anything is loaded (parser.error names the flag and the valid range)."""
    def each(name):
        value = getattr(args, name)
        return [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    for name in COUNTS:
        for value in each(name):
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("temperature", "sigmas"):
        for value in each(name):
            if not value >= 0:
                parser.error(f"--{name} must be >= 0, got {value}")
    if not 0 < args.fig7_ratio <= 1:
        parser.error(f"--fig7-ratio must be in (0, 1], got {args.fig7_ratio}")
    if not 0 <= args.cond_ratio <= 1:
        parser.error(f"--cond-ratio must be in [0, 1], got {args.cond_ratio}")
    if Path(args.out).is_file():
        parser.error(f"--out {args.out} is a file; pass a folder (NAME.json, REPORT.md and plots go in it)")


def main(argv=None):
    args = parse_args(argv)
    ctx = Context(args)
    title, run = EXPERIMENTS[args.command]
    try:
        result, text, panels = run(ctx)
        record = None
        if ctx.env.is_main and result is not None:
            record = write_outputs(ctx, args.command, title, result, text, panels)
        return record
    finally:
        D.cleanup(ctx.env)


if __name__ == "__main__":
    main()
