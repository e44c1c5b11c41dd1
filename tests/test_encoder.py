"""encoder.py: public-layout loading, parity with transformers' Qwen3 and with a slow loop
reference written here, and the register / padding / causality / hiding invariants."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from infra.checkpoint import CheckpointError
from encoder import HF_KEY_TABLE, Encoder, EncoderConfig, register_keep_mask, sample_keep

# The public Qwen/Qwen3-Embedding-0.6B config.json (huggingface.co/Qwen/Qwen3-Embedding-0.6B).
QWEN3_EMBEDDING_0_6B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151669,
}


def tiny_cfg(**overrides):
    return EncoderConfig.tiny(**overrides)


def public_config(cfg, dtype="bfloat16"):
    """A config.json with the public field names, for the tiny shapes of `cfg`."""
    return {**QWEN3_EMBEDDING_0_6B_CONFIG, "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
            "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "num_key_value_heads": cfg.num_kv_heads, "max_window_layers": cfg.num_layers,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_word_embeddings, "vocab_size": cfg.vocab_size, "torch_dtype": dtype}


def public_state(cfg, dtype=torch.bfloat16, seed=0):
    """Random tensors under the exact public key names and shapes (no 'model.' prefix)."""
    generator = torch.Generator().manual_seed(seed)
    D, H, KV, hd, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    shapes = {"embed_tokens.weight": (cfg.vocab_size, D), "norm.weight": (D,)}
    for i in range(cfg.num_layers):
        shapes.update({
            f"layers.{i}.input_layernorm.weight": (D,), f"layers.{i}.post_attention_layernorm.weight": (D,),
            f"layers.{i}.self_attn.q_proj.weight": (H * hd, D), f"layers.{i}.self_attn.k_proj.weight": (KV * hd, D),
            f"layers.{i}.self_attn.v_proj.weight": (KV * hd, D), f"layers.{i}.self_attn.o_proj.weight": (D, H * hd),
            f"layers.{i}.self_attn.q_norm.weight": (hd,), f"layers.{i}.self_attn.k_norm.weight": (hd,),
            f"layers.{i}.mlp.gate_proj.weight": (F, D), f"layers.{i}.mlp.up_proj.weight": (F, D),
            f"layers.{i}.mlp.down_proj.weight": (D, F)})
    return {key: (torch.randn(shape, generator=generator) * 0.1 + (1.0 if len(shape) == 1 else 0.0)).to(dtype)
            for key, shape in shapes.items()}


def write_public(folder, config, state, shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    state = {key: value.clone().contiguous() for key, value in state.items()}
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    keys = sorted(state)
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {key: state[key] for key in keys[shard::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def our_name(public_key):
    for source, target in HF_KEY_TABLE:
        parts = source.split("{}")
        if len(parts) == 1 and public_key == source:
            return target
        if len(parts) == 2 and public_key.startswith(parts[0]) and public_key.endswith(parts[1]):
            index = public_key[len(parts[0]):len(public_key) - len(parts[1])]
            if index.isdigit():
                return target.format(index)
    raise KeyError(public_key)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Encoder(tiny_cfg(**overrides)).eval()
    with torch.no_grad():  # non-trivial norm weights so a mix-up of norms would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.2)
    return model


def random_ids(model, B, L, seed):
    return torch.randint(1, model.cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- config
def test_presets_and_hf_config():
    assert EncoderConfig.from_hf_config(QWEN3_EMBEDDING_0_6B_CONFIG) == EncoderConfig.qwen3_embedding_0_6b()
    v5 = {key: value for key, value in QWEN3_EMBEDDING_0_6B_CONFIG.items() if key != "rope_theta"}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert EncoderConfig.from_hf_config(v5, num_registers=16).rope_theta == 1e6
    assert EncoderConfig.from_hf_config(v5, num_registers=16).num_registers == 16
    with torch.device("meta"):
        big = Encoder(EncoderConfig.qwen3_embedding_0_6b(num_registers=1))
    assert sum(p.numel() for p in big.parameters()) == 595_776_512  # Keras' published count
    cfg = EncoderConfig.tiny()
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.num_registers) == (64, 2, 4, 2, 8)
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden_sise"):
        EncoderConfig.from_dict({**cfg.to_dict(), "hidden_sise": 3})
    with pytest.raises(ValueError, match="attention_bias"):
        EncoderConfig.from_hf_config({**QWEN3_EMBEDDING_0_6B_CONFIG, "attention_bias": True})
    with pytest.raises(ValueError, match="yarn"):
        EncoderConfig.from_hf_config({**QWEN3_EMBEDDING_0_6B_CONFIG, "rope_scaling": {"rope_type": "yarn"}})


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("shards", [1, 2])
def test_load_public_layout_every_tensor_lands(tmp_path, shards, capsys):
    cfg = tiny_cfg()
    state = public_state(cfg)
    folder = write_public(tmp_path / "qwen", public_config(cfg), state, shards=shards)
    if shards == 2:
        assert sorted(p.name for p in folder.glob("*.safetensors")) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    model = Encoder.from_pretrained(folder, num_registers=5)
    assert "suffix_registers" in capsys.readouterr().out  # the new parameter is reported
    ours = dict(model.named_parameters())
    assert len(ours) == len(state) + 1
    for key, tensor in state.items():
        assert ours[our_name(key)].dtype == torch.bfloat16
        assert torch.equal(ours[our_name(key)], tensor), key
    registers = ours["suffix_registers"]
    assert registers.shape == (4, cfg.hidden_size) and registers.dtype == torch.bfloat16
    assert torch.isfinite(registers).all() and registers.float().std() > 0
    model32 = Encoder.from_pretrained(folder, dtype=torch.float32)  # K from the default: 128
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    assert torch.equal(model32.blocks[1].attn.k_norm.weight, state["layers.1.self_attn.k_norm.weight"].float())
    ids = random_ids(model32, 2, 6, seed=1)
    assert model32(ids).shape == (2, EncoderConfig().num_registers, cfg.hidden_size)


def test_load_model_prefix_and_ignored_lm_head(tmp_path):
    cfg = tiny_cfg()
    state = public_state(cfg, dtype=torch.float32)
    prefixed = {f"model.{key}": value for key, value in state.items()}
    prefixed["lm_head.weight"] = state["embed_tokens.weight"]
    model = Encoder.from_pretrained(write_public(tmp_path / "lm", public_config(cfg, "float32"), prefixed))
    assert torch.equal(model.blocks[0].mlp.up_proj.weight, state["layers.0.mlp.up_proj.weight"])
    assert model.lm_head is None
    hidden = model.backbone(random_ids(model, 1, 5, seed=2))
    torch.testing.assert_close(model.lm_logits(hidden), hidden @ state["embed_tokens.weight"].T)


def test_load_untied_uses_lm_head(tmp_path):
    cfg = tiny_cfg(tie_word_embeddings=False)
    state = public_state(cfg, dtype=torch.float32)
    config = public_config(cfg, "float32")
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        Encoder.from_pretrained(write_public(tmp_path / "a", config, state))
    state["lm_head.weight"] = torch.randn(cfg.vocab_size, cfg.hidden_size)
    model = Encoder.from_pretrained(write_public(tmp_path / "b", config, state))
    hidden = model.backbone(random_ids(model, 1, 5, seed=2))
    torch.testing.assert_close(model.lm_logits(hidden), hidden @ state["lm_head.weight"].T)


@pytest.mark.parametrize("fault", ["renamed", "missing", "wrong_shape"])
def test_load_errors_name_the_key(tmp_path, fault):
    cfg = tiny_cfg()
    state = public_state(cfg)
    key = "layers.1.mlp.up_proj.weight"
    if fault == "renamed":
        state["layers.1.mlp.upproj.weight"] = state.pop(key)
        expected = ["layers.1.mlp.upproj.weight", key]
    elif fault == "missing":
        del state[key]
        expected = [key, "missing"]
    else:
        state[key] = state[key][:-1]
        expected = [key, "wrong shape"]
    folder = write_public(tmp_path / fault, public_config(cfg), state)
    with pytest.raises(CheckpointError) as error:
        Encoder.from_pretrained(folder)
    for text in expected:
        assert text in str(error.value)


def test_native_round_trip_and_register_count_change(tmp_path):
    model = tiny_model(seed=3)
    folder = model.save_pretrained(tmp_path / "ours")
    assert json.loads((folder / "config.json").read_text())["crocodil_model"] == "encoder"
    loaded = Encoder.from_pretrained(folder)
    assert loaded.cfg == model.cfg
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    ids = random_ids(model, 2, 7, seed=4)
    full = model(ids)
    torch.testing.assert_close(loaded(ids), full, rtol=0, atol=0)
    # Fewer registers: truncation is exact (register j only sees registers before it).
    fewer = Encoder.from_pretrained(folder, num_registers=3)
    torch.testing.assert_close(fewer(ids), full[:, :3], rtol=1e-5, atol=1e-5)
    # More registers: the stored ones are kept, the extra ones are new.
    more = Encoder.from_pretrained(folder, num_registers=10)
    torch.testing.assert_close(more(ids)[:, :8], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="encoder"):
        json_path = folder / "config.json"
        json_path.write_text(json.dumps({**json.loads(json_path.read_text()), "crocodil_model": "demasker"}))
        Encoder.from_pretrained(folder)


# ---------------------------------------------------------------- transformers parity
def test_backbone_matches_transformers_qwen3(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_cfg(vocab_size=97)
    hf_config = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True,
        attn_implementation="eager")
    torch.manual_seed(0)
    reference = transformers.Qwen3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.2)
    state = {key: value for key, value in reference.state_dict().items()}
    assert "model.embed_tokens.weight" in state  # CausalLM layout: the loader strips "model."
    bare = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    for name, checkpoint_state in (("causal_lm", state), ("bare", bare)):
        folder = write_public(tmp_path / name, public_config(cfg, "float32"), checkpoint_state)
        ours = Encoder.from_pretrained(folder).eval()
        ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(5))
        mask = torch.ones(3, 10, dtype=torch.bool)
        mask[1, 7:] = False   # right padding
        mask[2, :4] = False   # left padding
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            expected_full = reference.model(input_ids=ids).last_hidden_state
            expected_pad = reference.model(input_ids=ids, attention_mask=mask.long(),
                                           position_ids=positions).last_hidden_state
            expected_logits = reference(input_ids=ids).logits
            got_full = ours.backbone(ids)
            got_pad = ours.backbone(ids, mask)
        torch.testing.assert_close(got_full, expected_full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_pad[mask], expected_pad[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.lm_logits(got_full), expected_logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------- slow reference
def slow_rmsnorm(vector, weight, eps):
    return vector / math.sqrt(float((vector * vector).mean()) + eps) * weight


def slow_rope(vector, position, theta):
    half = vector.shape[0] // 2
    out = vector.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / vector.shape[0])
        a, b = float(vector[i]), float(vector[i + half])
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def slow_registers(model, ids, hidden):
    """One unpadded sequence, token by token, in float64: App. C registers with App. E hiding."""
    cfg = model.cfg
    W = {name: p.detach().double() for name, p in model.named_parameters()}
    n, hd, eps = len(ids), cfg.head_dim, cfg.rms_norm_eps
    inputs = [torch.zeros(cfg.hidden_size, dtype=torch.float64) if hidden[i] else W["embed_tokens.weight"][ids[i]]
              for i in range(n)] + list(W["suffix_registers"])
    positions = list(range(n)) + [n + j for j in range(cfg.num_registers - 1)]
    visible = [not h for h in hidden] + [True] * (cfg.num_registers - 1)
    states = [v.clone() for v in inputs]
    group = cfg.num_heads // cfg.num_kv_heads
    for layer in range(cfg.num_layers):
        p = f"blocks.{layer}."
        normed = [slow_rmsnorm(s, W[p + "attn_norm.weight"], eps) for s in states]
        q = [(W[p + "attn.q_proj.weight"] @ a).view(cfg.num_heads, hd) for a in normed]
        k = [(W[p + "attn.k_proj.weight"] @ a).view(cfg.num_kv_heads, hd) for a in normed]
        v = [(W[p + "attn.v_proj.weight"] @ a).view(cfg.num_kv_heads, hd) for a in normed]
        q = [torch.stack([slow_rope(slow_rmsnorm(h, W[p + "attn.q_norm.weight"], eps), positions[t], cfg.rope_theta)
                          for h in q[t]]) for t in range(len(states))]
        k = [torch.stack([slow_rope(slow_rmsnorm(h, W[p + "attn.k_norm.weight"], eps), positions[t], cfg.rope_theta)
                          for h in k[t]]) for t in range(len(states))]
        new_states = []
        for t in range(len(states)):
            keys = [j for j in range(t + 1) if visible[j]]
            heads = []
            for head in range(cfg.num_heads):
                kv = head // group
                if not keys:
                    heads.append(torch.zeros(hd, dtype=torch.float64))
                    continue
                scores = torch.tensor([float(q[t][head] @ k[j][kv]) / math.sqrt(hd) for j in keys])
                weights = torch.softmax(scores.double(), dim=0)
                heads.append(sum(w * v[j][kv] for w, j in zip(weights, keys)))
            h = states[t] + W[p + "attn.o_proj.weight"] @ torch.cat(heads)
            m = slow_rmsnorm(h, W[p + "mlp_norm.weight"], eps)
            gate = W[p + "mlp.gate_proj.weight"] @ m
            up = W[p + "mlp.up_proj.weight"] @ m
            new_states.append(h + W[p + "mlp.down_proj.weight"] @ (gate * torch.sigmoid(gate) * up))
        states = new_states
    out = [slow_rmsnorm(s, W["norm.weight"], eps) for s in states]
    registers = torch.stack([out[n - 1]] + out[n:])
    return registers / registers.norm(dim=-1, keepdim=True) * math.sqrt(cfg.hidden_size)


def test_registers_match_slow_reference_with_hiding():
    model = tiny_model(seed=6, num_registers=4)
    ids = random_ids(model, 1, 9, seed=7)[0]
    hidden = [False, True, False, False, True, True, False, False, False]
    got = model(ids[None], hide=torch.tensor([hidden]))[0]
    expected = slow_registers(model, ids.tolist(), hidden)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)
    got_plain = model(ids[None])[0]
    torch.testing.assert_close(got_plain.double(), slow_registers(model, ids.tolist(), [False] * 9),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ invariants
def pad_batch(rows, L, side, pad_id=0):
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for r, row in enumerate(rows):
        start = 0 if side == "right" else L - len(row)
        ids[r, start:start + len(row)] = row
        mask[r, start:start + len(row)] = True
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(side):
    model = tiny_model(seed=8)
    lengths = [5, 11, 8]
    rows = [random_ids(model, 1, n, seed=10 + n)[0] for n in lengths]
    hides = [torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3 for n in lengths]
    ids, mask = pad_batch(rows, 13, side, pad_id=7)
    hide = pad_batch([h.long() for h in hides], 13, side)[0].bool()
    batched = model(ids, mask)
    batched_hidden = model(ids, mask, hide=hide)
    for r, row in enumerate(rows):
        torch.testing.assert_close(batched[r], model(row[None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched_hidden[r], model(row[None], hide=hides[r][None])[0], rtol=1e-5, atol=1e-5)
    # the pad token id itself is irrelevant
    ids_other_pad = torch.where(mask, ids, torch.full_like(ids, 123))
    torch.testing.assert_close(model(ids_other_pad, mask), batched, rtol=1e-5, atol=1e-5)


def test_backbone_is_causal():
    model = tiny_model(seed=9)
    ids = random_ids(model, 1, 12, seed=11)
    before = model.backbone(ids)
    for i in (3, 11):
        changed = ids.clone()
        changed[0, i] = (changed[0, i] + 1) % model.cfg.vocab_size
        after = model.backbone(changed)
        torch.testing.assert_close(after[:, :i], before[:, :i], rtol=0, atol=1e-6)
        assert (after[:, i:] - before[:, i:]).abs().max() > 1e-3  # the test can fail


def test_hidden_positions_have_no_influence():
    model = tiny_model(seed=12)
    ids = random_ids(model, 2, 10, seed=13)
    hide = torch.zeros(2, 10, dtype=torch.bool)
    hide[0, [1, 4, 5]] = True
    hide[1, [0, 9]] = True  # includes the last token (register 0 comes from a hidden slot)
    scrambled = torch.where(hide, random_ids(model, 2, 10, seed=14), ids)
    reference = model(ids, hide=hide)
    torch.testing.assert_close(model(scrambled, hide=hide), reference, rtol=0, atol=0)
    # without hiding, the same change does move the registers
    assert (model(scrambled) - model(ids)).abs().max() > 1e-3
    # hidden_positions derives `hide` from the mask token
    model.cfg.mask_token_id = 3
    masked = torch.where(hide, torch.full_like(ids, 3), ids)
    torch.testing.assert_close(model(masked, hide=model.hidden_positions(masked)), reference, rtol=0, atol=0)


def test_register_norms_and_keep():
    model = tiny_model(seed=15)
    K, D = model.cfg.num_registers, model.cfg.hidden_size
    ids = random_ids(model, 4, 6, seed=16)
    registers = model(ids)
    torch.testing.assert_close(registers.norm(dim=-1), torch.full((4, K), math.sqrt(D)), rtol=1e-5, atol=1e-5)
    assert (registers[:, 0] - registers[:, 1]).abs().max() > 1e-3  # registers are distinct
    keep = torch.tensor([1, 3, 8, 0])
    kept = model(ids, keep=keep)
    mask = register_keep_mask(keep, K)
    assert mask.tolist()[1] == [True, True, True, False, False, False, False, False]
    assert torch.equal(kept[~mask], torch.zeros_like(kept[~mask]))
    assert torch.equal(kept[mask], registers[mask])
    with pytest.raises(ValueError, match="keep"):
        model(ids, keep=torch.tensor([1, 2, 9, 1]))
    generator = torch.Generator().manual_seed(0)
    draws = sample_keep(4000, K, generator)
    assert draws.min() == 1 and draws.max() == K and len(draws.unique()) == K
    assert torch.equal(sample_keep(10, K, torch.Generator().manual_seed(1)),
                       sample_keep(10, K, torch.Generator().manual_seed(1)))
    geometric = sample_keep(4000, K, torch.Generator().manual_seed(0), distribution="geometric")
    assert sorted(geometric.unique().tolist()) == [1, 2, 4, 8]


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    ids = random_ids(model, 2, 5, seed=0)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match="no valid token"):
        model(ids, mask)
    with pytest.raises(ValueError, match="hide"):
        model(ids, hide=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_parameter(checkpointing):
    model = tiny_model(seed=17).train()
    model.gradient_checkpointing = checkpointing
    ids, mask = pad_batch([random_ids(model, 1, n, seed=n)[0] for n in (4, 7)], 8, "left")
    target = torch.randn(2, model.cfg.num_registers, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    loss = (model(ids, mask, keep=torch.tensor([8, 5])) * target).sum()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    if checkpointing:  # same gradients as without checkpointing
        plain = tiny_model(seed=17).train()
        (plain(ids, mask, keep=torch.tensor([8, 5])) * target).sum().backward()
        for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_forward():
    model = tiny_model(seed=18)
    ids, mask = pad_batch([random_ids(model, 1, n, seed=n)[0] for n in (4, 9)], 10, "right")
    hide = torch.zeros_like(mask)
    hide[1, 2] = True
    reference = model(ids, mask, hide=hide)
    registers = model.to(torch.bfloat16)(ids, mask, hide=hide)
    assert registers.dtype == torch.bfloat16 and torch.isfinite(registers).all()
    torch.testing.assert_close(registers.float(), reference, rtol=0.1, atol=0.15)
