"""demasker.py: public LLaDA loading, parity with a slow loop re-implementation of the LLaDA
forward written here from the raw public state dict, the register prefix, two-axis RoPE,
nested-dropout masking, padding, gradients."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from infra.checkpoint import CheckpointError
from demasker import Demasker, DemaskerConfig
from layers import rope_angles, rope_cos_sin, rope_inv_freq

P = "model.transformer."
BLOCK_KEYS = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]

# GSAI-ML/LLaDA-8B-Base config.json (identical to LLaDA-8B-Instruct's; huggingface.co/GSAI-ML/LLaDA-8B-Base).
LLADA_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}


def tiny_public_config(**changes):
    """The 8B config.json with tiny sizes (same field names and every other value)."""
    config = dict(LLADA_8B_CONFIG, d_model=32, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=48,
                  vocab_size=64, embedding_size=64, rope_theta=10000.0, mask_token_id=63, eos_token_id=62,
                  pad_token_id=62, max_sequence_length=128)
    config.update(changes)
    return config


def tiny_public_state(config, seed=0, dtype=torch.float32):
    """Random weights under the public LLaDA key names (norm weights away from 1)."""
    gen = torch.Generator().manual_seed(seed)
    d, hidden, vocab = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    shapes = {"wte.weight": (vocab, d), "ln_f.weight": (d,)}
    if not config["weight_tying"]:
        shapes["ff_out.weight"] = (vocab, d)
    for i in range(config["n_layers"]):
        for name, shape in [("attn_norm", (d,)), ("q_proj", (d, d)), ("k_proj", (d, d)), ("v_proj", (d, d)),
                            ("attn_out", (d, d)), ("ff_norm", (d,)), ("ff_proj", (hidden, d)),
                            ("up_proj", (hidden, d)), ("ff_out", (d, hidden))]:
            shapes[f"blocks.{i}.{name}.weight"] = shape
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensor = 1.0 + 0.3 * torch.randn(shape, generator=gen)
        else:
            tensor = torch.randn(shape, generator=gen) / math.sqrt(shape[1]) * 1.5
        state[P + name] = tensor.to(dtype)
    return state


def write_public_checkpoint(folder, config, state, n_shards=3):
    """config.json + model-0000k-of-0000n.safetensors + model.safetensors.index.json, as on the hub."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(state)
    weight_map = {}
    for shard in range(n_shards):
        name = f"model-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {key: state[key].contiguous() for key in keys[shard::n_shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in part})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return folder


def where_it_should_land(model, public_key):
    """Our tensor for a public LLaDA key, written out by hand (independent of public_weights.LLADA_KEY_TABLE)."""
    name = public_key[len(P):]
    top = {"wte.weight": model.wte.weight, "ln_f.weight": model.ln_f.weight, "ff_out.weight": model.lm_head.weight}
    if name in top:
        return top[name]
    _, index, part, _ = name.split(".")
    block = model.blocks[int(index)]
    return {"attn_norm": block.attn_norm.weight, "q_proj": block.attn.q_proj.weight,
            "k_proj": block.attn.k_proj.weight, "v_proj": block.attn.v_proj.weight,
            "attn_out": block.attn.o_proj.weight, "ff_norm": block.mlp_norm.weight,
            "ff_proj": block.mlp.gate_proj.weight, "up_proj": block.mlp.up_proj.weight,
            "ff_out": block.mlp.down_proj.weight}[part]


# ---------------------------------------------------------------------------
# Slow reference: LLaDA forward for one sequence, plain loops, from the public state dict
# ---------------------------------------------------------------------------

def slow_rmsnorm(vector, weight, eps):
    return vector / math.sqrt(float((vector * vector).mean()) + eps) * weight


def slow_rotate(vector, pair_positions, theta):
    """Rotate pair i = (dim i, dim i + D/2) by pair_positions[i] * theta^(-2i/D)."""
    dim = vector.shape[0]
    half = dim // 2
    out = vector.clone()
    for i in range(half):
        angle = pair_positions[i] * theta ** (-2 * i / dim)
        a, b = float(vector[i]), float(vector[i + half])
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def slow_llada(state, config, token_ids, prefix=None, prefix_local=None, prefix_pairs=0, key_visible=None):
    """Logits (L, V) for one sequence. prefix: list of (d,) vectors placed before the text, at
    global position -1 and local positions prefix_local; pairs < prefix_pairs use the local one."""
    d, heads, eps, theta = config["d_model"], config["n_heads"], config["rms_norm_eps"], config["rope_theta"]
    hd = d // heads
    text = [state[P + "wte.weight"][t].clone() for t in token_ids]
    prefix = prefix or []
    h = [v.clone() for v in prefix] + text
    T, n_prefix = len(h), len(prefix)
    pair_positions = []
    for t in range(T):
        if t < n_prefix:
            pair_positions.append([prefix_local[t] if i < prefix_pairs else -1 for i in range(hd // 2)])
        else:
            pair_positions.append([t - n_prefix] * (hd // 2))
    visible = key_visible if key_visible is not None else [True] * T
    for layer in range(config["n_layers"]):
        w = {name: state[f"{P}blocks.{layer}.{name}.weight"] for name in BLOCK_KEYS}
        normed = [slow_rmsnorm(x, w["attn_norm"], eps) for x in h]
        q = [w["q_proj"] @ x for x in normed]
        k = [w["k_proj"] @ x for x in normed]
        v = [w["v_proj"] @ x for x in normed]
        attn_out = []
        for t in range(T):
            heads_out = []
            for head in range(heads):
                sl = slice(head * hd, (head + 1) * hd)
                q_rot = slow_rotate(q[t][sl], pair_positions[t], theta)
                scores, values = [], []
                for s in range(T):
                    if not visible[s]:
                        continue
                    k_rot = slow_rotate(k[s][sl], pair_positions[s], theta)
                    scores.append(float(q_rot @ k_rot) / math.sqrt(hd))
                    values.append(v[s][sl])
                top = max(scores)
                weights = [math.exp(score - top) for score in scores]
                total = sum(weights)
                heads_out.append(sum(wt / total * val for wt, val in zip(weights, values)))
            attn_out.append(w["attn_out"] @ torch.cat(heads_out))
        h = [x + a for x, a in zip(h, attn_out)]
        new_h = []
        for x in h:
            n = slow_rmsnorm(x, w["ff_norm"], eps)
            gate, up = w["ff_proj"] @ n, w["up_proj"] @ n
            new_h.append(x + w["ff_out"] @ (gate / (1 + torch.exp(-gate)) * up))
        h = new_h
    head = state[P + "wte.weight"] if config["weight_tying"] else state[P + "ff_out.weight"]
    return torch.stack([head @ slow_rmsnorm(x, state[P + "ln_f.weight"], eps) for x in h[n_prefix:]])


@pytest.fixture
def public_folder(tmp_path):
    config = tiny_public_config()
    state = tiny_public_state(config)
    return write_public_checkpoint(tmp_path / "llada", config, state), config, state


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Demasker(DemaskerConfig.tiny(**overrides)).eval()


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def test_llada_8b_preset_equals_public_config_and_parameter_count():
    cfg = DemaskerConfig.llada_8b_base()
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden_size, cfg.vocab_size) == \
        (4096, 32, 32, 32, 12288, 126464)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id,
            cfg.bos_token_id) == (500000.0, 1e-5, 126336, 126081, 126081, 126080)
    assert (cfg.register_dim, cfg.max_registers, cfg.prefix_rope_pairs, cfg.weight_tying) == (1024, 128, 16, False)
    from_hf = DemaskerConfig.from_hf_config(dict(LLADA_8B_CONFIG, bos_token_id=126080))
    assert from_hf == cfg
    with torch.device("meta"):
        model = Demasker(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count == 8_015_581_184 + 1024 * 4096 + 2 * 4096  # LLaDA card: 8.02B + conditioning


def test_from_hf_config_rejects_unsupported_settings():
    for change, word in [({"alibi": True}, "alibi"), ({"layer_norm_type": "default"}, "layer_norm_type"),
                         ({"include_bias": True}, "include_bias"), ({"block_type": "sequential"}, "block_type"),
                         ({"attention_layer_norm": True}, "attention_layer_norm"),
                         ({"model_type": "qwen3"}, "model_type")]:
        with pytest.raises(ValueError, match=word):
            DemaskerConfig.from_hf_config(dict(LLADA_8B_CONFIG, **change))
    with pytest.raises(ValueError, match="prefix_rope_pairs"):
        DemaskerConfig.tiny(prefix_rope_pairs=9)  # head_dim 16 has 8 pairs


def test_config_dict_round_trip():
    cfg = DemaskerConfig.tiny(max_registers=5)
    assert DemaskerConfig.from_dict({**cfg.to_dict(), "crocodil_model": "demasker"}) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DemaskerConfig.from_dict({**cfg.to_dict(), "hidden_size": 3})


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------

def test_public_sharded_bf16_checkpoint_lands_where_expected(tmp_path, capsys):
    config = tiny_public_config()
    state = tiny_public_state(config, dtype=torch.bfloat16)
    folder = write_public_checkpoint(tmp_path / "llada", config, state, n_shards=3)
    model = Demasker.from_pretrained(str(folder), register_dim=24, max_registers=6)
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id) == (32, 2, 64, 63, 62)
    assert (cfg.register_dim, cfg.max_registers, cfg.prefix_rope_pairs) == (24, 6, 1)
    for key, tensor in state.items():
        landed = where_it_should_land(model, key)
        assert landed.dtype == torch.bfloat16, key
        assert torch.equal(landed, tensor), key
    report = capsys.readouterr().out
    for name in ("register_proj.weight", "start_embedding", "end_embedding"):
        assert name in report
    assert model.register_proj.weight.shape == (32, 24) and model.register_proj.weight.dtype == torch.bfloat16
    assert model.start_embedding.std() > 0 and not model.start_embedding.is_meta
    assert all(not p.is_meta for p in model.parameters())
    base = Demasker.from_pretrained(str(folder), register_dim=0, dtype=torch.float32)
    assert not hasattr(base, "register_proj") and base.wte.weight.dtype == torch.float32


@pytest.mark.parametrize("damage, expected", [
    ("rename", ["model.transformer.blocks.1.upproj.weight", "model.transformer.blocks.1.up_proj.weight"]),
    ("missing", ["missing", "model.transformer.ln_f.weight"]),
    ("shape", ["wrong shape", "model.transformer.blocks.0.q_proj.weight"]),
])
def test_damaged_public_checkpoint_names_the_key(tmp_path, damage, expected):
    config = tiny_public_config()
    state = tiny_public_state(config)
    if damage == "rename":
        state[P + "blocks.1.upproj.weight"] = state.pop(P + "blocks.1.up_proj.weight")
    elif damage == "missing":
        del state[P + "ln_f.weight"]
    else:
        state[P + "blocks.0.q_proj.weight"] = state[P + "blocks.0.q_proj.weight"][:, :-1].contiguous()
    folder = write_public_checkpoint(tmp_path / damage, config, state)
    with pytest.raises(CheckpointError) as error:
        Demasker.from_pretrained(str(folder))
    for text in expected:
        assert text in str(error.value)


def test_native_round_trip(tmp_path):
    model = tiny_model(seed=3)
    ids = torch.randint(0, 500, (2, 7))
    registers = torch.randn(2, 5, 64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    model.save_pretrained(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["crocodil_model"] == "demasker"
    loaded = Demasker.from_pretrained(str(tmp_path / "native")).eval()
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(loaded(ids, registers, mask), model(ids, registers, mask), rtol=0, atol=0)


def test_weight_tying_loads_and_round_trips(tmp_path):
    config = tiny_public_config(weight_tying=True)
    state = tiny_public_state(config)
    assert P + "ff_out.weight" not in state
    model = Demasker.from_pretrained(str(write_public_checkpoint(tmp_path / "tied", config, state)), register_dim=0)
    assert model.lm_head.weight is model.wte.weight
    ids = torch.tensor([3, 9, 1, 63, 63])
    torch.testing.assert_close(model(ids[None])[0], slow_llada(state, config, ids.tolist()), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "native")
    again = Demasker.from_pretrained(str(tmp_path / "native"))
    assert again.lm_head.weight is again.wte.weight
    assert torch.equal(again.wte.weight, model.wte.weight)


# ---------------------------------------------------------------------------
# Numerics against the slow reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("register_dim", [0, 16])
def test_no_registers_equals_plain_llada(public_folder, register_dim):
    folder, config, state = public_folder
    model = Demasker.from_pretrained(str(folder), register_dim=register_dim).eval()
    ids = torch.tensor([[5, 63, 17, 63, 2, 40], [1, 2, 3, 63, 63, 62]])
    logits = model(ids)
    assert logits.shape == (2, 6, 64)
    for row in range(2):
        torch.testing.assert_close(logits[row], slow_llada(state, config, ids[row].tolist()), rtol=1e-5, atol=1e-5)


def test_registers_match_slow_reference_with_two_axis_rope(public_folder):
    folder, config, state = public_folder
    model = Demasker.from_pretrained(str(folder), register_dim=16, max_registers=4, prefix_rope_pairs=3).eval()
    torch.manual_seed(1)
    ids = torch.tensor([[7, 63, 63, 12, 30], [63, 63, 63, 63, 63]])
    registers = torch.randn(2, 3, 16) * 4
    mask = torch.tensor([[True, True, True], [True, False, True]])
    logits = model(ids, registers, mask)
    W, start, end = model.register_proj.weight.detach(), model.start_embedding.detach(), model.end_embedding.detach()
    for row in range(2):
        prefix = [start] + [W @ z for z in registers[row]] + [end]
        local = [-6, -5, -4, -3, -1]  # START = -(K + 2), z_1..z_3 = -(K + 2) + j, END = -1 (K = 4)
        visible = [True] + mask[row].tolist() + [True] + [True] * 5
        expected = slow_llada(state, config, ids[row].tolist(), prefix, local, prefix_pairs=3, key_visible=visible)
        torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)


def test_two_axis_rope_is_plain_rope_on_text_and_per_pair_on_prefix():
    model = tiny_model()
    cfg = model.cfg
    L, k = 9, 5
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
    plain_cos, plain_sin = rope_cos_sin(rope_angles(torch.arange(L), inv_freq))
    cos, sin = model.rope_cos_sin(*model.positions(None, L))
    torch.testing.assert_close(cos, plain_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, plain_sin, rtol=0, atol=0)
    cos, sin = model.rope_cos_sin(*model.positions(k, L))
    torch.testing.assert_close(cos[..., k + 2:, :], plain_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin[..., k + 2:, :], plain_sin, rtol=0, atol=0)
    half = cfg.head_dim // 2
    K = cfg.max_registers
    local = [-(K + 2), -(K + 1), -K, -(K - 1), -(K - 2), -(K - 3), -1]  # START, z_1..z_5, END
    for t, l in enumerate(local):
        for i in range(half):
            position = l if i < cfg.prefix_rope_pairs else -1
            angle = position * cfg.rope_theta ** (-2 * i / cfg.head_dim)
            for dim in (i, i + half):
                assert abs(float(cos[0, t, dim]) - math.cos(angle)) < 1e-6
                assert abs(float(sin[0, t, dim]) - math.sin(angle)) < 1e-6


def test_text_and_boundary_positions_do_not_depend_on_k():
    model = tiny_model()
    K, L = model.cfg.max_registers, 6
    for k in range(K + 1):
        global_pos, local_pos = model.positions(k, L)
        assert global_pos.tolist() == [-1] * (k + 2) + list(range(L))
        assert local_pos.tolist() == [j - (K + 2) for j in range(k + 1)] + [-1] + list(range(L))


@pytest.mark.parametrize("L", [1, 6, 300])
def test_no_prefix_local_index_equals_a_text_local_index(L):
    model = tiny_model()
    K = model.cfg.max_registers
    for k in range(K + 1):
        _, local_pos = model.positions(k, L)
        prefix, text = set(local_pos[:k + 2].tolist()), set(local_pos[k + 2:].tolist())
        assert not prefix & text and len(prefix) == k + 2  # no clash, and the prefix tokens all differ
        assert max(prefix) == -1 and min(prefix) == -(K + 2)  # END right before the text, START fixed


def test_checkpoints_of_an_earlier_prefix_layout_are_refused_with_the_fix():
    cfg = DemaskerConfig.tiny()
    old = {key: value for key, value in cfg.to_dict().items() if key != "prefix_local_positions"}
    with pytest.raises(ValueError, match="earlier register-prefix layout.*Retrain it with train_ae.py"):
        DemaskerConfig.from_dict(old)  # a conditioned checkpoint saved before the field existed
    with pytest.raises(ValueError, match="earlier register-prefix layout"):
        DemaskerConfig.from_dict({**cfg.to_dict(), "prefix_local_positions": "legacy"})
    assert DemaskerConfig.from_dict({**old, "register_dim": 0}).prefix_local_positions == "negative"  # a base MDM
    assert DemaskerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="prefix_local_positions"):
        DemaskerConfig.tiny(prefix_local_positions="zero")


# ---------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------

def test_bidirectional_later_token_changes_earlier_logit():
    model = tiny_model()
    ids = torch.randint(0, 500, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 500
    for registers in (None, torch.randn(1, 3, 64)):
        before, after = model(ids, registers), model(changed, registers)
        assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4


def test_register_mask_equals_feeding_only_the_first_k_registers():
    model = tiny_model(seed=2)
    K = model.cfg.max_registers
    ids = torch.randint(0, 500, (K + 1, 6))
    registers = torch.randn(K + 1, K, 64)
    keep = torch.arange(K + 1)  # row b keeps b registers: 0 .. K
    mask = torch.arange(K)[None, :] < keep[:, None]  # (B, K)
    logits = model(ids, registers, mask)
    assert logits.shape == (K + 1, 6, 512)
    for row, k in enumerate(keep.tolist()):
        alone = model(ids[row:row + 1], registers[row:row + 1, :k])
        torch.testing.assert_close(logits[row], alone[0], rtol=1e-5, atol=1e-5)
    # The registers matter: other registers, or fewer of them, change the logits.
    other = model(ids, torch.randn(K + 1, K, 64), mask)
    assert (other[1:] - logits[1:]).abs().amax(dim=(1, 2)).min() > 1e-4
    assert (model(ids[:1], registers[:1, :0]) - model(ids[:1])).abs().max() > 1e-4  # START/END present


def test_right_padding_with_attention_mask_equals_unpadded_row():
    model = tiny_model(seed=4)
    eos = model.cfg.eos_token_id
    short = torch.randint(0, 500, (1, 5))
    long = torch.randint(0, 500, (1, 8))
    batch = torch.cat([torch.cat([short, torch.full((1, 3), eos)], dim=1), long])
    attention_mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    registers = torch.randn(2, 4, 64)
    register_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    for regs, reg_mask in ((None, None), (registers, register_mask)):
        padded = model(batch, regs, reg_mask, attention_mask)
        alone = model(short, None if regs is None else regs[:1, :2])
        torch.testing.assert_close(padded[0, :5], alone[0], rtol=1e-5, atol=1e-5)
        other = model(long, None if regs is None else regs[1:])
        torch.testing.assert_close(padded[1], other[0], rtol=1e-5, atol=1e-5)


def test_left_padding_without_registers_is_invariant_because_rope_is_relative():
    model = tiny_model(seed=5)
    short = torch.randint(0, 500, (1, 5))
    padded = torch.cat([torch.full((1, 3), model.cfg.eos_token_id), short], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 5])
    torch.testing.assert_close(model(padded, attention_mask=mask)[0, 3:], model(short)[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter_and_checkpointing_matches():
    model = tiny_model(seed=6).train()
    ids = torch.randint(0, 500, (2, 6))
    registers = torch.randn(2, 5, 64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    model(ids, registers, mask).float().logsumexp(-1).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    assert registers.grad[1, 3:].abs().max() == 0 and registers.grad[1, :3].abs().max() > 0
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, registers, mask).float().logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)


def test_bf16_forward_runs_and_tracks_fp32():
    model = tiny_model(seed=7)
    ids = torch.randint(0, 500, (2, 6))
    registers = torch.randn(2, 3, 64)
    reference = model(ids, registers, attention_mask=torch.ones(2, 6, dtype=torch.bool))
    model = model.to(torch.bfloat16)
    logits = model(ids, registers, attention_mask=torch.ones(2, 6, dtype=torch.bool))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    ids = torch.randint(0, 500, (2, 4))
    with pytest.raises(ValueError, match="max_registers"):
        model(ids, torch.randn(2, 9, 64))
    with pytest.raises(ValueError, match="register_dim"):
        model(ids, torch.randn(2, 3, 32))
    with pytest.raises(ValueError, match="register_mask"):
        model(ids, torch.randn(2, 3, 64), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.bool))
    base = tiny_model(register_dim=0)
    with pytest.raises(ValueError, match="register_dim=0"):
        base(ids, torch.randn(2, 3, 64))
