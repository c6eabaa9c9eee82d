"""Real DICOM files for tests, each carrying the same planted fake identifiers.

``make_dicom`` builds one image file from a numpy array (grey, multi-frame, RGB, YBR,
palette; 8 to 16 bits, signed or not; optionally RLE or JPEG 2000 compressed).
``make_sr`` builds a Basic Text SR (no pixel data). ``roco_like_dicoms`` writes a folder of
files cycling through the variants real archives hold, from ROCO JPEGs when given.

Every file carries every value of ``PLANTED``: patient, staff, institution and device
names, ids, UIDs, an address with a non-ASCII character, identifiers inside nested
sequences and the file meta, and a private tag. A test that finds none of them in an
output has shown that the output dropped them all.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, get_encoder
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

UID_ROOT = "1.2.826.0.1.3680043.9.7777"

# Fake identifiers, distinctive enough that finding one in an output cannot be chance.
PLANTED: dict[str, str] = {
    "PatientName": "Zzyzx^Quentin",
    "PatientID": "PID-7H3K9Q",
    "PatientBirthDate": "19230517",
    "OtherPatientIDs": "OPID-W4V8N2",
    "PatientAddress": "12 Rue \u00c9b\u00e8nequx, Vrexford",
    "PatientTelephoneNumbers": "+44-5550-918273",
    "PatientMotherBirthName": "Qwertzia^Moll",
    "AccessionNumber": "ACC-88Q2L1",
    "StudyID": "STU-K2J7",
    "InstitutionName": "Saint Xylophone Hospital",
    "InstitutionAddress": "99 Jabberwock Lane, Frumiousville",
    "InstitutionalDepartmentName": "Dept Quibblewick",
    "ReferringPhysicianName": "Drqwxy^Hank",
    "PerformingPhysicianName": "Prfzzt^Olga",
    "NameOfPhysiciansReadingStudy": "Rdqvx^Ines",
    "OperatorsName": "Opwrx^Tillo",
    "RequestingPhysician": "Rqzzl^Bram",
    "StationName": "STN-QX42Z",
    "DeviceSerialNumber": "SN-55XQ91B",
    "ImageComments": "Zzyzx follow-up, call 5550918273",
    "StudyInstanceUID": f"{UID_ROOT}.1",
    "SeriesInstanceUID": f"{UID_ROOT}.2",
    "SOPInstanceUID": f"{UID_ROOT}.3",  # a base: each file adds ".<uid_suffix>"
    "FrameOfReferenceUID": f"{UID_ROOT}.4",
    "SourceApplicationEntityTitle": "AET-QWZX",  # in the file meta
    "RequestedProcedureID": "RPID-ZQ81",  # inside RequestAttributesSequence
    "PrivateTag": "PRIVATE-Ghjkl",  # (0011,xx01), creator "XMODAL TEST"
}
PRIVATE_CREATOR = "XMODAL TEST"

SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "SC": SecondaryCaptureImageStorage,
}
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
ENCODINGS = {"jpeg2000": JPEG2000Lossless, "rle": RLELossless}


class EncoderMissing(RuntimeError):
    """The encoder plugin for the requested compression is not installed here."""


def encoder_available(compress: str) -> bool:
    """Whether ``make_dicom(..., compress=compress)`` can run on this machine."""
    return bool(get_encoder(ENCODINGS[compress]).is_available)


def _plant(ds: Dataset, uid_suffix: int) -> None:
    for keyword, value in PLANTED.items():
        if keyword in ("PrivateTag", "RequestedProcedureID", "SourceApplicationEntityTitle"):
            continue
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = f"{PLANTED['SOPInstanceUID']}.{uid_suffix}"
    ds.StudyTime = "101112"
    request = Dataset()
    request.RequestedProcedureID = PLANTED["RequestedProcedureID"]
    request.ScheduledProcedureStepID = PLANTED["AccessionNumber"]
    ds.RequestAttributesSequence = DicomSequence([request])
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = ds.SOPClassUID
    referenced.ReferencedSOPInstanceUID = f"{PLANTED['SOPInstanceUID']}.{uid_suffix + 1}"
    ds.ReferencedImageSequence = DicomSequence([referenced])
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", PLANTED["PrivateTag"])
    block.add_new(0x02, "PN", PLANTED["PatientName"])


def _file_meta(ds: Dataset) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = PLANTED["SourceApplicationEntityTitle"]
    ds.file_meta = meta


def _to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _base(sop_class: str, uid_suffix: int, modality: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, for the planted non-ASCII address
    ds.SOPClassUID = UID(SOP_CLASSES.get(sop_class, sop_class))
    ds.Modality = modality
    _plant(ds, uid_suffix)
    _file_meta(ds)
    return ds


def _subsample_422(ybr: np.ndarray) -> bytes:
    """YBR_FULL_422 native layout: Y1 Y2 Cb Cr per pair of pixels, chroma averaged."""
    y = ybr[..., 0]
    cb = ybr[..., 1].astype(np.uint16)
    cr = ybr[..., 2].astype(np.uint16)
    cb = ((cb[..., 0::2] + cb[..., 1::2] + 1) // 2).astype(np.uint8)
    cr = ((cr[..., 0::2] + cr[..., 1::2] + 1) // 2).astype(np.uint8)
    out = np.stack([y[..., 0::2], y[..., 1::2], cb, cr], axis=-1)
    return out.tobytes()


def make_dicom(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    signed: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    palette: np.ndarray | None = None,
    modality: str = "CT",
    body_part: str = "CHEST",
    study_date: str = "20210314",
    compress: str | None = None,
    burned_in: bool = False,
    sop_class: str = "CT",
    uid_suffix: int = 1,
    extra: dict | None = None,
) -> bytes:
    """A DICOM file (bytes) holding ``pixels``, with every ``PLANTED`` identifier in it.

    Args:
        pixels: stored values, shaped (rows, cols) or (frames, rows, cols) for grey and
            palette images, (rows, cols, 3) or (frames, rows, cols, 3) for colour. For the
            YBR photometrics give RGB: they are converted (and 4:2:2 subsampled) here.
        photometric: MONOCHROME1, MONOCHROME2, RGB, YBR_FULL, YBR_FULL_422 or PALETTE COLOR.
        bits_stored: 1 to 16; 8 or less is stored in 8 allocated bits, else in 16.
        signed: PixelRepresentation 1.
        slope, intercept: RescaleSlope and RescaleIntercept (grey images only).
        window: (centre, width), or several pairs for a multi-valued window.
        voi_lut: (first mapped value, bits per entry, table) for one VOI LUT Sequence item.
        palette: (n, 3) uint8 or uint16 entries for PALETTE COLOR (first mapped value 0).
        compress: None, "rle" or "jpeg2000" (lossless); EncoderMissing if unavailable.
        burned_in: BurnedInAnnotation "YES" (else "NO").
        sop_class: CT, MR, DX, SC or a SOP class UID.
        uid_suffix: makes the SOPInstanceUID unique: ``PLANTED["SOPInstanceUID"].<n>``.
        extra: more attributes, keyword -> value.
    """
    pixels = np.asarray(pixels)
    ds = _base(sop_class, uid_suffix, modality)
    ds.BodyPartExamined = body_part
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.PatientSex = "F"
    ds.PatientAge = "045Y"
    ds.Manufacturer = "ACME Imaging"
    ds.SeriesDescription = "AXIAL 1.25MM"
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"

    colour = photometric in COLOUR
    frames_axis = pixels.ndim == (4 if colour else 3)
    frames = pixels.shape[0] if frames_axis else 1
    rows, columns = pixels.shape[1:3] if frames_axis else pixels.shape[:2]
    if frames_axis:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if colour:
        ds.PlanarConfiguration = 0
    else:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.RescaleType = "HU" if modality == "CT" else "US"
    if window is not None:
        pairs: list[tuple[float, float]] = (
            [window] if not isinstance(window[0], (tuple, list)) else list(window)  # type: ignore[list-item, arg-type]
        )
        ds.WindowCenter = [float(c) for c, _ in pairs] if len(pairs) > 1 else float(pairs[0][0])
        ds.WindowWidth = [float(w) for _, w in pairs] if len(pairs) > 1 else float(pairs[0][1])
    if voi_lut is not None:
        first, bits, table = voi_lut
        item = Dataset()
        item.add_new("LUTDescriptor", "SS" if first < 0 else "US", [len(table) % 65536, first, bits])
        item.add_new("LUTData", "US", [int(v) for v in table])
        item.LUTExplanation = "TEST LUT"
        ds.VOILUTSequence = DicomSequence([item])
    if photometric == "PALETTE COLOR":
        if palette is None:
            raise ValueError("PALETTE COLOR needs palette=")
        palette = np.asarray(palette)
        lut_bits = 8 if palette.dtype == np.uint8 else 16
        for channel, name in enumerate(("Red", "Green", "Blue")):
            setattr(ds, f"{name}PaletteColorLookupTableDescriptor", [len(palette) % 65536, 0, lut_bits])
            entries = palette[:, channel].astype("<u2" if lut_bits == 16 else "u1")
            if lut_bits == 8 and len(entries) % 2:
                entries = np.append(entries, np.uint8(0))
            setattr(ds, f"{name}PaletteColorLookupTableData", entries.tobytes())
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}").newbyteorder("<")
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        ybr = convert_color_space(pixels.astype(np.uint8), "RGB", "YBR_FULL", per_frame=frames_axis)
        ds.PixelData = _subsample_422(ybr) if photometric == "YBR_FULL_422" else ybr.astype(np.uint8).tobytes()
    else:
        low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
        if pixels.size and (pixels.min() < low or pixels.max() > high):
            raise ValueError(f"pixel values outside {low}..{high} for {bits_stored} bits")
        data = pixels.astype(dtype).tobytes()
        ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"

    if compress is not None:
        if not encoder_available(compress):
            raise EncoderMissing(f"no {compress} encoder: {get_encoder(ENCODINGS[compress]).missing_dependencies}")
        ds.compress(ENCODINGS[compress], generate_instance_uid=False)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return _to_bytes(ds)


def make_sr(uid_suffix: int = 900) -> bytes:
    """A Basic Text SR: no pixel data, the planted identifiers in its header and text."""
    ds = _base(BasicTextSRStorage, uid_suffix, "SR")
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "121070", "DCM", "Findings"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = DicomSequence([concept])
    text.TextValue = f"Report for {PLANTED['PatientName']} ({PLANTED['PatientID']}): no acute findings."
    ds.ContentSequence = DicomSequence([text])
    return _to_bytes(ds)


def _grey(path: Path | None, index: int, size: int = 128) -> np.ndarray:
    """An 8-bit grey array from a ROCO image, or a seeded synthetic phantom."""
    if path is not None:
        with Image.open(path) as opened:
            # square, so every variant (JPEG 2000 needs >= 32 px a side) can hold it
            image = opened.convert("L").resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    grey = 40 + 150 * disc + rng.integers(0, 40, (size, size))
    return grey.astype(np.uint8)


def roco_like_dicoms(images: list[Path] | None, out_dir: Path, n: int) -> list[Path]:
    """Write ``n`` DICOM files ``out_dir/roco-<i>.dcm``, cycling through archive variants.

    Variants: MONOCHROME2 8-bit; MONOCHROME1 8-bit; 12-bit unsigned with window tags;
    16-bit signed CT (intercept -1024, window); 3 frames (the middle one is the image);
    JPEG 2000 lossless 16-bit (uncompressed when no encoder is installed); RGB.
    Each file holds every ``PLANTED`` identifier and a unique SOPInstanceUID.

    Args:
        images: grey (or any) images to build from, cycled; None or empty for synthetic.
        out_dir: created if missing.
        n: how many files to write.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        source = images[i % len(images)] if images else None
        grey = _grey(source, i)
        variant = i % 7
        kw: dict = {"uid_suffix": 1000 + i}
        if variant == 0:
            data = make_dicom(grey, bits_stored=8, modality="CR", sop_class="SC", **kw)
        elif variant == 1:
            data = make_dicom(255 - grey, photometric="MONOCHROME1", bits_stored=8, modality="DX", sop_class="DX", **kw)
        elif variant == 2:
            data = make_dicom(grey.astype(np.uint16) * 16, bits_stored=12, window=(2048, 4096), modality="MR", **kw)
        elif variant == 3:
            stored = grey.astype(np.int16) * 8 - 1000
            data = make_dicom(stored, bits_stored=16, signed=True, intercept=-24.0, window=(40, 2000), **kw)
        elif variant == 4:
            stack = np.stack([grey // 2, grey, grey // 3])
            data = make_dicom(stack, bits_stored=8, modality="XA", sop_class="SC", **kw)
        elif variant == 5:
            compress = "jpeg2000" if encoder_available("jpeg2000") else None
            data = make_dicom(grey.astype(np.uint16) * 200, bits_stored=16, compress=compress, **kw)
        else:
            rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
            data = make_dicom(rgb, photometric="RGB", bits_stored=8, modality="XC", sop_class="SC", **kw)
        path = out_dir / f"roco-{i:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


def read(data: bytes) -> Dataset:
    """pydicom's own reading of a file made here (for assertions)."""
    return pydicom.dcmread(io.BytesIO(data))
