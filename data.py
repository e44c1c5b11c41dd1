"""Data: an offline corpus of Python programs, a tokenizer, and memmapped token arrays.

Paper map (arXiv 2603.20210, Sec. 5): the models are trained on Python programs (the Python
subset of StarCoder, lengths up to 4096 tokens), each wrapped in BOS ... EOS ("This model
thus generates similar programs of varying lengths, with BOS and EOS tokens to indicate their
beginning and ending"). The encoder (Qwen3-Embedding) and the demasker (LLaDA) have different
tokenizers, so one program is tokenized twice.

Offline stand-in for StarCoder: the running interpreter's own standard library source
(`sysconfig.get_paths()["stdlib"]`), present on every machine with no download. Any folder of
.py files, or a JSONL file of {"text": ...} lines, works the same way.

Pipeline (`build_dataset`):
  1. find source files; unreadable (non-UTF-8) or unparsable files are skipped and counted;
  2. split every file into self-contained programs: its top-level functions and classes
     (decorators included) via `ast`, or the whole file when it is small (--whole-file-lines);
  3. drop exact duplicates (whitespace-normalised hash);
  4. split train/val/test by FILE (a hash of its relative path), never by program, so no file
     contributes to two splits;
  5. train a byte-level BPE (`tokenizers`) on the train split, with the special tokens
     <|bos|>, <|eos|>, <|pad|>, <|mask|>, or load a public tokenizer.json (LLaDA, Qwen3);
  6. tokenize once into memmapped int32 arrays (N, L) per split, reused by every script:
     demasker ids = BOS program EOS, padded with EOS to L (LLaDA's convention); when the encoder
     has its own tokenizer, encoder ids = program EOS (Qwen appends <|endoftext|>, whose
     position is the summary token), padded with its pad id. Programs longer than L are cut
     (the last token stays EOS) or dropped (--overlong).
A meta.json records the settings and a hash of the corpus file list: changed settings rebuild.

Batches: `TokenData(folder, split)` serves rows by index; `shard_indices` (distributed.py)
deals each epoch's permutation across ranks, so a data position (epoch, step) resumes exactly.
"""

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"]  # ids 0..3 in a tokenizer we train
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# 1-4. Corpus: files -> programs -> deduplicated, split by file
# ------------------------------------------------------------------------------------------------

def default_corpus_dir():
    """The running interpreter's standard library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_source_files(root, include_tests=False):
    """Sorted .py files under root, skipping site-packages (and test folders unless asked)."""
    root = Path(root)
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if "site-packages" in parts or "dist-packages" in parts or "__pycache__" in parts:
            continue
        if not include_tests and parts & {"test", "tests", "idle_test"}:
            continue
        files.append(path)
    return files


def split_programs(source, whole_file_lines=40):
    """Self-contained programs of one file: top-level functions and classes, or the whole file.

    Raises SyntaxError for unparsable source (the caller counts and skips it).
    """
    tree = ast.parse(source)
    if len(source.splitlines()) <= whole_file_lines:
        return [source.strip("\n")] if source.strip() else []
    lines = source.splitlines()
    programs = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            programs.append("\n".join(lines[first - 1:node.end_lineno]))
    return programs


def split_of(relative_path, val_fraction=0.05, test_fraction=0.05):
    """Deterministic split of a file from a hash of its relative path (never of its programs)."""
    digest = int(hashlib.sha256(str(relative_path).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if digest < val_fraction:
        return "val"
    if digest < val_fraction + test_fraction:
        return "test"
    return "train"


def _normalised_hash(text):
    return hashlib.sha256(re.sub(r"\s+", " ", text).strip().encode()).hexdigest()


def collect_programs(source, whole_file_lines=40, include_tests=False, val_fraction=0.05,
                     test_fraction=0.05, files=None):
    """{'train'|'val'|'test': [program text]} plus counts. `source`: a folder or a .jsonl file.

    files: an explicit list of .py files under the folder (default: all of find_source_files).

    A JSONL line is one program; its "path" field (or its line number) decides its split.
    """
    source = Path(source)
    stats = {"files": 0, "skipped_unicode": 0, "skipped_syntax": 0, "programs": 0, "duplicates": 0}
    programs = {split: [] for split in SPLITS}
    seen = set()

    def add(text, relative):
        stats["programs"] += 1
        key = _normalised_hash(text)
        if key in seen:
            stats["duplicates"] += 1
            return
        seen.add(key)
        programs[split_of(relative, val_fraction, test_fraction)].append(text)

    if source.is_file():
        with open(source, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                if line.strip():
                    record = json.loads(line)
                    stats["files"] += 1
                    add(record["text"], record.get("path", f"line{number}"))
        return programs, stats
    if not source.is_dir():
        raise FileNotFoundError(f"corpus {source} is neither a folder of .py files nor a .jsonl file")
    for path in tqdm(files or find_source_files(source, include_tests), desc="reading corpus", leave=False):
        stats["files"] += 1
        try:
            text = path.read_text(encoding="utf-8")
            file_programs = split_programs(text, whole_file_lines)
        except (UnicodeDecodeError, ValueError):  # ValueError: source with NUL bytes
            stats["skipped_unicode"] += 1
            continue
        except SyntaxError:
            stats["skipped_syntax"] += 1
            continue
        relative = path.relative_to(source)
        for program in file_programs:
            add(program, relative)
    return programs, stats


# ------------------------------------------------------------------------------------------------
# 5. Tokenizers
# ------------------------------------------------------------------------------------------------

class TextTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids the models need.

    Trained here: <|bos|>=0, <|eos|>=1, <|pad|>=2, <|mask|>=3. LLaDA's tokenizer.json:
    BOS 126080, EOS = PAD 126081, MASK 126336. Qwen3's: no BOS, EOS = PAD 151643 (its
    post-processor appends EOS; we append it ourselves and encode without specials), and no
    mask token (the encoder hides masked positions instead; see encoder.py).
    """

    KNOWN = {  # token strings of the public tokenizers
        "bos": ["<|bos|>", "<|startoftext|>"],
        "eos": ["<|eos|>", "<|endoftext|>"],
        "pad": ["<|pad|>", "<|endoftext|>"],
        "mask": ["<|mask|>", "<|mdm_mask|>"],
    }

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        for role, names in self.KNOWN.items():
            ids[role] = next((tokenizer.token_to_id(name) for name in names
                              if tokenizer.token_to_id(name) is not None), None)
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = ids["bos"], ids["eos"], ids["pad"], ids["mask"]
        if self.eos_id is None:
            raise ValueError("tokenizer has no EOS token (<|eos|> or <|endoftext|>); it cannot end programs")
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def save(self, path):
        self.tokenizer.save(str(path))


def train_tokenizer(texts, vocab_size=4096):
    """Byte-level BPE trained on `texts` with the four special tokens at ids 0..3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tokenizer)


def load_tokenizer(name_or_path):
    """A tokenizer.json file, a folder holding one, or a hub id (downloads only tokenizer files)."""
    from tokenizers import Tokenizer

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        if str(name_or_path).count("/") != 1 or Path(name_or_path).exists():
            raise FileNotFoundError(f"no tokenizer.json at {name_or_path}")
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(str(name_or_path), "tokenizer.json"))
        except Exception as error:
            raise FileNotFoundError(f"could not download tokenizer.json of {name_or_path!r} ({error}); "
                                    f"offline, pass a local tokenizer.json instead") from error
    return TextTokenizer(Tokenizer.from_file(str(path)))


# ------------------------------------------------------------------------------------------------
# 6. Token arrays on disk
# ------------------------------------------------------------------------------------------------

def pack_rows(token_lists, seq_len, prefix, suffix, pad_id, overlong):
    """(N, seq_len) int32 rows: prefix + tokens + suffix, padded with pad_id; plus valid lengths.

    overlong='cut' keeps the first tokens and still ends with the suffix; 'drop' returns
    None for that row. Returns (rows list, lengths list) with None entries for dropped rows.
    """
    rows, lengths = [], []
    room = seq_len - len(prefix) - len(suffix)
    for tokens in token_lists:
        if len(tokens) > room:
            if overlong == "drop":
                rows.append(None)
                lengths.append(None)
                continue
            tokens = tokens[:room]
        body = list(prefix) + list(tokens) + list(suffix)
        rows.append(body + [pad_id] * (seq_len - len(body)))
        lengths.append(len(body))
    return rows, lengths


def _write_array(path, rows):
    array = np.lib.format.open_memmap(str(path) + ".tmp.npy", mode="w+", dtype=np.int32,
                                      shape=(len(rows), len(rows[0]) if rows else 0))
    if rows:
        array[:] = np.asarray(rows, dtype=np.int32)
    array.flush()
    del array
    os.replace(str(path) + ".tmp.npy", path)


def build_dataset(out, corpus=None, seq_len=256, vocab_size=4096, tokenizer=None, encoder_tokenizer=None,
                  encoder_seq_len=None, overlong="drop", whole_file_lines=40, include_tests=False,
                  max_files=None, force=False):
    """Build (or reuse) the token cache in `out`. Returns its meta dict.

    tokenizer: None = train a BPE of `vocab_size` on the train split; else a tokenizer.json path or
    hub id for the demasker. encoder_tokenizer: None = shared with the demasker (tiny mode).
    """
    out = Path(out)
    corpus = Path(corpus) if corpus else default_corpus_dir()
    files = [corpus] if corpus.is_file() else find_source_files(corpus, include_tests)
    if max_files:
        files = files[:max_files]
    file_hash = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()
    settings = dict(format=FORMAT_VERSION, corpus=str(corpus), files_hash=file_hash, seq_len=seq_len,
                    vocab_size=vocab_size, tokenizer=str(tokenizer) if tokenizer else None,
                    encoder_tokenizer=str(encoder_tokenizer) if encoder_tokenizer else None,
                    encoder_seq_len=encoder_seq_len or seq_len, overlong=overlong,
                    whole_file_lines=whole_file_lines, include_tests=include_tests, max_files=max_files)
    meta_path = out / "meta.json"
    if meta_path.is_file() and not force:
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            return meta
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # an interrupted rebuild must not look finished

    programs, stats = collect_programs(corpus, whole_file_lines, include_tests,
                                       files=None if corpus.is_file() else files)
    if not programs["train"]:
        raise ValueError(f"the corpus {corpus} gave no training programs ({stats})")
    demasker_tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(programs["train"], vocab_size)
    if demasker_tok.bos_id is None or demasker_tok.mask_id is None:
        raise ValueError("the demasker tokenizer needs BOS and MASK tokens (<|bos|>/<|startoftext|>, "
                         "<|mask|>/<|mdm_mask|>)")
    demasker_tok.save(out / "tokenizer.json")
    encoder_tok = load_tokenizer(encoder_tokenizer) if encoder_tokenizer else None
    if encoder_tok is not None:
        encoder_tok.save(out / "encoder_tokenizer.json")

    counts = {}
    for split in SPLITS:
        texts = programs[split]
        token_lists = [demasker_tok.encode(t) for t in tqdm(texts, desc=f"tokenizing {split}", leave=False)]
        rows, lengths = pack_rows(token_lists, seq_len, [demasker_tok.bos_id], [demasker_tok.eos_id],
                                  demasker_tok.eos_id, overlong)
        keep = [i for i, row in enumerate(rows) if row is not None]
        if encoder_tok is not None:
            enc_lists = [encoder_tok.encode(texts[i]) for i in keep]
            enc_rows, enc_lengths = pack_rows(enc_lists, encoder_seq_len or seq_len, [], [encoder_tok.eos_id],
                                              encoder_tok.pad_id, "cut")
            _write_array(out / f"{split}_encoder_ids.npy", enc_rows)
            np.save(out / f"{split}_encoder_lengths.npy", np.asarray(enc_lengths, dtype=np.int32))
        _write_array(out / f"{split}_ids.npy", [rows[i] for i in keep])
        np.save(out / f"{split}_lengths.npy", np.asarray([lengths[i] for i in keep], dtype=np.int32))
        counts[split] = {"programs": len(keep), "dropped_overlong": len(rows) - len(keep),
                         "tokens": int(sum(lengths[i] for i in keep))}
    meta = {"settings": settings, "stats": stats, "splits": counts, "vocab_size": demasker_tok.vocab_size,
            "bos_id": demasker_tok.bos_id, "eos_id": demasker_tok.eos_id, "pad_id": demasker_tok.pad_id,
            "mask_id": demasker_tok.mask_id, "shared_tokenizer": encoder_tok is None}
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, meta_path)  # written last: its presence means the cache is complete
    return meta


def load_split(folder, split):
    """{'ids': (N, L) int32 memmap, 'lengths': (N,), and 'encoder_ids'/'encoder_lengths' or None}."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{folder} is not a finished data cache (no meta.json); build it with "
                                f"`python data.py --out {folder}`")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    result = {"ids": np.load(folder / f"{split}_ids.npy", mmap_mode="r"),
              "lengths": np.load(folder / f"{split}_lengths.npy"),
              "encoder_ids": None, "encoder_lengths": None}
    if (folder / f"{split}_encoder_ids.npy").is_file():
        result["encoder_ids"] = np.load(folder / f"{split}_encoder_ids.npy", mmap_mode="r")
        result["encoder_lengths"] = np.load(folder / f"{split}_encoder_lengths.npy")
    return result


def load_meta(folder):
    return json.loads((Path(folder) / "meta.json").read_text())


class TokenData:
    """Rows of one split as torch tensors: demasker ids, and encoder ids + validity mask.

    In shared-tokenizer mode the encoder reads the demasker row itself, valid through the first
    EOS (BOS program EOS); otherwise its own row, valid for its stored length.
    """

    def __init__(self, folder, split):
        import torch

        self.torch = torch
        self.meta = load_meta(folder)
        arrays = load_split(folder, split)
        self.ids = arrays["ids"]
        self.lengths = arrays["lengths"]
        self.encoder_ids = arrays["encoder_ids"]
        self.encoder_lengths = arrays["encoder_lengths"]
        if self.encoder_ids is None:
            self.encoder_ids, self.encoder_lengths = self.ids, self.lengths

    def __len__(self):
        return len(self.ids)

    @property
    def seq_len(self):
        return self.ids.shape[1]

    def batch(self, indices):
        """(ids (B, L) long, encoder_ids (B, Le) long, encoder_mask (B, Le) bool) for these rows."""
        torch = self.torch
        indices = np.asarray(indices)
        ids = torch.from_numpy(np.asarray(self.ids[indices], dtype=np.int64))
        enc_ids = torch.from_numpy(np.asarray(self.encoder_ids[indices], dtype=np.int64))
        enc_len = torch.from_numpy(np.asarray(self.encoder_lengths[indices], dtype=np.int64))
        enc_mask = torch.arange(enc_ids.shape[1])[None, :] < enc_len[:, None]
        return ids, enc_ids, enc_mask


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Build the token cache (memmapped arrays) from a corpus of "
                                                 "Python programs; every training script reuses it.")
    parser.add_argument("--out", required=True, help="cache folder to write (or reuse if settings match)")
    parser.add_argument("--corpus", default=None, help="folder of .py files or JSONL of {'text': ...} "
                        "(default: this interpreter's standard library source)")
    parser.add_argument("--seq-len", type=int, default=256, help="L: tokens per row incl. BOS and EOS")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size when training one")
    parser.add_argument("--tokenizer", default=None, help="demasker tokenizer.json / folder / hub id "
                        "(e.g. GSAI-ML/LLaDA-8B-Base); default: train a BPE on the train split")
    parser.add_argument("--encoder-tokenizer", default=None, help="encoder tokenizer (e.g. "
                        "Qwen/Qwen3-Embedding-0.6B); default: shared with the demasker")
    parser.add_argument("--encoder-seq-len", type=int, default=None, help="encoder row length (default L)")
    parser.add_argument("--overlong", choices=["cut", "drop"], default="drop",
                        help="programs longer than L: cut (keeping the final EOS) or drop them")
    parser.add_argument("--whole-file-lines", type=int, default=40,
                        help="files up to this many lines are one program; longer ones are split into "
                             "their top-level functions and classes")
    parser.add_argument("--include-tests", action="store_true", help="also read test/ folders")
    parser.add_argument("--max-files", type=int, default=None, help="read only the first N files")
    parser.add_argument("--force", action="store_true", help="rebuild even if the settings match")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    meta = build_dataset(args.out, args.corpus, args.seq_len, args.vocab_size, args.tokenizer,
                         args.encoder_tokenizer, args.encoder_seq_len, args.overlong, args.whole_file_lines,
                         args.include_tests, args.max_files, args.force)
    print(json.dumps({k: meta[k] for k in ("stats", "splits", "vocab_size")}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
