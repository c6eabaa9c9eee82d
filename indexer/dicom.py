"""DICOM ingest: radiologist-correct 8-bit pixels, allowlisted metadata, no identifiers.

Pixels (``read_dicom``): one frame (the middle one of a multi-frame file) is decoded;
the modality LUT (rescale slope/intercept, or a Modality LUT Sequence) is applied, then
the VOI: a ``Window`` given by the caller, else the file's first VOI LUT Sequence item,
else its first Window Center/Width, else the frame's min..max. Windowing is pydicom's
``apply_windowing`` (PS3.3 C.11.2.1.2) for the file's window and the caller's alike, into
0..255. MONOCHROME1 is inverted after. Enhanced multi-frame files keep rescale and window
in functional groups; they are read from there (per-frame over shared over top level).
Colour (RGB, YBR_* which pydicom converts to RGB, PALETTE COLOR through its LUT) is not
windowed; samples deeper than 8 bits are scaled to 8.

Metadata is an allowlist of public keywords; private tags are never read. The default
allowlist (``DEFAULT_FIELDS``), each coded or technical, none able to hold a name:

- Modality, BodyPartExamined, ViewPosition, ImageLaterality, Laterality: what and where.
- StudyDate: the year only, an int (full dates are identifiers).
- SeriesDescription: the protocol's series label ("AXIAL 1.25MM"); the one free-text field,
  kept because search needs it; sites that type names there should drop it.
- Manufacturer, ManufacturerModelName: the device make and model (never its serial).
- PatientSex: M, F or O.
- PatientAge: "045Y" becomes 45; ages over 89 become 90 (HIPAA Safe Harbor); ages in
  months, weeks or days stay strings ("006M").

Any date (DA, DT) allowlisted becomes its year. ``NEVER_FIELDS`` cannot be allowlisted:
names, ids, addresses, institutions, devices, comments, every UID and every person name.

``deidentified`` writes a new minimal file: the frame's stored values and what is needed
to display them as ``read_dicom`` does, the allowlisted fields except dates (a year alone
is not a valid DA, so the year lives in item metadata only) and new UIDs hashed from that
content alone. PALETTE COLOR and YBR are written as RGB.

Importing this module turns pydicom's reading validation off for the process: its warnings
quote the offending header value (a malformed name or UID) into logs.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    as_pixel_options,
    convert_color_space,
    get_decoder,
    pack_bits,
)
from pydicom.pixels.utils import get_expected_length
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UID_dictionary,
)
from pydicom.valuerep import DSfloat

from .errors import FailedPrecondition, InvalidArgument, InvalidImage, ResourceExhausted
from .images import DEFAULT_MAX_PIXELS

LOG = logging.getLogger(__name__)

# pydicom's value validation warns, and logs, with the offending value quoted: a malformed
# PatientName or UID would reach our logs. Validation never changes what is read, only
# whether it complains, so it is off for the process (xmodal reads DICOM only here).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (480.0, 2500.0),
    "brain": (40.0, 80.0),
    "soft-tissue": (40.0, 400.0),
    "liver": (90.0, 150.0),
}

DEFAULT_FIELDS: tuple[str, ...] = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "ImageLaterality",
    "Laterality",
    "StudyDate",
    "SeriesDescription",
    "Manufacturer",
    "ManufacturerModelName",
    "PatientSex",
    "PatientAge",
)

_NEVER_NAMED = {
    # the patient
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "PatientAddress", "PatientTelephoneNumbers", "PatientTelecomInformation", "IssuerOfPatientID",
    "MedicalRecordLocator", "MilitaryRank", "BranchOfService", "CountryOfResidence", "RegionOfResidence",
    "Occupation", "PatientComments", "AdditionalPatientHistory", "PatientReligiousPreference",
    "ResponsiblePerson", "ResponsibleOrganization", "PatientInsurancePlanCodeSequence", "PatientState",
    "CurrentPatientLocation", "PatientInstitutionResidence", "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar", "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
    # the visit and the order
    "AccessionNumber", "StudyID", "AdmissionID", "IssuerOfAdmissionIDSequence", "ServiceEpisodeID",
    "RequestedProcedureID", "ScheduledProcedureStepID", "PerformedProcedureStepID",
    "FillerOrderNumberImagingServiceRequest", "PlacerOrderNumberImagingServiceRequest",
    "RequestAttributesSequence", "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence",
    "ReasonForTheRequestedProcedure", "ReasonForStudy", "RequestingService",
    # staff and institution
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "RequestingPhysician", "ScheduledPerformingPhysicianName", "ContentCreatorName", "VerifyingObserverName",
    "PersonName", "PersonAddress", "PersonTelephoneNumbers",
    # devices that identify a site
    "StationName", "DeviceSerialNumber", "DetectorID", "GantryID", "PlateID", "CassetteID",
    "StationAETitle", "ScheduledStationAETitle", "PerformedStationAETitle", "RetrieveAETitle",
    "SourceApplicationEntityTitle",
    # free text and reports
    "ImageComments", "StudyComments", "AcquisitionComments", "ImagePresentationComments", "TextValue",
    "ContentSequence", "DerivationDescription",
}  # fmt: skip
NEVER_FIELDS: frozenset[str] = frozenset(
    _NEVER_NAMED | {kw for kw, tag in keyword_dict.items() if kw.endswith("UID") or dictionary_VR(tag) in ("PN", "UI")}
)
# Values that cannot become JSON metadata (binary, sequences, tags)
_UNFIT_VRS = {"SQ", "OB", "OD", "OF", "OL", "OV", "OW", "UN", "AT", "OB or OW", "US or OW"}

_PIXEL_ELEMENTS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_PHOTOMETRICS = _MONOCHROME + ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
_AGE = re.compile(r"(\d{1,3})([DWMY])")


@dataclass(frozen=True)
class Window:
    """A linear VOI window in modality units (HU for CT): ``centre`` and ``width`` > 0."""

    centre: float
    width: float
    name: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.centre) and math.isfinite(self.width)) or self.width <= 0:
            raise InvalidArgument(f"window centre must be finite and width > 0, got {self.centre},{self.width}")


def parse_window(text: str) -> Window:
    """Parse a ``--window`` value: a preset name ("lung") or "centre,width" ("-600,1500").

    Raises:
        InvalidArgument: neither a preset nor two numbers, or a width that is not > 0.
    """
    name = text.strip().lower()
    if name in WINDOW_PRESETS:
        return Window(*WINDOW_PRESETS[name], name=name)
    parts = [part.strip() for part in text.split(",")]
    usage = f"use a preset ({', '.join(WINDOW_PRESETS)}) or centre,width such as -600,1500"
    if len(parts) != 2:
        raise InvalidArgument(f"unknown window {text!r}: {usage}")
    try:
        centre, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidArgument(f"window {text!r} is not two numbers: {usage}") from None
    if not width > 0:
        raise InvalidArgument(f"window {text!r} has width {width}: the width must be > 0 ({usage})")
    return Window(centre, width)


def _check_field(keyword: str) -> None:
    if keyword not in keyword_dict:
        raise InvalidArgument(f"{keyword!r} is not a DICOM keyword (such as BodyPartExamined)")
    if keyword in NEVER_FIELDS:
        raise InvalidArgument(f"{keyword} can identify a patient or a site and is never kept as metadata")
    if dictionary_VR(keyword_dict[keyword]) in _UNFIT_VRS:
        raise InvalidArgument(f"{keyword} holds binary data or a sequence, not a value metadata can keep")


def parse_fields(text: str) -> tuple[str, ...]:
    """Parse a ``--dicom-fields`` value: comma-separated DICOM keywords.

    Raises:
        InvalidArgument: an unknown keyword, one in ``NEVER_FIELDS``, or a binary/sequence one.
    """
    fields = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not fields:
        raise InvalidArgument("no DICOM fields given: name keywords such as Modality,BodyPartExamined")
    for keyword in fields:
        _check_field(keyword)
    return fields


def is_dicom(data: bytes) -> bool:
    """Whether ``data`` is a DICOM Part 10 file (``DICM`` after the 128-byte preamble)."""
    return data[128:132] == b"DICM"


def is_dicom_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a DICOM file: a .dcm/.dicom suffix, or the DICM preamble."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


class NoPixelData(InvalidImage):
    """A DICOM file without pixel data: a structured report, a presentation state..."""


@dataclass
class DicomImage:
    """One decoded DICOM image.

    ``instance_uid`` is the SOPInstanceUID, kept in memory to derive an id (``item_id``),
    never to be stored.
    """

    image: Image.Image
    metadata: dict[str, Any]
    instance_uid: str = field(repr=False)
    frames: int
    frame: int
    burned_in: bool


@dataclass
class _Frame:
    """A decoded frame and the attributes that say how to display it."""

    stored: np.ndarray  # stored values (grey, palette indices) or RGB samples
    photometric: str  # after decoding: YBR is RGB here
    pixel: Dataset  # image pixel, modality LUT and VOI LUT attributes, flattened
    frames: int
    frame: int


def _sop_class_name(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    if uid and str(uid) in UID_dictionary:
        return UID(str(uid)).name.removesuffix(" Storage")
    return "unknown"


def _ts_name(uid: UID) -> str:
    return uid.name if str(uid) in UID_dictionary else "an unknown transfer syntax"


def _read_header(data: bytes) -> Dataset:
    """dcmread, with every failure turned into an InvalidImage naming no header value."""
    if not data:
        raise InvalidImage("DICOM bytes are empty")
    force = not is_dicom(data) and data[:2] == b"\x08\x00"  # a bare data set starting at group 0008
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except InvalidDicomError:
        raise InvalidImage("DICOM header could not be read: no 'DICM' marker at byte 128") from None
    except Exception as exc:  # pydicom raises many types on garbage; its messages may quote values
        raise InvalidImage(f"DICOM header could not be read ({type(exc).__name__})") from None
    if len(ds) == 0:
        raise InvalidImage("DICOM header could not be read: no data elements after the file meta (truncated?)")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        if not force:  # a Part 10 file must name its transfer syntax
            raise InvalidImage("DICOM header could not be read: the file meta information has no transfer syntax")
        implicit, little = ds.original_encoding
        if implicit is None:
            raise InvalidImage("DICOM header could not be read: no transfer syntax")
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            if default is None:
                raise InvalidImage(f"DICOM image has no {keyword}")
            return default
        return int(value)
    except (ValueError, TypeError, OverflowError):
        raise InvalidImage(f"DICOM header has an unreadable {keyword}") from None


def _functional(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The frame's item of a functional group macro (per-frame over shared), if any."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index and items[index].get(sequence):
            return items[index].get(sequence)[0]
    return None


def _pixel_attributes(ds: Dataset, frame: int) -> Dataset:
    """The attributes display needs, with enhanced multi-frame functional groups flattened."""
    pixel = Dataset()
    pixel.file_meta = ds.file_meta  # LUT data of VR OW needs the endianness
    for keyword in (
        "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
        "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter",
        "WindowWidth", "VOILUTFunction", "VOILUTSequence", "ModalityLUTSequence",
    ):  # fmt: skip
        if keyword in ds:
            pixel[keyword] = ds[keyword]
    for colour in ("Red", "Green", "Blue", "Alpha"):
        for keyword in (f"{colour}PaletteColorLookupTable{part}" for part in ("Descriptor", "Data")):
            if keyword in ds:
                pixel[keyword] = ds[keyword]
        if f"Segmented{colour}PaletteColorLookupTableData" in ds:
            pixel[f"Segmented{colour}PaletteColorLookupTableData"] = ds[f"Segmented{colour}PaletteColorLookupTableData"]
    transformation = _functional(ds, frame, "PixelValueTransformationSequence")
    voi = _functional(ds, frame, "FrameVOILUTSequence")
    for item, keywords in (
        (transformation, ("RescaleSlope", "RescaleIntercept", "RescaleType")),
        (voi, ("WindowCenter", "WindowWidth", "VOILUTFunction")),
    ):
        for keyword in keywords:
            if item is not None and keyword in item:
                pixel[keyword] = item[keyword]
    return pixel


def _decode(ds: Dataset, max_pixels: int) -> _Frame:
    """Check the header, refuse what is too big, and decode one frame."""
    element = next((keyword for keyword in _PIXEL_ELEMENTS if keyword in ds), None)
    has_image_module = any(k in ds for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"))
    if element is None:
        sop_class = _sop_class_name(ds)
        if has_image_module or "Image" in sop_class:
            raise InvalidImage("DICOM pixel data is missing: the file is truncated or not an image")
        if sop_class == "unknown":  # no SOP class and no pixels: not a report, a broken file
            raise InvalidImage("DICOM header could not be read: no SOP class and no pixel data (corrupt or truncated)")
        raise NoPixelData(f"DICOM file has no pixel data (SOP class {sop_class})")
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1)
    if rows <= 0 or columns <= 0 or frames <= 0:
        raise InvalidImage(f"DICOM image declares an empty size: {rows}x{columns}, {frames} frame(s)")
    total = rows * columns * frames
    if total > max_pixels:
        raise ResourceExhausted(
            f"DICOM image declares {rows}x{columns} pixels x {frames} frame(s) = {total:,} pixels, "
            f"over the limit of {max_pixels:,}"
        )
    frame = frames // 2
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _PHOTOMETRICS:
        raise InvalidImage(f"DICOM photometric interpretation is not supported (supported: {', '.join(_PHOTOMETRICS)})")
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InvalidImage(
            f"DICOM transfer syntax {_ts_name(ts)} cannot be decoded by pydicom: "
            "convert the file to an uncompressed or JPEG 2000 transfer syntax first (e.g. dcmtk's dcmconv)"
        ) from None
    if not decoder.is_available:
        # pydicom's own plugin requirements ("pyjpegls - requires numpy and pyjpegls>=1.2"): no file values
        options = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise InvalidImage(f"DICOM transfer syntax {_ts_name(ts)} needs a decoder that is not installed: {options}")
    if not ts.is_compressed:
        try:
            expected = get_expected_length(ds, unit="bytes")
        except (ValueError, TypeError, AttributeError, KeyError):
            raise InvalidImage("DICOM image attributes are inconsistent (rows, columns, bits, samples)") from None
        found = len(ds[element].value or b"")
        if found < expected:
            raise InvalidImage(f"DICOM pixel data is truncated: expected {expected:,} bytes, found {found:,}")
    try:
        stored, meta = decoder.as_array(ds, index=frame, validate=True, raw=False, **as_pixel_options(ds))
    except Exception as exc:  # decoders raise RuntimeError, ValueError, KeyError...; never show their text
        raise InvalidImage(
            f"DICOM pixel data could not be decoded ({_ts_name(ts)}, {type(exc).__name__}): it is corrupt or truncated"
        ) from None
    decoded = str(meta.get("photometric_interpretation", photometric))
    if decoded in ("YBR_FULL", "YBR_FULL_422"):
        stored = convert_color_space(stored, "YBR_FULL", "RGB")
        decoded = "RGB"
    if decoded in ("YBR_ICT", "YBR_RCT"):  # decoders apply the inverse MCT; what is left is RGB
        decoded = "RGB"
    return _Frame(stored, decoded, _pixel_attributes(ds, frame), frames, frame)


def _apply_window(values: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """pydicom's windowing (PS3.3 C.11.2.1.2) into 0..255, for file and caller windows alike."""
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if function == "LINEAR" and width < 1:  # LINEAR needs width >= 1; LINEAR_EXACT is its limit
        function = "LINEAR_EXACT"
    voi = Dataset()  # an 8-bit unsigned target makes apply_windowing's output range 0..255
    voi.PhotometricInterpretation = "MONOCHROME2"
    voi.BitsStored, voi.PixelRepresentation = 8, 0
    voi.WindowCenter = DSfloat(centre, auto_format=True)
    voi.WindowWidth = DSfloat(width, auto_format=True)
    voi.VOILUTFunction = function
    return apply_windowing(values, voi)


def _first(value: Any) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)


def _file_window(pixel: Dataset) -> tuple[float, float, str] | None:
    try:
        centre, width = _first(pixel.get("WindowCenter")), _first(pixel.get("WindowWidth"))
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(centre) and math.isfinite(width)) or width <= 0:
        return None
    return centre, width, str(pixel.get("VOILUTFunction", "LINEAR")).strip().upper()


def _has_voi_lut(pixel: Dataset) -> bool:
    items = pixel.get("VOILUTSequence")
    return bool(items) and "LUTDescriptor" in items[0] and "LUTData" in items[0]


def _apply_voi_lut(values: np.ndarray, pixel: Dataset) -> np.ndarray:
    """The first VOI LUT Sequence item, scaled to 0..255 by the LUT's output depth."""
    values = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)
    item = pixel.VOILUTSequence[0]
    entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
    table = apply_voi(np.arange(first, first + entries, dtype=np.int64), pixel, index=0)
    # Descriptors often claim 16 bits for a 12-bit table; trust the data when it is shallower
    bits = min(int(item.LUTDescriptor[2]), max(8, int(table.max()).bit_length()))
    return apply_voi(values, pixel, index=0).astype(np.float64) * 255.0 / (2**bits - 1)


def _to_uint8(levels: np.ndarray) -> np.ndarray:
    """Round half up (127.5 -> 128) and clip into 0..255."""
    return np.clip(np.floor(levels + 0.5), 0, 255).astype(np.uint8)


def _grey(frame: _Frame, window: Window | None) -> np.ndarray:
    pixel = frame.pixel
    values = apply_modality_lut(frame.stored, pixel)
    file_window = _file_window(pixel)
    if window is not None:
        out = _apply_window(values, window.centre, window.width)
    elif _has_voi_lut(pixel):
        out = _apply_voi_lut(values, pixel)
    elif file_window is not None:
        out = _apply_window(values, *file_window)
    else:
        low, high = float(values.min()), float(values.max())
        out = (values.astype(np.float64) - low) * 255.0 / (high - low) if high > low else np.zeros(values.shape)
    out = _to_uint8(out)
    return 255 - out if frame.photometric == "MONOCHROME1" else out


def _colour(frame: _Frame) -> np.ndarray:
    samples = frame.stored
    if frame.photometric == "PALETTE COLOR":
        samples = apply_color_lut(samples, frame.pixel)[..., :3]
        depth = 16 if samples.dtype == np.uint16 else 8
    else:
        depth = _int(frame.pixel, "BitsStored", 8)
    if depth <= 8 and samples.dtype == np.uint8:
        return samples
    return _to_uint8(samples.astype(np.float64) * 255.0 / (2**depth - 1))


def _to_image(frame: _Frame, window: Window | None) -> Image.Image:
    try:
        if frame.photometric in _MONOCHROME:
            return Image.fromarray(_grey(frame, window), mode="L").convert("RGB")
        return Image.fromarray(np.ascontiguousarray(_colour(frame)), mode="RGB")
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
        raise InvalidImage(
            f"DICOM LUT or rescale attributes could not be applied ({type(exc).__name__}): they are malformed"
        ) from None


def _age(value: str) -> int | str | None:
    match = _AGE.fullmatch(value.strip())
    if match is None:
        return None
    number, unit = int(match.group(1)), match.group(2)
    return min(number, 90) if unit == "Y" else f"{number:03d}{unit}"


def _json_value(vr: str, value: Any) -> Any:
    if isinstance(value, MultiValue):
        items = [str(v).strip() for v in value if str(v).strip()]
        return items or None
    if vr in ("DA", "DT"):
        year = str(value).strip()[:4]
        return int(year) if year.isdigit() else None
    if vr == "AS":
        return _age(str(value))
    if vr in ("IS", "US", "SS", "UL", "SL", "UV", "SV"):
        return int(value)
    if vr in ("DS", "FL", "FD"):
        number = float(value)
        return number if math.isfinite(number) else None
    text = str(value).strip()
    return text or None


def _metadata(ds: Dataset, fields: Sequence[str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for keyword in fields:
        try:
            element = ds[keyword] if keyword in ds else None
            value = None if element is None or element.value is None else _json_value(element.VR, element.value)
        except (ValueError, TypeError, KeyError, OverflowError, UnicodeError):
            LOG.debug("DICOM field %s has an unreadable value; skipped", keyword)
            continue
        if value is not None:
            metadata[keyword] = value
    return metadata


def _checked_fields(fields: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fields, str):
        raise InvalidArgument("fields must be a sequence of DICOM keywords, not one string")
    for keyword in fields:
        _check_field(keyword)
    return tuple(fields)


def _instance_uid(ds: Dataset, data: bytes) -> str:
    uid = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID")
    if uid and str(uid).strip():
        return str(uid).strip()
    # No UID: the file's bytes stand in, so the same file still gets the same id
    return "2.25." + str(int.from_bytes(hashlib.sha256(data).digest()[:16], "big"))


def read_dicom(
    data: bytes,
    *,
    window: Window | None = None,
    fields: Sequence[str] = DEFAULT_FIELDS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DicomImage:
    """Decode a DICOM file's display image and its allowlisted metadata.

    Args:
        data: the file's bytes (Part 10, with the DICM preamble).
        window: overrides the file's VOI for grey images (``parse_window``); always LINEAR,
            whatever VOI LUT Function the file names.
        fields: the metadata allowlist, DICOM keywords.
        max_pixels: refuse files whose Rows x Columns x NumberOfFrames is past this,
            before decoding.

    Returns:
        A ``DicomImage``: 8-bit RGB image of the middle frame, metadata, SOPInstanceUID.

    Raises:
        InvalidArgument: a field in ``NEVER_FIELDS``, unknown, or binary.
        NoPixelData: the file holds no image (a report, a presentation state).
        InvalidImage: unreadable header, truncated or undecodable pixel data, a missing codec.
        ResourceExhausted: the declared size is past ``max_pixels``.
    """
    fields = _checked_fields(fields)
    ds = _read_header(data)
    frame = _decode(ds, max_pixels)
    image = _to_image(frame, window)
    return DicomImage(
        image=image,
        metadata=_metadata(ds, fields),
        instance_uid=_instance_uid(ds, data),
        frames=frame.frames,
        frame=frame.frame,
        burned_in=str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES",
    )


@dataclass
class DicomHeader:
    """What a corpus needs of a DICOM file before its pixels are decoded."""

    metadata: dict[str, Any]
    instance_uid: str = field(repr=False)  # to derive an id; never stored
    burned_in: bool


def read_header(path: str | os.PathLike[str], *, fields: Sequence[str] = DEFAULT_FIELDS) -> DicomHeader:
    """The allowlisted metadata, SOPInstanceUID and burned-in flag of a DICOM file, without
    decoding its pixels.

    Raises:
        NoPixelData: the file holds no image. InvalidImage: unreadable header.
        OSError: the file cannot be read.
    """
    fields = _checked_fields(fields)
    data = Path(path).read_bytes()
    ds = _read_header(data)
    if not any(keyword in ds for keyword in _PIXEL_ELEMENTS):
        raise NoPixelData(f"DICOM file has no pixel data (SOP class {_sop_class_name(ds)})")
    return DicomHeader(
        metadata=_metadata(ds, fields),
        instance_uid=_instance_uid(ds, data),
        burned_in=str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES",
    )


def render(data: bytes, *, window: Window | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The display image of ``read_dicom`` alone (thumbnails, a preset window)."""
    return read_dicom(data, window=window, fields=(), max_pixels=max_pixels).image


def _new_uid(digest: bytes, role: bytes) -> str:
    return "2.25." + str(int.from_bytes(hashlib.sha256(role + digest).digest()[:16], "big"))


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _lut_copy(sequence: DicomSequence, keywords: Sequence[str]) -> DicomSequence:
    """The first LUT item, without its free-text explanation."""
    item = Dataset()
    for keyword in keywords:
        if keyword in sequence[0]:
            item[keyword] = sequence[0][keyword]
    return DicomSequence([item])


def _stored_pixels(frame: _Frame) -> tuple[np.ndarray, str, int, int, int]:
    """(samples, photometric, bits allocated, bits stored, pixel representation) to write."""
    pixel = frame.pixel
    if frame.photometric == "PALETTE COLOR" or (frame.photometric == "RGB" and frame.stored.dtype == np.uint8):
        rgb = _colour(frame) if frame.photometric == "PALETTE COLOR" else frame.stored
        return rgb.astype(np.uint8), "RGB", 8, 8, 0
    allocated, stored = _int(pixel, "BitsAllocated"), _int(pixel, "BitsStored", _int(pixel, "BitsAllocated"))
    return frame.stored, frame.photometric, allocated, stored, _int(pixel, "PixelRepresentation", 0)


def deidentified(data: bytes, *, fields: Sequence[str] = DEFAULT_FIELDS, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A new minimal DICOM file holding the frame ``read_dicom`` shows and nothing identifying.

    Kept: the frame's stored values (uncompressed, explicit VR little endian), the image
    pixel, rescale, window and LUT attributes needed to display it the same way, Modality,
    BurnedInAnnotation, the SOP class, and the allowlisted ``fields`` except dates (the
    year of StudyDate stays in item metadata only). Study, series, instance and frame of
    reference UIDs are new, hashed from the kept content. Nothing else is copied: no
    private tags, no sequences but the LUTs, no file meta from the original.

    Raises:
        The errors of ``read_dicom``.
    """
    fields = _checked_fields(fields)
    ds = _read_header(data)
    frame = _decode(ds, max_pixels)
    _to_image(frame, None)  # malformed LUTs fail here, as they would in read_dicom
    samples, photometric, allocated, stored, signed = _stored_pixels(frame)
    pixel = frame.pixel

    out = Dataset()
    out.SpecificCharacterSet = "ISO_IR 192"
    sop_class = str(ds.get("SOPClassUID", ""))
    out.SOPClassUID = UID(sop_class) if sop_class in UID_dictionary else SecondaryCaptureImageStorage
    modality = str(ds.get("Modality", "")).strip()
    out.Modality = modality if _CS.fullmatch(modality) else "OT"
    for keyword in fields:
        if keyword not in ds or dictionary_VR(keyword_dict[keyword]) in ("DA", "DT", "TM"):
            continue
        if keyword == "PatientAge":
            age = _age(str(ds.PatientAge))
            if age is not None:
                out.PatientAge = f"{age:03d}Y" if isinstance(age, int) else age
            continue
        out[keyword] = ds[keyword]
    burned = str(ds.get("BurnedInAnnotation", "")).strip().upper()
    if burned in ("YES", "NO"):
        out.BurnedInAnnotation = burned

    out.Rows, out.Columns = samples.shape[0], samples.shape[1]
    out.SamplesPerPixel = 3 if samples.ndim == 3 else 1
    out.PhotometricInterpretation = photometric
    if samples.ndim == 3:
        out.PlanarConfiguration = 0
    out.BitsAllocated, out.BitsStored, out.HighBit, out.PixelRepresentation = allocated, stored, stored - 1, signed
    if photometric in _MONOCHROME:
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "VOILUTFunction"):
            if keyword in pixel:
                out[keyword] = pixel[keyword]
        if _file_window(pixel) is not None:  # the first values, as written (no float round trip)
            for keyword in ("WindowCenter", "WindowWidth"):
                value = pixel[keyword].value
                out[keyword] = DataElement(
                    keyword_dict[keyword], "DS", value[0] if isinstance(value, MultiValue) else value
                )
        if _has_voi_lut(pixel):
            out.VOILUTSequence = _lut_copy(pixel.VOILUTSequence, ("LUTDescriptor", "LUTData"))
        if pixel.get("ModalityLUTSequence"):
            out.ModalityLUTSequence = _lut_copy(
                pixel.ModalityLUTSequence, ("LUTDescriptor", "ModalityLUTType", "LUTData")
            )

    if allocated == 1:
        pixel_bytes = pack_bits(samples)
    else:
        kind = "f" if samples.dtype.kind == "f" else ("i" if signed else "u")
        pixel_bytes = np.ascontiguousarray(samples, dtype=f"<{kind}{allocated // 8}").tobytes()
    element = (
        "PixelData" if samples.dtype.kind != "f" else ("FloatPixelData" if allocated == 32 else "DoubleFloatPixelData")
    )
    setattr(out, element, pixel_bytes + b"\0" * (len(pixel_bytes) % 2))
    if element == "PixelData":
        out["PixelData"].VR = "OB" if allocated <= 8 else "OW"

    kept = io.BytesIO()
    out.save_as(kept, implicit_vr=False, little_endian=True)
    digest = hashlib.sha256(kept.getvalue()).digest()  # everything kept, and nothing else
    out.StudyInstanceUID = _new_uid(digest, b"study")
    out.SeriesInstanceUID = _new_uid(digest, b"series")
    out.SOPInstanceUID = _new_uid(digest, b"instance")
    if "FrameOfReferenceUID" in ds:
        out.FrameOfReferenceUID = _new_uid(digest, b"frame-of-reference")
    out.file_meta = FileMetaDataset()
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta.MediaStorageSOPClassUID = out.SOPClassUID
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return _to_bytes(out)


def item_id(instance_uid: str, key: bytes) -> str:
    """A stable item id for a DICOM instance: ``dcm-`` + HMAC-SHA256(key, uid), 24 hex digits.

    The UID cannot be recovered from the id without the key (``load_key``).
    """
    if not key:
        raise InvalidArgument("the DICOM id key is empty: load it with load_key(data_dir)")
    if not instance_uid:
        raise InvalidArgument("the DICOM instance UID is empty")
    return "dcm-" + hmac.new(key, instance_uid.encode("ascii", "replace"), hashlib.sha256).hexdigest()[:24]


KEY_FILE = "dicom.key"
KEY_BYTES = 32


def load_key(data_dir: Path) -> bytes:
    """The data directory's id key: ``data_dir/dicom.key``, 32 random bytes made once (0600).

    Creation is atomic (a temporary file linked into place), so concurrent first calls agree
    on one key.

    Raises:
        FailedPrecondition: the key file exists but does not hold 32 bytes.
    """
    data_dir = Path(data_dir)
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".dicom.key.", dir=data_dir)  # mkstemp makes it 0600
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(os.urandom(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # unlike os.replace, never overwrites a key made meanwhile
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise FailedPrecondition(
            f"{path} holds {len(key)} bytes, not {KEY_BYTES}: restore it from a backup "
            "(a new key would change the id of every DICOM item)"
        )
    return key
