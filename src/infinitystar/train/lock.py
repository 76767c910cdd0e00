"""One run per output folder: an exclusive lock on `OUTPUT_DIR/.lock`, held from the start of a run to its end.

The lock is an flock(2) on the open file, so the kernel drops it when the holding process ends however it ends
(exit, exception, kill -9): a lock left behind by a dead run is stale by construction and is taken over, with a
warning naming the dead holder. The file records the holder (pid, host, start time) for the message the second
run gets. Within one process, locking a folder again shares the lock (a trainer built twice in a notebook); the
lock is released when the last holder releases it or is garbage collected.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Optional

from infinitystar.runtime import UserError
from infinitystar.train.distributed import broadcast_object

LOCK_FILE = ".lock"

# realpath of a lock file -> [fd, number of holders] for the locks this process holds
_HELD: dict[str, list] = {}


class RunLockError(UserError):
    """Another live run holds the output folder."""


def _describe(record: dict) -> str:
    when = record.get("started")
    since = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}" if isinstance(when, (int, float)) else ""
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}{since}"


def _read_record(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else {}
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """`RunLock(dir).acquire()`; `release()` (idempotent) or a `with` block ends it."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._key: Optional[str] = None

    def acquire(self) -> "RunLock":
        if self._key is not None:
            return self
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.directory}: the run folder (output_dir) is a file, not a folder")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            key = os.path.realpath(self.path)
            if key in _HELD:
                _HELD[key][1] += 1
                self._key = key
                return self
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.directory}: cannot create the run lock ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_record(fd))
            os.close(fd)
            raise RunLockError(f"{self.directory} is in use by another run ({holder}); wait for it to finish or "
                               f"choose another output_dir") from None
        except OSError as e:
            os.close(fd)
            raise UserError(f"{self.path}: cannot lock ({e.strerror})") from None
        stale = _read_record(fd)
        if stale:
            warnings.warn(f"{self.path}: the run that held it ({_describe(stale)}) ended without releasing it; "
                          f"taking it over", stacklevel=3)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None or key not in _HELD:
            return
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[key]
            os.ftruncate(entry[0], 0)   # an empty file: nobody to name, nothing stale
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        if _HELD is not None:   # None during interpreter shutdown, when the OS releases the lock anyway
            self.release()


def lock_run(directory, info=None) -> RunLock:
    """Take the lock of `directory` for this run. Under torchrun (`info`: the DistInfo) rank 0 takes it and every
    rank raises the same RunLockError when it is held elsewhere; other ranks get an unheld RunLock."""
    lock, error = RunLock(directory), None
    if info is None or info.is_main:
        try:
            lock.acquire()
        except UserError as e:
            error = (type(e).__name__, str(e))
    if info is not None:
        error = broadcast_object(error, info)
    if error is not None:
        raise (RunLockError if error[0] == "RunLockError" else UserError)(error[1])
    return lock
