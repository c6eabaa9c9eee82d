"""Heads: small projections applied to frozen base embeddings, one per modality.

Only the ``identity`` kind (zero-shot) exists so far; the adaptation issue adds pca,
linear, mlp and shared. Every kind saves as ``head.safetensors`` (tensors, no pickle)
plus ``head.json`` (kind, dims, options), and carries a hash over both that snapshots
record.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .corpus import MODALITIES
from .errors import InvalidArgument

HEAD_KINDS = ("identity",)


class Head(torch.nn.Module):
    """A pair of projections (image, text) to a shared space; outputs are L2-normalised."""

    def __init__(self, kind: str, dim_in: int, dim_out: int | None = None, options: dict | None = None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise InvalidArgument(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if dim_in <= 0:
            raise InvalidArgument(f"head input dimension must be positive, got {dim_in}")
        self.kind = kind
        self.dim_in = dim_in
        self.dim_out = dim_out or dim_in
        self.options = dict(options or {})
        self.image = torch.nn.Identity()
        self.text = torch.nn.Identity()

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "dim_in": self.dim_in, "dim_out": self.dim_out, "options": self.options}

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        if modality not in MODALITIES:
            raise InvalidArgument(f"unknown modality {modality!r}")
        projected = getattr(self, modality)(x)
        return torch.nn.functional.normalize(projected, dim=-1)

    def project(self, modality: str, vectors: np.ndarray) -> np.ndarray:
        """Apply the modality's projection to base vectors; returns normalised float32."""
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise InvalidArgument(f"head expects (N, {self.dim_in}) vectors, got {tuple(x.shape)}")
        with torch.inference_mode():
            return np.ascontiguousarray(self(modality, x).numpy(), dtype=np.float32)

    def digest(self) -> str:
        """sha256 over the config and every tensor, in a fixed order."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, folder: str | Path) -> str:
        """Write head.safetensors and head.json into ``folder``; return the digest."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(folder / "head.safetensors"))
        digest = self.digest()
        (folder / "head.json").write_text(json.dumps({**self.config, "sha256": digest}, indent=2, sort_keys=True))
        return digest


def load_head(folder: str | Path) -> Head:
    """Load a head saved by :meth:`Head.save` (safetensors only; nothing is unpickled)."""
    folder = Path(folder)
    config = json.loads((folder / "head.json").read_text())
    head = Head(config["kind"], config["dim_in"], config.get("dim_out"), config.get("options"))
    tensors = load_file(str(folder / "head.safetensors"))
    head.load_state_dict(tensors, strict=True)
    head.eval()
    expected = config.get("sha256")
    if expected and head.digest() != expected:
        raise InvalidArgument(f"head in {folder} does not match its recorded sha256: the files are corrupt")
    return head


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
