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
from typing import Protocol

from .errors import CorpusError, InvalidImage

IMAGE = "image"
TEXT = "text"
MODALITIES = (IMAGE, TEXT)
SPLITS = ("train", "val", "test")


@dataclass
class CorpusItem:
    id: str
    modality: str
    source: str = ""  # image: its path relative to the corpus root (shown to clients); text: ""
    text: str = ""
    metadata: dict = field(default_factory=dict)
    path: str = ""  # image: the file's absolute path, read by the indexer and the server only


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
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): DICOM files left out


class DicomReading(Protocol):
    """What the reader needs for DICOM files (xmodal.indexer.clinical.HeaderReader)."""

    def header(self, path: Path) -> tuple[dict, str]:
        """(allowlisted metadata, derived item id) of a DICOM file; InvalidImage if unreadable."""
        ...


def _check_id(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CorpusError(f"{where}: 'id' must be a non-empty string, got {value!r}")
    return value


def read_corpus(path: str | Path, dicom: DicomReading | None = None) -> Corpus:
    """Read a corpus folder or manifest file.

    Args:
        dicom: reads DICOM headers (metadata and ids). Without it, DICOM images keep the
            ids and metadata of their records, and one without an id is refused.

    Raises:
        CorpusError: the path is missing, or a record is malformed (the message names the
            file and line).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("captions.jsonl", "captions.csv"):
            if (path / name).is_file():
                return _with_dicom(_read_captions(path, path / name), dicom)
        found = _dicom_files(path)
        if found:
            return _with_dicom(Corpus([_dicom_item(file, path) for file in found], [], path), dicom)
        raise CorpusError(
            f"{path} is a folder without captions.jsonl or captions.csv: add one (fields id, image, caption), "
            "pass a JSONL manifest file, or a folder of DICOM files"
        )
    if path.is_file():
        if path.name.startswith("captions."):
            return _with_dicom(_read_captions(path.parent, path), dicom)
        return _with_dicom(_read_manifest(path), dicom)
    raise CorpusError(f"corpus {path} does not exist: pass a folder with captions.jsonl or a manifest .jsonl")


def _dicom_files(folder: Path) -> list[Path]:
    """The DICOM files under ``folder`` (by suffix, or by the DICM preamble), sorted."""
    from .dicom import is_dicom_path

    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom_path(p))


def _dicom_item(file: Path, root: Path) -> CorpusItem:
    path, source = _image_path(root, str(file.relative_to(root)))
    return CorpusItem("", IMAGE, source=source, path=str(path))


def _with_dicom(corpus: Corpus, reading: DicomReading | None) -> Corpus:
    """DICOM images get their allowlisted attributes as metadata (under the record's own) and,
    without an id, one derived from the file; unreadable ones are left out (with their pairs)."""
    from .dicom import is_dicom_path

    images = [i for i in corpus.items if i.modality == IMAGE and (not i.id or is_dicom_path(Path(i.path)))]
    if not images:
        return corpus
    renamed: dict[str, str] = {}  # placeholder id -> derived id
    dropped: set[str] = set()
    for item in images:
        if reading is None:  # a client (xmodal upsert): the server derives the missing ids
            if item.id.startswith(_PENDING):
                raise CorpusError(
                    f"{item.source}: a captioned DICOM image needs an id in its record to be upserted "
                    "(its caption is paired by id); give it one, or use xmodal index"
                )
            continue
        try:
            metadata, derived = reading.header(Path(item.path))
        except (InvalidImage, OSError) as exc:
            reason = str(exc) if isinstance(exc, InvalidImage) else f"cannot read it ({exc.strerror or 'unreadable'})"
            corpus.skipped.append((item.source, reason))
            dropped.add(item.id or item.source)
            continue
        item.metadata = {**metadata, **item.metadata}
        if not item.id or item.id.startswith(_PENDING):
            renamed[item.id or item.source] = derived
            item.id = derived
    items, seen = [], set()
    for item in corpus.items:
        key = item.id if item.id else item.source
        if key in dropped or (item.modality == TEXT and _owner(item.id) in dropped):
            continue
        if item.modality == TEXT and _owner(item.id) in renamed:
            item.id = f"{renamed[_owner(item.id)]}#caption"
        if item.id and item.id in seen:  # "": named by the server on upsert
            raise CorpusError(f"{corpus.root}: two items have the id {item.id!r} (the same DICOM instance twice?)")
        seen.add(item.id)
        items.append(item)
    pairs = []
    for pair in corpus.pairs:
        if pair.image_id in dropped:
            continue
        image_id = renamed.get(pair.image_id, pair.image_id)
        text_id = f"{image_id}#caption" if _owner(pair.text_id) in renamed else pair.text_id
        pairs.append(CorpusPair(image_id, text_id, pair.split))
    return Corpus(items, pairs, corpus.root, corpus.skipped)


_PENDING = "\x00dicom:"  # placeholder id of a captions record without one, until its header is read


def _owner(text_id: str) -> str:
    return text_id[: -len("#caption")] if text_id.endswith("#caption") else ""


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


def _is_dicom_name(value: str) -> bool:
    return value.lower().endswith((".dcm", ".dicom"))


def _image_path(root: Path, value: str) -> tuple[Path, str]:
    """An image record's file: its absolute path (for reading) and its path relative to the
    corpus root (what clients see; a file outside the root shows its name only)."""
    path = (root / value).resolve()
    try:
        return path, path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path, path.name


def _read_captions(root: Path, file: Path) -> Corpus:
    items: list[CorpusItem] = []
    pairs: list[CorpusPair] = []
    seen: set[str] = set()
    for line_no, record in _records(file):
        where = f"{file}:{line_no}"
        missing = [key for key in ("id", "image", "caption") if not record.get(key)]
        if missing == ["id"] and _is_dicom_name(str(record["image"])):
            record["id"] = f"{_PENDING}{line_no}"  # a DICOM image's id comes from its header
        elif missing:
            raise CorpusError(f"{where}: missing field(s) {', '.join(missing)} (need id, image, caption)")
        item_id = _check_id(str(record.pop("id")), where)
        if item_id in seen:
            raise CorpusError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        image_path, source = _image_path(root, str(record.pop("image")))
        caption = str(record.pop("caption"))
        split = record.pop("split", None) or None
        if split is not None and split not in SPLITS:
            raise CorpusError(f"{where}: split must be one of {SPLITS}, got {split!r}")
        metadata = record  # every other field
        text_id = f"{item_id}#caption"
        items.append(CorpusItem(item_id, IMAGE, source=source, metadata=metadata, path=str(image_path)))
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
            if not record.get("path"):
                raise CorpusError(f"{where}: image record needs 'path'")
            if not record.get("id") and _is_dicom_name(str(record["path"])):
                record["id"] = f"{_PENDING}{line_no}"  # a DICOM image's id comes from its header
            item_id = _check_id(record.get("id"), where)
            image_path, source = _image_path(root, str(record["path"]))
            item = CorpusItem(item_id, IMAGE, source=source, metadata=metadata, path=str(image_path))
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
