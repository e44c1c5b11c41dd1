"""g_psi: the latent prior, a PixArt-style 1-D DiT over the K encoder registers.

Paper map (arXiv 2603.20210):
- App. E: "a PixArt-style Transformer adapted to 1D sequences of register tokens: a compact
  28-layer variant with roughly 400M parameters", x0-prediction z0_hat = g_psi(z_t, t),
  trained with MSE averaged over registers (Algorithm 5, train_prior.py), sampled with DDIM.
- App. E, block-wise time offsets: registers in later geometric blocks are trained at larger
  effective times, so time is PER REGISTER: t has shape (B, K) and every modulation tensor is
  per token, (B, K, 6 * hidden), instead of PixArt's per-image (B, 6 * hidden).
- App. E, ConWithinDisc (Algorithm 4): the conditional prior cross-attends to h_phi(x^(r)),
  the encoder registers of a partially masked sequence, with their padding mask.

Architecture (DiT, Peebles & Xie 2023, models.py; PixArt-alpha, Chen et al. 2024, PixArt.py /
PixArt_blocks.py; read to learn, not copied):
    z_t (B, K, d) -> Linear(d, h) + pos[:K]                       (PatchEmbed -> Linear)
    t (B, K) -> sinusoid(1000 t, 256) -> Linear, SiLU, Linear      t_emb (B, K, h)
    t0 = t_block(t_emb) = Linear(SiLU(t_emb)), shared by all blocks  (B, K, 6h)  adaLN-single
    cond (B, S, c) -> Linear, GELU-tanh, Linear -> y (B, S, h), once (PixArt's CaptionEmbedder)
    depth x block:
        shift1, scale1, gate1, shift2, scale2, gate2 = table_block (6, h) + t0   each (B, K, h)
        x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)      bidirectional, no RoPE
        x = x + CrossAttn(x, y, cond_mask)                           plain residual (PixArt)
        x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)           GELU-tanh, ratio 4
    final: shift, scale = table_final (2, h) + t_emb; Linear(h, d)(LN(x) * (1 + scale) + shift)
LN is LayerNorm without affine parameters (eps 1e-6), as in DiT / PixArt.
A conditioning row whose mask is all False makes the cross-attention output its bias only
(layers.attention returns 0 for a query that sees no key), never NaN. Attention has
q/k/v/out biases (timm / PixArt qkv_bias=True). There is no causal mask.

Choices (documented deviations from an image DiT):
- Position embedding: DiT's FIXED 1-D sin-cos table over the register index, [sin | cos]
  halves, not learned. It is recomputed from the config (not stored in checkpoints), so a
  model may run on the first k <= K registers, which get positions 0..k-1.
- Time: t in [0, 1] is multiplied by `time_scale` = 1000 before DiT's sinusoid
  ([cos | sin], max period 10^4), so continuous times span the same arguments as DDPM's
  integer steps 0..999; without it the embedding barely changes with t.
- Identity at init: PixArt initialises the gate rows of its tables randomly (small but not
  zero). We zero the gate rows (2 and 5) of every block's table AND the matching output rows
  of t_block, so every gate is exactly 0 for any t; with PixArt's zero-initialised
  cross-attention output projection a fresh block is exactly the identity. Like PixArt the
  final Linear is zero-initialised, so a fresh model predicts z0_hat = 0.
- Init otherwise PixArt's: Xavier-uniform Linears with zero bias; N(0, 0.02) for the time
  MLP, t_block and the conditioning MLP; tables randn / sqrt(h).

Paper presets (`DiTConfig.paper()`: d 1024, K 128, 28 layers, mlp_ratio 4, head_dim 64; the counts are
exact and asserted in tests/test_latent_dit.py):
    unconditional, hidden 1088, 17 heads             409,000,896  (the prior of ConThenDisc)
    conditional,   hidden  960, 15 heads, cond 1024  423,968,704  (the prior of ConWithinDisc)
App. E gives ~400M and, for the conditional prior, "32 time steps, leading to < 2 NFE" (NFE = calls x
params / params of the 8B demasker, generators.paper_nfe). At width 1088 the cross-attentions would make
the conditional DiT 544M (32 x 544M / 8.02B = 2.17 NFE), so it narrows to 960 (our choice; the paper gives
no width): 1.69 NFE, plus one Qwen3-0.6B encoder call per refresh, 1.77 < 2; the unconditional prior costs
128 x 409M / 8.02B = 6.53 ("~6"). 17 and 15 heads of 64 keep head_dim 64 for the fused attention kernels.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from infra.checkpoint import config_from_dict, load_native, save_model_dir
from layers import Attention

# Chunk order of the 6 block modulation vectors (DiT / PixArt).
SHIFT_MSA, SCALE_MSA, GATE_MSA, SHIFT_MLP, SCALE_MLP, GATE_MLP = range(6)
GATE_ROWS = (GATE_MSA, GATE_MLP)


@dataclass
class DiTConfig:
    register_dim: int = 1024            # d of each register (Qwen3-Embedding-0.6B width)
    num_registers: int = 128            # K (positions available; fewer may be passed)
    hidden_size: int = 1088
    depth: int = 28
    num_heads: int = 17                 # head_dim = hidden_size / num_heads = 64
    mlp_ratio: float = 4.0
    cond_dim: Optional[int] = None      # width of the conditioning sequence; 0/None = unconditional
    frequency_embedding_size: int = 256
    time_scale: float = 1000.0          # t in [0,1] is scaled to DDPM's step range before the sinusoid
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.hidden_size % 2 or self.frequency_embedding_size % 2:
            raise ValueError(f"hidden_size={self.hidden_size} must be even and a multiple of num_heads="
                             f"{self.num_heads}; frequency_embedding_size={self.frequency_embedding_size} even")

    @property
    def conditional(self):
        return bool(self.cond_dim)

    @property
    def mlp_hidden_size(self):
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def tiny(cls, **overrides):
        fields = dict(register_dim=64, num_registers=8, hidden_size=64, depth=2, num_heads=4, mlp_ratio=4.0,
                      cond_dim=None)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def paper(cls, conditional=False, **overrides):
        """App. E: 28 layers, ~400M parameters; the conditional prior (conditional=True or a cond_dim override)
        at width 960 so that 32 calls stay below 2 NFE under the paper's count (module docstring)."""
        conditional = conditional or bool(overrides.get("cond_dim"))
        width = dict(hidden_size=960, num_heads=15) if conditional else dict(hidden_size=1088, num_heads=17)
        fields = dict(register_dim=1024, num_registers=128, depth=28, mlp_ratio=4.0,
                      cond_dim=1024 if conditional else None, **width)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields):
        return config_from_dict(cls, fields)


# -- fixed embeddings -----------------------------------------------------------------------

def sincos_position_embedding(num_positions, dim, device=None):
    """DiT's 1-D sin-cos table: row p = [sin(p w_i) | cos(p w_i)], w_i = 10000^(-i/(dim/2)). (P, dim) fp32."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, device=device, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(num_positions, device=device, dtype=torch.float64)[:, None] * omega  # (P, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


def timestep_frequency_embedding(t, dim, max_period=10000.0):
    """DiT's timestep sinusoid: [cos(t f_i) | sin(t f_i)], f_i = max_period^(-i/(dim/2)). t (...,) -> (..., dim) fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs  # (..., half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# -- modules ---------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """t (B, K) in [0, 1] -> (B, K, hidden): sinusoid of time_scale * t, then Linear, SiLU, Linear."""

    def __init__(self, hidden_size, frequency_embedding_size, time_scale):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale
        self.fc1 = nn.Linear(frequency_embedding_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t):
        freq = timestep_frequency_embedding(t * self.time_scale, self.frequency_embedding_size)
        return self.fc2(F.silu(self.fc1(freq.to(self.fc1.weight.dtype))))


class MLP(nn.Module):
    """in_dim -> hidden_dim -> out_dim (default in_dim): Linear, GELU-tanh, Linear, with biases (timm Mlp)."""

    def __init__(self, in_dim, hidden_dim, out_dim=None):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim or in_dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """PixArt block with per-token adaLN-single modulation and optional cross-attention."""

    def __init__(self, cfg):
        super().__init__()
        h = cfg.hidden_size
        self.norm1 = nn.LayerNorm(h, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = Attention(h, cfg.num_heads, bias=True)
        self.cross_attn = Attention(h, cfg.num_heads, bias=True) if cfg.conditional else None
        self.norm2 = nn.LayerNorm(h, eps=cfg.norm_eps, elementwise_affine=False)
        self.mlp = MLP(h, cfg.mlp_hidden_size)
        self.scale_shift_table = nn.Parameter(torch.empty(6, h))

    def forward(self, x, t0, cond=None, cond_allowed=None):
        """x (B, K, h); t0 (B, K, 6h) from t_block; cond (B, S, h) projected; cond_allowed (B, 1, 1, S) bool."""
        B, K, h = x.shape
        mods = self.scale_shift_table + t0.view(B, K, 6, h)  # (B, K, 6, h): per-register modulation
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods.unbind(dim=2)  # each (B, K, h)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, allowed=cond_allowed, kv_input=cond)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LN, shift/scale = table (2, h) + t_emb (per register), Linear(h, register_dim)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.empty(2, cfg.hidden_size))
        self.linear = nn.Linear(cfg.hidden_size, cfg.register_dim)

    def forward(self, x, t_emb):
        shift, scale = (self.scale_shift_table + t_emb[:, :, None, :]).unbind(dim=2)  # each (B, K, h)
        return self.linear(modulate(self.norm(x), shift, scale))


class LatentDiT(nn.Module):
    """g_psi(z_t, t | cond) -> z0_hat, x0-prediction over K registers (App. E)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        h = cfg.hidden_size
        self.x_embedder = nn.Linear(cfg.register_dim, h)
        self.t_embedder = TimestepEmbedder(h, cfg.frequency_embedding_size, cfg.time_scale)
        self.t_block = nn.Linear(h, 6 * h)  # applied to SiLU(t_emb); shared by every block (adaLN-single)
        if cfg.conditional:
            self.cond_embedder = MLP(cfg.cond_dim, h, h)  # cond_dim -> h -> h, applied once
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg)
        self.init_weights_()

    # -- initialisation -------------------------------------------------------------------

    @torch.no_grad()
    def init_weights_(self):
        """PixArt init, with exactly zero gates (see the module docstring)."""
        h = self.cfg.hidden_size
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        time_linears = [self.t_embedder.fc1, self.t_embedder.fc2, self.t_block]
        if self.cfg.conditional:
            time_linears += [self.cond_embedder.fc1, self.cond_embedder.fc2]
        for linear in time_linears:
            nn.init.normal_(linear.weight, std=0.02)
        for row in GATE_ROWS:  # t_block's output rows that feed the gates
            self.t_block.weight[row * h:(row + 1) * h].zero_()
            self.t_block.bias[row * h:(row + 1) * h].zero_()
        for block in self.blocks:
            block.scale_shift_table.copy_(torch.randn(6, h) / math.sqrt(h))
            block.scale_shift_table[list(GATE_ROWS)] = 0
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.o_proj.weight)
                nn.init.zeros_(block.cross_attn.o_proj.bias)
        self.final_layer.scale_shift_table.copy_(torch.randn(2, h) / math.sqrt(h))
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

    # -- forward ----------------------------------------------------------------------------

    def time_embedding(self, t):
        """t (B, K) -> t_emb (B, K, h) and the shared block modulation t0 (B, K, 6h). Per register:
        row j of both depends on t[:, j] only."""
        t_emb = self.t_embedder(t)
        return t_emb, self.t_block(F.silu(t_emb))

    def forward(self, z_t, t, cond=None, cond_mask=None):
        """z_t (B, k, d) noisy registers, k <= K (the first k); t (B, k) or (B,) in [0, 1];
        cond (B, S, cond_dim) and cond_mask (B, S) bool (True = valid) for a conditional model.
        Returns z0_hat (B, k, d)."""
        _check_inputs(self.cfg, z_t, t, cond, cond_mask)
        B, k, _ = z_t.shape
        if t.dim() == 1:
            t = t[:, None].expand(B, k)  # one time for every register
        cond, cond_allowed = self._embed_cond(cond, cond_mask)  # (B, S, h), (B, 1, 1, S) | None
        pos = sincos_position_embedding(k, self.cfg.hidden_size, device=z_t.device)  # (k, h)
        x = self.x_embedder(z_t) + pos.to(self.x_embedder.weight.dtype)  # (B, k, h)
        t_emb, t0 = self.time_embedding(t)  # (B, k, h), (B, k, 6h)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, t0, cond, cond_allowed, use_reentrant=False)
            else:
                x = block(x, t0, cond, cond_allowed)
        return self.final_layer(x, t_emb)  # (B, k, d)

    def _embed_cond(self, cond, cond_mask):
        """Project cond once (shared by all blocks): (B, S, cond_dim) -> (B, S, h); cond_mask (B, S) -> key
        visibility (B, 1, 1, S). (None, None) for an unconditional model."""
        if not self.cfg.conditional:
            return None, None
        return self.cond_embedder(cond), None if cond_mask is None else cond_mask[:, None, None, :]

    # -- checkpoints ------------------------------------------------------------------------

    def save_pretrained(self, folder):
        config = {**self.cfg.to_dict(), "crocodil_model": "latent_dit"}
        return save_model_dir(folder, self.state_dict(), config)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, device="cpu", **overrides):
        """A folder written by save_pretrained (no public one exists); keeps the stored dtype unless `dtype` is
        given; overrides replace config fields (e.g. num_registers)."""
        return load_native(cls, DiTConfig, "latent_dit", name_or_path, dtype, device, overrides, "latent DiT")


def _check_inputs(cfg, z_t, t, cond, cond_mask):
    """LatentDiT.forward's inputs; each message names the fix."""
    if z_t.dim() != 3 or z_t.shape[-1] != cfg.register_dim or z_t.shape[1] > cfg.num_registers:
        raise ValueError(f"z_t must be (B, k, register_dim={cfg.register_dim}) with k <= num_registers="
                         f"{cfg.num_registers} (or build the DiT with a larger num_registers); got {tuple(z_t.shape)}")
    B, k, _ = z_t.shape
    if not torch.is_floating_point(t) or tuple(t.shape) not in ((B,), (B, k)):
        raise ValueError(f"t must have shape (B,) = ({B},) or per register (B, k) = ({B}, {k}), float times in "
                         f"[0, 1]; got {t.dtype} {tuple(t.shape)}")
    if not cfg.conditional and (cond is not None or cond_mask is not None):
        raise ValueError("this LatentDiT is unconditional (cond_dim=0/None) but cond was given; "
                         "build it with DiTConfig(cond_dim=...) for ConWithinDisc, or pass cond=None")
    if cfg.conditional and (cond is None or cond.dim() != 3 or cond.shape[0] != B or cond.shape[-1] != cfg.cond_dim):
        raise ValueError(f"this LatentDiT is conditional: pass cond (B={B}, S, cond_dim={cfg.cond_dim}) and "
                         f"cond_mask (B, S), e.g. the encoder registers of x^(r); got "
                         f"{None if cond is None else tuple(cond.shape)}")
    if cond_mask is not None and (cond_mask.dtype != torch.bool or tuple(cond_mask.shape) != tuple(cond.shape[:2])):
        raise ValueError(f"cond_mask must be a bool tensor of shape {tuple(cond.shape[:2])} (True = valid); "
                         f"got {cond_mask.dtype} {tuple(cond_mask.shape)}")
