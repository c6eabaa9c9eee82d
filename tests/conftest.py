"""Shared fixtures: the shipped demo model, generated corpora, real servers on 127.0.0.1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROCO_ENV = "XMODAL_ROCO_DIR"


def roco_dir() -> Path | None:
    value = os.environ.get(ROCO_ENV)
    if not value:
        return None
    path = Path(value)
    return path if (path / "captions.jsonl").is_file() else None


def pytest_collection_modifyitems(config, items):
    # Files holding slow tests run first, each file kept whole (its module fixtures set up
    # once): with two workers, a slow file picked up last left the other worker idle at the end.
    slow_files = {item.path for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: order within files kept
    if roco_dir() is not None:
        return
    if os.environ.get("CI") == "true":
        raise pytest.UsageError(
            f"CI=true but {ROCO_ENV} does not point at the ROCO corpus (captions.jsonl); "
            "set it to ../shared/data/roco-ccby"
        )
    skip = pytest.mark.skip(reason=f"set {ROCO_ENV} to ../shared/data/roco-ccby to run the ROCO tests")
    for item in items:
        if "roco" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def encoder():
    from xmodal.indexer.encoder import load_encoder

    return load_encoder("xmodal-demo", None)


@pytest.fixture(scope="session")
def world_corpus(tmp_path_factory):
    from xmodal.indexer.world import write_corpus

    return write_corpus(tmp_path_factory.mktemp("world") / "corpus", n=400, seed=1)


@pytest.fixture(scope="session")
def indexed(tmp_path_factory, world_corpus, encoder):
    """A data directory with the generated corpus indexed (do not modify it in tests)."""
    from xmodal.indexer.pipeline import index_corpus

    data = tmp_path_factory.mktemp("data")
    index_corpus(world_corpus, data, encoder, progress=False, shard_size=128)
    return data


class RunningServer:
    def __init__(self, data, encoder, **limits):
        from xmodal.client import SearchClient
        from xmodal.server.engine import Limits, SearchEngine
        from xmodal.server.service import Server

        self.engine = SearchEngine(data, encoder, limits=Limits(**limits))
        self.engine.load_current()
        self.server = Server(self.engine, host="127.0.0.1", port=0).start()
        self.client = SearchClient(self.server.address, timeout=30)

    def stop(self):
        self.client.close()
        self.server.stop(grace=1)


@pytest.fixture(scope="module")
def running(indexed, encoder):
    """A real gRPC server (in this process) on an ephemeral port over ``indexed``."""
    server = RunningServer(indexed, encoder)
    yield server
    server.stop()


def xmodal_cmd(*args: str) -> list[str]:
    """The CLI as a subprocess, with the interpreter that runs the tests."""
    return [sys.executable, "-m", "xmodal.server.cli", *args]
