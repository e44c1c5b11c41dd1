"""experiments/eval_base.py: the base MDM's decoding grid, the selection rule and set, and fig6 / speed reading the choice."""

import json
from types import SimpleNamespace

import pytest
import torch

from experiments import eval_base as B
from demasker import Demasker, DemaskerConfig
from mdm import Decoding
from test_eval import _run, runs  # noqa: F401  (the tiny random checkpoints of test_eval.py)


def test_settings_grid_is_every_llada_option():
    grid = B.settings_grid(128)
    assert len(grid) == 2 * 2 * 3  # remasking x {whole, block 32} x EOS mode
    assert {s["remasking"] for s in grid} == {"low_confidence", "random"}
    assert {s["block_length"] for s in grid} == {None, 32}
    assert {s["eos"] for s in grid} == {"as trained", "revealed last", "never"}
    assert len({B.label(s) for s in grid}) == len(grid)
    assert {s["block_length"] for s in B.settings_grid(16, [8, 16, 32, 5])} == {None, 8}  # only proper divisors


def test_decode_options_merge_eos_and_widen_blocks():
    setting = {"remasking": "random", "block_length": 32, "eos": "never"}
    block, remasking, decoding = B.decode_options(setting, 128, 128)
    assert (block, remasking, decoding.logits_eos_inf, decoding.confidence_eos_eot_inf) == (32, "random", True, False)
    assert B.decode_options(setting, 128, 2)[0] == 64  # 4 blocks of 32 cannot share 2 steps: 2 blocks of 64
    assert B.decode_options(setting, 128, 1)[0] == 128
    threshold = B.decode_options({**setting, "eos": "revealed last"}, 128, 128, Decoding(rule="threshold", threshold=.7))
    assert threshold[0] == 32 and threshold[2].rule == "threshold" and threshold[2].threshold == 0.7
    assert threshold[2].confidence_eos_eot_inf and not threshold[2].logits_eos_inf
    assert B.decode_options({**setting, "block_length": None}, 64, 4)[0] == 64


def test_fixed_blocks_share_any_step_count_of_the_fine_grid():
    """The fine NFE grid (1, 2, 3, 4, 6, ...) under a chosen block of 32 at L = 128: 4 blocks cannot share 6 or
    3 steps (LLaDA gives each block steps / blocks), so the block widens to the smallest that shares them
    (before: 6 steps kept 4 blocks and LLaDA refused the schedule; 3 steps made a block of 42)."""
    from mdm import check_schedule
    setting = {"remasking": "low_confidence", "block_length": 32, "eos": "as trained"}
    for steps, block in ((12, 32), (6, 64), (3, 128), (24, 32), (96, 32), (1, 128)):
        assert B.decode_options(setting, 128, steps)[0] == block
        check_schedule(128, block, steps)
    adaptive = B.decode_options(setting, 128, 128, Decoding(rule="factor", factor=1.0))
    assert adaptive[0] == 32  # the adaptive rules keep the chosen block (their steps are not split)


def test_adaptive_grid_sweeps_rules_blocks_and_eos():
    grid = B.adaptive_grid(128, thresholds=[0.5, 0.9], factors=[1.0])
    assert len(grid) == 3 * 2 * 2  # (2 taus + 1 factor) x {whole, block 32} x EOS {as trained, never}
    assert {s["eos"] for s in grid} == {"as trained", "never"}  # revealed last: EOS one per step, no threshold
    assert {s["block_length"] for s in grid} == {None, 32} and {s["remasking"] for s in grid} == {"low_confidence"}
    assert {(s["rule"], s.get("threshold", s.get("factor"))) for s in grid} == {("threshold", .5), ("threshold", .9),
                                                                            ("factor", 1.0)}
    assert len({B.label(s) for s in grid}) == len(grid) and B.label(grid[0]).startswith("threshold 0.5, ")
    assert len(B.adaptive_grid(64, [16])) == (len(B.THRESHOLDS) + len(B.FACTORS)) * 2 * 2
    rows = [{"setting": {**s, "rule": "threshold"}, "mauve": m, "gen_ppl": p, "empty_rate": e, "nfe": n}
            for s, m, p, e, n in [({"remasking": "low_confidence", "block_length": None, "eos": "as trained"}, .9, 5.0,
                                   .9, 10), ({"remasking": "low_confidence", "block_length": None, "eos": "as trained"},
                                             .9, 5.0, .9, 20),
                                  ({"remasking": "low_confidence", "block_length": 32, "eos": "as trained"}, .4, 9.0,
                                   0.0, 40), ({"remasking": "low_confidence", "block_length": 32, "eos": "as trained"},
                                              .6, float("nan"), 0.2, 60)]]
    best, summaries = B.choose_configuration(rows)
    assert best["setting"] == {"remasking": "low_confidence", "block_length": 32, "eos": "as trained"}  # one block
    # collapses (mean empty 0.9): the semi-AR blocks win on their mean MAUVE 0.5, NFE 50, Gen-PPL of the finite one
    assert (best["mauve"], best["nfe"], best["gen_ppl"], best["rules"]) == (pytest.approx(0.5), 50, 9.0, 2)
    assert len(summaries) == 2


def test_choose_skips_collapsed_settings_then_mauve_then_gen_ppl():
    rows = [{"label": "collapsed", "mauve": 0.9, "gen_ppl": 2.0, "empty_rate": 0.8},
            {"label": "a", "mauve": 0.5, "gen_ppl": 300.0, "empty_rate": 0.1},
            {"label": "b", "mauve": 0.5001, "gen_ppl": 200.0, "empty_rate": 0.0},
            {"label": "c", "mauve": 0.4, "gen_ppl": 10.0, "empty_rate": 0.0}]
    assert B.choose(rows)["label"] == "b"  # a and b tie on MAUVE (3 decimals): the lower Gen-PPL
    assert B.choose(rows[:1])["label"] == "collapsed"  # nothing qualifies: the best of all


def test_read_base_decoding_errors_name_the_fix(tmp_path):
    path = tmp_path / "base-decoding.json"
    path.write_text(json.dumps({"results": {"rows": []}}))
    with pytest.raises(ValueError, match="no 'chosen' settings"):
        B.read_base_decoding(path)
    path.write_text(json.dumps({"results": {"chosen": {"64": {"remasking": "greedy", "block_length": None,
                                                               "eos": "never"}}}}))
    with pytest.raises(ValueError, match="remasking in"):
        B.read_base_decoding(path)
    good = {"remasking": "random", "block_length": 32, "eos": "never"}
    path.write_text(json.dumps({"results": {"chosen": {"64": good}}}))
    assert B.read_base_decoding(path) == {64: good}


class EosLover(torch.nn.Module):
    """A tiny demasker whose EOS logit is raised by 50: undisturbed, it writes EOS everywhere."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner = Demasker(DemaskerConfig.tiny(vocab_size=40, d_model=32, mask_token_id=39, eos_token_id=38,
                                                  bos_token_id=37, pad_token_id=38))
        self.cfg = self.inner.cfg

    def forward(self, x, **kwargs):
        logits = self.inner(x, **kwargs)
        logits[..., self.cfg.eos_token_id] += 50.0
        return logits


def test_adaptive_base_rows_take_the_adaptive_choice(tmp_path):
    """speed's base threshold / factor rows: --base-decoding's "chosen_adaptive" (a file without it, written
    before it existed, gives them its "chosen"), the fixed rows its "chosen"."""
    from experiments.eval_generation import method_sampler
    model = EosLover()
    path = tmp_path / "base-decoding.json"
    fixed = {"remasking": "random", "block_length": 8, "eos": "as trained"}
    never = {"remasking": "low_confidence", "block_length": 8, "eos": "never"}
    cache = {}
    ctx = SimpleNamespace(args=SimpleNamespace(base_decoding=str(path), remasking="low_confidence", rng="fast"),
                          base=lambda folder=None: model, get=lambda name: None,
                          cached=lambda key, build: cache.setdefault(key, build()))
    path.write_text(json.dumps({"results": {"chosen": {"16": fixed}, "chosen_adaptive": {"16": never}}}))
    assert B.base_setting(ctx, 16) == fixed and B.base_setting(ctx, 16, adaptive=True) == never
    threshold = Decoding(rule="threshold", threshold=0.9)
    out, nfe = method_sampler(ctx, "base", 16, 16, 1.0, decoding=threshold)(range(3), torch.Generator(), None)
    assert not (out == 38).any() and nfe["nfe"] == 16  # EOS never: the chosen_adaptive setting reached it
    out, _ = method_sampler(ctx, "base", 16, 16, 1.0)(range(3), torch.Generator(), None)
    assert (out == 38).all()  # the fixed rows: "chosen" (EOS as trained)
    cache.clear()
    path.write_text(json.dumps({"results": {"chosen": {"16": fixed}}}))
    assert B.base_setting(ctx, 16, adaptive=True) == fixed


def test_method_sampler_decodes_the_base_with_the_chosen_setting(tmp_path):
    from experiments.eval_generation import method_sampler
    model = EosLover()
    path = tmp_path / "base-decoding.json"

    def tokens(eos):
        path.write_text(json.dumps({"results": {"chosen": {"16": {"remasking": "random", "block_length": 8,
                                                                   "eos": eos}}}}))
        cache = {}
        ctx = SimpleNamespace(args=SimpleNamespace(base_decoding=str(path), remasking="low_confidence", rng="fast"),
                              base=lambda folder=None: model, get=lambda name: None,
                              cached=lambda key, build: cache.setdefault(key, build()))
        out, nfe = method_sampler(ctx, "base", 16, 16, 1.0)(range(3), torch.Generator().manual_seed(0), None)
        assert nfe == {"nfe": 16.0, "nfe_flops": 16.0, "demasker_calls": 16.0}
        return out
    assert (tokens("as trained") == 38).all()
    assert not (tokens("never") == 38).any()  # logits_eos_inf reached the sampler
    ctx = SimpleNamespace(args=SimpleNamespace(base_decoding=str(path), remasking="random", rng="fast"),
                          get=lambda name: None, cached=lambda key, build: build())
    with pytest.raises(ValueError, match="--lengths 32"):
        B.base_setting(ctx, 32)


@pytest.mark.parametrize("rng", ["fast", "llada"])
def test_every_method_samples_with_the_same_token_draw(monkeypatch, tmp_path, rng):
    """--rng reaches the base and the guided samplers alike: a guided method left on LLaDA's full float64
    Gumbel noise while the base drew at its candidates only was 3.6x slower per step (T = 1, V = 2048), which
    understated the guided methods' wall-clock speedups."""
    import generators
    import sample
    from experiments.eval_generation import method_sampler
    path = tmp_path / "base-decoding.json"
    path.write_text(json.dumps({"results": {"chosen": {"16": {"remasking": "random", "block_length": None,
                                                               "eos": "never"}}}}))
    seen = {}

    def fake_generate(model, batch, length, *args, decoding=None, **kwargs):
        seen["base"] = decoding
        return torch.zeros(batch, length, dtype=torch.long), 16

    def fake_guided(name):
        def run(demasker, first_prior, batch, length, *args, decoding=None, **kwargs):
            seen[name] = decoding
            return torch.zeros(batch, length, dtype=torch.long), {"nfe": 16.0, "demasker_calls": 16}
        return run
    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(generators, "conthendisc", fake_guided("conthendisc"))
    monkeypatch.setattr(generators, "conwithindisc", fake_guided("conwithindisc"))
    ctx = SimpleNamespace(args=SimpleNamespace(base_decoding=str(path), remasking="low_confidence", rng=rng,
                                               refresh_prior_steps=None),
                          base=lambda folder=None: None, ae=lambda: (None, None), get=lambda name: None,
                          cached=lambda key, build: build())
    for method in ("base", "conthendisc", "conwithindisc"):
        method_sampler(ctx, method, 16, 16, 1.0)(range(2), None, None)
    assert {name: d.rng for name, d in seen.items()} == {"base": rng, "conthendisc": rng, "conwithindisc": rng}
    assert seen["base"].logits_eos_inf and not seen["conthendisc"].logits_eos_inf  # the base's own EOS mode only


def test_guided_samplers_read_the_first_keep_registers(monkeypatch):
    """--keep K (every length) or L=K (one length) reaches ConThenDisc and ConWithinDisc: a prior over all of the
    encoder's registers feeds the demasker the paper's K, not all of them (default None: all the prior models)."""
    import generators
    from experiments.eval_generation import method_sampler
    seen = {}

    def fake(name):
        def run(*args, keep=None, **kwargs):
            seen[name] = keep
            return torch.zeros(2, 16, dtype=torch.long), {"nfe": 16.0, "demasker_calls": 16}
        return run
    monkeypatch.setattr(generators, "conthendisc", fake("conthendisc"))
    monkeypatch.setattr(generators, "conwithindisc", fake("conwithindisc"))
    for keep, length, wanted in ((None, 16, None), ([(None, 2)], 16, 2), ([(None, 2), (16, 3)], 16, 3),
                                 ([(32, 3)], 16, None)):
        ctx = SimpleNamespace(args=SimpleNamespace(remasking="low_confidence", rng="fast", keep=keep),
                              ae=lambda: (None, None), get=lambda name: None)
        for method in ("conthendisc", "conwithindisc"):
            method_sampler(ctx, method, length, 16, 1.0)(range(2), None, None)
        assert seen == {"conthendisc": wanted, "conwithindisc": wanted}


def test_base_decoding_subcommand(runs):  # noqa: F811
    root, _ = runs
    result = _run(runs, "base-decoding", "--lengths", "32", "--blocks", "8", "--fig6-num", "2", "--bootstrap", "0",
                  "--thresholds", "0.5", "--factors", "1")
    rows = result["lengths"]["32"]["rows"]
    assert len(rows) == 12 and all(r["nfe"] == 32 for r in rows)
    assert all(0 <= r["mauve"] <= 1 and 0 <= r["empty_rate"] <= 1 for r in rows)
    selection = result["lengths"]["32"]["selection"]
    assert selection["split"] == "val" and selection["skipped"] == 4  # fig6 with n = 2: reference 2 + ceiling 2
    assert result["chosen"]["32"] in [r["setting"] for r in rows]
    assert B.read_base_decoding(root / "results" / "base-decoding.json") == {32: result["chosen"]["32"]}
    adaptive = result["lengths"]["32"]["adaptive_rows"]  # --thresholds 0.5 and --factors 1: 2 rules x 2 blocks x 2
    assert len(adaptive) == 8 and {r["setting"]["block_length"] for r in adaptive} == {None, 8}
    assert all(1 <= r["nfe"] <= 32 and 0 <= r["mauve"] <= 1 for r in adaptive)  # the NFE measured per sample
    chosen = result["chosen_adaptive"]["32"]
    assert chosen in [c["setting"] for c in result["lengths"]["32"]["adaptive_configurations"]]
    assert B.read_base_decoding(root / "results" / "base-decoding.json", "chosen_adaptive") == {32: chosen}
    speed = _run(runs, "speed", "--length", "32", "--nfe", "32", "--thresholds", "0.5", "--methods",
                 "--timing-repeats", "0", "--base-decoding", str(root / "results" / "base-decoding.json"))
    settings = {r["decoding"]: r["setting"] for r in speed["rows"]}
    assert settings == {"fixed": result["chosen"]["32"], "threshold 0.5": chosen, "factor 1.0": chosen}
    fig6 = _run(runs, "fig6", "--lengths", "32", "--nfe", "32", "--base-decoding",
                str(root / "results" / "base-decoding.json"))
    assert [r["method"] for r in fig6["lengths"]["32"]["rows"]][0] == "base"


def test_selection_set_is_disjoint_from_fig6_references(runs):  # noqa: F811
    """fig6 at n takes the first min(2n, available) held-out programs; the selection set the next val ones, or the
    training split's last ones when the held-out programs are used up (the tiny preset: n = 256)."""
    import eval as E
    from experiments.eval_context import Context
    root, common = runs

    def context(*extra):
        return Context(E.parse_args(["base-decoding", *common, "--out", str(root / "results"), *extra]))
    ctx = context("--fig6-num", "3")
    texts, info = B.selection_set(ctx, 32, 5)
    fig6_programs = ctx.held_out(6, 32)["texts"]
    assert info["split"] == "val" and texts == ctx.held_out(5, 32, skip=6)["texts"]
    assert not set(texts) & set(fig6_programs)
    texts, info = B.selection_set(context(), 32, 5)
    assert info["split"] == "train" and len(texts) == 5
    assert not set(texts) & set(ctx.held_out(ctx.held_out_count(32), 32)["texts"])
    with pytest.raises(ValueError, match="--selection-split train"):
        B.selection_set(context("--selection-split", "val"), 32, 5)
