"""Clinical images end to end: a PACS-like export of DICOM files (built from ROCO images when
XMODAL_ROCO_DIR is set), every file carrying fake identifiers in every identifying attribute
and a private tag, indexed with the real CLI and served by a real gRPC server.

The identifier test: none of the planted strings occurs in any file of the data directory,
in any RPC response (raw protobuf bytes), in the index command's output, or in any log line
the server wrote at DEBUG level. The other tests check what clinicians rely on: the
allowlisted metadata, relative sources, derived ids, DICOM queries and upserts, and the
errors for broken files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from xmodal.indexer.dicom import DEFAULT_FIELDS

from conftest import RunningServer, roco_dir, xmodal_cmd
from dicom_factory import PLANTED, UID_ROOT, make_dicom, make_sr, roco_like_dicoms

pytestmark = pytest.mark.slow
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
N_FILES = 14


def planted_needles() -> list[bytes]:
    """Every planted value, and each part of a person name, as the bytes files and messages hold."""
    needles: set[str] = {UID_ROOT}
    for value in PLANTED.values():
        needles.add(value)
        needles.update(part for part in value.split("^") if len(part) >= 4)
    out = set()
    for needle in needles:
        out.add(needle.encode("utf-8"))
        out.add(needle.encode("latin-1", errors="ignore"))
    return sorted(out)


NEEDLES = planted_needles()


def leaks(data: bytes) -> list[str]:
    return [n.decode("latin-1") for n in NEEDLES if n in data]


def export(root: Path) -> dict:
    """A corpus root with captions.jsonl over DICOM files: half the records with ids, half
    without (their ids come from the files), plus a structured report (no pixels), a
    burned-in image, a corrupt header and truncated pixel data."""
    roco = roco_dir()
    images, captions = None, [f"chest film, case {i}: small nodule in the left upper lobe" for i in range(N_FILES)]
    if roco is not None:
        records = [json.loads(line) for line in (roco / "captions.jsonl").read_text().splitlines()[:N_FILES]]
        images = [roco / r["image"] for r in records]
        captions = [r["caption"] for r in records]
    files = roco_like_dicoms(images, root / "export", N_FILES)
    lines = []
    for i, (path, text) in enumerate(zip(files, captions, strict=True)):
        line = {"image": f"export/{path.name}", "caption": text, "site": "north"}
        if i % 2 == 0:
            line["id"] = f"case-{i}"
        lines.append(line)
    grey = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    bad = {
        "report.dcm": make_sr(),
        "burned.dcm": make_dicom(grey, bits_stored=8, burned_in=True, uid_suffix=700),
        "corrupt.dcm": b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"garbage" * 5,
        "truncated.dcm": make_dicom(grey.astype(np.uint16) * 4, bits_stored=12, uid_suffix=701)[:-3000],
    }
    for n, (name, data) in enumerate(bad.items()):
        (root / "export" / name).write_bytes(data)
        lines.append({"id": f"bad-{n}", "image": f"export/{name}", "caption": f"a file that is left out {n}"})
    (root / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"files": files, "bad": bad}


@pytest.fixture(scope="module")
def clinical(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs-export")
    made = export(root)
    data = tmp_path_factory.mktemp("clinical-data")
    done = subprocess.run(
        xmodal_cmd("-v", "index", str(root), "--data", str(data), "--model", "xmodal-demo", "--no-progress"),
        capture_output=True,
        timeout=600,
        env=OFFLINE,
    )
    assert done.returncode == 0, done.stderr.decode()
    return {"root": root, "data": data, "index_output": done.stdout + done.stderr, **made}


@pytest.fixture(scope="module")
def served(clinical, encoder):
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    server = RunningServer(clinical["data"], encoder)
    try:
        yield server, records
    finally:
        server.stop()
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)


def stubs(server):
    from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(server.server.address)
    return channel, pb_grpc.SearchServiceStub(channel), pb_grpc.IndexServiceStub(channel)


def test_index_reports_what_it_left_out_and_why(clinical):
    output = clinical["index_output"].decode("utf-8", errors="replace")
    assert "left out" in output
    assert "export/report.dcm" in output and "no pixel data" in output.lower()
    assert "export/burned.dcm" in output and "BurnedInAnnotation" in output
    assert "export/corrupt.dcm" in output
    assert "skipped 1 undecodable image(s): bad-3" in output and "truncated" in output.lower()
    assert leaks(clinical["index_output"]) == []
    assert str(clinical["root"]) not in output  # sources are relative to the corpus root


def test_identifiers_reach_no_file_no_response_and_no_log(clinical, served, tmp_path):
    server, logs = served
    channel, search, index = stubs(server)
    from xmodal.v1 import xmodal_pb2 as pb

    responses: list[bytes] = []
    try:
        status = search.GetStatus(pb.GetStatusRequest())
        assert status.data_dir == ""  # no keys: nobody is an admin
        responses.append(status.SerializeToString())
        hits = search.Search(pb.SearchRequest(query=pb.Query(text="chest film nodule"), k=50))
        assert len(hits.hits) == N_FILES  # the left-out files and the truncated one are not there
        responses.append(hits.SerializeToString())
        ids = [h.item_id for h in hits.hits]
        items = search.GetItems(pb.GetItemsRequest(item_ids=ids))
        responses.append(items.SerializeToString())
        for item in items.items:
            assert item.image[128:132] == b"DICM", item.item_id  # a de-identified DICOM copy
        # a DICOM query with every identifier in it, and an upsert of one without an id
        query = clinical["files"][3].read_bytes()
        assert leaks(query)  # the planted strings are there to be found
        responses.append(search.Search(pb.SearchRequest(query=pb.Query(image=query), k=5)).SerializeToString())
        new = make_dicom((np.arange(96 * 96).reshape(96, 96) % 200).astype(np.uint8), bits_stored=8, uid_suffix=555)
        upserted = index.UpsertItems(
            pb.UpsertItemsRequest(items=[pb.NewItem(image=new, source="new/scan.dcm", metadata_json='{"site": "x"}')])
        )
        responses.append(upserted.SerializeToString())
        (new_id,) = upserted.item_ids
        assert new_id.startswith("dcm-") and upserted.added == 1
        fetched = search.GetItems(pb.GetItemsRequest(item_ids=[new_id]))
        responses.append(fetched.SerializeToString())
        assert json.loads(fetched.items[0].metadata_json)["Modality"] == "CT"
        for bad in ("truncated.dcm", "corrupt.dcm"):
            with pytest.raises(grpc.RpcError) as caught:
                search.Search(pb.SearchRequest(query=pb.Query(image=clinical["bad"][bad]), k=5))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "DICOM" in caught.value.details() and leaks(caught.value.details().encode()) == []
    finally:
        channel.close()
    for n, response in enumerate(responses):
        assert leaks(response) == [], f"response {n} leaks"
    assert logs, "the server logged nothing at DEBUG: the log check would prove nothing"
    assert leaks("\n".join(logs).encode("utf-8")) == []
    # every file of the data directory, the catalog's WAL included
    server.engine.catalog.checkpoint()
    checked = 0
    for path in sorted(clinical["data"].rglob("*")):
        if path.is_file():
            assert leaks(path.read_bytes()) == [], path.relative_to(clinical["data"])
            checked += 1
    assert checked > 10


def test_hits_carry_allowlisted_metadata_relative_sources_and_derived_ids(clinical, served):
    server, _ = served
    found = server.client.search(text="small nodule in the left upper lobe", k=50)
    hits = [h for h in found if h.source != "new/scan.dcm"]  # not the item another test upserts
    by_id = {h.item_id: h for h in hits}
    assert {f"case-{i}" for i in range(0, N_FILES, 2)} <= set(by_id)
    derived = [i for i in by_id if i.startswith("dcm-")]
    assert len(derived) == N_FILES // 2
    for hit in hits:
        assert hit.source.startswith("export/roco-") and hit.source.endswith(".dcm"), hit.source
        assert set(hit.metadata) <= {"site", *DEFAULT_FIELDS}, hit.metadata
        assert hit.metadata["site"] == "north" and hit.metadata["StudyDate"] == 2021
        assert hit.metadata["PatientAge"] == 45 and hit.metadata["BodyPartExamined"] == "CHEST"
    # a derived id's caption is stored and paired under it
    pairs = set(server.engine.catalog.pairs())
    assert all((item_id, f"{item_id}#caption") in pairs for item_id in derived)
    caption = server.client.get_items([f"{derived[0]}#caption"])[0]
    assert caption.text and caption.metadata["site"] == "north"
    # the same file indexed again keeps its derived id (the key stays in the data directory)
    assert (clinical["data"] / "dicom.key").stat().st_mode & 0o777 == 0o600


def test_filters_work_on_dicom_attributes(served):
    server, _ = served
    fields = server.client.status().filter_fields
    assert fields.get("Modality") == "text" and fields.get("StudyDate") == "number"
    hits = server.client.search(text="chest film", k=50, where={"Modality": ["MR"]})
    assert hits and all(h.metadata["Modality"] == "MR" for h in hits)


def test_the_page_shows_no_identifiers(clinical, served):
    """The case-lookup page's HTML and JSON (and its PNGs) over the same server."""
    from fastapi.testclient import TestClient

    from xmodal.server.web.app import create_app

    server, _ = served
    page = TestClient(create_app(server.client))
    post = {"X-Xmodal": "1"}
    dicom_query = clinical["files"][4].read_bytes()  # a multi-frame file, identifiers and all
    bodies = [page.get("/"), page.get("/api/status")]
    bodies.append(page.post("/api/search", data={"text": "chest film", "k": "20"}, headers=post))
    bodies.append(page.post("/api/search", files={"file": ("scan.dcm", dicom_query)}, data={"k": "5"}, headers=post))
    bodies.append(
        page.post(
            "/api/search",
            files={"file": ("scan.dcm", dicom_query)},
            data={"k": "5", "box": "0.1,0.1,0.6,0.7", "window": "lung"},
            headers=post,
        )
    )
    bodies.append(page.post("/api/preview", files={"file": ("scan.dcm", dicom_query)}, headers=post))
    for response in bodies:
        assert response.status_code == 200, response.text[:300]
    hits = bodies[2].json()["hits"]
    assert hits and bodies[3].json()["hits"] and bodies[4].json()["hits"]
    for hit in hits[:5]:
        bodies.append(page.get(f"/api/items/{hit['item_id']}"))
        assert bodies[-1].json()["dicom"] is True
        bodies.append(page.get(hit["thumbnail"]))
        assert bodies[-1].headers["content-type"] == "image/png"
        bodies.append(page.get(f"/api/items/{hit['item_id']}/image", params={"window": "bone", "size": "256"}))
    bad = page.post("/api/search", files={"file": ("bad.dcm", clinical["bad"]["truncated.dcm"])}, headers=post)
    assert bad.status_code == 400 and "DICOM" in bad.json()["error"]
    bodies.append(bad)
    for response in bodies:
        assert leaks(response.content) == [], response.request.url


def test_manifests_and_bare_dicom_folders_get_ids_from_the_files(tmp_path):
    from xmodal.indexer.clinical import DicomSettings, HeaderReader
    from xmodal.indexer.corpus import read_corpus

    grey = (np.arange(48 * 48).reshape(48, 48) % 200).astype(np.uint8)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.dcm").write_bytes(make_dicom(grey, bits_stored=8, uid_suffix=41))
    (tmp_path / "a" / "two").write_bytes(make_dicom(grey, bits_stored=8, uid_suffix=42, modality="MR"))  # no suffix
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    reader = HeaderReader(DicomSettings(), lambda: b"k" * 32)
    bare = read_corpus(tmp_path / "a", dicom=reader)
    assert sorted(i.source for i in bare.items) == ["one.dcm", "two"] and not bare.pairs
    assert all(i.id.startswith("dcm-") and i.metadata["StudyDate"] == 2021 for i in bare.items)
    assert {i.metadata["Modality"] for i in bare.items} == {"CT", "MR"}
    again = read_corpus(tmp_path / "a", dicom=HeaderReader(DicomSettings(), lambda: b"k" * 32))
    assert [i.id for i in again.items] == [i.id for i in bare.items]  # the same key, the same ids
    other_key = read_corpus(tmp_path / "a", dicom=HeaderReader(DicomSettings(), lambda: b"j" * 32))
    assert not {i.id for i in other_key.items} & {i.id for i in bare.items}
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"type": "image", "path": "a/one.dcm", "metadata": {"Modality": "override"}},
        {"type": "image", "id": "named", "path": "a/two"},
        {"type": "text", "id": "t", "text": "a report"},
        {"type": "pair", "image": "named", "text": "t"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    corpus = read_corpus(manifest, dicom=reader)
    by_source = {i.source: i for i in corpus.items}
    assert by_source["a/one.dcm"].id == bare.items[0].id
    assert by_source["a/one.dcm"].metadata["Modality"] == "override"  # the record's own metadata wins
    assert by_source["a/two"].id == "named" and by_source["a/two"].metadata["Modality"] == "MR"
    assert [(p.image_id, p.text_id) for p in corpus.pairs] == [("named", "t")]


def test_xmodal_upsert_sends_a_dicom_folder_and_the_server_names_the_items(served, tmp_path):
    server, _ = served
    grey = (np.arange(64 * 64).reshape(64, 64) % 180).astype(np.uint8)
    (tmp_path / "export").mkdir()
    for n in range(2):
        (tmp_path / "export" / f"im{n}.dcm").write_bytes(make_dicom(grey + n, bits_stored=8, uid_suffix=800 + n))
    done = subprocess.run(
        xmodal_cmd("upsert", "--server", server.server.address, str(tmp_path / "export"), "--no-progress"),
        capture_output=True,
        text=True,
        timeout=300,
        env=OFFLINE,
    )
    assert done.returncode == 0, done.stderr
    assert "2 added" in done.stdout
    found = {h.source: h for h in server.client.search(text="chest film", k=100) if h.source.startswith("im")}
    assert set(found) == {"im0.dcm", "im1.dcm"} and all(h.item_id.startswith("dcm-") for h in found.values())
    assert leaks((done.stdout + done.stderr).encode()) == []
