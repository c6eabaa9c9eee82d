"""Hostile and malformed requests across every RPC: each gets a non-OK status with a
useful details string, the server keeps answering, and its memory stays flat."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib

import grpc
import pytest
from PIL import Image

from xmodal.server.auth import KeyRing, add_key
from xmodal.server.engine import SearchEngine
from xmodal.server.service import Server
from xmodal.v1 import xmodal_pb2 as pb
from xmodal.v1 import xmodal_pb2_grpc as pb_grpc


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height RGB (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def target(indexed, encoder, tmp_path_factory):
    import shutil

    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(indexed, folder / "data")  # hostile admin calls must not touch the shared fixture
    path = folder / "keys.json"
    keys = {role: add_key(path, f"fuzz-{role}", role) for role in ("search", "feedback", "admin")}
    engine = SearchEngine(folder / "data", encoder)
    engine.load_current()
    server = Server(engine, port=0, keys=KeyRing.load(path)).start()
    yield server, keys
    server.stop(grace=1)


def hostile_requests(world_corpus, item_id: str):
    rng = random.Random(7)
    good_png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good_png, "PNG")
    good = good_png.getvalue()
    s, f, a = "search", "feedback", "admin"
    q = pb.Query
    cases = [
        # (name, rpc, request, credential role or None/"wrong")
        ("truncated png", "Search", pb.SearchRequest(query=q(image=good[:40]), k=5), s),
        ("truncated png 2", "Search", pb.SearchRequest(query=q(image=good[: len(good) // 2]), k=5), s),
        ("png header only", "Search", pb.SearchRequest(query=q(image=good[:8]), k=5), s),
        ("30000x30000 png", "Search", pb.SearchRequest(query=q(image=png_declaring(30000, 30000)), k=5), s),
        ("1 GB declared png", "Search", pb.SearchRequest(query=q(image=png_declaring(20000, 18000)), k=5), s),
        ("zero-size png", "Search", pb.SearchRequest(query=q(image=png_declaring(0, 0)), k=5), s),
        ("empty image", "Search", pb.SearchRequest(query=q(image=b""), k=5), s),
        ("gif magic only", "Search", pb.SearchRequest(query=q(image=b"GIF89a"), k=5), s),
        ("jpeg magic only", "Search", pb.SearchRequest(query=q(image=b"\xff\xd8\xff\xe0" + bytes(20)), k=5), s),
        ("huge text", "Search", pb.SearchRequest(query=q(text="x" * 2_000_000), k=5), s),
        ("whitespace text", "Search", pb.SearchRequest(query=q(text=" \t\n "), k=5), s),
        ("empty text", "Search", pb.SearchRequest(query=q(text=""), k=5), s),
        ("negative k", "Search", pb.SearchRequest(query=q(text="red"), k=-3), s),
        ("huge k", "Search", pb.SearchRequest(query=q(text="red"), k=2_000_000_000), s),
        ("k zero", "Search", pb.SearchRequest(query=q(text="red"), k=0), s),
        ("target 5", "Search", pb.SearchRequest(query=q(text="red"), target=5, k=5), s),
        ("target -1", "Search", pb.SearchRequest(query=q(text="red"), target=-1, k=5), s),
        ("unknown item", "Search", pb.SearchRequest(query=q(item_id="no-such"), k=5), s),
        ("empty item", "Search", pb.SearchRequest(query=q(item_id=""), k=5), s),
        ("sql-ish item", "Search", pb.SearchRequest(query=q(item_id="x' OR '1'='1"), k=5), s),
        ("no query", "Search", pb.SearchRequest(k=5), s),
        ("no credentials", "Search", pb.SearchRequest(query=q(text="red"), k=5), None),
        ("wrong key", "Search", pb.SearchRequest(query=q(text="red"), k=5), "wrong"),
        ("oversized message", "Search", pb.SearchRequest(query=q(image=bytes(33 * 1024 * 1024)), k=5), s),
        ("get no ids", "GetItems", pb.GetItemsRequest(), s),
        ("get empty id", "GetItems", pb.GetItemsRequest(item_ids=[""]), s),
        ("get unknown", "GetItems", pb.GetItemsRequest(item_ids=["nope"]), s),
        ("get too many", "GetItems", pb.GetItemsRequest(item_ids=[f"x{i}" for i in range(500)]), s),
        ("get sql-ish", "GetItems", pb.GetItemsRequest(item_ids=["'; DROP TABLE items; --"]), s),
        ("get no credentials", "GetItems", pb.GetItemsRequest(item_ids=[item_id]), None),
        ("status wrong key", "GetStatus", pb.GetStatusRequest(), "wrong"),
        ("status no credentials", "GetStatus", pb.GetStatusRequest(), None),
        (
            "feedback nan weight",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id], weight=float("nan")),
            f,
        ),
        (
            "feedback inf weight",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id], weight=float("inf")),
            f,
        ),
        (
            "feedback negative weight",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id], weight=-1),
            f,
        ),
        (
            "feedback huge weight",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id], weight=1e30),
            f,
        ),
        ("feedback no relevant", "SubmitFeedback", pb.SubmitFeedbackRequest(query=q(text="red")), f),
        (
            "feedback unknown relevant",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=["ghost"]),
            f,
        ),
        (
            "feedback empty relevant id",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[""]),
            f,
        ),
        (
            "feedback unknown irrelevant",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id], irrelevant_ids=["ghost"]),
            f,
        ),
        (
            "feedback too many ids",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id] * 300),
            f,
        ),
        ("feedback no query", "SubmitFeedback", pb.SubmitFeedbackRequest(relevant_ids=[item_id]), f),
        (
            "feedback empty text",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text=""), relevant_ids=[item_id]),
            f,
        ),
        (
            "feedback bad image",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(image=b"\x00" * 100), relevant_ids=[item_id]),
            f,
        ),
        (
            "feedback bomb image",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(image=png_declaring(30000, 30000)), relevant_ids=[item_id]),
            f,
        ),
        (
            "feedback unknown query item",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(item_id="ghost"), relevant_ids=[item_id]),
            f,
        ),
        (
            "feedback long source",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id], source="s" * 1000),
            f,
        ),
        (
            "feedback by search role",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id]),
            s,
        ),
        (
            "feedback no credentials",
            "SubmitFeedback",
            pb.SubmitFeedbackRequest(query=q(text="red"), relevant_ids=[item_id]),
            None,
        ),
        ("refit bad mode", "Refit", pb.RefitRequest(mode="everything"), a),
        ("refit by search role", "Refit", pb.RefitRequest(mode="query"), s),
        ("refit by feedback role", "Refit", pb.RefitRequest(mode="query"), f),
        ("refit no credentials", "Refit", pb.RefitRequest(), None),
        ("list by search role", "ListSnapshots", pb.ListSnapshotsRequest(), s),
        ("list wrong key", "ListSnapshots", pb.ListSnapshotsRequest(), "wrong"),
        ("rollback empty id", "Rollback", pb.RollbackRequest(snapshot_id=""), a),
        ("rollback unknown id", "Rollback", pb.RollbackRequest(snapshot_id="20990101T000000000Z-ffffff"), a),
        ("rollback path traversal", "Rollback", pb.RollbackRequest(snapshot_id="../../etc"), a),
        ("rollback by feedback role", "Rollback", pb.RollbackRequest(snapshot_id="x"), f),
    ]
    for n in range(6):  # random bytes of random sizes
        blob = bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 17, 500, 4096))))
        cases.append((f"random bytes {n}", "Search", pb.SearchRequest(query=q(image=blob), k=5), s))
    return cases


SERVICE = {
    "Search": "SearchService",
    "GetItems": "SearchService",
    "GetStatus": "SearchService",
    "SubmitFeedback": "SearchService",
    "Refit": "AdminService",
    "ListSnapshots": "AdminService",
    "Rollback": "AdminService",
}


def test_hostile_requests_get_clear_errors_and_the_server_survives(target, world_corpus):
    server, keys = target
    keys = {**keys, "wrong": keys["admin"][:-2] + "zz"}
    search_only = keys["search"]
    item_id = json.loads((world_corpus / "captions.jsonl").read_text().splitlines()[0])["id"]
    cases = hostile_requests(world_corpus, item_id)
    assert len(cases) >= 60
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stubs = {"SearchService": pb_grpc.SearchServiceStub(channel), "AdminService": pb_grpc.AdminServiceStub(channel)}
    start_rss = rss_mb()
    outcomes = {}
    for name, method, request, role in cases:
        metadata = None if role is None else (("authorization", f"Bearer {keys[role]}"),)
        call = getattr(stubs[SERVICE[method]], method)
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=30, metadata=metadata)
        error = info.value
        outcomes[name] = error.code().name
        assert error.code() != grpc.StatusCode.OK
        assert error.code() != grpc.StatusCode.INTERNAL, (name, error.details())
        assert error.details() and len(error.details()) > 10, (name, error.details())
    # invalid UTF-8 in a string field, sent as raw bytes
    raw = channel.unary_unary("/xmodal.v1.SearchService/Search", request_serializer=None, response_deserializer=None)
    bad_utf8 = b"\x0a\x04\x0a\x02\xff\xfe\x18\x05"  # query{text: b"\xff\xfe"}, k=5
    with pytest.raises(grpc.RpcError) as info:
        raw(bad_utf8, timeout=30, metadata=(("authorization", f"Bearer {search_only}"),))
    assert info.value.code() != grpc.StatusCode.OK and info.value.details()
    # the server still answers health and search
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ok = stubs["SearchService"].Search(
        pb.SearchRequest(query=pb.Query(text="a red ring"), k=3),
        timeout=30,
        metadata=(("authorization", f"Bearer {search_only}"),),
    )
    assert len(ok.hits) == 3
    grown = rss_mb() - start_rss
    assert grown < 100, f"memory grew by {grown:.0f} MB"
    channel.close()
    codes = set(outcomes.values())
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED"} <= codes
