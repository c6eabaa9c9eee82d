"""The index flow: idempotent, deterministic splits, bad images skipped with a report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from xmodal.indexer.catalog import Catalog, split_for
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.errors import FailedPrecondition
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.snapshot import DataDir, Snapshot
from xmodal.indexer.store import BaseStore
from xmodal.indexer.train import FitConfig

ZERO_SHOT = FitConfig(kind="identity")  # where the head does not matter, skip fitting one


def test_index_twice_adds_nothing(world_corpus, encoder, tmp_path):
    first = index_corpus(world_corpus, tmp_path, encoder, progress=False, shard_size=100, head=ZERO_SHOT)
    assert first.embedded == {IMAGE: 400, TEXT: 400} and first.snapshot_written
    second = index_corpus(world_corpus, tmp_path, encoder, progress=False, shard_size=100, head=ZERO_SHOT)
    assert second.embedded == {IMAGE: 0, TEXT: 0}
    assert second.items == {"added": 0, "changed": 0, "unchanged": 800} and second.pairs_added == 0
    assert not second.snapshot_written and second.snapshot.id == first.snapshot.id
    catalog = Catalog(tmp_path / "catalog.sqlite")
    assert catalog.count_items() == {IMAGE: 400, TEXT: 400}
    loaded = BaseStore(tmp_path / "base", catalog).load(IMAGE)
    ids, vectors = loaded.ids, loaded.array
    assert len(ids) == len(set(ids)) == 400 and vectors.shape == (400, encoder.dim)
    assert len(list((tmp_path / "base" / IMAGE).glob("shard-*.npy"))) == 4


def test_base_vectors_are_the_encoder_output(world_corpus, encoder, indexed):
    from PIL import Image

    catalog = Catalog(indexed / "catalog.sqlite")
    loaded = BaseStore(indexed / "base", catalog).load(IMAGE)
    ids, vectors = loaded.ids, loaded.array
    row = catalog.get_items([ids[7]])[ids[7]]
    expected = encoder.encode_images([Image.open(row["path"]).convert("RGB")])[0]
    np.testing.assert_allclose(vectors[7], expected, atol=2e-3)  # fp16 storage
    assert abs(np.linalg.norm(vectors[7]) - 1) < 1e-2


def test_splits_are_deterministic_by_image(indexed):
    catalog = Catalog(indexed / "catalog.sqlite")
    counts = catalog.count_pairs()
    assert sum(counts.values()) == 400 and counts["train"] > counts["val"] > 0 and counts["test"] > 0
    for split in ("train", "val", "test"):
        assert all(split_for(image_id) == split for image_id, _ in catalog.pairs(split))


def test_undecodable_images_are_skipped_and_reported(world_corpus, encoder, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world_corpus, corpus)
    records = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()][:30]
    (corpus / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (corpus / records[3]["image"]).write_bytes(b"\x89PNG garbage")
    (corpus / records[9]["image"]).unlink()
    report = index_corpus(corpus, tmp_path / "data", encoder, progress=False, head=ZERO_SHOT)
    assert sorted(item_id for item_id, _ in report.failed) == sorted([records[3]["id"], records[9]["id"]])
    assert report.embedded == {IMAGE: 28, TEXT: 30}
    summary = report.summary()
    assert "skipped 2 undecodable image(s)" in summary and records[3]["id"] in summary
    snapshot = Snapshot(DataDir(tmp_path / "data").snapshots / report.snapshot.id)
    assert len(snapshot.indexes[IMAGE]) == 28 and len(snapshot.indexes[TEXT]) == 30


def test_changed_content_is_reembedded(world_corpus, encoder, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world_corpus, corpus)
    index_corpus(corpus, tmp_path / "data", encoder, progress=False, head=ZERO_SHOT)
    records = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]
    records[0]["caption"] = "an entirely new caption"
    (corpus / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = index_corpus(corpus, tmp_path / "data", encoder, progress=False, head=ZERO_SHOT)
    assert report.items["changed"] == 1 and report.embedded == {IMAGE: 0, TEXT: 1} and report.snapshot_written
    catalog = Catalog(tmp_path / "data" / "catalog.sqlite")
    assert catalog.count_items() == {IMAGE: 400, TEXT: 400}
    ids = BaseStore(tmp_path / "data" / "base", catalog).load(TEXT).ids
    assert len(ids) == 400


def test_interrupted_shard_debris_is_removed(world_corpus, encoder, tmp_path):
    index_corpus(world_corpus, tmp_path, encoder, progress=False, head=ZERO_SHOT)
    orphan = tmp_path / "base" / IMAGE / "shard-000099.npy"
    np.save(orphan, np.zeros((2, encoder.dim), np.float16))
    (tmp_path / "snapshots" / ".tmp-half-written").mkdir()
    report = index_corpus(world_corpus, tmp_path, encoder, progress=False, head=ZERO_SHOT)
    assert not orphan.exists() and not (tmp_path / "snapshots" / ".tmp-half-written").exists()
    assert len(report.removed_debris) == 2


def test_other_encoder_is_refused(world_corpus, encoder, indexed):
    from xmodal.indexer.encoder import load_encoder

    other = load_encoder("xmodal-demo", "none")  # same architecture, random weights: another encoder
    with pytest.raises(FailedPrecondition, match="built with encoder"):
        index_corpus(world_corpus, indexed, other, progress=False)


def test_clean_spares_a_snapshot_another_process_is_writing(tmp_path):
    """Debris is removed only when its writer is gone (its flock released)."""

    data = DataDir(tmp_path)
    data.snapshots.mkdir(parents=True)
    live_dir, dead_dir = data.snapshots / ".tmp-live", data.snapshots / ".tmp-dead"
    live_dir.mkdir()
    dead_dir.mkdir()
    (data.snapshots / ".tmp-dead.lock").write_text("")  # its writer died: nobody holds it
    code = (
        "import fcntl, sys, time\n"
        f"h = open({str(data.snapshots / '.tmp-live.lock')!r}, 'w')\n"
        "fcntl.flock(h, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(30)\n"
    )
    import subprocess
    import sys

    writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "locked"
        removed = data.clean()
        assert dead_dir in removed and not dead_dir.exists() and not (data.snapshots / ".tmp-dead.lock").exists()
        assert live_dir.exists()
    finally:
        writer.kill()
        writer.wait()
    assert live_dir in data.clean()  # once the writer is gone, it is debris
