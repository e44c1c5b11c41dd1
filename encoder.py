"""h_phi: the Qwen3 encoder that maps a token sequence to K register vectors.

Paper map:
- Sec. 4.1 "Encoder": z_0 = h_phi(x_0), trained jointly with the demasker (Algorithm 1, line 4).
- App. C: a Qwen embedding backbone (Qwen3-Embedding-0.6B, Sec. 5) with K-1 learned suffix
  register embeddings appended after the text, plus the usual last-valid-token summary:
      z_0 = (z^(1), ..., z^(K)),  z^(1) = state at the last valid token (Qwen's pooling),
                                  z^(j) = state at suffix register slot j-1,
  each register normalised to unit length and rescaled by sqrt(d).
  Nested dropout: per example only the first k registers are exposed (`keep`); k is drawn by `sample_keep`,
  uniform on {1..K} (App. C) or on the levels {1, 2, 4, ..., K} (App. E's grouping; schedules.py docstring).
- App. E (ConWithinDisc): the same encoder embeds a partially masked sequence x^(r) "with an
  attention mask that blocks information flow through masked positions" (`hide`).

Architecture (Qwen3, as in transformers' modeling_qwen3.py; exact parity in tests/test_encoder.py):
token embedding (no scaling) -> N pre-norm blocks (GQA attention with per-head q/k RMSNorm before
rotate-half RoPE, SwiGLU MLP, no biases) -> final RMSNorm. Attention is causal.

Sequence layout. For a batch of L token slots (padding anywhere, usually left or right) the
model runs on one buffer of T = L + K - 1 slots:
    [ x_1 .. x_L (valid tokens and padding) | r_1 .. r_{K-1} (suffix registers) ]
- Token positions are cumsum(attention_mask) - 1, so a valid token's RoPE position is its
  index among the valid tokens of its row, whatever the padding.
- Suffix register j gets position n_valid + j (directly after the last valid token).
- A key is visible iff it is a valid, non-hidden token or a register slot; attention is
  causal in buffer order. Among valid tokens buffer order is sequence order and the
  registers come after all of them, so every row computes exactly what it would compute
  alone and unpadded: padding never changes a result (up to float summation order).

Hiding (`hide`, App. E): a hidden position is invisible as a key to every query in every
layer, and its input embedding is replaced by zeros. Its slot still exists and keeps its
position, so visible tokens keep their positions (the model sees where the gaps are), but
the token ids at hidden positions cannot influence any output. A hidden position's own
output depends only on the visible tokens before it (this matters only if the last valid
token is hidden: register 0 is then that slot's output).

Init from scratch follows Qwen's `initializer_range` 0.02 (truncated at +-3 std) for every
linear and the embedding, norms at 1. The suffix registers start as N(0, s^2) with s the
std of the token-embedding matrix (0.02 from scratch; the pretrained value when loading), so
they enter the network at the scale of ordinary tokens; they are renormalised at the output.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from infra import public_weights
from infra.checkpoint import config_from_dict, save_model_dir
from layers import Block, RMSNorm, init_linear_, rope_angles, rope_cos_sin, rope_inv_freq
from schedules import sample_keep_levels

HF_KEY_TABLE = public_weights.QWEN3_KEY_TABLE  # public Qwen3 tensor name -> ours


@dataclass
class EncoderConfig:
    vocab_size: int = 151669
    hidden_size: int = 1024            # d, the width of every register
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768
    num_registers: int = 128           # K (paper Sec. 5: 1 <= k <= 128)
    pad_token_id: int = 151643         # Qwen pads with <|endoftext|>
    eos_token_id: int = 151643         # <|endoftext|>, appended by the data pipeline
    mask_token_id: Optional[int] = None  # only for `hidden_positions`; the encoder never sees [M] otherwise

    @classmethod
    def tiny(cls, **overrides):
        fields = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      max_position_embeddings=1024, num_registers=8, pad_token_id=0, eos_token_id=0,
                      mask_token_id=None)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def qwen3_embedding_0_6b(cls, **overrides):
        """The public Qwen/Qwen3-Embedding-0.6B config.json plus our K."""
        return cls(**overrides)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields):
        return config_from_dict(cls, fields)

    @classmethod
    def from_hf_config(cls, hf, **overrides):
        """From a public Qwen3 config.json dict (infra/public_weights.qwen3_config); overrides win."""
        return public_weights.qwen3_config(cls, hf, **overrides)


def register_keep_mask(keep, num_registers):
    """(B,) counts k -> (B, K) bool, True for the registers 0..k-1 that are exposed."""
    return torch.arange(num_registers, device=keep.device).unsqueeze(0) < keep.unsqueeze(1)


def sample_keep(batch_size, num_registers, generator=None, device=None, distribution="uniform"):
    """Nested dropout (App. C) -> (B,) long: k ~ U{1, ..., K} ("uniform"), or k uniform over the levels
    {1, 2, 4, ..., K} ("geometric", App. E's grouping, the paper preset); schedules.sample_keep_levels."""
    device = device if device is not None else (generator.device if generator is not None else "cpu")
    return sample_keep_levels(batch_size, num_registers, distribution, generator=generator, device=device)


class Encoder(nn.Module):
    """h_phi: tokens (B, L) -> K registers (B, K, D) (Sec. 4.1, App. C)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.num_registers < 1:
            raise ValueError(f"num_registers must be >= 1 (got {cfg.num_registers})")
        self.cfg = cfg
        D = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps,
                  qk_norm=True) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(D, cfg.vocab_size, bias=False)
        self.suffix_registers = nn.Parameter(torch.empty(cfg.num_registers - 1, D))  # (K-1, D)
        self.gradient_checkpointing = False
        if not self.embed_tokens.weight.is_meta:
            self.init_weights_()

    # ----------------------------------------------------------------- init
    def init_weights_(self):
        """Qwen-style init: N(0, 0.02) truncated at 3 std, norms at 1 (see module docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                init_linear_(module, 0.02)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.init_registers_()

    @torch.no_grad()
    def init_registers_(self, start=0):
        """Suffix registers start..K-2 ~ N(0, std(token embeddings)^2)."""
        std = self.embed_tokens.weight.float().std().item()
        fresh = torch.randn(self.suffix_registers[start:].shape, device=self.suffix_registers.device) * std
        self.suffix_registers[start:] = fresh.to(self.suffix_registers.dtype)

    # ------------------------------------------------------------- backbone
    def backbone(self, input_ids, attention_mask=None, hide=None, extra_embeddings=None):
        """Post-final-norm hidden states of [tokens | extra_embeddings] -> (B, L + E, D).

        input_ids (B, L) long; attention_mask (B, L) bool, True = valid token (None = all valid);
        hide (B, L) bool, True = hidden (see module docstring); extra_embeddings (B, E, D) are
        appended after the buffer with positions n_valid, n_valid + 1, ... and always visible.
        With extra_embeddings=None this is a causal LM feature extractor (see `lm_logits`).
        """
        _check_masks(input_ids, attention_mask, hide)
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        visible = attention_mask  # (B, L) keys that may be attended to
        x = self.embed_tokens(input_ids)  # (B, L, D)
        if hide is not None:
            hide = hide.bool() & attention_mask
            visible = attention_mask & ~hide
            x = x.masked_fill(hide.unsqueeze(-1), 0.0)
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, L)
        if extra_embeddings is not None:
            E = extra_embeddings.shape[1]
            n_valid = attention_mask.long().sum(dim=1, keepdim=True)  # (B, 1)
            extra_positions = n_valid + torch.arange(E, device=input_ids.device)  # (B, E)
            x = torch.cat([x, extra_embeddings.to(x.dtype)], dim=1)  # (B, L + E, D)
            positions = torch.cat([positions, extra_positions], dim=1)
            visible = torch.cat([visible, torch.ones(B, E, dtype=torch.bool, device=visible.device)], dim=1)
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=input_ids.device)
        cos, sin = rope_cos_sin(rope_angles(positions, inv_freq))  # (B, 1, T, head_dim) fp32
        # Key mask (True = visible); None lets SDPA use its fused causal kernel.
        allowed = None if bool(visible.all()) else visible[:, None, None, :]  # (B, 1, 1, T)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = activation_checkpoint(block, x, cos, sin, allowed, True, use_reentrant=False)
            else:
                x = block(x, cos, sin, allowed=allowed, causal=True)
        return self.norm(x)  # (B, T, D)

    def lm_logits(self, hidden):
        """Next-token logits from backbone states: (B, T, D) -> (B, T, V); tied = embedding matrix."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    # -------------------------------------------------------------- forward
    def forward(self, input_ids, attention_mask=None, hide=None, keep=None):
        """Registers z_0 = h_phi(x): (B, K, D), each of norm sqrt(D); registers >= keep[b] zeroed.

        input_ids (B, L) long; attention_mask (B, L) bool (valid, non-pad; None = all valid; every
        row needs >= 1 valid token); hide (B, L) bool masked positions to hide (App. E);
        keep (B,) long in [0, K], number of registers exposed per example (App. C nested dropout).
        """
        _check_inputs(self.cfg, input_ids, attention_mask, keep)
        B, L = input_ids.shape
        K, D = self.cfg.num_registers, self.cfg.hidden_size
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        attention_mask = attention_mask.bool()
        suffix = self.suffix_registers.unsqueeze(0).expand(B, K - 1, D)  # (B, K-1, D)
        hidden = self.backbone(input_ids, attention_mask, hide=hide, extra_embeddings=suffix)  # (B, L+K-1, D)
        slot_index = torch.arange(L, device=input_ids.device).expand(B, L)
        last_valid = torch.where(attention_mask, slot_index, -1).max(dim=1).values  # (B,)
        summary = hidden[torch.arange(B, device=hidden.device), last_valid]  # (B, D): z^(1), Qwen's pooling
        registers = torch.cat([summary.unsqueeze(1), hidden[:, L:]], dim=1)  # (B, K, D)
        registers = (F.normalize(registers.float(), dim=-1) * math.sqrt(D)).to(hidden.dtype)  # norm sqrt(D)
        if keep is not None:  # nested dropout: registers >= keep[b] are zeroed
            registers = registers * register_keep_mask(keep, K).unsqueeze(-1).to(registers.dtype)
        return registers

    def hidden_positions(self, input_ids, attention_mask=None):
        """hide mask for a sequence that carries mask tokens: input_ids == cfg.mask_token_id (and valid)."""
        if self.cfg.mask_token_id is None:
            raise ValueError("EncoderConfig.mask_token_id is None; set it or pass `hide` explicitly")
        hide = input_ids == self.cfg.mask_token_id
        return hide if attention_mask is None else hide & attention_mask.bool()

    # ------------------------------------------------------------------- io
    def save_pretrained(self, folder):
        config = {**self.cfg.to_dict(), "crocodil_model": "encoder"}
        return save_model_dir(folder, self.state_dict(), config)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device="cpu", **overrides):
        """Our checkpoint or a public Qwen3(-Embedding) one (infra/public_weights.load_encoder): overrides
        replace config fields (e.g. num_registers=16); the checkpoint dtype is kept unless `dtype` is given;
        suffix registers the checkpoint lacks are initialised and reported."""
        return public_weights.load_encoder(cls, EncoderConfig, name_or_path, dtype, device, overrides)


def _check_masks(input_ids, attention_mask, hide):
    """Encoder.backbone's masks must match input_ids (B, L)."""
    B, L = input_ids.shape
    if attention_mask is not None and attention_mask.shape != (B, L):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, L)}")
    if hide is not None and hide.shape != (B, L):
        raise ValueError(f"hide has shape {tuple(hide.shape)}, expected {(B, L)}")


def _check_inputs(cfg, input_ids, attention_mask, keep):
    """Encoder.forward's inputs; each message names the fix."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
    B, L = input_ids.shape
    valid = torch.ones(B, L, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask
    if not bool(valid.bool().any(dim=1).all()):
        raise ValueError("a row of attention_mask has no valid token; every sequence needs at least one "
                         "token (the data pipeline appends <|endoftext|>)")
    if keep is not None and (keep.shape != (B,) or bool((keep < 0).any()) or bool((keep > cfg.num_registers).any())):
        raise ValueError(f"keep must have shape ({B},) and lie in [0, {cfg.num_registers}] (number of registers "
                         f"exposed), got {keep.tolist()}")
