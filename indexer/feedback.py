"""Feedback events as training and validation data.

A feedback event (stored by the server's SubmitFeedback) holds the query's base embedding,
the items a user confirmed and, optionally, the items they marked as wrong. Refits
(server/refit.py) and offline fits (:mod:`.adapt`: ``xmodal fit``, ``xmodal index``)
both train on the training slice of the events and validate on the held-out slice, so a
re-indexed or refitted head keeps what users taught it.
"""

from __future__ import annotations

import json

import numpy as np

from .catalog import Catalog, text_hash
from .corpus import IMAGE, TEXT
from .evaluate import retrieval_metrics
from .train import PairSet, item_key


def split_events(catalog: Catalog) -> tuple[list, list]:
    """(training slice, held-out slice) of the catalog's feedback events."""
    events = catalog.feedback()
    return [e for e in events if e["split"] == "train"], [e for e in events if e["split"] == "val"]


def feedback_pairs(catalog: Catalog, events, vectors: dict,
                   weight_scale: float = 1.0) -> tuple[PairSet | None, str | None]:
    """Feedback events -> (image, text) pairs of base vectors, and the queries' main modality.

    An event whose query and relevant item are of different modalities gives one pair per
    relevant item; same-modality confirmations are kept in the catalog but not trained on.
    Its irrelevant items of the relevant items' modality become hard negatives of each of
    those pairs. Keys are :func:`item_key`s, in the corpus pairs' key space: a confirmed
    image is the same group as that image in the corpus pairs, a typed query that equals a
    caption the same group as that caption.

    Args:
        events: feedback rows of the catalog (usually one slice of them).
        vectors: {modality: (ids, base vectors)} of the store.
        weight_scale: multiplies each event's own weight.
    """
    text_hashes = _text_hashes(catalog, events)
    rows = {m: {item_id: r for r, item_id in enumerate(vectors[m][0])} for m in (IMAGE, TEXT)}
    image, text, ikeys, tkeys, weights, modality_counts = [], [], [], [], [], {IMAGE: 0, TEXT: 0}
    hard, hard_rows, hard_is_image = [], [], []

    def key_of(modality: str, item_id: str) -> int:
        return item_key("image", item_id) if modality == IMAGE else item_key("text", text_hashes[item_id])

    for event in events:
        query_modality = event["query_modality"]
        other = TEXT if query_modality == IMAGE else IMAGE
        query = np.frombuffer(event["query_embedding"], dtype=np.float32)
        if event["query_kind"] == "item_id":
            query_key = key_of(query_modality, event["query_text"])
        elif event["query_kind"] == "text":
            query_key = item_key("text", text_hash(event["query_text"]))
        else:
            query_key = item_key("query-image", event["id"])
        relevant = [i for i in json.loads(event["relevant"]) if i in rows[other]]
        wrong = [rows[other][i] for i in dict.fromkeys(json.loads(event["irrelevant"] or "[]"))
                 if i in rows[other] and i not in relevant]
        for item in relevant:
            target = vectors[other][1][rows[other][item]]
            modality_counts[query_modality] += 1
            if query_modality == TEXT:
                image.append(target), text.append(query)
                ikeys.append(key_of(IMAGE, item)), tkeys.append(query_key)
            else:
                image.append(query), text.append(target)
                ikeys.append(query_key), tkeys.append(key_of(TEXT, item))
            weights.append(event["weight"] * weight_scale)
            for row in wrong:
                hard.append(vectors[other][1][row])
                hard_rows.append(len(image) - 1)
                hard_is_image.append(other == IMAGE)
    if not image:
        return None, None
    main = max(modality_counts, key=modality_counts.get)
    dim = len(image[0])
    return PairSet(np.stack(image), np.stack(text), np.asarray(ikeys, np.int64), np.asarray(tkeys, np.int64),
                   weights=np.asarray(weights, np.float32),
                   hard=np.stack(hard) if hard else np.zeros((0, dim), np.float32),
                   hard_rows=np.asarray(hard_rows, np.int64), hard_is_image=np.asarray(hard_is_image, bool)), main


def _text_hashes(catalog: Catalog, events) -> dict[str, str]:
    """Content hashes of the text items named by feedback events (relevant, irrelevant, query)."""
    ids = set()
    for event in events:
        ids.update(json.loads(event["relevant"]))
        ids.update(json.loads(event["irrelevant"] or "[]"))
        if event["query_kind"] == "item_id":
            ids.add(event["query_text"])
    rows = catalog.get_items(sorted(ids))
    return {i: r["content_hash"] for i, r in rows.items() if r["modality"] == TEXT}


def feedback_queries(events, vectors: dict) -> int:
    """How many held-out feedback events :func:`feedback_recall` can score."""
    known = {m: set(vectors[m][0]) for m in (IMAGE, TEXT)}
    return sum(1 for e in events
               if any(i in known[TEXT if e["query_modality"] == IMAGE else IMAGE] for i in json.loads(e["relevant"])))


def feedback_recall(head, events, vectors: dict, k: int = 10) -> float | None:
    """Recall@k of held-out feedback: each event's query (through its query adapter) against
    the whole gallery of its relevant items' modality."""
    if not events:
        return None
    galleries = {m: head.project(m, vectors[m][1]) for m in (IMAGE, TEXT) if len(vectors[m][0])}
    rows = {m: {item_id: r for r, item_id in enumerate(vectors[m][0])} for m in (IMAGE, TEXT)}
    hits, total = 0, 0
    for modality in (IMAGE, TEXT):
        chosen = [e for e in events if e["query_modality"] == modality]
        other = TEXT if modality == IMAGE else IMAGE
        relevant = [{rows[other][i] for i in json.loads(e["relevant"]) if i in rows[other]} for e in chosen]
        keep = [n for n, r in enumerate(relevant) if r]
        if not keep or other not in galleries:
            continue
        queries = head.project(modality, np.stack([np.frombuffer(chosen[n]["query_embedding"], np.float32)
                                                   for n in keep]), query=True)
        result = retrieval_metrics(queries, galleries[other], [relevant[n] for n in keep], ks=(k,))
        hits += result[f"recall@{k}"] * len(keep)
        total += len(keep)
    return hits / total if total else None


__all__ = ["feedback_pairs", "feedback_queries", "feedback_recall", "split_events"]
