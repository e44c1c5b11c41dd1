"""The guided demasker f_theta: a LLaDA transformer conditioned on encoder registers.

Paper map (arXiv 2603.20210):
- Sec. 4.1 "Guided Demasker": f_theta(x_t, z_0) -> per-position logits over the vocabulary.
  With no registers it is the original demasker, i.e. a plain LLaDA MDM (the base model of
  Sec. 5), bit for bit the public GSAI-ML/LLaDA-8B-Base forward (../shared/reference/llada.md
  Sec. 2): token embedding, pre-norm blocks with bidirectional attention, RMSNorm, SwiGLU,
  rotate-half RoPE on positions 0..L-1, no biases, final RMSNorm, untied LM head.
- App. C, conditioning: the input is [START, z_1..z_k, END, E(x_t)]. The encoder registers
  z_j (width register_dim, 1024 for Qwen3-Embedding-0.6B) go through a learned linear
  projection register_dim -> d_model (no bias, like every LLaDA linear); START and END are
  learned d_model vectors. Logits are returned for the text positions only.
- CADD beside CRoCoDiL (extensions/cadd.py; ICLR 2026, not this paper): `latents` (B, L, D) are added to the input
  embedding of every [M] position (additive fusion E([M]) + z_t); cfg.cadd_schedule / cadd_table record how
  the model was trained ("none" = a plain MDM). Without latents the forward is unchanged, bit for bit.
- App. C, nested dropout: the trainer samples k per example and passes register_mask (B, k);
  False entries are hidden as keys from every query, which is exactly the same as leaving
  those registers out (tested). A batch may also carry fewer than max_registers registers.

Two-axis RoPE (App. C; the reasoning is ../shared/reference/qwen3.md Sec. 6). Every position
carries a global index g and a prefix-local index l:
- text token i:    g = l = i. Text positions never move when k changes, and with no
                   registers the positions are LLaDA's 0..L-1, so the pretrained text-to-text
                   geometry is untouched.
- prefix tokens:   all share one global slot just before the text, g = -1, and are told apart
                   by l, on local indices that no text token uses (all negative, K = max_registers):
                   START = -(K + 2), z_j = -(K + 2) + j (j = 1..k), END = -1. START, every z_j and
                   END sit at the same place whatever k is, and on the local pairs END is the token
                   right before the text (offset i + 1 to text token i), the registers before it.
                   Before this, the prefix used l = 0, 1..k, K + 1, so register i and text token i
                   had the same angle on the local pairs: exactly the positional clash the two-axis
                   design exists to avoid. Checkpoints saved then keep that layout
                   (prefix_local_positions="legacy", read from a config.json without the field).
The `prefix_rope_pairs` fastest frequency pairs (pair i = dims i and i + head_dim/2) rotate by
l, the remaining (slower) pairs by g. For text g = l, so text tokens see plain RoPE on every
pair. Why the fast pairs: only pairs with theta_i * K >~ 1 rad can separate K registers (the
slow pairs barely turn over the whole prefix); keeping the slow pairs on g makes the whole
prefix look, to every text token, like one token just before the document, independent of k,
so the pretrained long-range prior is kept; and between registers the fast pairs give clean
relative offsets (j_q - j_k) * theta_i ("co-located but ordered"). This is MRoPE with two
planes (Qwen2-VL), sections [prefix_rope_pairs, head_dim/2 - prefix_rope_pairs]. For
LLaDA-8B (head_dim 128, theta 5e5) we use 16 of the 64 pairs, the band Qwen2-VL gives its
temporal axis; pair 15 turns about 0.046 rad per register, ~6 rad across K = 128.

Padding: LLaDA data are padded on the right with EOS; `attention_mask` (B, L) hides pad
tokens as keys (queries at pad positions still produce ignored logits, as in LLaDA). Right
padding therefore never changes the valid logits. Left padding shifts the text away from
the prefix on the global axis, so with registers it does change results (without registers
RoPE is relative and it does not); pad on the right.

Initialisation from scratch is LLaDA's "mitchell" init (layers.init_transformer_block_;
embedding and LM head truncated normal, std 1/sqrt(d_model)). The conditioning parameters
are new in every case (also when loading public LLaDA weights): the projection is truncated
normal with std 1/sqrt(register_dim), so a register of norm sqrt(register_dim) (the encoder's
normalisation) maps to entries of about unit variance; START and END are normal with std
1/sqrt(d_model), the scale of a freshly initialised token embedding.
"""

import dataclasses
import json
import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from infra.checkpoint import (CheckpointError, assign_weights, config_from_dict, materialize_, read_config,
                        read_safetensors, rename_keys, resolve_model_dir, save_model_dir, swap_columns)
from layers import Block, RMSNorm, init_linear_, init_transformer_block_, rope_angles, rope_cos_sin, rope_inv_freq


PREFIX_LOCAL_POSITIONS = ("negative", "legacy")  # see the module docstring (two-axis RoPE)
CADD_SCHEDULES = ("linear", "cosine")  # CADD's gamma_bar_t of the [M] latents (cadd.gamma_bar); "none" = plain
CADD_TABLES = ("own", "frozen")        # CADD's latent table w: the own embedding, or the same values detached


@dataclass
class DemaskerConfig:
    """Defaults equal GSAI-ML/LLaDA-8B-Base (llada.md Sec. 1) plus the paper's conditioning."""
    vocab_size: int = 126464           # rows of the embedding and LM head (LLaDA's embedding_size)
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    mlp_hidden_size: int = 12288
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int = 126336        # <|mdm_mask|>
    eos_token_id: int = 126081         # <|endoftext|>
    bos_token_id: int = 126080         # <|startoftext|> (tokenizer / generation_config.json)
    pad_token_id: int = 126081         # LLaDA pads with EOS
    weight_tying: bool = False         # LLaDA-8B has an untied LM head
    register_dim: int = 1024           # encoder width (Qwen3-Embedding-0.6B); 0 = no conditioning
    max_registers: int = 128           # K, the paper's largest register bank
    prefix_rope_pairs: int = 16        # fastest rotary pairs on the prefix-local axis (of 64)
    prefix_local_positions: str = "negative"  # prefix-local indices: "negative" (no text index) | "legacy"
    max_sequence_length: int = 4096    # LLaDA's pre-training length (RoPE has no hard limit)
    cadd_schedule: str = "none"        # CADD (extensions/cadd.py): gamma_bar schedule of the [M] latents; "none" = plain MDM
    cadd_table: str = "own"            # CADD: latent table w = own embedding ("own") or its detached copy ("frozen")

    def __post_init__(self):
        self.register_dim = self.register_dim or 0
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        elif (self.d_model // self.n_heads) % 2:
            problems.append(f"head_dim={self.d_model // self.n_heads} must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.register_dim < 0 or self.max_registers < 0:
            problems.append("register_dim and max_registers must be >= 0")
        if self.d_model % self.n_heads == 0 and not 0 <= self.prefix_rope_pairs <= self.head_dim // 2:
            problems.append(f"prefix_rope_pairs={self.prefix_rope_pairs} must lie in [0, head_dim/2="
                            f"{self.head_dim // 2}]")
        if self.prefix_local_positions not in PREFIX_LOCAL_POSITIONS:
            problems.append(f"prefix_local_positions={self.prefix_local_positions!r} must be one of "
                            f"{PREFIX_LOCAL_POSITIONS}")
        if self.cadd_schedule not in ("none",) + CADD_SCHEDULES or self.cadd_table not in CADD_TABLES:
            problems.append(f"cadd_schedule={self.cadd_schedule!r} / cadd_table={self.cadd_table!r} must be one of "
                            f"{('none',) + CADD_SCHEDULES} / {CADD_TABLES}")
        if problems:
            raise ValueError("invalid DemaskerConfig: " + "; ".join(problems))

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @classmethod
    def llada_8b_base(cls, **overrides):
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides):
        fields = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=172,
                      rope_theta=10000.0, mask_token_id=511, eos_token_id=510, bos_token_id=509,
                      pad_token_id=510, register_dim=64, max_registers=8, prefix_rope_pairs=4,
                      max_sequence_length=256)
        return cls(**{**fields, **overrides})

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields):
        """A saved config; a conditioned one written before prefix_local_positions existed keeps the layout it
        was trained with ("legacy"; a base model without registers never used one)."""
        fields = dict(fields)
        fields.setdefault("prefix_local_positions", "legacy" if fields.get("register_dim") else "negative")
        return config_from_dict(cls, fields)

    @classmethod
    def from_hf_config(cls, hf, register_dim=1024, max_registers=128, prefix_rope_pairs=None):
        """Build from a public LLaDA config.json (field names of configuration_llada.py).

        Absent fields take LLaDA's class defaults (which differ from the 8B values). Settings
        this re-implementation does not cover raise one error listing all of them.
        prefix_rope_pairs None -> a quarter of the rotary pairs (16 of 64 for LLaDA-8B).
        """
        if hf.get("model_type", "llada") != "llada":
            raise ValueError(f"config.json has model_type={hf['model_type']!r}; the demasker loads LLaDA "
                             f"checkpoints (model_type 'llada', e.g. GSAI-ML/LLaDA-8B-Base)")
        unsupported = []
        for field, llada_default, supported, meaning in HF_REQUIRED_SETTINGS:
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
        return cls(
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


# Public LLaDA config fields whose value changes the computation:
# (field, LLaDA class default when absent, values we support, what it means).
# Dropout fields are ignored (they do not change the pretrained function; we train without
# dropout); rope_full_precision=False is accepted but RoPE is always applied in fp32.
HF_REQUIRED_SETTINGS = [
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
HF_KEY_TABLE = [
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
# Parameters no public LLaDA checkpoint has: initialised and reported on load.
CONDITIONING_PARAMS = ("register_proj.", "start_embedding", "end_embedding")


class Demasker(nn.Module):
    """f_theta: [START, W z_1..W z_k, END, E(x_t)] -> LLaDA blocks -> logits for the text positions."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([
            Block(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_hidden_size,
                  cfg.rms_norm_eps, qk_norm=False) for _ in range(cfg.n_layers)])
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.weight_tying:
            self.lm_head.weight = self.wte.weight
        if cfg.register_dim:
            self.register_proj = nn.Linear(cfg.register_dim, cfg.d_model, bias=False)
            self.start_embedding = nn.Parameter(torch.empty(cfg.d_model))
            self.end_embedding = nn.Parameter(torch.empty(cfg.d_model))
        self.init_weights_()

    # -- initialisation -------------------------------------------------------------------

    def init_weights_(self):
        """LLaDA's mitchell init for the transformer, then the conditioning parameters."""
        cfg = self.cfg
        init_linear_(self.wte, 1.0 / math.sqrt(cfg.d_model))
        for layer_id, block in enumerate(self.blocks):
            init_transformer_block_(block, layer_id, cfg.d_model, cfg.mlp_hidden_size)
        self.ln_f.reset_parameters()
        if not cfg.weight_tying:
            init_linear_(self.lm_head, 1.0 / math.sqrt(cfg.d_model))
        self.init_conditioning_()

    def init_conditioning_(self):
        """Projection: trunc. normal std 1/sqrt(register_dim); START/END: normal std 1/sqrt(d_model)."""
        if not self.cfg.register_dim:
            return
        init_linear_(self.register_proj, 1.0 / math.sqrt(self.cfg.register_dim))
        nn.init.normal_(self.start_embedding, std=1.0 / math.sqrt(self.cfg.d_model))
        nn.init.normal_(self.end_embedding, std=1.0 / math.sqrt(self.cfg.d_model))

    # -- positions ------------------------------------------------------------------------

    def positions(self, num_registers, seq_len, device=None):
        """Global and prefix-local indices (T,) for [START, z_1..z_k, END, text] (no prefix if None)."""
        text = torch.arange(seq_len, device=device)
        if num_registers is None:
            return text, text
        k, K = num_registers, self.cfg.max_registers
        prefix_global = torch.full((k + 2,), -1, device=device, dtype=torch.long)
        shift = -(K + 2) if self.cfg.prefix_local_positions == "negative" else 0
        prefix_local = torch.cat([torch.arange(k + 1, device=device),               # START=0, z_j=j
                                  torch.tensor([K + 1], device=device)]) + shift     # END=K+1 (then shifted)
        return torch.cat([prefix_global, text]), torch.cat([prefix_local, text])

    def rope_cos_sin(self, global_pos, local_pos):
        """Two-axis rotary cos/sin (1, T, D): pairs < prefix_rope_pairs rotate by l, the rest by g."""
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=global_pos.device)
        angles_global = rope_angles(global_pos, inv_freq)  # (T, D/2)
        angles_local = rope_angles(local_pos, inv_freq)    # (T, D/2)
        use_local = torch.arange(inv_freq.shape[0], device=inv_freq.device) < self.cfg.prefix_rope_pairs
        return rope_cos_sin(torch.where(use_local, angles_local, angles_global))  # (1, T, D) each

    # -- forward --------------------------------------------------------------------------

    def _prefix(self, registers, register_mask, batch, dtype):
        """[START, W z_1..W z_k, END] (B, k+2, D) and its key visibility (B, k+2) bool | None."""
        cfg = self.cfg
        if not cfg.register_dim:
            raise ValueError("this Demasker has register_dim=0 (no conditioning); pass registers=None "
                             "or build it with register_dim = the encoder width")
        if registers.dim() != 3 or registers.shape[0] != batch or registers.shape[2] != cfg.register_dim:
            raise ValueError(f"registers must be (B={batch}, k, register_dim={cfg.register_dim}), "
                             f"got {tuple(registers.shape)}")
        k = registers.shape[1]
        if k > cfg.max_registers:
            raise ValueError(f"{k} registers given but max_registers={cfg.max_registers}; "
                             f"raise max_registers in the config")
        projected = self.register_proj(registers.to(self.register_proj.weight.dtype)).to(dtype)  # (B, k, D)
        start = self.start_embedding.to(dtype).expand(batch, 1, -1)  # (B, 1, D)
        end = self.end_embedding.to(dtype).expand(batch, 1, -1)      # (B, 1, D)
        prefix = torch.cat([start, projected, end], dim=1)           # (B, k+2, D)
        if register_mask is None:
            return prefix, None
        if register_mask.shape != (batch, k):
            raise ValueError(f"register_mask must be (B, k) = {(batch, k)}, got {tuple(register_mask.shape)}")
        always = torch.ones(batch, 1, dtype=torch.bool, device=register_mask.device)
        return prefix, torch.cat([always, register_mask.to(torch.bool), always], dim=1)

    def forward(self, input_ids, registers=None, register_mask=None, attention_mask=None, latents=None,
                cache=None):
        """input_ids (B, L) long; registers (B, k, register_dim) | None; register_mask (B, k) bool
        (False = register withheld); attention_mask (B, L) bool (False = pad key); latents (B, L, D) | None:
        CADD's per-position continuous latents, added to the embedding of every [M] position (E([M]) + z_t,
        extensions/cadd.py), ignored elsewhere; None = the plain demasker, bit for bit -> logits (B, L, V).
        cache: kv_cache.BlockCache | None (approximate decoding cache, off by default): with cache.window None
        the full forward also stores every layer's keys and values; with a window (lo, hi) only text positions
        lo..hi-1 are computed against the stored keys and values -> logits (B, hi - lo, V)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        if cache is not None and cache.window is not None:
            if latents is not None:
                raise ValueError("the decoding cache does not support CADD latents; decode CADD without --cache")
            return self._forward_window(input_ids, registers, register_mask, attention_mask, cache)
        B, L = input_ids.shape
        x = self.wte(input_ids)  # (B, L, D)
        if latents is not None:
            if latents.shape != x.shape:
                raise ValueError(f"latents must be (B, L, d_model) = {tuple(x.shape)}, got {tuple(latents.shape)}")
            at_mask = (input_ids == self.cfg.mask_token_id).unsqueeze(-1)  # (B, L, 1)
            x = x + torch.where(at_mask, latents.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
        num_registers, prefix_keys, text_keys = None, None, None
        if registers is not None:
            num_registers = registers.shape[1]
            prefix, prefix_keys = self._prefix(registers, register_mask, B, x.dtype)
            x = torch.cat([prefix, x], dim=1)  # (B, P + L, D), P = k + 2
        elif register_mask is not None:
            raise ValueError("register_mask given without registers")
        if attention_mask is not None:
            if attention_mask.shape != (B, L):
                raise ValueError(f"attention_mask must be (B, L) = {(B, L)}, got {tuple(attention_mask.shape)}")
            text_keys = attention_mask.to(torch.bool)
        allowed = None  # (B, 1, 1, P + L) key visibility; None = every key visible (fast SDPA path)
        if prefix_keys is not None or text_keys is not None:
            P = x.shape[1] - L
            if prefix_keys is None:
                prefix_keys = torch.ones(B, P, dtype=torch.bool, device=x.device)
            if text_keys is None:
                text_keys = torch.ones(B, L, dtype=torch.bool, device=x.device)
            allowed = torch.cat([prefix_keys, text_keys], dim=1)[:, None, None, :]

        global_pos, local_pos = self.positions(num_registers, L, device=x.device)
        cos, sin = self.rope_cos_sin(global_pos, local_pos)
        if cache is not None:
            cache.prefix_length, cache.filled = x.shape[1] - L, True
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, allowed, use_reentrant=False)
            else:
                x = block(x, cos, sin, allowed=allowed, cache=None if cache is None else cache.layer(i))
        text = x[:, x.shape[1] - L:]  # (B, L, D): logits for text positions only
        return self.lm_head(self.ln_f(text))  # (B, L, V)

    def _key_visibility(self, registers, register_mask, attention_mask, B, L, device):
        """(B, 1, 1, P + L) bool visibility of every key, or None when all are visible (as forward builds it)."""
        if register_mask is None and attention_mask is None:
            return None
        P = 0 if registers is None else registers.shape[1] + 2
        prefix = torch.ones(B, P, dtype=torch.bool, device=device)
        if register_mask is not None:
            prefix[:, 1:-1] = register_mask.to(torch.bool)
        text = torch.ones(B, L, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
        return torch.cat([prefix, text], dim=1)[:, None, None, :]

    def _forward_window(self, input_ids, registers, register_mask, attention_mask, cache):
        """A cached step: text positions [lo, hi) only, against every layer's stored keys and values
        (extensions/kv_cache.py) -> logits (B, hi - lo, V)."""
        B, L = input_ids.shape
        lo, hi = cache.window
        P = cache.prefix_length
        if P != (0 if registers is None else registers.shape[1] + 2):
            raise RuntimeError("the registers changed shape since the cache was filled; refill it")
        allowed = self._key_visibility(registers, register_mask, attention_mask, B, L, input_ids.device)
        global_pos, local_pos = self.positions(None if registers is None else registers.shape[1], L,
                                               device=input_ids.device)
        cos, sin = self.rope_cos_sin(global_pos, local_pos)  # (1, 1, P + L, D)
        cos, sin = cos[..., P + lo:P + hi, :], sin[..., P + lo:P + hi, :]
        x = self.wte(input_ids[:, lo:hi])  # (B, W, D)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, allowed=allowed, cache=cache.layer(i))
        return self.lm_head(self.ln_f(x))  # (B, W, V)

    # -- checkpoints ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, register_dim=None, max_registers=None, dtype=None, device="cpu",
                        **overrides):
        """Load our own checkpoint or a public LLaDA one (hub id or local folder).

        Public LLaDA: config from `DemaskerConfig.from_hf_config`, keys through HF_KEY_TABLE; with
        register_dim > 0 (default 1024) the conditioning parameters are new: initialised and printed.
        register_dim=0 gives the plain base MDM. The checkpoint's dtype is kept unless dtype is given.
        """
        folder = resolve_model_dir(name_or_path)
        hf = read_config(folder)
        native = "crocodil_model" in hf
        if native:
            if hf["crocodil_model"] != "demasker":
                raise CheckpointError(f"{folder} holds a crocodil {hf['crocodil_model']}, not a demasker")
            cfg = DemaskerConfig.from_dict(hf)
        else:
            generation = folder / "generation_config.json"
            if "bos_token_id" not in hf and generation.is_file():
                hf = {**hf, "bos_token_id": json.loads(generation.read_text()).get("bos_token_id")}
            cfg = DemaskerConfig.from_hf_config(hf, register_dim=1024 if register_dim is None else register_dim)
        for name, value in (("register_dim", register_dim), ("max_registers", max_registers)):
            if value is not None:
                overrides[name] = value
        cfg = dataclasses.replace(cfg, **overrides)

        state = read_safetensors(folder, dtype=dtype, device=device)
        unexpected = []
        if not native:
            state, unexpected = rename_keys(state, HF_KEY_TABLE)
        if cfg.weight_tying and "wte.weight" in state:
            state.setdefault("lm_head.weight", state["wte.weight"])
        with torch.device("meta"):
            model = cls(cfg)
        try:
            # Conditioning parameters are new for public LLaDA and for our own base MDM (register_dim 0).
            adds_conditioning = not native or not hf.get("register_dim")
            new = assign_weights(model, state, new_ok=CONDITIONING_PARAMS if adds_conditioning else (),
                                 unexpected=unexpected, source=str(folder))
        except CheckpointError as error:
            if native:
                raise
            raise CheckpointError(_with_public_names(str(error), model.state_dict())) from None
        if cfg.weight_tying:
            model.lm_head.weight = model.wte.weight
        if new:
            weight_dtype = dtype or next(iter(state.values())).dtype
            materialize_(model, device, weight_dtype)
            model.init_conditioning_()
            print(f"Demasker.from_pretrained: initialised {len(new)} new parameters not in {folder}: "
                  + ", ".join(new))
        return model

    def save_pretrained(self, folder):
        """Our checkpoint: config.json (+ "crocodil_model": "demasker") and model.safetensors."""
        state = self.state_dict()
        if self.cfg.weight_tying:
            state.pop("lm_head.weight")  # shared with wte.weight; restored on load
        return save_model_dir(folder, state, {**self.cfg.to_dict(), "crocodil_model": "demasker"})


def _with_public_names(message, our_keys):
    """Append the public LLaDA name to each of our key names in an error message."""
    for ours in our_keys:
        public, _ = rename_keys({ours: None}, swap_columns(HF_KEY_TABLE))
        for name in public:
            message = re.sub(rf"(?<![\w.]){re.escape(ours)}(?![\w.])", f"{ours} [{name}]", message)
    return message
