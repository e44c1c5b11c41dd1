"""Metrics of the paper's evaluation (Sec. 5, App. D-G), each a small function on plain arrays.

Paper map (arXiv 2603.20210) and the metrics' published recipes (all code here is written from the published
definitions; the GPL `mauve-text` package was not copied):
- CER (Sec. 5, Tables 1-2): character Levenshtein distance / reference length.       `levenshtein`, `cer`
- Gen-PPL (Sec. 5, Fig. 6, 8, 12): perplexity of generated text under a reference causal LM, MDLM's
  semantics (decode -> re-encode with the scorer's tokenizer -> teacher-forced NLL pooled over all tokens
  of all samples -> exp), always with the unigram-entropy guardrail.  `gen_ppl`, `generative_perplexity`,
  `unigram_entropy`
- MAUVE (Pillutla et al. 2021; Fig. 6, 8, 11): l2-normalise -> PCA (90% variance) -> k-means
  (k = n/10, restarts) -> histograms -> 25-point divergence frontier with c = 5 -> area.  `mauve`
- PRDC (Naeem et al. 2020; App. E): precision, recall, density, coverage with k = 5, per register index
  and averaged over registers.                                                   `prdc`, `prdc_per_register`
- PSNR (App. E, Fig. 9) of the prior's prediction against the true registers.    `psnr`
- Masked-token CE and top-1 (Fig. 4, Fig. 7).                                      `masked_prediction_stats`
- Ours, not the paper's: Python parse rate (`ast.parse`) and exact-duplicate rate against the training
  set (memorisation check).                                              `parse_rate`, `duplicate_rate`
- A semantic similarity in place of CodeBERTScore (Tables 1-2): the cosine between the scorer's
  mean-pooled features of reconstruction and source.                              `feature_cosine`
- Ours, not the paper's (docs/results.md, "How to read the numbers"): seeded percentile-bootstrap 95% intervals
  over the samples for Gen-PPL (pooled over the resampled samples' tokens), MAUVE (each replicate resamples the method's samples with
  replacement and runs k-means with a new seed; the reference set stays fixed, see `bootstrap_mauve`) and any
  per-sample mean (parse rate, empty rate, CER).   `bootstrap_indices`, `percentile_interval`,
  `bootstrap_mean`, `bootstrap_gen_ppl`, `bootstrap_mauve`

Empty samples (no text between BOS and EOS, or only whitespace: `is_empty`) are scored as empty text: they
contribute no token to the pooled Gen-PPL (not a lone EOS, whose low NLL would flatter it); an all-empty set
has Gen-PPL nan, and the share of empty samples is reported beside it (`empty_rate`).

Conventions: numpy float64 results; torch is used only where it is faster (k-means, pairwise distances).
"""

import ast
import math

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------
# Character error rate
# ------------------------------------------------------------------------------------------------


def _as_codes(seq):
    """A string -> its Unicode code points; any other sequence -> int codes of its (hashable) items."""
    if isinstance(seq, str):
        return np.frombuffer(seq.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    if isinstance(seq, np.ndarray) and seq.dtype.kind in "iu":
        return seq.astype(np.int64).ravel()
    return seq  # mapped by levenshtein below


def levenshtein(a, b):
    """Edit distance (unit-cost insertion, deletion, substitution) between two strings or sequences.

    Row-vectorised Wagner-Fischer DP in numpy: for row i, first the substitution / deletion candidates
    c[j] = min(prev[j] + 1, prev[j-1] + (a_i != b_j)), then insertions along the row in one pass,
    row[j] = min_{k <= j} (c[k] + j - k) = j + cummin(c - arange)[j]. O(len a * len b) work, O(len b) memory.
    """
    a, b = _as_codes(a), _as_codes(b)
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray):  # generic items: map to ints
        table = {}
        a = np.array([table.setdefault(item, len(table)) for item in a], dtype=np.int64)
        b = np.array([table.setdefault(item, len(table)) for item in b], dtype=np.int64)
    if len(a) < len(b):
        a, b = b, a  # the row runs over the shorter sequence
    n = len(b)
    if n == 0:
        return int(len(a))
    steps = np.arange(n + 1, dtype=np.int64)
    row = steps.copy()  # distances from the empty prefix of a
    for i, code in enumerate(a, 1):
        candidate = np.empty(n + 1, dtype=np.int64)
        candidate[0] = i
        np.minimum(row[1:] + 1, row[:-1] + (b != code), out=candidate[1:])
        row = np.minimum.accumulate(candidate - steps) + steps
    return int(row[-1])


def cer(reference, hypothesis):
    """Character error rate = levenshtein(reference, hypothesis) / len(reference) (Tables 1-2).

    Can exceed 1 when the hypothesis is much longer. An empty reference gives len(hypothesis) (0 if both
    are empty) instead of a division by zero."""
    return levenshtein(reference, hypothesis) / max(len(reference), 1)


def token_f1(reference, hypothesis):
    """Bag-of-tokens F1 (SQuAD's): 2 P R / (P + R) over the multiset overlap of two token sequences (ids or
    strings); 1.0 when both are empty, 0.0 when only one is. Ours (prompted generation, App. H)."""
    from collections import Counter
    reference, hypothesis = list(reference), list(hypothesis)
    if not reference or not hypothesis:
        return float(reference == hypothesis)
    common = sum((Counter(reference) & Counter(hypothesis)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(hypothesis), common / len(reference)
    return 2 * precision * recall / (precision + recall)


# ------------------------------------------------------------------------------------------------
# Generative perplexity and its entropy guardrail
# ------------------------------------------------------------------------------------------------


def unigram_entropy(token_lists):
    """Mean over samples of the per-sample unigram entropy H = -sum_v (c_v/n) log(c_v/n), in nats.

    The guardrail reported next to Gen-PPL (low-entropy, repetitive text gets a low Gen-PPL). Empty
    samples are skipped; no samples -> nan."""
    values = []
    for tokens in token_lists:
        if len(tokens) == 0:
            continue
        _, counts = np.unique(np.asarray(tokens), return_counts=True)
        p = counts / counts.sum()
        values.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(values)) if values else math.nan


def gen_ppl(nll_sums, token_counts):
    """Perplexities from per-sample summed NLL (nats) and scored-token counts.

    gen_ppl            = exp(sum NLL / sum tokens), pooled over every token of every sample (MDLM);
    ppl_sample_median  = median over samples of exp(NLL_i / n_i);
    ppl_sample_mean    = mean over samples of exp(NLL_i / n_i) (SEDD's convention, a different number);
    nll_per_token      = the pooled mean NLL. Samples with no scored token are ignored.
    """
    nll_sums = np.asarray(nll_sums, dtype=np.float64)
    token_counts = np.asarray(token_counts, dtype=np.float64)
    keep = token_counts > 0
    if not keep.any():
        return {"gen_ppl": math.nan, "ppl_sample_median": math.nan, "ppl_sample_mean": math.nan,
                "nll_per_token": math.nan, "num_tokens": 0, "num_samples": 0}
    nll_sums, token_counts = nll_sums[keep], token_counts[keep]
    pooled = nll_sums.sum() / token_counts.sum()
    per_sample = np.exp(nll_sums / token_counts)
    return {"gen_ppl": float(np.exp(pooled)), "ppl_sample_median": float(np.median(per_sample)),
            "ppl_sample_mean": float(per_sample.mean()), "nll_per_token": float(pooled),
            "num_tokens": int(token_counts.sum()), "num_samples": int(keep.sum())}


def generative_perplexity(scorer, texts, batch_size=16, return_scores=False):
    """Gen-PPL of `texts` under `scorer` (a train_scorer.Scorer or anything with the same `score`).

    scorer.score(texts, batch_size) -> (nll_sums (N,), token_counts (N,), token_lists): the texts are
    re-encoded with the scorer's tokenizer, wrapped BOS .. EOS, and every token after BOS (EOS included)
    is scored teacher-forced. Empty texts are scored as empty (`score_without_empty`: no tokens). Returns
    gen_ppl's dict plus `unigram_entropy` over the re-encoded tokens (BOS/EOS excluded), and a "note" when
    every text is empty (Gen-PPL nan). return_scores: (that dict, (nll_sums, token_counts)) for bootstraps."""
    texts = list(texts)
    nll_sums, token_counts, token_lists = score_without_empty(scorer, texts, batch_size)
    result = gen_ppl(nll_sums, token_counts)
    result["unigram_entropy"] = unigram_entropy(token_lists)
    if result["num_samples"] == 0 and texts:
        result["note"] = "every sample is empty: no token to score, Gen-PPL is nan (see empty_rate)"
    return (result, (nll_sums, token_counts)) if return_scores else result


def is_empty(text):
    """An empty sample: no text between BOS and EOS (whitespace only counts as none)."""
    return not text.strip()


def empty_rate(texts):
    """Share of empty samples (`is_empty`); nan for no texts."""
    texts = list(texts)
    return sum(is_empty(text) for text in texts) / len(texts) if texts else math.nan


def score_without_empty(scorer, texts, batch_size=16):
    """scorer.score with empty texts scored as empty text: 0 NLL over 0 tokens and no token list (the scorer
    alone would score their lone EOS, a cheap token that flatters Gen-PPL). Only non-empty texts are run."""
    keep = [i for i, text in enumerate(texts) if not is_empty(text)]
    nll_sums = np.zeros(len(texts), dtype=np.float64)
    counts = np.zeros(len(texts), dtype=np.int64)
    token_lists = [[] for _ in texts]
    if keep:
        some_nll, some_counts, some_tokens = scorer.score([texts[i] for i in keep], batch_size=batch_size)
        nll_sums[keep], counts[keep] = np.asarray(some_nll, np.float64), np.asarray(some_counts, np.int64)
        for i, tokens in zip(keep, some_tokens):
            token_lists[i] = tokens
    return nll_sums, counts, token_lists


# ------------------------------------------------------------------------------------------------
# MAUVE
# ------------------------------------------------------------------------------------------------


def pca_project(x, explained_variance=0.9):
    """Centre x (n, d) and keep the fewest principal components whose cumulative explained variance
    reaches `explained_variance` (sklearn PCA's rule). Returns (n, m) float64."""
    x = torch.as_tensor(x, dtype=torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s (r,), vh (r, d)
    variance = s ** 2
    total = variance.sum()
    if total <= 0:  # every point identical: one constant coordinate
        return torch.zeros(x.shape[0], 1, dtype=torch.float64).numpy()
    cumulative = torch.cumsum(variance, 0) / total
    m = int(torch.searchsorted(cumulative, torch.tensor([explained_variance - 1e-12], dtype=torch.float64))) + 1
    m = min(m, vh.shape[0])
    return (x @ vh[:m].T).numpy()


def kmeans(x, k, restarts=5, iterations=500, seed=0):
    """Lloyd's k-means with k-means++ seeding, best of `restarts` by inertia. x (n, d) -> labels (n,) int64.

    Empty clusters are re-seeded with the point farthest from its centroid. Deterministic given seed."""
    x = torch.as_tensor(x, dtype=torch.float64)
    n = x.shape[0]
    k = min(k, n)
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, math.inf
    for _ in range(restarts):
        centroids = _kmeans_plus_plus(x, k, rng)
        labels = None
        for _ in range(iterations):
            distances = torch.cdist(x, centroids) ** 2  # (n, k)
            new_labels = distances.argmin(dim=1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            sums = torch.zeros_like(centroids).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)
            empty = counts == 0
            centroids = sums / counts.clamp(min=1)[:, None]
            if empty.any():  # re-seed empty clusters at the worst-fitted points
                worst = distances.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
                centroids[empty] = x[worst[:int(empty.sum())]]
        inertia = float((torch.cdist(x, centroids) ** 2).min(dim=1).values.sum())
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, torch.cdist(x, centroids).argmin(dim=1)
    return best_labels.numpy()


def _kmeans_plus_plus(x, k, rng):
    """Arthur & Vassilvitskii's seeding: each new centre drawn with probability ~ squared distance."""
    n = x.shape[0]
    centres = [int(rng.integers(n))]
    closest = ((x - x[centres[0]]) ** 2).sum(dim=1)  # (n,)
    for _ in range(1, k):
        weights = closest.numpy()
        total = weights.sum()
        index = int(rng.choice(n, p=weights / total)) if total > 0 else int(rng.integers(n))
        centres.append(index)
        closest = torch.minimum(closest, ((x - x[index]) ** 2).sum(dim=1))
    return x[centres].clone()


def _kl(p, q):
    """KL(p || q) in nats over the support of p; inf when q = 0 somewhere p > 0."""
    support = p > 0
    if np.any(q[support] <= 0):
        return math.inf
    return float(np.sum(p[support] * np.log(p[support] / q[support])))


def divergence_frontier(p, q, scaling=5.0, points=25):
    """MAUVE's divergence curve between histograms p and q.

    For w in linspace(1e-6, 1 - 1e-6, points), R_w = w p + (1 - w) q and the point is
    (exp(-c KL(q || R_w)), exp(-c KL(p || R_w))); the extremes (0, 1) and (1, 0) close the curve.
    Returns (points + 2, 2) float64, x = exp(-c KL(q||R)), y = exp(-c KL(p||R))."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    curve = [(0.0, 1.0)]
    for w in np.linspace(1e-6, 1 - 1e-6, points):
        r = w * p + (1 - w) * q
        curve.append((math.exp(-scaling * _kl(q, r)), math.exp(-scaling * _kl(p, r))))
    curve.append((1.0, 0.0))
    return np.array(curve)


def frontier_area(curve):
    """Trapezoid area under the frontier, x sorted increasing (= MAUVE), clipped at 1 (rounding)."""
    order = np.argsort(curve[:, 0], kind="stable")
    x, y = curve[order, 0], curve[order, 1]
    return min(float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)), 1.0)


def mauve_from_histograms(p, q, scaling=5.0, points=25):
    """MAUVE of two histograms (each normalised here)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    return frontier_area(divergence_frontier(p / p.sum(), q / q.sum(), scaling, points))


def mauve(p_features, q_features, scaling=5.0, num_buckets="auto", explained_variance=0.9, restarts=5,
          iterations=500, seed=25, points=25):
    """MAUVE between two sets of feature vectors (Pillutla et al. 2021), e.g. model vs human text.

    p_features (n_p, d), q_features (n_q, d): one row per text. Steps: l2-normalise every row, fit a PCA on
    both sets together and keep 90% of the variance, k-means (k = max(2, round(min(n_p, n_q) / 10)) when
    num_buckets='auto') on the joint set, the two normalised cluster histograms, the divergence frontier
    (`divergence_frontier`, c = scaling) and its area. Identical sets give 1; disjoint sets give ~0.004, the
    floor of the 25-point grid at c = 5 (not 0).
    Returns {"mauve", "mauve_star" (histograms smoothed with +0.5 counts, JMLR 2023), "num_buckets",
    "pca_dim", "p_hist", "q_hist"}. Only relative comparisons at equal n and settings are meaningful.
    """
    p = np.asarray(p_features, dtype=np.float64)
    q = np.asarray(q_features, dtype=np.float64)
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(f"mauve needs two (n, d) feature arrays of the same width, got {p.shape} and {q.shape}")
    if len(p) < 2 or len(q) < 2:
        raise ValueError(f"mauve needs at least 2 samples per side, got {len(p)} and {len(q)}; raise --num")
    k = max(2, int(round(min(len(p), len(q)) / 10))) if num_buckets == "auto" else int(num_buckets)
    both = np.concatenate([p, q])
    both = both / np.maximum(np.linalg.norm(both, axis=1, keepdims=True), 1e-12)
    projected = pca_project(both, explained_variance)
    labels = kmeans(projected, k, restarts=restarts, iterations=iterations, seed=seed)
    k = max(k, int(labels.max()) + 1) if len(labels) else k
    p_counts = np.bincount(labels[:len(p)], minlength=k).astype(np.float64)
    q_counts = np.bincount(labels[len(p):], minlength=k).astype(np.float64)
    return {"mauve": mauve_from_histograms(p_counts, q_counts, scaling, points),
            "mauve_star": mauve_from_histograms(p_counts + 0.5, q_counts + 0.5, scaling, points),
            "num_buckets": int(k), "pca_dim": int(projected.shape[1]),
            "p_hist": (p_counts / p_counts.sum()).tolist(), "q_hist": (q_counts / q_counts.sum()).tolist()}


# ------------------------------------------------------------------------------------------------
# PRDC
# ------------------------------------------------------------------------------------------------


def prdc(real, fake, k=5):
    """Precision, recall, density, coverage (Naeem et al. 2020) with k nearest neighbours, Euclidean.

    real (N, d), fake (M, d). r_i = distance from real_i to its k-th nearest other real point (itself
    excluded), s_j likewise within fake; balls are open (strict <).
    precision = mean_j [exists i: |f_j - x_i| < r_i]     recall   = mean_i [exists j: |x_i - f_j| < s_j]
    density   = mean_j #{i: |f_j - x_i| < r_i} / k        coverage = mean_i [min_j |x_i - f_j| < r_i]
    """
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"prdc with k={k} needs more than k samples per side, got {len(real)} real and "
                         f"{len(fake)} fake; raise --num")
    real_radii = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # (N,), the 1st is the point itself
    fake_radii = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values  # (M,)
    cross = torch.cdist(real, fake)  # (N, M)
    inside_real = cross < real_radii[:, None]  # fake j inside the ball of real i
    return {"precision": float(inside_real.any(dim=0).double().mean()),
            "recall": float((cross < fake_radii[None, :]).any(dim=1).double().mean()),
            "density": float(inside_real.double().sum(dim=0).mean() / k),
            "coverage": float((cross.min(dim=1).values < real_radii).double().mean())}


def prdc_per_register(real, fake, k=5):
    """App. E: PRDC in the feature space of each register index j separately, then averaged over j.

    real (N, K, d), fake (M, K, d). Returns {metric: mean over registers, metric + "_std": std over
    registers} and "per_register": the K dicts."""
    real, fake = np.asarray(real), np.asarray(fake)
    if real.ndim != 3 or fake.ndim != 3 or real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"prdc_per_register needs (N, K, d) and (M, K, d) banks, got {real.shape}, {fake.shape}")
    per_register = [prdc(real[:, j], fake[:, j], k) for j in range(real.shape[1])]
    result = {}
    for name in ("precision", "recall", "density", "coverage"):
        values = np.array([entry[name] for entry in per_register])
        result[name], result[name + "_std"] = float(values.mean()), float(values.std())
    result["per_register"] = per_register
    return result


# ------------------------------------------------------------------------------------------------
# PSNR of the prior (Fig. 9)
# ------------------------------------------------------------------------------------------------


def psnr(prediction, target, peak=1.0):
    """Peak signal-to-noise ratio in dB per example: 10 log10(peak^2 / MSE), MSE over all but the first dim.

    Convention for registers: each register has norm sqrt(d) (App. C), so the mean square of its entries is
    exactly 1; we take peak = 1, i.e. the RMS of the signal. PSNR is then the signal-to-error ratio in dB:
    0 dB for a prediction of zeros, +20 dB for an error 10x smaller than the signal. A perfect prediction
    is capped at 200 dB (MSE floored at 1e-20). prediction, target: (B, ...). Returns a (B,) float64 tensor.
    """
    prediction = torch.as_tensor(prediction).double()
    target = torch.as_tensor(target).double()
    if prediction.shape != target.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(prediction.shape)} vs {tuple(target.shape)}")
    mse = (prediction - target).pow(2).flatten(1).mean(dim=1).clamp(min=1e-20)
    return 10.0 * torch.log10(peak ** 2 / mse)


# ------------------------------------------------------------------------------------------------
# Masked-token prediction (Fig. 4, Fig. 7)
# ------------------------------------------------------------------------------------------------


def masked_prediction_stats(logits, targets, scored):
    """Sums for masked-token cross-entropy and top-1 accuracy over the `scored` positions.

    logits (B, L, V), targets (B, L) long, scored (B, L) bool. Returns (ce_sum, correct, count) as Python
    numbers, so batches add up; mean CE = ce_sum / count, top-1 = correct / count."""
    rows = logits[scored].float()  # (N, V)
    wanted = targets[scored]
    if rows.shape[0] == 0:
        return 0.0, 0, 0
    ce = torch.nn.functional.cross_entropy(rows, wanted, reduction="sum")
    correct = (rows.argmax(dim=-1) == wanted).sum()
    return float(ce), int(correct), int(rows.shape[0])


# ------------------------------------------------------------------------------------------------
# Ours: parse rate, memorisation, feature similarity
# ------------------------------------------------------------------------------------------------


def parses(text):
    """True when `text` is syntactically valid Python (ast.parse)."""
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False


def parse_rate(texts):
    """Fraction of texts that ast.parse accepts (nan for no texts)."""
    texts = list(texts)
    return sum(parses(text) for text in texts) / len(texts) if texts else math.nan


def normalise_program(text):
    """The form compared for duplicates: trailing whitespace stripped from every line and from the end."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def duplicate_rate(texts, training_texts):
    """Fraction of (non-empty) generated texts that equal a training program exactly, after
    `normalise_program` (a memorisation check). `training_texts` may also be a prebuilt set of normalised
    programs. Empty generations are not counted as duplicates."""
    known = training_texts if isinstance(training_texts, (set, frozenset)) else \
        {normalise_program(text) for text in training_texts}
    texts = list(texts)
    if not texts:
        return math.nan
    return sum(1 for text in texts if normalise_program(text) and normalise_program(text) in known) / len(texts)


def feature_cosine(a, b):
    """Row-wise cosine similarity of two (n, d) feature arrays -> (n,) float64 (our stand-in for
    CodeBERTScore in Tables 1-2, with the scorer's mean-pooled features)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return (a * b).sum(axis=1) / norms


# ------------------------------------------------------------------------------------------------
# Ours: bootstrap 95% intervals (docs/results.md, "How to read the numbers")
# ------------------------------------------------------------------------------------------------


def bootstrap_indices(n, replicates, seed=0):
    """(replicates, n) int64: row b resamples range(n) with replacement (numpy default_rng(seed)), so every
    metric of one sample set computed from row b belongs to the same resample."""
    if n < 1:
        raise ValueError(f"bootstrap needs at least one sample, got {n}")
    return np.random.default_rng(seed).integers(0, n, size=(int(replicates), int(n)))


def percentile_interval(values, level=0.95):
    """[lo, hi] = the (1 - level)/2 and (1 + level)/2 percentiles of the finite replicate values, or None
    when none is finite (e.g. every replicate all-empty)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap_mean(values, indices):
    """Replicate means of per-sample values (n,) over bootstrap `indices` (B, n) -> (B,) float64."""
    return np.asarray(values, dtype=np.float64)[indices].mean(axis=1)


def bootstrap_gen_ppl(nll_sums, token_counts, indices):
    """Replicate Gen-PPL (B,): exp(sum NLL / sum tokens) over each resample, pooled over tokens like `gen_ppl`;
    empty samples (0 tokens) are drawn like any other but add nothing; a resample without tokens gives nan."""
    nll = np.asarray(nll_sums, dtype=np.float64)[indices].sum(axis=1)
    count = np.asarray(token_counts, dtype=np.float64)[indices].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, np.exp(nll / np.maximum(count, 1)), np.nan)


def bootstrap_mauve(p_features, q_features, indices, seed=0, restarts=1, **kwargs):
    """Replicate MAUVE (B,): replicate b scores p_features[indices[b]] (the method's samples resampled with
    replacement) against the FIXED reference q_features with k-means seed seed + b and `restarts` restarts
    (1 by default: a replicate is one draw of the k-means noise, which the interval is meant to contain).

    The reference is shared by every row compared against it, so its sampling noise moves all rows together
    and is left out of the interval (a between-methods comparison does not see it)."""
    p = np.asarray(p_features, dtype=np.float64)
    return np.array([mauve(p[rows], q_features, seed=seed + b, restarts=restarts, **kwargs)["mauve"]
                     for b, rows in enumerate(indices)])
