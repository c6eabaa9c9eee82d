"""Adaptation on a data directory: `xmodal index` fits the default head, `xmodal fit`
refits offline, `xmodal eval` writes JSON, Markdown and a PNG chart."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from xmodal.indexer.evaluate import pair_metrics
from xmodal.indexer.snapshot import DataDir, load_current

from conftest import xmodal_cmd


def test_index_fits_the_default_mlp_head(indexed):
    snapshot = load_current(DataDir(indexed))
    assert snapshot.manifest.head_kind == "mlp"
    metrics = snapshot.manifest.metrics
    assert {"zero_shot", "adapted", "fit"} <= set(metrics)
    fit = metrics["fit"]
    assert fit["pairs"] > 250 and fit["val_best"] >= fit["val_before"]


def test_too_few_pairs_fall_back_to_identity_with_a_note(world_corpus, encoder, tmp_path):
    from xmodal.indexer.pipeline import index_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = (world_corpus / "captions.jsonl").read_text().splitlines()[:12]
    (corpus / "captions.jsonl").write_text(
        "\n".join(
            json.dumps({**json.loads(line), "image": str(world_corpus / json.loads(line)["image"])}) for line in lines
        )
        + "\n"
    )
    report = index_corpus(corpus, tmp_path / "data", encoder, progress=False)
    assert report.snapshot.head_kind == "identity"
    assert "a mlp head needs 32" in report.summary() and "xmodal fit" in report.summary()


def test_fit_command_writes_a_new_current_snapshot(indexed, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(indexed, data)
    before = DataDir(data).current_id()
    done = subprocess.run(
        xmodal_cmd("fit", "--data", str(data), "--head", "linear", "--epochs", "5", "--no-progress"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "linear head:" in done.stdout and "made it current" in done.stdout
    snapshot = load_current(DataDir(data))
    assert snapshot.id != before and snapshot.manifest.parent_id == before
    assert snapshot.manifest.head_kind == "linear"
    # the indexes were rebuilt from the base store through the new head
    assert len(snapshot.indexes["image"]) == 400
    done = subprocess.run(
        xmodal_cmd("fit", "--data", str(tmp_path / "empty"), "--no-progress"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "run `xmodal index" in done.stderr


def test_eval_command_writes_json_markdown_and_png(indexed, tmp_path):
    out = tmp_path / "eval"
    done = subprocess.run(
        xmodal_cmd(
            "eval",
            "--data",
            str(indexed),
            "--kinds",
            "identity,pca,mlp",
            "--epochs",
            "5",
            "--out",
            str(out),
            "--no-progress",
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "eval.json").read_text())
    assert list(result["results"]) == ["identity", "pca", "mlp"] and result["split"] == "test"
    for kind in ("identity", "pca", "mlp"):
        for direction in ("text_to_image", "image_to_text"):
            assert 0 <= result["results"][kind][direction]["recall@10"] <= 1
    table = (out / "eval.md").read_text()
    assert "| zero-shot |" in table and "| mlp |" in table
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_captions_are_interchangeable_in_metrics():
    image = np.eye(3, dtype=np.float32)
    # text t1 and t2 say the same thing; t2 is closest to image i1 (the image of t1)
    text = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    pairs = [("i1", "t1"), ("i2", "t2"), ("i3", "t3")]
    plain = pair_metrics(["i1", "i2", "i3"], image, ["t1", "t2", "t3"], text, pairs)
    grouped = pair_metrics(
        ["i1", "i2", "i3"],
        image,
        ["t1", "t2", "t3"],
        text,
        pairs,
        text_groups={"t1": "same", "t2": "same", "t3": "other"},
    )
    assert plain["text_to_image"]["recall@1"] == pytest.approx(1 / 3)
    assert grouped["text_to_image"]["recall@1"] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def mixed_archive(tmp_path_factory, encoder):
    """An archive of two styles, indexed with zero-shot live: 160 items of the style the
    encoder knows ("source") and 400 of a new scanner's ("target")."""
    from xmodal.indexer.pipeline import index_corpus
    from xmodal.indexer.train import FitConfig
    from xmodal.indexer.world import write_corpus

    root = tmp_path_factory.mktemp("mixed")
    lines = []
    for style, n, seed in (("source", 160, 3), ("target", 400, 4)):
        folder = write_corpus(root / style, n=n, seed=seed, style=style, image_size=64)
        for line in (folder / "captions.jsonl").read_text().splitlines():
            record = json.loads(line)
            lines.append(json.dumps({**record, "image": str(folder / record["image"])}))
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "captions.jsonl").write_text("\n".join(lines) + "\n")
    data = root / "data"
    index_corpus(corpus, data, encoder, progress=False, head=FitConfig(kind="identity"))
    return data


def test_fit_replays_the_items_a_condition_picks_and_keeps_them_where_the_live_head_put_them(
    mixed_archive, tmp_path, capsys
):
    """`xmodal fit` in this process (the subprocess runs of the other tests cost a torch
    import each)."""
    import shutil

    from xmodal.indexer.catalog import Catalog
    from xmodal.indexer.corpus import IMAGE, TEXT
    from xmodal.indexer.store import BaseStore
    from xmodal.indexer.vectors import load_vectors
    from xmodal.server.cli import main

    heads = {}
    for name, extra in (("plain", []), ("replayed", ["--replay-where", "style=source"])):
        data = tmp_path / name
        shutil.copytree(mixed_archive, data)
        status = main(["fit", "--data", str(data), "--epochs", "20", "--no-progress", *extra])
        out, err = capsys.readouterr()
        assert status == 0, err
        snapshot = load_current(DataDir(data))
        assert snapshot.manifest.head_kind == "mlp" and snapshot.head.blend > 0, out  # it went live
        heads[name] = snapshot.head
        if extra:
            replay = snapshot.manifest.metrics["replay"]
            assert replay["items"] == {IMAGE: 160, TEXT: 160}  # every source-style image and caption
            assert replay["teacher"] == "identity" and replay["weight"] == 4  # zero-shot was live
            assert "replayed 160 images, 160 texts, kept where the identity head puts them" in out
    catalog = Catalog(DataDir(mixed_archive).catalog_path)
    vectors = load_vectors(BaseStore(DataDir(mixed_archive).base, catalog))

    def kept(head, modality: str) -> float:  # how close the source-style items stay to zero-shot
        found = vectors[modality]
        old = found.array[[i for i, item in enumerate(found.ids) if item.startswith("source-")]]
        return float((head.project(modality, old) * old).sum(1).mean())

    for modality in (IMAGE, TEXT):
        assert kept(heads["replayed"], modality) > kept(heads["plain"], modality) + 0.02

    for condition, message in (
        ("style", "--replay-where 'style': write FIELD=A,B"),  # unreadable: refused before any work
        ("style=no-such", "matches no embedded item"),  # matches nothing: a replay that keeps nothing
    ):
        status = main(["fit", "--data", str(tmp_path / "plain"), "--replay-where", condition, "--no-progress"])
        assert status == 2 and message in capsys.readouterr().err
