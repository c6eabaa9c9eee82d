"""Heads: small projections applied to frozen base embeddings, one per modality.

Kinds (after "Efficient Domain Adaptation of Multimodal Embeddings using Contrastive
Learning", Margaritis et al. 2025):

- ``identity``: no projection (zero-shot).
- ``pca``: one shared projection onto the top principal components of the training
  embeddings of both modalities (the paper's baseline; fitted, not trained).
- ``linear``: per modality, residual ``x + W x`` with ``W`` zero-initialised.
- ``mlp`` (the default): per modality, residual ``x + fc2(relu(fc1(x)))`` with ``fc2``
  zero-initialised, so an untrained head is exactly zero-shot.
- ``shared``: one such mlp applied to both modalities (the paper's single projection).
- ``paper``: what the paper's code (margaeor/emb-adapt-cl) trains, as a baseline: per
  modality a plain ``Linear -> ReLU -> Linear`` projector (hidden min(dim/2, 16)) to 128
  dimensions, not residual, trained with its pairwise label loss (needs labels).

**Blending with zero-shot.** A residual head of the encoder's size serves
``normalize(x + a * g(x))`` with ``a`` (``blend``, in [0, 1]) chosen on validation by the
gate (xmodal.indexer.gate); ``a = 0`` is exactly zero-shot, ``a = 1`` the head as trained.
``a`` is a head option (head.json), so a head saved before blending existed loads as
``a = 1``, unchanged, and serving costs the same.

Every output is L2-normalised. When ``dim_out`` differs from the input size, the skip
path is a linear map initialised from the PCA of the training embeddings (then an
untrained head equals PCA, not zero-shot). Heads save as ``head.safetensors`` (tensors,
no pickle) plus ``head.json`` (kind, dims, options) and carry a sha256 over both.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .corpus import MODALITIES
from .errors import InvalidArgument

HEAD_KINDS = ("identity", "pca", "linear", "mlp", "shared", "paper")
TRAINABLE_KINDS = ("linear", "mlp", "shared")  # the residual kinds (refits, feedback, blending)
DEFAULT_HEAD = "mlp"
DEFAULT_HIDDEN = 512
PAPER_DIM = 128  # the paper's projector: output size, and hidden min(dim // 2, 16)
PAPER_MAX_HIDDEN = 16


class PCAProjection(torch.nn.Module):
    """(x - mean) @ components.T, fitted from data (buffers, not parameters)."""

    mean: torch.Tensor
    components: torch.Tensor

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim_in))
        self.register_buffer("components", torch.eye(dim_out, dim_in))

    def fit(self, vectors: np.ndarray) -> None:
        x = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
        if len(x) < 2:
            raise InvalidArgument("PCA needs at least 2 training vectors")
        mean = x.mean(0)
        _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
        k = self.components.shape[0]
        if v.shape[0] < k:
            raise InvalidArgument(f"PCA to {k} dimensions needs at least {k} training vectors, got {len(x)}")
        self.mean.copy_(mean)
        self.components.copy_(v[:k])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components.T


class Residual(torch.nn.Module):
    """skip(x) + blend * f(x); f's last layer starts at zero, so the module starts as skip(x).
    ``blend`` is a plain attribute (a head option), not a tensor: the state dict is the same
    whatever it is."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int | None, blend: float = 1.0):
        super().__init__()
        self.blend = blend
        # Identity skip when the size is kept: an untrained head is exactly zero-shot.
        self.skip = torch.nn.Identity() if dim_in == dim_out else torch.nn.Linear(dim_in, dim_out, bias=False)
        self.fc1: torch.nn.Linear | None
        if hidden:
            self.fc1 = torch.nn.Linear(dim_in, hidden)
            self.fc2 = torch.nn.Linear(hidden, dim_out)
        else:
            self.fc1 = None
            self.fc2 = torch.nn.Linear(dim_in, dim_out)
        torch.nn.init.zeros_(self.fc2.weight)
        torch.nn.init.zeros_(self.fc2.bias)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """g(x), the learned correction (before blending)."""
        return self.fc2(torch.relu(self.fc1(x))) if self.fc1 is not None else self.fc2(x)

    def forward(self, x: torch.Tensor, updates: list | None = None) -> torch.Tensor:
        update = self.update(x)
        if updates is not None:  # training: the norm penalty reads ||g(x)||^2
            updates.append(update.pow(2).sum(-1).mean())
        return self.skip(x) + (update if self.blend == 1.0 else self.blend * update)


class PaperProjector(torch.nn.Module):
    """The paper code's projection head: Linear -> ReLU -> Linear, not residual."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        hidden = max(1, min(dim_in // 2, PAPER_MAX_HIDDEN))
        self.fc1 = torch.nn.Linear(dim_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class QueryAdapter(torch.nn.Module):
    """A query-side correction computed from the *base* vector and added in the output
    space: ``normalize(head(x)) + fc2(relu(fc1(x)))``; fc2 starts at zero. Reading the base
    vector (not the projected one) lets it use what the document head threw away."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim_out)
        torch.nn.init.zeros_(self.fc2.weight)
        torch.nn.init.zeros_(self.fc2.bias)

    def forward(self, base: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        return projected + self.fc2(torch.relu(self.fc1(base)))


class Head(torch.nn.Module):
    """A pair of projections (image, text) into one space; outputs are L2-normalised.

    Args:
        kind: one of HEAD_KINDS.
        dim_in: size of the base embeddings.
        dim_out: output size (default: dim_in; pca defaults to min(128, dim_in // 2)).
        options: kind-specific options, e.g. {"hidden": 512} for mlp/shared.
    """

    def __init__(self, kind: str, dim_in: int, dim_out: int | None = None, options: dict | None = None):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise InvalidArgument(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if not isinstance(dim_in, int) or dim_in <= 0:
            raise InvalidArgument(f"head input dimension must be a positive integer, got {dim_in!r}")
        if kind == "identity" and dim_out not in (None, dim_in):
            raise InvalidArgument("an identity head cannot change the dimension")
        if kind == "pca" and dim_out is None:
            dim_out = max(1, min(128, dim_in // 2))
        if kind == "paper" and dim_out is None:
            dim_out = PAPER_DIM
        dim_out = dim_out or dim_in
        if dim_out <= 0:
            raise InvalidArgument(f"dim_out must be positive, got {dim_out}")
        self.kind = kind
        self.dim_in = dim_in
        self.dim_out = dim_out
        self.options = dict(options or {})
        hidden = int(self.options.setdefault("hidden", DEFAULT_HIDDEN)) if kind in ("mlp", "shared") else None
        if hidden is not None and hidden <= 0:
            raise InvalidArgument(f"hidden width must be positive, got {hidden}")
        self.projections = torch.nn.ModuleDict()
        # Query-side adapters (refits in "query" mode): applied to queries only, after the
        # projection, so documents already indexed stay valid and nothing is re-projected.
        self.query_adapters = torch.nn.ModuleDict()
        for modality in self.options.get("query_adapters", []):
            self.query_adapters[modality] = QueryAdapter(dim_in, dim_out, int(self.options["adapter_hidden"]))
        blend = float(self.options.get("blend", 1.0))  # absent in heads saved before blending
        if not 0.0 <= blend <= 1.0:
            raise InvalidArgument(f"blend must be in [0, 1], got {blend}")
        if "blend" in self.options and kind not in TRAINABLE_KINDS:
            raise InvalidArgument(f"only residual heads ({', '.join(TRAINABLE_KINDS)}) blend with zero-shot")
        if kind == "pca":
            self.projections["shared"] = PCAProjection(dim_in, dim_out)
        elif kind == "shared":
            self.projections["shared"] = Residual(dim_in, dim_out, hidden, blend)
        elif kind in ("linear", "mlp"):
            for modality in MODALITIES:
                self.projections[modality] = Residual(dim_in, dim_out, hidden, blend)
        elif kind == "paper":
            for modality in MODALITIES:
                self.projections[modality] = PaperProjector(dim_in, dim_out)

    @property
    def config(self) -> dict:
        return {"kind": self.kind, "dim_in": self.dim_in, "dim_out": self.dim_out, "options": self.options}

    @property
    def blendable(self) -> bool:
        """A residual head of the encoder's size: at blend 0 it is exactly zero-shot."""
        return self.kind in TRAINABLE_KINDS and self.dim_out == self.dim_in

    @property
    def blend(self) -> float:
        return float(self.options.get("blend", 1.0))

    def set_blend(self, blend: float) -> None:
        """Serve ``normalize(x + blend * g(x))`` from now on (a residual head only)."""
        if self.kind not in TRAINABLE_KINDS:
            raise InvalidArgument(f"only residual heads ({', '.join(TRAINABLE_KINDS)}) blend with zero-shot")
        if not 0.0 <= blend <= 1.0:
            raise InvalidArgument(f"blend must be in [0, 1], got {blend}")
        if blend == 1.0:
            self.options.pop("blend", None)  # a = 1 saves as a head did before blending
        else:
            self.options["blend"] = float(blend)
        for module in self.projections.values():
            if isinstance(module, Residual):
                module.blend = float(blend)

    def blended(self, blend: float) -> Head:
        """A copy of this head serving at ``blend``."""
        head = copy.deepcopy(self)
        head.set_blend(blend)
        return head.eval()

    def projection(self, modality: str) -> torch.nn.Module | None:
        if modality not in MODALITIES:
            raise InvalidArgument(f"unknown modality {modality!r}")
        if modality in self.projections:
            return self.projections[modality]
        return self.projections["shared"] if "shared" in self.projections else None

    def add_query_adapter(self, modality: str, hidden: int = 256) -> None:
        """Add a zero-initialised query-side adapter for ``modality`` (no-op if present)."""
        if modality not in MODALITIES:
            raise InvalidArgument(f"unknown modality {modality!r}")
        if modality in self.query_adapters:
            return
        self.options["adapter_hidden"] = int(self.options.get("adapter_hidden", hidden))
        self.query_adapters[modality] = QueryAdapter(self.dim_in, self.dim_out, self.options["adapter_hidden"])
        self.options["query_adapters"] = sorted(self.query_adapters.keys())

    def without_query_adapters(self) -> Head:
        """A copy with the same projections and no query adapters (for full refits)."""
        options = {k: v for k, v in self.options.items() if k not in ("query_adapters", "adapter_hidden")}
        head = Head(self.kind, self.dim_in, self.dim_out, options)
        head.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("query_adapters.")})
        return head.eval()

    def forward(self, modality: str, x: torch.Tensor, query: bool = False, updates: list | None = None) -> torch.Tensor:
        """Project ``x``; with ``updates`` (training), append the mean ||g(x)||^2 of a
        residual projection to it."""
        projection = self.projection(modality)
        if projection is None:
            out = x
        elif isinstance(projection, Residual):
            out = projection(x, updates)
        else:
            out = projection(x)
        projected = torch.nn.functional.normalize(out, dim=-1)
        if query and modality in self.query_adapters:
            projected = torch.nn.functional.normalize(self.query_adapters[modality](x, projected), dim=-1)
        return projected

    def init_skip_from_pca(self, vectors: np.ndarray) -> None:
        """Start dimension-changing skip paths at the PCA of ``vectors``."""
        pca = PCAProjection(self.dim_in, self.dim_out)
        pca.fit(vectors)
        for module in self.projections.values():
            if isinstance(module, Residual) and isinstance(module.skip, torch.nn.Linear):
                with torch.no_grad():
                    module.skip.weight.copy_(pca.components)

    def project(self, modality: str, vectors: np.ndarray, query: bool = False) -> np.ndarray:
        """Apply the modality's projection to base vectors; returns normalised float32.

        Args:
            query: the vectors are queries: apply the modality's query adapter too, if any.
        """
        x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise InvalidArgument(f"head expects (N, {self.dim_in}) vectors, got {tuple(x.shape)}")
        with torch.inference_mode():
            return np.ascontiguousarray(self(modality, x, query).numpy(), dtype=np.float32)

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
    """Load a head saved by :meth:`Head.save` (safetensors only; nothing is unpickled).

    Raises:
        InvalidArgument: missing files, or tensors that do not match the recorded hash.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / "head.json").read_text())
        tensors = load_file(str(folder / "head.safetensors"))
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read the head in {folder}: {exc}") from None
    head = Head(config["kind"], config["dim_in"], config.get("dim_out"), config.get("options"))
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
