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

import hashlib
import json
import logging
import os
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import open_clip
import torch

from .errors import ModelUnavailable

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


class Encoder:
    """A frozen open_clip model on the CPU that returns normalised float32 base vectors.

    Thread-safe: forward passes are serialised by a lock (torch already uses every core
    for one batch); preprocessing may run in any thread.
    """

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, preprocess, tokenizer):
        self.spec = spec
        self.model: Any = cast(Any, model).eval()  # an open_clip CLIP (encode_image / encode_text)
        self.preprocess = preprocess
        self.tokenizer: Any = tokenizer
        self._lock = threading.Lock()
        with torch.inference_mode():
            probe = self.model.encode_text(self.tokenizer(["probe"]))
        self.dim = int(probe.shape[-1])
        self.image_size = _image_size(model)
        self.context_length = int(getattr(model, "context_length", 77) or 77)

    @property
    def identity(self) -> str:
        return self.spec.identity

    def image_tensor(self, image) -> torch.Tensor:
        """Preprocess one RGB PIL image into the model's input tensor (C, H, W)."""
        return self.preprocess(image)

    def encode_image_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Encode a preprocessed batch (N, C, H, W) into normalised float32 (N, dim)."""
        with self._lock, torch.inference_mode():
            features = self.model.encode_image(batch)
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
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        with self._lock, torch.inference_mode():
            features = self.model.encode_text(tokens)
        return _normalise(features)


def _normalise(features: torch.Tensor) -> np.ndarray:
    vectors = features.float().numpy()
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.maximum(norms, 1e-12, out=norms)
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def _image_size(model) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def load_encoder(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    threads: int | None = None,
    allow_pickle: bool = False,
) -> Encoder:
    """Load a frozen open_clip encoder on the CPU.

    Args:
        model: open_clip name, ``local-dir:/path`` or ``xmodal-demo``.
        pretrained: a pretrained tag, a checkpoint path, ``none`` (random init) or None.
        threads: torch intra-op threads (default: torch's own choice, one per core).
        allow_pickle: load .pt/.bin checkpoints with full unpickling. Only for files from
            a trusted source: unpickling can run arbitrary code. Off by default, when
            only plain tensors are read (``torch.load(weights_only=True)``).

    Raises:
        ModelUnavailable: the model or its weights cannot be had here; the message names
            the alternatives that need no download.
    """
    spec = resolve_model(model, pretrained)
    if allow_pickle and spec.pretrained and not spec.pretrained.endswith(".safetensors"):
        log.warning("loading %s with full unpickling (--allow-pickle)", spec.pretrained)
    if threads:
        torch.set_num_threads(threads)
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
    return Encoder(spec, clip, preprocess, tokenizer)
