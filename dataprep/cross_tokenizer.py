"""The encoder's view of a partially masked demasker canvas, with one tokenizer or two.

Paper map (arXiv 2603.20210):
- Alg. 3 (ConWithinDisc) conditions the prior on h(x_t), the encoder's registers of the demasker's
  current canvas; Alg. 4 / App. E trains that conditional prior on h(x^(r)), x_0 with a fraction r of
  its tokens masked, embedded "with an attention mask that blocks information flow through masked
  positions" (encoder.py `hide`). Both read a canvas of DEMASKER token ids with some positions masked.
- Sec. 5 / App. C: the encoder h_phi is Qwen3-Embedding-0.6B and the demasker f_theta is LLaDA-8B, which
  have different tokenizers. The paper does not say how the encoder reads a LLaDA canvas; this module is
  our reading, one view used everywhere (conditional prior training, the ConWithinDisc refresh, the
  partial-conditioning experiments of eval.py), so that training and sampling condition alike.

Two views, both callables (ids (B, L) long, masked (B, L) bool) -> (enc_ids, attention_mask, hide):

- SharedView (one tokenizer, the tiny setting): the encoder reads the demasker row itself, masked ids
  replaced by the pad id, valid up to and including the first visible EOS (latent_data.visible_view).
  It equals dataprep/latent_data.visible_view (tested).

- CrossTokenizerView (two tokenizers). Each row is split into runs of visible and masked positions:
    * the text stops at the first VISIBLE EOS (demasker rows are BOS program EOS EOS ...); the encoder
      row ends with the encoder's EOS there, as dataprep/data.py builds encoder rows (program EOS pad ...), so the
      summary token (register 0, the last valid position) is the EOS exactly as in training of h_phi;
    * the leading BOS is dropped (encoder rows have none): a masked position 0 gives no encoder slot when
      the demasker has a BOS (data rows always carry it there), and visible BOS / pad ids give none;
    * a visible run is decoded with the demasker's tokenizer and the text re-encoded with the encoder's
      (no special tokens). Runs are re-encoded independently: a masked span inside a word ("con[M][M]ing")
      gives the encoder "con" and "ing" as separate texts, which is all that is known of the word. A
      byte-level run cut inside a multi-byte character decodes to U+FFFD, which is what the encoder sees;
    * a masked run of n demasker tokens becomes hidden encoder slots: their ids are the encoder's pad id,
      they are valid (attention_mask True) and hidden (hide True), so they keep their RoPE positions and
      the encoder sees where the gaps are and how long they are, never what they hold. How many slots:
      `slots_per_token` x n, the expected number of encoder tokens per demasker token, measured on the
      corpus by `length_ratio` (text of a run is unknown, its length in demasker tokens is known). Per-run
      rounding uses error diffusion along the row (the fractional remainder is carried to the next gap) and
      every gap gets at least one slot, so two visible runs never merge; the total stays within one slot
      of slots_per_token x (masked tokens) unless many short gaps force the minimum.
    * with no visible EOS the trailing masked run is a hidden tail (valid, hidden), as in the shared view
      where the whole canvas is valid when no EOS is visible.
    * rows longer than `max_length` are cut there; a row ended by a visible EOS keeps the EOS as its last
      token (dataprep/data.py's --overlong cut convention). Output width: `length`, else the longest row.
  With nothing masked the view is exactly dataprep/data.py's encoder row of the decoded program (tested), so
  h(x^(0)) equals h_phi(x_0) of the register bank the prior models.

`masked_view` draws x^(r) in the demasker's token space (Alg. 4: x^(r) is what the demasker would see) and
takes the view. `view_from_files` / `view_from_data` build the right view from tokenizer files (a train_ae.py checkpoint
holds tokenizer.json and, with two tokenizers, encoder_tokenizer.json; a dataprep/data.py cache the same).
Cost: Python over the rows plus one batched re-encoding of the distinct visible runs; measured on CPU (one
thread, stdlib programs, our 4096 BPE -> the Qwen3 tokenizer) ~0.14 s per 256 x 512 batch at r ~ U(0, 1),
~0.25 s at r = 0.5, so large-batch conditional training should build it in data-loader workers.
"""

import json
import math
from pathlib import Path

import numpy as np
import torch

from dataprep.latent_data import visible_view


# ------------------------------------------------------------------------------------------------
# One tokenizer: today's view
# ------------------------------------------------------------------------------------------------


class SharedView:
    """Encoder and demasker share a tokenizer: the encoder reads the canvas row itself (latent_data.visible_view)."""

    shared = True

    def __init__(self, eos_id, pad_id):
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)

    def __call__(self, ids, masked, length=None):
        """ids (B, L) long, masked (B, L) bool -> enc_ids (B, L) long, attention_mask (B, L), hide (B, L) bool.
        length: accepted for CrossTokenizerView's interface; the shared view is always the canvas width L."""
        attention_mask, hide = visible_view(ids, masked, self.eos_id)
        return ids.masked_fill(masked, self.pad_id), attention_mask, hide


# ------------------------------------------------------------------------------------------------
# Two tokenizers: decode visible runs, re-encode them, hidden slots for masked runs
# ------------------------------------------------------------------------------------------------


def _segments(row, masked_row, eos_id, drop_ids, skip_first):
    """One row -> ([("text", [ids]) | ("gap", n)], ended_by_visible_eos). Plain Python lists in and out."""
    segments, ended = [], False
    for i, (token, hidden) in enumerate(zip(row, masked_row)):
        if i == 0 and skip_first and hidden:
            continue  # the masked BOS slot: the encoder's rows have no BOS (a visible BOS is dropped below)
        if hidden:
            if segments and segments[-1][0] == "gap":
                segments[-1] = ("gap", segments[-1][1] + 1)
            else:
                segments.append(("gap", 1))
        elif token == eos_id:
            ended = True
            break
        elif token in drop_ids:
            continue
        elif segments and segments[-1][0] == "text":
            segments[-1][1].append(token)
        else:
            segments.append(("text", [token]))
    return segments, ended


class CrossTokenizerView:
    """The encoder's view of a demasker canvas when the two models have different tokenizers (module docstring).

    demasker_tok, encoder_tok: data.TextTokenizer (or anything with encode(text) -> ids, decode(ids) -> text,
    bos_id, eos_id, pad_id). slots_per_token: hidden encoder slots per masked demasker token (length_ratio).
    max_length: cap on the encoder row (e.g. the encoder's sequence length in the data cache), None = no cap.
    """

    shared = False

    def __init__(self, demasker_tok, encoder_tok, slots_per_token=1.0, max_length=None):
        if not slots_per_token > 0:
            raise ValueError(f"slots_per_token must be > 0 (hidden encoder slots per masked demasker token), "
                             f"got {slots_per_token}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.demasker_tok, self.encoder_tok = demasker_tok, encoder_tok
        self.slots_per_token, self.max_length = float(slots_per_token), max_length
        self.eos_id = demasker_tok.eos_id
        self.drop_ids = {i for i in (demasker_tok.bos_id, getattr(demasker_tok, "pad_id", None))
                         if i is not None and i != demasker_tok.eos_id}
        self.skip_first = demasker_tok.bos_id is not None

    def _encode_runs(self, runs):
        """Visible demasker runs (tuples of ids) -> {run: encoder ids}: each distinct run decoded and re-encoded once
        (one batched encoder call when the tokenizer offers encode_batch)."""
        distinct = list(dict.fromkeys(runs))
        texts = [self.demasker_tok.decode(run) for run in distinct]
        if hasattr(self.encoder_tok, "encode_batch"):
            encoded = [encoding.ids for encoding in self.encoder_tok.encode_batch(texts)]
        else:
            encoded = [self.encoder_tok.encode(text) for text in texts]
        return dict(zip(distinct, encoded))

    def _assemble(self, segments, ended, encoded):
        """One row's segments -> (encoder ids list, hidden flags list): everything valid, nothing padded."""
        out, hidden, carry = [], [], 0.0
        for kind, value in segments:
            if kind == "text":
                tokens = encoded[tuple(value)]
                out += tokens
                hidden += [False] * len(tokens)
            else:
                target = self.slots_per_token * value + carry
                slots = max(1, int(math.floor(target + 0.5)))
                carry = target - slots
                out += [self.encoder_tok.pad_id] * slots
                hidden += [True] * slots
        cap = self.max_length
        if ended:
            if cap is not None and len(out) >= cap:
                out, hidden = out[:cap - 1], hidden[:cap - 1]
            out.append(self.encoder_tok.eos_id)
            hidden.append(False)
        elif cap is not None:
            out, hidden = out[:cap], hidden[:cap]
        if not out:  # nothing known and no EOS: one hidden slot (the encoder needs a valid token)
            out, hidden = [self.encoder_tok.pad_id], [True]
        return out, hidden

    def rows(self, ids, masked):
        """Rows as lists -> [(encoder ids list, hidden flags list)] per row: everything valid, nothing padded."""
        parsed = [_segments(r, m, self.eos_id, self.drop_ids, self.skip_first) for r, m in zip(ids, masked)]
        encoded = self._encode_runs([tuple(v) for segments, _ in parsed for kind, v in segments if kind == "text"])
        return [self._assemble(segments, ended, encoded) for segments, ended in parsed]

    def row(self, ids, masked):
        """One row (lists) -> (encoder ids list, hidden flags list)."""
        return self.rows([ids], [masked])[0]

    def __call__(self, ids, masked, length=None):
        """ids (B, L) long demasker ids, masked (B, L) bool -> enc_ids (B, Le) long, attention_mask (B, Le) bool,
        hide (B, Le) bool, on ids' device. Le = length, else the longest row (<= max_length)."""
        if ids.shape != masked.shape or ids.dim() != 2:
            raise ValueError(f"ids and masked must both be (B, L), got {tuple(ids.shape)} and {tuple(masked.shape)}")
        rows = self.rows(ids.tolist(), masked.bool().tolist())
        width = length or max(len(tokens) for tokens, _ in rows)
        B = len(rows)
        enc_ids = np.full((B, width), self.encoder_tok.pad_id, dtype=np.int64)
        attention_mask = np.zeros((B, width), dtype=bool)
        hide = np.zeros((B, width), dtype=bool)
        for b, (tokens, hidden) in enumerate(rows):
            n = min(len(tokens), width)
            enc_ids[b, :n] = tokens[:n]
            attention_mask[b, :n] = True
            hide[b, :n] = hidden[:n]
        return tuple(torch.from_numpy(a).to(ids.device) for a in (enc_ids, attention_mask, hide))


def masked_view(view, ids, uniforms, ratios, length=None):
    """x^(r) of Alg. 4 in the DEMASKER's token space, then the encoder's view of it: position i of the demasker
    row masked iff u_i < r (latent_data.mask_positions), exactly what the demasker's canvas x_t looks like at
    sampling time. ids, uniforms (B, L); ratios (B,). Returns (enc_ids, attention_mask, hide)."""
    from dataprep.latent_data import mask_positions
    return view(ids, mask_positions(uniforms, ratios), length)


def length_ratio(texts, demasker_tok, encoder_tok):
    """Encoder tokens per demasker token on `texts` (no special tokens): sum len(enc(t)) / sum len(dem(t)).
    The corpus estimate of how many encoder slots one masked demasker token stands for (CrossTokenizerView)."""
    demasker = sum(len(demasker_tok.encode(text)) for text in texts)
    encoder = sum(len(encoder_tok.encode(text)) for text in texts)
    if demasker == 0:
        raise ValueError("length_ratio: the texts hold no demasker token; pass some programs of the corpus")
    return encoder / demasker


# ------------------------------------------------------------------------------------------------
# Building the view from files
# ------------------------------------------------------------------------------------------------


def make_view(demasker_tok, encoder_tok=None, slots_per_token=None, texts=None, max_length=None, pad_id=None):
    """SharedView when encoder_tok is None (pad_id: the encoder's pad id, default the tokenizer's), else a
    CrossTokenizerView with slots_per_token given or measured on `texts` (length_ratio)."""
    if encoder_tok is None:
        return SharedView(demasker_tok.eos_id, demasker_tok.pad_id if pad_id is None else pad_id)
    if slots_per_token is None:
        if not texts:
            raise ValueError("two tokenizers: pass slots_per_token, or texts to measure it on (length_ratio)")
        slots_per_token = length_ratio(texts, demasker_tok, encoder_tok)
    return CrossTokenizerView(demasker_tok, encoder_tok, slots_per_token, max_length)


def view_from_files(folder, slots_per_token=None, max_length=None, pad_id=None):
    """The view for a folder holding tokenizer.json (+ encoder_tokenizer.json with two tokenizers): a dataprep/data.py
    cache or a train_ae.py checkpoint. Two tokenizers need slots_per_token (recorded at training time)."""
    from dataprep.data import load_tokenizer

    folder = Path(folder)
    demasker_tok = load_tokenizer(folder / "tokenizer.json")
    encoder_file = folder / "encoder_tokenizer.json"
    encoder_tok = load_tokenizer(encoder_file) if encoder_file.is_file() else None
    if encoder_tok is not None and slots_per_token is None:
        raise ValueError(f"{folder} has two tokenizers; pass slots_per_token (cross_tokenizer.length_ratio on the "
                         f"corpus, recorded by train_prior.py in prior.json)")
    return make_view(demasker_tok, encoder_tok, slots_per_token, max_length=max_length, pad_id=pad_id)


def view_from_data(data_dir, split="train", sample=1000, pad_id=None):
    """The view of a dataprep/data.py cache, slots_per_token measured on the first `sample` programs of `split`
    (decoded from the demasker rows). Returns (view, slots_per_token | None)."""
    from dataprep.data import load_meta, load_split, load_tokenizer

    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    demasker_tok = load_tokenizer(data_dir / "tokenizer.json")
    if meta.get("shared_tokenizer", True):
        return make_view(demasker_tok, pad_id=pad_id), None
    encoder_tok = load_tokenizer(data_dir / "encoder_tokenizer.json")
    arrays = load_split(data_dir, split)
    texts = [demasker_tok.decode(arrays["ids"][i, 1:max(1, int(arrays["lengths"][i]) - 1)])
             for i in range(min(sample, len(arrays["lengths"])))]
    ratio = length_ratio(texts, demasker_tok, encoder_tok)
    return CrossTokenizerView(demasker_tok, encoder_tok, ratio, meta["encoder"]["seq_len"]), ratio


def describe(view):
    """JSON-able settings of a view (for prior.json / eval rows)."""
    if view.shared:
        return {"shared_tokenizer": True}
    return {"shared_tokenizer": False, "slots_per_token": view.slots_per_token, "max_length": view.max_length}


if __name__ == "__main__":  # python -m dataprep.cross_tokenizer DATA: the measured ratio of a data cache
    import sys
    view, ratio = view_from_data(sys.argv[1])
    print(json.dumps(describe(view)))
