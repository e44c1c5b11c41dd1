"""experiments/eval_cadd.py (`eval.py cadd`): the comparison's numbers on random tiny models (quality is not tested here)."""

import dataclasses
import json
import math
import types

import pytest
import torch

import eval as E
from experiments import eval_cadd
from dataprep.data import load_meta
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from experiments.train_scorer import save_scorer

L, WIDTH, K = 32, 32, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dataprep import data
    root = tmp_path_factory.mktemp("eval_cadd")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i} * {i % 7}", "path": f"m{i}.py"})
                              + "\n" for i in range(200)))
    data.main(["--out", str(root / "data"), "--corpus", str(corpus), "--seq-len", str(L), "--vocab-size", "300",
               "--val-fraction", "0.1", "--test-fraction", "0.1"])
    meta = load_meta(root / "data")
    tokenizer = (root / "data" / "tokenizer.json").read_bytes()
    plain = DemaskerConfig.tiny(vocab_size=meta["vocab_size"], d_model=WIDTH, n_layers=1, n_heads=2, n_kv_heads=2,
                                mlp_hidden_size=64, mask_token_id=meta["mask_id"], eos_token_id=meta["eos_id"],
                                bos_token_id=meta["bos_id"], pad_token_id=meta["eos_id"], register_dim=0,
                                max_registers=0)
    encoder_cfg = EncoderConfig.tiny(vocab_size=meta["vocab_size"], hidden_size=WIDTH, num_heads=2, num_kv_heads=1,
                                     head_dim=16, intermediate_size=64, num_layers=1, num_registers=K,
                                     eos_token_id=meta["eos_id"], pad_token_id=meta["eos_id"],
                                     mask_token_id=meta["mask_id"])
    guided = dataclasses.replace(plain, register_dim=WIDTH, max_registers=K, prefix_rope_pairs=2)
    for seed, (name, cfg) in enumerate((("base", plain), ("cadd", dataclasses.replace(plain, cadd_schedule="linear")),
                                        ("ae", guided), ("cadd_ae", dataclasses.replace(guided, cadd_schedule="cosine")))):
        torch.manual_seed(seed)
        Demasker(cfg).save_pretrained(root / name / "demasker")
        if cfg.register_dim:
            Encoder(encoder_cfg).save_pretrained(root / name / "encoder")
        (root / name / "tokenizer.json").write_bytes(tokenizer)
    scorer_cfg = dataclasses.replace(encoder_cfg, num_registers=1)
    save_scorer(root / "scorer", Encoder(scorer_cfg), root / "data" / "tokenizer.json",
                {"bos_id": meta["bos_id"], "eos_id": meta["eos_id"], "max_length": 128})
    common = ["--data", str(root / "data"), "--base", str(root / "base"), "--cadd-run", str(root / "cadd"),
              "--num", "4", "--batch-size", "4", "--device", "cpu", "--bootstrap", "0"]
    return root, common


def test_curves_trap_and_their_numbers(runs):
    root, common = runs
    record = E.main(["cadd", *common, "--ae", str(root / "ae"), "--cadd-ae", str(root / "cadd_ae"), "--cadd-trap",
                     "--trap-pairs", "2", "--trap-choices", "2", "--trap-steps", "3", "--trap-samples", "16",
                     "--out", str(root / "results")])
    result = json.loads((root / "results" / "cadd.json").read_text())["results"]
    curves = result["curves"]
    assert set(curves) == {"base", "cadd_q", "cadd_blind", "guided", "cadd_guided_q", "cadd_guided_blind"}
    assert all(math.isfinite(c) for v in curves.values() for c in v["ce"])
    # at r = 1 both latents are drawn at gamma_bar(1): q and blind are the same numbers; below r = 1 they differ
    for q, blind in (("cadd_q", "cadd_blind"), ("cadd_guided_q", "cadd_guided_blind")):
        assert curves[q]["ce"][-1] == curves[blind]["ce"][-1] and curves[q]["ce"][0] != curves[blind]["ce"][0]
    # the base curve is eval_autoencoder's Fig. 4 curve (the same masks)
    fig4 = E.main(["fig4", *common, "--ae", str(root / "ae"), "--registers", "1", "--out", str(root / "fig4")])
    assert fig4["results"]["models"]["base"]["ce"] == pytest.approx(curves["base"]["ce"], rel=1e-6)
    trap = result["marginal_trap"]
    one_step = [r for r in trap["rows"] if r["steps"] == 1][0]
    assert one_step["optimal_factorized_random"] == pytest.approx(0.25)  # (1 / A)^P: every pair drawn at once
    assert {"base_random", "cadd_s0_random", "cadd_s1_random"} <= set(one_step)
    assert "CADD vs base" in (root / "results" / "REPORT.md").read_text() or record is not None


def test_quality_vs_nfe_rows_count_k_passes_per_step(runs):
    root, common = runs
    E.main(["cadd", *common, "--scorer", str(root / "scorer"), "--lengths", "16", "--nfe", "4", "16",
            "--cadd-latents", "2", "--cadd-softness", "0", "0.5", "--out", str(root / "gen")])
    rows = json.loads((root / "gen" / "cadd.json").read_text())["results"]["generation"]["16"]["rows"]
    assert [(r["method"], r["steps"], r["nfe"]) for r in rows] == [
        ("base", 4, 4), ("base", 16, 16), ("cadd_s0", 4, 8), ("cadd_s0", 16, 32), ("cadd_s0.5", 4, 8),
        ("cadd_s0.5", 16, 32)]
    assert all(0 <= r["mauve"] <= 1 and r["gen_ppl"] > 0 for r in rows)


def test_base_and_cadd_rows_take_the_base_decoding_choice_and_cadd_its_own_best(runs):
    """--base-decoding's setting reaches the base and the CADD rows (before, CADD decoded low-confidence in one
    block whatever the base's choice); --cadd-select adds CADD at its own best setting, chosen on the selection
    set by base-decoding's rule."""
    root, common = runs
    chosen = {"remasking": "random", "block_length": 8, "eos": "revealed last"}
    (root / "bd.json").write_text(json.dumps({"chosen": {"16": chosen}}))
    E.main(["cadd", *common, "--scorer", str(root / "scorer"), "--lengths", "16", "--nfe", "6", "16",
            "--cadd-softness", "0", "--blocks", "8", "--base-decoding", str(root / "bd.json"), "--cadd-select",
            "--fig6-num", "2", "--out", str(root / "select")])
    block = json.loads((root / "select" / "cadd.json").read_text())["results"]["generation"]["16"]
    assert block["base_setting"] == chosen
    assert {r["method"]: r["setting"] for r in block["rows"] if r["method"] in ("base", "cadd_s0")} == \
        {"base": chosen, "cadd_s0": chosen}
    selection = block["cadd_selection"]
    assert len(selection["rows"]) == 2 * 2 * 3 and all(r["nfe"] == 16 for r in selection["rows"])
    assert selection["chosen"] in [r["setting"] for r in selection["rows"]] and selection["chosen"]["softness"] == 0
    best = [r for r in block["rows"] if r["method"] == "cadd_best"]
    assert [r["steps"] for r in best] == [6, 16] and all(r["setting"] == selection["chosen"] for r in best)


def test_cadd_sampler_decodes_under_a_setting(monkeypatch):
    seen = {}

    def fake(demasker, count, length, block, steps, temp, remasking, decoding=None, **kwargs):
        seen.update(block=block, remasking=remasking, eos=decoding.confidence_eos_eot_inf)
        return torch.zeros(count, length, dtype=torch.long), steps
    monkeypatch.setattr(eval_cadd.cadd, "cadd_generate", fake)
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(cadd_latents=1, cadd_posterior_noise=False, seed=0,
                                                           rng="fast", remasking="low_confidence"), device="cpu")
    setting = {"remasking": "random", "block_length": 8, "eos": "revealed last"}
    eval_cadd.cadd_sampler(ctx, None, 32, 6, 1.0, 0.0, setting=setting)([0], torch.Generator(), None)
    assert seen == {"block": 16, "remasking": "random", "eos": True}  # 6 steps: 2 blocks of 16 share them
    eval_cadd.cadd_sampler(ctx, None, 32, 6, 1.0, 0.0)([0], torch.Generator(), None)
    assert seen == {"block": 32, "remasking": "low_confidence", "eos": False}


def test_sampler_is_reproducible_per_batch():
    torch.manual_seed(0)
    model = Demasker(DemaskerConfig.tiny(vocab_size=40, mask_token_id=39, eos_token_id=38, bos_token_id=37,
                                         pad_token_id=38, register_dim=0, max_registers=0, cadd_schedule="linear"))
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(cadd_latents=1, cadd_posterior_noise=True, seed=0,
                                                           rng="fast", remasking="low_confidence"), device="cpu")
    run = eval_cadd.cadd_sampler(ctx, model.eval(), 8, 4, 1.0, 0.0)
    first = run([0, 1], torch.Generator().manual_seed(5), None)
    again = run([0, 1], torch.Generator().manual_seed(5), None)
    assert torch.equal(first[0], again[0]) and first[1] == {"nfe": 4, "demasker_calls": 4}


def test_plain_and_cadd_runs_are_not_swapped(runs, tmp_path):
    root, common = runs
    swapped = [str(root / "base") if c == str(root / "cadd") else c for c in common]
    with pytest.raises(ValueError, match="--cadd-run .* trained without CADD"):
        E.main(["cadd", *swapped, "--out", str(tmp_path)])
    wrong_base = [str(root / "cadd") if c == str(root / "base") else c for c in common]
    with pytest.raises(ValueError, match="--base .* is a CADD demasker"):
        E.main(["cadd", *wrong_base, "--out", str(tmp_path)])
    no_run = [c for c in common if c not in ("--cadd-run", str(root / "cadd"))]
    with pytest.raises(ValueError, match="needs --cadd-run"):
        E.main(["cadd", *no_run, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        E.parse_args(["cadd", *common, "--cadd-softness", "2"])
