"""experiments/train_scorer.py: the Scorer's NLL and features against slow per-text loops, public Qwen3 layout loading,
and a short training run on a dataprep/data.py cache."""

import json

import pytest
import torch
import torch.nn.functional as F

from experiments import train_scorer as S
from infra.checkpoint import rename_keys, swap_columns
from encoder import HF_KEY_TABLE, Encoder, EncoderConfig




def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n", "class A:\n    pass\n"] * 10, trainer)
    return tokenizer


def tiny_scorer(max_length=64):
    torch.manual_seed(0)
    tokenizer = byte_tokenizer()
    cfg = EncoderConfig.tiny(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_heads=2, num_kv_heads=1,
                             head_dim=16, intermediate_size=64, num_registers=1, eos_token_id=1, pad_token_id=1)
    return S.Scorer(Encoder(cfg), tokenizer, bos_id=0, eos_id=1, max_length=max_length)


TEXTS = ["def f(x):\n    return x\n", "", "class A:\n    pass\n" * 3, "x = 1"]


def test_score_matches_a_slow_per_text_loop():
    scorer = tiny_scorer()
    nll, counts, tokens = scorer.score(TEXTS, batch_size=3)  # length-sorted, right-padded batches
    for i, text in enumerate(TEXTS):
        ids = [0] + scorer.tokenizer.encode(text, add_special_tokens=False).ids + [1]
        assert tokens[i] == ids[1:-1] and counts[i] == len(ids) - 1
        with torch.no_grad():
            logits = scorer.model.lm_logits(scorer.model.backbone(torch.tensor([ids])))[0]  # alone, unpadded
        expected = sum(-F.log_softmax(logits[t], -1)[ids[t + 1]].item() for t in range(len(ids) - 1))
        assert abs(nll[i] - expected) < 1e-4


def test_truncation_keeps_the_first_tokens_without_an_eos():
    scorer = tiny_scorer(max_length=5)
    ids = scorer.encode(["class A:\n    pass\n" * 3])[0]
    assert len(ids) == 5 and ids[0] == 0 and 1 not in ids[1:]


def test_features_mean_and_last():
    scorer = tiny_scorer()
    mean, last = scorer.features(TEXTS, batch_size=2, pool="mean"), scorer.features(TEXTS, batch_size=2)
    for i, ids in enumerate(scorer.encode(TEXTS)):
        with torch.no_grad():
            hidden = scorer.model.backbone(torch.tensor([ids]))[0]
        assert torch.allclose(torch.from_numpy(mean[i]), hidden[1:].mean(0), atol=1e-5)
        assert torch.allclose(torch.from_numpy(last[i]), hidden[-1], atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        scorer.features(TEXTS, pool="max")


def test_native_and_public_qwen3_folders_load_and_score_alike(tmp_path):
    """Our save and a public Qwen3 CausalLM layout (model. prefix, HF config fields) give the same NLL."""
    from safetensors.torch import save_file
    scorer = tiny_scorer()
    tokenizer_file = tmp_path / "tokenizer.json"
    scorer.tokenizer.save(str(tokenizer_file))
    S.save_scorer(tmp_path / "native", scorer.model, tokenizer_file, {"bos_id": 0, "eos_id": 1, "max_length": 64})
    cfg = scorer.model.cfg
    public = tmp_path / "public"
    public.mkdir()
    state = {k: v for k, v in scorer.model.state_dict().items() if k != "suffix_registers"}
    state, _ = rename_keys(state, swap_columns(HF_KEY_TABLE))
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(public / "model.safetensors"))
    (public / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps, "tie_word_embeddings": True,
        "max_position_embeddings": 128, "eos_token_id": 1, "hidden_act": "silu"}))
    (public / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    native, loaded = S.Scorer.load(tmp_path / "native"), S.Scorer.load(public)
    assert loaded.bos_id == loaded.eos_id == 1  # Qwen3 has no BOS: EOS doubles as BOS
    loaded.bos_id = 0  # same wrapping as the native scorer, to compare the weights' numbers
    assert torch.allclose(torch.tensor(native.score(TEXTS)[0]), torch.tensor(loaded.score(TEXTS)[0]), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        (public / "tokenizer.json").unlink()
        S.Scorer.load(public)


def test_valid_targets_stop_at_the_first_eos():
    ids = torch.tensor([[0, 5, 6, 1, 1, 1], [0, 5, 5, 5, 5, 5]])
    assert S.valid_targets(ids, eos_id=1).tolist() == [[True, True, True, False, False],
                                                        [True, True, True, True, True]]


def test_training_lowers_the_validation_perplexity(tmp_path, monkeypatch):
    from dataprep import data
    corpus = tmp_path / "corpus.jsonl"
    programs = [{"text": f"def f{i}(x):\n    return x + {i % 10}", "path": f"m{i}.py"} for i in range(200)]
    corpus.write_text("\n".join(json.dumps(p) for p in programs) + "\n")
    data.main(["--out", str(tmp_path / "data"), "--corpus", str(corpus), "--seq-len", "24", "--vocab-size", "280",
               "--val-fraction", "0.1", "--test-fraction", "0.1"])
    tiny = dict(S.PRESETS["tiny"], model=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                                intermediate_size=64))
    monkeypatch.setitem(S.PRESETS, "tiny", tiny)
    before = S.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "s0"), "--steps", "1",
                     "--device", "cpu"])["val_ppl"]
    info = S.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "s"), "--steps", "60", "--device", "cpu"])
    assert info["val_ppl"] < before / 3
    scorer = S.Scorer.load(tmp_path / "s")
    assert scorer.bos_id == 0 and scorer.eos_id == 1 and (tmp_path / "s" / "scorer.json").is_file()
    nll, counts, _ = scorer.score(["def f3(x):\n    return x + 3"])
    assert counts[0] > 0 and nll[0] / counts[0] < 3.0


@pytest.mark.parametrize("flags, text", [(["--steps", "0"], "--steps must be an integer >= 1, got 0"),
                                         (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
                                         (["--lr", "0"], "--lr must be a number > 0"),
                                         (["--max-bad-steps", "0"], "--max-bad-steps must be an integer >= 1")])
def test_scorer_numbers_are_checked_up_front(tmp_path, capsys, flags, text):
    with pytest.raises(SystemExit) as exit_info:
        S.parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "s"), *flags])
    assert exit_info.value.code == 2 and text in capsys.readouterr().err


def test_a_diverging_scorer_stops_and_leaves_the_existing_one(tmp_path, monkeypatch):
    """NaN losses are skipped (never reach the weights); after --max-bad-steps in a row the run stops with
    an error and the scorer already in --out (replaced only with --overwrite) is left byte for byte."""
    from dataprep import data

    from infra import guards
    corpus = tmp_path / "corpus.jsonl"
    programs = [{"text": f"def f{i}(x):\n    return x + {i % 10}", "path": f"m{i}.py"} for i in range(60)]
    corpus.write_text("\n".join(json.dumps(p) for p in programs) + "\n")
    data.build_dataset(tmp_path / "data", corpus, seq_len=24, vocab_size=280, val_fraction=0.1, test_fraction=0.1)
    tiny = dict(S.PRESETS["tiny"], model=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                                                intermediate_size=64))
    monkeypatch.setitem(S.PRESETS, "tiny", tiny)
    argv = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "s"), "--device", "cpu", "--max-bad-steps", "3"]
    S.main(argv + ["--steps", "2"])
    before = (tmp_path / "s" / "model.safetensors").read_bytes()
    real, calls = S.lm_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) > 1 else 1.0)

    monkeypatch.setattr(S, "lm_loss", poisoned)
    with pytest.raises(FileExistsError, match="--overwrite"):  # a scorer is there: replacing it must be asked for
        S.main(argv + ["--steps", "10"])
    with pytest.raises(guards.NonFiniteError, match="step 4: .*3 consecutive"):
        S.main(argv + ["--steps", "10", "--overwrite"])
    assert (tmp_path / "s" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []  # no stray (a build lock may stay)
