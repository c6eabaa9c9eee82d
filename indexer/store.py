"""The base store: the frozen encoder's normalised embeddings in append-only fp16 shards.

Layout: ``base/<modality>/shard-<n>.npy`` (N x dim, float16). Which item sits in which
row is recorded in the catalog (items.shard, items.row), written after the shard file has
been moved into place; a shard file no catalog row points at is debris of an interrupted
run and is removed by :meth:`BaseStore.clean`.

Compaction rewrites shards that hold rows no item uses any more (deleted or replaced
items): the live rows go to a new shard, the catalog points at it, the old file goes.
Writers, that rewrite and readers of (catalog row, shard file) pairs hold
:meth:`BaseStore.lock`: a thread lock plus an flock on ``base/.lock``, so that an
``xmodal index`` in another process and a server on the same directory never pick the
same shard number or read a shard while it is replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from .catalog import Catalog
from .corpus import MODALITIES
from .errors import InvalidArgument
from .heads import fsync_dir
from .vectors import ModalityVectors

_SHARD = re.compile(r"^shard-(\d{6})\.npy$")


def write_blob(root: Path, data: bytes, name: str | None = None) -> str:
    """Bytes under ``root/blobs/``, content-addressed (by ``name``, else their sha256), written
    to a temporary name, fsynced and moved into place; returns the path relative to ``root``.
    Image bytes sent over gRPC and the de-identified copies of DICOM files live there."""
    name = name or hashlib.sha256(data).hexdigest()
    relative = f"blobs/{name[:2]}/{name}"
    path = Path(root) / relative
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    return relative


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name, fsync, then os.replace: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class BaseStore:
    def __init__(self, root: str | Path, catalog: Catalog):
        self.root = Path(root)
        self.catalog = catalog

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the shard files and their catalog rows (re-entrant; shared by
        every BaseStore on the same folder in this process; across processes by an flock).
        Over a read-only catalog (a replica) it takes nothing: a replica never holds up the
        primary, and a read that meets a shard being replaced is retried on the next check."""
        if self.catalog.read_only:
            yield
            return
        with _StoreLock.of(self.root).held():
            yield

    def folder(self, modality: str) -> Path:
        return self.root / modality

    def shard_path(self, modality: str, shard: int) -> Path:
        return self.folder(modality) / f"shard-{shard:06d}.npy"

    def _shard_numbers(self, modality: str) -> list[int]:
        folder = self.folder(modality)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD.match(p.name)))

    def clean(self) -> list[Path]:
        """Remove temporary files and shards that no catalog row refers to; return them."""
        with self.lock():
            return self._clean()

    def _clean(self) -> list[Path]:
        removed = []
        for modality in MODALITIES:
            folder = self.folder(modality)
            if not folder.is_dir():
                continue
            used = self.catalog.used_shards(modality)
            for path in folder.iterdir():
                match = _SHARD.match(path.name)
                if path.name.endswith(".tmp") or (match and int(match.group(1)) not in used):
                    path.unlink()
                    removed.append(path)
        return removed

    def append(self, modality: str, ids: list[str], vectors: np.ndarray) -> int:
        """Write one new shard and record its rows in the catalog; returns its number."""
        if len(ids) != len(vectors):
            raise InvalidArgument(f"{len(ids)} ids for {len(vectors)} vectors: pass one id per vector row")
        with self.lock():
            shard = self.write_shard(modality, vectors)
            self.catalog.set_embedded(shard, ids)
        return shard

    def write_shard(self, modality: str, vectors: np.ndarray) -> int:
        """Write one new shard file (not yet referenced by the catalog: debris until a
        catalog transaction points rows at it); returns its number."""
        with self.lock():
            folder = self.folder(modality)
            folder.mkdir(parents=True, exist_ok=True)
            numbers = self._shard_numbers(modality)
            shard = (max(numbers) + 1) if numbers else 0
            atomic_save_npy(self.shard_path(modality, shard), np.asarray(vectors, dtype=np.float16))
        return shard

    def item_vector(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(modality, float32 base vector) of an embedded item, or None."""
        with self.lock():
            found = self.catalog.item_rows([item_id]).get(item_id)
            if found is None:
                return None
            modality, shard, row = found
            if shard is None or row is None:
                return None
            array = np.load(self.shard_path(modality, shard), mmap_mode="r", allow_pickle=False)
            return modality, np.asarray(array[row], dtype=np.float32)

    def drop_dead_rows(self) -> dict[str, int]:
        """Rewrite every shard that holds rows no catalog item points at (deleted or
        replaced items) so that only its live rows remain; returns the rows dropped per
        modality. Crash-safe: the new shard is written first, one transaction moves the
        rows, then the old file goes (a crash leaves an unreferenced shard: debris)."""
        dropped = dict.fromkeys(MODALITIES, 0)
        with self.lock():
            for modality in MODALITIES:
                live: dict[int, list[tuple[str, int]]] = {}
                for item_id, shard, row, _ in self.catalog.embedded(modality):
                    live.setdefault(shard, []).append((item_id, row))
                for shard in self._shard_numbers(modality):
                    path = self.shard_path(modality, shard)
                    rows = sorted(live.get(shard, []), key=lambda r: r[1])
                    total = np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
                    if len(rows) == total:
                        continue
                    dropped[modality] += total - len(rows)
                    if rows:
                        kept = np.load(path, allow_pickle=False)[[r for _, r in rows]]
                        new = self.write_shard(modality, kept)
                        self.catalog.move_rows(new, [item_id for item_id, _ in rows])
                    path.unlink()
                if self.folder(modality).is_dir():
                    fsync_dir(self.folder(modality))
        return dropped

    def load(self, modality: str, after_seq: int = -1) -> ModalityVectors:
        """All embedded items of a modality (written after ``after_seq``): ids and float32
        base vectors (N x dim)."""
        with self.lock():
            return self.load_rows(modality, self.catalog.embedded(modality, after_seq))

    def load_rows(self, modality: str, rows: list[tuple[str, int, int, int]]) -> ModalityVectors:
        """The base vectors of catalog rows (id, shard, row, seq); call it under :meth:`lock`
        with the rows read under the same hold."""
        if not rows:
            return ModalityVectors.empty()
        shards: dict[int, np.ndarray] = {}
        for _, shard, _, _ in rows:
            if shard not in shards:
                shards[shard] = np.load(self.shard_path(modality, shard), mmap_mode="r", allow_pickle=False)
        dim = next(iter(shards.values())).shape[1]
        out = np.empty((len(rows), dim), np.float32)
        for i, (_, shard, row, _) in enumerate(rows):
            out[i] = shards[shard][row]
        return ModalityVectors([r[0] for r in rows], out, max_seq=max(r[3] for r in rows))


class _StoreLock:
    """One per base folder and process: a re-entrant thread lock around an flock (two
    flocks on one file from one process would wait on each other)."""

    _all: dict[Path, _StoreLock] = {}
    _registry = threading.Lock()

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.RLock()
        self.depth = 0
        self.handle: IO[str] | None = None

    @classmethod
    def of(cls, root: Path) -> _StoreLock:
        key = Path(os.path.abspath(root))
        with cls._registry:
            if key not in cls._all:
                cls._all[key] = cls(key)
            return cls._all[key]

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self.lock:
            if self.depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                handle = open(self.root / ".lock", "a")
                fcntl.flock(handle, fcntl.LOCK_EX)
                self.handle = handle
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.handle is not None:
                    self.handle.close()  # releases the flock
                    self.handle = None
