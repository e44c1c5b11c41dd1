"""Tests for schedules.py: LLaDA masking + loss, reveal schedule, cosine DDPM / DDIM, App. E offsets."""

import math

import pytest
import torch

import schedules as S


# ---------------------------------------------------------------- discrete masking

def test_mask_probability_endpoints():
    assert S.mask_probability(0.0) == pytest.approx(1e-3)
    assert S.mask_probability(1.0) == pytest.approx(1.0)
    assert S.mask_probability(0.5, eps=0.1) == pytest.approx(0.55)


def test_mask_statistics_match_p_mask():
    g = torch.Generator().manual_seed(0)
    B, L = 8, 20000
    t = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.5, 0.7, 0.9, 1.0])
    x0 = torch.randint(0, 50, (B, L), generator=g)
    x_t, masked, p_mask = S.mask_tokens(x0, t, mask_id=99, generator=g)
    expected = (1 - 1e-3) * t + 1e-3
    assert torch.allclose(p_mask, expected[:, None].expand(B, L))
    frac = masked.float().mean(1)
    # binomial std <= 0.5 / sqrt(L) = 0.0035; allow 5 sigma
    assert torch.allclose(frac, expected, atol=0.018), (frac, expected)
    assert (x_t[masked] == 99).all() and torch.equal(x_t[~masked], x0[~masked])
    assert masked[-1].all()  # t = 1 -> p_mask = 1 masks everything


def test_mask_tokens_maskable_and_scalar_t():
    x0 = torch.arange(12).view(2, 6)
    maskable = torch.zeros(2, 6, dtype=torch.bool)
    maskable[:, 3:] = True
    x_t, masked, p = S.mask_tokens(x0, 1.0, mask_id=-1, maskable=maskable)
    assert torch.equal(masked, maskable)
    assert torch.equal(x_t[:, :3], x0[:, :3]) and (x_t[:, 3:] == -1).all()
    with pytest.raises(ValueError, match="t must be"):
        S.mask_tokens(x0, torch.rand(3), mask_id=0)


def test_mask_tokens_matches_llada_draw_order():
    # LLaDA forward_process: masked = torch.rand((b, l)) < p_mask, in the global RNG.
    x0 = torch.randint(0, 7, (3, 11))
    t = torch.tensor([0.2, 0.5, 0.8])
    torch.manual_seed(5)
    ref = torch.rand((3, 11)) < ((1 - 1e-3) * t + 1e-3)[:, None]
    torch.manual_seed(5)
    _, masked, _ = S.mask_tokens(x0, t, mask_id=7)
    assert torch.equal(masked, ref)


def test_loss_weight_is_inverse_p_mask():
    p = torch.tensor([1e-3, 0.25, 1.0])
    assert torch.allclose(S.loss_weight(p), torch.tensor([1000.0, 4.0, 1.0]))


def test_masked_diffusion_loss_hand_computation():
    g = torch.Generator().manual_seed(1)
    B, L, V = 2, 3, 5
    logits = torch.randn(B, L, V, generator=g)
    x0 = torch.randint(0, V, (B, L), generator=g)
    masked = torch.tensor([[True, False, True], [False, False, True]])
    p_mask = torch.tensor([[0.5] * 3, [0.25] * 3])
    total = 0.0
    for b in range(B):
        for i in range(L):
            if masked[b, i]:
                logp = logits[b, i] - torch.logsumexp(logits[b, i], 0)
                total += -logp[x0[b, i]].item() / p_mask[b, i].item()
    expected = total / (B * L)
    got = S.masked_diffusion_loss(logits, x0, masked, p_mask)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # gradients flow only to masked positions
    logits.requires_grad_(True)
    S.masked_diffusion_loss(logits, x0, masked, p_mask).backward()
    assert (logits.grad[~masked] == 0).all() and (logits.grad[masked].abs().sum(-1) > 0).all()


def test_masked_diffusion_loss_nothing_masked_is_zero():
    logits = torch.randn(1, 4, 3)
    loss = S.masked_diffusion_loss(logits, torch.zeros(1, 4, dtype=torch.long),
                                   torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 4))
    assert loss.item() == 0.0


# ---------------------------------------------------------------- reveal schedule

def llada_num_transfer_loop(n, steps):
    """Plain re-statement: n // steps each, the first n % steps steps get one more."""
    return [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


def test_num_transfer_tokens_hand_cases():
    mask = torch.zeros(4, 12, dtype=torch.bool)
    mask[0, :10] = True   # 10 over 4 -> 3 3 2 2
    mask[1, :4] = True    # 4 over 4  -> 1 1 1 1
    mask[2, :2] = True    # 2 over 4  -> 1 1 0 0
    mask[3, :12] = True   # 12 over 4 -> 3 3 3 3
    out = S.num_transfer_tokens(mask, 4)
    assert out.dtype == torch.long and out.shape == (4, 4)
    assert out.tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [1, 1, 0, 0], [3, 3, 3, 3]]


def test_num_transfer_tokens_sums_and_matches_loop():
    g = torch.Generator().manual_seed(2)
    for steps in [1, 3, 7, 16, 40]:
        mask = torch.rand(6, 33, generator=g) < torch.rand(6, 1, generator=g)
        out = S.num_transfer_tokens(mask, steps)
        assert torch.equal(out.sum(1), mask.sum(1))
        for b in range(6):
            assert out[b].tolist() == llada_num_transfer_loop(int(mask[b].sum()), steps)


# ---------------------------------------------------------------- cosine DDPM / DDIM

def test_alpha_bar_endpoints_monotone_and_formula():
    assert S.alpha_bar(0.0).item() == 1.0 and S.alpha_bar(1.0).item() == 0.0
    t = torch.linspace(0, 1, 1001)
    ab = S.alpha_bar(t)
    assert (ab[1:] < ab[:-1]).all()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert S.alpha_bar(0.3).item() == pytest.approx(f(0.3) / f(0.0), rel=1e-12)
    # clipping of t outside [0, 1]
    assert S.alpha_bar(-0.5).item() == 1.0 and S.alpha_bar(1.5).item() == 0.0
    # DiT's discrete table: alphas_cumprod[0] = ab(1/1000) ~ 0.999959
    assert S.alpha_bar(1 / 1000).item() == pytest.approx(0.999959, abs=2e-6)


def test_q_sample_formula_scalar_and_per_register_times():
    g = torch.Generator().manual_seed(3)
    z0, eps = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    t = torch.tensor([0.2, 0.9])
    zt = S.q_sample(z0, t, eps)
    for b in range(2):
        ab = S.alpha_bar(t[b]).item()
        assert torch.allclose(zt[b], math.sqrt(ab) * z0[b] + math.sqrt(1 - ab) * eps[b], atol=1e-6)
    tk = torch.rand(2, 4, generator=g)
    zt = S.q_sample(z0, tk, eps)
    for b in range(2):
        for k in range(4):
            ab = S.alpha_bar(tk[b, k]).item()
            ref = math.sqrt(ab) * z0[b, k] + math.sqrt(1 - ab) * eps[b, k]
            assert torch.allclose(zt[b, k], ref, atol=1e-6)
    assert torch.equal(S.q_sample(z0, torch.zeros(2), eps), z0)
    assert torch.allclose(S.q_sample(z0, torch.ones(2), eps), eps)


def test_q_sample_empirical_variance():
    z0 = torch.full((20000, 1, 4), 2.0)
    t = torch.full((20000,), 0.6)
    zt = S.q_sample(z0, t, torch.randn(20000, 1, 4))
    ab = S.alpha_bar(0.6).item()
    assert zt.mean().item() == pytest.approx(2 * math.sqrt(ab), abs=0.02)
    assert zt.var().item() == pytest.approx(1 - ab, abs=0.02)


def test_ddim_oracle_one_step_from_any_t():
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(3, 5, 16, generator=g)
    for t in [1.0, 0.7, 0.2, 0.01]:
        zt = S.q_sample(z0, torch.full((3,), t), torch.randn(3, 5, 16, generator=g))
        out = S.ddim_step(zt, z0, torch.full((3,), t), torch.zeros(3))
        assert torch.allclose(out, z0, atol=1e-6)


def test_ddim_oracle_trajectory_with_offsets_recovers_z0():
    g = torch.Generator().manual_seed(5)
    B, K, d, max_off = 2, 8, 16, 0.3
    z0 = torch.randn(B, K, d, generator=g)
    eps = torch.randn(B, K, d, generator=g)
    grid = S.ddim_timesteps(20, t_end=S.base_time_range(max_off)[0])
    z = S.q_sample(z0, S.register_times(grid[0].expand(B), K, max_off), eps)
    assert torch.allclose(z, eps)  # every register starts at pure noise
    for i in range(20):
        t = S.register_times(grid[i].expand(B), K, max_off)
        s = S.register_times(grid[i + 1].expand(B), K, max_off)
        z = S.ddim_step(z, z0, t, s)
        # the oracle keeps the DDIM state on the forward marginal with the same noise
        assert torch.allclose(z, S.q_sample(z0, s, eps), atol=1e-5)
        assert torch.isfinite(z).all()
    assert torch.allclose(z, z0, atol=1e-5)


def test_ddim_eta_noise_and_identity_when_time_stands_still():
    g = torch.Generator().manual_seed(6)
    z0, zt = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    t = torch.tensor([[0.5, 1.0, 0.0], [0.5, 1.0, 0.0]])
    s = torch.tensor([[0.4, 1.0, 0.0], [0.4, 1.0, 0.0]])
    noise = torch.randn(2, 3, 4, generator=g)
    out = S.ddim_step(zt, z0, t, s, eta=1.0, noise=noise)
    assert torch.equal(out[:, 1:], zt[:, 1:])  # registers whose time does not move are unchanged
    ab_t, ab_s = S.alpha_bar(0.5).item(), S.alpha_bar(0.4).item()
    eps_hat = (zt[:, 0] - math.sqrt(ab_t) * z0[:, 0]) / math.sqrt(1 - ab_t)
    sigma = math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_s)
    ref = math.sqrt(ab_s) * z0[:, 0] + math.sqrt(1 - ab_s - sigma ** 2) * eps_hat + sigma * noise[:, 0]
    assert torch.allclose(out[:, 0], ref, atol=1e-6)
    # eta = 0 differs from eta = 1 (the noise term is really used)
    assert not torch.allclose(S.ddim_step(zt, z0, t, s), out)


def test_ddim_timesteps():
    grid = S.ddim_timesteps(4)
    assert torch.allclose(grid, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    grid = S.ddim_timesteps(10, t_end=-0.2)
    assert grid[0] == 1.0 and grid[-1].item() == pytest.approx(-0.2) and (grid[1:] < grid[:-1]).all()
    with pytest.raises(ValueError):
        S.ddim_timesteps(0)


# ---------------------------------------------------------------- App. E offsets

def test_nested_levels_and_blocks_share_boundaries():
    assert S.nested_levels(1) == [1] and S.nested_levels(8) == [1, 2, 4, 8] and S.nested_levels(7) == [1, 2, 4, 7]
    assert S.nested_levels(128) == [1, 2, 4, 8, 16, 32, 64, 128] and S.nested_levels(20) == [1, 2, 4, 8, 16, 20]
    assert S.register_blocks(1) == [1]
    assert S.register_blocks(2) == [1, 1]
    assert S.register_blocks(3) == [1, 1, 1]
    assert S.register_blocks(8) == [1, 1, 2, 4]  # not sizes 1, 2, 4, ... truncated at K: [1, 2, 4, 1]
    assert S.register_blocks(128) == [1, 1, 2, 4, 8, 16, 32, 64]
    assert S.register_blocks(20) == [1, 1, 2, 4, 8, 4]
    for K in range(1, 70):
        blocks = S.register_blocks(K)
        assert sum(blocks) == K
        ends = [sum(blocks[:i + 1]) for i in range(len(blocks))]
        assert ends == S.nested_levels(K)  # every block ends at a nested-dropout level, and every level ends a block
    with pytest.raises(ValueError):
        S.nested_levels(0)


def test_keep_distributions():
    g = torch.Generator().manual_seed(0)
    uniform = S.sample_keep_levels(8000, 8, "uniform", generator=g)
    assert sorted(uniform.unique().tolist()) == list(range(1, 9))
    # "uniform" is number for number the draw it always was
    assert torch.equal(S.sample_keep_levels(50, 8, generator=torch.Generator().manual_seed(3)),
                       torch.randint(1, 9, (50,), generator=torch.Generator().manual_seed(3)))
    geometric = S.sample_keep_levels(8000, 8, "geometric", generator=torch.Generator().manual_seed(0))
    assert sorted(geometric.unique().tolist()) == [1, 2, 4, 8] and geometric.dtype == torch.long
    counts = torch.bincount(geometric, minlength=9)[[1, 2, 4, 8]].float() / 8000
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.03)  # uniform over the levels
    assert sorted(S.sample_keep_levels(2000, 7, "geometric", generator=g).unique().tolist()) == [1, 2, 4, 7]
    with pytest.raises(ValueError, match="geometric"):
        S.sample_keep_levels(3, 8, "normal")


def test_block_offsets_increasing_from_zero():
    off = S.block_offsets(4, 0.3)
    assert off[0] == 0 and off[-1].item() == pytest.approx(0.3) and (off[1:] > off[:-1]).all()
    assert S.block_offsets(1, 0.3).tolist() == [0.0]
    per_reg = S.block_time_offsets(8, 0.3)
    assert per_reg.shape == (8,)
    assert torch.allclose(per_reg, torch.tensor([0, .1, .2, .2, .3, .3, .3, .3], dtype=torch.float64))


def test_register_times_monotone_clipped_and_full_range():
    K, max_off = 15, 0.25
    t = torch.linspace(-max_off, 1, 501)
    tk = S.register_times(t, K, max_off)
    assert tk.shape == (501, K) and tk.dtype == torch.float32
    assert (tk >= 0).all() and (tk <= 1).all()
    assert (tk[:, 1:] >= tk[:, :-1]).all()  # later blocks never earlier
    unclipped = (tk > 0) & (tk < 1)
    both = unclipped[:, 0] & unclipped[:, -1]
    assert (tk[both, -1] - tk[both, 0] > 0.24).all()  # strictly ahead when not clipped
    # every block spans the full range [0, 1] over the base range
    assert (tk.min(0).values == 0).all() and (tk.max(0).values == 1).all()
    assert torch.allclose(S.register_times(torch.tensor([0.5]), K, max_off, enabled=False), torch.full((1, K), 0.5))
    lo, hi = S.base_time_range(max_off)
    assert (lo, hi) == (-max_off, 1.0) and S.base_time_range(max_off, enabled=False) == (0.0, 1.0)
    tb = S.sample_base_times(10000, max_off, generator=torch.Generator().manual_seed(0))
    assert tb.min() >= lo and tb.max() <= hi and abs(tb.mean().item() - (lo + hi) / 2) < 0.02
