"""Files written whole or not at all, and JSON read with an error that names the file and the fix.

Every output a reader may open while it is being written (dataprep/data.py's meta.json, the register banks' meta.json,
sample.py's JSONL, eval.py's NAME.json / NAME.png) goes through `write_text` / `write_bytes` / `replace_with`:
the bytes land in a temporary file of this process's own (tempfile.mkstemp in the same folder: two writers
never share a name), are flushed to disk, then renamed over the target (os.replace is atomic on POSIX). A
reader sees the old file or the new one, never half of one; a crash leaves at worst a hidden .NAME.*.tmp.

One writer at a time (`exclusive`): an advisory file lock for caches that several processes may build (the
token cache of dataprep/data.py, the register banks of dataprep/latent_data.py). The second process waits on the lock,
then finds the first one's finished result and reuses it. The lock belongs to the process (fcntl.flock), so a
builder killed with -9 never leaves it held.
"""

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replace_with(path, mode="w"):
    """Yield a file object open on a fresh temporary file beside `path`; on a clean exit it replaces `path`,
    on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def temporary_path(path):
    """A fresh, closed temporary file name beside `path` (for writers that want a path, e.g. savefig); the
    caller os.replace()s it over `path` when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_text(path, text):
    with replace_with(path) as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path, data):
    with replace_with(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_json(path, payload, **dumps):
    """payload as indented JSON (sort_keys etc. passed to json.dumps), atomically."""
    return write_text(path, json.dumps(payload, indent=2, **dumps) + "\n")


def read_json(path, fix="delete it and run the command that wrote it again"):
    """json.loads of `path`; an unreadable or invalid file raises ValueError naming the file and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({type(error).__name__}: {error}); {fix}") from None

@contextmanager
def exclusive(lock_path, enabled=True):
    """Hold an exclusive lock on lock_path (created if absent) for the with-block; enabled=False: no lock
    (e.g. ranks other than 0 of one distributed job, which share rank 0's)."""
    if not enabled:
        yield
        return
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
