"""The `xmodal` command line, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import xmodal_cmd

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, timeout=300):
    return subprocess.run(xmodal_cmd(*args), capture_output=True, text=True, timeout=timeout, env=OFFLINE)


def test_demo_once_runs_its_example_searches(tmp_path):
    done = run("demo", "--once", "--port", "0", "--n", "200", "--data", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("held-out query:") == 3 and "image -> text" in done.stdout
    assert "zero-shot" in done.stdout and "adapted (mlp head)" in done.stdout
    assert "held-out text->image recall@10: zero-shot" in done.stdout
    assert "wrote snapshot" in done.stdout and "serving the adapted snapshot" in done.stdout
    again = run("demo", "--once", "--port", "0", "--n", "200", "--data", str(tmp_path / "demo"))
    assert again.returncode == 0 and "up to date: snapshot" in again.stdout  # a second run re-indexes nothing


def test_search_and_status_commands(running, world_corpus):
    done = run("search", "--server", running.server.address, "--text", "a large red circle", "-k", "3", "--json")
    assert done.returncode == 0, done.stderr
    hits = json.loads(done.stdout)["hits"]
    assert len(hits) == 3 and all(h["modality"] == "image" for h in hits)
    image = sorted((world_corpus / "images").glob("*.png"))[0]
    done = run("search", "--server", running.server.address, "--image", str(image), "-k", "2")
    assert done.returncode == 0 and done.stdout.count("  text  ") == 2
    done = run("status", "--server", running.server.address)
    assert json.loads(done.stdout)["counts"]["image"]["indexed"] == 400


def test_errors_are_one_clear_line_and_exit_2(tmp_path):
    done = run("index", str(tmp_path / "missing"), "--data", str(tmp_path / "d"), "--model", "xmodal-demo")
    assert done.returncode == 2 and "error:" in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = run("search", "--server", "127.0.0.1:1", "--text", "x", "--timeout", "3")
    assert done.returncode == 2 and "unavailable" in done.stderr
    done = run("index", str(tmp_path), "--data", str(tmp_path / "d"), "--model", "ViT-Q-99")
    assert done.returncode == 2 and "unknown open_clip model" in done.stderr


def test_serve_limits_are_configurable(indexed, tmp_path):
    import time

    from xmodal import client as xc

    port_file = tmp_path / "port"
    proc = subprocess.Popen(xmodal_cmd("serve", "--data", str(indexed), "--port", "0", "--port-file", str(port_file),
                                       "--max-text-chars", "20", "--max-k", "5", "--max-message-bytes", "100000"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=OFFLINE)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with xc.SearchClient(f"127.0.0.1:{port_file.read_text()}") as client:
            client.wait_until_serving(60)
            with pytest.raises(xc.ResourceExhausted, match="limit of 20"):
                client.search(text="x" * 21, k=3)
            with pytest.raises(xc.InvalidArgument, match="between 1 and 5"):
                client.search(text="red", k=6)
            with pytest.raises(xc.ResourceExhausted):
                client.search(image=bytes(200_000), k=3)
            assert client.status().max_k == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
