"""``xmodal index --ray`` on a local Ray started by the test: on 300 ROCO pairs the Ray path
writes the same base vectors, snapshot and top-10 answers as the local path, with one of
its two encoder actors SIGKILLed by the test in the middle of a batch (Ray restarts it and
retries the batch; every item still lands exactly once)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from xmodal.indexer.catalog import Catalog
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.ray_pipeline import TEST_HOOK, RayEmbedder, RayOptions
from xmodal.indexer.snapshot import DataDir, load_current
from xmodal.indexer.store import BaseStore
from xmodal.indexer.train import FitConfig

from conftest import roco_dir

pytestmark = [pytest.mark.slow]
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is an optional extra: pip install 'xmodal[ray]'"
)
PAIRS = 300
# small shards and batches: several commits before and after the kill (on an actor's second batch)
RUN = {"shard_size": 50, "batch_size": 10, "progress": False, "head": FitConfig(kind="identity")}


@pytest.fixture(scope="module")
def hook(tmp_path_factory):
    return tmp_path_factory.mktemp("hook")


@pytest.fixture(scope="module")
def local_ray(hook):
    import ray

    # Ray's workers take the environment the local Ray was started with: the hook goes in first
    os.environ[TEST_HOOK] = str(hook)
    try:
        for attempt in range(3):  # on a loaded machine Ray's own start may time out: start it again
            try:
                ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
    finally:
        del os.environ[TEST_HOOK]
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("roco300")
    lines = (roco_dir() / "captions.jsonl").read_text().splitlines()[:PAIRS]
    with open(folder / "captions.jsonl", "w") as handle:
        for line in lines:
            record = json.loads(line)
            handle.write(json.dumps({**record, "image": str(roco_dir() / record["image"])}) + "\n")
    return folder


@pytest.fixture(scope="module")
def local_data(corpus, encoder, tmp_path_factory):
    data = tmp_path_factory.mktemp("local")
    index_corpus(corpus, data, encoder, **RUN)
    return data


class Killer(threading.Thread):
    """Waits for an actor to report that it is in the middle of a batch, notes how many
    items the driver had committed, then SIGKILLs that actor's process."""

    def __init__(self, folder: Path, data: Path):
        super().__init__(daemon=True)
        self.folder, self.data = folder, data
        self.killed: int | None = None
        self.committed_then: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            busy = list(self.folder.glob("*.busy"))
            if busy:
                pid = int(busy[0].read_text())
                catalog = Catalog(self.data / "catalog.sqlite")
                self.committed_then = sum(len(catalog.embedded(m)) for m in (IMAGE, TEXT))
                catalog.close()
                (self.folder / "killed").write_text("")
                os.kill(pid, signal.SIGKILL)
                self.killed = pid
                return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_run(corpus, encoder, hook, local_ray, tmp_path_factory):
    """The Ray path with its default layout (two actors of 1 CPU on the test's 2-CPU Ray),
    one of them killed mid-batch by the test."""
    data = tmp_path_factory.mktemp("ray")
    killer = Killer(hook, data)
    killer.start()
    with RayEmbedder(RayOptions()) as embedder:
        report = index_corpus(corpus, data, encoder, ray=embedder, **RUN)
    killer.join(timeout=5)
    return data, report, killer


@pytest.mark.roco
@needs_ray
def test_ray_path_writes_what_the_local_path_writes(local_data, ray_run, encoder):
    from xmodal.server.engine import SearchEngine

    data, report, _ = ray_run
    assert report.embedded == {IMAGE: PAIRS, TEXT: PAIRS} and not report.failed
    assert any(note.startswith("Ray: 2 encoder actor(s) of 1 CPU each") for note in report.notes)
    local, remote = DataDir(local_data), DataDir(data)
    for modality in (IMAGE, TEXT):
        a = BaseStore(local.base, Catalog(local.catalog_path)).load(modality)
        b = BaseStore(remote.base, Catalog(remote.catalog_path)).load(modality)
        assert a.ids == b.ids  # same shards, same rows: one shard per 50 items, in id order
        np.testing.assert_allclose(a.array, b.array, atol=2e-3)  # fp16 storage
    assert load_current(remote).manifest.counts == load_current(local).manifest.counts == {IMAGE: PAIRS, TEXT: PAIRS}
    queries = [json.loads(line)["caption"] for line in (roco_dir() / "captions.jsonl").read_text().splitlines()[:20]]
    answers = []
    for folder in (local_data, data):
        engine = SearchEngine(folder, encoder)
        engine.load_current()
        answers.append([[hit.item_id for hit in engine.search(text=q, k=10).hits] for q in queries])
        engine.close()
    assert answers[0] == answers[1]


@pytest.mark.roco
@needs_ray
def test_a_killed_worker_loses_nothing_and_adds_nothing_twice(ray_run):
    data, report, killer = ray_run
    assert killer.killed is not None, "no actor reported a batch in progress"
    assert killer.committed_then < 2 * PAIRS, "the actor was killed after the run had committed everything"
    catalog = Catalog(data / "catalog.sqlite")
    assert catalog.count_items() == {IMAGE: PAIRS, TEXT: PAIRS}
    for modality in (IMAGE, TEXT):
        rows = catalog.embedded(modality)
        ids = [r[0] for r in rows]
        assert len(ids) == len(set(ids)) == PAIRS  # every item has one shard row
        assert len({(r[1], r[2]) for r in rows}) == PAIRS  # and no two items share one
        assert not catalog.pending(modality)
        shards = BaseStore(data / "base", catalog).load(modality)
        assert shards.array.shape[0] == PAIRS
    assert len(list((data / "base" / IMAGE).glob("shard-*.npy"))) == PAIRS // RUN["shard_size"]


def test_ray_flag_without_ray_installed_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    from xmodal.server.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "captions.jsonl").write_text("")
    status = main(["index", str(corpus), "--data", str(tmp_path / "data"), "--model", "xmodal-demo", "--ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["xmodal index: error: --ray needs Ray Data, which is not installed: pip install 'xmodal[ray]'"]
    assert not (tmp_path / "data").exists()  # refused before any work


def test_ray_options_are_checked():
    with pytest.raises(ValueError):
        RayOptions(workers=0)
    with pytest.raises(ValueError):
        RayOptions(address=" ")


class Cluster:
    """What ``_layout`` reads of a Ray cluster: its nodes' resources (Ray's own format)."""

    def __init__(self, *nodes: dict, gpus: float = 0):
        self._nodes = [{"Alive": True, "Resources": resources} for resources in nodes]
        self._gpus = gpus

    def nodes(self):
        return self._nodes

    def cluster_resources(self):
        return {"GPU": self._gpus} if self._gpus else {}


def test_default_layout_is_one_actor_per_core_as_memory_allows():
    from xmodal.indexer.ray_pipeline import _layout

    gib = 1 << 30
    one = _layout(Cluster({"CPU": 2, "memory": 16 * gib}), RayOptions(), 2 * gib)
    assert (one.workers, one.cpus, one.threads) == (2, 1.0, 1)  # one per core
    short = _layout(Cluster({"CPU": 8, "memory": 5 * gib}), RayOptions(), 2 * gib)
    assert (short.workers, short.cpus, short.threads) == (2, 4.0, 4)  # memory for two: 4 cores each
    tight = _layout(Cluster({"CPU": 4, "memory": 1 * gib}), RayOptions(), 2 * gib)
    assert (tight.workers, tight.cpus) == (1, 4.0)  # never none
    mixed = _layout(Cluster({"CPU": 4, "memory": 64 * gib}, {"CPU": 2, "memory": 64 * gib}), RayOptions(), 2 * gib)
    assert (mixed.workers, mixed.cpus) == (6, 1.0)
    asked = _layout(Cluster({"CPU": 8, "memory": 64 * gib}), RayOptions(workers=2), 2 * gib)
    assert (asked.workers, asked.cpus) == (2, 4.0)  # --ray-workers still decides
    gpu = _layout(Cluster({"CPU": 8, "GPU": 2, "memory": 64 * gib}, gpus=2), RayOptions(), 2 * gib)
    assert (gpu.workers, gpu.gpus, gpu.cpus) == (2, 1.0, 4.0)
