"""Compaction: fold the live corpus's deltas and tombstones into a new snapshot, and erase.

A compaction writes a new snapshot with the live head from the catalog as it is (every
item upserted since the live snapshot is projected into it, every deleted one is left
out), makes it CURRENT and swaps it in, searches running on. Then it erases what deleted
items left behind:

- base shard rows no item uses any more (deleted or replaced items) are dropped;
- every retained snapshot is rewritten without the items deleted (or replaced) since it
  was made, so a rollback finds no copy of them (:func:`~xmodal.indexer.snapshot.erase_from_snapshot`);
- image files under ``blobs/`` no item uses are removed (found without a lock, then
  checked again and unlinked under the write lock: an archive's walk never holds up upserts);
- feedback events that still name a deleted item are removed;
- the tombstones of the erased items are dropped (nothing holds them any more), and the
  catalog's WAL is checkpointed and truncated (with ``secure_delete`` on, deleted rows
  leave zeros in the database file).

It runs on demand (``xmodal compact``, the admin RPC ``Compact``), for every purge, and in
the background when the deltas or the deleted items pass a size, or the oldest change an age
(:class:`CompactionPolicy`). One snapshot writer runs at a time: a compaction waits for a
refit in progress, and the other way round.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.encoder import Encoder
from xmodal.indexer.errors import InvalidArgument
from xmodal.indexer.feedback import FeedbackLog
from xmodal.indexer.heads import Head
from xmodal.indexer.snapshot import DataDir, erase_from_snapshot, prune_snapshots, write_snapshot
from xmodal.indexer.store import BaseStore
from xmodal.indexer.vectors import load_vectors

from .live import LiveView

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompactionPolicy:
    """When the server compacts on its own (None turns a trigger off)."""

    max_delta_items: int = 10_000  # items served from deltas beside the snapshot (0: never)
    max_deleted: int = 10_000  # deleted or replaced items hidden from the snapshot (0: never)
    max_age_s: float = 3600.0  # age in seconds of the oldest change not yet compacted (0: never)
    check_every_s: float = 5.0

    def __post_init__(self):
        for name in ("max_delta_items", "max_deleted"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be a whole number, 0 or more, got {value!r}")
        if not self.max_age_s >= 0:
            raise InvalidArgument(f"max_age_s must be 0 or more seconds, got {self.max_age_s!r}")
        if not self.check_every_s > 0:
            raise InvalidArgument(f"check_every_s must be positive, got {self.check_every_s!r}")


@dataclass
class CompactionReport:
    snapshot_id: str
    folded_items: int  # items that were served from deltas
    hidden_items: int  # deleted or replaced items that were hidden from the old snapshot
    erased_items: int  # tombstones dropped: deleted items of which no copy is left
    dropped_base_rows: int
    rewritten_snapshots: int
    removed_blobs: int
    forgotten_feedback: int
    seconds: float


class Compactor:
    """Compactions for one data directory served by one process."""

    def __init__(
        self, data: DataDir, catalog: Catalog, store: BaseStore, encoder: Encoder, view: LiveView, keep_snapshots: int
    ):
        self.data, self.catalog, self.store, self.encoder, self.view = data, catalog, store, encoder, view
        self.keep_snapshots = keep_snapshots
        self.policy = CompactionPolicy()
        self.last: CompactionReport | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- the first snapshot of an empty data directory ------------------------------------
    def first_snapshot(self) -> None:
        """Write a snapshot with an identity (zero-shot) head over whatever is embedded,
        when the data directory has none yet, so that it serves and takes upserts."""
        with self.view.snapshot_writes:
            if self.view.peek() is not None or self.view.load_current():
                return
            self.catalog.bind_encoder(
                self.encoder.identity, model=self.encoder.spec.requested[0], pretrained=self.encoder.spec.requested[1]
            )
            with self.store.lock():
                vectors = load_vectors(self.store)
            manifest = write_snapshot(
                self.data,
                self.catalog,
                self.store,
                Head("identity", self.encoder.dim),
                encoder=self.encoder.identity,
                metrics={"first": "identity head until there are pairs to fit one"},
                vectors=vectors,
            )
            self.view.load_current()
            log.info("no snapshot yet: wrote %s with an identity head to serve and take upserts", manifest.id)

    # -- compaction -----------------------------------------------------------------------
    def compact(self, reason: str = "requested") -> CompactionReport:
        """Fold deltas and deletions into a new live snapshot, then erase (see the module).

        Raises:
            FailedPrecondition: the catalog's WAL stayed busy (the snapshot is written; the
                next compaction truncates it).
        """
        if self.view.peek() is None:
            self.first_snapshot()
        started = time.perf_counter()
        with self.view.snapshot_writes:
            state = self.view.state()
            live = state.snapshot
            with self.store.lock():  # the catalog and the shards as of one moment
                seq = self._catalog_seq()
                vectors = load_vectors(self.store)
            manifest = write_snapshot(
                self.data,
                self.catalog,
                self.store,
                live.head,
                encoder=live.encoder,
                factory=live.manifest.requested_factory,
                memory_budget=live.manifest.memory_budget,
                parent_id=live.id,
                metrics={**live.manifest.metrics, "compaction": {"reason": reason}},
                make_current=False,
                vectors=vectors,
            )
            with self.view.write_lock:
                self.data.set_current(manifest.id)
                self.view.load_current()
            prune_snapshots(self.data, self.keep_snapshots)
            report = CompactionReport(
                snapshot_id=manifest.id,
                folded_items=sum(len(d) for d in state.deltas.values()),
                hidden_items=len(state.hidden),
                seconds=0.0,
                **self._erase(seq),
            )
        report.seconds = time.perf_counter() - started
        self.last = report
        log.info(
            "compacted (%s) into %s in %.1f s: %d delta items folded, %d deleted items erased",
            reason,
            manifest.id,
            report.seconds,
            report.folded_items,
            report.erased_items,
        )
        return report

    def _catalog_seq(self) -> int:
        value = self.catalog.get_meta("seq")
        return int(value) if value is not None else 0

    def _erase(self, seq: int) -> dict[str, int]:
        """What deleted items left behind, everywhere (the new live snapshot has none of it)."""
        from .corpus import TOMBSTONES

        dropped = self.store.drop_dead_rows()
        current = self.data.current_id()
        rewritten = [
            snapshot_id
            for snapshot_id in self.data.snapshot_ids()
            if snapshot_id != current
            and erase_from_snapshot(self.data, self.catalog, self.store, snapshot_id, self.view.write_lock)
        ]
        unused = self.unused_blobs()  # the walk of blobs/ holds no lock: upserts go on
        with self.view.write_lock:  # no upsert writes a blob or reloads meanwhile
            removed_blobs = self.remove_blobs(unused)
            live = self.view.snapshot
            if live is not None and live.id in rewritten:  # a rollback made it live meanwhile
                self.view.load_snapshot(live.id, force=True)
            self.catalog.ensure_schema(TOMBSTONES)
            with self.catalog.tx() as db:
                erased = db.execute("DELETE FROM tombstones WHERE seq <= ?", (seq,)).rowcount
                forgotten = FeedbackLog.forget_unknown(db)
        self.catalog.checkpoint()
        return {
            "erased_items": erased,
            "dropped_base_rows": sum(dropped.values()),
            "rewritten_snapshots": len(rewritten),
            "removed_blobs": removed_blobs,
            "forgotten_feedback": forgotten,
        }

    def unused_blobs(self) -> list[str]:
        """Image files under blobs/ that no catalog row names now (paths relative to the
        data directory). Read without a lock: an upsert may name one again before
        :meth:`remove_blobs` runs, which checks again."""
        folder = self.data.root / "blobs"
        if not folder.is_dir():
            return []
        used = {r[0] for r in self.catalog.db().execute("SELECT blob FROM items WHERE blob IS NOT NULL")}
        found = (p.relative_to(self.data.root).as_posix() for p in folder.rglob("*") if p.is_file())
        return [path for path in found if path not in used]  # a write's temporary file too: gone or debris later

    def remove_blobs(self, candidates: list[str]) -> int:
        """Unlink the candidates no catalog row names; the caller holds the write lock, so no
        upsert writes or names a blob meanwhile. Blobs are content-addressed: an upsert of
        the same image bytes after :meth:`unused_blobs` names the same file, and keeps it. A
        temporary file seen mid-write was renamed since (missing here) or is debris."""
        db = self.catalog.db()
        named: set[str] = set()
        for start in range(0, len(candidates), 500):
            chunk = candidates[start : start + 500]
            marks = ",".join("?" * len(chunk))
            named.update(r[0] for r in db.execute(f"SELECT blob FROM items WHERE blob IN ({marks})", chunk))
        removed = 0
        for path in candidates:
            if path not in named:
                try:
                    (self.data.root / path).unlink()
                    removed += 1
                except FileNotFoundError:  # a temporary file renamed since
                    pass
        return removed

    # -- in the background -----------------------------------------------------------------
    def due(self) -> str | None:
        """Why a compaction is due now, or None."""
        state, policy = self.view.peek(), self.policy
        if state is None or self.view.dirty_since is None:
            return None
        in_deltas = sum(len(d) for d in state.deltas.values())
        if policy.max_delta_items and in_deltas >= policy.max_delta_items:
            return f"{in_deltas} items in deltas"
        if policy.max_deleted and len(state.hidden) >= policy.max_deleted:
            return f"{len(state.hidden)} deleted or replaced items"
        age = time.time() - self.view.dirty_since
        if policy.max_age_s and age >= policy.max_age_s:
            return f"changes {age:.0f} s old"
        return None

    def schedule(self, policy: CompactionPolicy) -> None:
        """Compact in a background thread whenever :meth:`due`."""
        self.policy = policy

        def loop() -> None:
            while not self._stop.wait(policy.check_every_s):
                try:
                    reason = self.due()
                    if reason:
                        self.compact(reason)
                except Exception:  # noqa: BLE001 - keep serving; the next check tries again
                    log.exception("background compaction failed; the live snapshot stays")

        self._thread = threading.Thread(target=loop, name="xmodal-compaction", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


__all__ = ["CompactionPolicy", "CompactionReport", "Compactor"]
