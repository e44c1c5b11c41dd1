"""The decoding options of mdm.py's loop (extensions/decoding.py): adaptive parallel rules, the fast random
stream, register and classifier-free guidance, EOS controls. (LLaDA parity of the loop: tests/test_sample.py.)"""


import pytest
import torch
import torch.nn as nn

import mdm as M
from test_sample import MASK, V, TinyMixer

EOS = 0


class FixedLogits(nn.Module):
    """The same logits (V,) at every position; records what it was called with."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32), requires_grad=False)
        self.seen = []

    def forward(self, x, registers=None, register_mask=None, attention_mask=None):
        self.seen.append((x.clone(), None if register_mask is None else register_mask.clone()))
        return self.logits.expand(*x.shape, -1).clone()


def test_threshold_above_one_reveals_exactly_the_most_confident_token_per_step():
    model = TinyMixer(seed=3)
    stats = {}
    fixed, nfe_fixed = M.generate(model, 2, 16, 16, 16, mask_id=MASK)  # one token per step, top-1 confidence
    adaptive, nfe = M.generate(model, 2, 16, 16, 16, mask_id=MASK,
                               decoding=M.Decoding(rule="threshold", threshold=1.01), stats=stats)
    assert torch.equal(fixed, adaptive) and nfe == nfe_fixed == 16
    assert stats["tokens_per_step"] == [1.0] * 16 and stats["nfe_per_sample"] == [16, 16]


def test_threshold_zero_reveals_a_block_in_one_step():
    model = TinyMixer(seed=4)
    stats = {}
    out, nfe = M.generate(model, 3, 24, 8, 24, mask_id=MASK, decoding=M.Decoding(rule="threshold", threshold=0.0),
                          stats=stats)
    assert nfe == 3 and stats["tokens_per_step"] == [8.0, 8.0, 8.0] and (out != MASK).all()
    with torch.no_grad():  # the first block is the greedy prediction from the all-[M] canvas
        first = model(torch.full((3, 24), MASK)).argmax(-1)
    assert torch.equal(out[:, :8], first[:, :8])


def test_factor_rule_on_known_probabilities():
    p = torch.tensor([[0.99, 0.95, 0.7, 0.2, 0.0]])
    candidates = torch.tensor([[True, True, True, True, False]])
    # (n + 1)(1 - p_(n)) < f: n=1: 2*0.01=0.02, n=2: 3*0.05=0.15, n=3: 4*0.3=1.2, n=4: 5*0.8=4
    assert M.choose_adaptive(p, candidates, "factor", 0.9, 1.0).tolist() == [[True, True, False, False, False]]
    assert M.choose_adaptive(p, candidates, "factor", 0.9, 2.0).tolist() == [[True, True, True, False, False]]
    assert M.choose_adaptive(p, candidates, "factor", 0.9, 0.001).tolist() == [[True, False, False, False, False]]
    assert M.choose_adaptive(p, candidates, "threshold", 0.9, 1.0).tolist() == [[True, True, False, False, False]]
    none = torch.zeros_like(candidates)
    assert not M.choose_adaptive(p, none, "threshold", 0.5, 1.0).any()  # a finished row reveals nothing


def test_adaptive_nfe_per_sample_counts_only_rows_still_decoding():
    # row 0 is all very confident (one step), row 1 flat (one token per step at tau = 0.9)
    class TwoRows(nn.Module):
        def forward(self, x, registers=None, register_mask=None, attention_mask=None):
            logits = torch.zeros(*x.shape, V)
            logits[0, :, 5] = 50.0
            return logits
    stats = {}
    out, nfe = M.generate(TwoRows(), 2, 6, 6, 6, mask_id=MASK, decoding=M.Decoding(rule="threshold", threshold=0.9),
                          stats=stats)
    assert stats["nfe_per_sample"] == [1, 6] and nfe == 6 and (out != MASK).all()


@pytest.mark.parametrize("rng", ["fast", "llada"])
def test_sampling_frequencies_match_the_softmax(rng):
    """Gumbel-max at temperature 1 draws from softmax(logits): a chi-square test on 6000 one-token draws."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0] + [-1e4] * (V - 4))
    model = FixedLogits(logits)
    out, _ = M.generate(model, 6000, 1, 1, 1, temperature=1.0, mask_id=MASK, generator=torch.Generator().manual_seed(0),
                        decoding=M.Decoding(rng=rng))
    counts = torch.bincount(out[:, 0], minlength=V)[:4].double()
    expected = torch.softmax(logits[:4].double(), 0) * 6000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert counts.sum() == 6000 and chi2 < 16.3  # 3 degrees of freedom, p = 0.001


def test_fast_rng_draws_less_and_differs_only_in_the_stream():
    model = TinyMixer(seed=5)
    g_fast, g_exact = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    fast, _ = M.generate(model, 2, 8, 8, 4, temperature=1.0, mask_id=MASK, generator=g_fast, decoding=M.Decoding())
    exact, _ = M.generate(model, 2, 8, 8, 4, temperature=1.0, mask_id=MASK, generator=g_exact, decoding=M.LLADA)
    assert (fast != MASK).all() and (exact != MASK).all()
    assert g_fast.initial_seed() == g_exact.initial_seed()
    assert not torch.equal(g_fast.get_state(), g_exact.get_state())  # fewer numbers drawn


def test_register_guidance_weight_one_is_plain_guided_decoding_and_zero_is_the_null_bank():
    model = TinyMixer(seed=6)
    registers = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(2))
    plain, nfe_plain = M.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=registers)
    same, nfe_same = M.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=registers, decoding=M.Decoding(guidance=1.0))
    assert torch.equal(plain, same) and nfe_plain == nfe_same == 6
    null_only, _ = M.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=registers,
                              register_mask=torch.zeros(2, 3, dtype=torch.bool))
    w0, nfe0 = M.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=registers, decoding=M.Decoding(guidance=0.0))
    assert torch.equal(w0, null_only) and nfe0 == 12  # two branches per step
    w3, _ = M.generate(model, 2, 12, 12, 6, mask_id=MASK, registers=registers, decoding=M.Decoding(guidance=3.0))
    assert (w3 != MASK).all() and not torch.equal(w3, plain)


def test_cfg_masks_the_prompt_in_the_unconditional_branch_and_follows_llada_formula():
    model = TinyMixer(seed=7)
    prompt = torch.tensor([[3, 4, 5], [6, 7, 8]])
    plain, _ = M.generate(model, prompt, 8, 8, 4, mask_id=MASK)
    cfg0, _ = M.generate(model, prompt, 8, 8, 4, mask_id=MASK, decoding=M.Decoding(cfg_scale=0.0))
    assert torch.equal(plain, cfg0)
    x = torch.cat([prompt, torch.full((2, 8), MASK)], 1)
    with torch.no_grad():
        cond = model(x)
        un_x = x.clone()
        un_x[:, :3] = MASK
        expected = model(un_x) + 2.5 * (cond - model(un_x))  # LLaDA: un + (cfg + 1)(cond - un)
        got = M.guided_logits(model, x, 3, MASK, None, None, None, M.Decoding(cfg_scale=1.5))
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs a prompt"):
        M.generate(model, 2, 8, 8, 4, mask_id=MASK, decoding=M.Decoding(cfg_scale=1.0))


class Positional(nn.Module):
    """Positions 0-2 predict token 9 (p ~ 0.73), positions 3-5 predict EOS (p ~ 0.98): EOS is more confident."""

    cfg = type("Cfg", (), {"eos_token_id": EOS, "mask_token_id": MASK})()

    def forward(self, x, registers=None, register_mask=None, attention_mask=None):
        logits = torch.full((6, V), -5.0)
        logits[:3, 9], logits[:3, EOS] = 4.0, 3.0
        logits[3:, 9], logits[3:, EOS] = 1.0, 5.0
        return logits.expand(x.shape[0], -1, -1).clone()


def _first_step_positions(decoding):
    x = torch.full((1, 6), MASK)
    model = Positional()
    new, _ = M.reveal_step(x, model(x), 6, [2], 0.0, "low_confidence", MASK, decoding=decoding, eos_ids=(EOS,))
    return set((new[0] != MASK).nonzero().flatten().tolist())


def test_eos_controls_act_on_the_choice():
    plain, _ = M.generate(Positional(), 1, 6, 6, 3)
    assert plain.tolist() == [[9, 9, 9, EOS, EOS, EOS]]
    never, _ = M.generate(Positional(), 1, 6, 6, 3, decoding=M.Decoding(logits_eos_inf=True))
    assert never.tolist() == [[9] * 6]
    last = M.Decoding(confidence_eos_eot_inf=True)
    ranked, _ = M.generate(Positional(), 1, 6, 6, 3, decoding=last)
    assert ranked.tolist() == plain.tolist()  # the same tokens in the end, revealed in another order:
    assert _first_step_positions(M.Decoding()) <= {3, 4, 5}  # the confident EOS first
    assert _first_step_positions(last) <= {0, 1, 2}  # EOS predictions last
    # the adaptive rules: an EOS prediction passes no threshold
    x = torch.full((1, 6), MASK)
    new, _ = M.reveal_step(x, Positional()(x), 6, None, 0.0, "low_confidence", MASK,
                           decoding=M.Decoding(rule="threshold", threshold=0.5, confidence_eos_eot_inf=True),
                           eos_ids=(EOS,))
    assert new.tolist() == [[9, 9, 9, MASK, MASK, MASK]]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_fast_draw_tempered_frequencies_and_untempered_probability(temperature):
    logits = torch.tensor([[1.5, 0.5, 0.0, -2.0]]).expand(8000, 4)
    predicted, probability = M.fast_draw(logits, temperature, torch.Generator().manual_seed(3))
    counts = torch.bincount(predicted, minlength=4).double()
    expected = torch.softmax(logits[0].double() / temperature, 0) * 8000
    assert float(((counts - expected) ** 2 / expected).sum()) < 16.3  # chi-square, 3 dof, p = 0.001
    assert torch.allclose(probability, torch.softmax(logits, -1).gather(-1, predicted[:, None]).squeeze(-1), atol=1e-6)
    greedy, p0 = M.fast_draw(logits[:2], 0.0)
    assert greedy.tolist() == [0, 0] and torch.allclose(p0, torch.softmax(logits[:2], -1)[:, 0])


def test_fast_draw_two_level_search_over_ragged_chunks():
    """V not a multiple of the chunk, mass in several chunks: frequencies follow the softmax."""
    logits = torch.full((20000, 11), -30.0)
    logits[:, [0, 4, 5, 10]] = torch.tensor([0.0, 1.0, -0.5, 0.5])
    predicted, _ = M.fast_draw(logits, 1.0, torch.Generator().manual_seed(4), chunk=4)
    counts = torch.bincount(predicted, minlength=11).double()
    assert counts[[1, 2, 3, 6, 7, 8, 9]].sum() == 0
    expected = torch.softmax(torch.tensor([0.0, 1.0, -0.5, 0.5], dtype=torch.float64), 0) * 20000
    assert float(((counts[[0, 4, 5, 10]] - expected) ** 2 / expected).sum()) < 16.3


# ------------------------------------------------------------------------------------------------
# Host-device syncs of the loop (what a GPU waits for; on CPU they are free, so they are counted here)
# ------------------------------------------------------------------------------------------------

SYNCS = {"nonzero", "tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the torch calls that make the host wait for the device: reading a value (item, tolist, bool,
    int, float), nonzero (its size depends on the data), indexing with a boolean mask, copies to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        if name in SYNCS or (isinstance(index, torch.Tensor) and index.dtype == torch.bool):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def demasker_with_registers():
    from demasker import Demasker, DemaskerConfig
    torch.manual_seed(0)
    model = Demasker(DemaskerConfig.tiny(n_layers=1, register_dim=16, max_registers=8)).eval()
    return model, torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("temperature, remasking, options", [
    (0.0, "low_confidence", {}), (1.0, "low_confidence", {}), (1.0, "random", {}),
    (0.0, "low_confidence", {"guidance": 2.0, "logits_eos_inf": True, "confidence_eos_eot_inf": True}),
    (0.0, "low_confidence", {"cache": "dual"})])
def test_the_fixed_rule_syncs_once_per_block_not_per_step(temperature, remasking, options):
    model, regs = demasker_with_registers()
    decoding = M.Decoding(**options)
    with SyncCounter() as counter:  # 2 blocks x 8 steps, the run's stats read at the end
        out, nfe = M.generate(model, 3, 32, 16, 16, temperature, remasking, registers=regs, decoding=decoding,
                              stats={})
    assert nfe == 16 * decoding.branches and (out != model.cfg.mask_token_id).all()
    assert len(counter.calls) == 2 + 2, counter.calls  # one per block (its schedule), two for the stats
    llada = SyncCounter()
    with llada:  # LLaDA's exact mode counts its candidates with nonzero at every step
        M.generate(model, 3, 32, 16, 16, temperature, remasking, registers=regs, decoding=M.LLADA)
    assert llada.calls.count("nonzero") == 16


def test_the_adaptive_rules_sync_once_per_step():
    model, regs = demasker_with_registers()
    with SyncCounter() as counter:
        out, nfe = M.generate(model, 3, 32, 16, 32, 0.0, registers=regs,
                              decoding=M.Decoding(rule="threshold", threshold=0.0))
    # threshold 0 reveals a block per step: each block one count to decode it, one to find it done
    assert nfe == 2 and len(counter.calls) == 4, counter.calls


def test_the_fast_stream_never_reveals_mask_even_when_the_model_prefers_it():
    logits = torch.zeros(V)
    logits[MASK] = 5.0  # [M] is the argmax everywhere
    out, _ = M.generate(FixedLogits(logits), 2, 8, 8, 4, mask_id=MASK, decoding=M.Decoding())
    assert (out != MASK).all()
    llada, _ = M.generate(FixedLogits(logits), 2, 8, 8, 4, mask_id=MASK, decoding=M.LLADA)
    assert (llada == MASK).all()  # LLaDA's generate() reveals the [M] it predicts: the canvas stays masked
