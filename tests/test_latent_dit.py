"""Tests for latent_dit.py (g_psi, App. E): shapes, identity at init, per-register time,
cross-attention padding, parity with a slow loop reference, gradients, sizes, checkpoints."""

import math

import pytest
import torch

from infra.checkpoint import CheckpointError
from latent_dit import GATE_MSA, GATE_ROWS, DiTConfig, LatentDiT

COND_DIM = 24


def make_model(conditional=False, seed=0, perturb=None, **overrides):
    torch.manual_seed(seed)
    cfg = DiTConfig.tiny(cond_dim=COND_DIM if conditional else None, **overrides)
    model = LatentDiT(cfg)
    if perturb:  # move every parameter (zero-initialised ones included) off its init
        with torch.no_grad():
            for param in model.parameters():
                param.add_(perturb * torch.randn_like(param))
    return model


def inputs(cfg, batch=3, k=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    k = k or cfg.num_registers
    z_t = torch.randn(batch, k, cfg.register_dim, generator=gen)
    t = torch.rand(batch, k, generator=gen)
    return z_t, t


def cond_inputs(batch=3, length=5, seed=2):
    gen = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, length, COND_DIM, generator=gen)
    cond_mask = torch.ones(batch, length, dtype=torch.bool)
    cond_mask[0, 3:] = False       # padded tail
    cond_mask[1, 1] = False        # a hole in the middle
    cond_mask[2, :] = False        # nothing visible at all
    return cond, cond_mask


# ---------------------------------------------------------------------------
# Shapes, init
# ---------------------------------------------------------------------------

def test_output_shape_and_fresh_model_predicts_zero():
    model = make_model()
    z_t, t = inputs(model.cfg)
    out = model(z_t, t)
    assert out.shape == z_t.shape
    assert torch.equal(out, torch.zeros_like(out))  # final Linear is zero-initialised
    perturbed = make_model(perturb=0.05)
    out = perturbed(z_t, t)
    assert out.shape == (3, 8, 64) and out.abs().max() > 1e-3
    # t of shape (B,) means the same time for every register
    t_shared = torch.rand(3)
    assert torch.allclose(perturbed(z_t, t_shared), perturbed(z_t, t_shared[:, None].expand(3, 8)), atol=0)
    # fewer registers than K: the first k positions
    assert perturbed(z_t[:, :5], t[:, :5]).shape == (3, 5, 64)


def test_fresh_block_is_exactly_identity():
    model = make_model(conditional=True)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, cfg.num_registers, cfg.hidden_size, generator=gen)
    _, t = inputs(cfg)
    cond, cond_mask = cond_inputs()
    y, allowed = model._embed_cond(cond, cond_mask)
    _, t0 = model.time_embedding(t)
    assert t0.abs().max() > 1e-3  # shifts and scales are live; only the gates are zero
    for block in model.blocks:
        assert torch.equal(block(x, t0, y, allowed), x)
    # the identity comes from the gates: opening one breaks it
    with torch.no_grad():
        model.blocks[0].scale_shift_table[GATE_MSA] = 0.5
    assert not torch.allclose(model.blocks[0](x, t0, y, allowed), x)


def test_modulation_of_register_j_depends_only_on_its_own_time():
    model = make_model(perturb=0.05)
    _, t = inputs(model.cfg)
    t_emb, t0 = model.time_embedding(t)
    j = 5
    t2 = t.clone()
    t2[:, j] = 1.0 - t2[:, j]
    t_emb2, t02 = model.time_embedding(t2)
    others = [i for i in range(model.cfg.num_registers) if i != j]
    assert torch.equal(t0[:, others], t02[:, others]) and torch.equal(t_emb[:, others], t_emb2[:, others])
    assert (t0[:, j] - t02[:, j]).abs().max() > 1e-3
    assert (t_emb[:, j] - t_emb2[:, j]).abs().max() > 1e-3


def test_per_register_time_end_to_end_without_token_mixing():
    """With the self-attention gates closed nothing mixes registers, so output row i must be a
    function of (z_t[:, i], t[:, i]) only: this checks the per-token modulation through every
    block and the final layer."""
    model = make_model(perturb=0.05)
    h = model.cfg.hidden_size
    with torch.no_grad():
        model.t_block.weight[GATE_MSA * h:(GATE_MSA + 1) * h] = 0
        model.t_block.bias[GATE_MSA * h:(GATE_MSA + 1) * h] = 0
        for block in model.blocks:
            block.scale_shift_table[GATE_MSA] = 0
    z_t, t = inputs(model.cfg)
    out = model(z_t, t)
    j = 2
    t2 = t.clone()
    t2[:, j] = (t2[:, j] + 0.5) % 1.0
    out2 = model(z_t, t2)
    others = [i for i in range(model.cfg.num_registers) if i != j]
    assert torch.allclose(out[:, others], out2[:, others], atol=1e-6)
    assert (out[:, j] - out2[:, j]).abs().max() > 1e-3
    # with the gates open (the real model), attention does mix registers
    model_mixing = make_model(perturb=0.05)
    mixed, mixed2 = model_mixing(z_t, t), model_mixing(z_t, t2)
    assert (mixed[:, others] - mixed2[:, others]).abs().max() > 1e-4


# ---------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------

def test_cross_attention_ignores_padded_conditioning():
    model = make_model(conditional=True, perturb=0.1)
    z_t, t = inputs(model.cfg)
    cond, cond_mask = cond_inputs()
    out = model(z_t, t, cond, cond_mask)
    assert torch.isfinite(out).all()
    changed_padding = torch.where(cond_mask[..., None], cond, cond + 10 * torch.randn_like(cond))
    assert torch.allclose(model(z_t, t, changed_padding, cond_mask), out, atol=1e-6)
    changed_valid = cond.clone()
    changed_valid[0, 1] += 1.0   # a valid entry of example 0
    out_valid = model(z_t, t, changed_valid, cond_mask)
    assert (out_valid[0] - out[0]).abs().max() > 1e-3
    assert torch.equal(out_valid[1:], out[1:])  # examples are independent
    # a mask of all True is the same as no mask
    full = torch.ones_like(cond_mask)
    assert torch.allclose(model(z_t, t, cond, full), model(z_t, t, cond, None), atol=1e-6)


def test_conditioning_errors_are_clear():
    uncond, cond_model = make_model(), make_model(conditional=True)
    z_t, t = inputs(uncond.cfg)
    cond, cond_mask = cond_inputs()
    with pytest.raises(ValueError, match="unconditional"):
        uncond(z_t, t, cond, cond_mask)
    with pytest.raises(ValueError, match="conditional"):
        cond_model(z_t, t)
    with pytest.raises(ValueError, match="cond_dim"):
        cond_model(z_t, t, cond[..., :5], cond_mask)
    with pytest.raises(ValueError, match="cond_mask"):
        cond_model(z_t, t, cond, cond_mask.long())
    with pytest.raises(ValueError, match="t must have shape"):
        uncond(z_t, t[:, :4])
    with pytest.raises(ValueError, match="num_registers"):
        uncond(torch.randn(1, 9, 64), torch.rand(1, 9))
    with pytest.raises(ValueError, match="register_dim"):
        uncond(torch.randn(1, 4, 32), torch.rand(1, 4))


# ---------------------------------------------------------------------------
# Parity with a slow, loop-based reference written from the spec
# ---------------------------------------------------------------------------

def _layer_norm(v, eps):
    mean = v.mean()
    return (v - mean) / torch.sqrt(((v - mean) ** 2).mean() + eps)


def _gelu_tanh(v):
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def _linear(P, name, v):
    return P[name + ".weight"] @ v + P[name + ".bias"]


def _attend(P, name, queries, keys_values, valid, num_heads):
    """Per query, per head: softmax over the valid keys; a query with no valid key gets 0."""
    head_dim = queries[0].shape[0] // num_heads
    outputs = []
    for query in queries:
        q = _linear(P, name + ".q_proj", query)
        ks = [_linear(P, name + ".k_proj", kv) for kv in keys_values]
        vs = [_linear(P, name + ".v_proj", kv) for kv in keys_values]
        heads = []
        for hd in range(num_heads):
            sl = slice(hd * head_dim, (hd + 1) * head_dim)
            scores = [float(q[sl] @ k[sl]) / math.sqrt(head_dim) for k in ks]
            allowed = [s for s, ok in zip(scores, valid) if ok]
            mix = torch.zeros(head_dim, dtype=q.dtype)
            if allowed:
                top = max(allowed)
                weights = [math.exp(s - top) if ok else 0.0 for s, ok in zip(scores, valid)]
                total = sum(weights)
                for w, v in zip(weights, vs):
                    mix = mix + (w / total) * v[sl]
            heads.append(mix)
        outputs.append(_linear(P, name + ".o_proj", torch.cat(heads)))
    return outputs


def reference_forward(model, z_t, t, cond=None, cond_mask=None):
    cfg, P = model.cfg, dict(model.named_parameters())
    h, eps = cfg.hidden_size, cfg.norm_eps
    B, k, _ = z_t.shape
    out = torch.zeros_like(z_t)
    for b in range(B):
        x, t_emb, t0 = [], [], []
        for i in range(k):
            omega = [10000.0 ** (-m / (h // 2)) for m in range(h // 2)]
            pos = torch.tensor([math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega], dtype=z_t.dtype)
            x.append(_linear(P, "x_embedder", z_t[b, i]) + pos)
            half = cfg.frequency_embedding_size // 2
            args = [1000.0 * float(t[b, i]) * math.exp(-math.log(10000.0) * m / half) for m in range(half)]
            freq = torch.tensor([math.cos(a) for a in args] + [math.sin(a) for a in args], dtype=z_t.dtype)
            emb = _linear(P, "t_embedder.fc2", torch.nn.functional.silu(_linear(P, "t_embedder.fc1", freq)))
            t_emb.append(emb)
            t0.append(_linear(P, "t_block", torch.nn.functional.silu(emb)).view(6, h))
        if cfg.conditional:
            ys = [_linear(P, "cond_embedder.fc2", _gelu_tanh(_linear(P, "cond_embedder.fc1", c))) for c in cond[b]]
            valid = [bool(v) for v in cond_mask[b]]
        for layer in range(cfg.depth):
            pre = f"blocks.{layer}"
            mods = [P[pre + ".scale_shift_table"] + t0[i] for i in range(k)]  # (6, h) each
            normed = [_layer_norm(x[i], eps) * (1 + mods[i][1]) + mods[i][0] for i in range(k)]
            attn = _attend(P, pre + ".attn", normed, normed, [True] * k, cfg.num_heads)
            x = [x[i] + mods[i][2] * attn[i] for i in range(k)]
            if cfg.conditional:
                cross = _attend(P, pre + ".cross_attn", x, ys, valid, cfg.num_heads)
                x = [x[i] + cross[i] for i in range(k)]
            for i in range(k):
                m = _layer_norm(x[i], eps) * (1 + mods[i][4]) + mods[i][3]
                x[i] = x[i] + mods[i][5] * _linear(P, pre + ".mlp.fc2", _gelu_tanh(_linear(P, pre + ".mlp.fc1", m)))
        for i in range(k):
            shift, scale = P["final_layer.scale_shift_table"] + t_emb[i]
            out[b, i] = _linear(P, "final_layer.linear", _layer_norm(x[i], eps) * (1 + scale) + shift)
    return out


@pytest.mark.parametrize("conditional", [False, True])
def test_matches_slow_loop_reference(conditional):
    model = make_model(conditional=conditional, perturb=0.1, hidden_size=32, register_dim=16).double()
    z_t, t = inputs(model.cfg, batch=3, k=6)
    z_t, t = z_t.double(), t.double()
    cond, cond_mask = cond_inputs() if conditional else (None, None)
    if conditional:
        cond = cond.double()
    with torch.no_grad():
        expected = reference_forward(model, z_t, t, cond, cond_mask)
        got = model(z_t, t, cond, cond_mask)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# Gradients, activation checkpointing
# ---------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    model = make_model(conditional=True)
    z0, t = inputs(model.cfg)
    cond, cond_mask = cond_inputs()
    z_t = z0 + torch.randn_like(z0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def step():
        opt.zero_grad()
        loss = (model(z_t, t, cond, cond_mask) - z0).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    step()  # at init only the output layer and the gates can move (everything else is gated off)
    final_grad = model.final_layer.linear.weight.grad
    assert final_grad.abs().sum() > 0
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() == 0
    losses = [step() for _ in range(4)]
    for block in model.blocks:  # the gates opened
        assert block.scale_shift_table[list(GATE_ROWS)].abs().sum() > 0
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient reached {missing}"
    assert losses[-1] < losses[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(conditional=True, perturb=0.05)
    z_t, t = inputs(model.cfg)
    cond, cond_mask = cond_inputs()
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing = flag
        model.zero_grad()
        model(z_t, t, cond, cond_mask).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# Sizes and checkpoints
# ---------------------------------------------------------------------------

def expected_parameter_count(cfg):
    """Sum of the module shapes written out by hand (weights + biases)."""
    h, d, f, m = cfg.hidden_size, cfg.register_dim, cfg.frequency_embedding_size, cfg.mlp_hidden_size
    total = (d * h + h) + (f * h + h) + (h * h + h) + (h * 6 * h + 6 * h)   # x_embedder, t MLP, t_block
    per_block = 4 * (h * h + h) + (h * m + m) + (m * h + h) + 6 * h         # attn, MLP, table
    if cfg.conditional:
        per_block += 4 * (h * h + h)                                        # cross-attention
        total += (cfg.cond_dim * h + h) + (h * h + h)                       # cond MLP
    total += cfg.depth * per_block + 2 * h + (h * d + d)                    # final layer
    return total


def test_paper_preset_parameter_counts():
    counts = {}
    for conditional in (False, True):
        cfg = DiTConfig.paper(conditional=conditional)
        with torch.device("meta"):
            model = LatentDiT(cfg)
        counts[conditional] = model.num_parameters()
        assert counts[conditional] == expected_parameter_count(cfg)
        assert cfg.depth == 28 and cfg.hidden_size // cfg.num_heads == 64
    # the figures quoted in the module docstring
    assert counts[False] == 409_000_896 and counts[True] == 423_968_704
    assert 380e6 < counts[False] < 430e6 and 380e6 < counts[True] < 430e6  # App. E: "roughly 400M"
    # train_prior passes cond_dim, not conditional=True: the same conditional preset
    assert DiTConfig.paper(cond_dim=1024) == DiTConfig.paper(conditional=True)
    assert DiTConfig.paper(cond_dim=1024, hidden_size=1088, num_heads=17).hidden_size == 1088  # flags win
    tiny = make_model(conditional=True)
    assert tiny.num_parameters() == expected_parameter_count(tiny.cfg)


def test_save_load_round_trip(tmp_path):
    model = make_model(conditional=True, perturb=0.05)
    z_t, t = inputs(model.cfg)
    cond, cond_mask = cond_inputs()
    model.save_pretrained(tmp_path / "prior")
    loaded = LatentDiT.from_pretrained(tmp_path / "prior")
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(loaded(z_t, t, cond, cond_mask), model(z_t, t, cond, cond_mask))
    # the checkpoint dtype is kept unless asked
    model.to(torch.bfloat16).save_pretrained(tmp_path / "prior_bf16")
    assert LatentDiT.from_pretrained(tmp_path / "prior_bf16").x_embedder.weight.dtype == torch.bfloat16
    as_fp32 = LatentDiT.from_pretrained(tmp_path / "prior_bf16", dtype=torch.float32)
    assert as_fp32.x_embedder.weight.dtype == torch.float32
    # overrides: more register positions need no new weights (the position table is fixed)
    assert LatentDiT.from_pretrained(tmp_path / "prior", num_registers=16).cfg.num_registers == 16


def test_load_rejects_other_checkpoints(tmp_path):
    make_model().save_pretrained(tmp_path / "uncond")
    with pytest.raises(CheckpointError, match="missing"):
        LatentDiT.from_pretrained(tmp_path / "uncond", cond_dim=COND_DIM)
    config_path = tmp_path / "uncond" / "config.json"
    config_path.write_text(config_path.read_text().replace('"latent_dit"', '"encoder"'))
    with pytest.raises(CheckpointError, match="not a crocodil latent DiT"):
        LatentDiT.from_pretrained(tmp_path / "uncond")


def test_paper_presets_cost_what_the_paper_says_under_its_nfe_count():
    """Sec. 5 fn. 4: the ~400M denoiser x 128 calls ~ 6 activations of the 8B demasker; the conditional one x 32 calls
    (+ one encoder call per refresh) < 2; ConWithinDisc with 32 demasker steps ~ 32 + 8 = 40."""
    from demasker import Demasker, DemaskerConfig
    from encoder import Encoder, EncoderConfig
    from generators import config_param_count, paper_nfe

    llada = config_param_count(Demasker, DemaskerConfig.llada_8b_base())
    qwen = config_param_count(Encoder, EncoderConfig.qwen3_embedding_0_6b(num_registers=8))
    prior = config_param_count(LatentDiT, DiTConfig.paper())
    cond = config_param_count(LatentDiT, DiTConfig.paper(conditional=True))
    _, uncond_cost = paper_nfe(0, llada, [(128, prior)])
    _, refresh_cost = paper_nfe(0, llada, [(32, cond), (1, qwen)])
    assert 6 < uncond_cost < 7 and refresh_cost < 2
    nfe, _ = paper_nfe(32, llada, [(128, prior), (32, cond), (1, qwen)])
    assert 39 < nfe < 41
    wide = config_param_count(LatentDiT, DiTConfig.paper(conditional=True, hidden_size=1088, num_heads=17))
    assert paper_nfe(0, llada, [(32, wide)])[1] > 2  # why the conditional preset is narrower
