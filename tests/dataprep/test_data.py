"""dataprep/data.py: corpus reading and splitting, tokenizers, the memmapped token cache, resumable batches."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dataprep import data
from unwritable import UNWRITABLE, make_unwritable


def write_corpus(root, n_files=24):
    """Small package: files with a decorated function (varied length) and a class, plus bad files."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(f"    x{j} = a * {i} + {j}" for j in range(3 + i))
        (root / f"mod{i}.py").write_text(
            f"import os\n\n\n@decorator({i})\ndef func_{i}(a):\n{body}\n    return a\n\n\n"
            f"class Thing{i}:\n    def method(self):\n        return {i}\n" + "\n# padding\n" * 20)
    (root / "dup_a.py").write_text("def same():\n    return 1\n")
    (root / "dup_b.py").write_text("def  same():\n        return 1\n")  # equal after whitespace normalising
    (root / "broken.py").write_text("def oops(:\n")
    (root / "nul.py").write_bytes(b"x = 1\x00\n")
    (root / "latin.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    for folder in ("site-packages", "tests"):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "skipped.py").write_text(f"def from_{folder.replace('-', '_')}():\n    pass\n")
    return root


@pytest.fixture()
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def build(out, corpus, **settings):
    settings = {"seq_len": 64, "vocab_size": 300, "whole_file_lines": 10, "val_fraction": 0.25,
                "test_fraction": 0.25, **settings}
    return data.build_dataset(out, corpus, **settings)


def test_split_programs_keeps_decorators_and_top_level_defs():
    source = "import os\n\n@deco\ndef f():\n    return 1\n\nclass C:\n    def g(self):\n        pass\n\n" \
             "async def h():\n    pass\n\nx = 3\n"
    assert data.split_programs(source, whole_file_lines=2) == [
        "@deco\ndef f():\n    return 1", "class C:\n    def g(self):\n        pass", "async def h():\n    pass"]
    assert data.split_programs(source, whole_file_lines=100) == [source.strip("\n")]
    with pytest.raises(SyntaxError):
        data.split_programs("def (:\n")


def test_bad_files_are_skipped_and_counted(corpus):
    programs, stats = data.collect_programs(corpus, whole_file_lines=10)
    assert stats["skipped_unparsable"] == 2 and stats["skipped_non_utf8"] == 1  # broken.py, nul.py; latin.py
    assert stats["files"] == 24 + 5  # site-packages/ and tests/ are not read
    texts = [text for split in programs.values() for _, text in split]
    assert not any("from_site_packages" in t or "from_tests" in t for t in texts)
    with_tests, _ = data.collect_programs(corpus, whole_file_lines=10, include_tests=True)
    assert any("from_tests" in t for split in with_tests.values() for _, t in split)


def test_duplicates_are_dropped(corpus):
    programs, stats = data.collect_programs(corpus, whole_file_lines=10)
    texts = [text for split in programs.values() for _, text in split]
    assert stats["duplicates"] == 1 and stats["programs"] == len(texts) == stats["programs_found"] - 1
    assert len({data.normalised_hash(t) for t in texts}) == len(texts)
    assert sum("same()" in t for t in texts) == 1
    assert stats["programs"] == 2 * 24 + 1  # func_i and Thing_i per module, one copy of same()


def test_splits_are_deterministic_and_by_file(corpus):
    programs, _ = data.collect_programs(corpus, whole_file_lines=10, val_fraction=0.3, test_fraction=0.3)
    assert data.collect_programs(corpus, whole_file_lines=10, val_fraction=0.3, test_fraction=0.3)[0] == programs
    owner = {}
    for split, entries in programs.items():
        assert entries, f"split {split} is empty"
        for path, _ in entries:
            assert owner.setdefault(path, split) == split  # no file in two splits
            assert data.split_of(path, 0.3, 0.3) == split
    shares = [data.split_of(f"pkg/mod{i}.py", 0.05, 0.1) for i in range(4000)]
    assert abs(shares.count("val") / 4000 - 0.05) < 0.015 and abs(shares.count("test") / 4000 - 0.1) < 0.02


def test_jsonl_corpus(tmp_path):
    lines = [json.dumps({"text": "def a():\n    return 1", "path": "x/a.py"}), "", "{not json",
             json.dumps({"no_text": 1}), json.dumps({"text": "def b():\n    return 2"})]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')
    programs, stats = data.collect_programs(path)
    assert stats["files"] == 5 and stats["skipped_unparsable"] == 2 and stats["skipped_non_utf8"] == 1
    assert programs[data.split_of("x/a.py")][0] == ("x/a.py", "def a():\n    return 1")
    assert sum(map(len, programs.values())) == 2


def test_trained_tokenizer_special_tokens_round_trip(tmp_path):
    tokenizer = data.train_tokenizer(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.mask_id) == (0, 1, 2, 3)
    text = "def f(x):\n    return x  + 1\n\tpass  # caf\u00e9 \u2192 \U0001F40A"  # bytes never seen in training
    assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = [tokenizer.bos_id] + tokenizer.encode("x = 1") + [tokenizer.mask_id, tokenizer.eos_id, tokenizer.pad_id]
    assert tokenizer.decode(ids) == "<|bos|>x = 1<|mask|><|eos|><|pad|>"
    assert tokenizer.encode("<|bos|>x<|mask|>")[0] == 0 and tokenizer.encode("<|bos|>x<|mask|>")[-1] == 3
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = data.load_tokenizer(tmp_path)
    assert loaded.encode(text) == tokenizer.encode(text) and loaded.special_ids() == tokenizer.special_ids()


def public_like_tokenizer(specials):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.add_special_tokens(specials)
    return tokenizer


def test_public_tokenizer_roles(tmp_path):
    llada = data.TextTokenizer(public_like_tokenizer(["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"]))
    assert (llada.bos_id, llada.eos_id, llada.pad_id, llada.mask_id) == (95, 96, 96, 97)  # EOS = PAD
    qwen = data.TextTokenizer(public_like_tokenizer(["<|endoftext|>", "<|im_start|>"]))
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.mask_id) == (None, 95, 95, None)
    with pytest.raises(ValueError, match="EOS"):
        data.TextTokenizer(public_like_tokenizer(["<|im_start|>"]))
    qwen.save(tmp_path / "qwen.json")
    with pytest.raises(ValueError, match="BOS and MASK"):
        build(tmp_path / "cache", write_corpus(tmp_path / "corpus"), tokenizer=tmp_path / "qwen.json")


def test_load_tokenizer_errors_offline(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="offline, pass the path of a local tokenizer.json"):
        data.load_tokenizer("Qwen/Qwen3-Embedding-0.6B")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        data.load_tokenizer(tmp_path)


def test_pack_rows_wraps_and_pads():
    rows, lengths = data.pack_rows([[5, 6], [5, 6, 7, 8, 9], []], 6, [0], [1], 1)
    assert rows.tolist() == [[0, 5, 6, 1, 1, 1], [0, 5, 6, 7, 8, 1], [0, 1, 1, 1, 1, 1]]
    assert lengths.tolist() == [4, 6, 2] and rows.dtype == np.int32
    rows, lengths = data.pack_rows([[5, 6]], 5, [], [9], 2)
    assert rows.tolist() == [[5, 6, 9, 2, 2]] and lengths.tolist() == [3]


def test_rows_are_bos_program_eos_padded_with_eos(tmp_path, corpus):
    meta = build(tmp_path / "cache", corpus, seq_len=512)
    tokenizer = data.load_tokenizer(tmp_path / "cache")
    programs, _ = data.collect_programs(corpus, whole_file_lines=10, val_fraction=0.25, test_fraction=0.25)
    bos, eos = meta["bos_id"], meta["eos_id"]
    for split in data.SPLITS:
        arrays = data.load_split(tmp_path / "cache", split)
        ids, lengths = arrays["ids"], arrays["lengths"]
        assert ids.dtype == np.int32 and ids.shape == (len(programs[split]), 512) and arrays["encoder_ids"] is None
        for row, length, (_, text) in zip(ids, lengths, programs[split]):
            assert row[0] == bos and row[length - 1] == eos and (row[length:] == eos).all()
            assert eos not in row[1:length - 1] and bos not in row[1:length - 1]
            assert tokenizer.decode(row[1:length - 1]) == text
    assert meta["splits"]["train"]["tokens"] == int(data.load_split(tmp_path / "cache", "train")["lengths"].sum())


def test_overlong_cut_versus_drop(tmp_path, corpus):
    cut = build(tmp_path / "cut", corpus, seq_len=24, overlong="cut")
    drop = build(tmp_path / "drop", corpus, seq_len=24, overlong="drop")
    tokenizer = data.load_tokenizer(tmp_path / "cut")
    programs, _ = data.collect_programs(corpus, whole_file_lines=10, val_fraction=0.25, test_fraction=0.25)
    for split in data.SPLITS:
        token_counts = [len(tokenizer.encode(text)) for _, text in programs[split]]
        too_long = sum(n > 22 for n in token_counts)
        assert drop["splits"][split]["dropped_overlong"] == too_long and cut["splits"][split]["cut"] == too_long
        assert drop["splits"][split]["programs"] == len(token_counts) - too_long
        assert cut["splits"][split]["programs"] == len(token_counts)
        rows = data.load_split(tmp_path / "cut", split)
        for row, length, n in zip(rows["ids"], rows["lengths"], token_counts):
            assert length == min(n, 22) + 2 and row[length - 1] == cut["eos_id"]
        assert (data.load_split(tmp_path / "drop", split)["lengths"] <= 24).all()
    assert sum(s["cut"] for s in cut["splits"].values()) > 0


def test_cache_is_reused_and_rebuilt_when_settings_or_files_change(tmp_path, corpus, monkeypatch):
    out = tmp_path / "cache"
    meta = build(out, corpus)
    before = np.array(data.load_split(out, "train")["ids"])

    def fail(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(data, "tokenize_split", fail)
    monkeypatch.setattr(data, "train_tokenizer", fail)
    assert build(out, corpus) == meta
    with pytest.raises(AssertionError, match="rebuilt"):
        build(out, corpus, seq_len=48)
    # a failed rebuild leaves the good cache exactly as it was, and no staging folder behind
    assert data.load_meta(out) == meta and (np.array(data.load_split(out, "train")["ids"]) == before).all()
    assert not list(out.parent.glob(f".{out.name}.stage-*"))
    monkeypatch.undo()
    assert build(out, corpus, seq_len=48)["settings"]["seq_len"] == 48
    assert data.load_split(out, "train")["ids"].shape[1] == 48
    assert build(out, corpus)["seq_len"] == 64 and (data.load_split(out, "train")["ids"] == before).all()
    (corpus / "mod0.py").write_text((corpus / "mod0.py").read_text() + "\n\ndef extra():\n    return 0\n")
    assert build(out, corpus)["settings"]["corpus_sha256"] != meta["settings"]["corpus_sha256"]


def test_two_builds_are_identical(tmp_path, corpus):
    first, second = build(tmp_path / "a", corpus), build(tmp_path / "b", corpus)
    assert first["splits"] == second["splits"] and first["stats"] == second["stats"]
    for split in data.SPLITS:
        assert (data.load_split(tmp_path / "a", split)["ids"] == data.load_split(tmp_path / "b", split)["ids"]).all()


def test_shard_indices_give_every_example_to_one_rank():
    for n in (1, 7, 103):
        for world_size in (1, 2, 3, 4):
            for epoch in (0, 1):
                shards = [data.shard_indices(n, rank, world_size, epoch, seed=5) for rank in range(world_size)]
                assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    assert (data.shard_indices(103, 0, 1, 0, 5) != data.shard_indices(103, 0, 1, 1, 5)).any()


def test_batches_resume_exactly_and_match_across_world_sizes(tmp_path, corpus):
    build(tmp_path / "cache", corpus)
    dataset = data.TokenData(tmp_path / "cache", "train")
    per_epoch = data.steps_per_epoch(len(dataset), 4)
    assert per_epoch >= 2
    stream = dataset.batches(4, seed=3)
    straight = [next(stream) for _ in range(3 * per_epoch)]  # three epochs
    for saved in (per_epoch - 1, per_epoch):  # at the end of epoch 0, and one step into epoch 1
        resumed = dataset.batches(4, seed=3, position=straight[saved][1])
        for (expected, expected_pos), (batch, pos) in zip(straight[saved + 1:], resumed):
            assert pos == expected_pos and (batch["ids"] == expected["ids"]).all()
    epoch_rows = np.concatenate([b["ids"].numpy() for b, _ in straight[:per_epoch]])
    assert len({row.tobytes() for row in epoch_rows}) == per_epoch * 4  # no row twice within an epoch
    ranks = [dataset.batches(2, seed=3, rank=r, world_size=2) for r in range(2)]
    global_batches = dataset.batches(4, seed=3)
    for _ in range(per_epoch):
        parts = [next(r)[0]["ids"] for r in ranks]
        whole = next(global_batches)[0]["ids"]
        assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, np.concatenate(parts).tolist()))


def test_two_tokenizers_give_aligned_arrays(tmp_path, corpus):
    encoder_tok = data.train_tokenizer(["def f(x):\n    return x * 2\n"] * 10, vocab_size=270)
    encoder_tok.save(tmp_path / "enc.json")
    out = tmp_path / "cache"
    meta = build(out, corpus, seq_len=32, overlong="cut", encoder_tokenizer=tmp_path / "enc.json",
                 encoder_seq_len=160)
    assert meta["encoder"]["eos_id"] == 1 and not meta["shared_tokenizer"]
    demasker_tok = data.load_tokenizer(out)
    for split in data.SPLITS:
        arrays = data.load_split(out, split)
        assert arrays["encoder_ids"].shape == (arrays["ids"].shape[0], 160)
        for row, length, enc_row, enc_length in zip(arrays["ids"], arrays["lengths"], arrays["encoder_ids"],
                                                     arrays["encoder_lengths"]):
            assert enc_row[enc_length - 1] == encoder_tok.eos_id and (enc_row[enc_length:] == encoder_tok.pad_id).all()
            assert encoder_tok.decode(enc_row[:enc_length - 1]) == demasker_tok.decode(row[1:length - 1])
    batch = data.TokenData(out, "train").batch([0, 1])
    assert batch["encoder_ids"].shape == (2, 160) and batch["ids"].shape == (2, 32)
    assert batch["encoder_mask"].sum(1).tolist() == data.load_split(out, "train")["encoder_lengths"][:2].tolist()
    assert not (batch["encoder_ids"][:, :20] == batch["ids"][:, 1:21]).all()  # really a different tokenizer


def test_shared_tokenizer_encoder_view(tmp_path, corpus):
    meta = build(tmp_path / "cache", corpus)
    batch = data.TokenData(tmp_path / "cache", "train").batch([0, 2])
    assert (batch["ids"] == batch["encoder_ids"]).all() and meta["encoder"] is None
    for row in range(2):
        valid = batch["encoder_ids"][row][batch["encoder_mask"][row]].tolist()
        assert valid[0] == meta["bos_id"] and valid[-1] == meta["eos_id"] and meta["eos_id"] not in valid[:-1]


def test_stdlib_build_with_a_file_cap(tmp_path, capsys):
    files = data.find_source_files(data.default_corpus_dir())
    assert len(files) > 100 and not any("site-packages" in f.parts for f in files)
    data.main(["--out", str(tmp_path / "stdlib"), "--max-files", "10", "--vocab-size", "400", "--seq-len", "128"])
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["files"] == 10 and report["corpus"]["files"] == 10
    assert sum(s["programs"] for s in report["splits"].values()) > 10
    meta = data.load_meta(tmp_path / "stdlib")
    assert meta["vocab_size"] == 400 and data.load_split(tmp_path / "stdlib", "train")["ids"].shape[1] == 128


@pytest.mark.parametrize("flags,message", [
    ({"seq_len": 2}, "--seq-len must be an integer >= 3"),
    ({"vocab_size": -1}, "--vocab-size must be >= 260"),
    ({"vocab_size": 100}, "--vocab-size must be >= 260"),
    ({"val_fraction": 0.6, "test_fraction": 0.5}, "must be < 1"),
    ({"overlong": "trim"}, "--overlong"),
    ({"max_files": 0}, "--max-files"),
])
def test_bad_arguments_are_refused_before_any_file_is_touched(tmp_path, corpus, flags, message):
    out = tmp_path / "cache"
    meta = build(out, corpus)
    files = sorted(p.name for p in out.iterdir())
    tokenizer = (out / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError, match=message):
        build(out, corpus, **flags)
    assert sorted(p.name for p in out.iterdir()) == files and (out / "tokenizer.json").read_bytes() == tokenizer
    assert data.load_meta(out) == meta


def test_a_rebuild_that_keeps_no_program_leaves_the_old_cache(tmp_path, corpus):
    out = tmp_path / "cache"
    meta = build(out, corpus)
    with pytest.raises(ValueError, match="no training program fits"):
        build(out, corpus, seq_len=3)  # valid number, but every program is longer than one token: all dropped
    assert data.load_meta(out) == meta


def test_the_cli_names_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--seq-len must be"):
        data.main(["--out", str(tmp_path / "c"), "--seq-len", "1"])
    assert not (tmp_path / "c").exists()


def _build_in_child(out, corpus, queue, barrier, log):
    import sys
    sys.stderr = open(log, "w")  # build_dataset announces each tokenizer it trains here: one line per build
    try:
        barrier.wait(timeout=60)  # both children past their imports: the builds really overlap
        meta = build(Path(out), Path(corpus))
        queue.put(("ok", meta["settings"]))
    except BaseException as error:  # report, never hang the parent
        queue.put(("error", repr(error)))
    finally:
        sys.stderr.close()


def test_two_processes_build_one_cache_together(tmp_path, corpus):
    """Started together on a fresh cache: both succeed, one builds, the other waits on the lock and reuses it."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(2)
    out, logs = tmp_path / "cache", [tmp_path / f"child{i}.log" for i in range(2)]
    procs = [ctx.Process(target=_build_in_child, args=(str(out), str(corpus), queue, barrier, str(log)))
             for log in logs]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert sum(log.read_text().count("training a byte-level BPE") for log in logs) == 1  # one build
    assert results[0][1] == results[1][1] == data.load_meta(out)["settings"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache.stage")]  # no stray stage
    assert data.TokenData(out, "train").batch([0])["ids"].shape == (1, 64)


def test_an_unreadable_meta_names_the_file_and_a_rebuild_replaces_it(tmp_path, corpus):
    out = tmp_path / "cache"
    meta = build(out, corpus)
    (out / "meta.json").write_text('{"settings": ')  # truncated
    with pytest.raises(ValueError, match=r"meta.json is not readable JSON.*python -m dataprep.data --out"):
        data.load_meta(out)
    assert build(out, corpus)["settings"] == meta["settings"] and data.load_meta(out)["settings"] == meta["settings"]


def test_check_tokenizer_matches_names_both_files(tmp_path, corpus):
    out = tmp_path / "cache"
    build(out, corpus)
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_bytes((out / "tokenizer.json").read_bytes())
    assert data.check_tokenizer_matches(out, run) == ["tokenizer.json"]
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"cache.*tokenizer.json \(sha256 \w+\) is not the tokenizer.*run"):
        data.check_tokenizer_matches(out, run)


def test_an_unreadable_tokenizer_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{torn")
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizer.json .*rebuild"):
        data.load_tokenizer(tmp_path)


def test_a_folder_that_is_not_a_cache_is_never_replaced(tmp_path, corpus):
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a dataprep/data.py cache"):
        build(precious, corpus)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        build(tmp_path / "file", corpus)
    (tmp_path / "empty").mkdir()
    assert build(tmp_path / "empty", corpus)["splits"]["train"]["programs"] > 0


def test_an_edit_of_the_same_size_and_time_rebuilds_the_cache(tmp_path, corpus):
    """The corpus fingerprint hashes the contents: an edit that keeps the file's size and modification time
    (a one-character change, mtime restored) still invalidates the cache."""
    import os
    out = tmp_path / "cache"
    meta = build(out, corpus)
    path = corpus / "mod1.py"
    status = path.stat()
    text = path.read_text()
    path.write_text(text.replace("return 1", "return 7", 1))
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert path.stat().st_size == status.st_size and path.stat().st_mtime_ns == status.st_mtime_ns
    assert build(out, corpus)["settings"]["corpus_sha256"] != meta["settings"]["corpus_sha256"]


def test_a_source_file_with_a_utf8_bom_is_read(tmp_path):
    """Editors on some systems start UTF-8 files with a byte order mark; ast.parse of the text with the BOM
    fails, so the file was counted unparsable."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "bom.py").write_bytes(b"\xef\xbb\xbf" + b"def with_bom(a):\n    return a + 1\n")
    programs, stats = data.collect_programs(root, whole_file_lines=10)
    texts = [text for split in programs.values() for _, text in split]
    assert stats["skipped_unparsable"] == 0 and any(t.startswith("def with_bom") for t in texts)


def test_the_cache_follows_the_umask(tmp_path, corpus):
    """The cache folder is a staging folder made by mkdtemp (0700) and swapped in: it gets the user's umask."""
    from infra import atomic
    out = build(tmp_path / "cache", corpus)
    folder = tmp_path / "cache"
    assert folder.stat().st_mode & 0o777 == atomic.DIR_MODE
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {atomic.FILE_MODE}
    assert out["splits"]["train"]["programs"] > 0


def test_a_build_that_waited_for_one_with_other_settings_is_refused(tmp_path, corpus, monkeypatch):
    """Two builds into one folder, the second started while the first held the lock, with another --seq-len: the
    first succeeds and keeps its cache; the second is refused (it used to replace the first one's cache and both
    reported success)."""
    import threading
    out = tmp_path / "cache"
    inside, proceed, seen = threading.Event(), threading.Event(), threading.Event()
    build_into, cache_state = data._build_into, data.cache_state

    def slow_build(*args, **kwargs):  # the first build holds the lock until the second one has started
        inside.set()
        assert proceed.wait(60)
        return build_into(*args, **kwargs)

    def noted_state(folder):
        state = cache_state(folder)
        if threading.current_thread().name == "second":
            seen.set()
        return state

    monkeypatch.setattr(data, "_build_into", slow_build)
    monkeypatch.setattr(data, "cache_state", noted_state)
    results = {}

    def run(name, seq_len):
        try:
            results[name] = build(out, corpus, seq_len=seq_len)
        except ValueError as error:
            results[name] = error

    first = threading.Thread(target=run, args=("first", 64), name="first")
    first.start()
    assert inside.wait(60)
    second = threading.Thread(target=run, args=("second", 48), name="second")
    second.start()
    assert seen.wait(60)  # the second build has looked at the folder and now waits for the lock
    proceed.set()
    first.join(60)
    second.join(60)
    assert results["first"]["settings"]["seq_len"] == 64 == data.load_meta(out)["seq_len"]
    message = str(results["second"])
    assert str(out) in message and "another build finished there while this one waited" in message
    assert "seq_len 64 there, 48 here" in message and "another --out" in message
    assert not [p.name for p in tmp_path.iterdir() if ".stage-" in p.name]
    assert build(out, corpus, seq_len=48)["seq_len"] == 48  # run again: the cache is replaced, as asked


@pytest.mark.parametrize("case", UNWRITABLE)
def test_an_output_location_that_cannot_be_written_is_refused_before_the_build(tmp_path, corpus, monkeypatch, case,
                                                                             capsys):
    target = tmp_path / "runs" / "cache"
    phrase = make_unwritable(case, tmp_path / "runs", monkeypatch)
    monkeypatch.setattr(data, "_build_into", lambda *a, **k: pytest.fail("the build started"))
    with pytest.raises(SystemExit) as refused:
        data.main(["--out", str(target), "--corpus", str(corpus), "--seq-len", "64", "--vocab-size", "300"])
    message = str(refused.value)
    assert str(target) in message and "nothing was written" in message and "a writable folder with free space" in message
    assert phrase in message
    assert not target.exists() and not (tmp_path / "runs" / ".cache.lock").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: chmod does not bite")
def test_a_read_only_folder_is_refused_before_the_build(tmp_path, corpus):
    parent = tmp_path / "read_only"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"read_only/cache cannot be written: .*read_only is not writable"):
            build(parent / "cache", corpus)
    finally:
        parent.chmod(0o755)
    assert list(parent.iterdir()) == []
