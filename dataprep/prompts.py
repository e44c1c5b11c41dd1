"""Prompt / answer pairs and the infilling view: the data of conditional synthesis (paper App. H).

Paper map (arXiv 2603.20210): App. H extends CRoCoDiL to conditional synthesis with a prompt c: the prior is
conditioned on an embedding h_kappa(c) (Eq. 12), the MDM decodes with the prompt as the fixed prefix of x_t.
The paper names no data set; offline, the corpus of dataprep/corpus.py gives a natural task: the prompt is a
function's signature and docstring, the answer its body (beyond the paper, our choice).

- `function_pairs(source)`: every function (top-level, method or nested) that has a docstring and at least
  one statement after it, via `ast`. prompt = decorators + signature + docstring lines, answer = the lines
  after the docstring through the function's end; both dedented by the def's indentation, so that
  prompt + "\n" + answer is the function as a standalone program.
- `collect_pairs`: pairs of a corpus (a folder of .py files or a JSONL of {"text", "path"}), deduplicated,
  split by FILE (corpus.split_of, the same split as the token cache: a val/test file never trains).
- `encode_pairs`: demasker canvases BOS prompt answer EOS (EOS padding, dataprep/data.py's layout) with the prompt
  length (BOS included: the fixed prefix) and the encoder inputs of the answer, the prompt and the whole
  program. One shared tokenizer: the encoder reads demasker-layout rows; two tokenizers (App. C): the
  encoder's rows are `text EOS` padded with its pad id (dataprep/data.py's encoder layout).
- The infilling view: `middle_span` masks a span of a canvas with everything around it visible;
  `parse_infill` reads the command-line form "prefix<|span|>suffix" (one marker) into a canvas.

CLI: `python -m dataprep.prompts --out runs/pairs` writes {train,val,test}.jsonl (atomically) and prints the counts.
"""

import argparse
import ast
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from infra.atomic import write_text
from dataprep.corpus import (SPLITS, default_corpus_dir, find_source_files, jsonl_record, normalised_hash,
                             split_of, warn_skipped_lines)

SPAN_MARKER = "<|span|>"


@dataclass
class Pair:
    path: str      # the file it came from (decides the split)
    prompt: str    # signature (+ decorators) + docstring
    answer: str    # the body after the docstring

    @property
    def program(self):
        return self.prompt + "\n" + self.answer


# ------------------------------------------------------------------------------------------------
# Pairs from source with ast
# ------------------------------------------------------------------------------------------------


def _dedent(lines, indent):
    """Remove `indent` leading spaces from every non-blank line; None if a line has less (odd layout)."""
    out = []
    for line in lines:
        if not line.strip():
            out.append("")
        elif line[:indent].strip() or len(line) < indent:
            return None
        else:
            out.append(line[indent:])
    return out


def function_pairs(source):
    """[(prompt, answer)] of one file's source (module docstring). Raises SyntaxError on bad source."""
    tree = ast.parse(source)
    lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        if ast.get_docstring(node, clean=False) is None:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        doc_end = node.body[0].end_lineno
        rest = node.body[1]
        rest_start = min([rest.lineno] + [d.lineno for d in getattr(rest, "decorator_list", [])])
        if rest_start <= doc_end or node.body[0].lineno == node.lineno:  # `def f(): "doc"; x` on one line
            continue
        prompt = _dedent(lines[first - 1:doc_end], node.col_offset)
        answer = _dedent(lines[doc_end:node.end_lineno], node.col_offset)
        if prompt is None or answer is None:
            continue
        answer_text = "\n".join(answer).strip("\n")
        if answer_text.strip():
            pairs.append(("\n".join(prompt), answer_text))
    return pairs


def collect_pairs(source=None, include_tests=False, val_fraction=0.05, test_fraction=0.05, max_files=None):
    """({split: [Pair]}, stats) from a folder of .py files or a JSONL file (default: the stdlib), split by file
    exactly as the token cache (corpus.split_of); the first copy of a duplicated (prompt, answer) is kept."""
    source = Path(source) if source else default_corpus_dir()
    if source.is_file():
        documents, skipped = [], []
        for number, raw in enumerate(source.read_bytes().splitlines()):
            if raw.strip():
                record, why = jsonl_record(raw, number)  # the corpus reader's checks, line by line
                if record is None:
                    skipped.append((number + 1, why))
                else:
                    documents.append((record["path"], lambda r=record: r["text"]))
        if skipped:
            warn_skipped_lines(source, skipped)
    elif source.is_dir():
        files = find_source_files(source, include_tests)[:max_files] if max_files else find_source_files(source,
                                                                                                         include_tests)
        documents = [(path.relative_to(source).as_posix(), lambda p=path: p.read_text(encoding="utf-8-sig"))
                     for path in files]
    else:
        raise FileNotFoundError(f"corpus {source} is neither a folder of .py files nor a .jsonl file; pass "
                                f"--corpus a folder or a JSONL of {{\"text\": ...}} lines")
    pairs = {split: [] for split in SPLITS}
    stats = {"files": 0, "skipped": 0, "pairs": 0, "duplicates": 0}
    seen = set()
    for relative, read in documents:
        stats["files"] += 1
        try:
            found = function_pairs(read())
        except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError):
            stats["skipped"] += 1
            continue
        for prompt, answer in found:
            key = normalised_hash(prompt + "\n" + answer)
            if key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            pairs[split_of(relative, val_fraction, test_fraction)].append(Pair(relative, prompt, answer))
            stats["pairs"] += 1
    return pairs, stats


def write_pairs(out, pairs):
    """{split}.jsonl in `out`, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, items in pairs.items():
        write_text(out / f"{split}.jsonl", "".join(json.dumps(vars(p)) + "\n" for p in items))


def load_pairs(folder, split):
    """[Pair] of one split written by write_pairs (python -m dataprep.prompts --out FOLDER)."""
    path = Path(folder) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; build the pairs with `python -m dataprep.prompts --out {folder}`")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            try:
                fields = json.loads(line)
                pairs.append(Pair(**{name: fields[name] for name in ("path", "prompt", "answer")}))
                if not all(isinstance(v, str) for v in (pairs[-1].path, pairs[-1].prompt, pairs[-1].answer)):
                    raise TypeError("a field is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path} line {number} is not a pair written by dataprep.prompts (an object with "
                                 f"string \"path\", \"prompt\", \"answer\"; {type(error).__name__}: {error}); fix "
                                 f"or delete the line, or rebuild with `python -m dataprep.prompts --out {folder}`") from None
    return pairs


# ------------------------------------------------------------------------------------------------
# Tokenisation: demasker canvases and encoder inputs
# ------------------------------------------------------------------------------------------------


def encoder_rows(texts, tokenizer, seq_len, shared):
    """Encoder inputs (ids (N, L) long, mask (N, L) bool) of texts. shared: the demasker layout BOS text EOS
    (EOS padding), valid through the first EOS; else the encoder layout text EOS (pad id padding). Texts too
    long for seq_len are cut, the last token kept EOS."""
    pad = tokenizer.eos_id if shared else tokenizer.pad_id
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    mask = torch.zeros(len(texts), seq_len, dtype=torch.bool)
    for i, text in enumerate(texts):
        body = ([tokenizer.bos_id] if shared else []) + tokenizer.encode(text)
        row = body[:seq_len - 1] + [tokenizer.eos_id]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = True
    return ids, mask


def encode_pairs(pairs, tokenizer, seq_len, encoder_tokenizer=None, encoder_seq_len=None):
    """Tokenise pairs that fit into seq_len demasker tokens (the others are dropped and counted).

    Returns a dict: "ids" (N, L) long canvases BOS prompt answer EOS ... EOS; "prompt_len" (N,) long, the fixed
    prefix (BOS + prompt tokens); "lengths" (N,) BOS..EOS; "pairs" the kept Pairs; "dropped" int; and the
    encoder inputs "answer", "prompt", "program", each (ids (N, Le), mask (N, Le)) with Le the longest row. The
    prompt is tokenised as
    prompt + "\n" and the answer alone, so the canvas decodes to Pair.program and the prompt's tokens are the
    same in every canvas that starts with it.
    """
    kept, rows, prompt_len, lengths = [], [], [], []
    for pair in pairs:
        p = [tokenizer.bos_id] + tokenizer.encode(pair.prompt + "\n")
        a = tokenizer.encode(pair.answer) + [tokenizer.eos_id]
        if len(p) + len(a) > seq_len:
            continue
        kept.append(pair)
        rows.append(p + a + [tokenizer.eos_id] * (seq_len - len(p) - len(a)))
        prompt_len.append(len(p))
        lengths.append(len(p) + len(a))
    shared = encoder_tokenizer is None
    enc_tok, enc_len = (tokenizer, seq_len) if shared else (encoder_tokenizer, encoder_seq_len or seq_len)
    batch = {"ids": torch.tensor(rows, dtype=torch.long).reshape(len(rows), seq_len),
             "prompt_len": torch.tensor(prompt_len, dtype=torch.long), "lengths": torch.tensor(lengths),
             "pairs": kept, "dropped": len(pairs) - len(kept)}
    for name, texts in (("answer", [p.answer for p in kept]), ("prompt", [p.prompt for p in kept]),
                        ("program", [p.program for p in kept])):
        ids, mask = encoder_rows(texts, enc_tok, enc_len, shared)
        width = max(1, int(mask.sum(dim=1).max())) if len(texts) else enc_len
        batch[name] = (ids[:, :width], mask[:, :width])  # (N, longest row): no all-pad columns to encode
    return batch


def prompt_positions(prompt_len, seq_len):
    """(N, L) bool: True on each canvas's fixed prefix (BOS + prompt)."""
    return torch.arange(seq_len)[None, :] < prompt_len[:, None]


# ------------------------------------------------------------------------------------------------
# The infilling view
# ------------------------------------------------------------------------------------------------


def middle_span(ids, lengths, fraction, mask_id, generator=None):
    """Mask one span of fraction `fraction` of each program's tokens (BOS and EOS never), the context visible.

    ids (N, L) long canvases BOS program EOS ...; lengths (N,) BOS..EOS counts. The span has max(1,
    round(fraction * n)) of the n program tokens; it starts at a uniform position (generator) or is centred
    (generator None). Returns (canvas (N, L) with [M] on the span, span (N, L) bool)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the span fraction must lie in (0, 1), got {fraction}")
    canvas, span = ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
    for i, length in enumerate(lengths.tolist()):
        n = length - 2
        if n < 1:
            raise ValueError(f"program {i} has no token between BOS and EOS to mask")
        size = max(1, round(fraction * n))
        room = n - size
        offset = (int(torch.randint(room + 1, (1,), generator=generator)) if generator is not None else room // 2)
        span[i, 1 + offset:1 + offset + size] = True
    canvas[span] = mask_id
    return canvas, span


def parse_infill(text, tokenizer, span_tokens, seq_len, mask_id, marker=SPAN_MARKER):
    """The command-line infilling form "prefix<|span|>suffix" -> (canvas (L,) long BOS prefix [M]*n suffix EOS
    ... EOS, span (L,) bool). Errors name the problem and the fix."""
    count = text.count(marker)
    if count != 1:
        raise ValueError(f"the infilling text must hold the span marker {marker} exactly once (got {count}); write "
                         f"e.g. 'def f(x):\\n    {marker}\\n    return y'")
    if span_tokens < 1:
        raise ValueError(f"--span-tokens must be >= 1, got {span_tokens}")
    prefix, suffix = text.split(marker)
    before = [tokenizer.bos_id] + tokenizer.encode(prefix)
    after = tokenizer.encode(suffix) + [tokenizer.eos_id]
    total = len(before) + span_tokens + len(after)
    if total > seq_len:
        raise ValueError(f"the context ({len(before) + len(after)} tokens) and the span ({span_tokens}) need {total} "
                         f"tokens but the canvas holds --length {seq_len}; shorten the text or raise --length")
    row = before + [mask_id] * span_tokens + after + [tokenizer.eos_id] * (seq_len - total)
    span = torch.zeros(seq_len, dtype=torch.bool)
    span[len(before):len(before) + span_tokens] = True
    return torch.tensor(row, dtype=torch.long), span


def prompt_canvas(prompt, tokenizer, seq_len, mask_id):
    """A prompt text -> (canvas (L,) long BOS prompt-tokens [M] ... [M], prompt length). The prompt is
    tokenised as in training (prompt + "\n")."""
    if not prompt.strip():
        raise ValueError("the prompt is empty; pass a function signature and docstring, e.g. --prompt "
                         "'def add(a, b):\\n    \"\"\"Return a + b.\"\"\"'")
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt + "\n")
    if len(ids) >= seq_len:
        raise ValueError(f"the prompt takes {len(ids)} tokens but the canvas holds --length {seq_len}: nothing is "
                         f"left to generate; shorten the prompt or raise --length")
    return torch.tensor(ids + [mask_id] * (seq_len - len(ids)), dtype=torch.long), len(ids)


def main(argv=None):
    p = argparse.ArgumentParser(description="Extract prompt/answer pairs (signature + docstring -> body, App. H) "
                                            "from a corpus with ast, split by file; writes {train,val,test}.jsonl.")
    p.add_argument("--out", required=True, help="folder for train.jsonl, val.jsonl, test.jsonl")
    p.add_argument("--corpus", default=None, help="folder of .py files or JSONL of {\"text\", \"path\"} lines "
                   "(default: this interpreter's standard library)")
    p.add_argument("--include-tests", action="store_true", help="also read test folders of the corpus")
    p.add_argument("--max-files", type=int, default=None, help="read only the first N files (sorted)")
    args = p.parse_args(argv)
    if args.max_files is not None and args.max_files < 1:
        p.error(f"--max-files must be >= 1, got {args.max_files}")
    pairs, stats = collect_pairs(args.corpus, args.include_tests, max_files=args.max_files)
    write_pairs(args.out, pairs)
    print(json.dumps({**stats, **{split: len(items) for split, items in pairs.items()}}))


if __name__ == "__main__":
    main()
