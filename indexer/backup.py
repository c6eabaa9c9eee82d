"""Online backup of a data directory: a consistent copy while a server keeps writing.

The copy is made holding the base store's lock (BaseStore.lock, an flock other processes
see), so that no compaction rewrites a shard, erases from a snapshot or commits an upsert
meanwhile: the catalog is copied with SQLite's backup API (one consistent state), then the
base shards, the image files under ``blobs/``, the DICOM id key, CURRENT and the snapshot folders. Restoring
is copying the backup folder into place as the data directory.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from .catalog import Catalog
from .errors import FailedPrecondition, InvalidArgument
from .snapshot import DataDir
from .store import BaseStore


def backup(data_dir: str | Path, out: str | Path) -> dict:
    """Copy a (possibly live) data directory to ``out``, which must not exist yet.

    Returns:
        {"catalog": path, "shards": n, "snapshots": n, "current": id}
    """
    data = DataDir(data_dir)
    out = Path(out).expanduser().resolve()
    if not data.catalog_path.exists():
        raise FailedPrecondition(f"{data.root} has no catalog.sqlite: not a data directory")
    if out.exists():
        raise InvalidArgument(f"backup target {out} already exists: pass a new folder")
    out.mkdir(parents=True)
    with BaseStore(data.base, Catalog(data.catalog_path)).lock():
        return _copy(data, out)


def _copy(data: DataDir, out: Path) -> dict:
    source = sqlite3.connect(f"file:{data.catalog_path}?mode=ro", uri=True, timeout=30)
    target = sqlite3.connect(out / "catalog.sqlite")
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()
    shards = 0
    if data.base.is_dir():
        for path in data.base.rglob("shard-*.npy"):
            destination = out / "base" / path.relative_to(data.base)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
            shards += 1
    if (data.root / "blobs").is_dir():
        shutil.copytree(data.root / "blobs", out / "blobs", ignore=shutil.ignore_patterns(".*.tmp"))
    if (data.root / "dicom.key").is_file():  # DICOM item ids are derived with it
        shutil.copy2(data.root / "dicom.key", out / "dicom.key")
    current = data.current_id()
    copied = 0
    for snapshot_id in data.snapshot_ids():
        try:
            shutil.copytree(data.snapshots / snapshot_id, out / "snapshots" / snapshot_id)
        except FileNotFoundError:  # pruned meanwhile (the live one is checked below)
            shutil.rmtree(out / "snapshots" / snapshot_id, ignore_errors=True)
            continue
        copied += 1
    if current:
        if not (out / "snapshots" / current).is_dir():
            raise FailedPrecondition(f"the live snapshot {current} vanished during the backup: run it again")
        DataDir(out).set_current(current)
    return {"catalog": str(out / "catalog.sqlite"), "shards": shards, "snapshots": copied, "current": current}
