"""Corpus readers: a folder of images with a captions file, or a JSONL manifest.

Formats (see README.md, "Corpus formats"):

(a) A folder with ``captions.jsonl`` (or ``captions.csv``): one record per image-caption
    pair with ``id``, ``image`` (path relative to the folder) and ``caption``; every other
    field becomes metadata of both items. The image item's id is ``<id>``, the text
    item's ``<id>#caption``. This is the layout of ROCO (../shared/data/roco-ccby).
(b) A JSONL manifest file. Each line is one of
      {"type": "image", "id": ..., "path": ... , "metadata": {...}}
      {"type": "text", "id": ..., "text": ..., "metadata": {...}}
      {"type": "pair", "image": <image id>, "text": <text id>, "split": optional}
    Relative paths are relative to the manifest's folder. Images without text and texts
    without images are allowed.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CorpusError

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)
SPLITS = ("train", "val", "test")


@dataclass
class CorpusItem:
    id: str
    modality: str
    source: str = ""  # image: absolute path; text: "" (or where it came from)
    text: str = ""
    metadata: dict = field(default_factory=dict)


@dataclass
class CorpusPair:
    image_id: str
    text_id: str
    split: str | None = None


@dataclass
class Corpus:
    items: list[CorpusItem]
    pairs: list[CorpusPair]
    root: Path


def _check_id(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f"{where}: 'id' must be a non-empty string, got {value!r}")
    return value


def read_corpus(path: str | Path) -> Corpus:
    """Read a corpus folder or manifest file.

    Raises:
        CorpusError: the path is missing, or a record is malformed (the message names the
            file and line).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("captions.jsonl", "captions.csv"):
            if (path / name).is_file():
                return _read_captions(path, path / name)
        raise CorpusError(
            f"{path} is a folder without captions.jsonl or captions.csv: add one (fields id, image, caption) "
            "or pass a JSONL manifest file"
        )
    if path.is_file():
        if path.name.startswith("captions."):
            return _read_captions(path.parent, path)
        return _read_manifest(path)
    raise CorpusError(f"corpus {path} does not exist: pass a folder with captions.jsonl or a manifest .jsonl")


def _records(file: Path) -> Iterator[tuple[int, dict]]:
    if file.suffix == ".csv":
        with open(file, newline="", encoding="utf-8") as handle:
            for line_no, row in enumerate(csv.DictReader(handle), start=2):
                yield line_no, dict(row)
        return
    with open(file, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{file}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{file}:{line_no}: each line must be a JSON object")
            yield line_no, record


def _read_captions(root: Path, file: Path) -> Corpus:
    items: list[CorpusItem] = []
    pairs: list[CorpusPair] = []
    seen: set[str] = set()
    for line_no, record in _records(file):
        where = f"{file}:{line_no}"
        missing = [key for key in ("id", "image", "caption") if not record.get(key)]
        if missing:
            raise CorpusError(f"{where}: missing field(s) {', '.join(missing)} (need id, image, caption)")
        item_id = _check_id(str(record.pop("id")), where)
        if item_id in seen:
            raise CorpusError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        image_path = (root / str(record.pop("image"))).resolve()
        caption = str(record.pop("caption"))
        split = record.pop("split", None) or None
        if split is not None and split not in SPLITS:
            raise CorpusError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        metadata = record  # every other field
        text_id = f"{item_id}#caption"
        items.append(CorpusItem(item_id, IMAGE, source=str(image_path), metadata=metadata))
        items.append(CorpusItem(text_id, TEXT, text=caption, metadata=metadata))
        pairs.append(CorpusPair(item_id, text_id, split))
    if not items:
        raise CorpusError(f"{file} holds no records")
    return Corpus(items, pairs, root)


def _read_manifest(file: Path) -> Corpus:
    root = file.parent
    items: dict[str, CorpusItem] = {}
    pairs: list[CorpusPair] = []
    for line_no, record in _records(file):
        where = f"{file}:{line_no}"
        kind = record.get("type")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise CorpusError(f"{where}: 'metadata' must be a JSON object")
        if kind == "image":
            item_id = _check_id(record.get("id"), where)
            if not record.get("path"):
                raise CorpusError(f"{where}: image record needs 'path'")
            item = CorpusItem(item_id, IMAGE, source=str((root / record["path"]).resolve()), metadata=metadata)
        elif kind == "text":
            item_id = _check_id(record.get("id"), where)
            if not isinstance(record.get("text"), str) or not record["text"].strip():
                raise CorpusError(f"{where}: text record needs a non-empty 'text'")
            item = CorpusItem(item_id, TEXT, text=record["text"], metadata=metadata)
        elif kind == "pair":
            image_id, text_id = record.get("image"), record.get("text")
            if not image_id or not text_id:
                raise CorpusError(f"{where}: pair record needs 'image' and 'text' item ids")
            split = record.get("split")
            if split is not None and split not in SPLITS:
                raise CorpusError(f"{where}: split must be one of {SPLITS}, got {split!r}")
            pairs.append(CorpusPair(str(image_id), str(text_id), split))
            continue
        else:
            raise CorpusError(f"{where}: 'type' must be image, text or pair, got {kind!r}")
        if item.id in items:
            raise CorpusError(f"{where}: duplicate id {item.id!r}")
        items[item.id] = item
    for pair in pairs:
        for item_id, modality in ((pair.image_id, IMAGE), (pair.text_id, TEXT)):
            found = items.get(item_id)
            if found is None:
                raise CorpusError(f"{file}: pair names unknown {modality} item {item_id!r}")
            if found.modality != modality:
                raise CorpusError(f"{file}: pair names {item_id!r} as {modality}, but it is a {found.modality} item")
    if not items:
        raise CorpusError(f"{file} holds no items")
    return Corpus(list(items.values()), pairs, root)
