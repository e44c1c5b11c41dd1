"""Files written whole or not at all, and JSON read with an error that names the file and the fix.

Every output a reader may open while it is being written (dataprep/data.py's meta.json, the register banks' meta.json,
sample.py's JSONL, eval.py's NAME.json / NAME.png) goes through `write_text` / `write_bytes` / `replace_with`:
the bytes land in a temporary file of this process's own (tempfile.mkstemp in the same folder: two writers
never share a name), are flushed to disk, then renamed over the target (os.replace is atomic on POSIX). A
reader sees the old file or the new one, never half of one; a crash leaves at worst a hidden .NAME.*.tmp.

Permissions: mkstemp makes its files 0600; they are set to what open() would give (FILE_MODE: 0666 less the umask,
read once at import), so a result written here is as readable as any other file of the user's (DIR_MODE: the same
for folders made by mkdtemp and swapped in whole, as infra/checkpoint.save_model_dir does).

One writer at a time (`exclusive`): an advisory file lock for caches that several processes may build (the
token cache of dataprep/data.py, the register banks of dataprep/latent_data.py). The second process waits on the lock,
then finds the first one's finished result and reuses it; with wait=False it is refused at once (BlockingIOError:
infra/run_folder.py, one writer per run folder). The path may be a folder: the folder itself is locked, nothing is
added to it. The lock belongs to the process (fcntl.flock), so a builder killed with -9 never leaves it held.
"""

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _read_umask():
    """The process umask: /proc/self/status where it says (no change of state), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK  # what open(path, "w") gives a new file
DIR_MODE = 0o777 & ~UMASK  # what mkdir gives a new folder (tempfile.mkdtemp's are 0700)



@contextmanager
def replace_with(path, mode="w"):
    """Yield a file object open on a fresh temporary file beside `path`; on a clean exit it replaces `path`,
    on an error it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 -> the umask's mode
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
    os.fchmod(fd, FILE_MODE)  # mkstemp's 0600 -> the umask's mode (a writer that reopens it keeps the mode)
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
def exclusive(lock_path, enabled=True, wait=True):
    """Hold an exclusive lock on lock_path (a file, created if absent, or an existing folder) for the with-block;
    wait=False: raise BlockingIOError at once when another process holds it; enabled=False: no lock (e.g. ranks
    other than 0 of one distributed job, which share rank 0's)."""
    if not enabled:
        yield
        return
    lock_path = Path(lock_path)
    if lock_path.is_dir():
        fd = os.open(lock_path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)  # the umask applies
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
