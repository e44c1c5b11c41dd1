"""data.py: corpus splitting, deterministic file-level splits, tokenizer, memmapped cache."""

import json

import numpy as np
import pytest

import data


def write_corpus(root, n_files=30):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(f"    x{j} = {i} + {j}" for j in range(25))
        (root / f"mod{i}.py").write_text(
            f"import os\n\n@decorator\ndef func_{i}(a):\n{body}\n    return a\n\n"
            f"class Thing{i}:\n    def method(self):\n        return {i}\n" + "\n" * 20)
    (root / "dup_a.py").write_text("def same():\n    return 1\n")
    (root / "dup_b.py").write_text("def same():\n        return 1\n")  # same after whitespace normalising
    (root / "broken.py").write_text("def oops(:\n")
    (root / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "site-packages").mkdir(exist_ok=True)
    (root / "site-packages" / "ignored.py").write_text("def ignored():\n    pass\n")
    return root


def test_split_programs_keeps_decorators_and_top_level_defs():
    source = "import os\n\n@deco\ndef f():\n    return 1\n\nclass C:\n    pass\n\nx = 3\n"
    assert data.split_programs(source, whole_file_lines=2) == ["@deco\ndef f():\n    return 1", "class C:\n    pass"]
    assert data.split_programs(source, whole_file_lines=100) == [source.strip("\n")]
    with pytest.raises(SyntaxError):
        data.split_programs("def (:\n")


def test_collect_counts_skips_and_dedups(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    programs, stats = data.collect_programs(root, whole_file_lines=10)
    assert stats["skipped_syntax"] == 1 and stats["skipped_unicode"] == 1
    assert stats["duplicates"] == 1
    everything = sum(programs.values(), [])
    assert len(everything) == len(set(everything))
    assert not any("ignored" in p for p in everything)
    again, _ = data.collect_programs(root, whole_file_lines=10)
    assert again == programs  # deterministic


def test_splits_are_by_file():
    splits = {data.split_of(f"pkg/mod{i}.py", 0.2, 0.2) for i in range(200)}
    assert splits == {"train", "val", "test"}
    assert all(data.split_of(f"pkg/mod{i}.py", 0.2, 0.2) == data.split_of(f"pkg/mod{i}.py", 0.2, 0.2)
               for i in range(50))


def test_no_file_in_two_splits(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    programs, _ = data.collect_programs(root, whole_file_lines=10, val_fraction=0.3, test_fraction=0.3)
    owner = {}
    for split, texts in programs.items():
        for text in texts:
            number = text.split("func_")[1].split("(")[0] if "func_" in text else text.split("Thing")[1].split(":")[0] if "Thing" in text else None
            if number is not None:
                assert owner.setdefault(number, split) == split


def test_tokenizer_special_tokens_round_trip(tmp_path):
    tokenizer = data.train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id) == (0, 1, 2, 3)
    text = "def f(x):\n    return x  + 1\n\tpass"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = [tokenizer.bos_id] + tokenizer.encode("x = 1") + [tokenizer.mask_id, tokenizer.eos_id]
    assert tokenizer.decode(ids) == "<|bos|>x = 1<|mask|><|eos|>"
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = data.load_tokenizer(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.mask_id == 3


def test_pack_rows_wraps_pads_and_handles_overlong():
    rows, lengths = data.pack_rows([[5, 6], [5, 6, 7, 8, 9]], 6, [0], [1], 1, "cut")
    assert rows == [[0, 5, 6, 1, 1, 1], [0, 5, 6, 7, 8, 1]] and lengths == [4, 6]
    rows, lengths = data.pack_rows([[5, 6], [5, 6, 7, 8, 9]], 6, [0], [1], 1, "drop")
    assert rows[1] is None and lengths == [4, None]


def test_build_reuses_cache_and_rebuilds_on_change(tmp_path, monkeypatch):
    root = write_corpus(tmp_path / "corpus")
    out = tmp_path / "cache"
    meta = data.build_dataset(out, root, seq_len=64, vocab_size=300, whole_file_lines=10)
    ids = data.load_split(out, "train")["ids"]
    assert ids.dtype == np.int32 and ids.shape[1] == 64
    assert (ids[:, 0] == meta["bos_id"]).all()
    lengths = data.load_split(out, "train")["lengths"]
    for row, length in zip(ids, lengths):
        assert row[length - 1] == meta["eos_id"] and (row[length:] == meta["eos_id"]).all()
    calls = []
    monkeypatch.setattr(data, "train_tokenizer", lambda *a, **k: calls.append(1))
    assert data.build_dataset(out, root, seq_len=64, vocab_size=300, whole_file_lines=10) == meta
    assert calls == []  # reused, nothing re-tokenized
    monkeypatch.undo()
    rebuilt = data.build_dataset(out, root, seq_len=48, vocab_size=300, whole_file_lines=10)
    assert data.load_split(out, "train")["ids"].shape[1] == 48 and rebuilt["settings"]["seq_len"] == 48


def test_two_tokenizers_give_aligned_arrays(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    encoder_tok = data.train_tokenizer(["def f(x):\n    return x\n"] * 10, vocab_size=280)
    encoder_tok.save(tmp_path / "enc.json")
    out = tmp_path / "cache"
    data.build_dataset(out, root, seq_len=64, vocab_size=300, encoder_tokenizer=tmp_path / "enc.json",
                       encoder_seq_len=96, whole_file_lines=10)
    split = data.load_split(out, "train")
    assert split["encoder_ids"].shape == (split["ids"].shape[0], 96)
    batch = data.TokenData(out, "train").batch([0, 1])
    ids, enc_ids, enc_mask = batch
    demasker_tok = data.load_tokenizer(out)
    for row in range(2):
        text = demasker_tok.decode([t for t in ids[row].tolist() if t > 3])
        enc_valid = enc_ids[row][enc_mask[row]].tolist()
        assert enc_valid[-1] == encoder_tok.eos_id
        assert encoder_tok.decode(enc_valid[:-1]) == text


def test_shared_tokenizer_encoder_view(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    out = tmp_path / "cache"
    meta = data.build_dataset(out, root, seq_len=64, vocab_size=300, whole_file_lines=10)
    ids, enc_ids, enc_mask = data.TokenData(out, "train").batch([0, 2])
    assert (ids == enc_ids).all()
    for row in range(2):
        valid = enc_ids[row][enc_mask[row]].tolist()
        assert valid[0] == meta["bos_id"] and valid[-1] == meta["eos_id"] and meta["eos_id"] not in valid[:-1]


def test_stdlib_corpus_is_found_offline():
    files = data.find_source_files(data.default_corpus_dir())
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    programs, stats = data.collect_programs(data.default_corpus_dir(), files=files[:20])
    assert stats["files"] == 20 and sum(map(len, programs.values())) > 20
