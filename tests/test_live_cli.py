"""The live corpus from the outside: `xmodal upsert` / `xmodal delete` and the client's
upsert_items / delete_items.

Most tests talk to a recording stand-in for IndexService (an in-process gRPC server that
answers from the request alone), so they check what the client and the CLI send: batches,
images before texts, pair ids, relative sources. The last test runs against the real server.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from conftest import RunningServer, xmodal_cmd

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, timeout=300):
    return subprocess.run(xmodal_cmd(*args), capture_output=True, text=True, timeout=timeout, env=OFFLINE)


def one_error_line(done, command: str) -> str:
    """The stderr of a command that failed as a usage error: exit 2, one line."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xmodal {command}: error: "), done.stderr
    return lines[0]


def write_manifest(folder: Path, n: int, seed: int) -> tuple[Path, dict[str, str]]:
    """A JSONL manifest of ``n`` generated images under folder/scans/ and their ``n`` captions,
    paired; returns it and {text id: caption}. Each caption ends with its case number, so no
    other item has the same text."""
    from xmodal.indexer.world import caption, render, scenes

    (folder / "scans").mkdir(parents=True, exist_ok=True)
    lines, captions = [], {}
    for i, scene in enumerate(scenes(n, seed)):
        render(scene, size=64).save(folder / "scans" / f"new-{i}.png")
        captions[f"report-{i}"] = f"{caption(scene)} case {seed}-{i}"
        lines += [
            {"type": "image", "id": f"scan-{i}", "path": f"scans/new-{i}.png", "metadata": {"ward": "B"}},
            {"type": "text", "id": f"report-{i}", "text": captions[f"report-{i}"]},
            {"type": "pair", "image": f"scan-{i}", "text": f"report-{i}"},
        ]
    manifest = folder / "new-cases.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest, captions


# -- a recording stand-in for IndexService ------------------------------------------------------
class RecordingIndex:
    """Answers UpsertItems and DeleteItems from the request alone and keeps every request;
    with ``refuse`` set, aborts every call with that (code, details)."""

    def __init__(self):
        self.upserts: list = []
        self.deletes: list = []
        self.metadata: list = []
        self.refuse: tuple[grpc.StatusCode, str] | None = None

    def UpsertItems(self, request, context):
        from xmodal.v1 import xmodal_pb2 as pb

        self._check(context)
        self.upserts.append(request)
        pairs = sum(1 for item in request.items if item.pair_id)
        return pb.UpsertItemsResponse(added=len(request.items), pairs_added=pairs)

    def DeleteItems(self, request, context):
        from xmodal.v1 import xmodal_pb2 as pb

        self._check(context)
        self.deletes.append(request)
        known = [i for i in request.item_ids if not i.startswith("nope")]
        return pb.DeleteItemsResponse(
            deleted_ids=known, unknown_ids=[i for i in request.item_ids if i.startswith("nope")]
        )

    def _check(self, context) -> None:
        self.metadata.append(dict(context.invocation_metadata()))
        if self.refuse:
            context.abort(*self.refuse)


@pytest.fixture
def fake_index():
    from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

    servicer = RecordingIndex()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_IndexServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.address = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None)


# -- parser and usage errors ---------------------------------------------------------------------
def test_help_shows_both_commands_and_their_flags():
    done = run("--help")
    assert done.returncode == 0 and "upsert" in done.stdout and "delete" in done.stdout
    done = run("upsert", "--help")
    assert done.returncode == 0
    assert all(flag in done.stdout for flag in ("CORPUS", "--server", "--batch-size", "--no-progress", "--api-key"))
    done = run("delete", "--help")
    assert done.returncode == 0
    assert all(flag in done.stdout for flag in ("ID", "--file IDS", "--purge", "--server", "--api-key"))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("delete", "a", "--file", "ids.txt"), "not both"),
        (("delete",), "give the ids to delete"),
        (("delete", "a", "--batch-size", "0"), "--batch-size must be at least 1"),
        (("delete", "--file", "no-such-ids.txt"), "cannot read the ids file"),
        (("upsert", "no-such-corpus"), "does not exist"),
        (("upsert", "c", "--batch-size", "0"), "--batch-size must be at least 1"),
        (("upsert", "c", "--client-cert", "c.pem"), "--client-cert and --client-key go together"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, says):
    done = subprocess.run(xmodal_cmd(*args), capture_output=True, text=True, timeout=60, env=OFFLINE, cwd=tmp_path)
    assert says in one_error_line(done, args[0])


def test_delete_file_without_ids_is_refused(tmp_path):
    (tmp_path / "ids.txt").write_text("\n  \n")
    assert "holds no ids" in one_error_line(run("delete", "--file", str(tmp_path / "ids.txt")), "delete")


def test_upsert_with_no_server_says_unavailable(tmp_path):
    manifest, _ = write_manifest(tmp_path, 2, seed=0)
    done = run("upsert", "--server", "127.0.0.1:1", "--timeout", "3", "--no-progress", str(manifest))
    assert "unavailable" in one_error_line(done, "upsert")
    done = run("delete", "--server", "127.0.0.1:1", "--timeout", "3", "some-id")
    assert "unavailable" in one_error_line(done, "delete")


# -- the client: checks before sending, and what it sends ----------------------------------------
class NoCalls:
    def __getattr__(self, name):
        raise AssertionError(f"IndexService.{name} was called")


@pytest.fixture
def offline_client():
    """A client whose IndexService stub fails the test if it is called."""
    from xmodal.client import SearchClient

    client = SearchClient("127.0.0.1:1")
    client._index = NoCalls()
    yield client
    client.close()


def _bad_items(tmp_path):
    from xmodal.client import NewItem

    return [
        ([{"item_id": "a", "text": "x", "image": b"png"}], "exactly one of text= or image="),
        ([{"item_id": "a"}], "exactly one of text= or image="),
        ([NewItem("a")], "exactly one of text= or image="),
        (["a"], "must be a NewItem or a dict"),
        ([42], "must be a NewItem or a dict"),
        (42, "items must be a list"),
        ("text", "items must be a list"),
        ([{"item_id": "a", "text": "x", "colour": "red"}], "unknown field(s) ['colour']"),
        ([{"text": "x"}], "item_id is missing"),
        ([NewItem(7, text="x")], "item_id must be a string"),
        ([NewItem("a", text=5)], "bad argument in NewItem"),
        ([NewItem("a", image=3.5)], "must be the encoded bytes or a file path"),
        ([NewItem("a", image=tmp_path / "missing.png")], "cannot read the image of items[0] ('a')"),
        ([NewItem("a", text="x", metadata=["ward"])], "metadata must be a dict"),
        ([NewItem("a", text="x", metadata={"when": object()})], "JSON-serialisable"),
        ([NewItem("a", text="x"), NewItem("b", text="y", pair_id=3)], "bad argument in NewItem"),
    ]


def test_upsert_items_checks_items_before_sending(offline_client, tmp_path):
    from xmodal.client import InvalidArgument

    for items, says in _bad_items(tmp_path):
        with pytest.raises(InvalidArgument) as caught:
            offline_client.upsert_items(items)
        assert says in str(caught.value), (items, str(caught.value))


@pytest.mark.parametrize(
    ("ids", "purge", "says"),
    [
        ([1, 2], False, "item_ids must be item id strings"),
        (["a"], "yes", "purge must be True or False"),
        (["a"], 1, "purge must be True or False"),  # protobuf would take 1 as True
    ],
)
def test_delete_items_checks_before_sending(offline_client, ids, purge, says):
    from xmodal.client import InvalidArgument

    with pytest.raises(InvalidArgument, match=says):
        offline_client.delete_items(ids, purge=purge)


def test_client_sends_items_and_maps_answers_and_errors(fake_index, tmp_path):
    from xmodal.client import DeleteResult, NewItem, PermissionDenied, SearchClient, UpsertResult

    (tmp_path / "scan.png").write_bytes(b"\x89PNG fake")
    items = [
        NewItem("scan-1", image=tmp_path / "scan.png", metadata={"ward": "A"}, source="scans/1.png"),
        {"item_id": "rep-1", "text": "left upper lobe nodule", "pair_id": "scan-1"},
    ]
    with SearchClient(fake_index.address, api_key="k-123") as client:
        assert client.upsert_items(items) == UpsertResult(added=2, changed=0, unchanged=0, pairs_added=1)
        assert client.upsert_items(NewItem("rep-2", text="one alone")).added == 1
        assert client.delete_items("rep-1") == DeleteResult(["rep-1"], [])
        assert client.delete_items(["rep-2", "nope-1"], purge=True) == DeleteResult(["rep-2"], ["nope-1"])
        fake_index.refuse = (grpc.StatusCode.PERMISSION_DENIED, "key 'frontend' has role search; needs index")
        with pytest.raises(PermissionDenied, match="needs index"):
            client.upsert_items(items)
    sent = fake_index.upserts[0].items
    assert sent[0].image == b"\x89PNG fake" and json.loads(sent[0].metadata_json) == {"ward": "A"}
    assert sent[0].source == "scans/1.png" and sent[0].WhichOneof("content") == "image"
    assert sent[1].text == "left upper lobe nodule" and sent[1].pair_id == "scan-1" and sent[1].metadata_json == ""
    assert list(fake_index.deletes[0].item_ids) == ["rep-1"] and fake_index.deletes[1].purge
    assert all(m.get("authorization") == "Bearer k-123" for m in fake_index.metadata)


def test_the_client_package_exports_the_new_names():
    import xmodal.client as xc

    assert {"NewItem", "UpsertResult", "DeleteResult"} <= set(xc.__all__)


# -- the CLI against the stand-in -----------------------------------------------------------------
def test_upsert_sends_images_first_in_batches_with_pairs_and_relative_sources(fake_index, tmp_path):
    manifest, captions = write_manifest(tmp_path / "corpus", 5, seed=1)
    done = run("upsert", "--server", fake_index.address, str(manifest), "--batch-size", "2", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "upserted 10 items: 10 added, 0 changed, 0 unchanged; 5 pairs added"
    assert [len(r.items) for r in fake_index.upserts] == [2, 2, 2, 2, 2]
    sent = [item for request in fake_index.upserts for item in request.items]
    kinds = [item.WhichOneof("content") for item in sent]
    assert kinds == ["image"] * 5 + ["text"] * 5
    for i, item in enumerate(sent[:5]):
        assert item.item_id == f"scan-{i}" and item.source == f"scans/new-{i}.png" and not item.pair_id
        assert item.image == (tmp_path / "corpus" / "scans" / f"new-{i}.png").read_bytes()
        assert json.loads(item.metadata_json) == {"ward": "B"}
    assert {item.item_id: (item.text, item.pair_id) for item in sent[5:]} == {
        text_id: (text, text_id.replace("report", "scan")) for text_id, text in captions.items()
    }


def test_upsert_a_captions_folder_given_by_a_relative_path(fake_index, tmp_path):
    from xmodal.indexer.world import write_corpus

    write_corpus(tmp_path / "roco-like", n=3, seed=2)
    done = subprocess.run(
        xmodal_cmd("upsert", "--server", fake_index.address, "roco-like"),
        capture_output=True,
        text=True,
        timeout=120,
        env=OFFLINE,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "upserted 6 items: 6 added" in done.stdout and "item" in done.stderr  # the progress bar
    sent = [item for request in fake_index.upserts for item in request.items]
    images, texts = sent[:3], sent[3:]
    assert all(item.source.startswith("images/") and item.source.endswith(".png") for item in images)
    assert [t.pair_id for t in texts] == [i.item_id for i in images]
    assert all(t.item_id == f"{t.pair_id}#caption" and t.source == "" for t in texts)


def test_upsert_splits_batches_past_the_byte_budget(tmp_path):
    from xmodal.indexer.corpus import read_corpus
    from xmodal.server.cli import corpus_commands

    manifest, _ = write_manifest(tmp_path, 4, seed=3)
    corpus = read_corpus(manifest)
    sizes = {f"scan-{i}": (tmp_path / "scans" / f"new-{i}.png").stat().st_size for i in range(4)}
    budget = max(sizes.values()) + 1
    batches = list(corpus_commands._batches(corpus, batch_size=64, max_bytes=budget))
    assert len(batches) > 1 and all(sum(sizes.get(item.id, 0) for item, _ in b) <= budget for b in batches)
    assert [item.id for b in batches for item, _ in b][:4] == list(sizes)  # images first, in corpus order
    alone = list(corpus_commands._batches(corpus, batch_size=64, max_bytes=1))  # past the budget: one per call
    assert [len(b) for b in alone] == [1] * 8


def test_upsert_refuses_a_corpus_it_cannot_send_whole_before_sending(fake_index, tmp_path):
    manifest, _ = write_manifest(tmp_path, 2, seed=4)
    with manifest.open("a") as handle:
        handle.write(json.dumps({"type": "pair", "image": "scan-1", "text": "report-0"}) + "\n")
    done = run("upsert", "--server", fake_index.address, str(manifest), "--no-progress")
    assert "'report-0' is paired with two images" in one_error_line(done, "upsert")
    manifest, _ = write_manifest(tmp_path / "other", 2, seed=4)
    (tmp_path / "other" / "scans" / "new-1.png").unlink()
    done = run("upsert", "--server", fake_index.address, str(manifest), "--no-progress")
    assert "1 image file(s) missing or unreadable: scan-1" in one_error_line(done, "upsert")
    assert fake_index.upserts == []


def test_upsert_error_names_the_batch_and_what_was_applied(fake_index, tmp_path):
    manifest, _ = write_manifest(tmp_path, 2, seed=5)
    fake_index.refuse = (grpc.StatusCode.INVALID_ARGUMENT, "item 'scan-0': image is not decodable")
    done = run("upsert", "--server", fake_index.address, str(manifest), "--no-progress", "--api-key", "k")
    line = one_error_line(done, "upsert")
    assert "item 'scan-0': image is not decodable" in line and "batch 1 of 1" in line and "nothing was applied" in line


def test_delete_prints_deleted_and_unknown(fake_index, tmp_path):
    done = run("delete", "--server", fake_index.address, "a", "nope-1", "b", "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["deleted 2: a, b", "unknown 1: nope-1"]
    assert [list(r.item_ids) for r in fake_index.deletes] == [["a", "nope-1"], ["b"]]
    (tmp_path / "ids.txt").write_text("c\n\n  d  \n\n")
    done = run("delete", "--server", fake_index.address, "--file", str(tmp_path / "ids.txt"), "--purge")
    assert done.stdout.splitlines() == ["deleted 2: c, d", "unknown 0"]
    assert list(fake_index.deletes[-1].item_ids) == ["c", "d"] and fake_index.deletes[-1].purge


# -- end to end, on the real server ----------------------------------------------------------------
def _search_ids(address: str, text: str) -> list[str]:
    done = run("search", "--server", address, "--text", text, "--target", "text", "-k", "10", "--json")
    assert done.returncode == 0, done.stderr
    return [hit["item_id"] for hit in json.loads(done.stdout)["hits"]]


@pytest.mark.slow
def test_upsert_then_search_then_delete_on_a_running_server(tmp_path, world_corpus, encoder):
    from xmodal.indexer.pipeline import index_corpus

    data = tmp_path / "data"
    index_corpus(world_corpus, data, encoder, progress=False, shard_size=128)
    manifest, captions = write_manifest(tmp_path / "new", 10, seed=7)
    server = RunningServer(data, encoder)
    address = server.server.address
    try:
        done = run("upsert", "--server", address, str(manifest), "--no-progress")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "upserted 20 items: 20 added, 0 changed, 0 unchanged; 10 pairs added"
        text_id, text = "report-3", captions["report-3"]
        assert text_id in _search_ids(address, text)
        again = run("upsert", "--server", address, str(manifest), "--no-progress")
        assert "upserted 20 items: 0 added, 0 changed, 20 unchanged" in again.stdout, again.stderr
        done = run("delete", "--server", address, text_id, "no-such-item")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"deleted 1: {text_id}", "unknown 1: no-such-item"]
        assert text_id not in _search_ids(address, text)
    finally:
        server.stop()
