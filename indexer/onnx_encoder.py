"""A faster CPU runtime for query encodes: the frozen encoder's towers exported to ONNX and
run with ONNX Runtime, in fp32 or with int8 dynamic quantization of the weights.

Which vectors come from which runtime, and why they can share an index: the base store and
every snapshot hold vectors of the torch encoder (``xmodal index``, upserts, compaction:
always torch). Only the server's query encodes (and the base embedding stored with a feedback
event, which is a query too) may come from ONNX Runtime, and only after :func:`query_encoder`
has compared it with the torch encoder on a fixed probe set of texts and images: each probe's
vector must have a cosine of at least :data:`MIN_COSINE` with torch's. Otherwise the server
logs why and encodes its queries with torch. The encoder identity recorded in snapshots is
torch's, and the ONNX files are derived from exactly those weights (cached under a key that
holds the identity and the library versions), so a query vector differs from torch's by
rounding only; bench/query_speed.py measures what that does to rankings.

Both towers are exported with torch.onnx's dynamo exporter (dynamic batch, and a dynamic text
length: the text path is cut after the last end-of-text token, as the torch one is).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .encoder import Encoder, default_threads, encode_in_length_groups, text_features, text_length
from .errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnx", "onnx-int8")
MIN_COSINE = {"onnx": 0.9999, "onnx-int8": 0.99}  # worst probe vector's cosine with torch's
CACHE_ENV = "XMODAL_CACHE_DIR"

PROBE_TEXTS = (
    "x",
    "chest x-ray",
    "Axial CT of the abdomen showing a large cystic mass in the left kidney.",
    "MRI brain, T2 FLAIR: periventricular white matter hyperintensities consistent with small vessel disease.",
    "a red ring on a blue square",
    "Panoramic X ray of the mandible with an impacted third molar on the right side and no other findings",
    "ultrasound of the liver",
    "Left upper lobe nodule, 8 mm, spiculated margins; follow-up CT in three months recommended by the "
    "radiologist given the patient's smoking history and the size of the lesion compared with the prior study.",
)


def cache_root() -> Path:
    """Where exported models are kept: $XMODAL_CACHE_DIR, else ~/.cache/xmodal."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "xmodal")


class _Tower(torch.nn.Module):
    def __init__(self, model, kind: str):
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, x):
        return text_features(self.model, x) if self.kind == "text" else self.model.encode_image(x)


def _export(encoder: Encoder, folder: Path) -> None:
    """Write text.onnx and image.onnx (fp32) into ``folder``."""
    from torch.export import Dim

    model = encoder.model
    if encoder.device.type != "cpu":
        raise InvalidArgument("the ONNX runtime runs on the CPU; the encoder is on " + str(encoder.device))
    batch = Dim("batch", min=1, max=4096)
    tokens = encoder.tokenize(["a probe text", "another"])
    tokens = tokens[:, : max(4, text_length(model, tokens))]
    length = Dim("length", min=2, max=encoder.context_length)
    pixels = torch.zeros(2, 3, encoder.image_size, encoder.image_size)
    quiet = io.StringIO()
    with torch.inference_mode(False), contextlib.redirect_stdout(quiet):
        torch.onnx.export(
            _Tower(model, "text").eval(),
            (tokens,),
            str(folder / "text.onnx"),
            dynamo=True,
            input_names=["tokens"],
            output_names=["features"],
            dynamic_shapes={"x": {0: batch, 1: length}},
            external_data=False,
        )
        torch.onnx.export(
            _Tower(model, "image").eval(),
            (pixels,),
            str(folder / "image.onnx"),
            dynamo=True,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_shapes={"x": {0: batch}},
            external_data=False,
        )


def _quantize(folder: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # its "pre-process" advice
    try:
        for tower in ("text", "image"):
            quantize_dynamic(folder / f"{tower}.onnx", folder / f"{tower}-int8.onnx", weight_type=QuantType.QInt8)
    finally:
        logging.getLogger().disabled = was


def exported(encoder: Encoder, root: Path | None = None) -> Path:
    """The folder of ``encoder``'s ONNX files (fp32 and int8), exported on first use.

    Built in a temporary folder and moved into place, so a crash leaves no half-written
    model; keyed by the encoder identity and the torch / onnxruntime versions."""
    import onnxruntime

    key = hashlib.sha256(f"{encoder.identity}|{torch.__version__}|{onnxruntime.__version__}".encode()).hexdigest()
    folder = (root or cache_root()) / "onnx" / key[:24]
    if (folder / "image-int8.onnx").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s to ONNX (once; cached in %s)", encoder.identity, folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        _export(encoder, tmp)
        _quantize(tmp)
        (tmp / "identity.txt").write_text(encoder.identity + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: theirs is as good
            if not (folder / "image-int8.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class OnnxEncoder:
    """The same vectors as a torch :class:`~.encoder.Encoder` (within :data:`MIN_COSINE`),
    from ONNX Runtime sessions on the CPU; preprocessing and tokenizing are the torch
    encoder's own.

    ``passes`` forward passes may run at once (ONNX Runtime sessions are thread-safe): a
    pass of a few short texts cannot keep every intra-op thread busy, so a second one in
    flight fills the gaps, while a lone query still has every thread.
    """

    def __init__(self, base: Encoder, runtime: str, folder: Path, threads: int | None = None, passes: int = 1):
        import onnxruntime as ort

        if runtime not in MIN_COSINE:
            raise InvalidArgument(f"unknown ONNX runtime {runtime!r}; choose one of {', '.join(MIN_COSINE)}")
        if passes < 1:
            raise InvalidArgument(f"passes must be at least 1, got {passes}")
        self.base = base
        self.passes = passes
        self.runtime = runtime
        self.spec = base.spec
        self.dim = base.dim
        self.image_size = base.image_size
        self.context_length = base.context_length
        self.tokenizer = base.tokenizer
        self.preprocess = base.preprocess
        self.device = base.device
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # no busy-waiting between passes: spinning threads take the cores from the gRPC
        # threads and searches that run between two encodes
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        suffix = "-int8" if runtime == "onnx-int8" else ""
        providers = ["CPUExecutionProvider"]
        self._text = ort.InferenceSession(str(folder / f"text{suffix}.onnx"), options, providers=providers)
        self._image = ort.InferenceSession(str(folder / f"image{suffix}.onnx"), options, providers=providers)
        self._passes = threading.BoundedSemaphore(passes)  # forward passes in flight

    @property
    def identity(self) -> str:
        return self.spec.identity

    def image_tensor(self, image) -> torch.Tensor:
        return self.base.image_tensor(image)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.base.tokenize(texts)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Texts in groups of similar length (as the torch encoder on a CPU), each group cut
        after its last end-of-text token."""
        with self._passes:
            return encode_in_length_groups(self.base.model, tokens, self._encode_tokens)

    def _encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        rows = tokens[:, : max(2, text_length(self.base.model, tokens))].numpy().astype(np.int64)
        (features,) = self._text.run(None, {"tokens": rows})
        return _normalise(features)

    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        pixels = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
        with self._passes:
            (features,) = self._image.run(None, {"pixels": pixels})
        return _normalise(features)

    def encode_images(self, images: Sequence) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_image_tensors(torch.stack([self.image_tensor(im) for im in images]))


def _normalise(features: np.ndarray) -> np.ndarray:
    vectors = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def probe_images(size: int, n: int = 8) -> torch.Tensor:
    """``n`` seeded synthetic images (gradients, blocks, noise), preprocessed-size tensors."""
    generator = torch.Generator().manual_seed(0)
    ramp = torch.linspace(-1.5, 1.5, size)
    out = []
    for i in range(n):
        image = torch.randn(3, size, size, generator=generator) * (0.2 + 0.2 * (i % 3))
        image += ramp.view(1, 1, -1) * ((i % 2) * 2 - 1) + ramp.view(1, -1, 1) * (i % 4 - 1.5) / 1.5
        block = size // 4
        image[i % 3, block : 2 * block + i, block : 3 * block] += 1.5
        out.append(image)
    return torch.stack(out)


def agreement(encoder, reference: Encoder) -> dict[str, float]:
    """The worst cosine between ``encoder``'s and ``reference``'s vectors of the probe texts
    and images."""
    texts = [encoder.encode_texts(PROBE_TEXTS), reference.encode_texts(PROBE_TEXTS)]
    pixels = probe_images(reference.image_size)
    images = [encoder.encode_image_tensors(pixels), reference.encode_image_tensors(pixels)]
    return {
        "text": float(np.min(np.sum(texts[0] * texts[1], axis=1))),
        "image": float(np.min(np.sum(images[0] * images[1], axis=1))),
    }


def query_encoder(
    encoder: Encoder, runtime: str = "torch", *, threads: int | None = None, cache: Path | None = None, passes: int = 1
):
    """The encoder a server encodes queries with: ``encoder`` itself for ``torch`` (and on a
    GPU, where torch is the fast path), else an :class:`OnnxEncoder` checked against it on the
    probe set; one that fails the check is logged and torch is used instead. ``passes``: how
    many forward passes the ONNX encoder runs at once (torch runs one).

    Raises:
        InvalidArgument: an unknown runtime.
    """
    if runtime not in RUNTIMES:
        raise InvalidArgument(f"unknown query runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return encoder
    if encoder.device.type != "cpu":
        log.info("query runtime %s is for the CPU; on %s queries are encoded by torch", runtime, encoder.device)
        return encoder
    try:
        fast = OnnxEncoder(encoder, runtime, exported(encoder, cache), threads, passes)
    except ImportError as exc:
        raise FailedPrecondition(f"query runtime {runtime} needs onnxruntime and onnx ({exc}): install them") from None
    worst = agreement(fast, encoder)
    if min(worst.values()) < MIN_COSINE[runtime]:
        log.warning(
            "query runtime %s disagrees with torch on the probe set (worst cosine text %.5f, image %.5f; "
            "needs %.4f): queries are encoded by torch",
            runtime,
            worst["text"],
            worst["image"],
            MIN_COSINE[runtime],
        )
        return encoder
    log.info("query runtime %s checked against torch (worst cosine text %.5f, image %.5f)", runtime, *worst.values())
    return fast
