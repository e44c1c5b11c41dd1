"""Loading the encoder and the demasker: our own checkpoints and the public weights the paper starts from.

Paper Sec. 5: the encoder h_phi starts from Qwen/Qwen3-Embedding-0.6B and the demasker f_theta from
GSAI-ML/LLaDA-8B-Base. This module translates their config.json and tensor names, so that encoder.py and
demasker.py hold only the math; `Encoder.from_pretrained` and `Demasker.from_pretrained` call `load_encoder`
and `load_demasker` below. Each public model has
  - a config translation (public config.json -> our config dataclass) that refuses, in one error listing
    all of them, the settings that change the computation and that the re-implementation does not cover;
  - a key table of (public name, our name) templates, applied by `infra.checkpoint.rename_keys`;
  - a loader: the model is built on the meta device, the tensors are assigned in place
    (`infra.checkpoint.assign_weights`), and the parameters no public checkpoint has (the encoder's suffix
    registers; the demasker's register projection, START and END) are initialised and reported.
A load error names each missing or mis-shaped tensor also by its public name.

The model and config classes are passed in, so this module imports nothing outside infra/.
Tests: tests/test_encoder.py and tests/test_demasker.py (every public tensor lands where it should, exact
parity with transformers' Qwen3 and with a loop re-implementation of the public LLaDA forward).
"""

import dataclasses
import json
import re

import torch

from infra.checkpoint import (CheckpointError, assign_weights, materialize_, read_config, read_safetensors,
                              rename_keys, resolve_model_dir, swap_columns)


# ---------------------------------------------------------------------------
# Encoder: Qwen3 (Qwen/Qwen3-Embedding-0.6B)
# ---------------------------------------------------------------------------

# Public Qwen3 key -> our module name. Qwen3-Embedding stores the bare Qwen3Model (no "model."
# prefix); a leading "model." (reranker / CausalLM checkpoints) is stripped before this table.
QWEN3_KEY_TABLE = [
    ("embed_tokens.weight", "embed_tokens.weight"),
    ("layers.{}.input_layernorm.weight", "blocks.{}.attn_norm.weight"),
    ("layers.{}.self_attn.q_proj.weight", "blocks.{}.attn.q_proj.weight"),
    ("layers.{}.self_attn.k_proj.weight", "blocks.{}.attn.k_proj.weight"),
    ("layers.{}.self_attn.v_proj.weight", "blocks.{}.attn.v_proj.weight"),
    ("layers.{}.self_attn.o_proj.weight", "blocks.{}.attn.o_proj.weight"),
    ("layers.{}.self_attn.q_norm.weight", "blocks.{}.attn.q_norm.weight"),
    ("layers.{}.self_attn.k_norm.weight", "blocks.{}.attn.k_norm.weight"),
    ("layers.{}.post_attention_layernorm.weight", "blocks.{}.mlp_norm.weight"),
    ("layers.{}.mlp.gate_proj.weight", "blocks.{}.mlp.gate_proj.weight"),
    ("layers.{}.mlp.up_proj.weight", "blocks.{}.mlp.up_proj.weight"),
    ("layers.{}.mlp.down_proj.weight", "blocks.{}.mlp.down_proj.weight"),
    ("norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),  # untied checkpoints only; ignored when tied
]
ENCODER_NEW_PARAMETERS = ("suffix_registers",)  # not in any public checkpoint


def qwen3_config(config_cls, hf, **overrides):
    """An EncoderConfig from a public Qwen3 config.json dict (v4 `rope_theta` or v5 `rope_parameters`)."""
    if hf.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'qwen3'; the encoder only loads Qwen3 "
                         f"checkpoints (e.g. Qwen/Qwen3-Embedding-0.6B)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = []
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain RoPE is implemented)")
    if hf.get("attention_bias", False):
        problems.append("attention_bias=true (the encoder has no biases)")
    if hf.get("use_sliding_window", False):
        problems.append("use_sliding_window=true (only full attention is implemented)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
    if problems:
        raise ValueError("unsupported Qwen3 config: " + "; ".join(problems))
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id", 151643)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    pad = hf.get("pad_token_id")
    fields = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),  # Qwen3Config's default
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        eos_token_id=eos, pad_token_id=eos if pad is None else pad)
    fields.update(overrides)
    return config_cls(**fields)


def load_encoder(model_cls, config_cls, name_or_path, dtype=None, device="cpu", overrides=None):
    """Our encoder checkpoint or a public Qwen3(-Embedding) one (hub id or local folder).

    overrides replace config fields (e.g. num_registers=16). The checkpoint dtype is kept unless `dtype` is
    given. Suffix registers missing from the checkpoint are initialised and reported; a native checkpoint with
    more registers than asked is truncated (exact: register j only sees registers before it).
    """
    overrides = overrides or {}
    folder = resolve_model_dir(name_or_path)
    config = read_config(folder)
    state = read_safetensors(folder, dtype=dtype, device=device)
    native = "crocodil_model" in config
    if native:
        if config["crocodil_model"] != "encoder":
            raise CheckpointError(f"{folder} holds a crocodil {config['crocodil_model']!r}, not an encoder")
        cfg = config_cls.from_dict({**config, **overrides})
        unexpected = []
        stored = state.get("suffix_registers")
        if stored is not None and stored.shape[0] > cfg.num_registers - 1:
            state["suffix_registers"] = stored[:cfg.num_registers - 1].clone()
    else:
        cfg = qwen3_config(config_cls, config, **overrides)
        if "model.embed_tokens.weight" in state:  # reranker / CausalLM layout
            state = {key.removeprefix("model."): value for key, value in state.items()}
        ignore = [r"lm_head\..*"] if cfg.tie_word_embeddings else []
        state, unexpected = rename_keys(state, QWEN3_KEY_TABLE, ignore=ignore)
    with torch.device("meta"):
        model = model_cls(cfg)
    partial = None
    if "suffix_registers" in state and state["suffix_registers"].shape[0] < cfg.num_registers - 1:
        partial = state.pop("suffix_registers")
    try:
        new = assign_weights(model, state, new_ok=ENCODER_NEW_PARAMETERS, unexpected=unexpected,
                             source=str(folder))
    except CheckpointError as error:
        if native:
            raise
        raise CheckpointError(f"{error}\n{_qwen3_names_hint(model, state)}") from None
    materialize_(model, device, dtype or model.embed_tokens.weight.dtype)
    if new:
        model.init_registers_()
        if partial is not None:
            with torch.no_grad():
                model.suffix_registers[:partial.shape[0]] = partial.to(model.suffix_registers.dtype)
        print(f"Encoder.from_pretrained: initialised new parameters {new} "
              f"({0 if partial is None else partial.shape[0]} of {cfg.num_registers - 1} suffix registers "
              f"came from the checkpoint)")
    return model


def _qwen3_names_hint(model, state):
    """The missing / mis-shaped tensors named as in the public checkpoint."""
    expected = model.state_dict()
    ours = [key for key in expected if key not in state and not key.startswith(ENCODER_NEW_PARAMETERS)]
    ours += [key for key in state if key in expected and state[key].shape != expected[key].shape]
    public, _ = rename_keys(dict.fromkeys(ours), swap_columns(QWEN3_KEY_TABLE))
    return "In the public Qwen3 naming these are: " + (", ".join(sorted(public)[:20]) or "(none)")


# ---------------------------------------------------------------------------
# Demasker: LLaDA (GSAI-ML/LLaDA-8B-Base)
# ---------------------------------------------------------------------------

# Public LLaDA config fields whose value changes the computation (field names of the public
# configuration_llada.py): (field, LLaDA class default when absent, values we support, what it means).
# Dropout fields are ignored (they do not change the pretrained function; we train without
# dropout); rope_full_precision=False is accepted but RoPE is always applied in fp32.
LLADA_REQUIRED_SETTINGS = [
    ("block_type", "sequential", ("llama",), "LLaDALlamaBlock with separate q/k/v and gate/up"),
    ("activation_type", "swiglu", ("silu",), "SiLU(ff_proj(x)) * up_proj(x)"),
    ("rope", False, (True,), "rotary positions"),
    ("alibi", False, (False,), "ALiBi attention biases"),
    ("layer_norm_type", "default", ("rms",), "RMSNorm"),
    ("layer_norm_with_affine", True, (True,), "norm weights"),
    ("attention_layer_norm", False, (False,), "q/k norm"),
    ("include_bias", False, (False,), "linear biases"),
    ("include_qkv_bias", False, (False, None), "q/k/v biases"),
    ("bias_for_layer_norm", None, (False, None), "layer-norm biases"),
    ("input_emb_norm", False, (False,), "embedding scaling"),
    ("scale_logits", False, (False,), "1/sqrt(d) logit scaling"),
    ("block_group_size", 1, (1,), "grouped block key names"),
    ("clip_qkv", None, (None,), "q/k/v clipping"),
]

# Public LLaDA key -> our module name. '{}' is the block index. Note the two ff_out's:
# blocks.{}.ff_out is the MLP down projection, transformer.ff_out is the LM head.
LLADA_KEY_TABLE = [
    ("model.transformer.wte.weight",                  "wte.weight"),
    ("model.transformer.blocks.{}.attn_norm.weight",  "blocks.{}.attn_norm.weight"),
    ("model.transformer.blocks.{}.q_proj.weight",     "blocks.{}.attn.q_proj.weight"),
    ("model.transformer.blocks.{}.k_proj.weight",     "blocks.{}.attn.k_proj.weight"),
    ("model.transformer.blocks.{}.v_proj.weight",     "blocks.{}.attn.v_proj.weight"),
    ("model.transformer.blocks.{}.attn_out.weight",   "blocks.{}.attn.o_proj.weight"),
    ("model.transformer.blocks.{}.ff_norm.weight",    "blocks.{}.mlp_norm.weight"),
    ("model.transformer.blocks.{}.ff_proj.weight",    "blocks.{}.mlp.gate_proj.weight"),
    ("model.transformer.blocks.{}.up_proj.weight",    "blocks.{}.mlp.up_proj.weight"),
    ("model.transformer.blocks.{}.ff_out.weight",     "blocks.{}.mlp.down_proj.weight"),
    ("model.transformer.ln_f.weight",                 "ln_f.weight"),
    ("model.transformer.ff_out.weight",               "lm_head.weight"),
]


def llada_config(config_cls, hf, register_dim=1024, max_registers=128, prefix_rope_pairs=None):
    """A DemaskerConfig from a public LLaDA config.json dict (field names of configuration_llada.py).

    Absent fields take LLaDA's class defaults (which differ from the 8B values). Settings
    this re-implementation does not cover raise one error listing all of them.
    prefix_rope_pairs None -> a quarter of the rotary pairs (16 of 64 for LLaDA-8B).
    """
    if hf.get("model_type", "llada") != "llada":
        raise ValueError(f"config.json has model_type={hf['model_type']!r}; the demasker loads LLaDA "
                         f"checkpoints (model_type 'llada', e.g. GSAI-ML/LLaDA-8B-Base)")
    unsupported = []
    for field, llada_default, supported, meaning in LLADA_REQUIRED_SETTINGS:
        value = hf.get(field, llada_default)
        if value not in supported:
            unsupported.append(f"{field}={value!r} ({meaning}; supported: {supported})")
    if hf.get("bias_for_layer_norm") is None and hf.get("include_bias", False):
        unsupported.append("bias_for_layer_norm=None inherits include_bias=True (layer-norm biases)")
    if unsupported:
        raise ValueError("unsupported LLaDA settings in config.json: " + "; ".join(unsupported))
    missing = [name for name in ("d_model", "n_heads", "n_layers", "vocab_size") if name not in hf]
    if missing:
        raise ValueError(f"config.json lacks {missing}; is this a LLaDA config?")
    n_heads = hf["n_heads"]
    n_kv_heads = hf.get("n_kv_heads") or (1 if hf.get("multi_query_attention") else n_heads)
    head_dim = hf["d_model"] // n_heads
    return config_cls(
        vocab_size=hf.get("embedding_size") or hf["vocab_size"],
        d_model=hf["d_model"], n_layers=hf["n_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
        mlp_hidden_size=hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * hf["d_model"],
        rope_theta=float(hf.get("rope_theta", 10000.0)), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        mask_token_id=hf.get("mask_token_id", 50256), eos_token_id=hf.get("eos_token_id", 50256),
        bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id", 50256),
        weight_tying=bool(hf.get("weight_tying", True)), register_dim=register_dim,
        max_registers=max_registers,
        prefix_rope_pairs=head_dim // 8 if prefix_rope_pairs is None else prefix_rope_pairs,
        max_sequence_length=hf.get("max_sequence_length", 1024))


def with_prefix_layout(fields):
    """A saved demasker config.json dict with `prefix_local_positions` checked.

    Checkpoints store "negative" (demasker.py, two-axis RoPE); a base model without registers has no
    prefix, so a missing field means "negative" there. A conditioned checkpoint without the field (or with
    "legacy") was trained with an earlier prefix layout that this code does not implement: it is refused
    with the fix rather than decoded with the wrong positions (tests/test_demasker.py).
    """
    fields = dict(fields)
    layout = fields.get("prefix_local_positions", None if fields.get("register_dim") else "negative")
    if layout != "negative":
        raise ValueError(f"this demasker checkpoint was saved with an earlier register-prefix layout "
                         f"(prefix_local_positions={layout!r}); this code places the prefix on negative local "
                         f"positions (demasker.py, two-axis RoPE) and would decode it with the wrong positions. "
                         f"Retrain it with train_ae.py, or sample it with the commit that trained it")
    fields["prefix_local_positions"] = layout
    return fields


def load_demasker(model_cls, config_cls, name_or_path, register_dim=None, max_registers=None, dtype=None,
                  device="cpu", overrides=None, new_params=()):
    """Our demasker checkpoint or a public LLaDA one (hub id or local folder).

    Public LLaDA: config from `llada_config`, keys through LLADA_KEY_TABLE; with register_dim > 0 (default
    1024) the conditioning parameters (`new_params`, name prefixes) are new: initialised and printed.
    register_dim=0 gives the plain base MDM. The checkpoint's dtype is kept unless dtype is given.
    """
    overrides = dict(overrides or {})
    folder = resolve_model_dir(name_or_path)
    hf = read_config(folder)
    native = "crocodil_model" in hf
    if native:
        if hf["crocodil_model"] != "demasker":
            raise CheckpointError(f"{folder} holds a crocodil {hf['crocodil_model']}, not a demasker")
        cfg = config_cls.from_dict(hf)
    else:
        generation = folder / "generation_config.json"
        if "bos_token_id" not in hf and generation.is_file():
            hf = {**hf, "bos_token_id": json.loads(generation.read_text()).get("bos_token_id")}
        cfg = llada_config(config_cls, hf, register_dim=1024 if register_dim is None else register_dim)
    for name, value in (("register_dim", register_dim), ("max_registers", max_registers)):
        if value is not None:
            overrides[name] = value
    cfg = dataclasses.replace(cfg, **overrides)

    state = read_safetensors(folder, dtype=dtype, device=device)
    unexpected = []
    if not native:
        state, unexpected = rename_keys(state, LLADA_KEY_TABLE)
    if cfg.weight_tying and "wte.weight" in state:
        state.setdefault("lm_head.weight", state["wte.weight"])
    with torch.device("meta"):
        model = model_cls(cfg)
    try:
        # Conditioning parameters are new for public LLaDA and for our own base MDM (register_dim 0).
        adds_conditioning = not native or not hf.get("register_dim")
        new = assign_weights(model, state, new_ok=new_params if adds_conditioning else (),
                             unexpected=unexpected, source=str(folder))
    except CheckpointError as error:
        if native:
            raise
        raise CheckpointError(_with_llada_names(str(error), model.state_dict())) from None
    if cfg.weight_tying:
        model.lm_head.weight = model.wte.weight
    if new:
        weight_dtype = dtype or next(iter(state.values())).dtype
        materialize_(model, device, weight_dtype)
        model.init_conditioning_()
        print(f"Demasker.from_pretrained: initialised {len(new)} new parameters not in {folder}: "
              + ", ".join(new))
    return model


def _with_llada_names(message, our_keys):
    """Append the public LLaDA name to each of our key names in an error message."""
    for ours in our_keys:
        public, _ = rename_keys({ours: None}, swap_columns(LLADA_KEY_TABLE))
        for name in public:
            message = re.sub(rf"(?<![\w.]){re.escape(ours)}(?![\w.])", f"{ours} [{name}]", message)
    return message
