"""Index choice (`--factory auto`): Flat below the crossover, an ANN index above it, search
parameters tuned to recall@10 >= 0.98, typed parameters with IDSelectors, manifests."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

from xmodal.indexer import ann
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.manifest import MANIFEST_NAME, Manifest
from xmodal.indexer.snapshot import DataDir, ModalityIndex, Snapshot, build_index
from xmodal.indexer.train import FitConfig

from conftest import RunningServer, xmodal_cmd

ZERO_SHOT = FitConfig(kind="identity")


def clustered(n: int, dim: int = 32, centres: int = 64, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """A Gaussian mixture, L2-normalised (neighbourhoods like real embeddings, not uniform noise)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    x = means[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)).astype(np.float32) * (spread / dim**0.5)
    x = np.ascontiguousarray(x, dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def recall(index: ModalityIndex, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    truth = ann.exact_neighbours(vectors, queries, k)
    return ann.recall_at(index.search(queries, k)[1], truth)


# -- the rule -------------------------------------------------------------------------------


def test_the_rule_keeps_flat_for_small_corpora_and_says_why():
    factory, why = ann.choose_factory(2000, 128)  # the demo
    assert factory == "Flat" and "2000 items <= crossover" in why
    factory, why = ann.choose_factory(5000, 512)  # ROCO
    assert factory == "Flat" and "exact search is fast enough" in why
    assert ann.flat_max_items(128) == ann.FLAT_MAX_WORK // 128
    factory, why = ann.choose_factory(1_000_000, 512)  # the 1M benchmark
    assert factory == "IVF4096,Flat" and "1000000 items > crossover" in why and "filtered" in why


def test_the_rule_follows_the_memory_budget():
    n, dim = 1_000_000, 512
    full = ann.estimate_bytes("IVF4096,Flat", n, dim)
    assert ann.estimate_bytes("Flat", n, dim) < full < ann.estimate_bytes("HNSW32,Flat", n, dim)
    factory, why = ann.choose_factory(n, dim, full - 1)
    assert factory.startswith("IVF") and factory.endswith(",SQ8") and "over the budget" in why
    assert ann.estimate_bytes(factory, n, dim) < full // 3
    factory, why = ann.choose_factory(n, dim, 400 << 20)
    assert factory.startswith("OPQ") and "Refine(SQ" in factory and "IVF-Flat and IVF-SQ8 are over the budget" in why
    factory, why = ann.choose_factory(30_000_000, dim)  # tens of millions
    assert factory.startswith("OPQ64,IVF") and factory.endswith(",PQ64np,Refine(SQ8)") and "refine" in why
    factory, _ = ann.choose_factory(30_000_000, dim, 1 << 30)
    assert "Refine" not in factory and factory.startswith("OPQ")
    factory, why = ann.choose_factory(3000, 512, 1 << 20)  # below the crossover, Flat too big
    assert factory != "Flat" and "budget" in why
    assert ann.choose_factory(100, 32, flat_max=10)[0] == "IVF16,Flat"


@pytest.mark.parametrize(
    "text,value", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5g", 3 << 29), ("2GiB", 2 << 30), ("1000", 1000)]
)
def test_memory_budgets_take_suffixes(text, value):
    assert ann.parse_bytes(text) == value


def test_a_bad_memory_budget_is_refused():
    from xmodal.indexer.errors import InvalidArgument

    for bad in ("lots", "4Q", "0", "-1G"):
        with pytest.raises(InvalidArgument):
            ann.parse_bytes(bad)


# -- building and tuning --------------------------------------------------------------------


def test_auto_picks_flat_below_the_crossover_and_an_ann_index_above_it():
    small = clustered(500)
    index, choice = build_index(small, "auto", flat_max=1000)
    assert choice["factory"] == "Flat" and choice["params"] == {} and "500 items <= crossover 1000" in choice["reason"]
    assert isinstance(faiss.downcast_index(index), faiss.IndexFlat)
    vectors = clustered(3000)
    index, choice = build_index(vectors, "auto", flat_max=1000)
    assert choice["requested"] == "auto" and choice["factory"] == "IVF64,Flat"
    assert "3000 items > crossover 1000" in choice["reason"]
    params = choice["params"]
    assert params["nprobe"] in ann.NPROBE and params["recall_at_10"] >= ann.TARGET_RECALL
    assert faiss.extract_index_ivf(index).nprobe == params["nprobe"]  # the default now
    assert "nprobe=" in ann.describe(choice) and "reaching recall@10" in ann.describe(choice)


def test_hnsw_graphs_are_built_with_a_wider_construction_beam():
    index = ann.new_index(16, "HNSW16,Flat")
    assert faiss.downcast_index(index).hnsw.efConstruction == ann.HNSW_EF_CONSTRUCTION > 40
    vectors = clustered(3000)
    index, choice = build_index(vectors, "HNSW16,Flat")
    assert faiss.downcast_index(index).hnsw.efConstruction == ann.HNSW_EF_CONSTRUCTION
    assert choice["params"]["recall_at_10"] >= ann.TARGET_RECALL


@pytest.mark.parametrize(
    "factory,need", [("IVF256,Flat", 256), ("IVF64,SQ8", 64), ("IVF16,PQ8", 256), ("OPQ8,IVF16,PQ8np", 256)]
)
def test_an_ivf_factory_on_too_few_items_names_the_minimum(factory, need):
    from xmodal.indexer.errors import InvalidArgument

    assert ann.min_training_items(factory) == need
    vectors = clustered(need - 1)
    with pytest.raises(InvalidArgument) as raised:
        build_index(vectors, factory)
    message = str(raised.value)
    assert f"needs at least {need} items" in message and f"one has {need - 1}" in message
    assert "--factory auto" in message and "nx >=" not in message
    index = ann.new_index(32, "IVF16,Flat")  # past the check (a factory it cannot read): faiss's error, mapped
    with pytest.raises(InvalidArgument, match="needs at least 16 items of a modality to train on, and one has 10"):
        ann.train(index, vectors[:10], "unreadable")


@pytest.mark.parametrize(
    "factory,knob", [("HNSW16,Flat", "efSearch"), ("IVF32,SQ8", "nprobe"), ("IVF32,Flat", "nprobe")]
)
def test_tuned_parameters_reach_the_recall_target_on_fresh_queries(factory, knob):
    vectors = clustered(4000)
    index, choice = build_index(vectors, factory)
    params = choice["params"]
    assert knob in params and params["recall_at_10"] >= ann.TARGET_RECALL, params
    loaded = ModalityIndex(index, np.arange(len(vectors)).astype(str), params)
    fresh = ann.held_out_queries(vectors, 200, seed=7)  # not the queries it was tuned on
    assert recall(loaded, vectors, fresh) >= ann.TARGET_RECALL - 0.02
    queries = ann.held_out_queries(vectors)  # the ones it was tuned on
    truth = ann.exact_neighbours(vectors, queries, 10)
    grid = ann.EF_SEARCH if knob == "efSearch" else ann.NPROBE
    smaller = [value for value in grid if value < params[knob] and value >= (10 if knob == "efSearch" else 1)]
    if smaller:  # the cheapest value that reaches it: one step less does not
        assert ann._measure(index, queries, truth, {knob: smaller[-1]})[0] < ann.TARGET_RECALL


def test_tuning_uses_the_queries_it_is_given_and_says_when_the_target_is_missed():
    vectors = clustered(2000)
    index = faiss.index_factory(vectors.shape[1], "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    queries = clustered(50, seed=3)
    tuned = ann.tune(index, vectors, queries)
    assert tuned["queries"] == 50 and tuned["recall_at_10"] >= ann.TARGET_RECALL
    assert ann.tune(index, vectors, queries, target=1.01)["target_reached"] is False


def _exclude_even(n: int):
    batch = faiss.IDSelectorBatch(np.arange(0, n, 2, dtype=np.int64))
    return batch, faiss.IDSelectorNot(batch)


OPQ = ann.choose_factory(1000, 16, 30_000)[0]  # what auto builds on a tight budget


@pytest.mark.parametrize(
    "factory", ["Flat", "HNSW16,Flat", "IVF32,SQ8", "PCA16,IVF32,PQ4np,Refine(SQ8)", OPQ, "PCA8,Flat"]
)
def test_typed_search_parameters_with_an_id_selector(factory):
    vectors = clustered(1000 if factory == OPQ else 3000, dim=16)
    index, choice = build_index(vectors, factory)
    loaded = ModalityIndex(index, np.arange(len(vectors)).astype(str), choice["params"])
    batch, selector = _exclude_even(len(vectors))
    params = loaded.params(selector)
    expected = {"hnsw": faiss.SearchParametersHNSW, "ivf": faiss.SearchParametersIVF}.get(loaded.family)
    if "," not in factory or factory.startswith(("HNSW", "IVF")):
        assert expected is None or isinstance(params, expected)
    else:  # nested: refine and pre-transform parameters around the family's own
        assert isinstance(params, (faiss.IndexRefineSearchParameters, faiss.SearchParametersPreTransform))
    queries = vectors[:40]  # their own (even) rows are the nearest: all excluded
    for per_call in (params, _plain(selector)):  # typed, and plain ones turned into typed
        _, rows = loaded.search(queries, 10, params=per_call)
        found = rows[rows >= 0]
        assert len(found) >= 30 * 10 and (found % 2 == 1).all()
    if not factory.startswith("PCA8"):  # a lossy projection: its own row need not come first
        _, rows = loaded.search(queries, 10)
        assert (rows[:, 0] == np.arange(40)).mean() > 0.9
    if factory == "Flat":
        assert loaded.params() is None
    assert loaded.vector("5") is not None  # lookups by id reconstruct (IVF: a direct map)


def _plain(selector):
    params = faiss.SearchParameters()
    params.sel = selector
    return params


def test_mmap_reads_the_index_files(tmp_path):
    from xmodal.indexer.snapshot import read_index

    vectors = clustered(2000)
    for factory in ("Flat", "HNSW16,Flat", "IVF16,SQ8"):
        index, choice = build_index(vectors, factory)
        path = tmp_path / f"{factory}.faiss"
        faiss.write_index(index, str(path))
        mapped = ModalityIndex(
            read_index(path, mmap=True, factory=factory), np.arange(len(vectors)).astype(str), choice["params"]
        )
        assert (mapped.search(vectors[:20], 1)[1][:, 0] == np.arange(20)).mean() >= 0.9
    broken = tmp_path / "broken.faiss"  # (never overwrite a mapped file in place: xmodal replaces files)
    broken.write_bytes(b"not an index")  # a file that cannot be mapped falls back to a read, which fails
    with pytest.raises(RuntimeError):
        read_index(broken, mmap=True, factory="Flat")


# -- snapshots ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ann_data(tmp_path_factory, world_corpus, encoder):
    """The world corpus (400 items a modality) indexed with ``auto`` and a crossover of 100 items."""
    from xmodal.indexer.pipeline import index_corpus

    data = tmp_path_factory.mktemp("ann")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ann, "FLAT_MAX_WORK", 100 * encoder.dim)
        report = index_corpus(world_corpus, data, encoder, progress=False, head=ZERO_SHOT)
    return data, report


def test_a_snapshot_written_with_auto_records_the_choice_loads_and_serves(ann_data, encoder, tmp_path):
    source, report = ann_data
    manifest = report.snapshot
    assert manifest.factory_requested == "auto" and manifest.faiss_factory == "IVF16,Flat"
    for modality in (IMAGE, TEXT):
        choice = manifest.index[modality]
        assert choice["factory"] == "IVF16,Flat" and "400 items > crossover 100" in choice["reason"]
        assert choice["params"]["recall_at_10"] >= ann.TARGET_RECALL and "nprobe" in choice["params"]
    assert manifest.metrics["index"] == manifest.index  # GetStatus shows it (metrics_json)
    assert "image index: IVF16,Flat (400 items > crossover 100" in report.summary()
    on_disk = json.loads((DataDir(source).snapshots / manifest.id / MANIFEST_NAME).read_text())
    assert on_disk["index"]["text"]["params"]["nprobe"] == manifest.index["text"]["params"]["nprobe"]

    data = tmp_path / "data"
    shutil.copytree(source, data)
    snapshot = Snapshot(DataDir(data).snapshots / manifest.id, mmap=True)
    ivf = faiss.extract_index_ivf(snapshot.indexes[IMAGE].index)
    assert ivf.nprobe == manifest.index[IMAGE]["params"]["nprobe"]
    server = RunningServer(data, encoder)
    try:
        status = server.client.status()
        assert status.metrics["index"][IMAGE]["factory"] == "IVF16,Flat"
        hits = server.client.search(text="a red circle", k=10).hits
        assert len(hits) == 10
        gone = hits[0].item_id
        server.engine.corpus.delete([gone])  # hidden rows: an IDSelector in IVF parameters
        hits = server.client.search(text="a red circle", k=10).hits
        assert len(hits) == 10 and gone not in {h.item_id for h in hits}
        compacted = server.engine.compactor.compact()  # rewrites ask for auto again
        rewritten = Manifest.read(DataDir(data).snapshots / compacted.snapshot_id)
        assert rewritten.factory_requested == "auto" and rewritten.counts[IMAGE] == 399
        assert rewritten.index[IMAGE]["factory"] == "Flat"  # 399 items <= the real crossover
    finally:
        server.stop()
    from xmodal.server.engine import SearchEngine

    mapped = SearchEngine(source, encoder, mmap=True)  # xmodal serve --mmap
    try:
        mapped.load_current()
        assert mapped.view.mmap and len(mapped.search(text="a red circle", k=5).hits) == 5
    finally:
        mapped.close()


def test_a_snapshot_written_before_auto_still_loads(indexed, encoder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    folder = DataDir(data).snapshots / DataDir(data).current_id()
    values = json.loads((folder / MANIFEST_NAME).read_text())
    for key in ("factory_requested", "memory_budget", "index"):
        values.pop(key, None)
    values["metrics"].pop("index", None)
    values["faiss_factory"] = "Flat"
    (folder / MANIFEST_NAME).write_text(json.dumps(values))
    snapshot = Snapshot(folder)
    assert snapshot.manifest.requested_factory == "Flat" and snapshot.manifest.index == {}
    assert snapshot.manifest.modality_factory(IMAGE) == "Flat" and snapshot.manifest.search_params(IMAGE) == {}
    assert snapshot.indexes[IMAGE].params() is None
    server = RunningServer(data, encoder)
    try:
        assert len(server.client.search(text="a red circle", k=5).hits) == 5
    finally:
        server.stop()


def test_xmodal_index_says_which_index_and_why(world_corpus, tmp_path):
    import os
    import subprocess

    data = str(tmp_path / "data")
    args = ["index", str(world_corpus), "--data", data, "--model", "xmodal-demo", "--head", "identity", "--no-progress"]
    done = subprocess.run(
        xmodal_cmd(*args, "--factory", "auto", "--memory-budget", "64M"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "image index: Flat (400 items <= crossover" in done.stdout
    assert "text index: Flat (400 items <= crossover" in done.stderr  # the log line
    manifest = Manifest.read(DataDir(tmp_path / "data").snapshots / DataDir(tmp_path / "data").current_id())
    assert manifest.factory_requested == "auto" and manifest.memory_budget == 64 << 20
    done = subprocess.run(xmodal_cmd(*args, "--memory-budget", "lots"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "is not a size" in done.stderr
    done = subprocess.run(
        xmodal_cmd(*args, "--factory", "IVF1024,Flat"),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0 and "needs at least 1024 items of a modality to train on" in done.stderr
    assert "--factory auto" in done.stderr and "nx >=" not in done.stderr
