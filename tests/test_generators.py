"""Tests for generators.py: the latent DDIM sampler, ConThenDisc, ConWithinDisc and NFE accounting."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import generators as G
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig
from schedules import q_sample, register_times
from tiny_models import D, K, random_dit



class Counting(nn.Module):
    """Wraps a model, counts forward calls and records what it was given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.calls, self.seen = model, model.cfg, 0, []

    def forward(self, *args, **kwargs):
        self.calls += 1
        self.seen.append((args, kwargs))
        return self.model(*args, **kwargs)


class Oracle(nn.Module):
    """A denoiser that always predicts the given clean bank z0 (B, K, d)."""

    def __init__(self, z0):
        super().__init__()
        self.cfg = DiTConfig.tiny(register_dim=z0.shape[-1], num_registers=z0.shape[1])
        self.z0 = nn.Parameter(z0.clone(), requires_grad=False)
        self.times = []

    def forward(self, z_t, t, cond=None, cond_mask=None):
        self.times.append(t.clone())
        return self.z0.expand_as(z_t)


def unit_banks(B, seed=0):
    z = torch.randn(B, K, D, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(z, dim=-1) * math.sqrt(D)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    demasker = Demasker(DemaskerConfig.tiny(register_dim=D, max_registers=K)).eval()
    dcfg = demasker.cfg
    encoder = Encoder(EncoderConfig.tiny(vocab_size=dcfg.vocab_size, hidden_size=D, num_registers=K,
                                         pad_token_id=dcfg.pad_token_id, eos_token_id=dcfg.eos_token_id)).eval()
    prior = G.Prior(random_dit(1), K, max_offset=0.2)
    cond_prior = G.Prior(random_dit(2, conditional=True), K, max_offset=0.2, encoder=encoder)
    return demasker, prior, cond_prior


# ------------------------------------------------------------------------------------------------
# Latent sampler
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offsets", [True, False])
def test_ddim_with_oracle_returns_z0_from_noise_and_from_any_zt(offsets):
    z0 = unit_banks(3)
    prior = G.Prior(Oracle(z0), K, max_offset=0.3, block_offsets=offsets)
    out, calls = G.sample_registers(prior, 3, steps=7, generator=torch.Generator().manual_seed(1))
    assert calls == 7 and torch.allclose(out, z0, atol=1e-5)
    for t_start in (0.35, 0.8):  # a noisy bank at an intermediate base time, per-register times
        t = register_times(torch.full((3,), t_start), K, 0.3, offsets)
        z_t = q_sample(z0, t, torch.randn(3, K, D))
        out, _ = G.sample_registers(prior, 3, steps=5, z_init=z_t, t_start=t_start)
        assert torch.allclose(out, z0, atol=1e-5)


def test_sampler_times_follow_block_offsets_and_end_at_zero():
    z0 = unit_banks(2)
    oracle = Oracle(z0)
    steps, max_offset = 10, 0.3
    G.sample_registers(G.Prior(oracle, K, max_offset=max_offset), 2, steps=steps)
    times = torch.stack(oracle.times)  # (steps, B, K)
    assert times.shape == (steps, 2, K)
    assert torch.all(times[0] == 1.0)  # starts from pure noise everywhere
    assert torch.all((times >= 0) & (times <= 1))
    assert torch.all(times[:, :, 1:] >= times[:, :, :-1])  # later registers are never less noisy
    assert torch.all(times[1:] <= times[:-1])  # every register's time only goes down
    blocks = [[0], [1], [2, 3], [4, 5, 6, 7]]  # K = 8 -> blocks ending at the nested-dropout levels 1, 2, 4, 8
    for block in blocks:
        assert torch.all(times[..., block] == times[..., block[:1]])
    step = (1 + max_offset) / steps  # the grid runs from 1 to -max_offset
    mid = times[5, 0]
    assert torch.allclose(mid[[0, 1, 2, 4]], torch.tensor([1 - 5 * step + o for o in (0, 0.1, 0.2, 0.3)]), atol=1e-6)
    last = times[-1, 0]  # the last call: block 1 already at 0, the last block one step above 0
    assert last[0] == 0 and abs(last[-1].item() - step) < 1e-6
    flat = Oracle(z0)
    G.sample_registers(G.Prior(flat, K, max_offset=max_offset, block_offsets=False), 2, steps=steps)
    flat_times = torch.stack(flat.times)
    assert torch.all(flat_times == flat_times[..., :1])  # the ablation: one time for all registers
    assert torch.allclose(flat_times[:, 0, 0], torch.linspace(1, 0, steps + 1)[:-1], atol=1e-6)


def test_sampler_renormalises_each_register():
    prior = G.Prior(Oracle(unit_banks(2) * 3.0), K)
    out, _ = G.sample_registers(prior, 2, steps=3)
    assert torch.allclose(out.norm(dim=-1), torch.full((2, K), math.sqrt(D)), atol=1e-4)


def test_sampler_noise_comes_only_from_the_generator(models):
    _, prior, _ = models
    a, _ = G.sample_registers(prior, 2, steps=4, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG plays no part
    b, _ = G.sample_registers(prior, 2, steps=4, generator=torch.Generator().manual_seed(5))
    c, _ = G.sample_registers(prior, 2, steps=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------------
# h(x_t): the conditioning view of the canvas
# ------------------------------------------------------------------------------------------------


def test_embed_canvas_hides_masked_positions_and_padding(models):
    demasker, _, cond_prior = models
    cfg, encoder = demasker.cfg, cond_prior.encoder
    M, E = cfg.mask_token_id, cfg.eos_token_id
    x = torch.tensor([[cfg.bos_token_id, 5, M, 7, M, 9, E, E, E, E],
                      [cfg.bos_token_id, 5, 6, 7, 8, 9, 10, E, E, E]])
    cond, cond_mask = G.embed_canvas(encoder, x, M, E)
    assert cond_mask is None and cond.shape == (2, K, D)
    other = x.clone()
    other[0, [2, 4]] = torch.tensor([11, 12])  # what a masked position would become does not matter ...
    other[0, 8:] = M  # ... nor does anything after the first visible EOS
    other[0, 2], other[0, 4] = M, M
    assert torch.allclose(G.embed_canvas(encoder, other, M, E)[0], cond, atol=1e-5)
    changed = x.clone()
    changed[0, 3] = 13  # a visible token does
    assert not torch.allclose(G.embed_canvas(encoder, changed, M, E)[0][0], cond[0], atol=1e-3)
    clean = encoder(x[1:], attention_mask=torch.arange(10)[None] <= 7)  # nothing masked: plain h_phi(x_0)
    assert torch.allclose(cond[1:], clean, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# ConThenDisc and ConWithinDisc
# ------------------------------------------------------------------------------------------------


def run_both(models, refresh_at, temperature=1.0, **kwargs):
    demasker, prior, cond_prior = models
    settings = dict(gen_length=16, steps=8, temperature=temperature, prior_steps=6)
    torch.manual_seed(7)
    a, _ = G.conthendisc(demasker, prior, 3, **settings, prior_generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    b, report = G.conwithindisc(demasker, cond_prior, 3, **settings, prior=prior, refresh_at=refresh_at,
                                refresh_prior_steps=4, prior_generator=torch.Generator().manual_seed(1), **kwargs)
    return a, b, report


@pytest.mark.parametrize("refresh_at", [(), (0.0,)])
def test_conwithindisc_without_refresh_is_exactly_conthendisc(models, refresh_at):
    a, b, report = run_both(models, refresh_at)
    assert torch.equal(a, b)
    assert report["cond_prior_calls"] == 0 and report["encoder_calls"] == 0
    _, c, _ = run_both(models, (0.5,))
    assert not torch.equal(a, c)  # the refresh does change the output on this model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_both_generators_run_in_half_precision(models, dtype):
    """A GPU run keeps every model in bf16 / fp16: the conditional prior's condition (the encoder's view of
    x_t) must follow the DiT's dtype, and the tokens stay valid ids."""
    import copy
    demasker, prior, cond_prior = (copy.deepcopy(m) for m in models)
    demasker.to(dtype)
    prior.dit.to(dtype)
    cond_prior.dit.to(dtype)
    cond_prior.encoder.to(dtype)
    torch.manual_seed(7)
    x, report = G.conwithindisc(demasker, cond_prior, 2, gen_length=16, steps=8, temperature=1.0, prior_steps=4,
                                prior=prior, refresh_at=(0.5,), refresh_prior_steps=2,
                                prior_generator=torch.Generator().manual_seed(1))
    assert report["cond_prior_calls"] > 0 and report["encoder_calls"] > 0  # the refresh ran, in half precision
    assert x.dtype == torch.long and ((x >= 0) & (x < demasker.cfg.vocab_size)).all()
    z, _ = G.sample_registers(cond_prior, 2, steps=2, cond=torch.randn(2, 3, D), generator=torch.Generator())
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("refresh_at,expected_steps", [((0.5,), [4]), ((0.25, 0.75), [2, 6]), ((0.5, 0.5), [4])])
def test_refresh_changes_registers_at_the_configured_steps_only(models, refresh_at, expected_steps):
    demasker, prior, cond_prior = models
    counting = Counting(demasker)
    events = []
    g = torch.Generator().manual_seed(3)
    G.conwithindisc(counting, cond_prior, 2, gen_length=16, steps=8, prior=prior, prior_steps=5,
                    refresh_at=refresh_at, refresh_prior_steps=3, prior_generator=g,
                    on_refresh=lambda step, x, old, new: events.append((step, x.clone(), new.clone())))
    seen = [kwargs["registers"] for _, kwargs in counting.seen]
    assert len(seen) == 8
    changes = [i for i in range(1, 8) if not torch.equal(seen[i], seen[i - 1])]
    assert changes == expected_steps == [step for step, _, _ in events]
    # the redraw is the conditional prior given h(x_t) of the canvas at that step, with the next noise
    replay = torch.Generator().manual_seed(3)
    G.sample_registers(prior, 2, 5, generator=replay)  # the initial draw
    for step, x, new in events:
        assert int((x != demasker.cfg.mask_token_id).sum(1)[0]) == 2 * step  # 16 tokens / 8 steps
        cond, _ = G.embed_canvas(cond_prior.encoder, x, demasker.cfg.mask_token_id, demasker.cfg.eos_token_id)
        expected, _ = G.sample_registers(cond_prior, 2, 3, cond, generator=replay)
        assert torch.allclose(new, expected, atol=1e-6) and torch.equal(seen[step], new)


def test_refresh_steps_and_errors():
    assert G.refresh_steps([0.5], 32) == {16}
    assert G.refresh_steps([0.0, 0.25, 0.75], 8) == {2, 6}
    assert G.refresh_steps([0.01], 8) == set()  # rounds to step 0: nothing to refresh before
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        G.refresh_steps([1.0], 8)


def test_generators_reject_mismatched_priors(models):
    demasker, prior, cond_prior = models
    with pytest.raises(ValueError, match="unconditional"):
        G.conthendisc(demasker, cond_prior, 1, gen_length=8, steps=2)
    with pytest.raises(ValueError, match="conditional"):
        G.conwithindisc(demasker, prior, 1, gen_length=8, steps=2)
    separate = G.Prior(cond_prior.dit, K, encoder=cond_prior.encoder, shared_tokenizer=False)
    with pytest.raises(ValueError, match="cross-tokenizer view"):  # a two-tokenizer prior without its view
        G.conwithindisc(demasker, separate, 1, gen_length=8, steps=2)


# ------------------------------------------------------------------------------------------------
# NFE accounting
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_prior", [True, False])
def test_nfe_counts_equal_forward_calls(models, use_prior):
    demasker, prior, cond_prior = models
    dem = Counting(demasker)
    dit, cdit, enc = Counting(prior.dit), Counting(cond_prior.dit), Counting(cond_prior.encoder)
    counted_prior = G.Prior(dit, K, 0.2)
    counted_cond = G.Prior(cdit, K, 0.2, encoder=enc)
    _, report = G.conthendisc(dem, counted_prior, 2, gen_length=16, block_length=8, steps=6, prior_steps=5)
    assert (report["demasker_calls"], report["prior_calls"]) == (dem.calls, dit.calls) == (6, 5)
    dem.calls = dit.calls = 0
    _, report = G.conwithindisc(dem, counted_cond, 2, gen_length=16, block_length=8, steps=6,
                                prior=counted_prior if use_prior else None, prior_steps=5,
                                refresh_at=(0.3, 0.6), refresh_prior_steps=4)
    assert report["demasker_calls"] == dem.calls == 6
    assert report["prior_calls"] == dit.calls == (5 if use_prior else 0)
    assert report["cond_prior_calls"] == cdit.calls == 2 * 4 + (0 if use_prior else 5)
    assert report["encoder_calls"] == enc.calls == 2 + (0 if use_prior else 1)
    flops = (dit.calls * G.dit_flops(prior.dit.cfg, K) + cdit.calls * G.dit_flops(cond_prior.dit.cfg, K, K)
             + enc.calls * G.encoder_flops(cond_prior.encoder.cfg, 16))
    assert report["prior_equivalent_flops"] == pytest.approx(flops / G.demasker_flops(demasker.cfg, 16, K))
    assert report["nfe_flops"] == pytest.approx(6 + report["prior_equivalent_flops"])
    # the paper's count: calls x params / params(demasker)
    size = lambda m: sum(p.numel() for p in m.parameters())
    weighted = dit.calls * size(prior.dit) + cdit.calls * size(cond_prior.dit) + enc.calls * size(cond_prior.encoder)
    assert report["nfe_count"] == "params" and report["params"]["demasker"] == size(demasker)
    assert report["prior_equivalent"] == pytest.approx(weighted / size(demasker))
    assert report["nfe"] == pytest.approx(6 + report["prior_equivalent"])
    assert report["seconds_per_sample"] == pytest.approx(report["seconds"] / 2) and report["seconds"] > 0


def math_sdpa(q, k, v, attn_mask=None, is_causal=False, **_):
    """SDPA written with matmuls so that FlopCounterMode counts it (it skips the fused CPU kernel)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def counted_flops(model, *args, **kwargs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


def test_flop_formulas_match_torch_flop_counter(models, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", math_sdpa)
    demasker, prior, cond_prior = models
    ids = torch.randint(0, 500, (1, 12))
    assert counted_flops(demasker, ids) == G.demasker_flops(demasker.cfg, 12)
    assert counted_flops(demasker, ids, registers=torch.randn(1, 5, D)) == G.demasker_flops(demasker.cfg, 12, 5)
    assert counted_flops(cond_prior.encoder, ids) == G.encoder_flops(cond_prior.encoder.cfg, 12)
    t = torch.rand(1, K)
    assert counted_flops(prior.dit, torch.randn(1, K, D), t) == G.dit_flops(prior.dit.cfg, K)
    assert counted_flops(cond_prior.dit, torch.randn(1, K, D), t, torch.randn(1, 3, D)) == \
        G.dit_flops(cond_prior.dit.cfg, K, 3)


def test_paper_scale_prior_costs_about_what_the_paper_says():
    """App. G: one ConWithinDisc refresh adds < 2 to the NFE at L = 512 (LLaDA-8B, ~400M DiT, K = 8)."""
    demasker = DemaskerConfig.llada_8b_base()
    one_call = G.demasker_flops(demasker, 512, 8)
    prior = 128 * G.dit_flops(DiTConfig.paper(), 8)
    refresh = 32 * G.dit_flops(DiTConfig.paper(conditional=True), 8, 8) + \
        G.encoder_flops(EncoderConfig.qwen3_embedding_0_6b(num_registers=8), 512)
    assert 0.05 < prior / one_call < 0.2
    assert (prior + refresh) / one_call < 2


def test_paper_nfe_count_reproduces_the_papers_numbers():
    """Sec. 5 footnote 4: a 400M denoiser activated 128 times ~ 6 activations of the 8B demasker; the conditional
    one with 32 steps < 2; reported points 32 + 8 = 40 (L = 512) and 64 + 8 = 72 (L = 1024)."""
    nfe, prior = G.paper_nfe(0, 8e9, [(128, 400e6)])
    assert prior == pytest.approx(6.4) and round(prior) == 6
    _, cond = G.paper_nfe(0, 8e9, [(32, 400e6)])
    assert cond == pytest.approx(1.6) and cond < 2
    assert G.paper_nfe(32, 8e9, [(128, 400e6), (32, 400e6)])[0] == pytest.approx(40)
    assert G.paper_nfe(64, 8e9, [(128, 400e6), (32, 400e6)])[0] == pytest.approx(72)
    # with the real parameter counts of the public configs (built on the meta device: nothing allocated)
    llada = G.config_param_count(Demasker, DemaskerConfig.llada_8b_base())
    qwen = G.config_param_count(Encoder, EncoderConfig.qwen3_embedding_0_6b(num_registers=8))
    assert 7.9e9 < llada < 8.1e9 and 0.55e9 < qwen < 0.65e9
    assert qwen / llada < 0.08  # the encoder's one call per refresh adds < 0.08 to the NFE


def test_nfe_without_parameter_counts_falls_back_to_flops(models):
    demasker, prior, _ = models
    report = G.nfe_report(demasker.cfg, 16, K, 4, prior, 5)
    assert report["nfe_count"] == "flops" and report["nfe"] == report["nfe_flops"]


# ------------------------------------------------------------------------------------------------
# ConWithinDisc with two tokenizers (the paper's Qwen3 encoder / LLaDA demasker pair)
# ------------------------------------------------------------------------------------------------

PROGRAMS = ["def concatenate(a, b):\n    return a + b\n", "for item in items:\n    print(item)\n",
            "class Counter:\n    def increment(self):\n        self.count += 1\n"] * 3


@pytest.fixture(scope="module")
def two_tokenizers():
    from dataprep.data import train_tokenizer
    demasker_tok = train_tokenizer(PROGRAMS, vocab_size=320)
    encoder_tok = train_tokenizer(PROGRAMS[:1], vocab_size=264)  # splits the same words differently
    return demasker_tok, encoder_tok


def test_conwithindisc_with_two_tokenizers_end_to_end(two_tokenizers):
    from dataprep import cross_tokenizer as X
    demasker_tok, encoder_tok = two_tokenizers
    torch.manual_seed(0)
    demasker = Demasker(DemaskerConfig.tiny(vocab_size=demasker_tok.vocab_size, register_dim=D, max_registers=K,
                                            mask_token_id=demasker_tok.mask_id, eos_token_id=demasker_tok.eos_id,
                                            bos_token_id=demasker_tok.bos_id, pad_token_id=demasker_tok.eos_id)).eval()
    encoder = Counting(Encoder(EncoderConfig.tiny(vocab_size=encoder_tok.vocab_size, hidden_size=D, num_registers=K,
                                                  pad_token_id=encoder_tok.pad_id,
                                                  eos_token_id=encoder_tok.eos_id)).eval())
    view = X.make_view(demasker_tok, encoder_tok, texts=PROGRAMS)
    assert view.slots_per_token > 1.2
    seen = []
    inner = view

    def recording(ids, masked):
        out = inner(ids, masked)
        seen.append((ids.clone(), masked.clone(), out))
        return out

    cond_prior = G.Prior(random_dit(2, conditional=True), K, max_offset=0.2, encoder=encoder, shared_tokenizer=False,
                         view=recording)
    prior = G.Prior(random_dit(1), K, max_offset=0.2)
    events = []
    tokens, report = G.conwithindisc(demasker, cond_prior, 2, gen_length=24, steps=8, prior=prior, prior_steps=3,
                                     refresh_at=(0.5,), refresh_prior_steps=2,
                                     prior_generator=torch.Generator().manual_seed(0),
                                     on_refresh=lambda step, x, old, new: events.append((step, x.clone())))
    assert tokens.shape == (2, 24) and report["encoder_calls"] == 1 == len(seen) == len(events)
    ids, masked, (enc_ids, attention, hide) = seen[0]
    assert torch.equal(masked, ids == demasker_tok.mask_id) and int(masked.sum()) == 24  # half of 2 x 24 revealed
    assert bool((enc_ids < encoder_tok.vocab_size).all())  # the encoder got its own ids, never a demasker [M]
    (_, kwargs), = [call for call in encoder.seen]
    assert torch.equal(kwargs["hide"], hide) and torch.equal(kwargs["attention_mask"], attention)
    for b in range(2):  # what the encoder read is the view of that row
        expected, hidden = view.row(ids[b].tolist(), masked[b].tolist())
        n = len(expected)
        assert enc_ids[b, :n].tolist() == expected and hide[b, :n].tolist() == hidden


def test_load_prior_builds_the_recorded_view(tmp_path, two_tokenizers):
    import json
    from dataprep import cross_tokenizer as X
    demasker_tok, encoder_tok = two_tokenizers
    ae = tmp_path / "ae" / "checkpoint"
    encoder = Encoder(EncoderConfig.tiny(vocab_size=encoder_tok.vocab_size, hidden_size=D, num_registers=K))
    encoder.save_pretrained(ae / "encoder")
    demasker_tok.save(ae / "tokenizer.json")
    encoder_tok.save(ae / "encoder_tokenizer.json")
    folder = tmp_path / "prior"
    random_dit(0, conditional=True).save_pretrained(folder / "dit")
    settings = {"num_registers": K, "max_offset": 0.2, "block_offsets": True, "ae": str(tmp_path / "ae"),
                "cond_registers": K, "shared_tokenizer": False,
                "cross_tokenizer": {"shared_tokenizer": False, "slots_per_token": 1.5, "max_length": 40}}
    (folder / "prior.json").write_text(json.dumps(settings))
    prior = G.load_prior(folder)
    assert isinstance(prior.view, X.CrossTokenizerView) and prior.view.slots_per_token == 1.5
    assert prior.view.max_length == 40
    del settings["cross_tokenizer"]  # a prior.json without a view: loads, ConWithinDisc refuses it
    (folder / "prior.json").write_text(json.dumps(settings))
    assert G.load_prior(folder).view is None
    (folder / "prior.json").write_text(json.dumps({**settings, "register_blocks": [1, 1, 2, 4]}))
    G.load_prior(folder)  # the blocks it was trained with are this code's
    (folder / "prior.json").write_text(json.dumps({**settings, "register_blocks": [1, 2, 4, 1]}))
    with pytest.raises(ValueError, match="register blocks"):  # trained with another grouping
        G.load_prior(folder)


def test_a_prior_over_all_registers_serves_the_first_k(models):
    """Item 6: the prior models the whole bank, the demasker reads the first k (keep); same draws, sliced."""
    demasker, prior, cond_prior = models
    counting = Counting(demasker)
    g = lambda: torch.Generator().manual_seed(5)
    tokens, report = G.conthendisc(counting, prior, 2, gen_length=8, steps=4, prior_steps=3, prior_generator=g(),
                                   keep=3)
    full, _ = G.sample_registers(prior, 2, 3, generator=g())
    assert all(torch.equal(kwargs["registers"], full[:, :3]) for _, kwargs in counting.seen)
    assert report["demasker_flops_per_call"] == G.demasker_flops(demasker.cfg, 8, 3)
    counting.seen.clear()
    events = []
    G.conwithindisc(counting, cond_prior, 2, gen_length=8, steps=4, prior=prior, prior_steps=3, refresh_prior_steps=2,
                    prior_generator=g(), keep=2, on_refresh=lambda step, x, old, new: events.append(new))
    assert all(kwargs["registers"].shape == (2, 2, D) for _, kwargs in counting.seen) and events[0].shape == (2, 2, D)
    for bad in (0, K + 1):
        with pytest.raises(ValueError, match="keep"):
            G.conthendisc(demasker, prior, 1, gen_length=8, steps=2, keep=bad)


def test_shared_view_through_embed_canvas_is_the_default_path(models):
    from dataprep import cross_tokenizer as X
    demasker, _, cond_prior = models
    cfg = demasker.cfg
    x = torch.randint(0, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    x[torch.rand(3, 12, generator=torch.Generator().manual_seed(1)) < 0.4] = cfg.mask_token_id
    x[1, 7] = cfg.eos_token_id
    view = X.SharedView(cfg.eos_token_id, cond_prior.encoder.cfg.pad_token_id)
    default, _ = G.embed_canvas(cond_prior.encoder, x, cfg.mask_token_id, cfg.eos_token_id)
    through, _ = G.embed_canvas(cond_prior.encoder, x, cfg.mask_token_id, cfg.eos_token_id, view)
    assert torch.equal(default, through)


def test_a_prior_record_without_the_encoder_fingerprint_is_refused(tmp_path):
    from encoder import Encoder, EncoderConfig
    Encoder(EncoderConfig.tiny(num_registers=4)).save_pretrained(tmp_path / "ae" / "encoder")
    with pytest.raises(ValueError, match="records no encoder_fingerprint.*train_prior.py --ae"):
        G.check_prior_matches_ae(tmp_path / "prior", {"ae": "elsewhere"}, tmp_path / "ae")
    G.check_prior_matches_ae(tmp_path / "prior", {}, tmp_path / "base_only")  # no encoder: nothing to compare
