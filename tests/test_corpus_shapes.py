"""Any corpus shape indexes and serves, through the CLI: texts alone, images alone, images
and texts without pairs (zero-shot until there are pairs to fit a head on)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import RunningServer, xmodal_cmd

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
N = 60


def records(world_corpus: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in (world_corpus / "captions.jsonl").read_text().splitlines()[:n]]


def write_manifest(path: Path, world_corpus: Path, *, images: int, texts: int, pairs: int = 0) -> Path:
    lines = []
    for i, r in enumerate(records(world_corpus, max(images, texts))):
        if i < images:
            lines.append({"type": "image", "id": f"img-{i}", "path": str(world_corpus / r["image"])})
        if i < texts:
            lines.append({"type": "text", "id": f"txt-{i}", "text": r["caption"]})
        if i < pairs:
            lines.append({"type": "pair", "image": f"img-{i}", "text": f"txt-{i}"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def index(manifest: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = xmodal_cmd("index", str(manifest), "--data", str(data), "--model", "xmodal-demo", "--no-progress")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=OFFLINE)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize(
    ("shape", "images", "texts"), [("texts-only", 0, N), ("images-only", N, 0), ("unpaired", N, N)]
)
def test_every_corpus_shape_indexes_and_serves_zero_shot(tmp_path, world_corpus, encoder, shape, images, texts):
    manifest = write_manifest(tmp_path / "manifest.jsonl", world_corpus, images=images, texts=texts)
    done = index(manifest, tmp_path / "data")
    assert f"{images} images, {texts} texts" in done.stdout and "identity head" in done.stdout
    assert "a mlp head needs 32" in done.stdout  # says why it is zero-shot, and what to do
    server = RunningServer(tmp_path / "data", encoder)
    try:
        caption = records(world_corpus, 1)[0]["caption"]
        image = (world_corpus / records(world_corpus, 1)[0]["image"]).read_bytes()
        if texts:
            hits = server.client.search(text=caption, target="text", k=3).hits
            assert hits[0].item_id == "txt-0" and hits[0].score == pytest.approx(1.0, abs=1e-3)
        if images:
            hits = server.client.search(image=image, target="image", k=3).hits
            assert hits[0].item_id == "img-0" and hits[0].score == pytest.approx(1.0, abs=1e-2)
        if texts and images:
            assert [h.modality for h in server.client.search(text=caption, k=5).hits] == ["image"] * 5
        assert server.client.status().counts == {
            "image": {"catalog_items": images, "indexed": images},
            "text": {"catalog_items": texts, "indexed": texts},
        }
    finally:
        server.stop()


def test_a_head_is_fitted_once_enough_pairs_exist(tmp_path, world_corpus):
    data = tmp_path / "data"
    first = index(write_manifest(tmp_path / "a.jsonl", world_corpus, images=N, texts=N), data)
    assert "identity head" in first.stdout
    second = index(write_manifest(tmp_path / "b.jsonl", world_corpus, images=200, texts=200, pairs=200), data)
    assert "mlp head" in second.stdout and "pairs added: 200" in second.stdout


def upsert(address: str, manifest: Path) -> subprocess.CompletedProcess:
    cmd = xmodal_cmd("upsert", "--server", address, str(manifest), "--no-progress")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=OFFLINE)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "images", "texts"), [("texts-only", 0, N), ("images-only", N, 0), ("unpaired", N, N)]
)
def test_an_empty_data_directory_serves_and_grows_by_upserts(tmp_path, world_corpus, shape, images, texts):
    """`xmodal serve` on an empty folder serves at once (identity head, no items) and takes
    every corpus shape through `xmodal upsert`; each item is found by its own content."""
    from xmodal import client as xc

    from test_crash import start_server

    proc, address = start_server(tmp_path / "data", tmp_path, "--model", "xmodal-demo")
    try:
        with xc.SearchClient(address, timeout=60) as client:
            client.wait_until_serving(timeout=60)
            assert client.search(text="anything", k=3).hits == []
            assert [s.head_kind for s in client.list_snapshots()] == ["identity"]
            upsert(address, write_manifest(tmp_path / "m.jsonl", world_corpus, images=images, texts=texts))
            first = records(world_corpus, 1)[0]
            if texts:
                assert client.search(text=first["caption"], target="text", k=1).hits[0].item_id == "txt-0"
            if images:
                image = (world_corpus / first["image"]).read_bytes()
                assert client.search(image=image, target="image", k=1).hits[0].item_id == "img-0"
            counts = client.status().counts
            assert counts["image"]["indexed"] == images and counts["text"]["indexed"] == texts
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_a_served_empty_directory_fits_a_head_once_upserted_pairs_suffice(tmp_path, world_corpus):
    import time

    from xmodal import client as xc

    from test_crash import start_server

    proc, address = start_server(tmp_path / "data", tmp_path, "--model", "xmodal-demo")
    try:
        with xc.SearchClient(address, timeout=60) as client:
            client.wait_until_serving(timeout=60)
            upsert(address, write_manifest(tmp_path / "few.jsonl", world_corpus, images=20, texts=20, pairs=20))
            time.sleep(3)  # the scheduler looks every second: 20 pairs are not enough
            assert {s.head_kind for s in client.list_snapshots()} == {"identity"}
            upsert(address, write_manifest(tmp_path / "m.jsonl", world_corpus, images=200, texts=200, pairs=200))
            deadline = time.monotonic() + 300
            # the refit writes its snapshot before it makes it live: wait for the live one
            while [s.head_kind for s in client.list_snapshots() if s.live] != ["mlp"]:
                assert time.monotonic() < deadline, [r.message for r in client.status().refits]
                time.sleep(1)
            live = [s for s in client.list_snapshots() if s.live][0]
            assert live.head_kind == "mlp"
            caption = records(world_corpus, 150)[149]["caption"]
            assert client.search(text=caption, target="text", k=1).hits[0].item_id == "txt-149"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
