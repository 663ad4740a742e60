"""Backup and restore of the box's stores: `cgw backup` and `cgw restore` (docs/operations.md).

A backup is a folder holding a consistent copy of each SQLite file (made with SQLite's online
backup API, so the gateway may keep running and writing), and `manifest.json`: the community,
the time, each file's schema version and SHA-256. Restore checks the manifest before it touches
anything, refuses a schema newer than this gateway knows, and replaces the files whole (with
their stale WAL files removed), so a restore is either complete or not done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.files import FOLDER_MODE, private_dir, private_file, write_private
from gateway.services.schema import MIGRATIONS as SERVICE_MIGRATIONS
from gateway.store.schema import MIGRATIONS as STORE_MIGRATIONS

# What a backup holds: file name -> the schema version this gateway knows for it, from each
# file's owner (the telemetry store and the services), which is why backup sits above both.
FILES = {"cgw.sqlite3": len(STORE_MIGRATIONS), "services.sqlite3": len(SERVICE_MIGRATIONS)}


class BackupError(Exception):
    """One line saying what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class Made:
    folder: Path
    files: dict[str, int]  # name -> bytes


def backup(data_dir: Path, into: Path, community: str) -> Made:
    """Copy the stores of `data_dir` into a new folder under `into`; returns it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder = into / f"cgw-backup-{community}-{stamp}"
    into.mkdir(parents=True, exist_ok=True)
    folder.mkdir(mode=FOLDER_MODE, exist_ok=False)
    private_dir(folder)
    manifest: dict[str, object] = {"community": community, "made": stamp, "files": {}}
    sizes: dict[str, int] = {}
    for name in FILES:
        source = data_dir / name
        if not source.exists():
            continue
        target = private_file(folder / name)
        with sqlite3.connect(source, timeout=30) as src, sqlite3.connect(target) as dst:
            src.backup(dst)  # consistent even while the gateway writes
            version = dst.execute("PRAGMA user_version").fetchone()[0]
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            # Without free pages: what was emptied or deleted before the copy is not in it.
            dst.execute("VACUUM")
        manifest["files"][name] = {"schema": version, "sha256": _sha256(target)}  # type: ignore[index]
        sizes[name] = target.stat().st_size
    if not sizes:
        folder.rmdir()
        raise BackupError(f"no stores in {data_dir}: check CGW_DATA_DIR")
    write_private(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return Made(folder, sizes)


def check(folder: Path) -> dict[str, dict[str, object]]:
    """The manifest's files, after checking each against its checksum and this gateway's schema."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        files: dict[str, dict[str, object]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{folder} is not a cgw backup (manifest.json: {exc})") from None
    for name, entry in files.items():
        if name not in FILES:
            raise BackupError(f"{folder}: unknown file {name!r} in the manifest")
        path = folder / name
        if not path.exists() or _sha256(path) != entry.get("sha256"):
            raise BackupError(f"{folder}/{name} does not match its checksum: the backup is damaged")
        schema = entry.get("schema")
        if not isinstance(schema, int) or schema > FILES[name]:
            raise BackupError(
                f"{folder}/{name} has schema {schema}, newer than this gateway knows ({FILES[name]}): "
                "upgrade cgw before restoring it"
            )
    return files


def restore(folder: Path, data_dir: Path) -> list[str]:
    """Replace the stores in `data_dir` by the backup's; the gateway must be stopped."""
    files = check(folder)
    private_dir(data_dir)
    for name in files:
        staged = private_file(data_dir / f".{name}.restoring")
        shutil.copyfile(folder / name, staged)  # into the 0600 file: copyfile keeps its mode
        for stale in (data_dir / f"{name}-wal", data_dir / f"{name}-shm"):
            stale.unlink(missing_ok=True)
        staged.replace(data_dir / name)  # atomic on one file system
    return sorted(files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
