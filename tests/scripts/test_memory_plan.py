"""scripts/memory_plan.py: the activation formula against the tensors autograd really saves, the
parameter counts against the public checkpoints' figures, and the plan's arithmetic."""

import pytest
import torch

from scripts import memory_plan as M
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig

GIB = 2 ** 30


def test_block_formula_equals_measured_saved_tensors():
    for name, measured, formula in M.verify():
        # exact up to per-example scalars (a (B, 1, 1, 1) row mask: 2 bytes per sequence)
        assert measured == pytest.approx(formula, abs=0.1), name


def test_whole_tiny_models_match_formula_within_2_percent():
    torch.manual_seed(0)
    B, L, k = 2, 64, 8
    ids = torch.randint(0, 500, (B, L))
    dem_cfg = DemaskerConfig.tiny()
    demasker = Demasker(dem_cfg).to(torch.bfloat16)
    registers = torch.randn(B, k, dem_cfg.register_dim, dtype=torch.bfloat16)
    register_mask = torch.ones(B, k, dtype=torch.bool)
    register_mask[0, 4:] = False
    measured = M.measure_saved_bytes(lambda: demasker(ids, registers=registers, register_mask=register_mask),
                                     list(demasker.parameters()))
    assert measured == pytest.approx(B * M.demasker_activation_bytes(dem_cfg, L, k, False), rel=0.02)

    enc_cfg = EncoderConfig.tiny()
    encoder = Encoder(enc_cfg).to(torch.bfloat16)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[0, -10:] = False  # padding: the dense causal mask path
    measured = M.measure_saved_bytes(lambda: encoder(ids, attention_mask=valid), list(encoder.parameters()))
    assert measured == pytest.approx(B * M.encoder_activation_bytes(enc_cfg, L, False), rel=0.02)


def test_parameter_counts_match_public_checkpoints():
    params = M.count_parameters(EncoderConfig.qwen3_embedding_0_6b(num_registers=128),
                                DemaskerConfig.llada_8b_base(max_registers=128))
    # the public LLaDA-8B-Base checkpoint: 8,015,581,184; plus register projection 1024 x 4096 and START/END.
    assert params["demasker"] == 8_015_581_184 + 1024 * 4096 + 2 * 4096
    # the public Qwen3-Embedding-0.6B checkpoint: 595,776,512; plus K - 1 = 127 suffix registers of width 1024.
    assert params["encoder"] == 595_776_512 + 127 * 1024
    assert params["block"] == 218_112_000  # parameters per LLaDA-8B block
    assert max(params["units"]) == 126464 * 4096  # embedding / LM head are FSDP units of their own


def test_plan_rows():
    enc, dem = EncoderConfig.qwen3_embedding_0_6b(), DemaskerConfig.llada_8b_base()
    params, rows = M.plan(enc, dem, seq_len=4096, global_batch=512, gpus=8, gpu_gib=80,
                          micro_batches=[1, 2, 4], overhead_gib=4)
    assert [r["accum"] for r in rows] == [64, 32, 16, 64, 32, 16]
    assert rows[0]["states"] == 16 * params["total"] / 8
    for off, on in zip(rows[:3], rows[3:]):
        assert on["dem"] < off["dem"] / 10 and on["enc"] < off["enc"] / 10
        assert on["total"] < off["total"]
    for r in rows:
        parts = r["states"] + r["fsdp"] + r["enc"] + r["dem"] + r["logits"] + r["overhead"]
        assert r["total"] == pytest.approx(parts)
        assert r["fits"] == (r["total"] <= 80 * GIB)
    _, rows = M.plan(enc, dem, 4096, 512, 8, 80, [3], 4)
    assert rows[0]["accum"] is None  # 512 is not divisible by 3 x 8
