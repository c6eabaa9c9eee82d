"""Snapshots: immutable folders holding a head and one FAISS index per modality.

``snapshots/<id>/``: manifest.json, head.safetensors + head.json, ``<modality>.faiss``
and ``<modality>.ids.npy`` (row -> item id). Built in ``snapshots/.tmp-<id>``, fsynced and
moved into place with os.replace; ``snapshots/CURRENT`` (replaced atomically, last) names
the live one.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .catalog import Catalog
from .corpus import MODALITIES
from .errors import FailedPrecondition, NotFound
from .heads import Head, fsync_dir, load_head
from .store import BaseStore, atomic_save_npy

MANIFEST_SCHEMA = 1
DEFAULT_FACTORY = "Flat"


@dataclass
class DataDir:
    """Paths of one deployment's data directory."""

    root: Path

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.sqlite"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def current_file(self) -> Path:
        return self.snapshots / "CURRENT"

    def current_id(self) -> str | None:
        try:
            value = self.current_file.read_text().strip()
        except FileNotFoundError:
            return None
        return value or None

    def set_current(self, snapshot_id: str) -> None:
        if not (self.snapshots / snapshot_id / "manifest.json").is_file():
            raise NotFound(f"no snapshot {snapshot_id!r} in {self.snapshots}")
        tmp = self.snapshots / ".CURRENT.tmp"
        with open(tmp, "w") as handle:
            handle.write(snapshot_id + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.current_file)
        fsync_dir(self.snapshots)

    def snapshot_ids(self) -> list[str]:
        if not self.snapshots.is_dir():
            return []
        return sorted(p.name for p in self.snapshots.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file())

    def clean(self) -> list[Path]:
        """Remove debris of unfinished snapshot writes (temporary folders and files).

        A snapshot being written right now by another live process is left alone: its
        writer holds an flock on ``.tmp-<id>.lock``, which the kernel releases when the
        writer dies, even by SIGKILL.
        """
        removed = []
        if not self.snapshots.is_dir():
            return removed
        for path in sorted(self.snapshots.iterdir()):
            if path.name.startswith(".tmp-") and path.is_dir():
                lock = path.with_name(path.name + ".lock")
                if lock.exists() and _locked(lock):
                    continue  # a live writer
                shutil.rmtree(path, ignore_errors=True)
                lock.unlink(missing_ok=True)
                removed.append(path)
            elif path.name.endswith(".lock") and path.name.startswith(".tmp-"):
                if not path.with_name(path.name[:-5]).exists() and not _locked(path):
                    path.unlink(missing_ok=True)
            elif path.name.endswith(".tmp") and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed


def _locked(path: Path) -> bool:
    """True if another process holds an flock on ``path``."""
    try:
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def new_snapshot_id() -> str:
    now = dt.datetime.now(dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z-" + secrets.token_hex(3)


def build_index(vectors: np.ndarray, factory: str = DEFAULT_FACTORY) -> faiss.Index:
    """An inner-product FAISS index over normalised vectors (cosine similarity)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    index.add(vectors)
    return index


def write_snapshot(
    data: DataDir,
    catalog: Catalog,
    store: BaseStore,
    head: Head,
    *,
    encoder: str,
    factory: str = DEFAULT_FACTORY,
    parent_id: str | None = None,
    metrics: dict | None = None,
    make_current: bool = True,
    reuse_indexes_from: str | None = None,
) -> dict:
    """Project every base vector with ``head``, build the indexes and write a snapshot.

    Args:
        reuse_indexes_from: id of a snapshot whose index files are still right for
            ``head`` (a query-side refit): they are hard-linked, not rebuilt, and nothing
            is re-projected.

    Returns:
        The manifest (also at snapshots/<id>/manifest.json).
    """
    snapshot_id = new_snapshot_id()
    data.snapshots.mkdir(parents=True, exist_ok=True)
    tmp = data.snapshots / f".tmp-{snapshot_id}"
    lock_path = data.snapshots / f".tmp-{snapshot_id}.lock"
    lock = open(lock_path, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # tells DataDir.clean in other processes this write is alive
    try:
        return _write_snapshot(data, catalog, store, head, tmp, snapshot_id, encoder=encoder, factory=factory,
                               parent_id=parent_id, metrics=metrics, make_current=make_current,
                               reuse_indexes_from=reuse_indexes_from)
    finally:
        lock.close()
        lock_path.unlink(missing_ok=True)


def _write_snapshot(data: DataDir, catalog: Catalog, store: BaseStore, head: Head, tmp: Path, snapshot_id: str, *,
                    encoder: str, factory: str, parent_id: str | None, metrics: dict | None, make_current: bool,
                    reuse_indexes_from: str | None) -> dict:
    tmp.mkdir()
    head_hash = head.save(tmp)
    counts = {}
    if reuse_indexes_from is not None:
        source = data.snapshots / reuse_indexes_from
        parent = json.loads((source / "manifest.json").read_text())
        factory, counts = parent["faiss_factory"], dict(parent["counts"])
        for modality in MODALITIES:
            for name in (f"{modality}.faiss", f"{modality}.ids.npy"):
                os.link(source / name, tmp / name)  # immutable files: a link is a free copy
    for modality in MODALITIES if reuse_indexes_from is None else ():
        ids, base = store.load(modality)
        vectors = head.project(modality, base) if ids else np.zeros((0, head.dim_out), np.float32)
        index = build_index(vectors, factory)
        faiss.write_index(index, str(tmp / f"{modality}.faiss"))
        atomic_save_npy(tmp / f"{modality}.ids.npy", np.asarray(ids, dtype=str))
        counts[modality] = len(ids)
    manifest = {
        "schema_version": MANIFEST_SCHEMA,
        "id": snapshot_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "parent_id": parent_id,
        "encoder": encoder,
        "base_dim": head.dim_in,
        "dim": head.dim_out,
        "head": {"kind": head.kind, "sha256": head_hash, **head.config},
        "faiss_factory": factory,
        "counts": counts,
        "metrics": metrics or {},
        "indexes_from": reuse_indexes_from,
    }
    with open(tmp / "manifest.json", "w") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(tmp)
    os.replace(tmp, data.snapshots / snapshot_id)
    fsync_dir(data.snapshots)
    catalog.record_snapshot(manifest)
    if make_current:
        data.set_current(snapshot_id)
    return manifest


def prune_snapshots(data: DataDir, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest snapshots; the one CURRENT names always stays."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    current = data.current_id()
    ids = data.snapshot_ids()  # ids sort by creation time
    doomed = [i for i in ids[:-keep] if i != current]
    for snapshot_id in doomed:
        shutil.rmtree(data.snapshots / snapshot_id)
    return doomed


class ModalityIndex:
    """One modality's FAISS index with its row -> id map (and the reverse)."""

    def __init__(self, index: faiss.Index, ids: np.ndarray):
        if index.ntotal != len(ids):
            raise FailedPrecondition(f"index holds {index.ntotal} vectors but its id map {len(ids)}: snapshot is corrupt")
        self.index = index
        self.ids = ids
        self.rows = {item_id: row for row, item_id in enumerate(ids.tolist())}

    def __len__(self) -> int:
        return self.index.ntotal

    def vector(self, item_id: str) -> np.ndarray | None:
        row = self.rows.get(item_id)
        return None if row is None else self.index.reconstruct(row)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) for a batch of queries; rows are -1 past the end."""
        xq = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(xq, min(k, max(1, self.index.ntotal)))


class Snapshot:
    """A loaded, immutable snapshot. The server swaps whole Snapshot objects."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise NotFound(f"no snapshot at {self.folder}")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("schema_version") != MANIFEST_SCHEMA:
            raise FailedPrecondition(f"snapshot {self.folder.name} has schema {self.manifest.get('schema_version')}, "
                                     f"this xmodal reads {MANIFEST_SCHEMA}")
        self.id = self.manifest["id"]
        self.head = load_head(self.folder)
        if self.head.digest() != self.manifest["head"]["sha256"]:
            raise FailedPrecondition(f"snapshot {self.id}: head does not match the manifest's hash")
        self.indexes = {
            modality: ModalityIndex(
                faiss.read_index(str(self.folder / f"{modality}.faiss")),
                np.load(self.folder / f"{modality}.ids.npy", allow_pickle=False),
            )
            for modality in MODALITIES
        }

    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]

    def find(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(modality, adapted vector) of an indexed item, or None."""
        for modality, index in self.indexes.items():
            vector = index.vector(item_id)
            if vector is not None:
                return modality, vector
        return None


def load_current(data: DataDir) -> Snapshot | None:
    snapshot_id = data.current_id()
    if snapshot_id is None:
        return None
    return Snapshot(data.snapshots / snapshot_id)
