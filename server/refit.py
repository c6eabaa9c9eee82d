"""Refits from feedback: training data, the gate, the atomic swap, the scheduler.

A refit fits a new head on the corpus train pairs plus the train slice of the feedback
(weighted), warm-started from the live head; validates it against the live head on the
corpus val pairs and on the held-out slice of the feedback; and promotes it only if it is
not worse on either beyond ``tolerance``. Modes:

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

from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.errors import FailedPrecondition, InvalidArgument
from xmodal.indexer.feedback import feedback_pairs, feedback_recall, held_out_queries, split_events
from xmodal.indexer.snapshot import prune_snapshots, write_snapshot
from xmodal.indexer.train import (FitConfig, PairSet, fit_head, fit_query_adapter, pairs_from_catalog, relevance,
                                  validation_recall)

from . import metrics
from .engine import SearchEngine

log = logging.getLogger("xmodal.server")
MODES = ("auto", "query", "full")


@dataclass(kw_only=True)
class RefitPolicy:
    """When and how the server refits its head."""

    interval_s: float | None = None      # refit every N seconds (None: not on a timer)
    after_feedback: int | None = None    # refit after M new feedback events (None: not on a count)
    mode: str = "auto"
    max_seconds: float = 600.0           # wall-time cap of the training part of a run
    tolerance: float = 0.01              # how much worse than live a new head may validate
    feedback_weight: float = 1.0         # multiplies each event's own weight
    hard_negative_weight: float = 4.0    # an irrelevant item counts as this many in-batch negatives
    keep_snapshots: int = 10
    full_every: int = 10                 # in auto mode, a full refit after this many query ones
    epochs: int = 40
    batch_size: int = 64                 # small batches: feedback sets are small, steps matter
    patience: int = 10
    lr: float = 2e-3                     # query adapters (zero-initialised, trained from scratch)
    full_lr: float = 5e-4                # full refits: a lower rate, as they warm-start a trained head
    min_pairs: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise InvalidArgument(f"refit mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("interval_s", "after_feedback"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InvalidArgument(f"{name} must be positive when set, got {value}")
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
        for run_id in engine.catalog.interrupt_running_runs():
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
            self.engine.catalog.start_run(run_id, mode, self.engine.snapshot.id)
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
            outcome = self._refit(run_id, mode)
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded, the live snapshot stays
            log.exception("refit %s failed", run_id)
            outcome = {"state": "failed", "mode": mode, "message": f"{type(exc).__name__}: {exc}"}
        finally:
            with self._lock:
                self._running = None
                self.progress = ""
        self.engine.catalog.finish_run(run_id, **outcome)
        metrics.REFITS.labels(outcome["mode"], outcome["state"]).inc()
        metrics.REFIT_SECONDS.observe(time.perf_counter() - started)
        log.info("refit %s %s in %.1f s (%s)", run_id, outcome["state"], time.perf_counter() - started,
                 outcome.get("message", ""))

    def _resolve_mode(self, mode: str, live, vectors: dict) -> str:
        if mode != "auto":
            return mode
        counts = {m: len(vectors[m][0]) for m in (IMAGE, TEXT)}
        if counts != live.manifest["counts"]:
            return "full"  # new items must be projected into the indexes
        stacked = 0
        for row in self.engine.catalog.runs(limit=self.policy.full_every):
            if row["state"] != "promoted":
                continue
            if row["mode"] == "full":
                break
            stacked += 1
        return "full" if stacked >= self.policy.full_every else "query"

    def _refit(self, run_id: str, mode: str) -> dict:
        engine, policy = self.engine, self.policy
        live = engine.snapshot
        catalog = engine.catalog
        self.progress = "loading base vectors"
        vectors = {m: engine.store.load(m) for m in (IMAGE, TEXT)}
        mode = self._resolve_mode(mode, live, vectors)
        if mode == "query" and {m: len(vectors[m][0]) for m in (IMAGE, TEXT)} != live.manifest["counts"]:
            raise FailedPrecondition("the corpus changed since the live snapshot was built: run a full refit")
        train_events, val_events = split_events(catalog)
        val_queries = held_out_queries(val_events, vectors)  # built once, scored every epoch
        corpus_train = pairs_from_catalog(catalog, engine.store, "train", vectors=vectors)
        corpus_val = pairs_from_catalog(catalog, engine.store, "val", vectors=vectors)
        corpus_relevant = relevance(corpus_val)  # built once, scored every epoch
        feedback_train, query_modality = feedback_pairs(catalog, train_events, vectors, policy.feedback_weight)
        parts = [corpus_train] + ([feedback_train] if feedback_train is not None else [])
        train = PairSet.concat(parts) if len(parts) > 1 else corpus_train

        def figures(head) -> dict:
            corpus = validation_recall(head, corpus_val, relevant=corpus_relevant) if len(corpus_val) else None
            return {"corpus_val_recall@10": corpus,
                    "feedback_val_recall@10": feedback_recall(head, val_queries, vectors)}

        # One query more or less is not a regression: with n held-out queries the
        # tolerance is at least 1/n, so tiny validation slices do not reject by chance.
        self.progress = "validating the live head"
        before = figures(live.head)
        sizes = {"corpus_val_recall@10": len(corpus_val), "feedback_val_recall@10": len(val_queries)}

        def worse_than_live(figs: dict) -> list[str]:
            return [name for name in ("corpus_val_recall@10", "feedback_val_recall@10")
                    if before[name] is not None and figs[name] is not None
                    and figs[name] < before[name] - max(policy.tolerance, 1.0 / max(sizes[name], 1))]

        def gate_score(head) -> float:
            # Early stopping on the gate's own figures: a refit exists to learn what the
            # corpus does not say, so corpus pairs alone would stop it before it starts.
            # An epoch the gate would reject never counts as the best one, so the run
            # returns the best head that can be promoted, not one that trades too much
            # corpus quality for feedback.
            figs = figures(head)
            if worse_than_live(figs):
                return -1.0
            values = [v for v in figs.values() if v is not None]
            return sum(values) / len(values) if values else 0.0
        config = FitConfig(kind=live.head.kind if live.head.kind in ("linear", "mlp", "shared") else "mlp",
                           hidden=int(live.head.options.get("hidden", 512)), epochs=policy.epochs,
                           max_seconds=policy.max_seconds, min_pairs=policy.min_pairs, seed=policy.seed,
                           batch_size=policy.batch_size, patience=policy.patience,
                           lr=policy.lr if mode == "query" else policy.full_lr,
                           hard_negative_weight=policy.hard_negative_weight)
        self.progress = f"training ({mode} mode, {len(train)} pairs of which {len(train) - len(corpus_train)} feedback)"
        warm = None
        if mode == "query":
            new_head, report = fit_query_adapter(live.head, query_modality or TEXT, train, None, config,
                                                 score=gate_score)
        else:
            warm = live.head.without_query_adapters() if live.head.kind == config.kind else None
            new_head, report = fit_head(train, None, config, warm_start=warm, score=gate_score)
        self.progress = "validating"
        after = {**figures(new_head), "fit": {k: v for k, v in asdict(report).items() if k != "curve"}}
        worse = worse_than_live(after)
        common = {"mode": mode, "before": before, "after": after, "feedback_events": len(train_events) + len(val_events)}
        if report.best_epoch == 0 and (mode == "query" or warm is not None):
            return {**common, "state": "rejected",
                    "message": "no epoch validated better than the live head without falling below it beyond the "
                               f"tolerance on either figure (tolerance {policy.tolerance}): nothing new to promote"}
        if worse:
            return {**common, "state": "rejected",
                    "message": f"new head validates worse than live on {', '.join(worse)} (tolerance {policy.tolerance})"}
        self.progress = "writing snapshot"
        metrics = {"refit": {"run_id": run_id, "before": before, "after": after}}
        manifest = write_snapshot(engine.data, catalog, engine.store, new_head, encoder=live.encoder,
                                  factory=live.manifest["faiss_factory"], parent_id=live.id, metrics=metrics,
                                  make_current=False, reuse_indexes_from=live.id if mode == "query" else None)
        engine.data.set_current(manifest["id"])
        engine.load_current()
        removed = prune_snapshots(engine.data, policy.keep_snapshots)
        if removed:
            log.info("removed %d old snapshot(s) beyond the last %d", len(removed), policy.keep_snapshots)
        return {**common, "state": "promoted", "snapshot_id": manifest["id"],
                "message": f"promoted {manifest['id']}"}

    # -- schedule --------------------------------------------------------------------------
    def schedule(self, check_every: float = 1.0) -> None:
        """Start the background scheduler (a no-op when the policy sets no trigger)."""
        if self.policy.interval_s is None and self.policy.after_feedback is None:
            return

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
        """Due on the timer (when there is new feedback to learn from) or on the count."""
        last = self.engine.catalog.last_run_started()
        new = self.engine.catalog.count_feedback(since=last)
        if self.policy.interval_s is not None and new and (last is None or time.time() - last >= self.policy.interval_s):
            return True
        return self.policy.after_feedback is not None and new >= self.policy.after_feedback

    def close(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
