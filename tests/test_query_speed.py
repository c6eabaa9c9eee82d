"""The query fast path: truncated text encodes, micro-batching, the query embedding cache and
the ONNX Runtime query encoder, each checked against the plain torch path it replaces."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

LONG = " ".join(["a dense opacity in the right lower lobe with air bronchograms"] * 12)  # past the context
TEXTS = ["x", "chest x-ray", "Axial CT of the abdomen showing a large cystic mass in the left kidney.", LONG]


def captions(corpus, n):
    """The corpus's first n captions, as users would phrase them (a third phrasing)."""
    import json

    from xmodal.indexer import world

    rows = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()[:n]]
    found = world.scenes(n, seed=1)  # the conftest corpus uses seed 1
    return [world.caption(found[int(r["id"].rsplit("-", 1)[1])], "user") for r in rows]


def test_truncated_text_path_equals_full_length(encoder):
    from xmodal.indexer.encoder import text_length

    tokens = encoder.tokenize(TEXTS[:3])
    assert text_length(encoder.model, tokens) < encoder.context_length  # it does cut something
    assert encoder.truncate_text
    cut = encoder.encode_texts(TEXTS)
    for text, row in zip(TEXTS, cut, strict=True):  # alone (shortest cut) and in a batch alike
        np.testing.assert_allclose(encoder.encode_texts([text])[0], row, atol=1e-5)
    encoder.truncate_text = False
    try:
        full = encoder.encode_texts(TEXTS)
    finally:
        encoder.truncate_text = True
    np.testing.assert_allclose(cut, full, atol=1e-5)


def test_length_groups_bound_padding_and_keep_every_row_once(encoder):
    from xmodal.indexer.encoder import GROUP_SLACK, length_groups, row_lengths

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 78, size=200)
    groups = length_groups(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(200))  # each row exactly once
    assert 1 < len(groups) < 200  # neither one padded batch nor one pass per row
    for group in groups:
        g = lengths[group]
        assert len(group) * g.max() <= GROUP_SLACK * g.sum() + 1e-9
    assert [len(g) for g in length_groups([7] * 16)] == [16]  # equal lengths: one pass

    texts = [*TEXTS, "lung", "a round opacity", LONG[:200], "x-ray of the left hand, no fracture"]
    tokens = encoder.tokenize(texts)
    assert len(length_groups(row_lengths(encoder.model, tokens).numpy())) > 1  # this batch is split
    batched = encoder.encode_tokens(tokens)  # in groups, rows put back in order
    for i, text in enumerate(texts):
        np.testing.assert_allclose(batched[i], encoder.encode_texts([text])[0], atol=1e-5)


class Gate:
    """An encode function that blocks its first call until released, so that the submissions
    made meanwhile queue up and form the next batch."""

    def __init__(self, encode):
        self.encode = encode
        self.release = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self, items):
        self.batches.append(len(items))
        if len(self.batches) == 1:
            self.entered.set()
            self.release.wait(30)
        return self.encode(items)


def test_micro_batches_equal_single_encodes_and_a_bad_item_fails_alone(encoder):
    from xmodal.server.batcher import MicroBatcher

    gate = Gate(lambda pixels: encoder.encode_image_tensors(torch.stack(pixels)))
    batcher = MicroBatcher(gate, max_batch=8, max_wait_ms=0, name="image")
    pixels = [
        torch.rand(3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(i))
        for i in range(6)
    ]
    first = batcher.submit(pixels[0])
    assert gate.entered.wait(30)
    bad = torch.rand(3, 7, 7)  # a wrong shape: stacking the batch fails, then only this one does
    futures = [batcher.submit(p) for p in pixels[1:3]] + [batcher.submit(bad)] + [batcher.submit(p) for p in pixels[3:]]
    gate.release.set()
    results = [first.result(30)] + [f.result(30) for i, f in enumerate(futures) if i != 2]
    with pytest.raises(RuntimeError):
        futures[2].result(30)
    assert gate.batches[:2] == [1, 6]  # the five good ones and the bad one queued into one batch
    single = encoder.encode_image_tensors(torch.stack(pixels))
    np.testing.assert_allclose(np.stack(results), single, atol=1e-5)


@pytest.mark.parametrize("workers", [1, 2])
def test_batcher_runs_as_many_batches_at_once_as_the_encoder_has_passes(workers):
    from xmodal.server.batcher import MicroBatcher

    meet = threading.Barrier(2, timeout=2)  # two passes at once, or a BrokenBarrierError
    in_flight, most = [0], [0]
    counting = threading.Lock()

    def encode(items):
        with counting:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            meet.wait()
            return np.array([[float(i)] for i in items], np.float32)
        finally:
            with counting:
                in_flight[0] -= 1

    batcher = MicroBatcher(encode, max_batch=8, max_wait_ms=0, workers=workers, name="text")
    first = batcher.submit(1)
    while in_flight[0] == 0:  # the first batch holds its worker at the barrier
        threading.Event().wait(0.005)
    second = batcher.submit(2)
    if workers == 2:  # a second worker takes it: both passes meet
        assert first.result(10)[0] == 1.0 and second.result(10)[0] == 2.0
        assert most[0] == 2
    else:  # one pass at a time: the first times out alone, then the second does too
        with pytest.raises(threading.BrokenBarrierError):
            first.result(10)
        with pytest.raises(threading.BrokenBarrierError):
            second.result(10)
        assert most[0] == 1


class Serving:
    """A real gRPC server on an ephemeral port with the given query encoding."""

    def __init__(self, data, encoder, encoding):
        from xmodal.client import SearchClient
        from xmodal.server.engine import SearchEngine
        from xmodal.server.service import Server

        self.engine = SearchEngine(data, encoder, encoding=encoding)
        self.engine.load_current()
        self.server = Server(self.engine, host="127.0.0.1", port=0).start()
        self.client = SearchClient(self.server.address, timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.stop(grace=1)
        self.engine.close()


def test_concurrent_searches_answer_as_one_at_a_time(indexed, encoder, world_corpus):
    from xmodal.client import InvalidArgument
    from xmodal.server.batcher import QueryEncoding

    queries = captions(world_corpus, 24)
    with Serving(indexed, encoder, QueryEncoding(runtime="torch", max_batch=1, cache_size=0)) as alone:
        expected = [alone.client.search(text=q, k=10) for q in queries]
    encoding = QueryEncoding(runtime="torch", max_batch=16, max_wait_ms=20, cache_size=0)
    with Serving(indexed, encoder, encoding) as batched:

        def search(query):
            try:
                return batched.client.search(text=query, k=10) if query else batched.client.search(image=b"no image")
            except InvalidArgument as exc:
                return exc

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(search, queries[:8] + [""] + queries[8:]))
    assert isinstance(got.pop(8), InvalidArgument)  # the bad query failed, alone
    for want, have in zip(expected, got, strict=True):
        assert [h.item_id for h in have] == [h.item_id for h in want]
        np.testing.assert_allclose([h.score for h in have], [h.score for h in want], atol=1e-4)


def test_cache_is_keyed_by_encoder_and_cleared_when_it_changes(running, world_corpus):
    from xmodal.indexer.encoder import load_encoder
    from xmodal.server.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(4)
    cache.put("model-a", "text", b"k", np.ones(3, np.float32))
    assert cache.get("model-a", "text", b"k") is not None
    assert cache.get("model-b", "text", b"k") is None  # another encoder never sees it...
    assert len(cache) == 0  # ...and everything of the old one is gone
    for i in range(6):
        cache.put("model-b", "text", bytes([i]), np.full(3, i, np.float32))
    assert len(cache) == 4 and cache.get("model-b", "text", bytes([0])) is None  # least recently used out

    queries = running.engine.queries
    text = captions(world_corpus, 1)[0]
    hits_before = queries.cache.hits
    first = running.client.search(text=text, k=5)
    again = running.client.search(text="  " + text.upper() + " ")  # the tokenizer's same input: a hit
    assert queries.cache.hits == hits_before + 1
    assert [h.item_id for h in again.hits[:5]] == [h.item_id for h in first]
    assert REGISTRY.get_sample_value("xmodal_query_cache_hit_ratio") == pytest.approx(queries.cache.hit_rate)
    assert REGISTRY.get_sample_value("xmodal_query_cache_lookups_total", {"modality": "text", "result": "hit"}) >= 1

    other = load_encoder("xmodal-demo", "none")  # same architecture, other weights: another identity
    original, queries.encoder = queries.encoder, other
    try:
        size = len(queries.cache)
        assert size >= 1
        hits = queries.cache.hits
        vector = queries.encode_query(text=text)[1]
        assert queries.cache.hits == hits and len(queries.cache) == 1  # a miss; the old entries dropped
        np.testing.assert_allclose(vector[0], other.encode_texts([text])[0], atol=1e-5)
    finally:
        queries.encoder = original


@pytest.fixture(scope="module")
def exported(encoder, tmp_path_factory):
    from xmodal.indexer.onnx_encoder import exported

    return exported(encoder, tmp_path_factory.mktemp("onnx-cache"))


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_onnx_query_encoder_is_checked_against_torch(encoder, exported, runtime, indexed, world_corpus, monkeypatch):
    from xmodal.indexer import onnx_encoder
    from xmodal.server.engine import SearchEngine

    monkeypatch.setattr(onnx_encoder, "exported", lambda enc, root=None: exported)
    fast = onnx_encoder.query_encoder(encoder, runtime)
    assert fast.runtime == runtime and fast.identity == encoder.identity
    worst = onnx_encoder.agreement(fast, encoder)
    assert min(worst.values()) >= onnx_encoder.MIN_COSINE[runtime]
    np.testing.assert_allclose(fast.encode_texts(TEXTS), encoder.encode_texts(TEXTS), atol=0.02)
    two = onnx_encoder.query_encoder(encoder, runtime, passes=2)  # two passes at once, same vectors
    queries = captions(world_corpus, 12)
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda q: two.encode_texts([q])[0], queries))
    alone = [fast.encode_texts([q])[0] for q in queries]  # (int8 quantizes per pass: compare single with single)
    np.testing.assert_allclose(np.stack(parallel), np.stack(alone), atol=1e-5)

    torch_engine = SearchEngine(indexed, encoder)
    fast_engine = SearchEngine(indexed, encoder, query_encoder=fast)
    for engine in (torch_engine, fast_engine):
        engine.load_current()
    try:
        overlap = []
        for query in captions(world_corpus, 20):
            want = {h.item_id for h in torch_engine.search(text=query, k=10).hits}
            have = {h.item_id for h in fast_engine.search(text=query, k=10).hits}
            overlap.append(len(want & have) / 10)
        assert np.mean(overlap) >= 0.95
    finally:
        torch_engine.close()
        fast_engine.close()

    monkeypatch.setitem(onnx_encoder.MIN_COSINE, runtime, 1.01)  # a check nothing passes: torch it is
    assert onnx_encoder.query_encoder(encoder, runtime) is encoder
