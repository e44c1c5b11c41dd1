"""Data: an offline corpus of Python programs, tokenizers, and memmapped token arrays.

Paper map (arXiv 2603.20210): Sec. 5 trains and evaluates on Python programs (the Python subset
of StarCoder; validation programs of lengths up to 4096 tokens), each wrapped in BOS ... EOS so
that the models generate "programs of varying lengths, with BOS and EOS tokens to indicate their
beginning and ending". App. C: the encoder h_phi is a Qwen3-Embedding model and the demasker
f_theta is LLaDA, which have different tokenizers, so one program is tokenized twice:
  demasker ids (LLaDA): BOS program EOS, padded with EOS up to L (LLaDA's convention; EOS = PAD);
  encoder ids (Qwen3):  program EOS, padded with Qwen's pad id; the last valid position (the
                        appended <|endoftext|>) is the summary token, register 0 of App. C.
In tiny mode both models share one tokenizer and the encoder reads the demasker row itself.

Offline stand-in for StarCoder: the running interpreter's standard library source
(`sysconfig.get_paths()["stdlib"]`), present on every machine without a download. Any folder of
.py files, or a JSONL file of {"text": ..., "path": optional} lines (one program per line), works
the same way.

Pipeline (`build_dataset`, CLI `python -m dataprep.data --out data/stdlib`):
  1. find the source files; non-UTF-8 and unparsable files are skipped and counted, never fatal;
  2. split each file into self-contained programs: its top-level functions and classes
     (decorators included) via `ast`, or the whole file when it is small (--whole-file-lines);
  3. drop exact duplicates (hash of the whitespace-normalised text);
  4. assign train/val/test by FILE (a hash of its relative path), never by program;
  5. train a byte-level BPE on the train split (special tokens <|bos|>=0, <|eos|>=1, <|pad|>=2,
     <|mask|>=3) or load a public tokenizer.json (LLaDA, Qwen3) from a folder or the hub;
  6. tokenize once into int32 arrays on disk (nanoGPT-style .bin memmaps) with their valid
     lengths; programs longer than L are cut (the last token stays EOS) or dropped (--overlong).
meta.json holds the settings and a hash of the corpus file list; it is written last, and a cache
whose settings differ is rebuilt. The output location is checked before the build (a file where a folder
must be, a folder that is not writable, a full disk); a build that waited for another one building the
same folder with other settings is refused rather than replacing it; the cache's files and folder follow
the user's umask.

Files: dataprep/corpus.py (steps 1-4), dataprep/tokenization.py (step 5), this file (steps 6 and the batches); their names are
re-exported here.

Batches: `TokenData(folder, split).batches(batch_size, seed, position, rank, world_size)` serves
torch tensors in a (seed, epoch) permutation dealt across ranks by `shard_indices`; the position
(epoch, step) it yields resumes the stream exactly.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from infra.atomic import read_json, write_json

from dataprep.corpus import (SKIP_DIRS, SKIP_FILES, SPLITS, TEST_DIRS, collect_programs, corpus_fingerprint,  # noqa: F401
                    default_corpus_dir, find_source_files, normalised_hash, split_of, split_programs)
from dataprep.tokenization import (SPECIAL_TOKENS, TextTokenizer, load_tokenizer, tokenizer_key,  # noqa: F401
                          train_tokenizer)
FORMAT_VERSION = 2
CHUNK = 512  # programs tokenized (and written) at a time


# ------------------------------------------------------------------------------------------------
# Token arrays on disk
# ------------------------------------------------------------------------------------------------

def fit_to_length(encodings, texts, room, overlong):
    """Apply --overlong to programs of more than `room` tokens: cut them (their text too) or drop them.

    Returns (kept token lists, kept texts, number cut, number dropped). A cut text ends where its
    last kept token ends, so the encoder sees the same program as the demasker.
    """
    token_lists, kept_texts, cut, dropped = [], [], 0, 0
    for encoding, text in zip(encodings, texts):
        ids = encoding.ids
        if len(ids) > room:
            if overlong == "drop":
                dropped += 1
                continue
            cut += 1
            text = text[:encoding.offsets[room - 1][1]]
            ids = ids[:room]
        token_lists.append(ids)
        kept_texts.append(text)
    return token_lists, kept_texts, cut, dropped


def pack_rows(token_lists, seq_len, prefix, suffix, pad_id):
    """(N, seq_len) int32 rows `prefix tokens suffix pad...` and their (N,) valid lengths.

    Token lists longer than the room left by prefix and suffix are cut (the suffix stays).
    """
    rows = np.full((len(token_lists), seq_len), pad_id, dtype=np.int32)
    lengths = np.zeros(len(token_lists), dtype=np.int32)
    room = seq_len - len(prefix) - len(suffix)
    for i, tokens in enumerate(token_lists):
        body = list(prefix) + list(tokens[:room]) + list(suffix)
        rows[i, :len(body)] = body
        lengths[i] = len(body)
    return rows, lengths


def tokenize_split(out, split, texts, demasker_tok, seq_len, overlong, encoder_tok=None, encoder_seq_len=None):
    """Write {split}_ids.bin (N, L) and {split}_lengths.npy (and the encoder's pair); return counts."""
    if seq_len < 3:
        raise ValueError(f"--seq-len {seq_len} leaves no room for a program between BOS and EOS")
    has_encoder = encoder_tok is not None
    ids_file = open(out / f"{split}_ids.bin.tmp", "wb")
    encoder_file = open(out / f"{split}_encoder_ids.bin.tmp", "wb") if has_encoder else None
    lengths, encoder_lengths = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    counts = {"programs": 0, "cut": 0, "dropped_overlong": 0, "tokens": 0, "encoder_cut": 0}
    bar = tqdm(total=len(texts), desc=f"tokenizing {split}", unit="program")
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        token_lists, kept, cut, dropped = fit_to_length(demasker_tok.encode_batch(chunk), chunk,
                                                        seq_len - 2, overlong)
        rows, row_lengths = pack_rows(token_lists, seq_len, [demasker_tok.bos_id], [demasker_tok.eos_id],
                                      demasker_tok.eos_id)  # (n, L): BOS program EOS EOS ...
        ids_file.write(rows.tobytes())
        lengths.append(row_lengths)
        counts["programs"] += len(kept)
        counts["cut"] += cut
        counts["dropped_overlong"] += dropped
        counts["tokens"] += int(row_lengths.sum())
        if has_encoder:
            enc_lists = [encoding.ids for encoding in encoder_tok.encode_batch(kept)]
            counts["encoder_cut"] += sum(len(ids) > encoder_seq_len - 1 for ids in enc_lists)
            enc_rows, enc_lengths = pack_rows(enc_lists, encoder_seq_len, [], [encoder_tok.eos_id],
                                              encoder_tok.pad_id)  # (n, Le): program EOS PAD ...
            encoder_file.write(enc_rows.tobytes())
            encoder_lengths.append(enc_lengths)
        bar.update(len(chunk))
    bar.close()
    ids_file.close()
    os.replace(out / f"{split}_ids.bin.tmp", out / f"{split}_ids.bin")
    np.save(out / f"{split}_lengths.npy", np.concatenate(lengths))
    if has_encoder:
        encoder_file.close()
        os.replace(out / f"{split}_encoder_ids.bin.tmp", out / f"{split}_encoder_ids.bin")
        np.save(out / f"{split}_encoder_lengths.npy", np.concatenate(encoder_lengths))
    return counts


def build_dataset(out, corpus=None, seq_len=256, vocab_size=4096, tokenizer=None, encoder_tokenizer=None,
                  encoder_seq_len=None, overlong="drop", whole_file_lines=40, include_tests=False,
                  max_files=None, val_fraction=0.05, test_fraction=0.05, force=False):
    """Build the token cache in `out`, or reuse it when meta.json's settings match. Returns meta.

    tokenizer: None = train a byte-level BPE of `vocab_size` on the train split, else the demasker's
    tokenizer.json / folder / hub id. encoder_tokenizer: None = shared with the demasker (tiny mode).
    max_files: read only the first N files (sorted) of a folder corpus.
    """
    check_build_args(seq_len, vocab_size, tokenizer, encoder_seq_len, overlong, whole_file_lines, max_files,
                     val_fraction, test_fraction)
    started = time.time()
    out = Path(out)
    seen = cache_state(out)  # what a build that finishes while this one waits for the lock changes
    corpus = Path(corpus) if corpus else default_corpus_dir()
    if not corpus.exists():
        raise ValueError(f"--corpus {corpus} does not exist; pass a folder of .py files or a JSONL file")
    files = [corpus] if corpus.is_file() else find_source_files(corpus, include_tests) if corpus.is_dir() else []
    files = files[:max_files] if max_files else files
    fingerprint = corpus_fingerprint(corpus, files)
    settings = dict(format=FORMAT_VERSION, corpus=str(corpus.resolve()), corpus_sha256=fingerprint["sha256"],
                    seq_len=seq_len, vocab_size=vocab_size,
                    tokenizer=tokenizer_key(tokenizer) if tokenizer else None,
                    encoder_tokenizer=tokenizer_key(encoder_tokenizer) if encoder_tokenizer else None,
                    encoder_seq_len=(encoder_seq_len or seq_len) if encoder_tokenizer else None,
                    overlong=overlong, whole_file_lines=whole_file_lines, include_tests=include_tests,
                    max_files=max_files, val_fraction=val_fraction, test_fraction=test_fraction)
    meta_path = out / "meta.json"
    meta = None if force else _finished_meta(meta_path, settings)
    if meta is not None:
        return meta
    # Build into a staging folder beside `out`; the old cache stays untouched (and usable) until the new
    # one is complete, then checkpoint.swap_folder replaces it (a complete copy exists at every instant).
    # One builder at a time (locks.exclusive): a second process waits, then reuses the finished cache, or
    # refuses when the cache it waited for was built with other settings (refuse_concurrent_build).
    from infra.checkpoint import recover_folder, swap_folder
    from infra.atomic import DIR_MODE, exclusive
    from infra.run_folder import refuse_location
    refuse_foreign_folder(out)
    refuse_location(out.parent if out.is_dir() else out, "--out", out)  # the lock, the staging folder, the swap
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out.parent / f".{out.name}.lock"):
        recover_folder(out)
        refuse_foreign_folder(out)
        meta = None if force else _finished_meta(meta_path, settings)
        if meta is not None:
            return meta  # finished by another process while we waited
        refuse_concurrent_build(out, seen, settings)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
        os.chmod(stage, DIR_MODE)  # mkdtemp's 0700 -> the user's umask: this folder becomes the cache as it is
        try:
            meta = _build_into(stage, corpus, files, fingerprint, settings, seq_len, vocab_size, tokenizer,
                               encoder_tokenizer, encoder_seq_len, overlong, whole_file_lines, include_tests,
                               val_fraction, test_fraction, started)
            swap_folder(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return meta


def refuse_foreign_folder(out):
    """The swap replaces `out` whole: never let it be a folder that is not a data cache (e.g. --out .)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder for the data cache")
    if out.is_dir() and not (out / "meta.json").is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds files but no meta.json: it is not a dataprep/data.py cache, and a build replaces "
                         f"the folder whole; pass a new or empty folder (or delete {out} if it is a broken cache)")


def cache_state(out):
    """The bytes of the meta.json of the complete copy of cache `out` (None without one): they change whenever a
    build swaps in a cache (its meta.json records the settings, counts and build time)."""
    from infra.checkpoint import find_folder

    try:
        return (find_folder(out) / "meta.json").read_bytes()
    except OSError:
        return None


def refuse_concurrent_build(out, seen, settings):
    """Refuse to replace a cache that another process built with other settings while this build waited for the
    lock: that process has reported success, and its data would vanish under it. One folder holds one build."""
    state = cache_state(out)
    if state is None or state == seen:
        return
    try:
        theirs = json.loads(state).get("settings") or {}
    except (ValueError, AttributeError):
        return  # an unreadable meta.json: a broken cache, rebuilt as before
    if theirs == settings:
        return  # the same build (--force): nothing of another's is lost
    differ = ", ".join(f"{key} {theirs.get(key)!r} there, {value!r} here" for key, value in settings.items()
                       if theirs.get(key) != value)
    raise ValueError(f"--out {out}: another build finished there while this one waited for it, with other settings "
                     f"({differ}); nothing was written. One folder holds one cache: pass this build another --out, "
                     f"or run it again to replace that cache once nothing reads it")


def _finished_meta(meta_path, settings):
    """The cache's meta when it is complete and built with `settings`, else None (absent, other settings, or
    an unreadable meta.json: then the cache is rebuilt in a staging folder and swapped in)."""
    try:
        meta = read_json(meta_path) if meta_path.is_file() else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) and meta.get("settings") == settings else None


def check_build_args(seq_len, vocab_size, tokenizer, encoder_seq_len, overlong, whole_file_lines, max_files,
                     val_fraction, test_fraction):
    """Every argument of build_dataset checked before any file is touched (ValueError naming the flag)."""
    if overlong not in ("cut", "drop"):
        raise ValueError(f"--overlong must be 'cut' or 'drop', got {overlong!r}")
    if not isinstance(seq_len, int) or seq_len < 3:
        raise ValueError(f"--seq-len must be an integer >= 3 (BOS, at least one program token, EOS), got {seq_len}")
    if encoder_seq_len is not None and encoder_seq_len < 2:
        raise ValueError(f"--encoder-seq-len must be >= 2 (a program token and EOS), got {encoder_seq_len}")
    minimum = len(SPECIAL_TOKENS) + 256  # the byte alphabet of a byte-level BPE
    if tokenizer is None and (not isinstance(vocab_size, int) or vocab_size < minimum):
        raise ValueError(f"--vocab-size must be >= {minimum} ({len(SPECIAL_TOKENS)} special tokens + the 256 bytes "
                         f"of a byte-level BPE), got {vocab_size}")
    if whole_file_lines < 0:
        raise ValueError(f"--whole-file-lines must be >= 0, got {whole_file_lines}")
    if max_files is not None and max_files < 1:
        raise ValueError(f"--max-files must be >= 1 (or unset for all files), got {max_files}")
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"--val-fraction + --test-fraction must be < 1 (some files must train), got "
                         f"{val_fraction} + {test_fraction}")


def _build_into(out, corpus, files, fingerprint, settings, seq_len, vocab_size, tokenizer, encoder_tokenizer,
                encoder_seq_len, overlong, whole_file_lines, include_tests, val_fraction, test_fraction, started):
    """build_dataset's work, written into the (staging) folder `out`. Returns meta."""
    meta_path = out / "meta.json"
    programs, stats = collect_programs(corpus, whole_file_lines, include_tests, val_fraction, test_fraction,
                                       files=None if corpus.is_file() else files)
    texts = {split: [text for _, text in programs[split]] for split in SPLITS}
    if not texts["train"]:
        raise ValueError(f"the corpus {corpus} gave no training programs ({stats}); point --corpus at "
                         f"a folder of .py files or a JSONL of {{\"text\": ...}} lines")
    if tokenizer:
        demasker_tok = load_tokenizer(tokenizer)
    else:
        print(f"training a byte-level BPE (vocab {vocab_size}) on {len(texts['train'])} train programs",
              file=sys.stderr)
        demasker_tok = train_tokenizer(texts["train"], vocab_size)
    if demasker_tok.bos_id is None or demasker_tok.mask_id is None:
        raise ValueError("the demasker tokenizer needs BOS and MASK tokens (<|bos|>/<|startoftext|> and "
                         "<|mask|>/<|mdm_mask|>); Qwen3's has neither, use it with --encoder-tokenizer")
    demasker_tok.save(out / "tokenizer.json")
    encoder_tok = load_tokenizer(encoder_tokenizer) if encoder_tokenizer else None
    if encoder_tok:
        encoder_tok.save(out / "encoder_tokenizer.json")

    splits = {split: tokenize_split(out, split, texts[split], demasker_tok, seq_len, overlong, encoder_tok,
                                    encoder_seq_len or seq_len) for split in SPLITS}
    if splits["train"]["programs"] == 0:
        raise ValueError(f"no training program fits --seq-len {seq_len} with --overlong {overlong} ({splits['train']}); "
                         f"raise --seq-len or use --overlong cut")
    meta = {"settings": settings, "corpus": fingerprint, "stats": stats, "splits": splits, "seq_len": seq_len,
            **demasker_tok.special_ids(), "shared_tokenizer": encoder_tok is None,
            "encoder": dict(encoder_tok.special_ids(), seq_len=encoder_seq_len or seq_len) if encoder_tok else None,
            "build_seconds": round(time.time() - started, 1)}
    write_json(meta_path, meta)  # written last: its presence means the cache is complete
    return meta


def load_meta(folder):
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder} is not a finished data cache (no meta.json); build it with "
                                f"`python -m dataprep.data --out {folder}`")
    return read_json(folder / "meta.json", f"rebuild the cache: python -m dataprep.data --out {folder} --force ...")


def check_tokenizer_matches(data_dir, run_dir, what="the checkpoint"):
    """Data and a checkpoint belong together only if the cache's tokenizer file(s) are byte for byte the ones
    the checkpoint was trained with (train_ae.py copies them next to demasker/). Refuses a mismatch naming
    both sha256s; a run without a tokenizer copy is not checked. Returns the files compared."""
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    compared = []
    for name in ("tokenizer.json", "encoder_tokenizer.json"):
        ours, theirs = data_dir / name, run_dir / name
        if not (ours.is_file() and theirs.is_file()):
            continue
        hashes = [hashlib.sha256(path.read_bytes()).hexdigest()[:16] for path in (ours, theirs)]
        if hashes[0] != hashes[1]:
            raise ValueError(f"the data cache's {ours} (sha256 {hashes[0]}) is not the tokenizer {what} {run_dir} was "
                             f"trained with ({theirs}, sha256 {hashes[1]}); pass --data the cache the run was "
                             f"trained on (its args.json 'data')")
        compared.append(name)
    return compared


def load_split(folder, split):
    """{'ids': (N, L) int32 memmap, 'lengths': (N,), 'encoder_ids': (N, Le) memmap | None, 'encoder_lengths'}."""
    folder, meta = Path(folder), load_meta(folder)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ids, lengths = _read_rows(folder, split, "", meta["seq_len"])
    encoder_ids = encoder_lengths = None
    if meta["encoder"]:
        encoder_ids, encoder_lengths = _read_rows(folder, split, "encoder_", meta["encoder"]["seq_len"])
    return {"ids": ids, "lengths": lengths, "encoder_ids": encoder_ids, "encoder_lengths": encoder_lengths}


def _read_rows(folder, split, prefix, width):
    lengths = np.load(folder / f"{split}_{prefix}lengths.npy")  # (N,)
    if len(lengths) == 0:  # np.memmap cannot map an empty file
        return np.zeros((0, width), dtype=np.int32), lengths
    rows = np.memmap(folder / f"{split}_{prefix}ids.bin", dtype=np.int32, mode="r", shape=(len(lengths), width))
    return rows, lengths


# ------------------------------------------------------------------------------------------------
# Batches with an exact, resumable position
# ------------------------------------------------------------------------------------------------

def shard_indices(n, rank, world_size, epoch=0, seed=0):
    """This rank's indices for one epoch; every example goes to exactly one rank (infra/distributed.py)."""
    from infra.distributed import shard_indices as deal  # one definition, shared with the training loops

    return deal(n, rank, world_size, epoch, seed)


def steps_per_epoch(n, batch_size, world_size=1):
    """Full global batches per epoch; the n % (batch_size * world_size) rows left over sit that epoch out."""
    return n // (batch_size * world_size)


class TokenData:
    """One split of a cache as torch tensors.

    batch(indices) -> {'ids': (B, L) long demasker ids, 'lengths': (B,) BOS..EOS counts,
                       'encoder_ids': (B, Le) long, 'encoder_mask': (B, Le) bool valid tokens}.
    In shared-tokenizer mode the encoder reads the demasker row itself, valid through its first EOS.
    """

    def __init__(self, folder, split):
        self.meta = load_meta(folder)
        arrays = load_split(folder, split)
        self.ids, self.lengths = arrays["ids"], arrays["lengths"]
        self.encoder_ids, self.encoder_lengths = arrays["encoder_ids"], arrays["encoder_lengths"]
        if self.encoder_ids is None:
            self.encoder_ids, self.encoder_lengths = self.ids, self.lengths

    def __len__(self):
        return len(self.ids)

    def batch(self, indices):
        indices = np.asarray(indices, dtype=np.int64)
        ids = torch.from_numpy(np.asarray(self.ids[indices], dtype=np.int64))  # (B, L)
        encoder_ids = torch.from_numpy(np.asarray(self.encoder_ids[indices], dtype=np.int64))  # (B, Le)
        encoder_lengths = torch.from_numpy(self.encoder_lengths[indices].astype(np.int64))  # (B,)
        encoder_mask = torch.arange(encoder_ids.shape[1])[None, :] < encoder_lengths[:, None]  # (B, Le)
        return {"ids": ids, "lengths": torch.from_numpy(self.lengths[indices].astype(np.int64)),
                "encoder_ids": encoder_ids, "encoder_mask": encoder_mask}

    def batches(self, batch_size, seed=0, position=(0, 0), rank=0, world_size=1):
        """Endless (batch, next_position) from position = (epoch, step), `batch_size` rows per rank.

        Epoch e is the permutation of (seed, e) dealt across ranks (shard_indices); step s takes rows
        s*batch_size .. (s+1)*batch_size - 1 of this rank's shard. Saving next_position after a
        training step and passing it back here continues with exactly the batches that would have come.
        """
        epoch, step = position
        per_epoch = steps_per_epoch(len(self), batch_size, world_size)
        if per_epoch == 0:
            raise ValueError(f"{len(self)} examples cannot fill one batch of {batch_size} x {world_size} ranks")
        while True:
            shard = shard_indices(len(self), rank, world_size, epoch, seed)
            for s in range(step, per_epoch):
                yield self.batch(shard[s * batch_size:(s + 1) * batch_size]), (epoch, s + 1)
            epoch, step = epoch + 1, 0


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build the token cache (memmapped int32 arrays per split) from "
                                                 "a corpus of Python programs; every other script reads it.")
    parser.add_argument("--out", required=True, help="cache folder to write, or reuse when its settings match")
    parser.add_argument("--corpus", default=None, help="folder of .py files or JSONL of {\"text\": ...} lines "
                        "(default: this interpreter's standard library source)")
    parser.add_argument("--seq-len", type=int, default=256, help="L: demasker tokens per row, BOS and EOS included")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size of the BPE trained when "
                        "--tokenizer is not given")
    parser.add_argument("--tokenizer", default=None, help="demasker tokenizer.json, folder or hub id (e.g. "
                        "GSAI-ML/LLaDA-8B-Base); default: train a byte-level BPE on the train split")
    parser.add_argument("--encoder-tokenizer", default=None, help="the encoder's own tokenizer (e.g. "
                        "Qwen/Qwen3-Embedding-0.6B), tokenizing each program a second time; default: shared")
    parser.add_argument("--encoder-seq-len", type=int, default=None, help="encoder row length, its EOS "
                        "included (default: --seq-len)")
    parser.add_argument("--overlong", choices=["cut", "drop"], default="drop",
                        help="programs longer than L - 2 tokens: cut them (the row still ends in EOS) or drop them")
    parser.add_argument("--whole-file-lines", type=int, default=40, help="files of at most this many lines are "
                        "one program; longer files give one program per top-level function or class")
    parser.add_argument("--include-tests", action="store_true", help="also read test/, tests/, idle_test/ folders")
    parser.add_argument("--max-files", type=int, default=None, help="read only the first N files (sorted paths)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of files in the val split")
    parser.add_argument("--test-fraction", type=float, default=0.05, help="share of files in the test split")
    parser.add_argument("--force", action="store_true", help="rebuild even when the settings match")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:  # the arguments first (no file touched), then the build: a refusal is one line naming the problem
        check_build_args(args.seq_len, args.vocab_size, args.tokenizer, args.encoder_seq_len, args.overlong,
                         args.whole_file_lines, args.max_files, args.val_fraction, args.test_fraction)
        meta = build_dataset(args.out, args.corpus, args.seq_len, args.vocab_size, args.tokenizer,
                             args.encoder_tokenizer, args.encoder_seq_len, args.overlong, args.whole_file_lines,
                             args.include_tests, args.max_files, args.val_fraction, args.test_fraction, args.force)
    except (ValueError, OSError) as error:  # OSError: an output location refused (infra/run_folder.py), a file unread
        raise SystemExit(f"dataprep/data.py: error: {error}") from None
    keys = ("corpus", "stats", "splits", "vocab_size", "bos_id", "eos_id", "pad_id", "mask_id", "encoder",
            "build_seconds")
    print(json.dumps({key: meta[key] for key in keys}, indent=2))


if __name__ == "__main__":
    main()
