"""Snapshots: immutable folders holding a head and one FAISS index per modality.

``snapshots/<id>/``: manifest.json, head.safetensors + head.json, ``<modality>.faiss``
and ``<modality>.ids.npy`` (row -> item id). Built in ``snapshots/.tmp-<id>``, fsynced and
moved into place with os.replace; ``snapshots/CURRENT`` (replaced atomically, last) names
the live one.

Snapshots are immutable with one exception, erasure: :func:`erase_from_snapshot` rewrites a
retained snapshot's indexes without items that were deleted (or replaced) since it was
made, so that no copy of an erased item's vector stays in any of them. The new files are
written into ``<id>/.rewrite/``, which a ``COMMIT`` file completes; then they replace the
old ones. A crash before ``COMMIT`` leaves the old files (the folder is removed); after it,
:meth:`DataDir.clean` finishes the replacement.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import ann
from .catalog import Catalog
from .corpus import MODALITIES
from .errors import FailedPrecondition, InvalidArgument, NotFound
from .heads import Head, fsync_dir, load_head
from .manifest import MANIFEST_NAME, Manifest
from .store import BaseStore, atomic_save_npy
from .vectors import Vectors, load_vectors

log = logging.getLogger(__name__)

DEFAULT_FACTORY = ann.AUTO  # choose by item count and memory budget (see ann.py)
TRAIN_ROWS = 200_000  # at most this many rows (or 40 per IVF list) train an index


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
        if not (self.snapshots / snapshot_id / MANIFEST_NAME).is_file():
            raise NotFound(f"no snapshot {snapshot_id!r}: see `xmodal snapshots` for the ids")
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
        return sorted(
            p.name
            for p in self.snapshots.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
        )

    def create(self) -> None:
        """Make the folder (and its parents) if missing.

        Raises:
            InvalidArgument: the path exists and is not a folder.
        """
        if self.root.exists() and not self.root.is_dir():
            raise InvalidArgument(f"--data {self.root.name!r} is a file, not a folder: pass a data directory")
        self.root.mkdir(parents=True, exist_ok=True)

    def clean(self) -> list[Path]:
        """Remove debris of unfinished snapshot writes (temporary folders and files).

        A snapshot being written right now by another live process is left alone: its
        writer holds an flock on ``.tmp-<id>.lock``, which the kernel releases when the
        writer dies, even by SIGKILL.
        """
        removed: list[Path] = []
        if not self.snapshots.is_dir():
            return removed
        for snapshot_id in self.snapshot_ids():
            rewrite = self.snapshots / snapshot_id / REWRITE
            if rewrite.is_dir():
                if (rewrite / COMMIT).is_file():
                    _finish_rewrite(self.snapshots / snapshot_id)  # roll the erasure forward
                else:
                    shutil.rmtree(rewrite)  # roll it back: the old files are whole
                    removed.append(rewrite)
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


REWRITE = ".rewrite"
COMMIT = "COMMIT"


def erase_from_snapshot(
    data: DataDir, catalog: Catalog, store: BaseStore, snapshot_id: str, swap_guard: Any = None
) -> int:
    """Rewrite a snapshot's indexes without the items it holds that were deleted, or whose
    vector was replaced, after it was made (a rollback serves the new vector from a delta
    anyway); returns how many rows went. The head is kept; the kept items are projected
    again from their base vectors, which are the ones the snapshot was built from."""
    folder = data.snapshots / snapshot_id
    manifest = Manifest.read(folder)
    keep: dict[str, list[tuple[str, int, int, int]]] = {}
    dropped = 0
    with store.lock():
        for modality in MODALITIES:
            ids = np.load(folder / f"{modality}.ids.npy", allow_pickle=False).tolist()
            live = {row[0]: row for row in catalog.embedded(modality)}
            seq = manifest.catalog_seq
            kept = [live[i] for i in ids if i in live and (seq is None or live[i][3] <= seq)]
            if len(kept) != len(ids):
                keep[modality] = kept
                dropped += len(ids) - len(kept)
        if not keep:
            return 0
        vectors = {m: store.load_rows(m, rows) for m, rows in keep.items()}
    head = load_head(folder)
    rewrite = folder / REWRITE
    shutil.rmtree(rewrite, ignore_errors=True)
    rewrite.mkdir()
    counts = dict(manifest.counts)
    chosen = dict(manifest.index)
    for modality, base in vectors.items():
        projected = head.project(modality, base.array) if len(base) else np.zeros((0, head.dim_out), np.float32)
        # the same kind of index (an erasure is no time to change it), tuned again
        index, choice = build_index(projected, manifest.modality_factory(modality))
        faiss.write_index(index, str(rewrite / f"{modality}.faiss"))
        atomic_save_npy(rewrite / f"{modality}.ids.npy", np.asarray(base.ids, dtype=str))
        counts[modality] = len(base)
        if modality in chosen:
            chosen[modality] = {**chosen[modality], "params": choice["params"]}
    manifest.counts = counts
    if chosen:
        manifest.index = chosen
        manifest.metrics = {**manifest.metrics, "index": chosen}
    manifest.write(rewrite)
    (rewrite / COMMIT).touch()
    fsync_dir(rewrite)
    # readers of this folder (a load in this process, a backup in another) wait for the swap
    with swap_guard or contextlib.nullcontext(), store.lock():
        _finish_rewrite(folder)
    catalog.record_snapshot(manifest)
    return dropped


def _finish_rewrite(folder: Path) -> None:
    """Move a committed rewrite's files over the snapshot's (idempotent: a crash midway is
    finished by running it again)."""
    rewrite = folder / REWRITE
    for path in sorted(rewrite.iterdir()):
        if path.name != COMMIT and not path.name.endswith(".tmp"):
            os.replace(path, folder / path.name)
    fsync_dir(folder)
    shutil.rmtree(rewrite)
    fsync_dir(folder)


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


def build_index(
    vectors: np.ndarray,
    factory: str = DEFAULT_FACTORY,
    *,
    memory_budget: int | None = None,
    queries: np.ndarray | None = None,
    flat_max: int | None = None,
) -> tuple[faiss.Index, dict[str, Any]]:
    """An inner-product FAISS index over normalised vectors (cosine similarity), and what
    was chosen.

    Args:
        factory: ``auto`` (:func:`ann.choose_factory` by item count and ``memory_budget``)
            or any FAISS factory string.
        memory_budget: bytes the index may take, for ``auto``.
        queries: held-out queries to tune the search parameters on (default: noisy
            copies of sampled rows).
        flat_max: the item count up to which ``auto`` keeps Flat (default: the measured
            crossover for the dimension).

    Returns:
        (index with the tuned parameters as its defaults, ``{"requested", "factory",
        "reason", "params"}``); params: :func:`ann.tune`'s, {} for an exact index.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if factory.strip().lower() == ann.AUTO:
        resolved, reason = ann.choose_factory(n, dim, memory_budget, flat_max=flat_max)
    else:
        resolved, reason = factory, "asked for with --factory"
    index = ann.new_index(dim, resolved)
    if not index.is_trained:
        ann.train(index, _training_rows(vectors, resolved), resolved)
    index.add(vectors)
    ann.prepare(index)
    params = ann.tune(index, vectors, queries) if n else {}
    ann.apply_parameters(index, params)
    return index, {"requested": factory, "factory": resolved, "reason": reason, "params": params}


def _training_rows(vectors: np.ndarray, factory: str) -> np.ndarray:
    """All rows, or a random sample when there are many (k-means and PQ need no more)."""
    lists = re.search(r"IVF(\d+)", factory)
    cap = max(TRAIN_ROWS, 40 * int(lists.group(1))) if lists else TRAIN_ROWS
    if len(vectors) <= cap:
        return vectors
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), size=cap, replace=False))
    return np.ascontiguousarray(vectors[rows])


def read_index(path: Path, *, mmap: bool = False, factory: str = "") -> faiss.Index:
    """Read an index file; ``mmap`` maps it read-only instead (pages shared between
    processes, faster start): the inverted lists of IVF indexes (``factory`` says which),
    the codes of flat and HNSW ones. A file that cannot be mapped is read, with a log line."""
    if mmap:
        flags = faiss.IO_FLAG_READ_ONLY | (faiss.IO_FLAG_MMAP if "IVF" in factory else faiss.IO_FLAG_MMAP_IFC)
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            log.info("%s cannot be memory-mapped (%s): reading it", path.name, str(exc).splitlines()[0][:200])
    return faiss.read_index(str(path))


def write_snapshot(
    data: DataDir,
    catalog: Catalog,
    store: BaseStore,
    head: Head,
    *,
    encoder: str,
    factory: str = DEFAULT_FACTORY,
    memory_budget: int | None = None,
    parent_id: str | None = None,
    metrics: dict | None = None,
    make_current: bool = True,
    reuse_indexes_from: str | None = None,
    vectors: Vectors | None = None,
) -> Manifest:
    """Project every base vector with ``head``, build the indexes and write a snapshot.

    Args:
        factory: ``auto`` (the default: Flat up to the crossover, an ANN index beyond it,
            within ``memory_budget`` bytes; see ann.py) or a FAISS factory string. The
            choice, its reason and the tuned search parameters go into the manifest
            (``index``, and ``metrics["index"]`` for GetStatus) and one log line each.
        reuse_indexes_from: id of a snapshot whose index files are still right for
            ``head`` (a query-side refit): they are hard-linked, not rebuilt, and nothing
            is re-projected.
        vectors: the base vectors, when the caller has loaded them already.

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
        tmp.mkdir()
        head_hash = head.save(tmp)
        if reuse_indexes_from is not None:
            parent = _link_indexes(data.snapshots / reuse_indexes_from, tmp)
            built, counts, seq = parent.faiss_factory, dict(parent.counts), parent.catalog_seq
            factory, memory_budget, chosen = parent.requested_factory, parent.memory_budget, parent.index
        else:
            vectors = vectors or load_vectors(store)
            counts, chosen = _build_indexes(tmp, head, vectors, factory, memory_budget)
            built = _summary(chosen)
            seq = max(v.max_seq for v in vectors.values())
        manifest = Manifest(
            id=snapshot_id,
            parent_id=parent_id,
            encoder=encoder,
            base_dim=head.dim_in,
            dim=head.dim_out,
            head={"kind": head.kind, "sha256": head_hash, **head.config},
            faiss_factory=built,
            factory_requested=factory,
            memory_budget=memory_budget,
            index=chosen,
            counts=counts,
            metrics={**(metrics or {}), **({"index": chosen} if chosen else {})},
            indexes_from=reuse_indexes_from,
            catalog_seq=seq,
        )
        manifest.write(tmp)
        fsync_dir(tmp)
        os.replace(tmp, data.snapshots / snapshot_id)
        fsync_dir(data.snapshots)
    finally:
        lock.close()
        lock_path.unlink(missing_ok=True)
    catalog.record_snapshot(manifest)
    if make_current:
        data.set_current(snapshot_id)
    return manifest


def _link_indexes(source: Path, tmp: Path) -> Manifest:
    """Hard-link a snapshot's index files (immutable: a link is a free copy); returns its manifest."""
    parent = Manifest.read(source)
    for modality in MODALITIES:
        for name in (f"{modality}.faiss", f"{modality}.ids.npy"):
            os.link(source / name, tmp / name)
    return parent


def _build_indexes(
    tmp: Path, head: Head, vectors: Vectors, factory: str, memory_budget: int | None
) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Project each modality's base vectors and write its index and id map; returns the
    counts and each modality's index choice."""
    projected = {
        modality: head.project(modality, vectors[modality].array)
        if len(vectors[modality])
        else np.zeros((0, head.dim_out), np.float32)
        for modality in MODALITIES
    }
    counts, chosen = {}, {}
    for modality in MODALITIES:
        base = vectors[modality]
        others = [projected[m] for m in MODALITIES if m != modality and len(projected[m])]
        queries = _tuning_queries(projected[modality], np.concatenate(others) if others else None)
        index, choice = build_index(projected[modality], factory, memory_budget=memory_budget, queries=queries)
        log.info("%s index: %s", modality, ann.describe(choice))
        faiss.write_index(index, str(tmp / f"{modality}.faiss"))
        atomic_save_npy(tmp / f"{modality}.ids.npy", np.asarray(base.ids, dtype=str))
        counts[modality], chosen[modality] = len(base), choice
    return counts, chosen


def _tuning_queries(vectors: np.ndarray, other: np.ndarray | None, count: int = ann.TUNE_QUERIES) -> np.ndarray | None:
    """Held-out queries for one modality's index: half of them the other modality's
    vectors (the cross-modal searches it serves), half noisy copies of its own rows (item
    to item); None when it is empty."""
    if not len(vectors):
        return None
    own = ann.held_out_queries(vectors, count if other is None else count // 2)
    if other is None:
        return own
    rows = np.random.default_rng(1).choice(len(other), size=min(count - len(own), len(other)), replace=False)
    return np.ascontiguousarray(np.concatenate([own, other[np.sort(rows)]]), dtype=np.float32)


def _summary(chosen: dict[str, dict[str, Any]]) -> str:
    """One factory string for the manifest: the shared one, or ``image=.. text=..``."""
    factories = {modality: choice["factory"] for modality, choice in chosen.items()}
    if len(set(factories.values())) == 1:
        return next(iter(factories.values()))
    return " ".join(f"{modality}={factory}" for modality, factory in factories.items())


KEEP_SNAPSHOTS = 10  # snapshots kept for rollback, by default


def prune_snapshots(data: DataDir, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest snapshots; the one CURRENT names always stays."""
    if keep < 1:
        raise InvalidArgument(f"keep at least 1 snapshot, got {keep}")
    current = data.current_id()
    ids = data.snapshot_ids()  # ids sort by creation time
    doomed = [i for i in ids[:-keep] if i != current]
    for snapshot_id in doomed:
        shutil.rmtree(data.snapshots / snapshot_id)
    return doomed


class ModalityIndex:
    """One modality's FAISS index with its row -> id map (and the reverse)."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, tuned: dict[str, Any] | None = None):
        """``tuned``: the search parameters tuned at build time (the manifest's
        ``index[modality]["params"]``); they become the index's defaults."""
        if index.ntotal != len(ids):
            raise FailedPrecondition(
                f"index holds {index.ntotal} vectors but its id map {len(ids)}: snapshot is corrupt"
            )
        self.index = index
        self.ids = ids
        self.rows = {item_id: row for row, item_id in enumerate(ids.tolist())}
        self.tuned = dict(tuned or {})
        self.family = ann.family(index)
        self._typed = ann.needs_typed_params(index)
        ann.prepare(index)  # IVF indexes of older snapshots: reconstruct needs a direct map
        ann.apply_parameters(index, self.tuned)

    def params(self, sel: faiss.IDSelector | None = None) -> faiss.SearchParameters | None:
        """Per-call search parameters of the type this index needs (SearchParametersHNSW,
        SearchParametersIVF, nested for refine and pre-transform layers) with the tuned
        values and the IDSelector ``sel`` (rows to consider; the caller keeps it alive).
        None for an exact index without a selector."""
        return ann.search_parameters(self.index, self.tuned, sel)

    def __len__(self) -> int:
        return self.index.ntotal

    def vector(self, item_id: str) -> np.ndarray | None:
        row = self.rows.get(item_id)
        return None if row is None else np.asarray(self.index.reconstruct(row))

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) for a batch of queries; rows are -1 past the end.

        Args:
            params: faiss SearchParameters, per call: from :meth:`params`, or plain ones
                carrying an IDSelector, which are turned into the typed ones this index
                needs (with the tuned values).
        """
        xq = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, max(1, self.index.ntotal))
        if params is None:
            return self.index.search(xq, k)
        if type(params) is faiss.SearchParameters and self._typed:
            typed = self.params(params.sel)
            return self.index.search(xq, k, params=typed)
        return self.index.search(xq, k, params=params)


class Snapshot:
    """A loaded, immutable snapshot. The server swaps whole Snapshot objects."""

    def __init__(self, folder: str | Path, *, mmap: bool = False):
        """``mmap``: memory-map the index files read-only (see :func:`read_index`)."""
        self.folder = Path(folder)
        self.manifest = Manifest.read(self.folder)
        self.id = self.manifest.id
        self.head = load_head(self.folder)
        if self.head.digest() != self.manifest.head_hash:
            raise FailedPrecondition(f"snapshot {self.id}: head does not match the manifest's hash")
        self.indexes = {
            modality: ModalityIndex(
                read_index(
                    self.folder / f"{modality}.faiss", mmap=mmap, factory=self.manifest.modality_factory(modality)
                ),
                np.load(self.folder / f"{modality}.ids.npy", allow_pickle=False),
                self.manifest.search_params(modality),
            )
            for modality in MODALITIES
        }

    @property
    def encoder(self) -> str:
        return self.manifest.encoder

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
