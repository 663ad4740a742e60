"""Files and folders that hold the community's data: readable by the gateway's user alone.

The stores hold residents' requests, and the backups and credentials are as private, so they
are made 0600 inside 0700 folders by the code itself, whatever the umask of whoever starts the
gateway (the systemd unit sets `UMask=0077` as well). An existing file or folder of ours is
tightened too, so an older install's 0644 store is not left as it was. SQLite makes its `-wal`
and `-shm` files with the mode of the database file, so making that one 0600 first covers them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def private_dir(path: Path) -> Path:
    """`path` as a folder of mode 0700 (missing parents are made with the usual modes)."""
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    _tighten(path, FOLDER_MODE)
    return path


def private_file(path: Path) -> Path:
    """`path` as a file of mode 0600: made empty when missing (never truncated when present)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
    _tighten(path, FILE_MODE)
    return path


def private_store(path: Path) -> Path:
    """A SQLite file about to be opened: its folder 0700, it and its WAL files 0600."""
    private_dir(path.parent)
    private_file(path)
    for companion in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if companion.exists():
            _tighten(companion, FILE_MODE)
    return path


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to a file that is 0600 from its first byte (not chmod-ed afterwards)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    _tighten(path, FILE_MODE)  # it may have existed with a wider mode


def _tighten(path: Path, mode: int) -> None:
    if path.stat().st_mode & 0o777 == mode:
        return
    try:
        os.chmod(path, mode)
    except PermissionError:
        # Not ours (a folder the installer made for us, owned by root): say so, carry on.
        log.warning("cannot make %s mode %o (owned by another user); do it by hand", path, mode)
