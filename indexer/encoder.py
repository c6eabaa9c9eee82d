"""The frozen open_clip encoder: one code path makes L2-normalised float32 base vectors.

Models are named the open_clip way:

- ``--model ViT-B-32 --pretrained laion2b_s34b_b79k``: a registry name and a pretrained
  tag (open_clip downloads the weights on a machine with internet);
- ``--model ViT-B-32 --pretrained /path/ckpt.safetensors``: a local checkpoint
  (``.safetensors``; ``.pt``/``.bin`` are read with ``torch.load(weights_only=True)``);
- ``--model local-dir:/path``: a folder with open_clip_config.json and
  open_clip_model.safetensors;
- ``--model xmodal-demo``: the small model this repository ships (local-dir form);
- ``--pretrained none``: random initialisation (seeded), for benchmarks only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import open_clip
import torch

from .errors import FailedPrecondition, InvalidArgument, ModelUnavailable

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEMO_MODEL = "xmodal-demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "models" / DEMO_MODEL
RANDOM_TAGS = ("none", "random")

_ALTERNATIVES = (
    "alternatives that need no download: `--model xmodal-demo` (shipped with xmodal), "
    "`--model local-dir:/path/to/folder` (open_clip_config.json + open_clip_model.safetensors), "
    "or `--model NAME --pretrained /path/to/checkpoint.safetensors`"
)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for, and the identity recorded in snapshots."""

    model: str  # what open_clip is given
    pretrained: str | None
    identity: str
    requested: tuple[str, str | None] = ("", None)  # what the user asked for (recorded for `serve`)


def _register_demo_config() -> None:
    # Registering the shipped config by name lets `--model xmodal-demo --pretrained
    # /path/ckpt.safetensors` go through open_clip's own checkpoint path.
    if DEMO_MODEL not in open_clip.list_models():
        config = json.loads((DEMO_MODEL_DIR / "open_clip_config.json").read_text())
        open_clip.factory._MODEL_CONFIGS[DEMO_MODEL] = config["model_cfg"]


def resolve_model(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED) -> ModelSpec:
    """Validate a model choice without loading it, and compute its identity.

    Raises:
        ModelUnavailable: unknown model name, missing folder or checkpoint.
    """
    if pretrained is not None and pretrained.strip() == "":
        pretrained = None
    spec = _resolve(model, pretrained)
    return ModelSpec(spec.model, spec.pretrained, spec.identity, (model, pretrained))


def _resolve(model: str, pretrained: str | None) -> ModelSpec:
    if model == DEMO_MODEL and pretrained is None:
        model = f"local-dir:{DEMO_MODEL_DIR}"
        weights = DEMO_MODEL_DIR / "open_clip_model.safetensors"
        if not weights.is_file():
            raise ModelUnavailable(f"the shipped demo model is missing its weights at {weights}; reinstall xmodal")
        return ModelSpec(model, None, f"{DEMO_MODEL}@sha256:{file_sha256(weights)[:16]}")
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise ModelUnavailable(
                f"{folder} is not an open_clip local-dir model: it needs open_clip_config.json "
                "and open_clip_model.safetensors"
            )
        files = [folder / "open_clip_model.safetensors", folder / "open_clip_pytorch_model.bin"]
        found = [p for p in files if p.is_file()]
        if not found:
            raise ModelUnavailable(f"{folder} has no open_clip_model.safetensors; {_ALTERNATIVES}")
        return ModelSpec(f"local-dir:{folder.resolve()}", None, f"local-dir@sha256:{file_sha256(found[0])[:16]}")
    if model == DEMO_MODEL:
        _register_demo_config()
    if model not in open_clip.list_models():
        raise ModelUnavailable(
            f"unknown open_clip model {model!r}: use a name from open_clip.list_models() "
            f"(e.g. ViT-B-32, ViT-B-16, ViT-L-14) or a local model; {_ALTERNATIVES}"
        )
    if pretrained is None or pretrained.lower() in RANDOM_TAGS:
        return ModelSpec(model, None, f"{model}@random-seed0")
    path = Path(pretrained).expanduser()
    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or os.sep in pretrained:
        if not path.is_file():
            raise ModelUnavailable(f"checkpoint file {path} does not exist")
        return ModelSpec(model, str(path.resolve()), f"{model}@sha256:{file_sha256(path)[:16]}")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ModelUnavailable(
            f"{pretrained!r} is not a pretrained tag of {model}; known tags: {', '.join(tags) or 'none'}; "
            "or pass a checkpoint path"
        )
    return ModelSpec(model, pretrained, f"{model}@{pretrained}")


class QueryEncoder(Protocol):
    """What the server's read path needs of an encoder: the torch :class:`Encoder`, or a
    faster runtime checked against it (xmodal.indexer.onnx_encoder.OnnxEncoder)."""

    runtime: str
    dim: int

    @property
    def identity(self) -> str: ...

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray: ...

    def image_tensor(self, image) -> torch.Tensor: ...

    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_images(self, images: Sequence) -> np.ndarray: ...


class Encoder:
    """A frozen open_clip model (CPU by default) that returns normalised float32 base vectors.

    Thread-safe: forward passes are serialised by a lock (torch already uses every core
    for one batch); preprocessing and tokenizing may run in any thread.

    Text is encoded only up to the batch's last end-of-text token: CLIP's text tower is
    causal and reads its embedding at that token, so the padding after it changes nothing
    (the same vectors within 1e-5, half the time or less for a short query). On a CPU a
    batch of texts is encoded in groups of similar length (:func:`length_groups`), so short
    texts are not padded to the longest one.
    """

    runtime = "torch"
    passes = 1  # forward passes that may run at once (the lock): what a query batcher may feed

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, preprocess, tokenizer, device: str = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.model: Any = cast(Any, model).eval()  # an open_clip CLIP (encode_image / encode_text)
        self.preprocess = preprocess
        self.tokenizer: Any = tokenizer
        self._lock = threading.Lock()
        self.truncate_text = _truncatable(self.model)  # False: the full-context path (benchmarks compare)
        self.image_size = _image_size(model)
        self.context_length = int(getattr(model, "context_length", 77) or 77)
        self.dim = int(self.encode_texts(["probe"]).shape[-1])

    @property
    def identity(self) -> str:
        return self.spec.identity

    def image_tensor(self, image) -> torch.Tensor:
        """Preprocess one RGB PIL image into the model's input tensor (C, H, W)."""
        return self.preprocess(image)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length); longer texts are truncated by the tokenizer."""
        return self.tokenizer(list(texts))

    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch (N, C, H, W) into normalised float32 (N, dim)."""
        with self._lock, self._inference():
            features = self.model.encode_image(batch.to(self.device, non_blocking=True))
        return _normalise(features)

    def encode_images(self, images: Sequence) -> np.ndarray:
        """Encode RGB PIL images into normalised float32 (N, dim)."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_image_tensors(torch.stack([self.image_tensor(im) for im in images]))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts into normalised float32 (N, dim); texts longer than the model's
        context are truncated by the tokenizer."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        """Encode token ids (N, context_length) into normalised float32 (N, dim)."""
        if self.truncate_text and self.device.type == "cpu":  # padding costs CPU time; a GPU takes it in one pass
            with self._lock:
                return encode_in_length_groups(self.model, tokens, self._encode_tokens)
        with self._lock:
            return self._encode_tokens(tokens)

    def _encode_tokens(self, tokens: torch.Tensor) -> np.ndarray:
        with self._inference():
            if self.truncate_text:
                features = _encode_text_truncated(self.model, tokens.to(self.device))
            else:
                features = self.model.encode_text(tokens.to(self.device))
        return _normalise(features)

    def _inference(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.device.type == "cuda":  # fp16 matmuls on the GPU; vectors come back as float32
            stack.enter_context(torch.autocast("cuda", dtype=torch.float16))
        return stack


def _truncatable(model) -> bool:
    """Whether ``model``'s text tower is an open_clip CLIP causal transformer pooled at the
    end-of-text token (the case where cutting the padding changes nothing)."""
    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and isinstance(getattr(model, "positional_embedding", None), torch.Tensor)
    )


def row_lengths(model, tokens: torch.Tensor) -> torch.Tensor:
    """Each row's token positions that matter: up to and including its end-of-text token."""
    if model.text_pool_type == "argmax":  # end-of-text is the highest token id of each row
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == model.text_eos_id).int().argmax(dim=-1)
    return ends + 1


def text_length(model, tokens: torch.Tensor) -> int:
    """The token positions that matter for a batch: up to its last end-of-text token."""
    return int(row_lengths(model, tokens).max())


GROUP_SLACK = 1.25  # a length group's padded tokens are at most this times its real ones


def length_groups(lengths: Sequence[int] | np.ndarray, slack: float = GROUP_SLACK) -> list[np.ndarray]:
    """Row indices in groups of similar text length, shortest first.

    A batch cut after its last end-of-text token still pads every row to the longest one: a
    batch of 16 captions of 10 to 77 tokens costs 16 x 77 token positions where one-by-one
    costs their sum. On a CPU the work grows with the token positions, so padded batches were
    slower per text than single encodes. Sorted by length, a row joins the current group
    while the group's padded size stays within ``slack`` times its real tokens; each group is
    then one forward pass (the vectors do not depend on the grouping: the padding is cut).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    groups: list[list[int]] = []
    total = 0
    for row in order.tolist():
        size = int(lengths[row])
        if groups and (len(groups[-1]) + 1) * size <= slack * (total + size):
            groups[-1].append(row)
            total += size
        else:
            groups.append([row])
            total = size
    return [np.asarray(g, dtype=np.int64) for g in groups]


def encode_in_length_groups(model, tokens: torch.Tensor, encode) -> np.ndarray:
    """``encode(rows)`` -> normalised (len(rows), dim) over groups of similar length
    (:func:`length_groups`), the rows put back in their order."""
    if tokens.shape[0] <= 1:
        return encode(tokens)
    groups = length_groups(row_lengths(model, tokens).cpu().numpy())
    if len(groups) == 1:
        return encode(tokens)
    out: np.ndarray | None = None
    for group in groups:
        rows = encode(tokens[torch.from_numpy(group)])
        if out is None:
            out = np.empty((tokens.shape[0], rows.shape[1]), dtype=rows.dtype)
        out[group] = rows
    assert out is not None
    return out


def _encode_text_truncated(model, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text over the first text_length(tokens) positions only (the
    positional embedding and the causal mask sliced to match)."""
    length = text_length(model, tokens)
    return text_features(model, tokens[:, :length])


def text_features(model, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP.encode_text for token rows of any length up to the context (unnormalised)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = open_clip.transformer.text_global_pool(
        x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None)
    )
    if model.text_projection is not None:
        x = (
            model.text_projection(x)
            if isinstance(model.text_projection, torch.nn.Linear)
            else x @ model.text_projection
        )
    return x


def _normalise(features: torch.Tensor) -> np.ndarray:
    vectors = features.float().cpu().numpy()
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def _image_size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


DEVICES = "auto|cpu|cuda[:N]|mps"


def default_threads() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | None) -> str:
    """The torch device for ``--device``: ``auto`` is the first CUDA GPU torch sees, else
    Apple's MPS, else the CPU.

    Raises:
        InvalidArgument: not one of auto, cpu, cuda, cuda:N, mps.
        FailedPrecondition: a GPU asked for that torch cannot see on this machine.
    """
    name = (device or "cpu").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        return "mps" if _mps_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "mps":
        if not _mps_available():
            raise FailedPrecondition("--device mps: torch sees no Apple MPS device here; use --device cpu or auto")
        return "mps"
    if name == "cuda" or name.startswith("cuda:"):
        index = name[5:] or "0"
        if not index.isdigit():
            raise InvalidArgument(f"--device {device}: a CUDA device is cuda or cuda:N (N a number)")
        if not torch.cuda.is_available():
            built = f"torch {torch.__version__} " + (
                "has CUDA support but finds no GPU or driver" if torch.version.cuda else "is built without CUDA"
            )
            raise FailedPrecondition(
                f"--device {device}: no CUDA device on this machine ({built}); use --device cpu or auto"
            )
        if int(index) >= torch.cuda.device_count():
            raise FailedPrecondition(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"numbered 0..{torch.cuda.device_count() - 1}"
            )
        return f"cuda:{int(index)}"
    raise InvalidArgument(f"--device {device!r}: choose one of {DEVICES}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def load_encoder(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    threads: int | None = None,
    allow_pickle: bool = False,
    device: str | None = "cpu",
) -> Encoder:
    """Load a frozen open_clip encoder (on the CPU unless ``device`` says otherwise).

    Args:
        model: open_clip name, ``local-dir:/path`` or ``xmodal-demo``.
        pretrained: a pretrained tag, a checkpoint path, ``none`` (random init) or None.
        threads: torch intra-op threads (default: one per core this process may use).
        allow_pickle: load .pt/.bin checkpoints with full unpickling. Only for files from
            a trusted source: unpickling can run arbitrary code. Off by default, when
            only plain tensors are read (``torch.load(weights_only=True)``).
        device: ``auto``, ``cpu`` (default), ``cuda``, ``cuda:N`` or ``mps`` (see
            :func:`resolve_device`); on CUDA the forward passes run under fp16 autocast.

    Raises:
        InvalidArgument, FailedPrecondition: a device that is malformed or not here.
        ModelUnavailable: the model or its weights cannot be had here; the message names
            the alternatives that need no download.
    """
    torch_device = resolve_device(device)  # before the weights load: a bad --device fails fast
    spec = resolve_model(model, pretrained)
    if allow_pickle and spec.pretrained and not spec.pretrained.endswith(".safetensors"):
        log.warning("loading %s with full unpickling (--allow-pickle)", spec.pretrained)
    torch.set_num_threads(threads or default_threads())
    if spec.model == DEMO_MODEL:
        _register_demo_config()
    if spec.pretrained is None:
        torch.manual_seed(0)  # random-init models are reproducible
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=spec.pretrained, device="cpu", weights_only=not allow_pickle
        )
    except pickle.UnpicklingError:
        raise ModelUnavailable(
            f"checkpoint {spec.pretrained} holds pickled objects beyond plain tensors, which xmodal refuses to "
            "load (unpickling can run arbitrary code): convert it to .safetensors, or pass --allow-pickle "
            "if you trust its source"
        ) from None
    except (RuntimeError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:300]
        if spec.pretrained and not Path(spec.pretrained).is_file():
            raise ModelUnavailable(
                f"could not download the weights of {spec.model} / {spec.pretrained} (open_clip says: {reason}); "
                f"this machine may have no internet; {_ALTERNATIVES}"
            ) from None
        raise ModelUnavailable(f"could not load model {spec.model!r} ({reason}); {_ALTERNATIVES}") from None
    tokenizer = open_clip.get_tokenizer(spec.model)
    return Encoder(spec, clip.to(torch_device), preprocess, tokenizer, device=torch_device)
