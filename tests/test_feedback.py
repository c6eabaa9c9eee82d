"""Feedback intake and refits on a real server: durability, gate, index reuse, swaps under
load, rollback, and kill -9 in the middle of a refit."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from xmodal import client as xc
from xmodal.indexer import world
from xmodal.indexer.catalog import Catalog
from xmodal.indexer.feedback import FeedbackLog
from xmodal.indexer.snapshot import DataDir
from xmodal.indexer.vectors import load_vectors
from xmodal.server.refit import RefitPolicy

from conftest import RunningServer, xmodal_cmd


def records(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]


def user_caption(record: dict) -> str:
    """The reserved third phrasing of the scene behind a generated record."""
    n = int(record["id"].rsplit("-", 1)[1])
    return world.caption(world.scenes(n + 1, seed=1)[n], "user")  # the conftest corpus uses seed 1


@pytest.fixture
def served(indexed, encoder, tmp_path):
    """A server over a private copy of the indexed data directory."""
    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    started = []

    def start(**policy):
        server = RunningServer(data, encoder)
        server.server.refitter.policy = RefitPolicy(**policy)
        started.append(server)
        return server

    yield data, start
    for server in started:
        server.stop()


def refit_and_wait(server, mode: str) -> xc.RefitRun:
    run_id = server.client.refit(mode)
    run = server.client.wait_for_refit(run_id, timeout=300)
    print("refit", run.mode, run.state, run.before, run.after)
    return run


def test_feedback_is_durable_and_bad_feedback_is_refused(served, world_corpus):
    data, start = served
    server = start()
    rec = records(world_corpus)
    feedback_id = server.client.submit_feedback(
        text=user_caption(rec[0]), relevant=[rec[0]["id"]], irrelevant=[rec[1]["id"]], weight=2.0, source="test"
    )
    row = [r for r in FeedbackLog(Catalog(data / "catalog.sqlite")).events() if r["id"] == feedback_id][0]
    assert json.loads(row["relevant"]) == [rec[0]["id"]] and row["weight"] == 2.0 and row["query_modality"] == "text"
    stored = np.frombuffer(row["query_embedding"], np.float32)
    expected = server.engine.encoder.encode_texts([user_caption(rec[0])])[0]
    np.testing.assert_allclose(stored, expected, atol=1e-6)
    image_fb = server.client.submit_feedback(image=world_corpus / rec[2]["image"], relevant=[rec[2]["id"] + "#caption"])
    item_fb = server.client.submit_feedback(item_id=rec[3]["id"] + "#caption", relevant=[rec[3]["id"]])
    assert len({feedback_id, image_fb, item_id := item_fb}) == 3 and item_id.startswith("fb-")
    with pytest.raises(xc.NotFound, match="nope"):
        server.client.submit_feedback(text="x", relevant=["nope"])
    with pytest.raises(xc.InvalidArgument, match="at least one relevant"):
        server.client.submit_feedback(text="x", relevant=[])
    with pytest.raises(xc.InvalidArgument, match="weight"):
        server.client.submit_feedback(text="x", relevant=[rec[0]["id"]], weight=float("nan"))
    assert server.client.status().feedback_total == 3


def test_the_held_out_slice_is_keyed_on_the_query_not_the_event(served, world_corpus):
    """The same query confirmed again lands in the same slice (no train/val leak), and the
    slices of distinct queries come out near the 20 % held-out fraction."""
    data, start = served
    server = start()
    rec = records(world_corpus)
    text = user_caption(rec[5])
    variants = [text, text.upper(), "  " + text.replace(" ", "   ") + " "] * 8
    same = [server.client.submit_feedback(text=t, relevant=[rec[5]["id"]]) for t in variants]
    image = (world_corpus / rec[6]["image"]).read_bytes()
    same_image = [server.client.submit_feedback(image=image, relevant=[rec[6]["id"] + "#caption"]) for _ in range(12)]
    distinct = [
        server.client.submit_feedback(text=user_caption(r) + f" #{i}", relevant=[r["id"]])
        for i, r in enumerate(rec[:200])
    ]
    split = {r["id"]: r["split"] for r in FeedbackLog(Catalog(data / "catalog.sqlite")).events()}
    assert len({split[i] for i in same}) == 1 and len({split[i] for i in same_image}) == 1
    held_out = sum(split[i] == "val" for i in distinct) / len(distinct)
    assert 0.12 < held_out < 0.28, held_out


def send_user_feedback(server, corpus: Path, n: int, *, shuffled: bool = False, weight: float = 1.0) -> list[str]:
    rec = [r for r in records(corpus)][:n]
    targets = [r["id"] for r in rec]
    if shuffled:
        random.Random(0).shuffle(targets)
    return [
        server.client.submit_feedback(text=user_caption(r), relevant=[t], weight=weight, source="sim")
        for r, t in zip(rec, targets, strict=True)
    ]


def test_query_refit_reuses_the_index_files(served, world_corpus):
    data, start = served
    server = start(mode="query", epochs=60)
    live = server.engine.snapshot.id
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (data / "snapshots" / live).glob("*.faiss")}
    send_user_feedback(server, world_corpus, 150)
    run = refit_and_wait(server, "query")
    assert run.state == "promoted", (run.message, run.before, run.after)
    assert run.mode == "query" and run.snapshot_id == server.engine.snapshot.id != live
    assert run.after["feedback_val_recall@10"] > run.before["feedback_val_recall@10"]
    new = data / "snapshots" / run.snapshot_id
    for name, (inode, mtime) in before.items():
        assert (new / name).stat().st_ino == inode  # the very same file: nothing rebuilt
        assert (data / "snapshots" / live / name).stat().st_mtime_ns == mtime  # untouched
    assert json.loads((new / "manifest.json").read_text())["indexes_from"] == live
    assert server.engine.snapshot.head.options["query_adapters"] == ["text"]
    assert server.client.search(text="a red ring", k=3).snapshot_id == run.snapshot_id
    assert run.after["feedback_val_recall@10"] is not None and run.before["corpus_val_recall@10"] is not None


def test_refits_learn_from_irrelevant_items_as_hard_negatives(served, indexed, encoder, world_corpus, tmp_path):
    """Users mark their queries' top wrong hits as irrelevant: a refit that learns from the
    marks pushes those items further down than the same refit without the marks."""
    data, start = served
    marked_server = start(mode="query", epochs=60)
    marks = []
    for r in records(world_corpus)[:120]:
        hits = [h.item_id for h in marked_server.client.search(text=user_caption(r), k=4)]
        marks.append((user_caption(r), r["id"], [h for h in hits if h != r["id"]][:3]))
    plain_data = tmp_path / "plain"
    shutil.copytree(indexed, plain_data)
    plain_server = RunningServer(plain_data, encoder)
    plain_server.server.refitter.policy = RefitPolicy(mode="query", epochs=60)

    def refit_and_count(server, with_marks: bool) -> float:
        """The median rank of the marked items among all 400 images after a refit."""
        for text, right, wrong in marks:
            server.client.submit_feedback(text=text, relevant=[right], irrelevant=wrong if with_marks else [])
        run = refit_and_wait(server, "query")
        assert run.state == "promoted", (run.message, run.before, run.after)
        ranks = []
        for text, _, wrong in marks:
            order = {h.item_id: h.rank for h in server.client.search(text=text, k=400)}
            ranks += [order[w] for w in wrong]
        return float(np.median(ranks))

    try:
        plain = refit_and_count(plain_server, False)
    finally:
        plain_server.stop()
    marked = refit_and_count(marked_server, True)
    print(f"median rank of the marked items: {plain} without the marks, {marked} with them")
    assert marked > plain * 1.5, (plain, marked)


def test_feedback_pairs_share_keys_with_the_corpus_pairs(served, world_corpus):
    """A confirmed image is the same positive group as that image in the corpus pairs (not
    its own negative when both land in one batch); irrelevant items become hard negatives."""
    from xmodal.indexer.catalog import text_hash
    from xmodal.indexer.feedback import feedback_pairs
    from xmodal.indexer.train import item_key, pairs_from_catalog

    data, start = served
    server = start()
    rec = records(world_corpus)
    server.client.submit_feedback(
        text=rec[0]["caption"], relevant=[rec[0]["id"]], irrelevant=[rec[1]["id"], rec[2]["id"]]
    )
    server.client.submit_feedback(item_id=rec[3]["id"], relevant=[rec[3]["id"] + "#caption"])
    engine = server.engine
    vectors = load_vectors(engine.store)
    events = FeedbackLog(engine.catalog).events()
    pairs, _ = feedback_pairs(engine.catalog, events, vectors)
    assert pairs.image_keys[0] == item_key("image", rec[0]["id"])
    assert pairs.text_keys[0] == item_key("text", text_hash(rec[0]["caption"]))
    assert pairs.image_keys[1] == item_key("image", rec[3]["id"])
    assert pairs.text_keys[1] == item_key("text", text_hash(rec[3]["caption"]))
    assert pairs.hard_rows.tolist() == [0, 0] and pairs.hard_is_image.all()
    images = vectors["image"]
    np.testing.assert_array_equal(pairs.hard[1], images.array[images.rows[rec[2]["id"]]])
    all_pairs = [pairs_from_catalog(engine.catalog, engine.store, s, vectors=vectors) for s in ("train", "val", "test")]
    corpus_keys = {int(k) for p in all_pairs for k in p.image_keys} | {int(k) for p in all_pairs for k in p.text_keys}
    assert {int(pairs.image_keys[0]), int(pairs.text_keys[0]), int(pairs.text_keys[1])} <= corpus_keys


def test_offline_fit_and_reindexing_keep_what_feedback_taught(served, encoder, world_corpus):
    """`xmodal fit` (and `xmodal index`, which fits the same way) trains on the feedback
    too: a head fitted after 150 user-phrasing confirmations finds unseen user-phrasing
    queries far better than one fitted on the corpus pairs alone."""
    from xmodal.indexer.adapt import fit_snapshot
    from xmodal.indexer.snapshot import Snapshot
    from xmodal.indexer.train import FitConfig

    data, start = served
    server = start()
    rec = records(world_corpus)
    for r in rec[:150]:
        server.client.submit_feedback(text=user_caption(r), relevant=[r["id"]])
    unseen = rec[300:]
    queries = encoder.encode_texts([user_caption(r) for r in unseen])

    def user_recall(feedback: bool) -> tuple[float, dict]:
        manifest, _ = fit_snapshot(
            data, FitConfig(kind="mlp", hidden=256, epochs=60, seed=0), progress=False, feedback=feedback
        )
        head = Snapshot(data / "snapshots" / manifest.id).head
        images = server.engine.store.load("image")
        image_ids, image_base = images.ids, images.array
        gallery = head.project("image", image_base)
        top = np.argsort(-(head.project("text", queries, query=True) @ gallery.T), axis=1)[:, :10]
        scene = {r["id"]: user_caption(r) for r in rec}
        hits = [any(scene[image_ids[j]] == user_caption(r) for j in row) for r, row in zip(unseen, top, strict=True)]
        return float(np.mean(hits)), manifest.metrics

    corpus_only, plain_metrics = user_recall(False)
    with_feedback, metrics = user_recall(True)
    print(f"unseen user-phrasing recall@10: corpus only {corpus_only:.3f}, with feedback {with_feedback:.3f}")
    assert plain_metrics["feedback_pairs"] == 0 and 100 < metrics["feedback_pairs"] < 150  # the training slice
    assert with_feedback > corpus_only + 0.15, (corpus_only, with_feedback)


def test_full_refit_rebuilds_indexes_without_the_encoder(served, world_corpus, monkeypatch):
    data, start = served
    server = start(mode="full", epochs=30, tolerance=1.0)  # about the encoder and the files, not the gate
    live = server.engine.snapshot.id
    send_user_feedback(server, world_corpus, 100)

    def forbidden(*args, **kwargs):
        raise AssertionError("a refit must not call the encoder")

    for name in ("encode_texts", "encode_images", "encode_image_tensors"):
        monkeypatch.setattr(server.engine.encoder, name, forbidden)
    run = refit_and_wait(server, "full")
    assert run.state == "promoted", (run.message, run.before, run.after)
    old, new = data / "snapshots" / live, data / "snapshots" / run.snapshot_id
    for name in ("image.faiss", "text.faiss"):
        assert (new / name).stat().st_ino != (old / name).stat().st_ino
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["counts"] == {"image": 400, "text": 400} and manifest["indexes_from"] is None
    assert not server.engine.snapshot.head.query_adapters


def test_no_search_fails_or_mixes_snapshots_during_a_refit(served, world_corpus):
    data, start = served
    # a generous gate: this test is about the swap, not about the gate (tested below)
    # 10 epochs: long enough for searches to run before, during and after the swap (the
    # 8 searching threads slow training; 60 epochs took ~70 s of CI's time for nothing more)
    server = start(mode="full", epochs=10, tolerance=1.0)
    send_user_feedback(server, world_corpus, 200)
    queries = [r["id"] for r in records(world_corpus)[:16]]
    seen: dict[tuple[str, str], list[str]] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def searcher(n: int):
        with xc.SearchClient(server.server.address) as client:
            i = n
            while not stop.is_set():
                query = queries[i % len(queries)]
                try:
                    result = client.search(item_id=query, k=10)
                except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
                    errors.append(exc)
                    return
                ids = [h.item_id for h in result.hits]
                with lock:
                    first = seen.setdefault((query, result.snapshot_id), ids)
                if first != ids:
                    errors.append(AssertionError(f"{query}: two answers from snapshot {result.snapshot_id}"))
                i += 1

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    old = server.engine.snapshot.id
    run = refit_and_wait(server, "full")
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    assert run.state == "promoted"
    snapshots_seen = {snapshot for _, snapshot in seen}
    assert snapshots_seen == {old, run.snapshot_id}  # searches ran before and after the swap
    assert sum(1 for _ in seen) >= 2 * len(queries)


def test_gate_rejects_feedback_that_contradicts_the_corpus(served, world_corpus):
    data, start = served
    server = start(mode="full", epochs=15, tolerance=0.01)
    live = server.engine.snapshot.id
    send_user_feedback(server, world_corpus, 300, shuffled=True, weight=20.0)
    run = refit_and_wait(server, "full")
    assert run.state == "rejected", (run.before, run.after)
    # rejected by the gate's figures, or because no epoch beat the live head at all
    assert "validates worse" in run.message or "nothing new to promote" in run.message
    assert run.after["corpus_val_recall@10"] <= run.before["corpus_val_recall@10"] + 0.01
    assert server.engine.snapshot.id == live == DataDir(data).current_id()
    assert server.client.status().refits[0].state == "rejected"


def test_rollback_on_a_running_server_survives_a_restart(served, world_corpus, encoder):
    data, start = served
    server = start(mode="query", epochs=60)
    first = server.engine.snapshot.id
    send_user_feedback(server, world_corpus, 150)
    run = refit_and_wait(server, "query")
    assert run.state == "promoted"
    listed = server.client.list_snapshots()
    assert [s.snapshot_id for s in listed if s.live] == [run.snapshot_id] and first in {s.snapshot_id for s in listed}
    info = server.client.rollback(first)
    assert info.snapshot_id == first and server.client.search(text="a red ring", k=1).snapshot_id == first
    with pytest.raises(xc.NotFound):
        server.client.rollback("no-such-snapshot")
    server.stop()
    restarted = start()
    assert restarted.engine.snapshot.id == first
    assert restarted.client.search(text="a red ring", k=1).snapshot_id == first


def test_kill_9_during_a_refit_keeps_acknowledged_feedback_and_the_previous_snapshot(indexed, tmp_path, world_corpus):
    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    live = DataDir(data).current_id()
    rec = records(world_corpus)

    def serve():
        port_file = tmp_path / f"port-{time.monotonic_ns()}"
        proc = subprocess.Popen(
            xmodal_cmd(
                "serve",
                "--data",
                str(data),
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--refit-epochs",
                "400",
                "--refit-mode",
                "full",
            ),
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "serve.log", "a"),
        )
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        return proc, f"127.0.0.1:{port_file.read_text()}"

    proc, address = serve()
    acked: list[str] = []
    lock = threading.Lock()
    with xc.SearchClient(address) as client:
        client.wait_until_serving(60)

        def send(i: int):
            r = rec[i % len(rec)]
            feedback_id = client.submit_feedback(text=user_caption(r), relevant=[r["id"]], source=f"load-{i}")
            with lock:
                acked.append(feedback_id)

        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(send, i) for i in range(1000)]
            run_id = None
            for n, future in enumerate(futures):
                if n == 700:  # a refit starts while events still stream in
                    run_id = client.refit("full")
                future.result()
        assert len(acked) == 1000
        deadline = time.monotonic() + 60
        while client.status().refits[0].state != "running":  # make sure the kill lands mid-run
            assert time.monotonic() < deadline
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, address = serve()
    try:
        with xc.SearchClient(address) as client:
            client.wait_until_serving(60)
            status = client.status()
            assert status.snapshot_id == live  # the previous snapshot serves
            assert status.feedback_total >= 1000
            assert [r.state for r in status.refits if r.run_id == run_id] == ["interrupted"]
            assert len(client.search(text="a red ring", k=5)) == 5
        assert set(acked) <= FeedbackLog(Catalog(data / "catalog.sqlite")).ids()
        assert not list((data / "snapshots").glob(".tmp-*"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_backup_while_serving_and_a_restored_copy_serves_the_same_results(served, world_corpus, encoder, tmp_path):
    data, start = served
    server = start(mode="query", epochs=60)
    send_user_feedback(server, world_corpus, 150)
    # promoted or (by the luck of the held-out slice) rejected: either way a run and its
    # snapshot history are there to back up
    assert refit_and_wait(server, "query").state in ("promoted", "rejected")
    done = subprocess.run(
        xmodal_cmd("backup", "--data", str(data), "--out", str(tmp_path / "backup")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    restored = tmp_path / "restored"
    shutil.copytree(tmp_path / "backup", restored)  # restore = put the copy in place
    copy = RunningServer(restored, encoder)
    try:
        assert copy.engine.snapshot.id == server.engine.snapshot.id
        assert copy.client.status().feedback_total == server.client.status().feedback_total == 150
        for query in ("tiny red blob top left", "a large blue square in the center on a gray background"):
            ours = [(h.item_id, round(h.score, 5)) for h in server.client.search(text=query, k=10)]
            theirs = [(h.item_id, round(h.score, 5)) for h in copy.client.search(text=query, k=10)]
            assert ours == theirs
    finally:
        copy.stop()
    again = subprocess.run(
        xmodal_cmd("backup", "--data", str(data), "--out", str(tmp_path / "backup")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "already exists" in again.stderr
