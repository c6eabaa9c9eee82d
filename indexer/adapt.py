"""The one fit pipeline: load pairs and feedback, build the config, train, gate, write.

Every fit runs through :func:`fit_pipeline`: ``xmodal index`` after embedding and
``xmodal fit`` (via :func:`fit_snapshot`), the server's refits (xmodal.server.refit) and
the benchmarks. The steps:

1. load: the corpus train/val pairs with their base vectors, and the feedback events'
   training pairs and held-out queries (:func:`load_training_data`);
2. gate: a :class:`~.gate.Gate` over the held-out data, guarding the live head for refits;
3. train: a new head (optionally warm-started), or a query adapter on the live head,
   early-stopped on the gate's score; a new head with fewer validation pairs than
   ``cv_below`` is cross-validated instead (xmodal.indexer.fewshot);
4. decide: the gate's paired test says whether the result beats the live head (zero-shot
   for a new head) beyond noise, and at which blend; a new head that does not is written at
   blend 0 (exactly zero-shot; an identity head for kinds that do not blend);
5. write: :func:`write_fitted` writes the snapshot (refits write with index reuse).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from .catalog import Catalog
from .corpus import IMAGE, TEXT
from .errors import FailedPrecondition, InvalidArgument
from .evaluate import pair_metrics
from .feedback import HeldOutQuery, feedback_pairs, held_out_queries, split_events
from .fewshot import cross_validated_fit
from .gate import Decision, Gate, Verdict
from .heads import TRAINABLE_KINDS, Head
from .manifest import Manifest
from .snapshot import DEFAULT_FACTORY, DataDir, Snapshot, write_snapshot
from .store import BaseStore
from .train import FitConfig, FitReport, PairSet, fit_head, fit_query_adapter, pairs_from_catalog
from .vectors import Vectors, base_dim, load_vectors

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    """What a fit learns from and is validated on."""

    vectors: Vectors
    corpus_train: PairSet
    corpus_val: PairSet
    feedback_train: PairSet | None  # None: no feedback pairs (or feedback not used)
    query_modality: str | None  # the feedback queries' main modality
    val_queries: list[HeldOutQuery]
    feedback_events: int

    @cached_property
    def train(self) -> PairSet:
        """Corpus pairs, plus feedback pairs when there are any (one key space)."""
        if self.feedback_train is None:
            return self.corpus_train
        return PairSet.concat([self.corpus_train, self.feedback_train])

    @property
    def feedback_pairs(self) -> int:
        return 0 if self.feedback_train is None else len(self.feedback_train)


def load_training_data(
    catalog: Catalog,
    store: BaseStore,
    *,
    label_field: str | None = None,
    feedback: bool = True,
    feedback_weight: float = 1.0,
    vectors: Vectors | None = None,
) -> TrainingData:
    """Step 1: corpus pairs (train, val) and, unless ``feedback`` is off, the feedback
    events' training pairs (weighted by ``feedback_weight``) and held-out queries."""
    vectors = vectors or load_vectors(store)
    train = pairs_from_catalog(catalog, store, "train", label_field=label_field, vectors=vectors)
    val = pairs_from_catalog(catalog, store, "val", label_field=label_field, vectors=vectors)
    if not feedback:
        return TrainingData(vectors, train, val, None, None, [], 0)
    train_events, val_events = split_events(catalog)
    pairs, modality = feedback_pairs(catalog, train_events, vectors, feedback_weight)
    return TrainingData(
        vectors, train, val, pairs, modality, held_out_queries(val_events, vectors), len(train_events) + len(val_events)
    )


@dataclass
class FitResult:
    head: Head
    report: FitReport
    data: TrainingData
    before: dict | None  # the gate's figures of the guarded (live) head
    after: dict | None  # the fitted head's (computed when guarding)
    decision: Decision
    verdict: Verdict | None = None  # the paired test (None when not gated)


def fit_pipeline(
    catalog: Catalog,
    store: BaseStore,
    config: FitConfig,
    *,
    guard: Head | None = None,
    tolerance: float = 0.0,
    query_adapter: bool = False,
    warm_start: Head | None = None,
    label_field: str | None = None,
    feedback: bool = True,
    feedback_weight: float = 1.0,
    vectors: Vectors | None = None,
    progress: bool = False,
    on_step: Callable[[str], None] | None = None,
    gated: bool = True,
    replay: dict[str, np.ndarray] | None = None,
    teacher: Head | None = None,
    significance: bool = True,
) -> FitResult:
    """Load, gate, train and decide (steps 1-4); the caller writes (step 5).

    Args:
        guard: the live head a refit must not make worse; None for a new head.
        tolerance: how far below ``guard`` on a held-out figure a head may validate.
        query_adapter: train only a query-side adapter on ``guard`` (a query refit).
        warm_start: a head of ``config``'s kind and sizes to start from.
        feedback: train on the feedback events too (only for trainable kinds).
        on_step: told the name of each step as it starts (a refit's progress).
        gated: judge a new head against zero-shot (off: the head as trained, at blend 1,
            for comparisons of head kinds).
        replay: base vectors of old-style items by modality, kept where the live head (or
            zero-shot) puts them while training (see :func:`~.train.fit_head`).
        teacher: where ``replay`` is kept for a new head (default zero-shot; a refit keeps
            it where ``guard`` puts it).
        significance: a refit must also beat ``guard`` beyond noise (the gate's paired test
            at ``config.confidence``); off: not worse beyond ``tolerance`` is enough. New
            heads are always judged against zero-shot (unless not ``gated``).

    Raises:
        FailedPrecondition: nothing embedded yet. InvalidArgument: too few pairs for the
            head, bad warm start, label losses without labels.
    """
    step = on_step or (lambda _: None)
    step("loading base vectors")
    vectors = vectors or load_vectors(store)
    if not base_dim(vectors):
        raise FailedPrecondition("the data directory has no embedded images or texts: run `xmodal index` first")
    data = load_training_data(
        catalog,
        store,
        label_field=label_field,
        vectors=vectors,
        feedback_weight=feedback_weight,
        feedback=feedback and (config.kind in TRAINABLE_KINDS or query_adapter),
    )
    return fit_training_data(
        data,
        config,
        guard=guard,
        tolerance=tolerance,
        query_adapter=query_adapter,
        warm_start=warm_start,
        progress=progress,
        on_step=step,
        gated=gated,
        replay=replay,
        teacher=teacher,
        significance=significance,
    )


def fit_training_data(
    data: TrainingData,
    config: FitConfig,
    *,
    guard: Head | None = None,
    tolerance: float = 0.0,
    query_adapter: bool = False,
    warm_start: Head | None = None,
    progress: bool = False,
    on_step: Callable[[str], None] | None = None,
    gated: bool = True,
    replay: dict[str, np.ndarray] | None = None,
    teacher: Head | None = None,
    significance: bool = True,
) -> FitResult:
    """Steps 2-4 of :func:`fit_pipeline` on training data already loaded (the benchmarks
    build it from pair sets)."""
    step = on_step or (lambda _: None)
    vectors = data.vectors
    confidence = config.confidence if (guard is None or significance) else None
    gate = Gate(data.corpus_val, data.val_queries, vectors, confidence=confidence)
    reference = guard if guard is not None else Head("identity", int(data.corpus_train.image.shape[1]))
    if guard is not None:
        step("validating the live head")
        gate = gate.protecting(guard, tolerance)
    elif gated and _cross_validates(config, data):
        step(f"cross-validating ({config.cv_folds} folds of {len(data.corpus_train) + len(data.corpus_val)} pairs)")
        pooled = PairSet.concat([data.corpus_train, data.corpus_val])
        head, report, verdict, _ = cross_validated_fit(
            pooled, config, progress=progress, replay=replay, teacher=teacher
        )
        return _settle_new(head, report, data, verdict, cross_validated=True)
    step(
        f"training ({'query' if query_adapter else 'full'} mode, {len(data.train)} pairs of which "
        f"{data.feedback_pairs} feedback)"
    )
    if query_adapter:
        if guard is None:
            raise FailedPrecondition("a query adapter is trained on a live head: pass guard")
        head, report = fit_query_adapter(
            guard, data.query_modality or TEXT, data.train, None, config, progress=progress, score=gate.score
        )
    else:
        if guard is not None:
            teacher = guard.without_query_adapters()
        head, report = fit_head(
            data.train,
            None,
            config,
            warm_start=warm_start,
            progress=progress,
            score=gate.score,
            replay=replay,
            teacher=teacher,
        )
    if head.kind == "identity" or (guard is None and not gated):
        return FitResult(head, report, data, None, None, Decision(True))
    step("validating")
    # a query refit keeps the live projections (its indexes are reused): no blend to choose
    blends = config.blends if head.blendable and not query_adapter else None
    verdict = gate.judge(head, reference, blends)
    if guard is None:
        return _settle_new(head, report, data, verdict)
    if verdict.blend is not None:
        head.set_blend(verdict.blend)
    after = gate.figures(head)
    decision = gate.decide(after, report, must_improve=query_adapter or warm_start is not None, verdict=verdict)
    return FitResult(head, report, data, gate.reference, after, decision, verdict)


def _cross_validates(config: FitConfig, data: TrainingData) -> bool:
    """A new residual head, corpus pairs only, too few validation pairs to trust."""
    return (
        config.kind in TRAINABLE_KINDS
        and len(data.corpus_val) < config.cv_below
        and data.feedback_train is None
        and not data.val_queries
    )


def _settle_new(
    head: Head, report: FitReport, data: TrainingData, verdict: Verdict, *, cross_validated: bool = False
) -> FitResult:
    """What a new head's verdict puts live: the head at its chosen blend, or zero-shot (the
    head at blend 0, or an identity head for kinds that do not blend)."""
    how = f"{len(verdict.candidates)} candidate(s), cross-validated" if cross_validated else "validation"
    if verdict.significant:
        if verdict.blend is not None:
            head.set_blend(verdict.blend)
        report.gate = f"goes live: {verdict.summary()}"
    else:
        if head.blendable:
            head.set_blend(0.0)
        else:
            head = Head("identity", head.dim_in).eval()
        report.gate = f"zero-shot stays live ({how}): {verdict.summary()}"
    log.info("gate: %s", report.gate)
    return FitResult(head, report, data, None, None, Decision(True, report.gate), verdict)


def held_out_metrics(catalog: Catalog, vectors: Vectors, head: Head, split: str = "test") -> dict:
    """Text->image and image->text metrics of ``head`` on a split's pairs."""
    pairs = catalog.pairs(split)
    images, texts = vectors[IMAGE], vectors[TEXT]
    if not pairs or not len(images) or not len(texts):
        return {}
    rows = catalog.get_items([t for _, t in pairs])
    groups = {t: row["content_hash"] for t, row in rows.items()}  # identical captions are interchangeable
    return pair_metrics(
        images.ids,
        head.project(IMAGE, images.array),
        texts.ids,
        head.project(TEXT, texts.array),
        pairs,
        text_groups=groups,
    )


def fit_from_catalog(
    catalog: Catalog,
    store: BaseStore,
    config: FitConfig,
    *,
    label_field: str | None = None,
    warm_start: Head | None = None,
    progress: bool = False,
    vectors: Vectors | None = None,
    feedback: bool = True,
    gated: bool = True,
    replay_select: ReplaySelect | None = None,
    teacher: Head | None = None,
) -> tuple[Head, FitReport, dict]:
    """An offline fit of a new head (no live head to guard), with its held-out report.

    Args:
        feedback: also train on the training slice of the catalog's feedback events and
            early-stop on the mean of corpus validation recall and held-out feedback recall
            (what a server refit does), so re-indexing or ``xmodal fit`` keeps what users
            taught the live head. Off for head comparisons on the corpus alone.
        replay_select: picks the old-style items to replay (a mask over a modality's
            embedded ids): their projections are kept where ``teacher`` (default zero-shot)
            puts them while the head learns the rest (a mixed archive keeps its old style).

    Returns:
        (head, fit report, metrics {"zero_shot": ..., "adapted": ..., "fit": report,
        "feedback_pairs": n}) with zero-shot and adapted metrics on the test split.
    """
    vectors = vectors or load_vectors(store)
    replay = replay_vectors(catalog, vectors, replay_select) if replay_select is not None else None
    result = fit_pipeline(
        catalog,
        store,
        config,
        warm_start=warm_start,
        label_field=label_field,
        feedback=feedback,
        vectors=vectors,
        progress=progress,
        gated=gated,
        replay=replay,
        teacher=teacher,
    )
    head = result.head
    metrics: dict = {
        "zero_shot": held_out_metrics(catalog, vectors, Head("identity", base_dim(vectors))),
        "fit": result.report.to_dict(),
        "feedback_pairs": result.data.feedback_pairs,
    }
    if result.verdict is not None:
        metrics["gate"] = result.verdict.to_dict()
    if replay is not None:
        metrics["replay"] = {
            "items": {modality: len(rows) for modality, rows in replay.items()},
            "teacher": teacher.kind if teacher is not None else "identity",
            "weight": config.replay_weight,
        }
    if head.kind != "identity":
        metrics["adapted"] = held_out_metrics(catalog, vectors, head)
    return head, result.report, metrics


ReplaySelect = Callable[[Catalog, list[str]], np.ndarray]  # (catalog, ids) -> which to replay


def replay_vectors(catalog: Catalog, vectors: Vectors, select: ReplaySelect) -> dict[str, np.ndarray]:
    """The base vectors of the embedded items ``select`` picks, by modality.

    Raises:
        InvalidArgument: it picks none (a replay that keeps nothing is a mistake).
    """
    out = {}
    for modality in (IMAGE, TEXT):
        found = vectors.get(modality)
        if found is None or not len(found):
            continue
        mask = np.asarray(select(catalog, list(found.ids)), dtype=bool)
        if mask.any():
            out[modality] = found.array[mask]
    if not out:
        raise InvalidArgument("the replay selection matches no embedded item: check the field and its values")
    return out


def write_fitted(
    data: DataDir,
    catalog: Catalog,
    store: BaseStore,
    config: FitConfig,
    *,
    encoder: str,
    factory: str,
    parent_id: str | None,
    memory_budget: int | None = None,
    label_field: str | None = None,
    warm_start: Head | None = None,
    progress: bool = False,
    feedback: bool = True,
    replay_select: ReplaySelect | None = None,
    teacher: Head | None = None,
) -> tuple[Manifest, FitReport]:
    """Fit a new head offline and write it as the current snapshot (steps 1-5)."""
    head, report, metrics = fit_from_catalog(
        catalog,
        store,
        config,
        label_field=label_field,
        warm_start=warm_start,
        progress=progress,
        feedback=feedback,
        replay_select=replay_select,
        teacher=teacher,
    )
    manifest = write_snapshot(
        data,
        catalog,
        store,
        head,
        encoder=encoder,
        factory=factory,
        memory_budget=memory_budget,
        parent_id=parent_id,
        metrics=metrics,
    )
    return manifest, report


def open_data_dir(data_dir: str | Path) -> tuple[DataDir, Catalog, BaseStore]:
    """An indexed data directory's paths, catalog and base store.

    Raises:
        FailedPrecondition: no catalog there yet.
    """
    data = DataDir(data_dir)
    if not data.catalog_path.exists():
        raise FailedPrecondition(f"no catalog in {data_dir}: run `xmodal index CORPUS --data {data_dir}` first")
    catalog = Catalog(data.catalog_path)
    return data, catalog, BaseStore(data.base, catalog)


def fit_snapshot(
    data_dir: str | Path,
    config: FitConfig,
    *,
    label_field: str | None = None,
    warm_start: bool = False,
    factory: str | None = None,
    memory_budget: int | None = None,
    progress: bool = True,
    feedback: bool = True,
    replay_select: ReplaySelect | None = None,
) -> tuple[Manifest, FitReport]:
    """Offline refit (`xmodal fit`): fit a head on a data directory and write (and make
    current) a snapshot.

    Args:
        warm_start: start from the live snapshot's head (same kind and sizes).
        factory: ``auto`` or a FAISS factory string (default: what the live snapshot asked
            for, else ``auto``).
        memory_budget: bytes an index may take, for ``auto`` (default: the live snapshot's
            when the factory is its too, else no limit).
        feedback: train on the feedback events too (see :func:`fit_from_catalog`).
        replay_select: old-style items to keep where the live head puts them (zero-shot
            when there is none, or when its projection has another size than the new
            head's); see :func:`fit_from_catalog`.
    """
    data, catalog, store = open_data_dir(data_dir)
    current = data.current_id()
    live = Snapshot(data.snapshots / current) if current else None
    start = live.head if (warm_start and live is not None and live.head.kind == config.kind) else None
    teacher = None
    if replay_select is not None and live is not None and live.head.dim_out == live.head.dim_in:
        teacher = live.head.without_query_adapters()  # a residual head or zero-shot: same space
    if factory is None:
        factory = live.manifest.requested_factory if live else DEFAULT_FACTORY
        if memory_budget is None and live is not None:
            memory_budget = live.manifest.memory_budget
    return write_fitted(
        data,
        catalog,
        store,
        config,
        encoder=catalog.get_meta("encoder") or "",
        factory=factory,
        memory_budget=memory_budget,
        parent_id=current,
        label_field=label_field,
        warm_start=start,
        progress=progress,
        feedback=feedback,
        replay_select=replay_select,
        teacher=teacher,
    )


EVAL_KINDS = ("identity", "pca", "linear", "mlp", "shared")
KIND_LABELS = {"identity": "zero-shot"}


def compare_heads(
    data_dir: str | Path,
    *,
    kinds=EVAL_KINDS,
    split: str = "test",
    base: FitConfig | None = None,
    label_field: str | None = None,
    progress: bool = True,
) -> dict:
    """Fit each head kind on the train split and measure it on ``split``.

    Returns:
        {"split", "pairs", "results": {kind: {"text_to_image": {...}, "image_to_text": {...},
        "fit_seconds": s, "epochs": n}}}
    """
    _, catalog, store = open_data_dir(data_dir)
    vectors = load_vectors(store)
    base = base or FitConfig()
    results = {}
    for kind in kinds:
        config = replace(base, kind=kind)
        head, report, _ = fit_from_catalog(
            catalog,
            store,
            config,
            label_field=label_field,
            progress=progress,
            vectors=vectors,
            feedback=False,
            gated=False,
        )
        results[kind] = {
            **held_out_metrics(catalog, vectors, head, split),
            "fit_seconds": report.seconds,
            "epochs": report.epochs,
        }
    return {
        "split": split,
        "pairs": len(catalog.pairs(split)),
        "encoder": catalog.get_meta("encoder"),
        "results": results,
    }


def markdown_table(comparison: dict) -> str:
    """A Markdown table of recall@1/5/10 and MRR per head kind and direction."""
    lines = [
        f"Held-out split `{comparison['split']}` ({comparison['pairs']} pairs), encoder `{comparison['encoder']}`.",
        "",
        "| head | t->i R@1 | t->i R@5 | t->i R@10 | t->i MRR | i->t R@1 | i->t R@5 | i->t R@10 | i->t MRR | fit s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in comparison["results"].items():
        t, i = r.get("text_to_image", {}), r.get("image_to_text", {})
        cells = [f"{d.get(key, 0):.3f}" for d in (t, i) for key in ("recall@1", "recall@5", "recall@10", "mrr")]
        lines.append(f"| {KIND_LABELS.get(kind, kind)} | " + " | ".join(cells) + f" | {r['fit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def bar_chart(comparison: dict, path: str | Path, title: str = "") -> None:
    """A PNG bar chart of recall@10 per head kind, both directions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(comparison["results"])
    t2i = [comparison["results"][k].get("text_to_image", {}).get("recall@10", 0) for k in kinds]
    i2t = [comparison["results"][k].get("image_to_text", {}).get("recall@10", 0) for k in kinds]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    x = range(len(kinds))
    ax.bar([p - 0.2 for p in x], t2i, width=0.4, label="text->image")
    ax.bar([p + 0.2 for p in x], i2t, width=0.4, label="image->text")
    ax.set_xticks(list(x), [KIND_LABELS.get(k, k) for k in kinds])
    ax.set_ylabel("recall@10")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"recall@10 on the {comparison['split']} split ({comparison['pairs']} pairs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
