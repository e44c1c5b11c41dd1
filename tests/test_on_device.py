"""Device-agnostic checks of the models and samplers on the device named by CROCODIL_TEST_DEVICE (the `device`
fixture of conftest.py; default cpu). scripts/gpu_check.py runs this file on a GPU (part "tests"); in the normal
suite it runs on CPU in seconds. Tiny random models only: forwards in float32 and bfloat16 (finite, shapes), one
train_ae-style loss + backward step, base and guided decoding through mdm, ConThenDisc and ConWithinDisc."""

from types import SimpleNamespace

import pytest
import torch

import generators as G
import mdm
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from infra import distributed as D
from latent_dit import DiTConfig, LatentDiT
from tiny_models import D as WIDTH, K, random_dit, tiny_encoder

DTYPES = [torch.float32, torch.bfloat16]
B, L = 2, 16


def dem_cfg(**overrides):
    return DemaskerConfig.tiny(register_dim=WIDTH, max_registers=K, **overrides)


def sampler_demasker(device, dtype):
    """A random tiny demasker that, like a trained one, never predicts [M] (LLaDA's fixed rule would otherwise
    reveal a random model's [M] predictions as tokens): a forward hook on the LM head."""
    torch.manual_seed(0)
    dem = Demasker(dem_cfg()).to(device=device, dtype=dtype).eval()
    mask_id = torch.tensor([dem.cfg.mask_token_id], device=device)
    dem.lm_head.register_forward_hook(lambda module, inputs, out: out.index_fill(-1, mask_id, -1e4))
    return dem


def tokens(cfg, device, length=L, seed=0):
    """Random ids below the special tokens of DemaskerConfig.tiny (bos 509, eos 510, mask 511)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.bos_token_id, (B, length), generator=g).to(device)


def assert_valid(out, cfg, length=L):
    assert out.shape == (B, length)
    assert (out != cfg.mask_token_id).all() and (out >= 0).all() and (out < cfg.vocab_size).all()


# ------------------------------------------------------------------------------------------------
# Forwards in float32 and bfloat16
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_forward(device, dtype):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.tiny(num_registers=K)).to(device=device, dtype=dtype).eval()
    ids = tokens(SimpleNamespace(bos_token_id=enc.cfg.vocab_size - 1), device)
    mask = torch.ones(B, L, dtype=torch.bool, device=device)
    mask[1, L // 2:] = False  # a padded row: the dense causal + padding mask
    with torch.no_grad():
        for m in (None, mask):
            z = enc(ids, attention_mask=m)
            assert z.shape == (B, K, enc.cfg.hidden_size) and z.dtype == dtype and z.device.type == device.type
            assert torch.isfinite(z.float()).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_demasker_forward_with_and_without_registers(device, dtype):
    torch.manual_seed(0)
    dem = Demasker(dem_cfg()).to(device=device, dtype=dtype).eval()
    ids = tokens(dem.cfg, device)
    z = torch.randn(B, K, WIDTH, device=device, dtype=dtype)
    register_mask = torch.arange(K, device=device)[None, :] < torch.tensor([[3], [K]], device=device)
    with torch.no_grad():
        for kwargs in ({}, {"registers": z}, {"registers": z, "register_mask": register_mask}):
            logits = dem(ids, **kwargs)
            assert logits.shape == (B, L, dem.cfg.vocab_size) and logits.dtype == dtype
            assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conditional", [False, True])
def test_latent_dit_forward(device, dtype, conditional):
    torch.manual_seed(0)
    dit = LatentDiT(DiTConfig.tiny(register_dim=WIDTH, num_registers=K, cond_dim=WIDTH if conditional else None))
    dit = dit.to(device=device, dtype=dtype).eval()
    z_t = torch.randn(B, K, WIDTH, device=device, dtype=dtype)
    t = torch.rand(B, K, device=device)
    cond = cond_mask = None
    if conditional:
        cond = torch.randn(B, 5, WIDTH, device=device, dtype=dtype)
        cond_mask = torch.tensor([[True] * 5, [True, True, False, False, False]], device=device)
    with torch.no_grad():
        out = dit(z_t, t, cond, cond_mask)
    assert out.shape == (B, K, WIDTH) and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------------------------------
# One train_ae-style step (Alg. 1): corruption, encoder + demasker, Eq. 5, backward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("amp", [None, "bf16"])
def test_train_ae_loss_and_backward(device, amp):
    import train_ae

    torch.manual_seed(0)
    dem = Demasker(dem_cfg())
    enc = tiny_encoder(dem.cfg, seed=1).train()
    model = train_ae.EncoderDemasker(enc, dem.train()).to(device)
    args = SimpleNamespace(seed=0, all_mask_prob=0.25, nested_dropout=True, pad_eos_weight=1.0, cadd=False,
                           latent_cos=0.8, register_dropout=0.0, keep_distribution="uniform")
    env = D.setup(device=str(device))
    corruption = train_ae.corruption_settings(args, enc)
    x0 = tokens(dem.cfg, "cpu")
    batch = {"ids": x0, "encoder_ids": x0, "encoder_mask": torch.ones(B, L, dtype=torch.bool),
             "lengths": torch.full((B,), L)}
    loss = train_ae.training_loss(model, batch, torch.arange(B), args, corruption, env, amp)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in (p.grad for p in enc.parameters()))  # the encoder learns through z


# ------------------------------------------------------------------------------------------------
# Decoding: base and guided MDM, the threshold rule and the prefix cache
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("decoding", [None, mdm.Decoding(rule="threshold", threshold=0.5),
                                      mdm.Decoding(cache="prefix")], ids=["fixed", "threshold", "prefix-cache"])
def test_base_and_guided_decoding(device, dtype, guided, decoding):
    dem = sampler_demasker(device, dtype)
    registers = torch.randn(B, K, WIDTH, device=device, dtype=dtype) if guided else None
    out, nfe = mdm.generate(dem, B, gen_length=L, block_length=L // 2, steps=8, temperature=1.0,
                            registers=registers, generator=torch.Generator(device=device).manual_seed(0),
                            decoding=decoding)
    assert_valid(out, dem.cfg) and nfe >= 1


def test_the_fixed_rule_does_not_wait_for_the_device_at_each_step(device):
    """On CUDA, torch's sync debug mode warns at every host-device sync: the fixed rule makes one per block
    (its schedule), none per step. (On CPU tests/test_mdm.py counts the same calls.)"""
    if device.type != "cuda":
        pytest.skip("CUDA's sync debug mode only; tests/test_mdm.py counts the syncs on CPU")
    import warnings
    dem = sampler_demasker(device, torch.bfloat16)
    registers = torch.randn(B, K, WIDTH, device=device, dtype=torch.bfloat16)
    mdm.generate(dem, B, L, L // 2, 8, 1.0, registers=registers, decoding=mdm.Decoding())  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mdm.generate(dem, B, L, L // 2, 8, 1.0, registers=registers, decoding=mdm.Decoding())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, [str(w.message)[:200] for w in syncs]  # 2 blocks x 4 steps: one per block


def test_autoencode(device):
    dem = sampler_demasker(device, torch.float32)
    enc = tiny_encoder(dem.cfg, seed=1).to(device)
    ids = tokens(dem.cfg, device)
    out, nfe = mdm.autoencode(enc, dem, ids, None, gen_length=L, steps=4)
    assert_valid(out, dem.cfg) and nfe == 4


# ------------------------------------------------------------------------------------------------
# ConThenDisc (Alg. 2) and ConWithinDisc (Alg. 3) on tiny random models
# ------------------------------------------------------------------------------------------------

def generator_models(device, dtype):
    dem = sampler_demasker(device, dtype)
    enc = tiny_encoder(dem.cfg, seed=3).to(device=device, dtype=dtype)
    prior = G.Prior(random_dit(1).to(device=device, dtype=dtype), K, max_offset=0.2)
    cond_prior = G.Prior(random_dit(2, conditional=True).to(device=device, dtype=dtype), K, max_offset=0.2,
                         encoder=enc)
    return dem, prior, cond_prior


@pytest.mark.parametrize("dtype", DTYPES)
def test_conthendisc(device, dtype):
    dem, prior, _ = generator_models(device, dtype)
    out, report = G.conthendisc(dem, prior, B, gen_length=L, steps=4, prior_steps=3,
                                prior_generator=torch.Generator().manual_seed(0))
    assert_valid(out, dem.cfg)
    assert report["nfe"] > 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_prior", [True, False])
def test_conwithindisc(device, dtype, with_prior):
    dem, prior, cond_prior = generator_models(device, dtype)
    refreshed = []
    out, report = G.conwithindisc(dem, cond_prior, B, gen_length=L, steps=4, prior=prior if with_prior else None,
                                  prior_steps=3, refresh_at=(0.5,), refresh_prior_steps=2,
                                  prior_generator=torch.Generator().manual_seed(0),
                                  on_refresh=lambda step, x, old, new: refreshed.append(new))
    assert_valid(out, dem.cfg)
    assert len(refreshed) == 1 and torch.isfinite(refreshed[0].float()).all()
    assert report["nfe"] > 4


# ------------------------------------------------------------------------------------------------
# SDPA backends (scripts/gpu_check.py part "sdpa" runs this at its run's shapes and reads the report)
# ------------------------------------------------------------------------------------------------

TINY_SDPA = {"registers": K, "encoder_width": None, "demasker_width": None, "seq_len": L, "prior_registers": K,
             "sdpa_paper": False, "sdpa_paper_len": 4096, "tiny": True}


def sdpa_models(sizes):
    """[(label, config, model class, forwards(model) -> [(what, fn)])]: one-layer models at the run's shapes (the
    configs train_ae.py builds) and, with sizes["sdpa_paper"], the paper's (Qwen3-Embedding-0.6B and LLaDA-8B with
    K = 128 at L = sizes["sdpa_paper_len"]; the App. E DiT)."""
    from training.ae_setup import model_configs

    s, V = sizes, 1024
    run_args = SimpleNamespace(num_registers=s["registers"], encoder_width=s["encoder_width"], encoder_layers=1,
                               demasker_width=s["demasker_width"], demasker_layers=1, seq_len=s["seq_len"],
                               no_registers=False, cadd=False)
    enc, dem = model_configs(run_args, {"vocab_size": V, "mask_id": V - 1, "eos_id": V - 2, "bos_id": V - 3},
                             {"vocab_size": V, "pad_id": V - 2, "eos_id": V - 2, "mask_id": V - 1})
    dit = (DiTConfig.tiny if s["tiny"] else DiTConfig.paper)(register_dim=enc.hidden_size, cond_dim=enc.hidden_size,
                                                             num_registers=s["prior_registers"], depth=1)
    shapes = [("run", enc, dem, dit, s["seq_len"], s["registers"])]
    if s["sdpa_paper"]:
        ids = dict(mask_token_id=V - 1, eos_token_id=V - 2, bos_token_id=V - 3, pad_token_id=V - 2)
        shapes.append(("paper", EncoderConfig.qwen3_embedding_0_6b(num_layers=1, vocab_size=V, num_registers=128),
                       DemaskerConfig.llada_8b_base(n_layers=1, vocab_size=V, max_registers=128, **ids),
                       DiTConfig.paper(conditional=True, depth=1, num_registers=8), s["sdpa_paper_len"], 128))
    models = []
    for tag, enc, dem, dit, length, k in shapes:
        def encoder(model, length=length):
            ids = torch.randint(0, V - 3, (1, length), device=model.embed_tokens.weight.device)
            pad = torch.arange(length, device=ids.device)[None, :] < length // 2
            return [("causal", lambda: model(ids)), ("causal + padding", lambda: model(ids, attention_mask=pad))]

        def demasker(model, length=length, k=k):
            w = model.wte.weight
            ids, z = torch.randint(0, V - 3, (1, length), device=w.device), torch.randn(1, k, model.cfg.register_dim).to(w)
            keep = torch.arange(k, device=w.device)[None, :] < k // 2
            return [("no registers", lambda: model(ids)), ("registers", lambda: model(ids, registers=z)),
                    ("registers + register mask", lambda: model(ids, registers=z, register_mask=keep))]

        def latent_dit(model):
            w, k = model.x_embedder.weight, model.cfg.num_registers
            z, t = torch.randn(1, k, model.cfg.register_dim).to(w), torch.rand(1, k, device=w.device)
            cond, keep = torch.randn(1, k, model.cfg.cond_dim).to(w), torch.arange(k, device=w.device)[None] < k // 2
            return [("self + cross", lambda: model(z, t, cond)), ("cond mask", lambda: model(z, t, cond, keep))]

        models += [(f"{tag} encoder", enc, Encoder, encoder), (f"{tag} demasker", dem, Demasker, demasker),
                   (f"{tag} DiT", dit, LatentDiT, latent_dit)]
    return models


def sdpa_probe(device, sizes):
    """Capture every scaled_dot_product_attention call of the models' forwards (layers.attention: no mask and
    is_causal, a key mask (1, 1, 1, S) or a dense causal + padding mask (1, 1, T, S), boolean; plus the additive form
    of each mask), then run each alone under each backend (sdpa_kernel). One row per call: the backend torch picks,
    those that run, milliseconds, and why the others are ruled out (torch's warnings)."""
    import math
    import statistics
    import time
    import warnings

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    original, captured, current, name_of = F.scaled_dot_product_attention, {}, [""], lambda t: str(t).split(".")[-1]

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        mask = None if attn_mask is None else f"{tuple(attn_mask.shape)} {name_of(attn_mask.dtype)}"
        key = (current[0].split(":")[0], tuple(q.shape), tuple(k.shape), mask, bool(is_causal))
        captured.setdefault(key, (current[0], q, k, v, attn_mask, bool(is_causal)))  # the first forward names it
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    F.scaled_dot_product_attention = spy
    try:
        for label, cfg, cls, forwards in sdpa_models(sizes):
            with torch.device("meta"):
                model = cls(cfg)
            model = model.to_empty(device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
                for what, fn in forwards(model.eval()):
                    current[0] = f"{label}: {what}"
                    fn()
    finally:
        F.scaled_dot_product_attention = original
    backends = [b for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if hasattr(SDPBackend, b)]
    rows = []
    for (_, q_shape, k_shape, mask, causal), (label, q, k, v, attn_mask, is_causal) in captured.items():
        variants = [(mask or "no mask", attn_mask)]
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the additive form of the same mask
            additive = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
            variants.append((f"{tuple(attn_mask.shape)} additive {name_of(q.dtype)}", additive))
        for mask_text, m in variants:
            row = {"call": label, "q": list(q_shape), "k": list(k_shape), "mask": mask_text, "is_causal": causal,
                   "dtype": name_of(q.dtype), "ok": [], "failed": {}, "ms": {}}
            try:  # the backend torch picks by itself (a private helper: best effort)
                row["default"] = SDPBackend(torch._fused_sdp_choice(q, k, v, m, 0.0, is_causal)).name
            except Exception as exc:  # noqa: BLE001
                row["default"] = f"unknown ({type(exc).__name__})"
            for name in backends:
                with warnings.catch_warnings(record=True) as caught, sdpa_kernel(getattr(SDPBackend, name)):
                    warnings.simplefilter("always")
                    try:
                        times = []
                        for _ in range(4):  # the first call warms up
                            started = time.perf_counter()
                            original(q, k, v, attn_mask=m, is_causal=is_causal)
                            sync()
                            times.append((time.perf_counter() - started) * 1e3)
                        row["ok"].append(name)
                        row["ms"][name] = round(statistics.median(times[1:]), 4)
                    except Exception as exc:  # noqa: BLE001 (the warnings say why a kernel is ruled out)
                        why = [r for r in dict.fromkeys(str(w.message).strip().split("\n")[0] for w in caught) if r]
                        row["failed"][name] = ("; ".join(why[:3]) or str(exc).strip().split("\n")[0])[:300]
            kind = ("no" if m is None else "an additive" if m.dtype.is_floating_point else
                    "a dense boolean" if m.shape[-2] > 1 else "a key boolean")
            row["reason"] = ("math/cpu (CPU kernels; the CUDA backends are what matters)" if device.type == "cpu"
                             else "flash runs" if "FLASH_ATTENTION" in row["ok"] else
                             f"{kind} mask: flash ruled out ({row['failed'].get('FLASH_ATTENTION', '?')[:120]})")
            rows.append(row)
    return rows


def test_sdpa_backends(device):
    """Every attention call of the encoder, the demasker and the DiT runs under at least one SDPA backend alone.
    CROCODIL_SDPA_SIZES (JSON, scripts/gpu_check.py) picks the shapes, default tiny; CROCODIL_SDPA_REPORT=FILE
    writes the rows as JSON."""
    import json
    import os

    sizes = json.loads(os.environ.get("CROCODIL_SDPA_SIZES") or "null") or TINY_SDPA
    rows = sdpa_probe(device, sizes)
    if os.environ.get("CROCODIL_SDPA_REPORT"):
        with open(os.environ["CROCODIL_SDPA_REPORT"], "w") as f:
            json.dump(rows, f, indent=1)
    assert len({r["call"].split(":")[0] for r in rows}) == (6 if sizes["sdpa_paper"] else 3)  # each model calls SDPA
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    masks = {r["mask"] for r in rows}
    assert "no mask" in masks and any("bool" in m for m in masks) and any("additive" in m for m in masks)
