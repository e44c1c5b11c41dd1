"""bench/bench_ae_budget.py: a tiny sweep end to end (train_ae.py subprocess, mid-schedule point, resumable
results), CER scored as eval_autoencoder scores it (0 for a perfect reconstruction, 1 for an empty one), and
its number and name checks."""

import json

import pytest
import torch

from dataprep import data

from bench import bench_ae_budget as B

SEQ_LEN = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """11 two-line functions (BPE 320, L = 32): 2 land in val, 9 in train (as tests/test_train_ae.py)."""
    folder = tmp_path_factory.mktemp("data")
    corpus = folder / "corpus.jsonl"
    texts = [f"def f{i}(x, y):\n    return x {'+-*'[i % 3]} y * {i + 2}" for i in range(11)]
    corpus.write_text("".join(json.dumps({"text": t, "path": f"prog_{i}.py"}) + "\n" for i, t in enumerate(texts)))
    data.build_dataset(folder / "cache", corpus, seq_len=SEQ_LEN, vocab_size=320, overlong="drop")
    return folder / "cache"


def bench_args(cache, out, *extra):
    return B.parse_args(["--data", str(cache), "--out", str(out), "--seq-len", str(SEQ_LEN), "--nfe", "32", "8",
                         "--num", "2", "--val-programs", "2", "--config", "tiny",
                         "--num-registers 2 --global-batch-size 4 --micro-batch-size 4", *extra])


@pytest.fixture(scope="module")
def swept(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return out, B.run(bench_args(cache, out, "--steps", "2", "--eval-at", "1"))


def test_a_sweep_records_every_point_with_wall_clock_and_a_table(swept):
    out, results = swept
    assert sorted(results["points"]) == ["tiny@2:1", "tiny@2:2"]
    mid, end = results["points"]["tiny@2:1"], results["points"]["tiny@2:2"]
    assert (mid["step"], end["step"], end["steps"]) == (1, 2, 2)
    assert 0 < mid["train_wall_s"] < end["train_wall_s"] and 0 < mid["train_cpu_s"] < end["train_cpu_s"]  # cumulative
    for point in (mid, end):
        assert set(point["cer"]) == {"32", "8"} and all(v >= 0 for v in point["cer"].values())
        assert point["train_cer"] >= 0
    assert mid["val"] is None and end["val"]["step"] == 2 and 0 <= end["val"]["top1_r1"] <= 1
    assert len(end["val"]["ce"]) == 10  # the whole curve, mask ratios 0.1 .. 1.0
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert "| tiny | `--num-registers 2" in table and "| 2 / 2 |" in table and "| 1 / 2 |" in table
    run = out / "runs" / "tiny-s2"
    assert json.loads((run / "checkpoint" / "progress.json").read_text())["step"] == 2


def test_a_rerun_skips_finished_points_and_trains_nothing(cache, swept):
    out, results = swept
    log = (out / "runs" / "tiny-s2.train.log").read_text()
    again = B.run(bench_args(cache, out, "--steps", "2", "--eval-at", "1"))
    assert again["points"] == results["points"]
    assert (out / "runs" / "tiny-s2.train.log").read_text() == log


def test_cer_is_scored_on_decoded_text_against_the_source(cache, swept, monkeypatch):
    """A reconstruction equal to the source scores 0; an all-EOS one (empty text) scores exactly 1."""
    import mdm
    out, _ = swept
    programs, ctx = B.held_out_programs(cache, 2, SEQ_LEN)
    run = out / "runs" / "tiny-s2"
    monkeypatch.setattr(mdm, "autoencode", lambda enc, dem, ids, *a, **k: (ids.clone(), 1))
    assert B.autoencode_cer(run, programs, ctx, SEQ_LEN, 8, 1, "low_confidence")[0] == 0.0
    monkeypatch.setattr(mdm, "autoencode", lambda enc, dem, ids, *a, **k: (torch.full_like(ids, ctx.eos_id), 1))
    cer, example = B.autoencode_cer(run, programs, ctx, SEQ_LEN, 8, 1, "low_confidence")
    assert cer == 1.0 and example["reconstruction"] == "" and example["source"] == programs["texts"][0]


def test_bad_numbers_and_names_are_refused(cache, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench_args(cache, tmp_path, "--nfe", "5")  # 5 does not divide L = 32
    assert "must divide --seq-len" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        B.parse_args(["--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert "not a dataprep/data.py cache" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="names must be letters"):
        B.configurations(B.parse_args(["--data", str(cache), "--out", str(tmp_path), "--config", "a/b", ""]))
    with pytest.raises(SystemExit, match="unique"):
        B.configurations(B.parse_args(["--data", str(cache), "--out", str(tmp_path), "--config", "a", "",
                                       "--config", "a", "--lr 1"]))


def test_a_rerun_with_random_remasking_scores_only_the_final_checkpoint(cache, swept, capsys):
    """Only the latest checkpoint is kept, so the mid-schedule point is skipped (named), the end is scored."""
    out, results = swept
    again = B.run(bench_args(cache, out, "--steps", "2", "--eval-at", "1", "--remasking", "random"))
    assert "tiny@2:1:random" not in again["points"] and "tiny@2:1:random: skipped" in capsys.readouterr().out
    point = again["points"]["tiny@2:2:random"]
    assert point["remasking"] == "random" and point["train_wall_s"] == results["points"]["tiny@2:2"]["train_wall_s"]
    assert "| 2 / 2 | random |" in (out / "results.md").read_text()


def test_reference_cers_are_the_skeleton_and_the_next_program():
    """'ab c' without word characters is ' ' (3 deletions of 4 characters); 'xy' vs 'ab c' costs 4 of 4, and
    'ab c' vs 'xy' 4 of 2 (cer divides by the reference's length)."""
    refs = B.reference_cers(["ab c", "xy"])
    assert refs["skeleton"] == pytest.approx((3 / 4 + 2 / 2) / 2)
    assert refs["other_program"] == pytest.approx((4 / 4 + 4 / 2) / 2)
    assert B.reference_cers(["same", "same"])["other_program"] == 0.0


def test_random_remasking_is_scored_with_seeded_draws(cache, swept):
    out, _ = swept
    programs, ctx = B.held_out_programs(cache, 2, SEQ_LEN)
    run = out / "runs" / "tiny-s2"
    torch.manual_seed(1)
    first = B.autoencode_cer(run, programs, ctx, SEQ_LEN, 8, 1, "random")
    torch.manual_seed(2)  # the global RNG does not enter
    assert B.autoencode_cer(run, programs, ctx, SEQ_LEN, 8, 1, "random") == first
