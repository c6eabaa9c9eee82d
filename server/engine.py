"""The search engine: plain logic behind the gRPC servicers (no transport here).

It composes one small class per job over one data directory:

- :class:`~.live.LiveView`: the live state's lifecycle (load, watch, swap; deltas, hidden ids);
- :class:`~.query.QueryPath`: the read path (encode, search, merge, hits, item lookup);
- :class:`~.intake.FeedbackIntake`: feedback events from clients;
- :class:`~.corpus.CorpusWrites`: the live corpus (UpsertItems, DeleteItems);
- :class:`~.compaction.Compactor`: folds deltas and deletions into snapshots, and erases.

The servicers use those parts; the few methods here are the shortcuts the CLI, the
benchmarks and the tests call.
"""

from __future__ import annotations

import time
from pathlib import Path

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.corpus import MODALITIES
from xmodal.indexer.encoder import Encoder, QueryEncoder
from xmodal.indexer.errors import FailedPrecondition
from xmodal.indexer.snapshot import KEEP_SNAPSHOTS, DataDir, Snapshot
from xmodal.indexer.store import BaseStore

from .batcher import QueryEncoding
from .compaction import Compactor
from .config import version
from .corpus import CorpusWrites
from .intake import FeedbackIntake
from .limits import Limits
from .live import LiveView
from .masked import SEARCH_THREADS
from .query import Hit, ItemRecord, QueryPath, SearchResult


class SearchEngine:
    """One data directory served: its catalog, base store, live view, read path and intake."""

    def __init__(
        self,
        data_dir: str | Path,
        encoder: Encoder,
        *,
        limits: Limits | None = None,
        keep_snapshots: int = KEEP_SNAPSHOTS,
        mmap: bool = False,
        read_only: bool = False,
        primary: str = "",
        query_encoder: QueryEncoder | None = None,
        encoding: QueryEncoding | None = None,
        search_threads: int | None = SEARCH_THREADS,
    ):
        """``query_encoder`` (default ``encoder``) encodes search and feedback queries: a faster
        runtime checked against ``encoder``, which makes every corpus vector; ``encoding``
        sets the query micro-batching and the query embedding cache; ``search_threads`` is
        the OpenMP threads FAISS may use for one search (None: its default, one per core)."""
        self.data = DataDir(data_dir)
        self.read_only, self.primary = read_only, primary
        if not read_only:
            self.data.create()
        self.encoder = encoder
        self.limits = limits or Limits()
        self.catalog = Catalog(self.data.catalog_path, read_only=read_only)
        self.store = BaseStore(self.data.base, self.catalog)
        self.started = time.time()
        self.view = LiveView(self.data, encoder, self.catalog, self.store, mmap=mmap)
        self.queries = QueryPath(
            self.view, query_encoder or encoder, self.catalog, self.limits, encoding=encoding or QueryEncoding()
        )
        self.queries.search_threads = search_threads
        self.intake = FeedbackIntake(self.catalog, self.store, self.queries, self.limits)
        self.corpus = CorpusWrites(self.data, self.catalog, self.store, encoder, self.view, self.limits)
        self.compactor = Compactor(self.data, self.catalog, self.store, encoder, self.view, keep_snapshots)
        self.corpus.compactor = self.compactor
        # shortcuts to the parts' main calls
        self.search = self.queries.search
        self.get_items = self.queries.get_items
        self.submit_feedback = self.intake.submit_feedback
        self.load_current = self.view.load_current
        self.load_snapshot = self.view.load_snapshot
        self.open_snapshot = self.view.open_snapshot
        self.on_swap = self.view.on_swap
        self.clean_debris = self.view.clean_debris
        self.watch = self.view.watch

    @property
    def snapshot(self) -> Snapshot | None:
        return self.view.snapshot

    def close(self) -> None:
        self.compactor.close()
        self.view.close()
        self.catalog.close_all()

    def check_writable(self, what: str) -> None:
        """Refuse a write on a read-only replica, naming the primary.

        Raises:
            FailedPrecondition: this server is a read-only replica.
        """
        if self.read_only:
            where = f"the primary at {self.primary}" if self.primary else "the primary server of this data directory"
            raise FailedPrecondition(f"this server is a read-only replica: send {what} to {where}")

    def status(self) -> dict:
        state = self.view.peek()
        snapshot = state.snapshot if state else None
        counts = self.catalog.count_items()
        return {
            "serving": snapshot is not None,
            "snapshot": snapshot.manifest if snapshot else None,
            "counts": {m: {"catalog_items": counts[m], "indexed": state.count(m) if state else 0} for m in MODALITIES},
            "version": version(),
            "uptime_s": time.time() - self.started,
            "max_k": self.limits.max_k,
            "data_dir": str(self.data.root),
            "live_corpus": self._live_corpus(state),
            "filter_fields": list(self.queries.filter_fields(state).values()) if state else [],
            "read_only": self.read_only,
            "primary": self.primary,
        }

    def _live_corpus(self, state) -> dict:
        last = self.compactor.last
        pending = (
            self.catalog.db().execute("SELECT COUNT(*) FROM tombstones").fetchone()[0]
            if self.catalog.has_table("tombstones")
            else 0
        )
        return {
            "delta_items": sum(len(d) for d in state.deltas.values()) if state else 0,
            "hidden_items": len(state.hidden) if state else 0,
            "pending_erasure": pending,
            "last_compaction_snapshot_id": last.snapshot_id if last else "",
            "last_compaction_s": last.seconds if last else 0.0,
        }


__all__ = ["Hit", "ItemRecord", "Limits", "SearchEngine", "SearchResult"]
