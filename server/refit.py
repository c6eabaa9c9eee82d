"""Refits from feedback: training data, the gate, the atomic swap, the scheduler.

A refit fits a new head on the corpus train pairs plus the train slice of the feedback
(weighted), warm-started from the live head; validates it against the live head on the
corpus val pairs and on the held-out slice of the feedback; and promotes it only if it is
not worse on either beyond ``tolerance`` (and, with ``confidence`` set, better beyond noise:
the gate's paired test, indexer/gate.py). Modes:

- ``query``: only a query-side adapter of the queries' modality is trained; the indexes of
  the live snapshot are hard-linked into the new one (nothing re-projected or rebuilt);
- ``full``: both heads are refitted; the base store is re-projected and the indexes are
  rebuilt from it (nothing is re-encoded);
- ``auto``: ``query`` unless the corpus changed since the live snapshot was built (new
  items must be projected), or ``full_every`` query refits have been stacked since the last
  full one.

At most one refit runs at a time. Promotion writes the snapshot atomically, moves CURRENT
and swaps the engine's reference; searches in flight finish on the old snapshot.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass

from xmodal.indexer.adapt import FitResult, fit_pipeline
from xmodal.indexer.corpus import MODALITIES
from xmodal.indexer.errors import FailedPrecondition, InvalidArgument
from xmodal.indexer.feedback import FeedbackLog
from xmodal.indexer.heads import TRAINABLE_KINDS
from xmodal.indexer.manifest import Manifest
from xmodal.indexer.snapshot import KEEP_SNAPSHOTS, Snapshot, prune_snapshots, write_snapshot
from xmodal.indexer.train import FitConfig
from xmodal.indexer.vectors import Vectors, load_vectors

from . import metrics
from .engine import SearchEngine
from .runs import RefitRuns

log = logging.getLogger(__name__)
MODES = ("auto", "query", "full")


@dataclass(kw_only=True)
class RefitPolicy:
    """When and how the server refits its head."""

    interval_s: float | None = None  # refit every N seconds (None: not on a timer)
    after_feedback: int | None = None  # refit after M new feedback events (None: not on a count)
    mode: str = "auto"
    max_seconds: float = 600.0  # wall-time cap of the training part of a run
    tolerance: float = 0.01  # how much worse than live a new head may validate
    # None: a refit (warm-started from a live head the gate already passed) is promoted when
    # not worse beyond the tolerance; a value (e.g. 0.95): only when also better beyond noise
    # (the gate's paired test, indexer/gate.py). Held-out feedback is often a few dozen queries.
    confidence: float | None = None
    feedback_weight: float = 1.0  # multiplies each event's own weight
    hard_negative_weight: float = FitConfig.hard_negative_weight  # an irrelevant item: this many negatives
    keep_snapshots: int = KEEP_SNAPSHOTS
    full_every: int = 10  # in auto mode, a full refit after this many query ones
    epochs: int = 40
    batch_size: int = 64  # small batches: feedback sets are small, steps matter
    patience: int = 10
    lr: float = FitConfig.lr  # query adapters (zero-initialised, trained from scratch)
    full_lr: float = 5e-4  # full refits: a lower rate, as they warm-start a trained head
    min_pairs: int = FitConfig.min_pairs
    seed: int = FitConfig.seed

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidArgument(f"refit mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("interval_s", "after_feedback"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidArgument(f"{name} must be positive when set, got {value}")
        if self.confidence is not None and not 0 < self.confidence < 1:
            raise InvalidArgument(f"confidence must be in (0, 1), e.g. 0.95; got {self.confidence}")
        if self.max_seconds <= 0 or self.tolerance < 0 or self.feedback_weight <= 0:
            raise InvalidArgument("max_seconds and feedback_weight must be positive, tolerance not negative")
        if not (self.lr > 0 and self.full_lr > 0 and self.hard_negative_weight > 0):
            raise InvalidArgument("lr, full_lr and hard_negative_weight must be positive")
        if self.keep_snapshots < 1 or self.full_every < 1 or self.epochs < 1:
            raise InvalidArgument("keep_snapshots, full_every and epochs must be at least 1")


class Refitter:
    """Runs refits for one engine, one at a time, on demand or on a schedule."""

    def __init__(self, engine: SearchEngine, policy: RefitPolicy | None = None):
        self.engine = engine
        self.policy = policy or RefitPolicy()
        self._lock = threading.Lock()
        self._running: str | None = None
        self.progress = ""
        self._thread: threading.Thread | None = None
        self._scheduler: threading.Thread | None = None
        self._stop = threading.Event()
        engine.compactor.keep_snapshots = self.policy.keep_snapshots
        self._pairs_tried = 0  # train pairs when a first head was last tried (see _due)
        self.runs = RefitRuns(engine.catalog)
        self.feedback = FeedbackLog(engine.catalog)
        for run_id in [] if engine.read_only else self.runs.interrupt_running():  # a replica writes nothing
            log.warning("refit run %s was interrupted by a restart; the previous snapshot stays live", run_id)

    @property
    def running(self) -> str | None:
        return self._running

    def start(self, mode: str | None = None) -> str:
        """Start a refit in the background; returns its run id.

        Raises:
            InvalidArgument: unknown mode. FailedPrecondition: a refit is already running,
                or no snapshot is loaded.
        """
        mode = mode or self.policy.mode
        if mode not in MODES:
            raise InvalidArgument(f"refit mode must be one of {', '.join(MODES)}, got {mode!r}")
        if self.engine.snapshot is None:
            raise FailedPrecondition("no snapshot is loaded: there is no head to refit yet")
        with self._lock:
            if self._running is not None:
                raise FailedPrecondition(f"refit {self._running} is still running; at most one runs at a time")
            run_id = "refit-" + time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
            self._running = run_id
            self.runs.start(run_id, mode, self.engine.snapshot.id)
        self._thread = threading.Thread(target=self._run, args=(run_id, mode), name=f"xmodal-{run_id}", daemon=True)
        self._thread.start()
        return run_id

    def wait(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self, run_id: str, mode: str) -> None:
        started = time.perf_counter()
        try:
            with self.engine.view.snapshot_writes:  # not beside a compaction (see server.compaction)
                outcome = self._refit(run_id, mode)
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the live snapshot stays
            log.exception("refit %s failed", run_id)
            outcome = {"state": "failed", "mode": mode, "message": f"{type(exc).__name__}: {exc}"}
        finally:
            with self._lock:
                self._running = None
                self.progress = ""
        self.runs.finish(run_id, **outcome)
        metrics.REFITS.labels(outcome["mode"], outcome["state"]).inc()
        metrics.REFIT_SECONDS.observe(time.perf_counter() - started)
        log.info(
            "refit %s %s in %.1f s (%s)",
            run_id,
            outcome["state"],
            time.perf_counter() - started,
            outcome.get("message", ""),
        )

    def _resolve_mode(self, mode: str, live: Snapshot, vectors: Vectors) -> str:
        """``auto``: full when the corpus changed since ``live`` or after ``full_every``
        stacked query refits, else query. A query refit of a changed corpus is refused."""
        changed = {m: len(vectors[m]) for m in MODALITIES} != live.manifest.counts
        if mode == "query" and changed:
            raise FailedPrecondition("the corpus changed since the live snapshot was built: run a full refit")
        if mode != "auto":
            return mode
        if changed:
            return "full"  # new items must be projected into the indexes
        stacked = 0
        for row in self.runs.recent(limit=self.policy.full_every):
            if row["state"] != "promoted":
                continue
            if row["mode"] == "full":
                break
            stacked += 1
        return "full" if stacked >= self.policy.full_every else "query"

    def _config(self, live: Snapshot, mode: str) -> FitConfig:
        """The live head's kind and width, the policy's training settings."""
        policy = self.policy
        return FitConfig(
            kind=live.head.kind if live.head.kind in TRAINABLE_KINDS else "mlp",
            hidden=int(live.head.options.get("hidden", FitConfig.hidden)),
            epochs=policy.epochs,
            max_seconds=policy.max_seconds,
            min_pairs=policy.min_pairs,
            seed=policy.seed,
            batch_size=policy.batch_size,
            patience=policy.patience,
            lr=policy.lr if mode == "query" else policy.full_lr,
            hard_negative_weight=policy.hard_negative_weight,
            confidence=policy.confidence or FitConfig.confidence,
        )

    def _set_progress(self, step: str) -> None:
        self.progress = step

    def _refit(self, run_id: str, mode: str) -> dict:
        """Fit through the one fit pipeline, guarded by the live head; promote if the gate
        accepts. A full refit warm-starts from the live head (without query adapters)."""
        live = self.engine.snapshot
        if live is None:
            raise FailedPrecondition("no snapshot is loaded: there is no head to refit yet")
        self.progress = "loading base vectors"
        vectors = load_vectors(self.engine.store)
        mode = self._resolve_mode(mode, live, vectors)
        config = self._config(live, mode)
        warm = live.head.without_query_adapters() if mode == "full" and live.head.kind == config.kind else None
        result = fit_pipeline(
            self.engine.catalog,
            self.engine.store,
            config,
            guard=live.head,
            tolerance=self.policy.tolerance,
            query_adapter=mode == "query",
            warm_start=warm,
            feedback_weight=self.policy.feedback_weight,
            vectors=vectors,
            on_step=self._set_progress,
            significance=self.policy.confidence is not None,
        )
        after = {**(result.after or {}), "fit": {k: v for k, v in asdict(result.report).items() if k != "curve"}}
        common = {"mode": mode, "before": result.before, "after": after, "feedback_events": result.data.feedback_events}
        if not result.decision.accepted:
            return {**common, "state": "rejected", "message": result.decision.message}
        manifest = self._promote(run_id, live, result, after, vectors, reuse_indexes=mode == "query")
        return {**common, "state": "promoted", "snapshot_id": manifest.id, "message": f"promoted {manifest.id}"}

    def _promote(
        self, run_id: str, live: Snapshot, result: FitResult, after: dict, vectors: Vectors, *, reuse_indexes: bool
    ) -> Manifest:
        """Write the snapshot (reusing the live indexes for a query refit), move CURRENT,
        swap it in and prune old snapshots."""
        self.progress = "writing snapshot"
        engine = self.engine
        manifest = write_snapshot(
            engine.data,
            engine.catalog,
            engine.store,
            result.head,
            encoder=live.encoder,
            factory=live.manifest.requested_factory,
            memory_budget=live.manifest.memory_budget,
            parent_id=live.id,
            metrics={"refit": {"run_id": run_id, "before": result.before, "after": after}},
            make_current=False,
            reuse_indexes_from=live.id if reuse_indexes else None,
            vectors=vectors,
        )
        engine.data.set_current(manifest.id)
        engine.load_current()
        removed = prune_snapshots(engine.data, self.policy.keep_snapshots)
        if removed:
            log.info("removed %d old snapshot(s) beyond the last %d", len(removed), self.policy.keep_snapshots)
        return manifest

    # -- schedule --------------------------------------------------------------------------
    def schedule(self, check_every: float = 1.0) -> None:
        """Start the background scheduler: the policy's triggers, and a first head once a
        data directory that started without pairs (identity head) has enough of them."""

        def loop():
            while not self._stop.wait(check_every):
                try:
                    if self._running is None and self.engine.snapshot is not None and self._due():
                        self.start()
                except Exception:  # noqa: BLE001 - the scheduler must survive a bad run
                    log.exception("scheduled refit could not start")

        self._scheduler = threading.Thread(target=loop, name="xmodal-refit-scheduler", daemon=True)
        self._scheduler.start()

    def _due(self) -> bool:
        """Due for a first head (see :meth:`_first_head_due`), on the timer (when there is
        new feedback to learn from) or on the count."""
        if self._first_head_due():
            return True
        if self.policy.interval_s is None and self.policy.after_feedback is None:
            return False
        last = self.runs.last_started()
        new = self.feedback.count(since=last)
        if (
            self.policy.interval_s is not None
            and new
            and (last is None or time.time() - last >= self.policy.interval_s)
        ):
            return True
        return self.policy.after_feedback is not None and new >= self.policy.after_feedback

    def _first_head_due(self) -> bool:
        """The live head is an identity one, and the corpus has gained enough train pairs
        to fit one (``min_pairs``; tried again only after the pairs grew by half)."""
        live = self.engine.snapshot
        if live is None or live.head.kind != "identity":
            return False
        pairs = self.engine.catalog.count_pairs()["train"]
        if pairs < self.policy.min_pairs or pairs < 1.5 * self._pairs_tried:
            return False
        self._pairs_tried = pairs
        log.info("%d train pairs and an identity head: fitting a first head", pairs)
        return True

    def close(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
