"""Read-only replicas: `xmodal serve --read-only --primary HOST:PORT` over the primary's data
directory, as real processes: they serve what the primary serves, follow its upserts and
snapshots within two watch intervals, refuse writes naming the primary, come back after a
SIGKILL, and leave the data directory byte for byte as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import xmodal_cmd

pytestmark = pytest.mark.slow
WATCH = 0.5  # seconds between a server's checks of CURRENT and the catalog
FOLLOW = 2 * WATCH + 6.0  # two watch intervals, plus loading a snapshot on a busy 2-core machine
QUERIES = ["a large red circle", "a small blue square", "a green triangle on a white background"]


class Process:
    """One `xmodal serve` subprocess on 127.0.0.1 with an ephemeral port."""

    def __init__(self, data: Path, folder: Path, name: str, *extra: str):
        self.data, self.folder, self.name, self.extra = data, folder, name, extra
        self.start()

    def start(self) -> None:
        from xmodal.client import SearchClient

        port_file = self.folder / f"{self.name}.port"
        port_file.unlink(missing_ok=True)
        self.log = open(self.folder / f"{self.name}.log", "ab")  # noqa: SIM115 - closed in stop()
        args = ["serve", "--data", str(self.data), "--port", "0", "--port-file", str(port_file)]
        args += ["--model", "xmodal-demo", "--watch-interval", str(WATCH), *self.extra]
        self.proc = subprocess.Popen(
            xmodal_cmd(*args), stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        )
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert self.proc.poll() is None, (self.folder / f"{self.name}.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"{self.name} did not start"
            time.sleep(0.1)
        self.address = f"127.0.0.1:{port_file.read_text()}"
        self.client = SearchClient(self.address, timeout=30)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.client.close()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)
        self.log.close()


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def top10(client, text: str) -> list[str]:
    return [hit.item_id for hit in client.search(text=text, k=10)]


def until(condition, what: str, timeout: float = FOLLOW):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.1f} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(indexed, tmp_path_factory):
    folder = tmp_path_factory.mktemp("replicas")
    data = folder / "shared-data"
    shutil.copytree(indexed, data)
    primary = Process(data, folder, "primary")
    replicas = [Process(data, folder, f"replica-{n}", "--read-only", "--primary", primary.address) for n in range(2)]
    yield primary, replicas, data
    for process in [primary, *replicas]:
        if process.proc.poll() is None:
            process.stop()


def test_replicas_serve_what_the_primary_serves_and_say_they_are_replicas(cluster):
    primary, replicas, _ = cluster
    for replica in replicas:
        status = replica.client.status()
        assert status.raw.read_only and status.raw.primary == primary.address
        assert status.snapshot_id == primary.client.status().snapshot_id
        assert [top10(replica.client, q) for q in QUERIES] == [top10(primary.client, q) for q in QUERIES]
    assert not primary.client.status().raw.read_only


def test_replicas_refuse_writes_naming_the_primary(cluster):
    from xmodal.client import FailedPrecondition

    primary, replicas, _ = cluster
    client = replicas[0].client
    some_id = top10(client, QUERIES[0])[0]
    writes = {
        "feedback": lambda: client.submit_feedback(text="x", relevant=[some_id]),
        "upserts": lambda: client.upsert_items([{"item_id": "new", "text": "a new caption"}]),
        "deletes": lambda: client.delete_items([some_id]),
        "refits": lambda: client.refit("query"),
        "rollbacks": lambda: client.rollback(primary.client.status().snapshot_id),
        "compactions": lambda: client.compact(),
    }
    for what, call in writes.items():
        with pytest.raises(FailedPrecondition) as caught:
            call()
        assert f"read-only replica: send {what} to the primary at {primary.address}" in str(caught.value)
    assert some_id in top10(client, QUERIES[0])  # nothing was deleted


def test_upserts_deletes_and_new_snapshots_reach_both_replicas(cluster):
    primary, replicas, _ = cluster
    caption = "a violet hexagon beside an orange star, replica case 7"
    primary.client.upsert_items([{"item_id": "replica-case", "text": caption}])
    for replica in replicas:
        until(
            lambda r=replica: r.client.search(text=caption, target="text", k=3).hits[0].item_id == "replica-case",
            "the upsert on a replica",
        )
    primary.client.delete_items(["replica-case"])
    for replica in replicas:
        until(
            lambda r=replica: (
                "replica-case" not in [h.item_id for h in r.client.search(text=caption, target="text", k=5)]
            ),
            "the delete on a replica",
        )
    before = primary.client.status().snapshot_id
    report = primary.client.compact()  # a new snapshot: CURRENT moves
    assert report.snapshot_id != before
    for replica in replicas:
        until(lambda r=replica: r.client.status().snapshot_id == report.snapshot_id, "the new snapshot on a replica")
        assert [top10(replica.client, q) for q in QUERIES] == [top10(primary.client, q) for q in QUERIES]


def test_a_replica_killed_with_sigkill_serves_again_after_a_restart(cluster):
    primary, replicas, _ = cluster
    replica = replicas[0]
    replica.stop(signal.SIGKILL)
    replica.start()
    assert replica.client.status().snapshot_id == primary.client.status().snapshot_id
    assert [top10(replica.client, q) for q in QUERIES] == [top10(primary.client, q) for q in QUERIES]


def test_a_replica_changes_no_byte_of_the_data_directory(cluster):
    primary, replicas, data = cluster
    expected = [top10(primary.client, q) for q in QUERIES]
    primary.stop()
    time.sleep(3 * WATCH)  # the replicas notice nothing changes any more
    before = tree_hashes(data)
    replica = replicas[1]
    for _ in range(10):
        assert [top10(replica.client, q) for q in QUERIES] == expected
        ids = expected[0]
        assert len(replica.client.get_items(ids)) == len(ids)
        replica.client.status()
    time.sleep(3 * WATCH)  # its watcher looks at CURRENT and the catalog meanwhile
    assert tree_hashes(data) == before
