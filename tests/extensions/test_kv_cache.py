"""extensions/kv_cache.py and the decoding loop's `cache` option (Fast-dLLM-style approximate caching).

What can be checked exactly: a window step right after a fill equals the full forward on the window (any
depth); with one layer, cached decoding is token-for-token the uncached one (layer-1 keys and values depend on
the tokens only), including ConWithinDisc-style register redraws (which must refill) and register guidance.
With two layers the cache is an approximation: the decoded tokens may differ, the NFE may not."""

import pytest
import torch

import mdm as M
from demasker import Demasker, DemaskerConfig
from extensions.kv_cache import BlockCache

K, D_REG = 4, 16


def demasker(layers, seed=0):
    torch.manual_seed(seed)
    return Demasker(DemaskerConfig.tiny(n_layers=layers, register_dim=D_REG, max_registers=8)).eval()


def registers(batch=3, seed=1):
    return torch.randn(batch, K, D_REG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_window_step_after_a_fill_equals_the_full_forward_on_the_window(mode):
    model, regs = demasker(layers=2), registers()
    mask = torch.tensor([[True, False, True, True]] * 3)
    x = torch.randint(4, 500, (3, 40), generator=torch.Generator().manual_seed(3))
    x[:, 16:] = model.cfg.mask_token_id
    with torch.no_grad():
        full = model(x, registers=regs, register_mask=mask)  # (B, L, V)
        cache = BlockCache(mode)
        cache.refill()
        assert torch.equal(model(x, registers=regs, register_mask=mask, cache=cache), full)  # a fill changes nothing
        cache.use(16, 24, x.shape[1])
        window = model(x, registers=regs, register_mask=mask, cache=cache)
    lo, hi = (16, 40) if mode == "prefix" else (16, 24)
    assert window.shape == (3, hi - lo, full.shape[-1])
    torch.testing.assert_close(window, full[:, lo:hi], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("remasking, temperature", [("low_confidence", 0.0), ("random", 1.0)])
def test_one_layer_cached_decoding_is_exactly_the_uncached_one(mode, remasking, temperature):
    model, regs = demasker(layers=1), registers()
    outs = {}
    for cache in ("none", mode):
        tokens, nfe = M.generate(model, 3, 32, 8, 16, temperature, remasking, registers=regs,
                                 generator=torch.Generator().manual_seed(5), decoding=M.Decoding(cache=cache))
        outs[cache] = (tokens, nfe)
    assert torch.equal(outs["none"][0], outs[mode][0]) and outs["none"][1] == outs[mode][1] == 16


def test_new_registers_refill_the_cache():
    """A ConWithinDisc redraw mid-block changes the registers' keys and values: the step must refill (with one
    layer the result is then exact; reusing the stale keys would not be)."""
    model = demasker(layers=1)
    first, second = registers(seed=1), registers(seed=2)

    def redraw(step, x, regs, mask):
        return (second, mask) if step == 3 else None

    outs = [M.generate(model, 3, 32, 8, 16, 0.0, registers=first, refresh_registers=redraw,
                       decoding=M.Decoding(cache=cache))[0] for cache in ("none", "dual")]
    assert torch.equal(outs[0], outs[1])
    stale = BlockCache("dual")  # what the loop would compute without the refill: differs on the window
    x = torch.full((3, 32), model.cfg.mask_token_id)
    with torch.no_grad():
        stale.refill()
        model(x, registers=first, cache=stale)
        stale.use(0, 8, 32)
        assert not torch.allclose(model(x, registers=second, cache=stale), model(x, registers=second)[:, :8])


def test_register_guidance_and_threshold_decoding_work_through_the_cache():
    model, regs = demasker(layers=1), registers()
    for decoding in (M.Decoding(guidance=2.0), M.Decoding(rule="threshold", threshold=0.05)):
        plain = M.generate(model, 3, 32, 8, 16, 0.0, registers=regs, decoding=decoding)
        cached = M.generate(model, 3, 32, 8, 16, 0.0, registers=regs,
                            decoding=M.Decoding(**{**decoding.__dict__, "cache": "prefix"}))
        assert torch.equal(plain[0], cached[0]) and plain[1] == cached[1]


def test_two_layers_are_approximate_with_the_same_nfe():
    model, regs = demasker(layers=2), registers(batch=8)
    plain, nfe_plain = M.generate(model, 8, 64, 16, 64, 0.0, registers=regs)
    cached, nfe_cached = M.generate(model, 8, 64, 16, 64, 0.0, registers=regs, decoding=M.Decoding(cache="dual"))
    assert nfe_plain == nfe_cached == 64
    assert not torch.equal(plain, cached)  # the window path really ran (an exact copy would mean no reuse)


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="cache must be one of"):
        M.Decoding(cache="full").check()
    with pytest.raises(ValueError, match="prefix"):
        BlockCache("none")
    with pytest.raises(RuntimeError, match="fill"):
        BlockCache("dual").use(0, 8, 32)
    model, cache = demasker(layers=1), BlockCache("prefix")
    x = torch.full((1, 16), model.cfg.mask_token_id)
    with torch.no_grad():
        cache.refill()
        model(x, registers=registers(batch=1), cache=cache)
        cache.use(0, 8, 16)
        with pytest.raises(ValueError, match="CADD"):
            model(x, registers=registers(batch=1), cache=cache, latents=torch.zeros(1, 16, model.cfg.d_model))
        with pytest.raises(RuntimeError, match="refill"):
            model(x, cache=cache)  # no registers now: the stored prefix does not fit
