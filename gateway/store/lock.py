"""One gateway per data folder: an exclusive lock that says who holds it.

Two gateways (or two demos) writing the same SQLite files would interleave their sequences and
outboxes. The lock is `flock` on `cgw.lock` in the data folder: the kernel releases it when the
holder's process ends, however it ends, so a crash never leaves a stale lock. The file holds the
holder's pid and command, read back to name it when a second one is refused.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from gateway.files import private_dir

LOCK_FILE = "cgw.lock"


class DataDirInUse(OSError):
    """Another process holds the data folder; the message names it and what to do."""


class DataDirUnusable(OSError):
    """The data folder cannot be made or written: a setting's fault (CGW_DATA_DIR), not a crash."""


class DataDirLock:
    """`acquire()` before touching the stores, `release()` after closing them."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise `DataDirInUse` naming the holder (pid and command)."""
        if self._fd is not None:
            return
        try:
            private_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DataDirUnusable(
                f"setting CGW_DATA_DIR (data_dir): {self.path.parent} cannot be used as the data folder "
                f"({exc.strerror or exc}{': ' + exc.filename if exc.filename else ''}); choose a folder "
                "this user can create and write"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "another process"
            os.close(fd)
            raise DataDirInUse(
                f"data dir {self.path.parent} is in use by {holder}: stop it first, or give this "
                "one its own folder (CGW_DATA_DIR; cgw demo --data-dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({_command()})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays: removing it would let a third process lock a new file while a second
        # still waits on the old one.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def holder(data_dir: Path) -> str | None:
    """Who holds the lock of `data_dir` now (pid and command), or None if nobody does."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd) or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read(fd: int) -> str:
    return os.pread(fd, 512, 0).decode(errors="replace").strip()


def _command() -> str:
    """How this process was started, as a person would type it (`cgw run -c cgw.yaml`)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "cgw"  # python -m gateway.cli
    elif argv:
        argv[0] = Path(argv[0]).name
    return " ".join(argv)[:200]
