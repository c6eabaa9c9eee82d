"""The live view's lifecycle: load the snapshot CURRENT names, watch it, swap it in; and
the live corpus beside it.

A search reads :meth:`LiveView.state` once and uses only that :class:`LiveState`: a
snapshot, a delta per modality (items written after the snapshot was built: upserts,
projected with its head, in a flat index) and the ids the snapshot must not return
(deleted, or replaced by a newer vector in a delta; passed to FAISS as an IDSelector).
Every change swaps one reference, so a search never mixes two states and never waits.
The deltas are rebuilt from the catalog and the base store when a snapshot is loaded
(after a restart, a refit or a rollback): what is durable is the catalog, not the delta.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.corpus import MODALITIES
from xmodal.indexer.encoder import Encoder
from xmodal.indexer.errors import FailedPrecondition
from xmodal.indexer.snapshot import DataDir, Snapshot
from xmodal.indexer.store import BaseStore

log = logging.getLogger(__name__)


class DeltaIndex:
    """One modality's items written after the snapshot (upserts), projected with its head,
    in a flat inner-product index."""

    def __init__(self, ids: list[str], vectors: np.ndarray):
        self.ids = list(ids)
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.rows = {item_id: row for row, item_id in enumerate(self.ids)}
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        if len(self.ids):
            self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.ids)

    def replaced(self, ids: list[str], vectors: np.ndarray | None) -> DeltaIndex:
        """A new delta without ``ids``, plus ``vectors`` for them when given (upserts)."""
        gone = set(ids)
        keep = [row for row, item_id in enumerate(self.ids) if item_id not in gone]
        new_ids = [self.ids[r] for r in keep]
        new_vectors = self.vectors[keep]
        if vectors is not None and len(ids):
            new_ids += list(ids)
            new_vectors = np.concatenate([new_vectors, np.asarray(vectors, np.float32)])
        return DeltaIndex(new_ids, new_vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not len(self.ids):
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.ids)))


@dataclass(frozen=True)
class LiveState:
    """What one search reads: a snapshot, the deltas beside it, and the ids it must not
    return from the snapshot (deleted, or replaced by a newer vector in a delta)."""

    snapshot: Snapshot
    deltas: dict[str, DeltaIndex]
    hidden: frozenset[str]
    selectors: dict[str, Excluding | None] = field(default_factory=dict)  # per modality; None: skip nothing
    hidden_rows: dict[str, np.ndarray] = field(default_factory=dict)  # per modality, the snapshot rows hidden

    @classmethod
    def build(cls, snapshot: Snapshot, deltas: dict[str, DeltaIndex], hidden: frozenset[str]) -> LiveState:
        selectors, hidden_rows = {}, {}
        for modality, index in snapshot.indexes.items():
            rows = np.asarray(sorted(index.rows[i] for i in hidden if i in index.rows), np.int64)
            selectors[modality] = Excluding.rows(rows, index) if len(rows) else None
            hidden_rows[modality] = rows
        return cls(snapshot, deltas, hidden, selectors, hidden_rows)

    def find(self, item_id: str) -> tuple[str, np.ndarray] | None:
        """(modality, adapted vector) of a live item, or None."""
        for modality, delta in self.deltas.items():
            row = delta.rows.get(item_id)
            if row is not None:
                return modality, delta.vectors[row]
        if item_id in self.hidden:
            return None
        return self.snapshot.find(item_id)

    def count(self, modality: str) -> int:
        index = self.snapshot.indexes[modality]
        hidden = sum(1 for i in self.hidden if i in index.rows)
        return len(index) - hidden + len(self.deltas[modality])


@dataclass(frozen=True)
class Excluding:
    """FAISS search parameters whose IDSelector skips some rows of an index."""

    params: Any
    owners: tuple  # faiss keeps raw pointers: these keep the rows and selectors alive

    @classmethod
    def rows(cls, rows: np.ndarray, index: Any = None) -> Excluding:
        """Skip ``rows``; the parameters are of ``index``'s own kind (ModalityIndex.params)
        when it has one, as HNSW and IVF indexes refuse generic ones."""
        batch = faiss.IDSelectorBatch(rows)
        selector = faiss.IDSelectorNot(batch)
        return cls(search_parameters(index, selector), (rows, batch, selector))


def search_parameters(index: Any, selector: Any) -> Any:
    """FAISS search parameters with ``selector``, of the kind ``index`` (a ModalityIndex)
    takes, carrying its tuned settings."""
    make = getattr(index, "params", None)
    params = make(selector) if make is not None else None
    if params is None:  # an index without tuned settings: its own kind, its own defaults
        inner = getattr(index, "index", index)
        hnsw = _downcast(inner, faiss.IndexHNSW)
        ivf = faiss.try_extract_index_ivf(inner) if inner is not None else None
        if hnsw is not None:
            params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
            params.efSearch = hnsw.hnsw.efSearch
        elif ivf is not None:
            params = faiss.SearchParametersIVF()
            params.nprobe = ivf.nprobe
        else:
            params = faiss.SearchParameters()
        params.sel = selector
    return params


def _downcast(index: Any, kind: type) -> Any:
    if index is None:
        return None
    try:
        index = faiss.downcast_index(index)
    except Exception:  # noqa: BLE001 - not a faiss index
        return None
    return index if isinstance(index, kind) else None


class LiveView:
    """The snapshot one server answers from, swapped by one reference assignment."""

    def __init__(self, data: DataDir, encoder: Encoder, catalog: Catalog, store: BaseStore, *, mmap: bool = False):
        self.data = data
        self.mmap = mmap  # memory-map the snapshots' index files (xmodal serve --mmap)
        self.encoder = encoder
        self.catalog = catalog
        self.store = store
        self._state: LiveState | None = None
        self._swap_lock = threading.Lock()
        # Held by corpus writes from their catalog read to their view update, and by every
        # load (catalog read to swap): a load never misses a write acknowledged meanwhile.
        self.write_lock = threading.RLock()
        # One snapshot writer at a time: refits and compactions (and purges, which compact).
        self.snapshot_writes = threading.Lock()
        self.dirty_since: float | None = None  # when the live state first differed from its snapshot
        self._listeners: list[Callable[[Snapshot | None], None]] = []
        self._watcher: threading.Thread | None = None
        self._stop = threading.Event()

    @property
    def snapshot(self) -> Snapshot | None:
        state = self._state
        return state.snapshot if state is not None else None

    def live(self) -> Snapshot:
        """The live snapshot.

        Raises:
            FailedPrecondition: none is loaded yet.
        """
        return self.state().snapshot

    def peek(self) -> LiveState | None:
        """The live state, or None while no snapshot is loaded."""
        return self._state

    def state(self) -> LiveState:
        """The live state (read it once per search).

        Raises:
            FailedPrecondition: no snapshot is loaded yet.
        """
        state = self._state
        if state is None:
            raise FailedPrecondition(
                "no snapshot is loaded: index a corpus into the server's data directory "
                "(`xmodal index CORPUS --data DIR`); the server picks it up without a restart"
            )
        return state

    def on_swap(self, listener: Callable[[Snapshot | None], None]) -> None:
        """Call ``listener(snapshot)`` after every swap (health status, metrics)."""
        self._listeners.append(listener)
        listener(self.snapshot)

    def clean_debris(self) -> list[Path]:
        """Remove what interrupted writes left: unfinished snapshots and erasures, shards
        no catalog row names, half-written image files; log what was removed."""
        removed = self.data.clean() + self.store.clean()
        blobs = self.data.root / "blobs"
        if blobs.is_dir():
            with self.write_lock:
                for path in blobs.rglob(".*.tmp"):
                    path.unlink()
                    removed.append(path)
        for path in removed:
            log.warning("removed debris of an unfinished write: %s", path.name)
        return removed

    def load_current(self) -> bool:
        """Load the snapshot CURRENT names if it is not the live one; True on a swap.

        Raises:
            FailedPrecondition: the snapshot was built with another encoder.
        """
        wanted = self.data.current_id()
        current = self.snapshot
        if wanted is None or (current is not None and current.id == wanted):
            return False
        return self.load_snapshot(wanted)

    def load_snapshot(self, snapshot_id: str, *, force: bool = False) -> bool:
        """Make ``snapshot_id`` the live snapshot (CURRENT is not touched); ``force`` loads
        it again when it is live already (its files were rewritten by an erasure).

        Raises:
            NotFound: no such snapshot. FailedPrecondition: built with another encoder.
        """
        with self.write_lock, self._swap_lock:
            current = self.snapshot
            if current is not None and current.id == snapshot_id and not force:
                return False
            snapshot = self.open_snapshot(snapshot_id)
            state = self._catch_up(snapshot)
            self._state = state  # the swap: one reference assignment
            self.dirty_since = time.time() if state.hidden or any(len(d) for d in state.deltas.values()) else None
            log.info("live snapshot is now %s (%s head, %s)", snapshot.id, snapshot.head.kind, snapshot.manifest.counts)
        for listener in self._listeners:
            listener(snapshot)
        return True

    def open_snapshot(self, snapshot_id: str) -> Snapshot:
        """Load a snapshot and check that this server can serve it (without swapping).

        Raises:
            NotFound: no such snapshot. FailedPrecondition: another encoder or dimension.
        """
        snapshot = Snapshot(self.data.snapshots / snapshot_id, mmap=self.mmap)
        if snapshot.encoder != self.encoder.identity:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} was built with encoder {snapshot.encoder}, but this server runs "
                f"{self.encoder.identity}: start the server with the model the data directory was indexed with"
            )
        if snapshot.manifest.base_dim != self.encoder.dim:
            raise FailedPrecondition(
                f"snapshot {snapshot_id} expects {snapshot.manifest.base_dim}-d base "
                f"vectors, the encoder makes {self.encoder.dim}-d"
            )
        return snapshot

    def _catch_up(self, snapshot: Snapshot) -> LiveState:
        """The state of ``snapshot`` with the catalog as it is now: items written after it
        in deltas, deleted ones hidden."""
        from .corpus import tombstoned  # the corpus writes own the tombstones table

        deltas = {}
        replaced: set[str] = set()
        for modality in MODALITIES:
            index = snapshot.indexes[modality]
            after = snapshot.manifest.catalog_seq
            with self.store.lock():
                rows = self.catalog.embedded(modality, after if after is not None else -1)
                if snapshot.manifest.catalog_seq is None:  # made before the live corpus: what it lacks
                    rows = [r for r in rows if r[0] not in index.rows]
                base = self.store.load_rows(modality, rows)
            projected = (
                snapshot.head.project(modality, base.array)
                if len(base)
                else np.zeros((0, snapshot.head.dim_out), np.float32)
            )
            deltas[modality] = DeltaIndex(base.ids, projected)
            replaced.update(i for i in base.ids if i in index.rows)
        deleted = {i for i in tombstoned(self.catalog) if any(i in index.rows for index in snapshot.indexes.values())}
        return LiveState.build(snapshot, deltas, frozenset(replaced | deleted))

    def apply_upsert(self, written: dict[str, tuple[list[str], np.ndarray]]) -> None:
        """Serve newly written items (base vectors by modality) from the deltas."""
        with self._swap_lock:
            state = self.state()
            deltas = dict(state.deltas)
            hidden = set(state.hidden) - {i for ids, _ in written.values() for i in ids}
            for modality, (ids, base) in written.items():
                if not ids:
                    continue
                projected = state.snapshot.head.project(modality, base)
                deltas[modality] = deltas[modality].replaced(ids, projected)
                other = [m for m in deltas if m != modality]
                for m in other:  # an id that changed modality leaves the other delta
                    deltas[m] = deltas[m].replaced(ids, None)
                hidden |= {
                    i
                    for i in ids
                    if i in state.snapshot.indexes[modality].rows
                    or any(i in state.snapshot.indexes[m].rows for m in other)
                }
            self._state = LiveState.build(state.snapshot, deltas, frozenset(hidden))
            self.dirty_since = self.dirty_since or time.time()

    def apply_delete(self, item_ids: list[str]) -> None:
        """Stop serving deleted items, from the deltas and from the snapshot."""
        if not item_ids:
            return
        with self._swap_lock:
            state = self.state()
            deltas = {m: d.replaced(item_ids, None) for m, d in state.deltas.items()}
            held = {i for i in item_ids if any(i in index.rows for index in state.snapshot.indexes.values())}
            self._state = LiveState.build(state.snapshot, deltas, state.hidden | held)
            self.dirty_since = self.dirty_since or time.time()

    def watch(self, interval: float = 2.0) -> None:
        """Poll CURRENT in a background thread and swap when it changes. Over a read-only
        catalog (a replica) also follow the primary's corpus writes: when the catalog's write
        sequence or its tombstones change, catch the live snapshot up again."""

        def loop() -> None:
            seen = self.catalog_mark() if self.catalog.read_only else None
            while not self._stop.wait(interval):
                try:
                    swapped = self.load_current()
                    if self.catalog.read_only:
                        mark = self.catalog_mark()
                        if mark != seen and not swapped and self.snapshot is not None:
                            self.load_snapshot(self.snapshot.id, force=True)
                        seen = mark
                except Exception:  # noqa: BLE001 - keep serving the old snapshot, say why
                    log.exception("could not load the snapshot CURRENT names; still serving the previous one")

        self._watcher = threading.Thread(target=loop, name="xmodal-snapshot-watch", daemon=True)
        self._watcher.start()

    def catalog_mark(self) -> tuple:
        """What changes with every corpus write of the primary: the catalog's write sequence
        and its tombstones (deletes, and the erasures that drop them)."""
        db = self.catalog.db()
        seq = db.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        tombs = (
            tuple(db.execute("SELECT COUNT(*), MAX(seq) FROM tombstones").fetchone())
            if self.catalog.has_table("tombstones")
            else ()
        )
        return (seq[0] if seq else None, tombs)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
