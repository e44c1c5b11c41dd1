"""The corpus of Python programs (paper Sec. 5: the Python subset of StarCoder; offline stand-in: the running
interpreter's standard library, present on every machine without a download). Any folder of .py files, or a
JSONL file of {"text": ..., "path": optional} lines, works the same way: find the files, split each into
self-contained programs (top-level functions and classes via `ast`, or the whole file when small), drop exact
duplicates, assign train/val/test by FILE (a hash of its relative path), never by program. dataprep/data.py builds the
token cache from it. Files and JSONL lines that give no program (not UTF-8, unparsable, a JSONL line that is not an
object with a string "text", or whose "path" is not a string) are skipped and counted, never fatal; the skipped
lines of a JSONL are named, with why and the fix, in one warning.
"""

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
from pathlib import Path

from tqdm import tqdm

SPLITS = ("train", "val", "test")
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}
SKIP_FILES = {"pydoc_data/topics.py"}  # a generated 750 KB string table, not a program


# ------------------------------------------------------------------------------------------------
# Corpus: files -> programs -> deduplicated, assigned to a split by file
# ------------------------------------------------------------------------------------------------

def default_corpus_dir():
    """The running interpreter's standard library source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def find_source_files(root, include_tests=False):
    """Sorted .py files under root, skipping site-packages, generated tables and (unless asked) tests."""
    root = Path(root)
    skip = SKIP_DIRS if include_tests else SKIP_DIRS | TEST_DIRS
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in skip]  # prune: never walk into them
        for name in names:
            path = Path(folder) / name
            if name.endswith(".py") and path.relative_to(root).as_posix() not in SKIP_FILES:
                files.append(path)
    return sorted(files)


def split_programs(source, whole_file_lines=40):
    """Self-contained programs of one file: the whole file if small, else its top-level defs/classes.

    Raises SyntaxError (or ValueError for NUL bytes) on unparsable source; the caller counts it.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    if len(lines) <= whole_file_lines:
        return [source.strip("\n")] if source.strip() else []
    programs = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
            programs.append("\n".join(lines[first - 1:node.end_lineno]))
    return programs


def split_of(relative_path, val_fraction=0.05, test_fraction=0.05):
    """'train' | 'val' | 'test' from a hash of the file's relative path (the same on every machine)."""
    digest = hashlib.sha256(Path(relative_path).as_posix().encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64  # uniform in [0, 1)
    if u < val_fraction:
        return "val"
    if u < val_fraction + test_fraction:
        return "test"
    return "train"


def normalised_hash(text):
    """Duplicate key: programs equal up to runs of whitespace share it."""
    return hashlib.sha256(re.sub(r"\s+", " ", text).strip().encode()).hexdigest()


def collect_programs(source, whole_file_lines=40, include_tests=False, val_fraction=0.05,
                     test_fraction=0.05, files=None):
    """({split: [(relative file path, program text)]}, stats) from a folder or a .jsonl file.

    files: the .py files to read under the folder (default: find_source_files). A JSONL line is
    one program; its "path" field (default: its line number) decides its split. The first copy of a
    duplicated program (in sorted file order) is kept.
    """
    source = Path(source)
    stats = {"files": 0, "skipped_non_utf8": 0, "skipped_unparsable": 0, "programs_found": 0,
             "duplicates": 0}
    programs = {split: [] for split in SPLITS}
    seen = set()

    def add(relative, text):
        stats["programs_found"] += 1
        key = normalised_hash(text)
        if key in seen:
            stats["duplicates"] += 1
        elif text.strip():
            seen.add(key)
            programs[split_of(relative, val_fraction, test_fraction)].append((str(relative), text))

    if source.is_file():
        skipped = []  # (line number from 1, why) of the lines that give no program
        with open(source, "rb") as handle:
            for number, raw in enumerate(handle):
                if not raw.strip():
                    continue
                stats["files"] += 1
                record, problem = jsonl_record(raw, number)
                if problem is not None:
                    stats["skipped_non_utf8" if problem == NOT_UTF8 else "skipped_unparsable"] += 1
                    skipped.append((number + 1, problem))
                    continue
                add(record["path"], record["text"])
        if skipped:
            warn_skipped_lines(source, skipped)
    elif source.is_dir():
        for path in tqdm(find_source_files(source, include_tests) if files is None else files,
                         desc="reading corpus", unit="file", leave=False):
            stats["files"] += 1
            try:
                file_programs = split_programs(path.read_text(encoding="utf-8-sig"), whole_file_lines)  # BOM dropped
            except UnicodeDecodeError:
                stats["skipped_non_utf8"] += 1
                continue
            except (SyntaxError, ValueError):  # ValueError: source holding NUL bytes
                stats["skipped_unparsable"] += 1
                continue
            for text in file_programs:
                add(path.relative_to(source), text)
    else:
        raise FileNotFoundError(f"corpus {source} is neither a folder of .py files nor a .jsonl file; "
                                f"pass --corpus a folder or a JSONL of {{\"text\": ...}} lines")
    stats["programs"] = sum(len(p) for p in programs.values())
    return programs, stats


NOT_UTF8 = "not UTF-8"


def jsonl_record(raw, number):
    """({"text", "path"}, None) of one corpus JSONL line (bytes; `number` counts from 0 and names a line without a
    "path"), or (None, why it gives no program): not UTF-8, not JSON, not an object, no string "text", or a
    "path" that is not a string."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, NOT_UTF8
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg} at column {error.colno})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("text"), str):
        return None, "no \"text\" string" if "text" not in record else "\"text\" is not a string"
    path = record.get("path", f"line{number}")
    if not isinstance(path, str):
        return None, "\"path\" is not a string"
    return {"text": record["text"], "path": path}, None


def warn_skipped_lines(source, skipped, shown=5):
    """One warning (stderr) naming the JSONL corpus, its skipped lines and why, and the fix."""
    lines = "; ".join(f"line {number}: {why}" for number, why in skipped[:shown])
    more = f" (and {len(skipped) - shown} more)" if len(skipped) > shown else ""
    print(f"warning: {source}: {len(skipped)} line(s) give no program and are skipped ({lines}{more}); each line "
          f"must be a JSON object {{\"text\": \"...\", \"path\": \"optional/name.py\"}} in UTF-8: fix or remove "
          f"them", file=sys.stderr)


def corpus_fingerprint(source, files):
    """{'files', 'bytes', 'sha256'} over the sorted (relative path, sha256 of the contents) list: an edited
    file changes it even at the same size and modification time."""
    source = Path(source)
    entries = []
    for path in files:
        name = path.name if path == source else path.relative_to(source).as_posix()
        entries.append(f"{name}\t{hashlib.sha256(path.read_bytes()).hexdigest()}")
    return {"files": len(files), "bytes": sum(path.stat().st_size for path in files),
            "sha256": hashlib.sha256("\n".join(entries).encode()).hexdigest()}


