"""eval.py end to end on tiny random checkpoints: every subcommand runs and writes the JSON schema it promises.

Quality is not tested here (random weights); the numbers are tested in test_metrics.py. The fixture builds,
once per module: a data cache from a synthetic JSONL corpus (dataprep/data.py), an AE run and a second one (fig7), a
base MDM, an unconditional prior, a conditional prior, a prior without block offsets, and a scorer.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import eval as E
from dataprep.data import load_meta
from dataprep.latent_data import encoder_fingerprint
from demasker import Demasker, DemaskerConfig
from encoder import Encoder, EncoderConfig
from latent_dit import DiTConfig, LatentDiT
from experiments import eval_speed as S
from experiments.train_scorer import save_scorer

K, WIDTH, L = 4, 32, 32




def _programs(n):
    """Small distinct Python programs with their own 'path' (dataprep/data.py splits by path)."""
    out = []
    for i in range(n):
        if i % 2:
            text = f"def f{i}(x):\n    return x + {i}"
        else:
            text = f"def g{i}(x, y={i % 7}):\n    z = x * {i} + y\n    if z > 3:\n        return z - {i % 5}\n    return z"
        out.append({"text": text, "path": f"m{i}.py"})
    return out


def _ae(folder, meta, seed):
    torch.manual_seed(seed)
    ecfg = EncoderConfig.tiny(vocab_size=meta["vocab_size"], hidden_size=WIDTH, num_heads=2, num_kv_heads=1,
                              head_dim=16, intermediate_size=64, num_layers=1, num_registers=K,
                              eos_token_id=meta["eos_id"], pad_token_id=meta["eos_id"], mask_token_id=meta["mask_id"])
    dcfg = DemaskerConfig.tiny(vocab_size=meta["vocab_size"], d_model=WIDTH, n_layers=1, n_heads=2, n_kv_heads=2,
                               mlp_hidden_size=64, mask_token_id=meta["mask_id"], eos_token_id=meta["eos_id"],
                               bos_token_id=meta["bos_id"], pad_token_id=meta["eos_id"], register_dim=WIDTH,
                               max_registers=K, prefix_rope_pairs=2)
    Encoder(ecfg).save_pretrained(folder / "encoder")
    Demasker(dcfg).save_pretrained(folder / "demasker")
    return dcfg


def _prior(folder, ae, conditional=False, offsets=True):
    LatentDiT(DiTConfig.tiny(register_dim=WIDTH, num_registers=K, hidden_size=32, depth=1, num_heads=2,
                             cond_dim=WIDTH if conditional else None)).save_pretrained(folder / "dit")
    settings = {"ae": str(ae), "num_registers": K, "max_offset": 0.2 if offsets else 0.0, "block_offsets": offsets,
                "conditional": conditional, "cond_registers": K if conditional else None, "shared_tokenizer": True,
                "encoder_fingerprint": encoder_fingerprint(Path(ae) / "encoder")}  # as train_prior.py records it
    (folder / "prior.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dataprep import data
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(p) for p in _programs(400)) + "\n")
    data.main(["--out", str(root / "data"), "--corpus", str(corpus), "--seq-len", str(L), "--vocab-size", "300",
               "--val-fraction", "0.1", "--test-fraction", "0.1"])
    meta = load_meta(root / "data")
    tokenizer = root / "data" / "tokenizer.json"
    for name, seed in (("ae", 0), ("ae_plain", 1)):
        dcfg = _ae(root / name, meta, seed)
        (root / name / "tokenizer.json").write_bytes(tokenizer.read_bytes())
        (root / name / "args.json").write_text(json.dumps({"data": str(root / "data")}))
    torch.manual_seed(2)
    import dataclasses
    Demasker(dataclasses.replace(dcfg, register_dim=0, max_registers=0)).save_pretrained(root / "base" / "demasker")
    (root / "base" / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    _prior(root / "prior", root / "ae")
    _prior(root / "cprior", root / "ae", conditional=True)
    _prior(root / "prior_flat", root / "ae", offsets=False)
    scorer_cfg = EncoderConfig.tiny(vocab_size=meta["vocab_size"], hidden_size=WIDTH, num_heads=2, num_kv_heads=1,
                                    head_dim=16, intermediate_size=64, num_layers=1, num_registers=1,
                                    eos_token_id=meta["eos_id"], pad_token_id=meta["eos_id"])
    save_scorer(root / "scorer", Encoder(scorer_cfg), tokenizer,
                {"bos_id": meta["bos_id"], "eos_id": meta["eos_id"], "max_length": 128})
    common = ["--ae", str(root / "ae"), "--base", str(root / "base"), "--prior", str(root / "prior"),
              "--cond-prior", str(root / "cprior"), "--scorer", str(root / "scorer"), "--num", "4",
              "--batch-size", "4", "--prior-steps", "2", "--refresh-prior-steps", "2", "--device", "cpu",
              "--bootstrap", "6"]
    return root, common


def _run(runs, name, *extra):
    root, common = runs
    out = root / "results"  # shared by the tests, some of which run a subcommand again: --overwrite
    record = E.main([name, *common, "--out", str(out), "--overwrite", *extra])
    saved = json.loads((out / f"{name}.json").read_text())
    assert saved["experiment"] == name and saved["results"] == json.loads(json.dumps(record["results"]))
    assert f"## {name}:" in (out / "REPORT.md").read_text()
    return saved["results"]


def _finite(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_fig4(runs):
    result = _run(runs, "fig4", "--registers", "1", "4")
    assert list(result["models"]) == ["base", "guided_k1", "guided_k4"]
    for curve in result["models"].values():
        assert len(curve["ce"]) == len(curve["top1"]) == len(result["mask_ratios"]) == 10
        assert all(0 <= a <= 1 for a in curve["top1"]) and _finite(*curve["ce"])
    # the masks are shared: the same number of scored tokens for every model at every ratio
    counts = [curve["scored_tokens"] for curve in result["models"].values()]
    assert all(c == counts[0] for c in counts) and counts[0][-1] >= counts[0][0]


def test_fig7(runs):
    root, _ = runs
    result = _run(runs, "fig7", "--ae-no-noise", str(root / "ae_plain"), "--sigmas", "0", "1")
    assert result["sigmas"] == [0.0, 1.0] and result["expected_cos"][0] == 1.0
    assert set(result["models"]) == {"latent_noise", "no_latent_noise"}
    assert all(len(v["top1"]) == 2 for v in result["models"].values()) and "base" in result


def test_table1(runs):
    result = _run(runs, "table1", "--length", "16", "--blocks", "8", "16", "--nfe", "1", "2", "4")
    combos = [(r["block"], r["nfe"]) for r in result["rows"]]
    assert combos == [(8, 2), (8, 4), (16, 1), (16, 2), (16, 4)]  # (8, 1): fewer steps than blocks, skipped
    row = result["rows"][0]
    assert _finite(row["gen_ppl"], row["cer"], row["semantic_similarity"], row["parse_rate"], row["unigram_entropy"])
    assert result["sources"]["gen_ppl"] > 0 and result["num_programs"] == 4
    assert row["cer_ci"][0] <= row["cer_ci"][1] and row["empty_rate_ci"][0] <= row["empty_rate_ci"][1]
    assert "| CER [95% CI] |" in (runs[0] / "results" / "REPORT.md").read_text()


def test_fig8(runs):
    result = _run(runs, "fig8", "--length", "16", "--steps", "4", "--alphas", "0", "0.5", "1")
    assert [r["alpha"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert all(0 <= r["mauve"] <= 1 and _finite(r["gen_ppl"], r["cer_to_a"], r["cer_to_b"]) for r in result["rows"])
    assert all(len(r["mauve_ci"]) == 2 and 0 <= r["empty_rate"] <= 1 for r in result["rows"])


def test_fig8_reads_the_first_keep_registers(runs, monkeypatch):
    import experiments.eval_autoencoder as EA
    seen, generate = [], EA.generate

    def spy(*args, registers=None, **kwargs):
        seen.append(registers.shape[1])
        return generate(*args, registers=registers, **kwargs)
    monkeypatch.setattr(EA, "generate", spy)
    result = _run(runs, "fig8", "--length", "16", "--steps", "4", "--alphas", "0.5", "--keep", "2", "--overwrite")
    assert result["keep"] == 2 and set(seen) == {2}


def test_fig6_with_speedup(runs):
    result = _run(runs, "fig6", "--lengths", "16", "32", "--nfe", "2", "4", "32")
    assert set(result["lengths"]) == {"16", "32"}
    block = result["lengths"]["32"]
    methods = [(r["method"], r["steps"]) for r in block["rows"]]
    assert methods == [(m, s) for m in ("base", "conthendisc", "conwithindisc") for s in (2, 4, 32)]
    assert [r["steps"] for r in result["lengths"]["16"]["rows"] if r["method"] == "base"] == [2, 4]  # 32 > L
    base = [r for r in block["rows"] if r["method"] == "base"]
    assert all(r["nfe"] == r["steps"] for r in base)  # the base MDM: NFE = demasker calls
    guided = [r for r in block["rows"] if r["method"] != "base"]
    assert all(r["nfe"] > r["steps"] for r in guided)  # + the prior's cost in demasker-call equivalents
    speed = block["speedup"]
    assert speed["base_reference"]["steps"] == 32 and speed["replicates"] == 6
    for method in ("conthendisc", "conwithindisc"):
        for test in ("mauve", "gen_ppl", "both"):
            entry = speed[method][test]
            assert entry["speedup"] is None or math.isclose(entry["speedup"], 32 / entry["nfe"])
            assert 0 <= entry["matched_share"] <= 1 and "time_speedup_ci" in entry
    assert 0 <= block["real"]["mauve"] <= 1
    for row in block["rows"] + [block["real"]]:  # every row and the real-vs-real ceiling carry 95% intervals
        for key in ("mauve", "gen_ppl", "empty_rate"):
            lo, hi = row[f"{key}_ci"]
            assert lo <= hi
        assert len(row["mauve_replicates"]) == len(row["gen_ppl_replicates"]) == 6 and row["bootstrap"] == 6
    assert result["bootstrap"] == 6
    report = (runs[0] / "results" / "REPORT.md").read_text()
    assert "| MAUVE [95% CI] |" in report and "| empty |" in report and "matches on MAUVE when" in report


def test_fig6_reports_speedups_against_the_equal_budget_base_too(runs):
    root, _ = runs
    result = _run(runs, "fig6", "--lengths", "16", "--nfe", "4", "16", "--bootstrap", "0",
                  "--base-equal", str(root / "base"))
    block = result["lengths"]["16"]
    assert [r["method"] for r in block["rows"]][:4] == ["base", "base", "base-equal", "base-equal"]
    same = [(r["steps"], r["examples"]) for r in block["rows"] if r["method"] == "base"]
    assert same == [(r["steps"], r["examples"]) for r in block["rows"] if r["method"] == "base-equal"]  # same run
    assert block["speedup"]["base_reference"]["method"] == "base"
    assert block["speedup_equal_budget"]["base_reference"]["method"] == "base-equal"
    assert set(block["speedup_equal_budget"]) - {"base_reference", "replicates"} == {"conthendisc", "conwithindisc"}
    assert "vs the equal-budget base MDM" in (root / "results" / "REPORT.md").read_text()


def test_fig6_guided_max_nfe_stops_only_the_guided_sweep(runs):
    root, _ = runs
    result = _run(runs, "fig6", "--lengths", "16", "--nfe", "2", "4", "16", "--bootstrap", "0", "--guided-max-nfe", "4")
    block = result["lengths"]["16"]
    steps = {m: [r["steps"] for r in block["rows"] if r["method"] == m] for m in ("base", "conthendisc", "conwithindisc")}
    assert steps == {"base": [2, 4, 16], "conthendisc": [2, 4], "conwithindisc": [2, 4]}
    assert block["guided_max_nfe"] == 4 and block["speedup"]["base_reference"]["steps"] == 16
    assert "swept up to NFE 4 (--guided-max-nfe)" in (root / "results" / "REPORT.md").read_text()
    with pytest.raises(SystemExit, match="below the smallest NFE"):
        _run(runs, "fig6", "--lengths", "16", "--nfe", "4", "16", "--bootstrap", "0", "--guided-max-nfe", "2")


def test_fig6_named_run_beside_the_first_keeps_both_records(runs):
    """--name writes a second fig6 record into the same OUT (fig6-hmu beside fig6); --methods keeps only the
    named guided method beside the base MDM, whose rows (same seed) are the first run's."""
    root, common = runs
    out = root / "results"
    flags = ["--lengths", "16", "--nfe", "4", "16", "--bootstrap", "0", "--out", str(out), "--overwrite"]
    first = E.main(["fig6", *common, *flags])
    second = E.main(["fig6", *common, *flags, "--name", "fig6-hmu", "--methods", "conwithindisc"])
    saved = json.loads((out / "fig6-hmu.json").read_text())
    assert saved["experiment"] == "fig6-hmu" and json.loads((out / "fig6.json").read_text())["experiment"] == "fig6"
    assert "## fig6-hmu:" in (out / "REPORT.md").read_text()
    rows = second["results"]["lengths"]["16"]["rows"]
    assert sorted({r["method"] for r in rows}) == ["base", "conwithindisc"]
    base = [(r["steps"], r["gen_ppl"]) for r in rows if r["method"] == "base"]
    assert base == [(r["steps"], r["gen_ppl"]) for r in first["results"]["lengths"]["16"]["rows"] if r["method"] == "base"]
    with pytest.raises(FileExistsError, match="fig6-hmu.json already exists"):  # claimed like any other record
        E.main(["fig6", *common, *flags[:-1], "--name", "fig6-hmu"])
    with pytest.raises(SystemExit):
        E.main(["fig6", *common, *flags, "--name", "../elsewhere"])


def test_fig6_without_bootstrap_has_no_intervals(runs):
    result = _run(runs, "fig6", "--lengths", "16", "--nfe", "4", "16", "--bootstrap", "0")
    block = result["lengths"]["16"]
    assert all("mauve_ci" not in r and "gen_ppl_replicates" not in r for r in block["rows"])
    assert block["speedup"]["replicates"] == 0 and "speedup_ci" not in block["speedup"]["conthendisc"]["both"]


def test_matching_and_speedup_intervals_over_replicates():
    """A point matches when MAUVE >= the base's lower bound and Gen-PPL <= its upper bound; in replicate b every
    row takes its b-th values with the base's half-widths kept (tolerances .1 and 2 here)."""
    def row(method, nfe, mauve, ppl, seconds, mauve_reps, ppl_reps, ci=None):
        out = {"method": method, "steps": nfe, "nfe": nfe, "mauve": mauve, "gen_ppl": ppl,
               "seconds_per_sample": seconds, "mauve_replicates": mauve_reps, "gen_ppl_replicates": ppl_reps}
        return {**out, **(ci or {})}
    base = row("base", 64, 0.6, 20.0, 1.0, [0.6, 0.4, 0.6, 0.9], [20.0, 20.0, 30.0, 20.0],
               {"mauve_ci": [0.5, 0.7], "gen_ppl_ci": [18.0, 22.0]})
    fast = row("g", 5.5, 0.52, 21.0, 0.1, [0.52, 0.52, 0.1, 0.52], [21.0, 21.0, 21.0, 21.0])
    slow = row("g", 9.5, 0.65, 15.0, 0.2, [0.65, 0.65, 0.65, 0.65], [15.0, 15.0, 15.0, 15.0])
    out = E.speedups([base, fast, slow], 64)
    both = out["g"]["both"]
    # the point: 0.52 >= 0.6 - 0.1 and 21 <= 20 + 2 -> the NFE 5.5 row matches (plain >= / <= would refuse it)
    assert both["nfe"] == 5.5 and math.isclose(both["speedup"], 64 / 5.5) and math.isclose(both["time_speedup"], 10)
    assert both["at_grid_bottom"]
    # replicates: 0, 1 -> NFE 5.5; 2 -> the fast row's MAUVE .1 fails, NFE 9.5 (x5 in time); 3 -> nothing (.52 < .8)
    draws = [64 / 5.5, 64 / 5.5, 64 / 9.5, 0.0]
    assert np.allclose(both["speedup_ci"], np.percentile(draws, [2.5, 97.5]))
    assert np.allclose(both["time_speedup_ci"], np.percentile([10.0, 10.0, 5.0, 0.0], [2.5, 97.5]))
    assert both["matched_share"] == 0.75
    assert "x11.6 [" in E.speedup_text(out, 64) and "bounded by the grid" in E.speedup_text(out, 64)


def test_a_png_is_written_with_intervals_and_a_band(tmp_path):
    pytest.importorskip("matplotlib")
    from evaluation.report import fmt_ci, panel, plot
    series = {"base": ([1, 2, 4], [0.2, 0.3, 0.5], [0.1, None, 0.4], [0.3, None, 0.6]), "plain": ([1, 2], [0.1, 0.2])}
    panels = [panel("MAUVE", "NFE", "MAUVE", series, logx=True, band=(0.8, 0.9, "real")),
              panel("Gen-PPL", "NFE", "Gen-PPL", {"base": ([1, 2], [300.0, 290.0])}, logx=True, logy=True,
                    band=(250.0, 250.0, "real"))] * 2
    path = plot(panels, tmp_path / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    assert plot([], tmp_path / "none.png") is None
    assert fmt_ci(0.5123, [0.4, 0.61], 2) == "0.51 [0.40, 0.61]" and fmt_ci(3.0, None, 1) == "3.0"
    assert fmt_ci(None, None) == "n/a"


def test_speedups_pick_the_smallest_matching_nfe():
    row = lambda method, steps, nfe, mauve, ppl: {"method": method, "steps": steps, "nfe": nfe, "mauve": mauve,
                                                  "gen_ppl": ppl}
    rows = [row("base", 8, 8, 0.2, 30.0), row("base", 64, 64, 0.6, 20.0),
            row("g", 4, 5.5, 0.5, 18.0), row("g", 8, 9.5, 0.65, 25.0), row("g", 16, 17.5, 0.7, 15.0)]
    out = E.speedups(rows, 64)
    assert out["base_reference"]["nfe"] == 64
    assert out["g"]["mauve"]["nfe"] == 9.5 and out["g"]["gen_ppl"]["nfe"] == 5.5
    assert out["g"]["both"]["nfe"] == 17.5 and math.isclose(out["g"]["both"]["speedup"], 64 / 17.5)
    assert E.speedups([row("g", 4, 5, 0.1, 9.0)], 64) == {}
    assert "degenerate" not in out["base_reference"]
    empty_base = [{**r, "empty_rate": 0.9 if r["method"] == "base" else 0.0} for r in rows]
    flagged = E.speedups(empty_base, 64)
    assert flagged["base_reference"]["degenerate"].startswith("90%")
    assert "WARNING" in E.speedup_text(flagged, 64) and "WARNING" not in E.speedup_text(out, 64)


def test_fig9_and_prdc(runs):
    result = _run(runs, "fig9")
    assert set(result["psnr_db"]) == {"unconditional", "conditional"}
    assert all(len(v) == len(result["t"]) and _finite(*v) for v in result["psnr_db"].values())
    result = _run(runs, "prdc", "--prdc-k", "2")
    for name in ("real_vs_real", "unconditional", "conditional"):
        assert len(result[name]["per_register"]) == K
        assert all(0 <= result[name][m] <= 1 for m in ("precision", "recall", "coverage"))
    assert result["real_vs_real"]["precision"] >= 0


def test_consistency(runs):
    """Agreement per revealed share and copy for the conditional prior beside the oracle, the blank condition and the
    unconditional prior (--prior); the fixture's conditional DiT is fresh (its cross-attention outputs zero), so it
    ignores its condition: every conditional row equals the blank row. The command and a REPORT.md table are kept."""
    result = _run(runs, "consistency", "--steps", "4", "--revealed-shares", "0.5", "0.25")
    assert result["shares"] == [0.25, 0.5] and result["num_programs"] == 4 and result["steps"] == 4
    assert [row["source"] for row in result["copy"]] == ["oracle", "conditional", "blank", "unconditional"]
    assert result["cer_unit"] == "characters" and result["refresh_prior_steps"] == 2
    from evaluation.consistency import row_of
    for r in (0.25, 0.5):
        conditional = row_of(result, "agreement", "conditional", r)
        assert conditional["agreement"] == row_of(result, "agreement", "blank", r)["agreement"]
        assert conditional["gain"] == 0.0 and conditional["gain_ci"] == [0.0, 0.0]
    oracle = row_of(result, "copy", "oracle")
    assert oracle["cosine"] == pytest.approx(1.0) and _finite(oracle["cer"], *oracle["cer_ci"])
    saved = json.loads((runs[0] / "results" / "consistency.json").read_text())
    assert saved["command"] is None or "consistency" in saved["command"]
    assert "| revealed share r (mean revealed) |" in (runs[0] / "results" / "REPORT.md").read_text()
    with pytest.raises(SystemExit):
        E.parse_args(["consistency", "--revealed-shares", "1.0", "--out", str(runs[0] / "results")])


def test_fig11(runs):
    root, _ = runs
    result = _run(runs, "fig11", "--length", "16", "--nfe", "2", "--prior-no-offsets", str(root / "prior_flat"),
                  "--k-priors", str(root / "prior"))
    assert [r["method"] for r in result["registers"]] == [f"K={K}"]
    assert [r["method"] for r in result["refresh"]] == ["@0", "@0.25", "@0.5", "@0.75"]
    assert [r["method"] for r in result["offsets"]] == ["offsets on", "trained on, sampled off", "trained off"]


def test_marginal_trap_subcommand(runs):
    result = _run(runs, "marginal-trap", "--trap-pairs", "2", "--trap-choices", "2", "--trap-steps", "5",
                  "--trap-samples", "8")
    assert [r["tokens_per_step"] for r in result["rows"]] == [1.0, 2.0, 4.0]
    assert all(0 <= r["base_random"] <= 1 and 0 <= r["guided_low_confidence"] <= 1 for r in result["rows"])


def test_marginal_trap_needs_no_data_or_checkpoints(tmp_path):
    """Each subcommand asks only for what it uses: the trap builds its own synthetic corpus."""
    record = E.main(["marginal-trap", "--trap-pairs", "2", "--trap-choices", "2", "--trap-steps", "3",
                     "--trap-samples", "4", "--device", "cpu", "--out", str(tmp_path / "results")])
    assert record["data"] is None and len(record["results"]["rows"]) == 3
    assert "conwithindisc_hmu_random" in record["results"]["rows"][0]  # the default: frozen and h_mu rows


def test_marginal_trap_rows_per_conditioning(tmp_path):
    """--trap-conditionings picks ConWithinDisc's rows: x_t alone gives its row and neither h_phi's nor h_mu's."""
    record = E.main(["marginal-trap", "--trap-pairs", "2", "--trap-choices", "2", "--trap-steps", "3",
                     "--trap-samples", "4", "--device", "cpu", "--out", str(tmp_path / "results"),
                     "--trap-conditionings", "xt"])
    row = record["results"]["rows"][0]
    assert "conwithindisc_xt_random" in row and not any(k.startswith(("conwithindisc_random", "conwithindisc_hmu"))
                                                          for k in row)


def test_missing_inputs_raise_clear_errors(runs):
    root, common = runs
    with pytest.raises(ValueError, match="--ae-no-noise"):
        E.main(["fig7", *common, "--out", str(root / "results"), "--overwrite"])
    without_scorer = [c for c in common if "scorer" not in c]
    with pytest.raises(ValueError, match="python -m experiments.train_scorer"):
        E.main(["fig8", *without_scorer, "--out", str(root / "results"), "--overwrite", "--length", "16"])


@pytest.mark.parametrize("flags,message", [
    (["--num", "0"], "--num must be >= 1"), (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--nfe", "8", "0"], "--nfe must be >= 1"), (["--lengths", "-4"], "--lengths must be >= 1"),
    (["--prior-steps", "0"], "--prior-steps must be >= 1"), (["--mauve-seeds", "0"], "--mauve-seeds must be >= 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"), (["--sigmas", "0.5", "nan"], "--sigmas must be >= 0"),
    (["--fig7-ratio", "0"], "--fig7-ratio must be in (0, 1]"), (["--cond-ratio", "1.5"], "--cond-ratio"),
    (["--bootstrap", "-1"], "--bootstrap must be >= 0"), (["--bootstrap-restarts", "0"], "--bootstrap-restarts"),
    (["--threads", "-1"], "--threads must be >= 0"), (["--guided-max-nfe", "0"], "--guided-max-nfe must be >= 1"),
    (["--keep", "0"], "--keep needs K >= 1"), (["--keep", "8", "4"], "--keep takes one bare K"),
    (["--keep", "a=8"], "expected K or L=K"), (["--timing-repeats", "-1"], "--timing-repeats must be >= 0"),
    (["--timing-batch", "0"], "--timing-batch must be >= 1"),
])
def test_numbers_are_refused_before_anything_is_loaded(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        E.parse_args(["fig6", "--ae", str(tmp_path / "nothing"), "--out", str(tmp_path / "results"), *flags])
    assert message in capsys.readouterr().err and not (tmp_path / "results").exists()


def test_pieces_that_do_not_belong_together_are_refused(runs, tmp_path):
    """A data cache tokenized with another tokenizer than the runs', and a prior of another AE run."""
    import shutil
    root, common = runs
    other = tmp_path / "other_data"
    shutil.copytree(root / "data", other)
    (other / "tokenizer.json").write_text('{"another": "tokenizer"}')
    with pytest.raises(ValueError, match=r"other_data/tokenizer.json \(sha256 \w+\) is not the tokenizer the --ae run"):
        E.main(["fig4", *common, "--data", str(other), "--out", str(tmp_path / "results")])
    swapped = [str(root / "ae_plain") if c == str(root / "ae") else c for c in common]  # prior.json names 'ae'
    recorded = json.loads((root / "prior" / "prior.json").read_text())
    (root / "prior" / "prior.json").write_text(json.dumps({**recorded, "encoder_fingerprint": "0" * 64}))
    try:
        with pytest.raises(ValueError, match=r"prior .* was trained on the registers of .*encoder fingerprint 000000"):
            E.main(["fig6", *swapped, "--out", str(tmp_path / "results"), "--lengths", "16", "--nfe", "16"])
    finally:
        (root / "prior" / "prior.json").write_text(json.dumps(recorded))
    assert not (tmp_path / "results").exists()


def test_unreadable_json_names_the_file(runs, tmp_path):
    import shutil
    root, common = runs
    ae = tmp_path / "ae"
    shutil.copytree(root / "ae", ae)
    (ae / "args.json").write_text("{not json")
    without_data = [str(ae) if c == str(root / "ae") else c for c in common]
    with pytest.raises(ValueError, match=r"ae/args.json is not readable JSON.*pass --data"):
        E.main(["fig4", *without_data, "--out", str(tmp_path / "results")])


def test_report_outputs_are_whole_and_sections_never_interleave(tmp_path):
    """write_experiment: NAME.json replaced whole (no stray temporary file), REPORT.md appended once per call."""
    from evaluation.report import write_experiment
    record = {"experiment": "demo", "title": "t", "created": "now", "preset": "tiny", "command": "c", "x": 1}
    for value in (1, 2):
        write_experiment(tmp_path, {**record, "x": value}, "text", [])
    assert json.loads((tmp_path / "demo.json").read_text())["x"] == 2
    assert (tmp_path / "REPORT.md").read_text().count("## demo: t") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".REPORT.md.lock", "REPORT.md", "demo.json"]


def test_paper_preset_protocol_defaults():
    """The paper preset: Tables 1/2 at L = 256 / 512 with block 32 in the grid and NFE down to 4; Fig. 4 on 1000."""
    import types

    from experiments.eval_autoencoder import block_grid
    from experiments.eval_context import PRESETS, nfe_grid
    preset = PRESETS["paper"]
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(nfe=None, blocks=None), get=lambda name: preset[name])
    assert preset["table_lengths"] == (256, 512) and preset["fig4_num"] == 1000 and preset["lengths"] == (512, 1024)
    assert block_grid(ctx, 256) == [32, 64, 128, 256] and block_grid(ctx, 512) == [32, 64, 128, 256, 512]
    assert nfe_grid(ctx, 256, "table_nfe_min") == [4, 8, 16, 32, 64, 128, 256]
    assert nfe_grid(ctx, 512)[0] == 16  # Fig. 6 keeps its own grid


def test_fig6_takes_a_prior_per_length(runs):
    root, common = runs
    result = _run(runs, "fig6", "--lengths", "16", "--nfe", "4", "--length-priors", f"16={root / 'prior_flat'}")
    assert result["priors"]["16"]["prior"] == str(root / "prior_flat")
    from experiments.eval_generation import length_priors
    with pytest.raises(ValueError, match="L=DIR"):
        length_priors(["runs/prior"], "--length-priors")


def test_speed_subcommand_rows_and_headline(runs):
    result = _run(runs, "speed", "--length", "16", "--nfe", "4", "16", "--thresholds", "0.0", "1.5")
    rows = result["rows"]
    assert {(r["method"], r["decoding"]) for r in rows} >= {("base", "fixed"), ("conthendisc", "threshold 0.0"),
                                                           ("conwithindisc", "threshold 1.5")}
    by = {(r["method"], r["decoding"], r["steps"]): r for r in rows}
    assert by[("base", "threshold 0.0", 16)]["demasker_calls"] == 1  # tau = 0: the whole block in one step
    assert by[("base", "threshold 1.5", 16)]["tokens_per_step"] == 1  # tau > 1: one token per step
    assert all(r["seconds_per_sample"] > 0 for r in rows)
    assert result["headline"]["reference"]["nfe"] == 16


def test_speed_base_only_with_cached_rows(runs):
    """--methods with no name: the base MDM alone; --caches adds its NFE = L rows in semi-AR blocks of
    --cache-block-length (the base chose one block here) without and with the approximate cache, same NFE as
    the uncached row; each its own curve, the reference still the base's chosen setting."""
    root, _ = runs
    chosen = root / "base-decoding-one-block.json"
    chosen.write_text(json.dumps({"chosen": {"16": {"remasking": "low_confidence", "block_length": None,
                                                    "eos": "as trained"}}}))
    result = _run(runs, "speed", "--length", "16", "--nfe", "16", "--thresholds", "0.9", "--methods",
                  "--caches", "prefix", "dual", "--cache-block-length", "8", "--base-decoding", str(chosen))
    by = {r["decoding"]: r for r in result["rows"]}
    assert {r["method"] for r in result["rows"]} == {"base"}
    assert set(by) == {"fixed", "threshold 0.9", "factor 1.0", "fixed, blocks of 8", "fixed, blocks of 8, cache prefix",
                       "fixed, blocks of 8, cache dual"}
    assert by["fixed, blocks of 8, cache dual"]["nfe"] == by["fixed"]["nfe"] == 16
    assert by["fixed, blocks of 8, cache dual"]["setting"]["block_length"] == 8 and by["fixed"]["setting"]["block_length"] is None
    assert result["headline"]["reference"]["nfe"] == 16 and result["headline"]["reference"]["decoding"] == "fixed"
    names = {S.curve_name(r) for r in result["rows"]}
    assert {"base fixed", "base blocks", "base cache prefix", "base cache dual"} <= names


def test_speed_cache_rows_reuse_the_base_row_when_it_already_runs_in_those_blocks(runs):
    """The base's chosen setting already in blocks of --cache-block-length: its fixed row at NFE = L is the
    uncached row, so no 'blocks of' row repeats it; the cache rows keep those blocks."""
    root, _ = runs
    chosen = root / "base-decoding-blocks-of-8.json"
    chosen.write_text(json.dumps({"chosen": {"16": {"remasking": "low_confidence", "block_length": 8,
                                                    "eos": "as trained"}}}))
    result = _run(runs, "speed", "--length", "16", "--nfe", "16", "--thresholds", "--factors", "--methods",
                  "--caches", "dual", "--cache-block-length", "8", "--base-decoding", str(chosen))
    assert [r["decoding"] for r in result["rows"]] == ["fixed", "fixed, blocks of 8, cache dual"]
    assert result["rows"][0]["setting"]["block_length"] == result["rows"][1]["setting"]["block_length"] == 8


def test_speed_times_every_row_apart_and_reads_the_curves(runs):
    """speed: the fine NFE grid by default (6 steps: 3 over 2 blocks of 8 for the chosen semi-AR base), a timing
    pass after the quality rows (every row --timing-repeats times), the curve rule (evaluation/match.py) as the
    headline with its rule written before the numbers, the older point matches beside it."""
    root, _ = runs
    chosen = root / "base-decoding-block8.json"
    chosen.write_text(json.dumps({"chosen": {"16": {"remasking": "low_confidence", "block_length": 8,
                                                    "eos": "as trained"}}}))
    result = _run(runs, "speed", "--length", "16", "--thresholds", "0.5", "--methods", "conthendisc",
                  "--timing-repeats", "2", "--timing-batch", "2", "--keep", "2", "--base-decoding", str(chosen))
    fixed = [r["steps"] for r in result["rows"] if r["method"] == "base" and r["decoding"] == "fixed"]
    assert fixed == [1, 2, 3, 4, 6, 8, 12, 16]
    assert all(len(r["timing"]["repeats"]) == 2 and r["timing"]["interval"][0] <= r["timing"]["median"]
               for r in result["rows"])
    assert result["timing"]["repeats"] == 2 and result["timing"]["batch"] == 2
    assert result["keep"] == 2 and result["registers_read"] == 2
    headline = result["headline"]
    assert headline["m"] == 6 and headline["level"] == pytest.approx(1 - 0.05 / 6)  # base, ConThenDisc x 3 rules
    assert set(headline["curves"]) == {f"{m} {rule}" for m in ("base", "conthendisc")
                                       for rule in ("fixed", "threshold", "factor")}
    assert headline["curves"]["base fixed"]["speedup"] >= 1 and headline["curves"]["base fixed"]["timed"]
    assert "reference" in result["matches"]
    report = (root / "results" / "REPORT.md").read_text()
    section = report[report.rindex("## speed:"):]
    assert section.index("Matched quality (evaluation/match.py") < section.index("| method | decoding |")
    assert "Older rule, for comparison" in section
    quiet = _run(runs, "speed", "--length", "16", "--nfe", "16", "--thresholds", "0.5", "--methods",
                 "--timing-repeats", "0")
    assert quiet["timing"] is None and not any("timing" in r for r in quiet["rows"])


def test_speed_timing_only_times_an_earlier_quality_pass(runs):
    """The quality pass beside other jobs (--timing-repeats 0), the timing pass later, alone (--timing-only): the
    same rows and scores, each timed, both commands in the record; other flags than the quality pass's refused.
    --thresholds / --factors alone: no adaptive rows; --guided-max-nfe caps the guided methods' grid."""
    root, common = runs
    flags = ["--length", "16", "--nfe", "2", "4", "16", "--thresholds", "--factors", "--methods", "conthendisc",
             "--guided-max-nfe", "4", "--keep", "2", "--name", "speed-split"]  # --keep: tuples, lists in JSON
    out = root / "results"
    E.main(["speed", *common, "--out", str(out), "--overwrite", *flags, "--timing-repeats", "0"])
    first = json.loads((out / "speed-split.json").read_text())
    quality, quality_created = first["results"], first["created"]
    assert [(r["method"], r["decoding"], r["steps"]) for r in quality["rows"]] == \
        [("base", "fixed", 2), ("base", "fixed", 4), ("base", "fixed", 16), ("conthendisc", "fixed", 2),
         ("conthendisc", "fixed", 4)]
    assert quality["timing"] is None
    E.main(["speed", *common, "--out", str(out), *flags, "--timing-only", "--timing-repeats", "2",
            "--timing-batch", "2"])
    saved = json.loads((out / "speed-split.json").read_text())
    timed = saved["results"]
    assert timed["timing"]["repeats"] == 2 and all(len(r["timing"]["repeats"]) == 2 for r in timed["rows"])
    for before, after in zip(quality["rows"], timed["rows"]):
        assert {k: v for k, v in after.items() if k != "timing"} == before
    assert timed["headline"]["curves"]["base fixed"]["timed"]
    assert timed["quality_pass"]["created"] == json.loads(json.dumps(quality_created))
    changed = [*flags[:-2], "--name", "speed-split", "--seed", "1", "--timing-only"]
    with pytest.raises(SystemExit, match="--seed"):
        E.main(["speed", *common, "--out", str(out), *changed])
    with pytest.raises(SystemExit, match="no quality record"):
        E.main(["speed", *common, "--out", str(out), *flags[:-2], "--name", "speed-none", "--timing-only"])
    assert json.loads((out / "speed-split.json").read_text()) == saved  # refusals change nothing
    with pytest.raises(SystemExit):
        E.main(["fig6", *common, "--out", str(out), "--timing-only"])


@pytest.mark.parametrize("flag", ["--rows-from", "--base-decoding"])
def test_a_missing_record_flag_is_refused_before_any_work(tmp_path, capsys, flag):
    with pytest.raises(SystemExit):
        E.parse_args(["fig6", flag, str(tmp_path / "absent.json"), "--out", str(tmp_path / "out")])
    assert f"{flag} {tmp_path / 'absent.json'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fig6_rows_from_a_speed_record_are_the_rows_it_would_sample(runs):
    """fig6 --rows-from speed.json: the speed record's fixed rows at that length (same checkpoints and flags) are
    taken, not drawn again, and equal what fig6 samples itself; other flags refuse the reuse."""
    root, common = runs
    out = root / "results"
    E.main(["speed", *common, "--out", str(out), "--overwrite", "--name", "speed-rows", "--length", "16",
            "--nfe", "4", "16", "--thresholds", "--timing-repeats", "0"])
    speed = out / "speed-rows.json"
    fig6 = ["fig6", *common, "--out", str(out), "--overwrite", "--lengths", "16", "--nfe", "4", "16"]
    drawn = E.main([*fig6, "--name", "fig6-drawn"])["results"]["lengths"]["16"]
    taken = E.main([*fig6, "--name", "fig6-taken", "--rows-from", str(speed)])["results"]["lengths"]["16"]
    keep = ["--keep", "2", "--nfe", "16", "--methods", "conthendisc"]  # tuples in args, lists in the record
    E.main(["speed", *common, "--out", str(out), "--overwrite", "--name", "speed-keep", "--length", "16",
            "--thresholds", "--factors", "--timing-repeats", "0", *keep])
    kept = E.main([*fig6, "--name", "fig6-keep", "--rows-from", str(out / "speed-keep.json"), *keep])
    assert kept["results"]["lengths"]["16"]["rows_from"]["rows"] == {"base": [16], "conthendisc": [16]}
    assert taken["rows_from"]["rows"] == {"base": [4, 16], "conthendisc": [4, 16], "conwithindisc": [4, 16]}
    timing = ("seconds_per_sample", "bootstrap_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in drawn["rows"]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in taken["rows"]]
    with pytest.raises(SystemExit, match="--seed"):
        E.main([*fig6, "--name", "fig6-refused", "--rows-from", str(speed), "--seed", "3"])
    record = json.loads(speed.read_text())
    stale = root / "speed-stale.json"
    stale.write_text(json.dumps({**record, "created": "2020-01-01T00:00:00"}))  # checkpoints trained after it
    with pytest.raises(SystemExit, match="changed after the record was made"):
        E.main([*fig6, "--name", "fig6-refused", "--rows-from", str(stale)])
    import shutil
    if not (root / "cprior_copy").exists():
        shutil.copytree(root / "cprior", root / "cprior_copy")
    other = E.main([*fig6, "--name", "fig6-other-prior", "--rows-from", str(speed), "--cond-prior",
                    str(root / "cprior_copy")])  # not the conditional prior speed sampled with: its rows are drawn
    assert set(other["results"]["lengths"]["16"]["rows_from"]["rows"]) == {"base", "conthendisc"}
    one = E.main([*fig6, "--name", "fig6-one", "--rows-from", str(speed), "--methods", "conwithindisc"])
    assert one["results"]["lengths"]["16"]["rows_from"]["rows"] == {"base": [4, 16], "conwithindisc": [4, 16]}


def test_timing_pass_interleaves_rows_and_pairs_repeats():
    """Repeat r runs every row once, rotated by r, on the seeds of quality batch r; one warm-up round first."""
    import types

    from experiments import eval_timing
    calls = []

    def sampler(name):
        def run(indices, generator, prior_generator):
            calls.append((name, indices[0], generator.initial_seed()))
            return None, {"nfe": 3.0}
        return run
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(seed=0), device="cpu")
    rows, record = eval_timing.timing_pass(ctx, [sampler("a"), sampler("b"), sampler("c")], repeats=3, batch=2)
    assert [c[0] for c in calls] == ["a", "b", "c"] + ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [c[1] for c in calls[3:]] == [0, 0, 0, 2, 2, 2, 4, 4, 4]  # repeat r: quality batch r's first index
    assert len({c[2] for c in calls[3:6]}) == 1 and calls[3][2] != calls[6][2]  # the same seed within a repeat
    assert all(len(r["repeats"]) == 3 and r["nfe"] == 3.0 for r in rows)
    assert record["repeats"] == 3 and record["order"].startswith("round-robin")


def test_sharded_samples_time_with_the_device_clock(monkeypatch):
    """Seconds per sample are read after the device's queued work (evaluation/nfe.clock synchronises CUDA): a
    plain perf_counter after an asynchronous GPU decode measured the launch, not the decoding."""
    import types

    import evaluation.nfe as N
    from experiments import eval_context
    ticks = iter([10.0, 12.0])
    monkeypatch.setattr(N, "clock", lambda device: next(ticks))
    monkeypatch.setattr(eval_context, "decode_programs", lambda tokenizer, tokens, *ids: ["x"] * len(tokens))
    env = types.SimpleNamespace(rank=0, world_size=1, is_main=True, distributed=False)
    ctx = types.SimpleNamespace(env=env, get=lambda name: 4, args=types.SimpleNamespace(seed=0), device="cpu",
                                tokenizer=None, eos_id=0, bos_id=1)
    texts, nfe, stats = eval_context.sharded_samples(ctx, 4, lambda i, g, pg: (torch.zeros(len(i), 2), 3.0), "t",
                                                     with_stats=True)
    assert stats["seconds_per_sample"] == 0.5 and nfe == 3.0 and texts == ["x"] * 4


def test_fine_nfe_grid():
    import types

    from experiments.eval_context import nfe_grid
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(nfe=None, nfe_grid=None), get=lambda name: 1)
    assert nfe_grid(ctx, 32, kind="fine") == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
    assert nfe_grid(ctx, 32) == [1, 2, 4, 8, 16, 32] and nfe_grid(ctx, 20, kind="fine")[-3:] == [12, 16, 20]
    ctx.args.nfe_grid = "powers"  # the flag wins over a subcommand's default
    assert nfe_grid(ctx, 32, kind="fine") == [1, 2, 4, 8, 16, 32]


def test_fig6_records_the_registers_read(runs):
    result = _run(runs, "fig6", "--lengths", "16", "--nfe", "4", "16", "--bootstrap", "0", "--keep", "16=2", "3")
    block = result["lengths"]["16"]
    assert block["keep"] == 2 and block["registers_read"] == 2
    assert block["curves"]["m"] == 3 and "conthendisc" in block["curves"]["curves"]


def test_tiny_preset_statistics_protocol():
    """The tiny preset: 256 samples per generation point, 200 bootstrap replicates, an NFE grid from 1 up to L, MAUVE on
    the last valid token's features by default."""
    import types

    from experiments.eval_context import PRESETS, nfe_grid
    preset = PRESETS["tiny"]
    ctx = types.SimpleNamespace(args=types.SimpleNamespace(nfe=None), get=lambda name: preset[name])
    assert preset["gen_num"] == 256 and preset["bootstrap"] == 200
    assert nfe_grid(ctx, 64) == [1, 2, 4, 8, 16, 32, 64] and len(nfe_grid(ctx, 128)) == 8
    args = E.parse_args(["fig6", "--out", "results"])
    assert args.features == "last" and args.bootstrap is None and args.bootstrap_restarts == 1


def test_real_reference_splits_too_few_held_out_programs(runs):
    """Fewer than 2 x count programs fit: the available ones are halved into the reference and the real-vs-real
    set, and the ceiling says so."""
    from experiments.eval_context import Context, real_reference
    root, common = runs
    ctx = Context(E.parse_args(["fig6", *common, "--out", str(root / "results")]))
    available = ctx.held_out_count(16)
    assert 4 <= available < ctx.held_out_count()
    features, ceiling = real_reference(ctx, 16, available)
    assert features.shape[0] == ceiling["reference_size"] == available - available // 2
    assert ceiling["num_programs"] == available // 2 and "only" in ceiling["note"] and "mauve_ci" in ceiling


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_model_subcommand_runs_in_half_precision(runs, tmp_path, dtype):
    """GPU evaluations load every model in bf16 / fp16 (--dtype): the generators (the conditional prior's
    refresh included), the autoencoder sweeps and the priors' figures give finite numbers."""
    root, common = runs
    argv = {"fig4": ["--registers", "1"], "table1": ["--length", "16", "--nfe", "4", "--blocks", "16"],
            "fig6": ["--lengths", "16", "--nfe", "4"], "speed": ["--length", "16", "--nfe", "4", "--thresholds", "0.5"],
            "fig9": [], "fig11": ["--length", "16", "--nfe", "4", "--k-priors", str(root / "prior"),
                                  "--prior-no-offsets", str(root / "prior_flat")]}
    for name, extra in argv.items():
        record = E.main([name, *common, "--dtype", dtype, "--out", str(tmp_path / name), *extra])
        numbers = [v for v in _leaves(record["results"]) if isinstance(v, float)]
        bad = [v for v in numbers if not math.isfinite(v)]
        assert numbers and not bad, f"{name}: {len(bad)} of {len(numbers)} numbers not finite"


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value
