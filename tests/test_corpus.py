"""Corpus formats: captions folder (JSONL and CSV) and the JSONL manifest, with clear errors."""

from __future__ import annotations

import json

import pytest

from xmodal.indexer.corpus import IMAGE, TEXT, read_corpus
from xmodal.indexer.errors import CorpusError


def write_lines(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_captions_jsonl_extra_fields_become_metadata(tmp_path):
    write_lines(
        tmp_path / "captions.jsonl",
        [
            {"id": "a", "image": "images/a.jpg", "caption": "chest x-ray", "license": "CC BY", "source": "PMC1"},
        ],
    )
    corpus = read_corpus(tmp_path)
    image, text = corpus.items
    assert (image.id, image.modality, text.id, text.modality) == ("a", IMAGE, "a#caption", TEXT)
    # clients see the path under the corpus root; only the indexer reads the absolute one
    assert image.source == "images/a.jpg" and image.path == str((tmp_path / "images" / "a.jpg").resolve())
    assert text.text == "chest x-ray"
    assert image.metadata == text.metadata == {"license": "CC BY", "source": "PMC1"}
    assert [(p.image_id, p.text_id) for p in corpus.pairs] == [("a", "a#caption")]


def test_captions_csv(tmp_path):
    (tmp_path / "captions.csv").write_text("id,image,caption,site\nx1,x1.png,a caption,north\n")
    corpus = read_corpus(tmp_path)
    assert corpus.items[1].text == "a caption" and corpus.items[0].metadata == {"site": "north"}


def test_manifest_allows_unpaired_items(tmp_path):
    manifest = write_lines(
        tmp_path / "items.jsonl",
        [
            {"type": "image", "id": "i1", "path": "i1.png", "metadata": {"ward": 3}},
            {"type": "image", "id": "i2", "path": "i2.png"},
            {"type": "text", "id": "t1", "text": "report one"},
            {"type": "text", "id": "t2", "text": "report without image"},
            {"type": "pair", "image": "i1", "text": "t1", "split": "test"},
        ],
    )
    corpus = read_corpus(manifest)
    assert sorted(i.id for i in corpus.items) == ["i1", "i2", "t1", "t2"]
    assert [(p.image_id, p.text_id, p.split) for p in corpus.pairs] == [("i1", "t1", "test")]


@pytest.mark.parametrize(
    "records, message",
    [
        ([{"id": "a", "image": "a.png"}], "missing field"),
        (
            [{"id": "a", "image": "a.png", "caption": "x"}, {"id": "a", "image": "b.png", "caption": "y"}],
            "duplicate id",
        ),
        ([{"id": "a", "image": "a.png", "caption": "x", "split": "holdout"}], "split must be one of"),
    ],
)
def test_bad_captions_name_file_and_line(tmp_path, records, message):
    write_lines(tmp_path / "captions.jsonl", records)
    with pytest.raises(CorpusError, match=message) as info:
        read_corpus(tmp_path)
    assert "captions.jsonl:" in str(info.value)


def test_bad_manifest_pair_and_json(tmp_path):
    manifest = write_lines(
        tmp_path / "m.jsonl", [{"type": "text", "id": "t", "text": "x"}, {"type": "pair", "image": "nope", "text": "t"}]
    )
    with pytest.raises(CorpusError, match="unknown image item 'nope'"):
        read_corpus(manifest)
    manifest.write_text('{"type": "text", "id": "t", "text": "x"}\n{broken\n')
    with pytest.raises(CorpusError, match=r"m.jsonl:2: not valid JSON"):
        read_corpus(manifest)


def test_missing_corpus_and_folder_without_captions(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nowhere")
    with pytest.raises(CorpusError, match="without captions.jsonl"):
        read_corpus(tmp_path)
