"""A deterministic generator of image-caption "worlds" for offline demos, tests and benchmarks.

Each item is a picture of one shape (kind, colour, size, position) on a background, and a
caption that describes it. Two styles share the same underlying scenes:

- ``source``: clean colour drawings, plain-English captions ("a small red circle in the
  upper left on a gray background"); the style the shipped demo model is made for.
- ``target`` (a "site" style): greyscale, noisy, blurred, low-contrast pictures and
  captions in a clinical register with synonyms ("small round opacity, hyperdense,
  left upper zone"), for domain-adaptation experiments.

A third phrasing, ``user`` ("tiny red blob top left": terse, no background), exists for
captions only: it is how simulated users word their queries in the feedback simulation.

Nothing is random at run time: a world is a function of (n, seed, style).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import InvalidArgument

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 200, 210),
}
POSITIONS = {
    "upper left": (0.3, 0.3),
    "upper right": (0.7, 0.3),
    "lower left": (0.3, 0.7),
    "lower right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.16, "large": 0.32}
BACKGROUNDS = {"gray": (120, 120, 120), "black": (15, 15, 15), "beige": (215, 200, 170), "navy": (25, 30, 80)}

# The target style's vocabulary: same facts, another register.
TARGET_SHAPES = {
    "circle": "round opacity",
    "square": "quadrilateral density",
    "triangle": "wedge-shaped lesion",
    "cross": "cruciform artifact",
    "ring": "annular lesion",
    "diamond": "rhomboid density",
}
TARGET_COLOURS = {
    "red": "hyperdense",
    "green": "isodense",
    "blue": "hypodense",
    "yellow": "calcified",
    "purple": "heterogeneous",
    "orange": "enhancing",
    "white": "radiopaque",
    "cyan": "cystic",
}
TARGET_POSITIONS = {
    "upper left": "left upper zone",
    "upper right": "right upper zone",
    "lower left": "left lower zone",
    "lower right": "right lower zone",
    "center": "central region",
}
TARGET_SIZES = {"small": "small", "large": "large"}
# The third phrasing, reserved for the feedback simulation: how users type queries. Terse,
# plain colour words, other shape and position words, no background; never used to fit
# heads on the corpus.
USER_SHAPES = {
    "circle": "blob",
    "square": "box",
    "triangle": "wedge",
    "cross": "plus sign",
    "ring": "hoop",
    "diamond": "rhombus",
}
USER_POSITIONS = {
    "upper left": "top left",
    "upper right": "top right",
    "lower left": "bottom left",
    "lower right": "bottom right",
    "center": "middle",
}
USER_SIZES = {"small": "tiny", "large": "big"}
TARGET_BACKGROUNDS = {
    "gray": "standard window",
    "black": "dark field",
    "beige": "soft tissue window",
    "navy": "bone window",
}
STYLES = ("source", "target")
PHRASINGS = ("source", "target", "user")  # captions only: "user" has no picture style of its own


@dataclass(frozen=True)
class Scene:
    """The facts behind one picture and its caption."""

    shape: str
    colour: str
    position: str
    size: str
    background: str
    jitter: tuple[float, float]

    @property
    def label(self) -> str:
        """A coarse class label (the shape), for label-aware experiments."""
        return self.shape


def scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` scenes, deterministic in (n, seed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(
            Scene(
                shape=rng.choice(SHAPES),
                colour=rng.choice(list(COLOURS)),
                position=rng.choice(list(POSITIONS)),
                size=rng.choice(list(SIZES)),
                background=rng.choice(list(BACKGROUNDS)),
                jitter=(rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06)),
            )
        )
    return out


def caption(scene: Scene, style: str = "source") -> str:
    if style == "source":
        return f"a {scene.size} {scene.colour} {scene.shape} in the {scene.position} on a {scene.background} background"
    if style == "target":
        return (
            f"{TARGET_SIZES[scene.size]} {TARGET_SHAPES[scene.shape]}, {TARGET_COLOURS[scene.colour]}, "
            f"{TARGET_POSITIONS[scene.position]}, {TARGET_BACKGROUNDS[scene.background]}"
        )
    if style == "user":
        return f"{USER_SIZES[scene.size]} {scene.colour} {USER_SHAPES[scene.shape]} {USER_POSITIONS[scene.position]}"
    raise InvalidArgument(f"unknown phrasing {style!r}; choose one of {PHRASINGS}")


def render(scene: Scene, style: str = "source", size: int = 96, seed: int = 0) -> Image.Image:
    """Draw one scene; the target style adds greyscale, low contrast, blur and noise."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cx = (POSITIONS[scene.position][0] + scene.jitter[0]) * size
    cy = (POSITIONS[scene.position][1] + scene.jitter[1]) * size
    r = SIZES[scene.size] * size / 2 * 1.4
    colour = COLOURS[scene.colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if scene.shape == "circle":
        draw.ellipse(box, fill=colour)
    elif scene.shape == "square":
        draw.rectangle(box, fill=colour)
    elif scene.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif scene.shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    elif scene.shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, int(r / 3)))
    elif scene.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    if style == "source":
        return image
    if style != "target":
        raise InvalidArgument(f"unknown style {style!r}; choose one of {STYLES}")
    grey = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)
    grey = 128 + (grey - 128) * 0.6
    noise = np.random.default_rng(seed).normal(0, 12, grey.shape)
    return Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8), mode="L")


def write_corpus(
    out_dir: str | Path, n: int = 1000, *, seed: int = 0, style: str = "source", image_size: int = 96
) -> Path:
    """Write a folder corpus (images/ + captions.jsonl, the ROCO layout) and return it.

    Re-running with the same arguments leaves the same files (nothing is rewritten).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes(n, seed)):
        item_id = f"{style}-{seed}-{i:06d}"
        rel = f"images/{item_id}.png"
        path = out / rel
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            render(scene, style, image_size, seed=seed * 1_000_003 + i).save(tmp)
            tmp.replace(path)
        lines.append(
            json.dumps(
                {
                    "id": item_id,
                    "image": rel,
                    "caption": caption(scene, style),
                    "label": scene.label,
                    "style": style,
                }
            )
        )
    captions = out / "captions.jsonl"
    tmp = captions.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(captions)
    return out
