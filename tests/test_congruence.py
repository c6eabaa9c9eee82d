"""Congruence: the server's top-10 over gRPC equals a brute-force numpy search over the same vectors."""

from __future__ import annotations

import random

import numpy as np

from xmodal.indexer import world
from xmodal.indexer.catalog import Catalog
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.store import BaseStore

K = 10


def brute_force(query: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = gallery @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def test_server_top10_equals_numpy_for_200_random_queries(running, indexed, encoder):
    catalog = Catalog(indexed / "catalog.sqlite")
    store = BaseStore(indexed / "base", catalog)
    head = running.engine.snapshot.head
    gallery = {}
    for modality in (IMAGE, TEXT):
        loaded = store.load(modality)
        ids, base = loaded.ids, loaded.array
        gallery[modality] = (np.array(ids), head.project(modality, base))
    rng = random.Random(1234)
    scenes = world.scenes(200, seed=99)  # captions the corpus mostly does not contain
    compared = 0
    for i in range(200):
        if i % 2 == 0:  # a new text query
            text = world.caption(scenes[i])
            query = head.project(TEXT, encoder.encode_texts([text]))[0]
            result = running.client.search(text=text, k=K)
            target = IMAGE
        else:  # an item-id query, either modality
            modality = rng.choice((IMAGE, TEXT))
            ids, vectors = gallery[modality]
            row = rng.randrange(len(ids))
            query = vectors[row]
            target = TEXT if modality == IMAGE else IMAGE
            result = running.client.search(item_id=str(ids[row]), k=K)
        ids, vectors = gallery[target]
        order, scores = brute_force(query, vectors, K)
        got_scores = np.array([h.score for h in result.hits])
        np.testing.assert_allclose(got_scores, scores, atol=1e-4)
        got_ids = [h.item_id for h in result.hits]
        for position, (got, want) in enumerate(zip(got_ids, ids[order], strict=True)):
            if got != want:  # only a tie may swap two items
                assert abs(vectors[list(ids).index(got)] @ query - scores[position]) < 1e-4, (i, position)
        compared += 1
    assert compared == 200
