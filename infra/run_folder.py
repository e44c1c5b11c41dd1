"""One rule for every writer of a run or results folder, so that a finished run is never lost.

Trainers (train_ae.py, train_prior.py, experiments/train_scorer.py, experiments/train_prompted.py) take their
--out-dir / --out with `claim`; eval.py takes OUT/NAME.json with `claim_result`. Both are context managers held
for the whole run:

1. What is there is refused. A trainer needs an absent or empty folder; one that holds anything is refused
   unless --resume (continue it: trainers that resume) or --overwrite (replace it), and the message names both
   and the folder. eval.py: an --out that already holds this subcommand's NAME.json is refused unless
   --overwrite; other subcommands' files in the same --out are fine (REPORT.md is appended to by design).
2. One writer at a time. An exclusive, non-blocking fcntl lock (infra/atomic.exclusive) is held until the run
   ends, on the lock file .NAME.lock beside the run folder (outside it, so the folder holds only the run, and
   the same file whatever happens to the folder: an --overwrite swap, a resume's recovery), and for eval.py,
   whose --out several subcommands share, on OUT/.NAME.lock. Lock files stay (removing one is racy), as the
   data caches' do. A second writer is refused at once, naming the folder. Under torchrun rank 0 checks,
   creates and locks; the other ranks meet it at a barrier and write where it says.
3. --overwrite stages. The new run is written into the hidden sibling .NAME.stage-overwrite, and only once it is
   complete (the with-block ends without error) does checkpoint.swap_folder put it in place of the old run,
   which is removed only then (a kill between its two renames is undone by checkpoint.recover_folder, which
   every claim calls first). A failed overwrite removes its staging folder; a killed one leaves it, and the next
   --overwrite removes it; either way the old run is untouched. We stage the new run rather than moving the old
   one aside because then the old run never leaves its path, even for an instant before the new one exists.
   A staged run cannot be resumed: an interrupted --overwrite starts over. eval.py needs no staging: NAME.json
   and NAME.png are written whole at the end (infra/atomic.py), the old ones stay until then.
4. Output locations are checked before any work: a symlink, FIFO, socket, device node or regular file where a
   folder is expected (or where eval.py writes a file) is refused with the path and the fix, never followed or
   replaced; so is a location that cannot be written (`location_problem`: a file where a parent folder must be,
   a folder that is not writable, a disk without free space), which would otherwise fail at the first save or,
   for eval.py and sample.py, after the whole run. Folders are made by mkdir with its default mode, i.e. as the
   user's umask says. A folder this claim created is removed again (when still empty) if the run fails.

Refusals are OSErrors with the message a user needs: FileExistsError (something is there), BlockingIOError
(another process holds it), NotADirectoryError (not a folder), PermissionError (not writable), OSError ENOSPC (no
free space), FileNotFoundError (--resume of nothing).
"""

import errno
import os
import shutil
import stat
from contextlib import ExitStack, contextmanager
from pathlib import Path

from infra import checkpoint as C
from infra import distributed as D
from infra.atomic import exclusive

OVERWRITE_HELP = ("replace the run already in the output folder (refused without it): the new run is written into a "
                  "hidden sibling folder and swapped in when complete, so the old run is kept until then "
                  "(infra/run_folder.py)")
STAGE_SUFFIX = "stage-overwrite"  # .NAME.stage-overwrite: tagged "stage" (checkpoint.STRAY_TAGS), a known stray


def lock_file(folder):
    """The lock of run folder `folder`: the hidden sibling .NAME.lock."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


def staging_folder(folder):
    """Where --overwrite writes the new run: the hidden sibling .NAME.stage-overwrite."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}.{STAGE_SUFFIX}"


def path_kind(path):
    """'a symlink', 'a FIFO', ... for what sits at `path` (not followed); 'folder', 'file' or None (nothing)."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file where a parent folder must be
        return None
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "folder"), (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "not a regular file or folder"


MIN_FREE_BYTES = 1 << 20  # a location with less free space is refused as full before any work


def _writable(folder):
    """Whether this process may create files in `folder` (os.access: permissions, a read-only mount)."""
    return os.access(folder, os.W_OK | os.X_OK)


def _free_bytes(folder):
    """Free bytes for this user on the disk of `folder` (None when unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def location_problem(path):
    """Why nothing can be written at `path` (None when it can), as (the OSError class, the reason): the nearest
    existing path at or above it must be a folder (or `path` itself a file, to be replaced), and the folder that
    would receive the write must be writable and have free space. Nothing is created."""
    path = os.path.abspath(path)
    where = path
    while not os.path.lexists(where):
        where = os.path.dirname(where)
    if where != path and not os.path.isdir(where):
        kind = path_kind(where)
        return NotADirectoryError, (f"cannot be created: {where} is {'a regular file' if kind == 'file' else kind}, "
                                    f"not a folder")
    folder = where if os.path.isdir(where) else os.path.dirname(where)
    if not _writable(folder):
        return PermissionError, f"cannot be written: {folder} is not writable (read-only, or not yours)"
    free = _free_bytes(folder)
    if free is not None and free < MIN_FREE_BYTES:
        return OSError, f"cannot be written: the disk holding {folder} is full ({free} bytes free)"
    return None


def refuse_location(path, flag, named=None):
    """Raise location_problem(path) as its OSError, naming `flag` with its value `named` (default: `path`), the
    reason and the fix; nothing was written."""
    problem = location_problem(path)
    if problem is None:
        return
    cls, reason = problem
    message = (f"{flag} {named or path} {reason}; nothing was written: pass {flag} a path in a writable folder "
               f"with free space")
    raise OSError(errno.ENOSPC, message) if cls is OSError else cls(message)


def check_folder(path, flag="--out-dir"):
    """Refuse (NotADirectoryError) a `path` that exists and is not a plain folder: a symlink (even to a folder),
    FIFO, socket, device or regular file, or that cannot be created because a file sits where a parent folder
    must be; refuse (PermissionError, OSError ENOSPC) a location that cannot be written (location_problem). An
    absent path is fine (it is created)."""
    kind = path_kind(path)
    if kind not in (None, "folder"):
        fix = (f"pass {flag} the folder it points to ({os.readlink(path)}) or another path" if kind == "a symlink"
               else f"remove it or pass {flag} another path")
        kind = "a regular file" if kind == "file" else kind
        raise NotADirectoryError(f"{flag} {path} is {kind}, not a folder; nothing was written: {fix}")
    refuse_location(path, flag)


def check_file(path, flag="--out", appended=False):
    """Refuse (NotADirectoryError) a `path` where a result file goes that exists and is not a regular file;
    appended: the file is written in place (REPORT.md), so an existing one must be writable (PermissionError)."""
    kind = path_kind(path)
    if kind not in (None, "file"):
        raise NotADirectoryError(f"{path} (in {flag}) is {kind}, not a regular file, and would be replaced or "
                                 f"written through; nothing was written: remove it or pass {flag} another folder")
    if appended and kind == "file" and not os.access(path, os.W_OK):
        raise PermissionError(f"{path} (in {flag}) is not writable and would fail after the work; nothing was "
                              f"written: make it writable or pass {flag} another folder")


def _rank0(env):
    return env.is_main if env is not None else int(os.environ.get("RANK", "0")) == 0


@contextmanager
def _hold(path, what):
    """The non-blocking lock of `path` (a lock file), refused at once when another process holds it."""
    held = ExitStack()
    try:
        held.enter_context(exclusive(path, wait=False))
    except BlockingIOError:
        raise BlockingIOError(f"{what} is in use: another process holds its lock (a second writer on it is "
                              f"refused); wait for that process to end, or choose another folder") from None
    with held:
        yield


@contextmanager
def claim(folder, resume=False, overwrite=False, env=None, resumable=True, flag="--out-dir"):
    """Hold run folder `folder` for the with-block (the rule of the module docstring); yields the folder to write
    into: `folder`, or with --overwrite its staging sibling, swapped in when the block ends without error.
    env: infra.distributed's (rank 0 claims, every rank waits at a barrier); None: rank from $RANK, no barrier.
    resumable=False: the writer has no --resume (the message names only --overwrite)."""
    folder = Path(folder)
    stage = staging_folder(folder) if overwrite else None
    if not _rank0(env):
        if env is not None:
            D.barrier(env)
        yield stage or folder
        return
    if resume and overwrite:
        raise ValueError(f"--resume continues the run in {folder} and --overwrite replaces it: pass one of them")
    check_folder(folder, flag)
    if folder.is_dir() and (overwrite or not lock_file(folder).exists()):
        refuse_location(folder.parent, flag, folder)  # the lock (and an --overwrite's staged run) go beside it
    C.recover_folder(folder)  # an --overwrite (or a save) killed between its two renames: the complete old copy back
    if resume and not folder.is_dir():
        raise FileNotFoundError(f"--resume: {folder} does not exist; drop --resume to start a new run there")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _hold(lock_file(folder), f"{flag} {folder}"):
            if not resume and not overwrite and any(folder.iterdir()):
                options = ("pass --resume to continue it, --overwrite to replace it (the old run is kept until the "
                           "new one is complete)" if resumable else
                           "pass --overwrite to replace it (the old one is kept until the new one is complete)")
                raise FileExistsError(f"{flag} {folder} already holds a run (it is not empty); {options}, or choose "
                                      f"another {flag}")
            if stage is not None:
                _remove(stage)  # a killed earlier --overwrite's; we hold the folder, so no live writer uses it
                stage.mkdir()
            if env is not None:
                D.barrier(env)
            try:
                yield stage or folder
            except BaseException:
                if stage is not None:
                    _remove(stage)  # the old run stays as it was
                raise
            if stage is not None:
                C.swap_folder(stage, folder)  # only now is the old run replaced (a complete copy at every instant)
    except BaseException:
        if created:
            _remove_if_empty(folder)
        raise


@contextmanager
def claim_result(folder, name, overwrite=False, flag="--out"):
    """Hold OUT/NAME.json of one eval.py subcommand for the with-block: OUT checked (a plain folder), NAME.json,
    NAME.png and REPORT.md checked (absent or regular files), NAME.json refused unless `overwrite`, the lock
    OUT/.NAME.lock held. Yields OUT. Only the process of rank 0 ($RANK) claims; the others write nothing."""
    folder = Path(folder)
    if not _rank0(None):
        yield folder
        return
    check_folder(folder, flag)
    for file in (f"{name}.json", f"{name}.png", "REPORT.md"):
        check_file(folder / file, flag, appended=file == "REPORT.md")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / f".{name}.lock"
    try:
        with _hold(lock, f"{flag} {folder} for eval.py {name}"):
            if (folder / f"{name}.json").exists() and not overwrite:
                raise FileExistsError(f"{folder / (name + '.json')} already exists (an earlier eval.py {name} into "
                                      f"{flag} {folder}); pass --overwrite to replace it (it is kept until the new "
                                      f"result is complete), or choose another {flag}")
            yield folder
    except BaseException:
        if created:
            lock.unlink(missing_ok=True)
            _remove_if_empty(folder)
        raise


def _remove(path):
    if path_kind(path) == "folder":
        shutil.rmtree(path, ignore_errors=True)
    elif path_kind(path) is not None:
        Path(path).unlink(missing_ok=True)


def _remove_if_empty(folder):
    try:
        folder.rmdir()
    except OSError:
        pass
