"""Clinical images in xmodal: how a DICOM file becomes an item, and what of it is kept.

:mod:`.dicom` reads pixels and headers; this module holds the policy around it, the same for
``xmodal index``, UpsertItems and image queries:

- the settings (window override, metadata allowlist, burned-in annotations allowed or not)
  live in the catalog: ``xmodal index --dicom-window/--dicom-fields/--allow-burned-in`` sets
  them, and the server uses what the catalog holds, so a query image is windowed as the
  corpus was;
- an item keeps only the allowlisted attributes as metadata, and GetItems returns a
  de-identified copy of the file (written under ``blobs/``), never the file itself;
- a DICOM image without an id gets ``dcm-<keyed hash of its SOP Instance UID>``, the key
  kept in the data directory (``dicom.key``), so ids are stable and reveal nothing.
"""

from __future__ import annotations

import io
import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import dicom
from .catalog import Catalog
from .errors import InvalidImage

META_KEY = "dicom"


@dataclass(frozen=True)
class DicomSettings:
    """How DICOM files are read (see README, "Clinical images")."""

    window: dicom.Window | None = None  # None: each file's own VOI LUT or window
    fields: tuple[str, ...] = dicom.DEFAULT_FIELDS  # attributes kept as metadata
    allow_burned_in: bool = False  # index images flagged BurnedInAnnotation = YES

    def to_json(self) -> str:
        window = self.window
        return json.dumps(
            {
                "window": [window.centre, window.width, window.name] if window else None,
                "fields": list(self.fields),
                "allow_burned_in": self.allow_burned_in,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DicomSettings:
        value = json.loads(text)
        window = value.get("window")
        return cls(
            window=dicom.Window(float(window[0]), float(window[1]), str(window[2])) if window else None,
            fields=tuple(value.get("fields") or dicom.DEFAULT_FIELDS),
            allow_burned_in=bool(value.get("allow_burned_in")),
        )

    def describe(self) -> str:
        window = self.window
        shown = f"{window.name or 'custom'} ({window.centre:g},{window.width:g})" if window else "each file's own"
        burned_in = "indexed" if self.allow_burned_in else "skipped"
        return f"window {shown}; metadata {', '.join(self.fields)}; burned-in annotations {burned_in}"

    def replace(
        self,
        *,
        window: dicom.Window | None = None,
        fields: tuple[str, ...] | None = None,
        allow_burned_in: bool | None = None,
    ) -> DicomSettings:
        """These settings with what is given (not None) replacing them."""
        return DicomSettings(
            window=window if window is not None else self.window,
            fields=fields if fields is not None else self.fields,
            allow_burned_in=allow_burned_in if allow_burned_in is not None else self.allow_burned_in,
        )


def load_settings(catalog: Catalog) -> DicomSettings:
    """The data directory's DICOM settings (the defaults until ``xmodal index`` sets others)."""
    stored = catalog.get_meta(META_KEY)
    return DicomSettings.from_json(stored) if stored else DicomSettings()


def stored_settings(catalog_path: Path) -> DicomSettings:
    """The settings in the catalog at ``catalog_path``, read without creating anything."""
    if not catalog_path.is_file():
        return DicomSettings()
    db = sqlite3.connect(f"file:{catalog_path}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (META_KEY,)).fetchone()
    except sqlite3.OperationalError:  # a catalog being created
        row = None
    finally:
        db.close()
    return DicomSettings.from_json(row[0]) if row else DicomSettings()


def update_settings(catalog: Catalog, settings: DicomSettings) -> DicomSettings:
    """Store ``settings`` as the data directory's; returns them."""
    if catalog.get_meta(META_KEY) != settings.to_json():
        with catalog.tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (META_KEY, settings.to_json()))
    return settings


class HeaderReader:
    """Reads a corpus's DICOM headers for :func:`xmodal.indexer.corpus.read_corpus`: the
    allowlisted metadata and the derived id (the key is made only when first needed)."""

    def __init__(self, settings: DicomSettings, key: Callable[[], bytes]):
        self.settings = settings
        self._key_source = key
        self._key: bytes | None = None

    def header(self, path: Path) -> tuple[dict, str]:
        head = dicom.read_header(path, fields=self.settings.fields)
        if head.burned_in and not self.settings.allow_burned_in:
            raise InvalidImage(BURNED_IN)
        if self._key is None:
            self._key = self._key_source()
        return head.metadata, dicom.item_id(head.instance_uid, self._key) if head.instance_uid else ""


BURNED_IN = (
    "the DICOM image is flagged BurnedInAnnotation = YES (text such as names may be in its pixels): "
    "skipped; index it with --allow-burned-in once you have checked such images"
)


@dataclass
class ClinicalImage:
    """One DICOM file, read as an item: what the encoder sees, what is kept, what is served."""

    image: Image.Image
    metadata: dict
    item_id: str  # derived from the SOP Instance UID with the data directory's key
    deidentified: bytes  # what GetItems returns
    frames: int = 1
    notes: list[str] = field(default_factory=list)


def read_clinical(data: bytes, settings: DicomSettings, key: bytes, *, max_pixels: int) -> ClinicalImage:
    """Read a DICOM file's bytes as an item.

    Raises:
        InvalidImage: unreadable, no pixel data, a missing codec, or burned-in annotations
            while they are not allowed (the message says which, without header values).
        ResourceExhausted: rows x columns x frames past ``max_pixels``.
    """
    read = dicom.read_dicom(data, window=settings.window, fields=settings.fields, max_pixels=max_pixels)
    if read.burned_in and not settings.allow_burned_in:
        raise InvalidImage(BURNED_IN)
    copy = dicom.deidentified(data, fields=settings.fields, max_pixels=max_pixels)
    if settings.window is not None:
        copy = _with_window(copy, settings.window)
    return ClinicalImage(
        image=read.image,
        metadata=read.metadata,
        item_id=dicom.item_id(read.instance_uid, key) if read.instance_uid else "",
        deidentified=copy,
        frames=read.frames,
    )


def _with_window(data: bytes, window: dicom.Window) -> bytes:
    """A de-identified copy that carries the window it was indexed with (so viewers show the
    pixels as the encoder saw them): the override replaces the file's own VOI."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword in ("VOILUTSequence", "WindowCenterWidthExplanation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.WindowCenter = f"{window.centre:g}"
    ds.WindowWidth = f"{window.width:g}"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def key_for(data_dir: str | Path) -> bytes:
    """The data directory's id key (created on first use)."""
    return dicom.load_key(Path(data_dir))
