"""The guided demasker f_theta: a LLaDA transformer conditioned on encoder registers.

Paper map (arXiv 2603.20210):
- Sec. 4.1 "Guided Demasker": f_theta(x_t, z_0) -> per-position logits over the vocabulary.
  With no registers it is the original demasker, i.e. a plain LLaDA MDM (the base model of
  Sec. 5), bit for bit the public GSAI-ML/LLaDA-8B-Base forward (tests/test_demasker.py):
  token embedding, pre-norm blocks with bidirectional attention, RMSNorm, SwiGLU, rotate-half
  RoPE on positions 0..L-1, no biases, final RMSNorm, untied LM head.
- App. C, conditioning: the input is [START, z_1..z_k, END, E(x_t)]. The encoder registers z_j
  (width register_dim, 1024 for Qwen3-Embedding-0.6B) go through a learned linear projection
  register_dim -> d_model (no bias, like every LLaDA linear); START and END are learned d_model
  vectors. Logits are returned for the text positions only.
- App. C, nested dropout: the trainer samples k per example and passes register_mask (B, k);
  False entries are hidden as keys from every query, which is exactly the same as leaving
  those registers out (tested). A batch may also carry fewer than max_registers registers.
- CADD beside CRoCoDiL (extensions/cadd.py; ICLR 2026, not this paper): `latents` (B, L, D) are added
  to the input embedding of every [M] position (E([M]) + z_t); cfg.cadd_schedule / cadd_table record
  how the model was trained ("none" = a plain MDM). Without latents the forward is unchanged, bit for bit.

Two-axis RoPE (App. C). Every position carries a global index g and a prefix-local index l:
- text token i:  g = l = i. Text positions never move when k changes, and with no registers
                 they are LLaDA's 0..L-1, so the pretrained text-to-text geometry is untouched.
- prefix tokens: all share one global slot just before the text, g = -1, and are told apart by
                 l, on local indices no text token uses (K = max_registers): START = -(K + 2),
                 z_j = -(K + 2) + j (j = 1..k), END = -1. START, every z_j and END sit at the same
                 place whatever k is, and END is the token right before the text on both axes.
The `prefix_rope_pairs` fastest frequency pairs (pair i = dims i and i + head_dim/2) rotate by l, the
slower ones by g; for text g = l, so text sees plain RoPE on every pair. Only pairs with theta_i * K >~ 1
rad can separate K registers; keeping the slow pairs on g makes the whole prefix look, to every text
token, like one token just before the document, independent of k (the pretrained long-range prior is
kept), while the fast pairs give registers clean relative offsets (j_q - j_k) * theta_i. This is MRoPE
with two planes (Qwen2-VL), sections [prefix_rope_pairs, head_dim/2 - prefix_rope_pairs]; LLaDA-8B
(head_dim 128, theta 5e5) uses 16 of its 64 pairs (pair 15 turns ~0.046 rad per register).

Padding: LLaDA pads on the right with EOS; `attention_mask` (B, L) hides pad tokens as keys, so right
padding never changes the valid logits. Left padding moves the text away from the prefix on the global
axis, so with registers it does change results (without registers RoPE is relative); pad on the right.

Init from scratch is LLaDA's "mitchell" init (layers.init_transformer_block_; embedding and LM head
truncated normal, std 1/sqrt(d_model)). The conditioning parameters are new in every case (also on
public LLaDA weights): the projection is truncated normal, std 1/sqrt(register_dim), so a register of
norm sqrt(register_dim) (the encoder's normalisation) maps to entries of about unit variance; START and
END are normal, std 1/sqrt(d_model), the scale of a fresh token embedding.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from infra import public_weights
from infra.checkpoint import config_from_dict, save_model_dir
from layers import Block, RMSNorm, init_linear_, init_transformer_block_, rope_angles, rope_cos_sin, rope_inv_freq

CADD_SCHEDULES = ("linear", "cosine")  # CADD's gamma_bar_t of the [M] latents (cadd.gamma_bar); "none" = plain
CADD_TABLES = ("own", "frozen")        # CADD's latent table w: the own embedding, or the same values detached
CONDITIONING_PARAMS = ("register_proj.", "start_embedding", "end_embedding")  # absent from public LLaDA weights


@dataclass
class DemaskerConfig:
    """Defaults equal GSAI-ML/LLaDA-8B-Base's config.json plus the paper's conditioning."""
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
    prefix_local_positions: str = "negative"  # the prefix layout (two-axis RoPE, the module docstring)
    max_sequence_length: int = 4096    # LLaDA's pre-training length (RoPE has no hard limit)
    cadd_schedule: str = "none"        # CADD (extensions/cadd.py): gamma_bar of the [M] latents; "none" = plain MDM
    cadd_table: str = "own"            # CADD: latent table w = own embedding ("own") or its detached copy ("frozen")

    def __post_init__(self):
        self.register_dim = self.register_dim or 0
        _check_config(self)

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
        """A saved config.json dict (its prefix layout checked: public_weights.with_prefix_layout)."""
        return config_from_dict(cls, public_weights.with_prefix_layout(fields))

    @classmethod
    def from_hf_config(cls, hf, register_dim=1024, max_registers=128, prefix_rope_pairs=None):
        """From a public LLaDA config.json dict; prefix_rope_pairs None = a quarter of the rotary pairs."""
        return public_weights.llada_config(cls, hf, register_dim, max_registers, prefix_rope_pairs)


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
        """Global and prefix-local indices (T,) for [START, z_1..z_k, END, text] (text only if None)."""
        text = torch.arange(seq_len, device=device)
        if num_registers is None:
            return text, text
        k, K = num_registers, self.cfg.max_registers
        prefix_global = torch.full((k + 2,), -1, device=device, dtype=torch.long)  # one slot before the text
        prefix_local = torch.cat([torch.arange(-(K + 2), -(K + 2) + k + 1, device=device),  # START, z_1..z_k
                                  torch.full((1,), -1, device=device, dtype=torch.long)])    # END
        return torch.cat([prefix_global, text]), torch.cat([prefix_local, text])

    def rope_cos_sin(self, global_pos, local_pos):
        """Two-axis rotary cos/sin (1, T, D): pairs < prefix_rope_pairs rotate by l, the rest by g."""
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=global_pos.device)
        angles_global = rope_angles(global_pos, inv_freq)  # (T, D/2)
        angles_local = rope_angles(local_pos, inv_freq)    # (T, D/2)
        use_local = torch.arange(inv_freq.shape[0], device=inv_freq.device) < self.cfg.prefix_rope_pairs
        return rope_cos_sin(torch.where(use_local, angles_local, angles_global))  # (1, T, D) each

    # -- forward --------------------------------------------------------------------------

    def prefix(self, registers, dtype):
        """[START, W z_1..W z_k, END]: registers (B, k, register_dim) -> (B, k+2, D)."""
        B = registers.shape[0]
        projected = self.register_proj(registers.to(self.register_proj.weight.dtype)).to(dtype)  # (B, k, D)
        start = self.start_embedding.to(dtype).expand(B, 1, -1)  # (B, 1, D)
        end = self.end_embedding.to(dtype).expand(B, 1, -1)      # (B, 1, D)
        return torch.cat([start, projected, end], dim=1)         # (B, k+2, D)

    def forward(self, input_ids, registers=None, register_mask=None, attention_mask=None, latents=None,
                cache=None):
        """input_ids (B, L) long; registers (B, k, register_dim) | None; register_mask (B, k) bool
        (False = register withheld); attention_mask (B, L) bool (False = pad key); latents (B, L, D) | None:
        CADD's per-position continuous latents, added to the embedding of every [M] position (E([M]) + z_t,
        extensions/cadd.py), ignored elsewhere; None = the plain demasker, bit for bit -> logits (B, L, V).
        cache: kv_cache.BlockCache | None (approximate decoding cache, off by default): with cache.window None
        the full forward also stores every layer's keys and values; with a window (lo, hi) only text positions
        lo..hi-1 are computed against the stored keys and values -> logits (B, hi - lo, V)."""
        _check_inputs(self.cfg, input_ids, registers, register_mask, attention_mask, latents, cache)
        if cache is not None and cache.window is not None:
            return self._forward_window(input_ids, registers, register_mask, attention_mask, cache)
        B, L = input_ids.shape
        x = self.wte(input_ids)  # (B, L, D)
        if latents is not None:  # CADD: E([M]) + z_t at the [M] positions, nothing elsewhere
            at_mask = (input_ids == self.cfg.mask_token_id).unsqueeze(-1)  # (B, L, 1)
            x = x + torch.where(at_mask, latents.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))
        num_registers = None if registers is None else registers.shape[1]
        if registers is not None:
            x = torch.cat([self.prefix(registers, x.dtype), x], dim=1)  # (B, P + L, D), P = k + 2
        # (B, 1, 1, P + L) key visibility; None = every key visible (fast SDPA path)
        allowed = self._key_visibility(registers, register_mask, attention_mask, B, L, x.device)
        cos, sin = self.rope_cos_sin(*self.positions(num_registers, L, device=x.device))  # (1, P + L, head_dim)
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
        cos, sin = self.rope_cos_sin(global_pos, local_pos)  # (1, P + L, head_dim) each
        cos, sin = cos[..., P + lo:P + hi, :], sin[..., P + lo:P + hi, :]
        x = self.wte(input_ids[:, lo:hi])  # (B, W, D)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, allowed=allowed, cache=cache.layer(i))
        return self.lm_head(self.ln_f(x))  # (B, W, V)

    # -- checkpoints ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, register_dim=None, max_registers=None, dtype=None, device="cpu",
                        **overrides):
        """Our checkpoint or a public LLaDA one (hub id or folder; infra/public_weights.load_demasker).
        Public weights get new conditioning parameters (register_dim 1024 unless given; 0 = the plain base
        MDM), initialised and printed. The checkpoint's dtype is kept unless dtype is given."""
        return public_weights.load_demasker(cls, DemaskerConfig, name_or_path, register_dim, max_registers, dtype,
                                            device, overrides, new_params=CONDITIONING_PARAMS)

    def save_pretrained(self, folder):
        """Our checkpoint: config.json (+ "crocodil_model": "demasker") and model.safetensors."""
        state = self.state_dict()
        if self.cfg.weight_tying:
            state.pop("lm_head.weight")  # shared with wte.weight; restored on load
        return save_model_dir(folder, state, {**self.cfg.to_dict(), "crocodil_model": "demasker"})


def _check_inputs(cfg, input_ids, registers, register_mask, attention_mask, latents, cache):
    """Demasker.forward's input shapes; each message names the fix."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    if latents is not None and cache is not None and cache.window is not None:
        raise ValueError("the decoding cache does not support CADD latents; decode CADD without --cache")
    if latents is not None and latents.shape != (B, L, cfg.d_model):
        raise ValueError(f"latents must be (B, L, d_model) = {(B, L, cfg.d_model)}, got {tuple(latents.shape)}")
    if registers is None:
        if register_mask is not None:
            raise ValueError("register_mask given without registers")
    elif not cfg.register_dim:
        raise ValueError("this Demasker has register_dim=0 (no conditioning); pass registers=None "
                         "or build it with register_dim = the encoder width")
    elif registers.dim() != 3 or registers.shape[0] != B or registers.shape[2] != cfg.register_dim:
        raise ValueError(f"registers must be (B={B}, k, register_dim={cfg.register_dim}), "
                         f"got {tuple(registers.shape)}")
    elif registers.shape[1] > cfg.max_registers:
        raise ValueError(f"{registers.shape[1]} registers given but max_registers={cfg.max_registers}; "
                         f"raise max_registers in the config")
    elif register_mask is not None and register_mask.shape != (B, registers.shape[1]):
        raise ValueError(f"register_mask must be (B, k) = {(B, registers.shape[1])}, "
                         f"got {tuple(register_mask.shape)}")
    if attention_mask is not None and attention_mask.shape != (B, L):
        raise ValueError(f"attention_mask must be (B, L) = {(B, L)}, got {tuple(attention_mask.shape)}")


def _check_config(cfg):
    """DemaskerConfig's settings (the CLI, config/ae_args.py, checks user input before this)."""
    if cfg.d_model % cfg.n_heads or cfg.head_dim % 2 or cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(f"invalid DemaskerConfig: d_model={cfg.d_model} must split into n_heads={cfg.n_heads} "
                         f"heads of even width, n_heads a multiple of n_kv_heads={cfg.n_kv_heads}")
    if not 0 <= cfg.prefix_rope_pairs <= cfg.head_dim // 2 or min(cfg.register_dim, cfg.max_registers) < 0:
        raise ValueError(f"invalid DemaskerConfig: prefix_rope_pairs={cfg.prefix_rope_pairs} must lie in "
                         f"[0, head_dim/2={cfg.head_dim // 2}], register_dim and max_registers >= 0")
    if cfg.prefix_local_positions != "negative":
        raise ValueError(f"prefix_local_positions={cfg.prefix_local_positions!r}: only 'negative' is implemented")
    if cfg.cadd_schedule not in ("none",) + CADD_SCHEDULES or cfg.cadd_table not in CADD_TABLES:
        raise ValueError(f"cadd_schedule={cfg.cadd_schedule!r} / cadd_table={cfg.cadd_table!r} must be one of "
                         f"{('none',) + CADD_SCHEDULES} / {CADD_TABLES}")
