"""One writer at a time: an exclusive advisory file lock for caches that several processes may build.

Used where two runs can want the same derived files at once (the token cache of data.py, the register
banks of latent_data.py, e.g. demo.sh training two priors side by side): the second process waits on the
lock, then finds the first one's finished result and reuses it. The lock belongs to the process
(fcntl.flock), so a builder killed with -9 never leaves it held; no stale-lock cleanup is ever needed.
"""

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


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
