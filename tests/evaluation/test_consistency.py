"""Tests for evaluation/consistency.py: agreement and copy of a conditional prior, on tiny random models whose
answers are known exactly: a prior that ignores its condition gives the blank rows, one that copies h_phi(x)
gives the oracle's copy row."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import generators as G
from demasker import Demasker, DemaskerConfig
from evaluation import consistency as C
from latent_dit import DiTConfig
from tiny_models import D, K, random_dit, tiny_encoder

L = 24


class Copier(nn.Module):
    """A conditional 'DiT' that predicts its condition's first K registers: given h_phi(x) it draws h_phi(x)."""

    def __init__(self):
        super().__init__()
        self.cfg = DiTConfig.tiny(register_dim=D, num_registers=K, cond_dim=D)
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, z_t, t, cond=None, cond_mask=None):
        return cond[:, :K].to(z_t.dtype) * self.scale


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    demasker = Demasker(DemaskerConfig.tiny(register_dim=D, max_registers=K)).eval()
    cfg = demasker.cfg
    encoder = tiny_encoder(cfg, seed=1)
    rng = np.random.default_rng(0)
    lengths = torch.tensor([L, 10, 17, 3, 12])
    ids = torch.full((len(lengths), L), cfg.eos_token_id, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):  # BOS program EOS, padded with EOS
        ids[row, 0] = cfg.bos_token_id
        ids[row, 1:length - 1] = torch.from_numpy(rng.integers(0, 400, length - 2))
    oracle = encoder(ids, attention_mask=torch.arange(L)[None, :] < lengths[:, None])[:, :K].float()
    return demasker, encoder, ids, lengths, oracle


def measure(setup, cond_dit, prior=None, **kwargs):
    demasker, encoder, ids, lengths, oracle = setup
    cond_prior = G.Prior(cond_dit, K, max_offset=0.2, encoder=encoder)
    settings = dict(steps=6, prior_steps=3, refresh_prior_steps=3, bootstrap=20, batch_size=2)
    return C.measure(demasker, cond_prior, ids, lengths, oracle, prior=prior, **{**settings, **kwargs})


def test_a_prior_that_ignores_its_condition_gives_the_blank_rows(setup):
    """A conditional DiT whose cross-attention outputs zero (a fresh one) draws the same registers whatever the
    canvas: every conditional row equals the blank row, the gain is 0 exactly; the unconditional row is there."""
    prior = G.Prior(random_dit(3), K, max_offset=0.2)
    result = measure(setup, random_dit(2, conditional=True), prior=prior)
    assert result["shares"] == list(C.SHARES) and result["num_programs"] == 5 and result["cer_unit"] == "tokens"
    for r in C.SHARES:
        conditional, blank = C.row_of(result, "agreement", "conditional", r), C.row_of(result, "agreement", "blank", r)
        assert conditional["agreement"] == blank["agreement"] and conditional["gain"] == 0.0
        assert conditional["gain_ci"] == [0.0, 0.0] and 0 <= conditional["agreement"] <= 1
        assert C.row_of(result, "agreement", "unconditional", r) is not None
    copy = {row["source"]: row for row in result["copy"]}
    assert list(copy) == ["oracle", "conditional", "blank", "unconditional"]
    assert {k: v for k, v in copy["conditional"].items() if k != "source"} == \
        {k: v for k, v in copy["blank"].items() if k != "source"}
    assert copy["oracle"]["cosine"] == pytest.approx(1.0) and copy["oracle"]["mse"] == pytest.approx(0.0, abs=1e-9)
    assert copy["conditional"]["cosine"] < 0.9 and copy["conditional"]["mse"] > 0.1
    lo, hi = copy["conditional"]["cer_ci"]
    assert lo <= copy["conditional"]["cer"] <= hi


def test_a_prior_that_copies_h_phi_gives_the_oracle_copy_row(setup):
    """Given the clean program the copier draws h_phi(x) itself: cosine 1, MSE 0, and the decoding, agreement and
    CER of the oracle exactly; given a masked canvas it draws something else."""
    result = measure(setup, Copier())
    copy = {row["source"]: row for row in result["copy"]}
    assert copy["conditional"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert copy["conditional"]["mse"] == pytest.approx(0.0, abs=1e-6)
    assert copy["conditional"]["cer"] == copy["oracle"]["cer"]
    assert copy["conditional"]["agreement"] == copy["oracle"]["agreement"]
    assert 0 < copy["blank"]["mse"]


def test_revealed_shares_are_nested_and_sized(setup):
    """One set of uniforms: the share of revealed program positions grows with r, near r over the programs."""
    result = measure(setup, random_dit(2, conditional=True), shares=(0.1, 0.5, 0.9), bootstrap=0)
    revealed = [C.row_of(result, "agreement", "oracle", r)["revealed"] for r in (0.1, 0.5, 0.9)]
    assert revealed == sorted(revealed) and revealed[0] < 0.35 and revealed[-1] > 0.65
    row = C.row_of(result, "agreement", "conditional", 0.1)
    assert row["agreement_ci"] is None and 1 <= row["programs"] <= 5  # the 3-token program may show nothing
    assert result["bootstrap"] == 0 and "r=0.1" in C.summary_line(result)


def test_the_same_seed_gives_the_same_numbers_and_texts_give_characters(setup):
    first = measure(setup, random_dit(2, conditional=True, reads_condition=True), seed=4)
    assert first == measure(setup, random_dit(2, conditional=True, reads_condition=True), seed=4)
    texts = measure(setup, random_dit(2, conditional=True), to_text=lambda rows: [" ".join(map(str, r)) for r in
                                                                                   rows.tolist()])
    assert texts["cer_unit"] == "characters" and all(row["cer"] >= 0 for row in texts["copy"])


def test_agreement_and_token_error_rate_by_hand():
    x = torch.tensor([[9, 4, 5, 6, 1, 1], [9, 7, 1, 1, 1, 1]])
    decoded = torch.tensor([[9, 4, 0, 6, 1, 3], [9, 8, 8, 1, 1, 1]])
    revealed = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    values = C.agreement(decoded, x, revealed)
    assert values[0] == pytest.approx(2 / 3) and math.isnan(values[1])
    # programs 4 5 6 and 7 (between BOS and EOS) against the decodings up to their first EOS: 4 0 6 and 8 8
    rates = C.error_rates(x, decoded, torch.tensor([5, 3]), eos_id=1)
    assert rates.tolist() == [pytest.approx(1 / 3), 2.0]


def test_mismatched_inputs_are_refused_with_the_fix(setup):
    demasker, encoder, ids, lengths, oracle = setup
    cond_prior = G.Prior(random_dit(2, conditional=True), K, encoder=encoder)
    with pytest.raises(ValueError, match="train_prior.py --conditional"):
        C.measure(demasker, G.Prior(random_dit(3), K), ids, lengths, oracle)
    with pytest.raises(ValueError, match=r"shares must lie in \(0, 1\)"):
        C.measure(demasker, cond_prior, ids, lengths, oracle, shares=(0.5, 1.0))
    with pytest.raises(ValueError, match="first K registers"):
        C.measure(demasker, cond_prior, ids, lengths, oracle[:, :4])
    with pytest.raises(ValueError, match="same n"):
        C.measure(demasker, cond_prior, ids, lengths[:2], oracle)


# ------------------------------------------------------------------------------------------------
# The confidence-ordered canvas: the x_t ConWithinDisc's refresh reads
# ------------------------------------------------------------------------------------------------


def test_the_confidence_canvas_is_the_canvas_conwithindisc_refreshes_on(setup):
    """Given ConThenDisc's first registers (the same prior noise), the canvas taken before step round(r x steps) is
    token for token the x_t that generators.conwithindisc hands its redraw at refresh_at = (r,)."""
    demasker, encoder, ids, lengths, _ = setup
    prior = G.Prior(random_dit(3), K, max_offset=0.2)
    cond_prior = G.Prior(random_dit(2, conditional=True), K, max_offset=0.2, encoder=encoder)
    seen = {}
    for r in (0.25, 0.5):
        G.conwithindisc(demasker, cond_prior, 3, gen_length=L, steps=8, temperature=0.0, prior=prior, prior_steps=3,
                        refresh_at=(r,), refresh_prior_steps=3, prior_generator=torch.Generator().manual_seed(11),
                        on_refresh=lambda step, x, old, new, r=r: seen.setdefault(r, (step, x.clone())))
    first = G.sample_registers(prior, 3, 3, generator=torch.Generator().manual_seed(11))[0]
    taken = C.confidence_canvases(demasker, first, L, 8, [0.25, 0.5], demasker.cfg.mask_token_id)
    for r in (0.25, 0.5):
        assert seen[r][0] == C.share_step(r, 8) and torch.equal(taken[r], seen[r][1])
    revealed = {r: taken[r] != demasker.cfg.mask_token_id for r in taken}
    assert (revealed[0.25] <= revealed[0.5]).all() and revealed[0.25].sum() < revealed[0.5].sum()
    assert torch.equal(taken[0.25][revealed[0.25]], taken[0.5][revealed[0.25]])  # revealed tokens never change


def test_confidence_rows_with_a_prior_score_conthendiscs_own_canvas(setup):
    """On ConThenDisc's canvas the registers it keeps agree with it fully; a prior that ignores its condition gains
    nothing over blank; only the asked canvas is measured, and the source that ordered it is named."""
    prior = G.Prior(random_dit(3), K, max_offset=0.2)
    result = measure(setup, random_dit(2, conditional=True), prior=prior, canvas="confidence", steps=8)
    assert result["canvases"] == ["confidence"] and result["confidence_order"] == "unconditional"
    assert {row["canvas"] for row in result["agreement"]} == {"confidence"}
    for r in C.SHARES:
        assert C.row_of(result, "agreement", "conditional", r) is None  # no random rows
        rows = {s: C.row_of(result, "agreement", s, r, "confidence") for s in C.SOURCES}
        assert rows["oracle"] is None and rows["unconditional"]["agreement"] == 1.0
        assert rows["conditional"]["gain"] == 0.0 and 0 < rows["conditional"]["revealed"] <= 1
    assert "confidence-canvas agreement (conditional/blank/unconditional)" in C.summary_line(result)


def test_confidence_rows_without_a_prior_order_the_program_by_the_oracle(setup):
    """Without an unconditional prior the oracle registers order the canvas of x: their decoding was the ordering,
    so the oracle row is scored against x like the random canvas; asking for both canvases leaves the random rows
    as canvas="random" gives them, and the share of the program revealed grows with r."""
    dit = random_dit(2, conditional=True, reads_condition=True)
    both = measure(setup, dit, canvas="both", steps=8, bootstrap=0)
    random_only = measure(setup, dit, canvas="random", steps=8, bootstrap=0)
    assert both["canvases"] == ["random", "confidence"] and both["confidence_order"] == "oracle"
    assert [r for r in both["agreement"] if r["canvas"] == "random"] == random_only["agreement"]
    assert both["copy"] == random_only["copy"] and random_only["confidence_order"] is None
    rows = [C.row_of(both, "agreement", "oracle", r, "confidence") for r in C.SHARES]
    assert [row["revealed"] for row in rows] == sorted(row["revealed"] for row in rows)
    assert all(0 <= row["agreement"] <= 1 for row in rows)
    assert C.row_of(both, "agreement", "unconditional", 0.5, "confidence") is None


def test_a_confidence_canvas_outside_the_decoding_is_refused(setup):
    """A share whose canvas would be taken before step 0 (nothing revealed) or at the end is refused with the fix."""
    with pytest.raises(ValueError, match="raise --steps"):
        measure(setup, random_dit(2, conditional=True), canvas="confidence", steps=4, shares=(0.1,))
    with pytest.raises(ValueError, match="'random', 'confidence' or 'both'"):
        measure(setup, random_dit(2, conditional=True), canvas="ordered")
