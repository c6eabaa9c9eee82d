"""Compaction and erasure: deltas and deletions folded into a new snapshot without a stop;
after a purge (at once) or one compaction (of a plain delete) no byte of a deleted item is
left in any file under the data directory; a rollback never brings an erased item back."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from test_live_corpus import CAPTION, png

from xmodal import client as xc
from xmodal.indexer.snapshot import DataDir, Snapshot

from conftest import RunningServer

FEEDBACK_QUERY = "which scan shows the violet star, zq-5512"  # a query text found nowhere else


@pytest.fixture
def server(tmp_path, indexed, encoder):
    shutil.copytree(indexed, tmp_path / "data")
    running = RunningServer(tmp_path / "data", encoder)
    yield running
    running.stop()


def add_case(client: xc.SearchClient) -> bytes:
    image = png((140, 60, 200))
    client.upsert_items(
        [
            xc.NewItem("case-1", image=image, source="new/case-1.png"),
            xc.NewItem("case-1#report", text=CAPTION, pair_id="case-1"),
        ]
    )
    return image


def ids(client: xc.SearchClient, **query) -> list[str]:
    return [h.item_id for h in client.search(k=50, **query).hits]


def traces(server: RunningServer, item_ids: list[str]) -> dict[str, bytes]:
    """Byte strings that only these items put on disk: their base vectors (fp16, as the
    shards hold them) and their projected vectors in every snapshot that holds them."""
    engine = server.engine
    found = {}
    for item_id in item_ids:
        modality, base = engine.store.item_vector(item_id)
        found[f"{item_id} base vector"] = base.astype(np.float16).tobytes()
        data = DataDir(engine.data.root)
        for snapshot_id in data.snapshot_ids():
            vector = Snapshot(data.snapshots / snapshot_id).indexes[modality].vector(item_id)
            if vector is not None:
                found[f"{item_id} in {snapshot_id}"] = np.asarray(vector, np.float32).tobytes()
    return found


def files_holding(root: Path, needles: dict[str, bytes]) -> list[str]:
    """'what in which file' for every needle found in any file under ``root``."""
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content = path.read_bytes()
        hits += [f"{name} in {path.relative_to(root)}" for name, needle in needles.items() if needle in content]
    return hits


def test_compaction_folds_deltas_and_deletions_and_answers_the_same(server, encoder):
    client = server.client
    add_case(client)
    gone = ids(client, text="a large red circle")[0]
    client.delete_items([gone])
    queries = [{"text": CAPTION}, {"text": "a large red circle"}, {"image": png((140, 60, 200)), "target": "image"}]
    before = [ids(client, **q) for q in queries]
    old_id = server.engine.snapshot.id
    live = client.status().live_corpus
    assert (live["delta_items"], live["hidden_items"], live["pending_erasure"]) == (2, 1, 1)

    report = client.compact()

    assert report.snapshot_id != old_id and report.folded_items == 2 and report.erased_items == 1
    state = server.engine.view.state()
    assert state.snapshot.id == report.snapshot_id
    assert sum(len(d) for d in state.deltas.values()) == 0 and not state.hidden  # all in the snapshot now
    assert [ids(client, **q) for q in queries] == before
    live = client.status().live_corpus
    assert (live["delta_items"], live["hidden_items"], live["pending_erasure"]) == (0, 0, 0)
    assert live["last_compaction_snapshot_id"] == report.snapshot_id and live["last_compaction_s"] > 0
    assert state.snapshot.manifest.head_hash == Snapshot(server.engine.data.snapshots / old_id).manifest.head_hash
    server.stop()
    restarted = RunningServer(server.engine.data.root, encoder)
    try:
        assert [ids(restarted.client, **q) for q in queries] == before
    finally:
        restarted.stop()


def test_a_purge_leaves_no_byte_of_the_item_in_the_data_directory(server):
    client = server.client
    image = add_case(client)
    client.compact()  # the case is in a snapshot now, and stays in the retained earlier ones' deltas
    earlier = {r["id"] for r in server.engine.catalog.db().execute("SELECT id FROM feedback")}  # other tests'
    client.submit_feedback(text=FEEDBACK_QUERY, relevant=["case-1"])
    client.submit_feedback(item_id="case-1#report", relevant=["case-1"])
    kept = client.submit_feedback(text="a large red circle", relevant=[ids(client, text="a large red circle")[0]])
    run = client.wait_for_refit(client.refit("full"), timeout=600)  # one more snapshot that holds it
    assert run.state in ("promoted", "rejected"), run.message
    root = server.engine.data.root
    needles = {
        "caption": CAPTION.encode(),
        "image bytes": image,
        "feedback query": FEEDBACK_QUERY.encode(),
        **traces(server, ["case-1", "case-1#report"]),
    }
    assert len(needles) >= 7  # base vectors, and projected vectors in more than one snapshot
    assert files_holding(root, needles)  # the test can see them while they are there

    answer = client.delete_items(["case-1", "case-1#report"], purge=True)

    assert sorted(answer.deleted_ids) == ["case-1", "case-1#report"]
    assert files_holding(root, needles) == []
    assert ids(client, text=CAPTION, target="text")[0] != "case-1#report"
    events = {r["id"] for r in server.engine.catalog.db().execute("SELECT id FROM feedback")} - earlier
    assert events == {kept}  # the events that used the item are gone, the others stay
    assert not list(root.rglob(".rewrite")) and not list(root.rglob("*.tmp"))


def test_a_plain_delete_is_erased_by_the_next_compaction(server):
    client = server.client
    add_case(client)
    client.compact()
    needles = {"caption": CAPTION.encode(), **traces(server, ["case-1#report"])}
    client.delete_items(["case-1#report"])
    assert files_holding(server.engine.data.root, needles)  # hidden at once, erased later
    assert "case-1#report" not in ids(client, text=CAPTION, target="text")

    report = client.compact()

    assert report.erased_items == 1 and report.rewritten_snapshots >= 1
    assert files_holding(server.engine.data.root, needles) == []


def test_an_image_sent_again_while_a_compaction_looks_for_unused_files_is_kept(server):
    """A compaction walks blobs/ for unused image files without the write lock (upserts go
    on); the same picture upserted again meanwhile names the same file, which must stay."""
    client = server.client
    image = add_case(client)
    client.compact()
    client.delete_items(["case-1"])  # its image file is unused from here
    root, compactor = server.engine.data.root, server.engine.compactor
    unused = compactor.unused_blobs()
    assert [path for path in unused if (root / path).read_bytes() == image] != []

    client.upsert_items([xc.NewItem("case-2", image=image, source="new/case-2.png")])  # before the lock
    with server.engine.view.write_lock:
        assert compactor.remove_blobs(unused) == 0
    assert client.get_items(["case-2"])[0].image == image

    client.delete_items(["case-2"])
    client.compact()  # now nothing names it: erased
    assert files_holding(root, {"image bytes": image}) == []


def test_a_rollback_to_a_snapshot_made_before_a_delete_never_brings_the_item_back(server, encoder):
    client = server.client
    add_case(client)
    made_with_it = client.compact().snapshot_id
    client.delete_items(["case-1#report"])
    client.rollback(made_with_it)  # before the erasure: hidden by its tombstone
    assert "case-1#report" not in ids(client, text=CAPTION, target="text")
    with pytest.raises(xc.NotFound):
        client.get_items(["case-1#report"])

    client.compact()
    client.rollback(made_with_it)  # after it: the old snapshot was rewritten without the item
    assert "case-1#report" not in ids(client, text=CAPTION, target="text")
    assert "case-1" in ids(client, image=png((140, 60, 200)), target="image")  # its pair stays
    held = Snapshot(server.engine.data.snapshots / made_with_it).indexes["text"].rows
    assert "case-1#report" not in held
    server.stop()
    restarted = RunningServer(server.engine.data.root, encoder)  # CURRENT names the rolled-back one
    try:
        assert restarted.engine.snapshot.id == made_with_it
        assert "case-1#report" not in ids(restarted.client, text=CAPTION, target="text")
    finally:
        restarted.stop()


def test_searches_run_on_through_compactions(server):
    """16 clients search while upserts, deletes and 3 compactions run: no error, no miss."""
    import threading

    errors: list[str] = []
    stop = threading.Event()

    def searcher() -> None:
        with xc.SearchClient(server.server.address, timeout=30) as client:
            while not stop.is_set():
                try:
                    if not client.search(text="a large red circle", k=5).hits:
                        errors.append("no hits")
                except xc.XmodalError as exc:
                    errors.append(str(exc))

    threads = [threading.Thread(target=searcher) for _ in range(16)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(3):
            server.client.upsert_items([xc.NewItem(f"r{round_}-{i}", text=f"note {round_} {i}") for i in range(20)])
            server.client.delete_items([f"r{round_}-0"])
            server.client.compact()
            assert f"r{round_}-1" in ids(server.client, text=f"note {round_} 1", target="text")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert errors == []


def test_compact_needs_the_admin_role(tmp_path, indexed, encoder):
    from xmodal.server.auth import KeyRing
    from xmodal.server.engine import SearchEngine
    from xmodal.server.service import Server

    shutil.copytree(indexed, tmp_path / "data")
    engine = SearchEngine(tmp_path / "data", encoder)
    engine.load_current()
    keys = KeyRing.load(environ={"XMODAL_API_KEYS": "index:k-index,admin:k-admin"})
    running = Server(engine, port=0, keys=keys).start()
    try:
        with xc.SearchClient(running.address, api_key="k-index") as client:
            with pytest.raises(xc.PermissionDenied):
                client.compact()
        with xc.SearchClient(running.address, api_key="k-admin") as client:
            assert client.compact().snapshot_id == engine.snapshot.id
    finally:
        running.stop(grace=1)


@pytest.mark.slow
def test_compact_through_the_cli_offline_and_never_beside_a_running_server(tmp_path, indexed):
    import os
    import subprocess

    from conftest import xmodal_cmd
    from test_crash import start_server

    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc, address = start_server(data, tmp_path)
    try:
        with xc.SearchClient(address, timeout=60) as client:
            client.upsert_items([xc.NewItem("late-note", text=CAPTION)])
            client.delete_items([ids(client, text="a large red circle")[0]])
        beside = subprocess.run(xmodal_cmd("compact", "--data", str(data)), capture_output=True, text=True, env=env)
        assert beside.returncode != 0 and "a server is running on data directory 'data'" in beside.stderr
        assert "xmodal compact --server" in beside.stderr
        online = subprocess.run(xmodal_cmd("compact", "--server", address), capture_output=True, text=True, env=env)
        assert online.returncode == 0, online.stderr
        assert "1 upserted item(s) folded in, 1 deleted item(s) erased" in online.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    offline = subprocess.run(xmodal_cmd("compact", "--data", str(data)), capture_output=True, text=True, env=env)
    assert offline.returncode == 0, offline.stderr
    assert "0 upserted item(s) folded in" in offline.stdout
    assert DataDir(data).current_id() in offline.stdout
