"""evaluation/metrics.py against hand-computed cases, limiting cases and independent slow reference loops."""

import math
import random

import numpy as np
import pytest
import torch

from evaluation import metrics as M




# ------------------------------------------------------------------------------------------------ CER


def naive_levenshtein(a, b):
    """The textbook full-table DP, written independently of metrics.levenshtein."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            if i == 0 or j == 0:
                table[i][j] = i + j
            else:
                table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[len(a)][len(b)]


def test_levenshtein_hand_cases():
    assert M.levenshtein("kitten", "sitting") == 3
    assert M.levenshtein("flaw", "lawn") == 2
    assert M.levenshtein("", "abc") == 3 and M.levenshtein("abc", "") == 3 and M.levenshtein("", "") == 0
    assert M.levenshtein("héllo wörld", "hello world") == 2  # code points, not bytes
    assert M.levenshtein([1, 2, 3, 4], [1, 3, 4, 5]) == 2
    assert M.levenshtein(("def", "f", "("), ("def", "g", "(")) == 1  # any hashable items


def test_levenshtein_matches_the_naive_dp_on_random_pairs():
    rng = random.Random(0)
    alphabet = "ab c\nλ€"
    for _ in range(200):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        b = list(a)
        for _ in range(rng.randint(0, 8)):  # random edits
            op, pos = rng.randint(0, 2), rng.randint(0, len(b))
            if op == 0:
                b.insert(pos, rng.choice(alphabet))
            elif b and pos < len(b):
                if op == 1:
                    del b[pos]
                else:
                    b[pos] = rng.choice(alphabet)
        b = "".join(b)
        assert M.levenshtein(a, b) == naive_levenshtein(a, b) == M.levenshtein(b, a)


def test_cer():
    assert M.cer("abcd", "abcd") == 0.0
    assert M.cer("abcd", "abed") == 0.25
    assert M.cer("ab", "abxyz") == 1.5  # can exceed 1
    assert M.cer("", "") == 0.0 and M.cer("", "xy") == 2.0


# ------------------------------------------------------------------------------------------------ Gen-PPL


def test_gen_ppl_pools_over_tokens_and_reports_the_other_conventions():
    out = M.gen_ppl([2.0, 6.0, 0.0], [1, 3, 0])  # the empty sample is ignored
    assert math.isclose(out["gen_ppl"], math.exp(8.0 / 4))
    assert math.isclose(out["ppl_sample_mean"], (math.exp(2.0) + math.exp(2.0)) / 2)
    assert out["num_tokens"] == 4 and out["num_samples"] == 2
    assert math.isnan(M.gen_ppl([], [])["gen_ppl"])


def test_unigram_entropy():
    assert math.isclose(M.unigram_entropy([[1, 1, 2, 2], [5, 5, 5, 5]]), (math.log(2) + 0.0) / 2)
    assert math.isclose(M.unigram_entropy([[1, 2, 3, 4], []]), math.log(4))  # empty samples skipped


class UnigramModel(torch.nn.Module):
    """A 'causal LM' whose next-token distribution is a fixed unigram p, whatever the context."""

    def __init__(self, log_p):
        super().__init__()
        self.log_p = log_p
        self.cfg = type("Cfg", (), {"hidden_size": 1})()

    def backbone(self, ids, attention_mask=None):
        return torch.zeros(*ids.shape, 1)

    def lm_logits(self, hidden):
        return self.log_p.expand(*hidden.shape[:-1], -1)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def test_gen_ppl_of_a_known_distribution_under_a_unigram_scorer():
    """Scorer p = (a .5, b .25, c .125, EOS .125); a text whose scored tokens (EOS included) have exactly these
    frequencies has Gen-PPL = exp(H(p)) = 2^1.75."""
    from experiments.train_scorer import Scorer
    words = ["<bos>", "<eos>", "a", "b", "c", "<unk>"]
    p = torch.tensor([1e-9, 0.125, 0.5, 0.25, 0.125, 1e-9])
    scorer = Scorer(UnigramModel(p.log()), word_tokenizer(words), bos_id=0, eos_id=1)
    texts = ["a a a b c b a", "a a a b c b a"]  # each: a 4 b 2 c 1 + EOS 1 = 8 tokens, frequencies = p
    out = M.generative_perplexity(scorer, texts)
    assert math.isclose(out["gen_ppl"], 2 ** 1.75, rel_tol=1e-6)
    assert out["num_tokens"] == 16
    assert math.isclose(out["unigram_entropy"], -sum(q * math.log(q) for q in (4 / 7, 2 / 7, 1 / 7)))


def test_empty_samples_add_no_token_to_gen_ppl():
    """An empty sample is scored as empty text: the scorer alone would score its lone EOS (p = .125 here), which
    would pull Gen-PPL towards 8; a mix gives the Gen-PPL of the non-empty samples, all-empty gives nan."""
    from experiments.train_scorer import Scorer
    words = ["<bos>", "<eos>", "a", "b", "c", "<unk>"]
    p = torch.tensor([1e-9, 0.125, 0.5, 0.25, 0.125, 1e-9])
    scorer = Scorer(UnigramModel(p.log()), word_tokenizer(words), bos_id=0, eos_id=1)
    _, counts, _ = scorer.score([""])
    assert counts[0] == 1  # what the fix avoids: "" -> BOS EOS, one scored token
    mixed = M.generative_perplexity(scorer, ["a a a b c b a", "", "  \n", "a a a b c b a"])
    assert math.isclose(mixed["gen_ppl"], 2 ** 1.75, rel_tol=1e-6)
    assert mixed["num_tokens"] == 16 and mixed["num_samples"] == 2 and "note" not in mixed
    alone = M.generative_perplexity(scorer, ["", "", " "])
    assert math.isnan(alone["gen_ppl"]) and alone["num_tokens"] == 0 and "empty" in alone["note"]
    assert math.isnan(alone["unigram_entropy"])
    assert M.empty_rate(["", " \n", "x", "def f(): pass"]) == 0.5 and math.isnan(M.empty_rate([]))


# ------------------------------------------------------------------------------------------------ MAUVE


def reference_frontier_area(p, q, c=5.0, points=25):
    """Scalar re-derivation of MAUVE from two histograms: the divergence curve and a trapezoid area."""
    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
    xs, ys = [0.0, 1.0], [1.0, 0.0]
    for i in range(points):
        w = 1e-6 + i * (1 - 2e-6) / (points - 1)
        r = [w * a + (1 - w) * b for a, b in zip(p, q)]
        xs.append(math.exp(-c * kl(q, r)))
        ys.append(math.exp(-c * kl(p, r)))
    pairs = sorted(zip(xs, ys))
    return sum((x1 - x0) * (y1 + y0) / 2 for (x0, y0), (x1, y1) in zip(pairs, pairs[1:]))


def test_mauve_from_histograms_matches_a_scalar_reference():
    for p, q in (([0.5, 0.5], [0.9, 0.1]), ([0.2, 0.3, 0.5], [0.4, 0.4, 0.2]), ([1, 0, 0], [0.3, 0.3, 0.4])):
        assert math.isclose(M.mauve_from_histograms(p, q), reference_frontier_area(p, q), rel_tol=1e-9)
    assert math.isclose(M.mauve_from_histograms([3, 1], [3, 1]), 1.0)
    disjoint = M.mauve_from_histograms([1, 0], [0, 1])
    assert disjoint < 0.01 and math.isclose(disjoint, reference_frontier_area([1, 0], [0, 1]))


def test_mauve_limits_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    assert M.mauve(a, a)["mauve"] > 0.99
    far = M.mauve(a, a + 20.0)
    assert far["mauve"] < 0.01 and far["num_buckets"] == 20
    b = rng.normal(size=(200, 16))
    assert M.mauve(a, b)["mauve"] > 0.8  # two samples of one distribution


def test_mauve_decreases_with_the_distance_and_is_seeded():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(300, 24))
    values = []
    for shift in (0.0, 0.7, 2.0):
        q = rng.normal(size=(300, 24))
        q[:, :6] += shift
        values.append(M.mauve(p, q, seed=3)["mauve"])
    assert values[0] > values[1] > values[2]
    q = rng.normal(size=(300, 24))
    assert M.mauve(p, q, seed=7) == M.mauve(p, q, seed=7)


def test_kmeans_recovers_separated_clusters_and_pca_keeps_90_percent():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    truth = np.repeat(np.arange(3), 30)
    labels = M.kmeans(centres[truth] + rng.normal(scale=0.1, size=(90, 2)), 3, restarts=2, seed=0)
    assert len({(t, l) for t, l in zip(truth, labels)}) == 3  # a bijection between clusters
    x = rng.normal(size=(500, 3)) * np.array([10.0, 1.0, 0.1])
    assert M.pca_project(x, 0.9).shape == (500, 1)
    assert M.pca_project(x, 0.999).shape == (500, 2)


# ------------------------------------------------------------------------------------------------ PRDC


def brute_prdc(real, fake, k):
    """Naeem et al.'s definitions as literal loops."""
    dist = lambda a, b: math.dist(a, b)
    def radius(points, i):
        return sorted(dist(points[i], points[j]) for j in range(len(points)) if j != i)[k - 1]
    r_real = [radius(real, i) for i in range(len(real))]
    r_fake = [radius(fake, j) for j in range(len(fake))]
    precision = np.mean([any(dist(f, x) < r for x, r in zip(real, r_real)) for f in fake])
    recall = np.mean([any(dist(x, f) < s for f, s in zip(fake, r_fake)) for x in real])
    density = np.mean([sum(dist(f, x) < r for x, r in zip(real, r_real)) for f in fake]) / k
    coverage = np.mean([min(dist(x, f) for f in fake) < r for x, r in zip(real, r_real)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_prdc_matches_brute_force():
    rng = np.random.default_rng(0)
    for shift in (0.0, 0.5, 3.0):
        real, fake = rng.normal(size=(14, 3)), rng.normal(size=(11, 3)) + shift
        ours, reference = M.prdc(real, fake, k=3), brute_prdc(real.tolist(), fake.tolist(), 3)
        for name in reference:
            assert math.isclose(ours[name], reference[name], abs_tol=1e-12), name
    real = rng.normal(size=(20, 2))
    same = M.prdc(real, real, k=5)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = M.prdc(real, real + 100, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than k"):
        M.prdc(real[:5], real, k=5)


def test_prdc_per_register_averages_the_register_spaces():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(12, 3, 4)), rng.normal(size=(10, 3, 4)) + 0.3
    out = M.prdc_per_register(real, fake, k=3)
    for name in ("precision", "recall", "density", "coverage"):
        each = [M.prdc(real[:, j], fake[:, j], 3)[name] for j in range(3)]
        assert math.isclose(out[name], np.mean(each)) and math.isclose(out[name + "_std"], np.std(each))


# ------------------------------------------------------------------------------------------------ PSNR and the rest


def test_psnr_convention():
    torch.manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(3, 4, 16), dim=-1) * 4.0  # norm sqrt(d): entry RMS 1
    assert torch.allclose(M.psnr(torch.zeros_like(target), target), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    error = torch.full_like(target, 0.1)  # RMS error 0.1 -> 20 dB
    assert torch.allclose(M.psnr(target + error, target), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(M.psnr(target + error, target, peak=10.0), torch.full((3,), 40.0, dtype=torch.float64), atol=1e-5)
    assert M.psnr(target, target).min() >= 199.0


def test_masked_prediction_stats():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]])
    targets = torch.tensor([[0, 2, 2]])
    scored = torch.tensor([[True, True, False]])
    ce, correct, count = M.masked_prediction_stats(logits, targets, scored)
    expected = -torch.log_softmax(logits[0, 0], -1)[0] - torch.log_softmax(logits[0, 1], -1)[2]
    assert math.isclose(ce, float(expected), rel_tol=1e-6) and correct == 1 and count == 2
    assert M.masked_prediction_stats(logits, targets, torch.zeros_like(scored)) == (0.0, 0, 0)


def test_parse_and_duplicate_rates():
    assert M.parse_rate(["def f():\n    return 1\n", "def (:", "x = 1"]) == 2 / 3
    assert M.parses("") and not M.parses("\x00")
    train = ["def f():\n    return 1", "x = 2"]
    generated = ["def f():   \n    return 1\n\n", "x = 3", "x = 2", ""]
    assert M.duplicate_rate(generated, train) == 0.5
    assert M.duplicate_rate(generated, {M.normalise_program(t) for t in train}) == 0.5


def test_feature_cosine():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[2.0, 0.0], [-1.0, -1.0]])
    assert np.allclose(M.feature_cosine(a, b), [1.0, -1.0])


# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_indices_and_percentile_interval():
    a, b = M.bootstrap_indices(5, 7, seed=3), M.bootstrap_indices(5, 7, seed=3)
    assert a.shape == (7, 5) and a.min() >= 0 and a.max() <= 4 and np.array_equal(a, b)
    assert not np.array_equal(a, M.bootstrap_indices(5, 7, seed=4))
    assert np.allclose(M.percentile_interval(np.arange(101)), [2.5, 97.5])
    assert M.percentile_interval([1.0, math.nan, 3.0], level=1.0) == [1.0, 3.0]  # nan replicates are dropped
    assert M.percentile_interval([math.nan, math.inf]) is None
    with pytest.raises(ValueError, match="at least one"):
        M.bootstrap_indices(0, 3)


def test_bootstrap_mean_interval_has_the_binomial_width():
    """A 0/1 mean with p = .3 over n = 400: the 95% interval is about p +- 1.96 sqrt(p (1 - p) / n) = +- .045."""
    values = np.array([1.0] * 120 + [0.0] * 280)
    lo, hi = M.percentile_interval(M.bootstrap_mean(values, M.bootstrap_indices(400, 2000, seed=0)))
    assert lo < 0.3 < hi and math.isclose(hi - lo, 2 * 1.96 * math.sqrt(0.3 * 0.7 / 400), rel_tol=0.15)
    assert np.all(M.bootstrap_mean(np.full(9, 2.5), M.bootstrap_indices(9, 5)) == 2.5)


def test_bootstrap_gen_ppl_pools_each_resample():
    nll, counts = np.array([2.0, 6.0, 0.0]), np.array([1, 3, 0])  # the third sample is empty
    identity = np.array([[0, 1, 2], [2, 2, 2], [0, 0, 2], [1, 1, 1]])
    out = M.bootstrap_gen_ppl(nll, counts, identity)
    assert math.isclose(out[0], M.gen_ppl(nll, counts)["gen_ppl"]) and math.isnan(out[1])
    assert math.isclose(out[2], math.exp(2.0)) and math.isclose(out[3], math.exp(2.0))


def test_bootstrap_mauve_is_seeded_and_separates_near_from_far():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(120, 8))
    near, far = rng.normal(size=(120, 8)), rng.normal(size=(120, 8)) + np.r_[1.5, np.zeros(7)]
    indices = M.bootstrap_indices(120, 30, seed=1)
    near_values = M.bootstrap_mauve(near, q, indices, seed=5)
    assert np.array_equal(near_values, M.bootstrap_mauve(near, q, indices, seed=5)) and len(near_values) == 30
    assert len(set(near_values.round(6))) > 1  # resamples and k-means seeds vary the value
    near_ci = M.percentile_interval(near_values)
    far_ci = M.percentile_interval(M.bootstrap_mauve(far, q, indices, seed=5))
    assert far_ci[1] < near_ci[0] and 0 < far_ci[0] and near_ci[1] <= 1


def test_token_f1_bag_of_tokens():
    assert M.token_f1([1, 2, 3], [1, 2, 3]) == 1.0
    assert M.token_f1([1, 2, 3], [4, 5]) == 0.0
    assert abs(M.token_f1([1, 1, 2, 3], [1, 2, 2]) - 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)) < 1e-12
    assert M.token_f1([], []) == 1.0 and M.token_f1([], [1]) == 0.0
