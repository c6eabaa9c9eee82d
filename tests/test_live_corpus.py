"""The live corpus over gRPC: upserts and deletes searchable at once, across restarts,
refits and rollbacks; bad batches applied not at all; the `index` role."""

from __future__ import annotations

import io
import json
import shutil

import grpc
import pytest
from PIL import Image

from xmodal.indexer.snapshot import DataDir
from xmodal.server.auth import KeyRing
from xmodal.server.engine import SearchEngine
from xmodal.server.service import Server
from xmodal.v1 import xmodal_pb2 as pb
from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

from conftest import RunningServer

CAPTION = "a tiny violet star in the upper left corner, zq-7781"  # found in no generated caption


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


class Live:
    """A server over a copy of the indexed corpus, with raw stubs (nothing pre-validated)."""

    def __init__(self, data, encoder):
        self.data = data
        self.server = RunningServer(data, encoder)
        self.index = pb_grpc.IndexServiceStub(self.server.client._channel)
        self.search_stub = pb_grpc.SearchServiceStub(self.server.client._channel)

    def upsert(self, *items: pb.NewItem) -> pb.UpsertItemsResponse:
        return self.index.UpsertItems(pb.UpsertItemsRequest(items=list(items)), timeout=60)

    def delete(self, *ids: str, purge: bool = False) -> pb.DeleteItemsResponse:
        return self.index.DeleteItems(pb.DeleteItemsRequest(item_ids=list(ids), purge=purge), timeout=60)

    def ids(self, **query) -> list[str]:
        return [h.item_id for h in self.server.client.search(k=50, **query).hits]

    def stop(self):
        self.server.stop()


@pytest.fixture
def live(tmp_path, indexed, encoder):
    shutil.copytree(indexed, tmp_path / "data")
    server = Live(tmp_path / "data", encoder)
    yield server
    server.stop()


def new_case(suffix: str = "") -> list[pb.NewItem]:
    return [
        pb.NewItem(
            item_id=f"case-1{suffix}",
            image=png((140, 60, 200)),
            source="new/case-1.png",
            metadata_json=json.dumps({"ward": "A"}),
        ),
        pb.NewItem(item_id=f"case-1{suffix}#report", text=CAPTION, pair_id=f"case-1{suffix}"),
    ]


def test_upserted_items_are_searchable_when_the_call_returns(live):
    answer = live.upsert(*new_case())
    assert (answer.added, answer.changed, answer.unchanged, answer.pairs_added) == (2, 0, 0, 1)
    assert live.ids(text=CAPTION, target="text")[0] == "case-1#report"
    assert live.ids(image=png((140, 60, 200)), target="image")[0] == "case-1"  # the new image, by its picture
    assert live.ids(item_id="case-1", target="image")[0] == "case-1"
    item = live.server.client.get_items(["case-1"])[0]
    assert item.image == png((140, 60, 200)) and item.metadata == {"ward": "A"} and item.source == "new/case-1.png"
    status = live.server.client.status()
    assert status.counts["image"] == {"catalog_items": 401, "indexed": 401}
    again = live.upsert(*new_case())
    assert (again.added, again.changed, again.unchanged, again.pairs_added) == (0, 0, 2, 0)


def test_a_replaced_item_is_found_by_its_new_content_only(live):
    live.upsert(*new_case())
    changed = live.upsert(pb.NewItem(item_id="case-1#report", text="a huge orange square, kk-1234"))
    assert (changed.added, changed.changed) == (0, 1)
    hits = live.server.client.search(text="a huge orange square, kk-1234", target="text", k=3).hits
    assert hits[0].item_id == "case-1#report" and hits[0].text == "a huge orange square, kk-1234"
    assert live.ids(text=CAPTION, target="text").count("case-1#report") <= 1


def test_replacing_an_indexed_item_hides_its_old_vector(live):
    first = live.ids(text="a large red circle", target="text")[0]
    old = live.server.client.get_items([first])[0].text
    live.upsert(pb.NewItem(item_id=first, text=CAPTION))
    assert live.ids(text=CAPTION, target="text")[0] == first
    assert live.ids(text=old, target="text").count(first) <= 1
    assert live.server.client.get_items([first])[0].text == CAPTION


def test_deleted_items_never_come_back(live, encoder):
    live.upsert(*new_case())
    indexed_image = live.ids(text="a large red circle")[0]
    answer = live.delete("case-1", indexed_image, "no-such-item")
    assert set(answer.deleted_ids) == {"case-1", indexed_image} and list(answer.unknown_ids) == ["no-such-item"]

    def gone():
        for query in (
            {"text": CAPTION},
            {"text": "a large red circle"},
            {"item_id": "case-1#report"},
            {"image": png((140, 60, 200)), "target": "image"},
        ):
            found = live.ids(**query)
            assert "case-1" not in found and indexed_image not in found, query
        for item_id in ("case-1", indexed_image):
            with pytest.raises(Exception) as error:
                live.server.client.get_items([item_id])
            assert "unknown item id" in str(error.value)
            with pytest.raises(Exception) as error:
                live.server.client.search(item_id=item_id)
            assert "no indexed item" in str(error.value)

    gone()
    live.server.stop()
    live.server = RunningServer(live.data, encoder)  # a restart rebuilds the live view from the catalog
    gone()
    assert "case-1#report" in live.ids(text=CAPTION, target="text")  # the undeleted half stays


def test_upserts_and_deletes_survive_a_full_refit_and_a_rollback(live):
    before = DataDir(live.data).current_id()
    live.upsert(*new_case())
    gone = live.ids(text="a large red circle")[0]
    live.delete(gone)
    run = live.server.client.wait_for_refit(live.server.client.refit("full"), timeout=600)
    assert run.mode == "full" and run.state in ("promoted", "rejected"), run.message
    for snapshot_id in (DataDir(live.data).current_id(), before):
        live.server.client.rollback(snapshot_id)
        assert live.ids(text=CAPTION, target="text")[0] == "case-1#report", snapshot_id
        assert gone not in live.ids(text="a large red circle"), snapshot_id


BAD = {
    "no content": (pb.NewItem(item_id="bad"), "INVALID_ARGUMENT", "exactly one of text or image"),
    "undecodable image": (pb.NewItem(item_id="bad", image=b"not an image"), "INVALID_ARGUMENT", "'bad'"),
    "unknown pair": (pb.NewItem(item_id="bad", text="x", pair_id="nope"), "INVALID_ARGUMENT", "pair_id 'nope'"),
    "same-modality pair": (pb.NewItem(item_id="bad", text="x", pair_id="ok#text"), "INVALID_ARGUMENT", "another text"),
    "long id": (pb.NewItem(item_id="b" * 513, text="x"), "INVALID_ARGUMENT", "over 512"),
    "control characters": (pb.NewItem(item_id="bad\n1", text="x"), "INVALID_ARGUMENT", "control characters"),
    "metadata not an object": (
        pb.NewItem(item_id="bad", text="x", metadata_json="[1]"),
        "INVALID_ARGUMENT",
        "must be a JSON object",
    ),
    "text too long": (pb.NewItem(item_id="bad", text="x" * 10_001), "RESOURCE_EXHAUSTED", "'bad'"),
    "another modality under a known id": (
        pb.NewItem(item_id="source-1-000001", text="x"),
        "INVALID_ARGUMENT",
        "already stored as image",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_item_rejects_its_whole_batch(live, case):
    item, code, details = BAD[case]
    good = pb.NewItem(item_id="ok#text", text=CAPTION)
    with pytest.raises(grpc.RpcError) as error:
        live.upsert(good, item)
    assert error.value.code().name == code and details in error.value.details()
    with pytest.raises(Exception, match="unknown item id"):
        live.server.client.get_items(["ok#text"])  # nothing of the batch was applied
    assert "ok#text" not in live.ids(text=CAPTION, target="text")


def test_batch_limits(live):
    too_many = [pb.NewItem(item_id=f"n{i}", text="x") for i in range(257)]
    with pytest.raises(grpc.RpcError) as error:
        live.upsert(*too_many)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "257" in error.value.details()
    with pytest.raises(grpc.RpcError) as error:
        live.delete(*[f"n{i}" for i in range(257)])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("role", "allowed"), [("search", False), ("feedback", False), ("index", True), ("admin", True)]
)
def test_writing_the_corpus_needs_the_index_or_admin_role(tmp_path, indexed, encoder, role, allowed):
    shutil.copytree(indexed, tmp_path / "data")
    engine = SearchEngine(tmp_path / "data", encoder)
    engine.load_current()
    server = Server(engine, port=0, keys=KeyRing.load(environ={"XMODAL_API_KEYS": f"{role}:secret-{role}"})).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.IndexServiceStub(channel)
            call = lambda: stub.UpsertItems(  # noqa: E731
                pb.UpsertItemsRequest(items=[pb.NewItem(item_id="r", text=CAPTION)]),
                metadata=[("authorization", f"Bearer secret-{role}")],
                timeout=60,
            )
            if allowed:
                assert call().added == 1
            else:
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(grace=1)


@pytest.mark.slow
def test_upserts_deletes_and_compactions_killed_at_random_points(indexed, encoder, tmp_path):
    """SIGKILL, 20 seeded times, while 4 clients upsert 3-item batches and delete earlier
    ones and a fifth compacts: every acknowledged batch is whole and found after a restart,
    every acknowledged delete stays, no temporary file is left."""
    import random
    import signal
    import threading
    import time

    from xmodal import client as xc

    from test_crash import TRIALS, start_server

    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    rng = random.Random(5)
    acked_batches: list[list[str]] = []
    acked_deletes: list[str] = []
    tried_deletes: set[str] = set()  # sent; applied or not when the server died before answering
    lock = threading.Lock()
    compactions = []
    for trial in range(TRIALS):
        proc, address = start_server(data, tmp_path)
        stop = threading.Event()

        def compactor(address=address, stop=stop):
            with xc.SearchClient(address, timeout=30) as client:
                while not stop.wait(rng.uniform(0.05, 0.3)):
                    try:
                        compactions.append("sent")  # killed mid-compaction, or acknowledged:
                        compactions.append(client.compact().snapshot_id)
                    except xc.XmodalError:
                        return

        def writer(n: int, address=address, stop=stop, trial=trial):
            with xc.SearchClient(address, timeout=10) as client:
                i = 0
                while not stop.is_set():
                    ids = [f"t{trial}-w{n}-{i}-{part}" for part in range(3)]
                    try:
                        client.upsert_items([{"item_id": item_id, "text": f"case {item_id}"} for item_id in ids])
                        with lock:
                            acked_batches.append(ids)
                        if i % 2:
                            with lock:
                                tried_deletes.add(ids[0])
                            client.delete_items([ids[0]])
                            with lock:
                                acked_deletes.append(ids[0])
                    except xc.XmodalError:
                        return  # the server died under us: only what was acknowledged counts
                    i += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        threads.append(threading.Thread(target=compactor))
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        stop.set()
        for thread in threads:
            thread.join()
    engine = SearchEngine(data, encoder)
    engine.clean_debris()  # what a server does on start
    leftovers = [p for p in data.rglob("*") if p.name.startswith((".tmp", ".rewrite")) or p.name.endswith(".tmp")]
    assert leftovers == []
    engine.load_current()
    state = engine.view.state()
    deleted = set(acked_deletes)
    for batch in acked_batches:
        for item_id in batch:
            if item_id in deleted:
                assert state.find(item_id) is None, f"acknowledged delete of {item_id} undone"
            elif item_id not in tried_deletes:
                assert state.find(item_id) is not None, f"acknowledged upsert of {item_id} lost"
    counts = f"{len(acked_batches)} batches, {len(deleted)} deletes acknowledged; compactions: {compactions}"
    assert len(acked_batches) >= 40 and len(deleted) >= 10, counts
    # about 1.75 compactions sent per trial here; one per trial leaves room for a loaded machine
    assert compactions.count("sent") >= TRIALS and len(compactions) - compactions.count("sent") >= 5, counts
    stored = {r[0] for r in engine.catalog.db().execute("SELECT id FROM items WHERE id LIKE 't%-w%'")}
    by_batch = {item_id.rsplit("-", 1)[0] for item_id in stored}
    for prefix in by_batch:  # a batch is there whole (less its acknowledged delete) or not at all
        present = {f"{prefix}-{part}" for part in range(3)} & stored
        assert len(present) == 3 or (len(present) == 2 and f"{prefix}-0" not in stored), prefix
