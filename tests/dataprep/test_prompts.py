"""Tests for dataprep/prompts.py: prompt/answer pairs with ast, split by file, tokenisation, the infilling view."""

import ast
import json

import pytest
import torch

from dataprep import prompts as P
from dataprep.corpus import split_of
from dataprep.tokenization import train_tokenizer

SOURCE = '''
import os


def add(a, b):
    """Return a + b."""
    return a + b


def no_doc(x):
    return x


def only_doc():
    """Nothing else."""


class Box:
    @staticmethod
    def make(value,
             scale=1):
        """Build a box.

        Scaled."""
        # a comment
        total = value * scale
        return Box(total)
'''


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([SOURCE] * 4, vocab_size=300)


def test_function_pairs_signature_docstring_to_body_dedented():
    pairs = dict(P.function_pairs(SOURCE))
    assert set(pairs) == {'def add(a, b):\n    """Return a + b."""',
                          '@staticmethod\ndef make(value,\n         scale=1):\n    """Build a box.\n\n    Scaled."""'}
    assert pairs['def add(a, b):\n    """Return a + b."""'] == "    return a + b"
    method = pairs['@staticmethod\ndef make(value,\n         scale=1):\n    """Build a box.\n\n    Scaled."""']
    assert method == "    # a comment\n    total = value * scale\n    return Box(total)"
    for prompt, answer in pairs.items():
        tree = ast.parse(prompt + "\n" + answer)  # a standalone program
        assert isinstance(tree.body[0], ast.FunctionDef) and len(tree.body) == 1


def test_collect_pairs_split_by_file_and_deduplicated(tmp_path):
    names = [f"pkg/mod{i}.py" for i in range(30)]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(SOURCE.replace("a + b", f"a + b + {name.count('1')}") if "2" in name else SOURCE)
    (tmp_path / "broken.py").write_text("def (:\n")
    pairs, stats = P.collect_pairs(tmp_path, val_fraction=0.3, test_fraction=0.3)
    assert stats["skipped"] == 1 and stats["files"] == 31
    distinct = {p.program for items in pairs.values() for p in items}
    assert len(distinct) == stats["pairs"] and stats["duplicates"] > 0  # identical files contribute once
    for split, items in pairs.items():
        assert all(split_of(p.path, 0.3, 0.3) == split for p in items)  # the token cache's split, by file
    P.write_pairs(tmp_path / "out", pairs)
    back = P.load_pairs(tmp_path / "out", "train")
    assert [vars(p) for p in back] == [vars(p) for p in pairs["train"]]
    with pytest.raises(FileNotFoundError, match="python -m dataprep.prompts --out"):
        P.load_pairs(tmp_path / "missing", "train")


def test_encode_pairs_canvas_prompt_prefix_and_encoder_rows(tokenizer):
    pairs = [P.Pair("a.py", p, a) for p, a in P.function_pairs(SOURCE)]
    batch = P.encode_pairs(pairs, tokenizer, seq_len=96)
    assert batch["dropped"] == 0 and batch["ids"].shape == (2, 96)
    for i, pair in enumerate(batch["pairs"]):
        row, n = batch["ids"][i].tolist(), int(batch["prompt_len"][i])
        assert row[:n] == [tokenizer.bos_id] + tokenizer.encode(pair.prompt + "\n")
        length = int(batch["lengths"][i])
        assert row[length - 1] == tokenizer.eos_id and set(row[length:]) <= {tokenizer.eos_id}
        assert tokenizer.decode(row[1:length - 1]) == pair.program
        ids, mask = batch["answer"]
        valid = ids[i][mask[i]].tolist()
        assert valid == [tokenizer.bos_id] + tokenizer.encode(pair.answer) + [tokenizer.eos_id]
    short = P.encode_pairs(pairs, tokenizer, seq_len=20)
    assert short["dropped"] == 2 and short["ids"].shape == (0, 20)
    own = P.encode_pairs(pairs, tokenizer, seq_len=96, encoder_tokenizer=tokenizer, encoder_seq_len=64)
    ids, mask = own["prompt"]  # the encoder layout: text EOS, pad id padding, no BOS
    assert ids.shape == (2, int(mask.sum(1).max())) and ids.shape[1] <= 64 and ids[0, 0] != tokenizer.bos_id
    assert ids[0][~mask[0]].eq(tokenizer.pad_id).all()


def test_middle_span_masks_only_inside_the_program():
    ids = torch.tensor([[9, 5, 6, 7, 8, 4, 3, 1, 1, 1], [9, 5, 6, 7, 1, 1, 1, 1, 1, 1]])
    lengths = torch.tensor([8, 5])
    canvas, span = P.middle_span(ids, lengths, 0.5, mask_id=99)
    assert span.sum(1).tolist() == [3, 2] and span[0, 2:5].all() and span[1, 1:3].all()  # centred
    assert torch.equal(canvas[~span], ids[~span]) and (canvas[span] == 99).all()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        _, span = P.middle_span(ids, lengths, 0.4, 99, generator=g)
        assert not span[:, 0].any() and not span[0, 7:].any() and not span[1, 4:].any()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        P.middle_span(ids, lengths, 1.0, 99)


def test_parse_infill_layout_and_errors(tokenizer):
    text = "def add(a, b):\n<|span|>\n    return a + b"
    canvas, span = P.parse_infill(text, tokenizer, span_tokens=5, seq_len=40, mask_id=3)
    before = [tokenizer.bos_id] + tokenizer.encode("def add(a, b):\n")
    assert canvas[:len(before)].tolist() == before and span.sum() == 5 and (canvas[span] == 3).all()
    after = tokenizer.encode("\n    return a + b") + [tokenizer.eos_id]
    assert canvas[len(before) + 5:len(before) + 5 + len(after)].tolist() == after
    with pytest.raises(ValueError, match="exactly once"):
        P.parse_infill("def f(): pass", tokenizer, 5, 40, 3)
    with pytest.raises(ValueError, match="exactly once"):
        P.parse_infill("<|span|> <|span|>", tokenizer, 5, 40, 3)
    with pytest.raises(ValueError, match="raise --length"):
        P.parse_infill(text, tokenizer, 5, 12, 3)


def test_prompt_canvas_and_errors(tokenizer):
    canvas, n = P.prompt_canvas("def f(x):", tokenizer, 16, mask_id=3)
    assert canvas[:n].tolist() == [tokenizer.bos_id] + tokenizer.encode("def f(x):\n") and (canvas[n:] == 3).all()
    with pytest.raises(ValueError, match="empty"):
        P.prompt_canvas("  \n", tokenizer, 16, 3)
    with pytest.raises(ValueError, match="shorten the prompt"):
        P.prompt_canvas("def f(x):\n    return x * 2 + 1", tokenizer, 4, 3)


def test_cli_writes_the_splits(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(SOURCE)
    P.main(["--out", str(tmp_path / "pairs"), "--corpus", str(tmp_path / "src")])
    counts = json.loads(capsys.readouterr().out)
    assert counts["pairs"] == 2 and sum(counts[s] for s in ("train", "val", "test")) == 2


def test_hand_edited_pairs_and_corpus_lines_are_named(tmp_path, capsys):
    import json
    import pytest
    from dataprep import prompts as P
    good = {"path": "a.py", "prompt": "def f():\n    \"\"\"Doc.\"\"\"", "answer": "    return 1"}
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test.jsonl line 2 is not a pair .*rebuild with"):
        P.load_pairs(tmp_path, "test")
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"path": "b.py", "prompt": 3}) + "\n")
    with pytest.raises(ValueError, match=r"line 2 is not a pair"):
        P.load_pairs(tmp_path, "test")
    corpus = tmp_path / "corpus.jsonl"
    program = 'def g(x):\n    """Add one."""\n    return x + 1\n'
    corpus.write_text(json.dumps({"text": program, "path": "g.py"}) + "\n[1, 2]\n" + json.dumps({"path": 4}) + "\n")
    pairs, _ = P.collect_pairs(corpus, val_fraction=0.0, test_fraction=0.0)
    assert sum(len(v) for v in pairs.values()) == 1
    assert "2 line(s) give no program" in capsys.readouterr().err
