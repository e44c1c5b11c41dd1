"""Shared transformer primitives, written once and reused by every model.

Both backbones of CRoCoDiL are pre-norm transformers (paper Sec. 4.1, App. C):
the encoder h_phi is a Qwen3 decoder (causal, GQA, per-head q/k RMSNorm) and the
demasker f_theta is LLaDA (bidirectional, plain multi-head). The latent DiT g_psi
(App. E) reuses the same attention function. Everything here follows the numerics of the
public reference code (transformers' modeling_qwen3.py, LLaDA's modeling_llada.py; exact parity
in tests/test_encoder.py and tests/test_demasker.py):

- RMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the
  weight (plain `w`, not Gemma's `1 + w`).
- RoPE: rotate-half (NeoX / HF-Llama) layout; pair i is (dim i, dim i + D/2);
  angles computed in fp32, the rotation applied in fp32 and cast back.
- Attention: one function over `F.scaled_dot_product_attention`, so flash /
  memory-efficient kernels run on GPU when no explicit mask is needed.
- SwiGLU: down(silu(gate(x)) * up(x)).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in fp32 (Qwen3 / LLaDA)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


# ---------------------------------------------------------------------------
# Rotary position embeddings (rotate-half layout)
# ---------------------------------------------------------------------------

def rope_inv_freq(head_dim, theta, device=None):
    """inv_freq[i] = theta^(-2i / head_dim), i = 0 .. head_dim/2 - 1 (pair 0 is the fastest)."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    return 1.0 / (theta ** exponents)  # (D/2,)


def rope_angles(positions, inv_freq):
    """Angles pos * inv_freq in fp32. positions (..., T) -> (..., T, D/2)."""
    return positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)


def rope_cos_sin(angles):
    """(..., T, D/2) angles -> cos, sin of shape (..., 1, T, D) ready to broadcast over heads.

    `angles` is (B, T, D/2) or (T, D/2); the head axis is inserted before T.
    """
    emb = torch.cat([angles, angles], dim=-1)  # (..., T, D)
    return emb.cos().unsqueeze(-3), emb.sin().unsqueeze(-3)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x (B, H, T, D) by cos/sin (B or 1, 1, T, D); computed in fp32, cast back."""
    x_fp32 = x.float()
    return (x_fp32 * cos + rotate_half(x_fp32) * sin).to(x.dtype)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------

def attention(q, k, v, allowed=None, causal=False):
    """Scaled dot-product attention with an optional boolean visibility mask.

    q: (B, Hq, T, D); k, v: (B, Hkv, S, D) with Hq a multiple of Hkv (GQA: query
    head h uses kv head h // (Hq / Hkv), i.e. repeat-interleave as in Qwen3).
    allowed: bool, broadcastable to (B, Hq, T, S); True = query may attend to key.
    causal: additionally forbid key index > query index (requires T == S).

    A query that may see no key at all (a padded or hidden row) returns zeros
    instead of NaN, so it can never leak anything into the rest of the batch.
    Returns (B, Hq, T, D).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    T, S = q.shape[-2], k.shape[-2]
    if causal:
        causal_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        allowed = allowed & causal_mask
    row_sees_something = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, T, 1)
    # Give empty rows a harmless full row, then zero their output below.
    allowed = allowed | ~row_sees_something
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return out * row_sees_something.to(out.dtype)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention without biases.

    qk_norm=True gives Qwen3's per-head RMSNorm of q and k before RoPE.
    Used for self-attention (kv_input is None) and cross-attention (kv_input given).
    """

    def __init__(self, dim, n_heads, n_kv_heads=None, head_dim=None, qk_norm=False,
                 norm_eps=1e-6, kv_dim=None, bias=False):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = head_dim or dim // n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        kv_dim = kv_dim or dim
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, norm_eps) if qk_norm else None

    def forward(self, x, cos=None, sin=None, allowed=None, causal=False, kv_input=None, cache=None):
        """x (B, T, dim); kv_input (B, S, kv_dim) or None; cos/sin (B|1, 1, T, D) or None. cache: an object
        with merge(k, v) -> (k, v) (kv_cache.LayerKV): the keys and values of x's positions go in, those of
        the whole cached sequence come out (so x may be a window of it)."""
        B, T, _ = x.shape
        kv_input = x if kv_input is None else kv_input
        S = kv_input.shape[1]
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(kv_input).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(kv_input).view(B, S, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T|S, D)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.merge(k, v)  # (B, H_kv, S_cached, D)
        out = attention(q, k, v, allowed=allowed, causal=causal)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Qwen3 MLP; LLaDA's ff_proj/up_proj/ff_out)."""

    def __init__(self, dim, hidden_dim, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(norm(x)), then h + MLP(norm(h))."""

    def __init__(self, dim, n_heads, n_kv_heads, head_dim, mlp_hidden, norm_eps, qk_norm):
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, head_dim, qk_norm=qk_norm, norm_eps=norm_eps)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x, cos, sin, allowed=None, causal=False, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, allowed=allowed, causal=causal, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


def init_linear_(module, std):
    """Truncated normal init (+-3 std) for a Linear/Embedding weight; zero bias."""
    nn.init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def init_transformer_block_(block, layer_id, dim, mlp_hidden):
    """LLaDA's 'mitchell' init: std 1/sqrt(d_in); output projections also / sqrt(2(layer+1))."""
    depth_scale = math.sqrt(2.0 * (layer_id + 1))
    attn, mlp = block.attn, block.mlp
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        init_linear_(proj, 1.0 / math.sqrt(proj.in_features))
    init_linear_(attn.o_proj, 1.0 / math.sqrt(dim) / depth_scale)
    init_linear_(mlp.down_proj, 1.0 / math.sqrt(mlp_hidden) / depth_scale)
    for norm in (block.attn_norm, block.mlp_norm, attn.q_norm, attn.k_norm):
        if norm is not None:
            norm.reset_parameters()
