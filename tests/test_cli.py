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
    proc = subprocess.Popen(
        xmodal_cmd(
            "serve",
            "--data",
            str(indexed),
            "--port",
            "0",
            "--port-file",
            str(port_file),
            "--max-text-chars",
            "20",
            "--max-k",
            "5",
            "--max-message-bytes",
            "100000",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=OFFLINE,
    )
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


COMMAND_NAMES = (
    "demo index fit eval serve backup keys feedback refit snapshots search status upsert delete compact web".split()
)


def test_help_lists_every_command_and_each_command_has_help(capsys):
    from xmodal.server.cli import COMMANDS, main

    assert sorted(c.name for c in COMMANDS) == sorted(COMMAND_NAMES)
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert all(f"    {name} " in done.stdout for name in COMMAND_NAMES)
    for name in COMMAND_NAMES:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
        assert capsys.readouterr().out.startswith(f"usage: xmodal {name} ")


def parse(*argv):
    """argv parsed the way main() parses it (only that command's flags added)."""
    from xmodal.server.cli import make_parser

    return make_parser(only=argv[0]).parse_args(list(argv))


def test_defaults_are_the_dataclasses(tmp_path):
    from xmodal.indexer.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE
    from xmodal.indexer.snapshot import DEFAULT_FACTORY
    from xmodal.indexer.train import FitConfig
    from xmodal.server.cli._training import fit_config, policy
    from xmodal.server.cli.serving import limits, serve_config
    from xmodal.server.config import ServeConfig
    from xmodal.server.limits import Limits
    from xmodal.server.refit import RefitPolicy

    args = parse("index", "corpus", "--data", str(tmp_path))
    assert fit_config(args) == FitConfig()
    assert (args.batch_size, args.shard_size, args.factory) == (DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE, DEFAULT_FACTORY)
    args = parse("serve", "--data", str(tmp_path))
    assert serve_config(args) == ServeConfig() and limits(args) == Limits() and policy(args) == RefitPolicy()
    assert policy(parse("refit", "--data", str(tmp_path))) == RefitPolicy()  # refit has no --refit-interval
    assert parse("search", "--text", "x").server == f"{ServeConfig().host}:{ServeConfig().port}"


def test_help_shows_the_declared_defaults():
    import re

    from xmodal.indexer.train import FitConfig

    done = run("index", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert re.search(r"--epochs EPOCHS maximum epochs \(default (\d+);", text).group(1) == str(FitConfig().epochs)
    assert f"--lr LR AdamW learning rate (default {FitConfig().lr})" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ("refit", "--server", "127.0.0.1:1", "--data", "d"),
            "pass --server (a running server) or --data",
        ),
        (("serve", "--data", "d", "--tls-cert", "c.pem"), "--tls-cert and --tls-key go together"),
        (("serve", "--data", "d", "--tls-client-ca", "ca.pem"), "--tls-client-ca needs --tls-cert"),
        (("feedback", "--text", "x"), "give --relevant ID"),
        (("feedback", "--file", "f.jsonl", "--relevant", "a"), "--relevant/--irrelevant go with"),
        (
            ("search", "--text", "x", "--client-cert", "c.pem"),
            "--client-cert and --client-key go together",
        ),
        (("snapshots", "--server", "127.0.0.1:1", "--data", "d"), "pass --server"),
        (("eval", "--data", "d", "--kinds", "mlp,bogus"), "--kinds: unknown head kind(s) bogus"),
    ],
)
def test_bad_flag_combinations_are_refused_before_any_work(argv, message):
    from xmodal.indexer.errors import InvalidArgument

    args = parse(*argv)
    with pytest.raises(InvalidArgument) as error:  # main prints it as `xmodal CMD: error: ...`, exit 2
        args.handler.validate(args)
    assert str(error.value).startswith(message)


def test_bad_values_are_one_line_errors(tmp_path):
    from xmodal.indexer.errors import InvalidArgument
    from xmodal.server.config import ServeConfig

    with pytest.raises(InvalidArgument, match="port must be an integer from 0 to 65535"):
        ServeConfig(port=70000)
    with pytest.raises(TypeError):
        ServeConfig("0.0.0.0")  # keyword-only
    done = run("serve", "--data", str(tmp_path / "none"), "--rpc-workers", "0")
    assert done.returncode == 2 and "xmodal serve: error: rpc_workers must be a positive integer" in done.stderr
    assert "Traceback" not in done.stderr


def test_version_is_the_installed_package_version():
    import tomllib

    from xmodal.server.config import version

    from conftest import REPO

    assert version() == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_snapshots_and_offline_refit_on_a_data_directory(indexed, tmp_path):
    import shutil

    from xmodal.indexer.snapshot import DataDir

    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    live = DataDir(data).current_id()
    done = run("snapshots", "--data", str(data))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"* {live}  mlp      parent -"]
    done = run("refit", "--data", str(data), "--mode", "query", "--refit-epochs", "2")
    assert done.returncode == 0, done.stderr  # it used to stop on a flag only `serve` has (--refit-interval)
    assert json.loads(done.stdout.split("\nbefore:")[0])["state"] in ("promoted", "rejected")
    done = run("snapshots", "--data", str(data), "--rollback", live)
    assert done.returncode == 0 and f"CURRENT is now {live}" in done.stdout
