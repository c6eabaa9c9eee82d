"""DICOM ingest: radiologist-correct grey levels, colour, errors, metadata allowlist, de-identification.

Every file is a real DICOM file written by pydicom (tests/dicom_factory.py) and carries the
planted fake identifiers of ``PLANTED``; no output may contain any of them.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import MPEG4HP41, JPEGBaseline8Bit, JPEGLSLossless

from xmodal.indexer.dicom import (
    DEFAULT_FIELDS,
    NEVER_FIELDS,
    WINDOW_PRESETS,
    NoPixelData,
    Window,
    deidentified,
    is_dicom,
    is_dicom_path,
    item_id,
    load_key,
    parse_fields,
    parse_window,
    read_dicom,
    render,
)
from xmodal.indexer.errors import FailedPrecondition, InvalidArgument, InvalidImage, ResourceExhausted

from conftest import roco_dir
from dicom_factory import (
    PLANTED,
    PRIVATE_CREATOR,
    encoder_available,
    make_dicom,
    make_sr,
    read,
    roco_like_dicoms,
)


def grey(data: bytes, **kw) -> np.ndarray:
    """The red channel of the rendered image (grey images have R = G = B)."""
    pixels = np.asarray(read_dicom(data, **kw).image)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    return pixels[..., 0]


def planted_forms() -> list[bytes]:
    """Each planted value as bytes, in the encodings a writer could use, and each name part."""
    forms = set()
    for value in PLANTED.values():
        texts = {value, *(part for part in value.split("^") if len(part) >= 5)}
        for text in texts:
            forms.update({text.encode("utf-8"), text.encode("utf-16-le"), text.upper().encode("utf-8")})
    forms.add(PRIVATE_CREATOR.encode())
    return sorted(forms)


def assert_nothing_planted(blob: bytes | str) -> None:
    raw = blob.encode("utf-8") if isinstance(blob, str) else blob
    leaked = [form for form in planted_forms() if form in raw]
    assert not leaked, f"planted identifiers leaked: {leaked}"


# HU values -160, 40, 240 and 0, stored with intercept -1024
HU_STORED = np.array([[864, 1064, 1264, 1024, 863, 1265]], dtype=np.uint16)


# --- windows -----------------------------------------------------------------------------


def test_window_from_file_tags_maps_known_values():
    levels = grey(make_dicom(HU_STORED, intercept=-1024, window=(40, 400)))
    # centre 40 width 400: -160 -> black, 240 -> white, 40 -> mid grey, 0 HU -> 102
    assert levels[0].tolist() == [0, 128, 255, 102, 0, 255]


def test_window_override_and_presets_use_the_same_formula():
    plain = make_dicom(HU_STORED, intercept=-1024)  # no window tags
    tagged = make_dicom(HU_STORED, intercept=-1024, window=(-600, 1500))
    by_tags = grey(make_dicom(HU_STORED, intercept=-1024, window=(40, 400)))
    assert np.array_equal(grey(plain, window=Window(40, 400)), by_tags)
    assert np.array_equal(grey(plain, window=parse_window("soft-tissue")), by_tags)
    assert np.array_equal(grey(tagged, window=parse_window("40,400")), by_tags)  # the override wins
    lung = np.asarray(render(plain, window=parse_window("lung")))[..., 0]
    assert np.array_equal(lung, grey(tagged))
    # lung window -600/1500: -160 HU -> ((-160 + 600.5) / 1499 + 0.5) * 255 = 202.4
    assert lung[0, 0] == 202


def test_rescale_is_applied_before_windowing():
    stored = np.array([[1024, 20, 0]], dtype=np.uint16)
    # intercept -1024: stored 1024 is 0 HU; in a 0/100 window ((0 + 0.5) / 99 + 0.5) * 255 = 128.8
    assert grey(make_dicom(stored, intercept=-1024, window=(0, 100)))[0, 0] == 129
    # slope 2, intercept -40: stored 20 is 0 HU, stored 0 is -40 HU -> ((-40 + 0.5) / 99 + 0.5) * 255 = 25.8
    levels = grey(make_dicom(stored, slope=2.0, intercept=-40, window=(0, 100)))
    assert levels[0, 1] == 129 and levels[0, 2] == 26


def test_monochrome1_is_inverted():
    stored = np.array([[0, 100, 200, 4095]], dtype=np.uint16)
    m2 = grey(make_dicom(stored, bits_stored=12, window=(2048, 4096)))
    m1 = grey(make_dicom(stored, photometric="MONOCHROME1", bits_stored=12, window=(2048, 4096)))
    assert m2[0, 0] == 0 and m1[0, 0] == 255
    assert np.array_equal(m1.astype(int), 255 - m2.astype(int))


@pytest.mark.parametrize(
    "bits, signed",
    [(8, False), (8, True), (12, False), (12, True), (16, False), (16, True)],
)
def test_bit_depths_and_signedness_give_the_right_values(bits, signed):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    stored = np.array([[low, high, (low + high) // 2, low + 1]], dtype=np.int64)
    # no window: min..max of the frame
    levels = grey(make_dicom(stored, bits_stored=bits, signed=signed))
    assert levels[0, 0] == 0 and levels[0, 1] == 255 and abs(int(levels[0, 2]) - 128) <= 1
    # a window over the full range in stored units: a sign error would swap black and white
    centre, width = (low + high + 1) / 2, high - low + 1
    levels = grey(make_dicom(stored, bits_stored=bits, signed=signed, window=(centre, width)))
    assert levels[0, 0] == 0 and levels[0, 1] == 255 and abs(int(levels[0, 2]) - 128) <= 1


def test_voi_lut_sequence_is_used_over_the_window():
    stored = np.array([[0, 10, 200, 255]], dtype=np.uint16)
    inverting = (0, 8, [255 - i for i in range(256)])
    levels = grey(make_dicom(stored, bits_stored=8, window=(128, 256), voi_lut=inverting))
    assert levels[0].tolist() == [255, 245, 55, 0]
    # a table declared 16-bit whose data reach 4095 is scaled as 12-bit, not into near-black
    twelve = (0, 16, [round(i * 4095 / 255) for i in range(256)])
    levels = grey(make_dicom(stored, bits_stored=8, voi_lut=twelve))
    assert levels[0].tolist() == [0, 10, 200, 255]


def test_no_window_stretches_min_to_max():
    stored = np.array([[100, 150, 200, 300]], dtype=np.uint16)
    assert grey(make_dicom(stored))[0].tolist() == [0, 64, 128, 255]


def test_multiframe_uses_only_the_middle_frame():
    frames = np.stack([np.full((4, 4), 10 * (k + 1), dtype=np.uint8) for k in range(5)])
    # centre 128 width 256 is the identity on 8-bit values
    result = read_dicom(make_dicom(frames, bits_stored=8, window=(128, 256)))
    assert (result.frames, result.frame) == (5, 2)
    assert np.all(np.asarray(result.image) == 30)
    result = read_dicom(make_dicom(frames[:4], bits_stored=8, window=(128, 256)))
    assert (result.frames, result.frame) == (4, 2) and np.all(np.asarray(result.image) == 30)


def enhanced_ct() -> bytes:
    """Three frames whose rescale is shared and whose windows differ per frame."""
    frames = np.stack([np.full((4, 4), 1064, dtype=np.uint16)] * 3)  # 40 HU once rescaled

    def group(**values) -> Dataset:
        item = Dataset()
        for keyword, value in values.items():
            setattr(item, keyword, value)
        return item

    rescale = group(RescaleSlope=1.0, RescaleIntercept=-1024.0, RescaleType="HU")
    shared = group(PixelValueTransformationSequence=DicomSequence([rescale]))
    per_frame = [
        group(FrameVOILUTSequence=DicomSequence([group(WindowCenter=centre, WindowWidth=400.0)]))
        for centre in (1000.0, 240.0, -1000.0)
    ]
    return make_dicom(
        frames,
        intercept=0.0,
        window=(5000, 10),
        extra={
            "SharedFunctionalGroupsSequence": DicomSequence([shared]),
            "PerFrameFunctionalGroupsSequence": DicomSequence(per_frame),
        },
    )


def test_enhanced_multiframe_reads_rescale_and_window_from_functional_groups():
    # frame 1: 40 HU in a 240/400 window is at the window's bottom edge -> black; the
    # top-level tags (intercept 0, window 5000/10) or the other frames' windows would differ
    levels = grey(enhanced_ct())
    assert np.all(levels == 0)
    assert np.all(grey(enhanced_ct(), window=Window(40, 400)) == 128)


# --- colour ------------------------------------------------------------------------------


def colour_blocks() -> np.ndarray:
    """64x64 RGB in 2-pixel-wide blocks of one colour (so 4:2:2 subsampling is lossless)."""
    colours = np.array([[200, 50, 10], [10, 200, 60], [30, 40, 220], [255, 255, 255]], dtype=np.uint8)
    index = (np.arange(64)[:, None] // 16 + np.arange(64)[None, :] // 16) % 4
    return colours[index]


@pytest.mark.parametrize("photometric, tolerance", [("RGB", 0), ("YBR_FULL", 2), ("YBR_FULL_422", 2)])
def test_colour_photometrics_give_the_expected_colours(photometric, tolerance):
    rgb = colour_blocks()
    # window tags are ignored for colour
    out = np.asarray(read_dicom(make_dicom(rgb, photometric=photometric, bits_stored=8, window=(0, 1))).image)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= tolerance


@pytest.mark.parametrize("lut_dtype", [np.uint16, np.uint8])
def test_palette_colour_goes_through_its_lut(lut_dtype):
    palette = np.zeros((256, 3), dtype=np.uint16)
    palette[:, 0] = np.arange(256)  # red ramp
    palette[:, 2] = 255 - np.arange(256)  # blue falls
    palette = (palette * 257).astype(np.uint16) if lut_dtype == np.uint16 else palette.astype(np.uint8)
    indices = np.array([[0, 100, 255]], dtype=np.uint8)
    out = np.asarray(read_dicom(make_dicom(indices, photometric="PALETTE COLOR", bits_stored=8, palette=palette)).image)
    assert out[0].tolist() == [[0, 0, 255], [100, 0, 155], [255, 0, 0]]


def test_jpeg_baseline_ybr_422_is_converted_to_rgb_once():
    rgb = colour_blocks()
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, subsampling=1)  # 4:2:2, YCbCr inside
    data = with_transfer_syntax(
        make_dicom(rgb, photometric="YBR_FULL_422", bits_stored=8), JPEGBaseline8Bit, buffer.getvalue()
    )
    out = np.asarray(read_dicom(data).image).astype(int)
    pil = np.asarray(Image.open(buffer).convert("RGB")).astype(int)
    assert np.abs(out - pil).max() <= 2  # a second YBR -> RGB conversion would be far off
    assert np.abs(out - rgb)[8::16, 8::16].max() <= 2


# --- compression -------------------------------------------------------------------------


@pytest.mark.parametrize("compress", ["rle", "jpeg2000"])
def test_compressed_decodes_equal_to_uncompressed(compress):
    if not encoder_available(compress):
        pytest.skip(f"no {compress} encoder installed")
    rng = np.random.default_rng(3)
    stored = rng.integers(-2000, 2000, (64, 64))
    kw = {"bits_stored": 16, "signed": True, "intercept": -24.0}
    assert np.array_equal(grey(make_dicom(stored, compress=compress, **kw)), grey(make_dicom(stored, **kw)))
    frames = rng.integers(0, 4096, (3, 64, 64))
    multi = read_dicom(make_dicom(frames, bits_stored=12, compress=compress, window=(2048, 4096)))
    assert np.array_equal(
        np.asarray(multi.image),
        np.asarray(read_dicom(make_dicom(frames[1], bits_stored=12, window=(2048, 4096))).image),
    )
    rgb = colour_blocks()
    out = np.asarray(read_dicom(make_dicom(rgb, photometric="RGB", bits_stored=8, compress=compress)).image)
    assert np.array_equal(out, rgb)


# --- errors ------------------------------------------------------------------------------


def refused(data: bytes, error: type[Exception] = InvalidImage, **kw) -> str:
    with pytest.raises(error) as info:
        read_dicom(data, **kw)
    assert type(info.value) is error  # a truncated image is not "no pixel data"
    message = str(info.value)
    assert_nothing_planted(message)
    return message


def with_transfer_syntax(data: bytes, uid: str, fragment: bytes) -> bytes:
    ds = read(data)
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_corrupt_header_is_refused():
    good = make_dicom(np.zeros((8, 8), dtype=np.uint16))
    rng = np.random.default_rng(0)
    assert "DICOM header could not be read" in refused(b"\0" * 128 + b"DICM" + rng.bytes(400))
    assert "DICOM header could not be read" in refused(good[:132] + b"\xff" * 64 + good[196:])
    assert "DICM" in refused(b"not a dicom file at all" * 10)
    assert "empty" in refused(b"")


def test_truncated_pixel_data_is_refused_with_the_figures():
    data = make_dicom(np.zeros((64, 64), dtype=np.uint16))
    message = refused(data[:-1000])
    assert "truncated" in message and "8,192" in message and "7,192" in message


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_compressed_file_is_refused():
    if not encoder_available("jpeg2000"):
        pytest.skip("no jpeg2000 encoder installed")
    data = make_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), compress="jpeg2000")
    for cut in (50, 600, 1200):
        message = refused(data[:-cut])
        assert "truncated" in message or "could not be" in message


MISSING_CODEC = """
import sys
sys.modules["pylibjpeg"] = None  # this interpreter has no pylibjpeg, as on a bare install
from xmodal.indexer.dicom import read_dicom
from xmodal.indexer.errors import InvalidImage
try:
    read_dicom(open(sys.argv[1], "rb").read())
except InvalidImage as exc:
    print(exc)
"""


def test_missing_codec_names_the_transfer_syntax_and_the_package(tmp_path):
    path = tmp_path / "jpeg-ls.dcm"
    path.write_bytes(
        with_transfer_syntax(make_dicom(np.zeros((8, 8), dtype=np.uint16)), JPEGLSLossless, b"\xff\xd8" * 8)
    )
    run = subprocess.run([sys.executable, "-c", MISSING_CODEC, str(path)], capture_output=True, text=True, timeout=60)
    message = run.stdout.strip()
    assert "JPEG-LS Lossless" in message and "pyjpegls" in message and "not installed" in message, run.stderr
    assert_nothing_planted(message)
    # with the codec present, bytes that are not JPEG-LS are a decode error, named as such
    assert "could not be decoded" in refused(path.read_bytes())


def test_unsupported_transfer_syntax_is_named():
    data = with_transfer_syntax(make_dicom(np.zeros((8, 8), dtype=np.uint16)), MPEG4HP41, b"\0\0\0\1" * 8)
    assert "MPEG-4 AVC/H.264" in refused(data)


def test_pixel_limit_is_enforced_before_decoding():
    # 60000 x 60000 declared over 8 bytes of data: a decode would fail differently
    data = make_dicom(np.zeros((2, 2), dtype=np.uint16), extra={"Rows": 60000, "Columns": 60000})
    message = refused(data, ResourceExhausted)
    assert "60000x60000" in message and "50,000,000" in message
    # frames count: 10 frames of 100x100 are 100,000 pixels
    frames = make_dicom(np.zeros((10, 100, 100), dtype=np.uint8), bits_stored=8)
    assert "100,000" in refused(frames, ResourceExhausted, max_pixels=50_000)
    assert read_dicom(frames, max_pixels=100_000).frames == 10


def test_structured_report_has_no_pixel_data():
    message = refused(make_sr(), NoPixelData)
    assert "Basic Text SR" in message and "1.2.840" not in message
    with pytest.raises(NoPixelData):
        deidentified(make_sr())


def test_malformed_identifiers_are_not_quoted_in_warnings_or_logs(caplog):
    bad = {
        "SOPInstanceUID": PLANTED["SOPInstanceUID"] + ".Zzyzx-" + "9" * 70,  # invalid and over-long
        "PatientName": PLANTED["PatientName"] * 6,
        "StudyDate": "2021-03-14",  # not a valid DA
    }
    data = make_dicom(HU_STORED, extra=bad)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = read_dicom(data, fields=DEFAULT_FIELDS + ("SeriesDate",))
        deidentified(data)
    assert result.instance_uid == bad["SOPInstanceUID"]
    assert_nothing_planted(caplog.text + " ".join(str(w.message) for w in caught))
    assert "Zzyzx" not in caplog.text


# --- metadata ----------------------------------------------------------------------------


def test_metadata_holds_only_allowlisted_json_values():
    data = make_dicom(HU_STORED, intercept=-1024, extra={"ViewPosition": "PA", "ImageLaterality": "L"})
    metadata = read_dicom(data).metadata
    assert set(metadata) <= set(DEFAULT_FIELDS)
    assert metadata["StudyDate"] == 2021 and metadata["PatientAge"] == 45
    assert metadata["Modality"] == "CT" and metadata["ViewPosition"] == "PA" and metadata["ImageLaterality"] == "L"
    text = json.dumps(metadata)
    assert_nothing_planted(text)
    assert "20210314" not in text


def test_metadata_ages_and_configured_fields():
    months = make_dicom(HU_STORED, extra={"PatientAge": "006M", "KVP": 120, "ImageType": ["ORIGINAL", "PRIMARY"]})
    metadata = read_dicom(months, fields=("PatientAge", "KVP", "ImageType", "StudyDate", "ContrastBolusAgent")).metadata
    assert metadata == {"PatientAge": "006M", "KVP": 120.0, "ImageType": ["ORIGINAL", "PRIMARY"], "StudyDate": 2021}
    assert read_dicom(make_dicom(HU_STORED, extra={"PatientAge": "097Y"})).metadata["PatientAge"] == 90


def test_parse_fields_refuses_identifiers_uids_and_unknown_keywords():
    assert parse_fields("Modality, BodyPartExamined,Modality") == ("Modality", "BodyPartExamined")
    for text in (
        "PatientName",
        "Modality,PatientID",
        "StudyInstanceUID",
        "SOPInstanceUID",
        "NotAKeyword",
        "",
        "PixelData",
    ):
        with pytest.raises(InvalidArgument):
            parse_fields(text)
    with pytest.raises(InvalidArgument):
        read_dicom(make_dicom(HU_STORED), fields=("Modality", "PatientName"))
    assert all(keyword not in NEVER_FIELDS for keyword in DEFAULT_FIELDS)
    assert {keyword for keyword in PLANTED if keyword in pydicom.datadict.keyword_dict} <= NEVER_FIELDS
    assert all(keyword in pydicom.datadict.keyword_dict for keyword in NEVER_FIELDS)


def test_parse_window():
    assert parse_window("lung") == Window(-600, 1500, "lung")
    assert parse_window(" Soft-Tissue ") == Window(*WINDOW_PRESETS["soft-tissue"], "soft-tissue")
    assert parse_window("-600,1500") == Window(-600.0, 1500.0)
    for bad in ("40,0", "40,-5", "lungs", "1,2,3", "a,b", "40,nan"):
        with pytest.raises(InvalidArgument) as info:
            parse_window(bad)
        assert "lung" in str(info.value) and "centre,width" in str(info.value)


def test_dicom_detection(tmp_path):
    data = make_dicom(HU_STORED)
    assert is_dicom(data) and not is_dicom(b"\x89PNG" + b"\0" * 200)
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "b.DCM").write_bytes(b"")
    (tmp_path / "c.png").write_bytes(b"\x89PNG" + b"\0" * 200)
    assert is_dicom_path(tmp_path / "a.bin") and is_dicom_path(tmp_path / "b.DCM")
    assert not is_dicom_path(tmp_path / "c.png") and not is_dicom_path(tmp_path / "missing.png")


# --- de-identification -------------------------------------------------------------------


def variants() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    palette = np.stack([np.arange(256) * 257, (255 - np.arange(256)) * 257, np.full(256, 9000)], axis=1)
    ramp_lut = (100, 16, list(range(0, 60000, 30)))
    files = {
        "ct-signed": make_dicom(
            rng.integers(-1024, 3000, (32, 32)), signed=True, intercept=-1.0, window=[(40, 400), (-600, 1500)]
        ),
        "mono1-8bit": make_dicom(rng.integers(0, 256, (32, 32)), photometric="MONOCHROME1", bits_stored=8),
        "12bit-voi-lut": make_dicom(rng.integers(0, 4096, (32, 32)), bits_stored=12, voi_lut=ramp_lut),
        "multiframe": make_dicom(rng.integers(0, 4096, (3, 32, 32)), bits_stored=12),
        "enhanced": enhanced_ct(),
        "rgb": make_dicom(colour_blocks(), photometric="RGB", bits_stored=8),
        "ybr-full": make_dicom(colour_blocks(), photometric="YBR_FULL", bits_stored=8),
        "ybr-422": make_dicom(colour_blocks(), photometric="YBR_FULL_422", bits_stored=8),
        "palette": make_dicom(
            rng.integers(0, 256, (16, 16)),
            photometric="PALETTE COLOR",
            bits_stored=8,
            palette=palette.astype(np.uint16),
        ),
        "burned-in": make_dicom(rng.integers(0, 256, (8, 8)), bits_stored=8, burned_in=True),
    }
    if encoder_available("jpeg2000"):
        files["jpeg2000"] = make_dicom(rng.integers(0, 65536, (32, 32)), compress="jpeg2000", window=(30000, 20000))
    return files


KEPT = {
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "FrameOfReferenceUID", "Modality", "BurnedInAnnotation", "Rows", "Columns", "SamplesPerPixel",
    "PhotometricInterpretation", "PlanarConfiguration", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "VOILUTSequence", "ModalityLUTSequence", "PixelData", *DEFAULT_FIELDS,
}  # fmt: skip


@pytest.mark.parametrize("name, data", list(variants().items()))
def test_deidentified_holds_no_identifier_and_the_same_image(name, data):
    original = read_dicom(data)
    clean = deidentified(data)
    assert_nothing_planted(clean)
    ds = pydicom.dcmread(io.BytesIO(clean))  # a valid Part 10 file
    assert {element.keyword for element in ds} <= KEPT, name
    assert "StudyDate" not in ds and "NumberOfFrames" not in ds
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert ds[keyword].value.startswith("2.25."), keyword
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    again = read_dicom(clean)
    assert np.array_equal(np.asarray(again.image), np.asarray(original.image)), name
    assert again.burned_in == original.burned_in
    assert again.instance_uid != original.instance_uid and again.frames == 1
    assert again.metadata == {k: v for k, v in original.metadata.items() if k != "StudyDate"}
    assert deidentified(data) == clean  # deterministic: the same file gives the same UIDs


def test_deidentified_uids_differ_between_images():
    a = pydicom.dcmread(io.BytesIO(deidentified(make_dicom(np.zeros((4, 4), dtype=np.uint16)))))
    b = pydicom.dcmread(io.BytesIO(deidentified(make_dicom(np.ones((4, 4), dtype=np.uint16)))))
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.StudyInstanceUID != b.StudyInstanceUID


def test_roco_like_files_decode_and_deidentify(tmp_path):
    paths = roco_like_dicoms(None, tmp_path, 7)
    uids = set()
    for path in paths:
        data = path.read_bytes()
        assert PLANTED["PatientName"].encode() in data  # the planted values are really there
        result = read_dicom(data)
        assert result.image.mode == "RGB" and np.asarray(result.image).std() > 0
        uids.add(result.instance_uid)
        assert_nothing_planted(deidentified(data))
    assert len(uids) == 7


@pytest.mark.roco
def test_roco_images_as_dicom_decode_and_deidentify(tmp_path):
    images = sorted((roco_dir() / "images").glob("*.jpg"))[:14]
    for path in roco_like_dicoms(images, tmp_path, 14):
        data = path.read_bytes()
        assert read_dicom(data).image.size[0] > 0
        assert_nothing_planted(deidentified(data))


def test_bare_dataset_without_preamble_is_read():
    ds = read(make_dicom(HU_STORED, intercept=-1024, window=(40, 400)))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=True, little_endian=True)
    bare = buffer.getvalue()
    assert not is_dicom(bare)
    assert grey(bare)[0].tolist() == [0, 128, 255, 102, 0, 255]


# --- ids and keys ------------------------------------------------------------------------


def test_item_id_is_keyed_and_stable():
    uid = PLANTED["SOPInstanceUID"] + ".1"
    key, other = b"k" * 32, b"j" * 32
    first = item_id(uid, key)
    assert first == item_id(uid, key) and first.startswith("dcm-") and len(first) == 28
    assert first != item_id(uid, other) and first != item_id(uid + "0", key)
    assert uid not in first
    with pytest.raises(InvalidArgument):
        item_id(uid, b"")


def test_load_key_creates_a_private_key_once(tmp_path):
    data_dir = tmp_path / "data"
    key = load_key(data_dir)
    path = data_dir / "dicom.key"
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(data_dir) == key
    assert sorted(p.name for p in data_dir.iterdir()) == ["dicom.key"]  # no temporary left
    path.write_bytes(b"short")
    with pytest.raises(FailedPrecondition):
        load_key(data_dir)
