"""Domain adaptation on a data directory: fit a head from the catalog's pairs, measure it
on held-out pairs, and write it as a new snapshot (offline `xmodal fit`, and `xmodal
index` after embedding)."""

from __future__ import annotations

from pathlib import Path

from .catalog import Catalog
from .corpus import IMAGE, TEXT
from .errors import FailedPrecondition
from .evaluate import pair_metrics
from .feedback import feedback_pairs, feedback_recall, held_out_queries, split_events
from .heads import Head
from .snapshot import DEFAULT_FACTORY, DataDir, Snapshot, write_snapshot
from .store import BaseStore
from .train import FitConfig, FitReport, PairSet, fit_head, pairs_from_catalog, relevance, validation_recall


def held_out_metrics(catalog: Catalog, vectors: dict, head: Head, split: str = "test") -> dict:
    """Text->image and image->text metrics of ``head`` on a split's pairs."""
    pairs = catalog.pairs(split)
    (image_ids, image_base), (text_ids, text_base) = vectors[IMAGE], vectors[TEXT]
    if not pairs or not image_ids or not text_ids:
        return {}
    rows = catalog.get_items([t for _, t in pairs])
    groups = {t: row["content_hash"] for t, row in rows.items()}  # identical captions are interchangeable
    return pair_metrics(image_ids, head.project(IMAGE, image_base), text_ids, head.project(TEXT, text_base), pairs,
                        text_groups=groups)


def fit_from_catalog(catalog: Catalog, store: BaseStore, config: FitConfig, *, label_field: str | None = None,
                     warm_start: Head | None = None, progress: bool = False, vectors: dict | None = None,
                     feedback: bool = True) -> tuple[Head, FitReport, dict]:
    """Fit a head on the train split (early stopping on val) and measure zero-shot and the
    head on the test split.

    Args:
        feedback: also train on the training slice of the catalog's feedback events and
            early-stop on the mean of corpus validation recall and held-out feedback recall
            (what a server refit does), so re-indexing or ``xmodal fit`` keeps what users
            taught the live head. Off for head comparisons on the corpus alone.

    Returns:
        (head, fit report, metrics {"zero_shot": ..., "adapted": ..., "fit": report,
        "feedback_pairs": n}).
    """
    vectors = vectors or {m: store.load(m) for m in (IMAGE, TEXT)}
    if not vectors[IMAGE][0] or not vectors[TEXT][0]:
        raise FailedPrecondition("the data directory has no embedded images or texts: run `xmodal index` first")
    train = pairs_from_catalog(catalog, store, "train", label_field=label_field, vectors=vectors)
    val = pairs_from_catalog(catalog, store, "val", label_field=label_field, vectors=vectors)
    score, from_feedback = None, None
    if feedback and config.kind not in ("identity", "pca"):
        train_events, val_events = split_events(catalog)
        from_feedback, _ = feedback_pairs(catalog, train_events, vectors)
        if from_feedback is not None:
            train = PairSet.concat([train, from_feedback])  # feedback pairs are unlabelled (-1)
            relevant = relevance(val) if len(val) else None
            val_queries = held_out_queries(val_events, vectors)

            def mean_recall(head: Head) -> float:
                values = [validation_recall(head, val, relevant=relevant) if len(val) else None,
                          feedback_recall(head, val_queries, vectors)]
                values = [v for v in values if v is not None]
                return sum(values) / len(values) if values else 0.0
            score = mean_recall
    head, report = fit_head(train, val, config, warm_start=warm_start, progress=progress, score=score)
    dim = vectors[IMAGE][1].shape[1]
    metrics = {"zero_shot": held_out_metrics(catalog, vectors, Head("identity", dim)), "fit": report.to_dict(),
               "feedback_pairs": 0 if from_feedback is None else len(from_feedback)}
    if head.kind != "identity":
        metrics["adapted"] = held_out_metrics(catalog, vectors, head)
    return head, report, metrics


def fit_snapshot(data_dir: str | Path, config: FitConfig, *, label_field: str | None = None,
                 warm_start: bool = False, factory: str | None = None, progress: bool = True,
                 feedback: bool = True) -> tuple[dict, FitReport]:
    """Offline refit: fit a head on a data directory and write (and make current) a snapshot.

    Args:
        warm_start: start from the live snapshot's head (same kind and sizes).
        factory: FAISS factory (default: the live snapshot's, else Flat).
        feedback: train on the feedback events too (see :func:`fit_from_catalog`).
    """
    data = DataDir(data_dir)
    if not data.catalog_path.exists():
        raise FailedPrecondition(f"no catalog in {data.root}: run `xmodal index CORPUS --data {data_dir}` first")
    catalog = Catalog(data.catalog_path)
    encoder = catalog.get_meta("encoder")
    store = BaseStore(data.base, catalog)
    current = data.current_id()
    live = Snapshot(data.snapshots / current) if current else None
    start = live.head if (warm_start and live is not None and live.head.kind == config.kind) else None
    head, report, metrics = fit_from_catalog(catalog, store, config, label_field=label_field, warm_start=start,
                                             progress=progress, feedback=feedback)
    manifest = write_snapshot(data, catalog, store, head, encoder=encoder,
                              factory=factory or (live.manifest["faiss_factory"] if live else DEFAULT_FACTORY),
                              parent_id=current, metrics=metrics)
    return manifest, report


EVAL_KINDS = ("identity", "pca", "linear", "mlp", "shared")
KIND_LABELS = {"identity": "zero-shot"}


def compare_heads(data_dir: str | Path, *, kinds=EVAL_KINDS, split: str = "test", base: FitConfig | None = None,
                  label_field: str | None = None, progress: bool = True) -> dict:
    """Fit each head kind on the train split and measure it on ``split``.

    Returns:
        {"split", "pairs", "results": {kind: {"text_to_image": {...}, "image_to_text": {...},
        "fit_seconds": s, "epochs": n}}}
    """
    data = DataDir(data_dir)
    if not data.catalog_path.exists():
        raise FailedPrecondition(f"no catalog in {data.root}: run `xmodal index CORPUS --data {data_dir}` first")
    catalog = Catalog(data.catalog_path)
    store = BaseStore(data.base, catalog)
    vectors = {m: store.load(m) for m in (IMAGE, TEXT)}
    base = base or FitConfig()
    results = {}
    for kind in kinds:
        config = FitConfig(**{**base.__dict__, "kind": kind})
        head, report, _ = fit_from_catalog(catalog, store, config, label_field=label_field, progress=progress,
                                           vectors=vectors, feedback=False)
        results[kind] = {**held_out_metrics(catalog, vectors, head, split), "fit_seconds": report.seconds,
                         "epochs": report.epochs}
    return {"split": split, "pairs": len(catalog.pairs(split)), "encoder": catalog.get_meta("encoder"),
            "results": results}


def markdown_table(comparison: dict) -> str:
    """A Markdown table of recall@1/5/10 and MRR per head kind and direction."""
    lines = [f"Held-out split `{comparison['split']}` ({comparison['pairs']} pairs), encoder `{comparison['encoder']}`.",
             "",
             "| head | t->i R@1 | t->i R@5 | t->i R@10 | t->i MRR | i->t R@1 | i->t R@5 | i->t R@10 | i->t MRR | fit s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
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
