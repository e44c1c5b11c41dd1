"""layers.py against plain, slow loop implementations written independently here."""

import math

import pytest
import torch

from layers import Attention, RMSNorm, SwiGLU, apply_rope, attention, rope_angles, rope_cos_sin, rope_inv_freq


def slow_rmsnorm(x, weight, eps):
    out = torch.empty_like(x)
    for index in range(x.shape[0]):
        row = x[index]
        out[index] = row / math.sqrt(float((row * row).mean()) + eps) * weight
    return out


def slow_rope(vector, position, theta):
    """Rotate one head vector: pair i = (dim i, dim i + D/2) by angle position * theta^(-2i/D)."""
    dim = vector.shape[0]
    half = dim // 2
    out = vector.clone()
    for i in range(half):
        angle = position * theta ** (-2 * i / dim)
        a, b = float(vector[i]), float(vector[i + half])
        out[i] = a * math.cos(angle) - b * math.sin(angle)
        out[i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def slow_attention(q, k, v, allowed):
    """q (Hq,T,D), k/v (Hkv,S,D), allowed (T,S) -> (Hq,T,D) with explicit softmax loops."""
    n_rep = q.shape[0] // k.shape[0]
    out = torch.zeros_like(q)
    for h in range(q.shape[0]):
        kv_head = h // n_rep
        for i in range(q.shape[1]):
            keys = [j for j in range(k.shape[1]) if allowed[i, j]]
            if not keys:
                continue
            scores = torch.tensor([float(q[h, i] @ k[kv_head, j]) / math.sqrt(q.shape[-1]) for j in keys])
            weights = torch.softmax(scores, dim=0)
            for weight, j in zip(weights, keys):
                out[h, i] += weight * v[kv_head, j]
    return out


def test_rmsnorm_matches_loop():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data.normal_()
    x = torch.randn(5, 8)
    torch.testing.assert_close(norm(x), slow_rmsnorm(x, norm.weight.data, 1e-5), rtol=1e-5, atol=1e-6)


def test_rope_matches_loop_and_is_relative():
    torch.manual_seed(0)
    D, T, theta = 16, 7, 10000.0
    x = torch.randn(1, 1, T, D)
    positions = torch.arange(T) + 3
    cos, sin = rope_cos_sin(rope_angles(positions, rope_inv_freq(D, theta)))
    rotated = apply_rope(x, cos, sin)
    for t in range(T):
        torch.testing.assert_close(rotated[0, 0, t], slow_rope(x[0, 0, t], int(positions[t]), theta),
                                   rtol=1e-5, atol=1e-5)
    # Dot products depend on position differences only.
    q, k = torch.randn(D), torch.randn(D)
    dot_a = slow_rope(q, 5, theta) @ slow_rope(k, 2, theta)
    dot_b = slow_rope(q, 105, theta) @ slow_rope(k, 102, theta)
    assert abs(float(dot_a - dot_b)) < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_loop_with_gqa_and_mask(causal):
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 6, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    key_valid = torch.ones(B, T, dtype=torch.bool)
    key_valid[1, 4:] = False
    allowed = key_valid[:, None, None, :].expand(B, 1, T, T)
    out = attention(q, k, v, allowed=allowed, causal=causal)
    for b in range(B):
        mask = allowed[b, 0].clone()
        if causal:
            mask &= torch.ones(T, T, dtype=torch.bool).tril()
        torch.testing.assert_close(out[b], slow_attention(q[b], k[b], v[b], mask), rtol=1e-4, atol=1e-5)


def test_attention_row_without_keys_is_zero_not_nan():
    q = torch.randn(1, 1, 3, 4)
    k = v = torch.randn(1, 1, 3, 4)
    allowed = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])[None, None]
    out = attention(q, k, v, allowed=allowed)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0, 1], torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_modules_run_in_each_dtype(dtype):
    torch.manual_seed(0)
    attn = Attention(32, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True).to(dtype)
    mlp = SwiGLU(32, 64).to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    cos, sin = rope_cos_sin(rope_angles(torch.arange(5), rope_inv_freq(8, 1e4)))
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    out = mlp(attn(x, cos, sin, allowed=allowed, causal=True))
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out.float()).all()
    reference = SwiGLU(32, 64)
    reference.load_state_dict({k: v.float() for k, v in mlp.state_dict().items()})
    ref_attn = Attention(32, n_heads=4, n_kv_heads=2, head_dim=8, qk_norm=True)
    ref_attn.load_state_dict({k: v.float() for k, v in attn.state_dict().items()})
    expected = reference(ref_attn(x.float(), cos, sin, allowed=allowed, causal=True))
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)
