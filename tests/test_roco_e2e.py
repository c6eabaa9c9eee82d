"""End to end on the 2,000 real ROCO radiology images: index (with a kill -9 part way),
re-index, serve as a subprocess, query through SearchClient, shut down on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from xmodal.client import SearchClient
from xmodal.indexer.catalog import Catalog
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.snapshot import DataDir, load_current
from xmodal.indexer.store import BaseStore

from conftest import roco_dir, xmodal_cmd

pytestmark = [pytest.mark.roco, pytest.mark.slow]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def index_cmd(data):
    return xmodal_cmd(
        "index",
        str(roco_dir()),
        "--data",
        str(data),
        "--model",
        "xmodal-demo",
        "--shard-size",
        "100",
        "--batch-size",
        "50",
        "--no-progress",
        # The zero-shot head: fitting and gating a head on ROCO is test_roco_gate's subject;
        # this file is about killing, resuming and serving, and the fit's cross-validation
        # (five folds, then the final head) would double its setup time in CI.
        "--head",
        "identity",
    )


@pytest.fixture(scope="module")
def roco_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("roco")
    # Start indexing, kill -9 once some image shards are committed, then resume.
    proc = subprocess.Popen(index_cmd(data), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list((data / "base" / IMAGE).glob("shard-*.npy"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the indexer finished before it could be killed; lower --shard-size"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = Catalog(data / "catalog.sqlite").count_items()
    assert killed_at == {IMAGE: 2000, TEXT: 2000}  # items are cataloged first, in one transaction
    assert DataDir(data).current_id() is None  # no snapshot yet: killed before the end
    done = subprocess.run(index_cmd(data), env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "items: 0 added" in done.stdout and "wrote snapshot" in done.stdout
    return data


def test_after_kill_and_resume_every_item_is_there_exactly_once(roco_data):
    catalog = Catalog(roco_data / "catalog.sqlite")
    assert catalog.count_items() == {IMAGE: 2000, TEXT: 2000}
    store = BaseStore(roco_data / "base", catalog)
    for modality in (IMAGE, TEXT):
        loaded = store.load(modality)
        ids, vectors = loaded.ids, loaded.array
        assert len(ids) == len(set(ids)) == 2000 and vectors.shape[0] == 2000
    snapshot = load_current(DataDir(roco_data))
    assert snapshot.manifest.counts == {IMAGE: 2000, TEXT: 2000}
    for modality in (IMAGE, TEXT):  # --factory auto keeps exact search at ROCO's size, and says why
        choice = snapshot.manifest.index[modality]
        assert choice["requested"] == "auto" and choice["factory"] == "Flat" and "crossover" in choice["reason"]
    assert sum(catalog.count_pairs().values()) == 2000


def test_indexing_again_adds_nothing(roco_data):
    before = DataDir(roco_data).current_id()
    done = subprocess.run(index_cmd(roco_data), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "items: 0 added, 0 changed, 4000 unchanged; pairs added: 0" in done.stdout
    assert "embedded: 0 images, 0 texts" in done.stdout
    assert DataDir(roco_data).current_id() == before
    assert Catalog(roco_data / "catalog.sqlite").count_items() == {IMAGE: 2000, TEXT: 2000}


def test_serve_subprocess_answers_searches(roco_data, tmp_path):
    port_file = tmp_path / "port"
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        xmodal_cmd("serve", "--data", str(roco_data), "--port", "0", "--port-file", str(port_file)),
        env=ENV,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert port_file.exists(), (tmp_path / "serve.log").read_text()
        records = [json.loads(line) for line in (roco_dir() / "captions.jsonl").read_text().splitlines()]
        with SearchClient(f"127.0.0.1:{port_file.read_text()}") as client:
            client.wait_until_serving(timeout=60)
            status = client.status()
            assert status.counts[IMAGE]["indexed"] == 2000 and status.counts[TEXT]["indexed"] == 2000
            assert status.counts[IMAGE]["catalog_items"] == 2000 and status.counts[TEXT]["catalog_items"] == 2000

            hits = client.search(text="chest x-ray showing a left pneumothorax", k=10)
            assert len(hits) == 10 and all(h.modality == IMAGE and h.source.endswith(".jpg") for h in hits)

            image_bytes = (roco_dir() / records[42]["image"]).read_bytes()
            texts = client.search(image=image_bytes, k=5)
            assert len(texts) == 5 and all(h.modality == TEXT and h.text for h in texts)
            itself = client.search(image=image_bytes, target=IMAGE, k=1).hits[0]
            assert itself.item_id == records[42]["id"] and itself.score > 0.999

            by_item = client.search(item_id=f"{records[7]['id']}#caption", k=3)
            assert len(by_item) == 3 and all(h.modality == IMAGE for h in by_item)
            assert by_item.hits[0].metadata["license"] == "CC BY"

            item = client.get_items([records[7]["id"]])[0]
            assert item.image == (roco_dir() / records[7]["image"]).read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
