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
