"""A real gRPC server on 127.0.0.1 (ephemeral port): search, items, status, health, errors."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from xmodal import client as xc
from xmodal.v1 import xmodal_pb2 as pb
from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

from conftest import RunningServer


def corpus_records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]


def test_text_query_returns_k_image_hits(running, world_corpus):
    caption = corpus_records(world_corpus)[5]["caption"]
    result = running.client.search(text=caption, k=7)
    assert len(result) == 7 and result.snapshot_id == running.engine.snapshot.id
    assert [h.rank for h in result] == list(range(1, 8))
    assert all(h.modality == "image" and h.source.endswith(".png") for h in result)
    scores = [h.score for h in result]
    assert scores == sorted(scores, reverse=True)
    assert result.hits[0].metadata["label"] in ("circle", "square", "triangle", "cross", "ring", "diamond")
    assert result.timing["total_ms"] >= result.timing["search_ms"] > 0


def test_image_bytes_query_returns_text_hits_and_finds_itself(running, world_corpus):
    record = corpus_records(world_corpus)[11]
    image = (world_corpus / record["image"]).read_bytes()
    texts = running.client.search(image=image, k=5)
    assert len(texts) == 5 and all(h.modality == "text" and h.text for h in texts)
    same = running.client.search(image=image, target="image", k=3)
    assert same.hits[0].item_id == record["id"] and same.hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_item_id_query(running, world_corpus):
    record = corpus_records(world_corpus)[2]
    hits = running.client.search(item_id=f"{record['id']}#caption", k=4)
    assert len(hits) == 4 and all(h.modality == "image" for h in hits)
    itself = running.client.search(item_id=record["id"], target="image", k=1)
    assert itself.hits[0].item_id == record["id"] and itself.hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_k_larger_than_the_index_returns_everything(running):
    hits = running.client.search(text="a red circle", k=1000)
    assert len(hits) == 400 and len({h.item_id for h in hits}) == 400


def test_get_items_returns_content(running, world_corpus):
    record = corpus_records(world_corpus)[0]
    image, text = running.client.get_items([record["id"], f"{record['id']}#caption"])
    assert image.modality == "image" and image.image == (world_corpus / record["image"]).read_bytes()
    assert text.modality == "text" and text.text == record["caption"] and text.metadata["label"] == record["label"]
    assert running.client.get_items([record["id"]], metadata_only=True)[0].image == b""
    with pytest.raises(xc.NotFound, match="nope"):
        running.client.get_items([record["id"], "nope"])


def test_status_health_and_reflection(running):
    status = running.client.status()
    assert status.serving and status.snapshot_id == running.engine.snapshot.id and status.head_kind == "mlp"
    assert status.counts == {
        "image": {"catalog_items": 400, "indexed": 400},
        "text": {"catalog_items": 400, "indexed": 400},
    }
    assert status.encoder.startswith("xmodal-demo@") and {"zero_shot", "adapted", "fit"} <= set(status.metrics)
    assert running.client.health() == "SERVING" and running.client.health("xmodal.v1.SearchService") == "SERVING"
    with grpc.insecure_channel(running.server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
    assert {"xmodal.v1.SearchService", "grpc.health.v1.Health"} <= names


def raw_search(address: str, request) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.SearchServiceStub(channel).Search(request, timeout=30)
    return info.value


BAD_REQUESTS = [
    ("empty text", pb.SearchRequest(query=pb.Query(text="  "), k=5), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (
        "not an image",
        pb.SearchRequest(query=pb.Query(image=b"GIF89a-but-not-really"), k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image",
    ),
    (
        "unknown item",
        pb.SearchRequest(query=pb.Query(item_id="no-such-item"), k=5),
        grpc.StatusCode.NOT_FOUND,
        "no-such-item",
    ),
    (
        "k = 0",
        pb.SearchRequest(query=pb.Query(text="a red circle"), k=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "k must be between 1 and 1000",
    ),
    (
        "k above the limit",
        pb.SearchRequest(query=pb.Query(text="a red circle"), k=1001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "k must be between 1 and 1000",
    ),
    (
        "unknown target",
        pb.SearchRequest(query=pb.Query(text="a red circle"), target=7, k=5),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown modality 7",
    ),
    ("no query", pb.SearchRequest(k=5), grpc.StatusCode.INVALID_ARGUMENT, "query is empty"),
]


@pytest.mark.parametrize("name, request_, code, details", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_status_and_details_and_server_keeps_serving(running, name, request_, code, details):
    error = raw_search(running.server.address, request_)
    assert error.code() == code
    assert details in error.details()
    assert running.client.health() == "SERVING"
    assert len(running.client.search(text="a small green square", k=3)) == 3


def test_client_maps_status_codes_to_its_own_errors(running):
    with pytest.raises(xc.InvalidArgument, match="empty"):
        running.client.search(text="")
    with pytest.raises(xc.NotFound):
        running.client.search(item_id="missing")
    with pytest.raises(xc.InvalidArgument):
        running.client.search(text="x", item_id="y")  # refused before any call


def test_size_limits_give_resource_exhausted(indexed, encoder):
    import io

    from PIL import Image

    server = RunningServer(indexed, encoder, max_image_bytes=1000, max_pixels=10_000, max_text_chars=50)
    try:
        buffer = io.BytesIO()
        Image.effect_noise((200, 200), 50).save(buffer, "PNG")
        with pytest.raises(xc.ResourceExhausted, match="over the limit of 1,000"):
            server.client.search(image=buffer.getvalue())
        small = io.BytesIO()
        Image.new("L", (200, 200)).save(small, "PNG")  # < 1000 bytes, 40,000 pixels
        with pytest.raises(xc.ResourceExhausted, match="40,000 pixels"):
            server.client.search(image=small.getvalue())
        with pytest.raises(xc.ResourceExhausted, match="characters"):
            server.client.search(text="x" * 51)
        assert server.client.health() == "SERVING"
    finally:
        server.stop()


def test_no_snapshot_then_one_appears(tmp_path, encoder, world_corpus):
    from xmodal.indexer.pipeline import index_corpus

    server = RunningServer(tmp_path, encoder)
    try:
        assert server.client.health() == "NOT_SERVING"
        with pytest.raises(xc.FailedPrecondition, match="no snapshot is loaded") as info:
            server.client.search(text="a red circle")
        assert "xmodal index" in str(info.value)
        assert not server.client.status().serving
        index_corpus(world_corpus, tmp_path, encoder, progress=False)
        assert server.engine.load_current()  # what the watcher thread does every few seconds
        assert server.client.health() == "SERVING"
        assert len(server.client.search(text="a red circle", k=2)) == 2
    finally:
        server.stop()


def test_unreachable_server_is_unavailable():
    with xc.SearchClient("127.0.0.1:1", timeout=3) as client:
        with pytest.raises(xc.Unavailable, match="127.0.0.1:1"):
            client.status()


def test_server_side_deadline(indexed, encoder):
    import time as _time

    from xmodal.indexer.errors import DeadlineExceeded

    server = RunningServer(indexed, encoder, deadline_s=1)
    try:
        with pytest.raises(DeadlineExceeded, match="during queueing"):  # the caller gave up while it waited
            server.engine.search(text="a red ring", k=3, deadline=_time.monotonic() - 1)
        # through gRPC, a client deadline shorter than the server's cap still gets an answer when it is quick
        assert len(server.client.search(text="a red ring", k=3, timeout=5)) == 3
        assert server.engine.limits.deadline_s == 1
    finally:
        server.stop()
