"""Retrieval metrics: recall@k and MRR for text->image and image->text."""

from __future__ import annotations

import numpy as np

from .errors import InvalidArgument

DEFAULT_KS = (1, 5, 10)


def first_ranks(queries: np.ndarray, gallery: np.ndarray, relevant: list[set[int]], chunk: int = 1024) -> np.ndarray:
    """Per query, the rank (1 = top) of its best-placed relevant gallery item: one plus the
    number of gallery items scoring strictly higher. The per-query figures that recall@k
    (rank <= k) and MRR (mean of 1/rank) average, and that a paired test compares."""
    if len(queries) != len(relevant):
        raise InvalidArgument(
            f"{len(queries)} queries but {len(relevant)} relevance sets: pass one set of "
            "relevant gallery rows per query"
        )
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ gallery.T
        for i, row in enumerate(scores):
            best = row[list(relevant[start + i])].max()
            ranks[start + i] = int((row > best).sum()) + 1
    return ranks


def retrieval_metrics(
    queries: np.ndarray, gallery: np.ndarray, relevant: list[set[int]], ks=DEFAULT_KS, chunk: int = 1024
) -> dict[str, float]:
    """Recall@k (a hit if any relevant item is in the top k) and MRR of the first relevant.

    Args:
        queries: (Q, d) normalised query vectors.
        gallery: (G, d) normalised gallery vectors.
        relevant: for each query, the gallery rows that count as correct.

    Returns:
        {"recall@1": ..., "recall@5": ..., "recall@10": ..., "mrr": ..., "queries": Q}
    """
    if len(queries) != len(relevant):
        raise InvalidArgument(
            f"{len(queries)} queries but {len(relevant)} relevance sets: pass one set of "
            "relevant gallery rows per query"
        )
    if len(queries) == 0 or len(gallery) == 0:
        return {**{f"recall@{k}": 0.0 for k in ks}, "mrr": 0.0, "queries": 0}
    first_rank = first_ranks(queries, gallery, relevant, chunk)
    out = {f"recall@{k}": float((first_rank <= k).mean()) for k in ks}
    out["mrr"] = float((1.0 / first_rank).mean())
    out["queries"] = int(len(queries))
    return out


def pair_metrics(
    image_ids: list[str],
    image_vecs: np.ndarray,
    text_ids: list[str],
    text_vecs: np.ndarray,
    pairs: list[tuple[str, str]],
    text_groups: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Text->image and image->text metrics over the items of ``pairs`` (a held-out split):
    each query's gallery is every item of the other modality that appears in the pairs.

    Args:
        text_groups: text id -> content key (e.g. its hash). Texts with the same content
            are interchangeable: an image paired with any of them is a right answer for
            each of them, and each of them is a right answer for that image.
    """
    img_row = {i: r for r, i in enumerate(image_ids)}
    txt_row = {t: r for r, t in enumerate(text_ids)}
    pairs = [(i, t) for i, t in pairs if i in img_row and t in txt_row]
    images = sorted({i for i, _ in pairs})
    texts = sorted({t for _, t in pairs})
    if not pairs:
        return {}
    g_img = {i: n for n, i in enumerate(images)}
    g_txt = {t: n for n, t in enumerate(texts)}
    groups = text_groups or {}

    def group(text_id: str) -> str:
        return groups.get(text_id, text_id)

    members: dict[str, list[str]] = {}
    for t in texts:
        members.setdefault(group(t), []).append(t)
    text_rel: dict[str, set[int]] = {t: set() for t in texts}
    image_rel: dict[str, set[int]] = {i: set() for i in images}
    for i, t in pairs:
        for same in members[group(t)]:
            text_rel[same].add(g_img[i])
            image_rel[i].add(g_txt[same])
    img_gallery = image_vecs[[img_row[i] for i in images]]
    txt_gallery = text_vecs[[txt_row[t] for t in texts]]
    return {
        "text_to_image": retrieval_metrics(txt_gallery, img_gallery, [text_rel[t] for t in texts]),
        "image_to_text": retrieval_metrics(img_gallery, txt_gallery, [image_rel[i] for i in images]),
    }
