"""The demo model's procedural captioned dataset: coloured, patterned shapes on a plain background.

Every image is drawn from a seed, so the whole dataset is rebuilt exactly from ``(seed, index)``.
Captions name every attribute ("a red striped circle at the top left on a dark background"), so
prompts matter and guidance is meaningful; stripes, checks and outlines are fine detail whose blur
or loss few-step samplers make visible and measurable (:func:`detail_energy`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 50, 170), "orange": (240, 130, 20)}
PATTERNS = ("solid", "striped", "checked", "outlined")
POSITIONS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
             "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
BACKGROUNDS = {"light": (235, 235, 228), "dark": (30, 30, 40)}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    pattern: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        pattern = "" if self.pattern == "solid" else f"{self.pattern} "
        words = f"{self.colour} {pattern}{self.shape}"
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words} {where} on a {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(shape=SHAPES[rng.integers(len(SHAPES))], colour=list(COLOURS)[rng.integers(len(COLOURS))],
                 pattern=PATTERNS[rng.integers(len(PATTERNS))], position=list(POSITIONS)[rng.integers(len(POSITIONS))],
                 background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy ** 2 + dx ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r * 1.1
    # triangle pointing up: below the two slanted edges, above the base
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 ``(SIZE, SIZE, 3)`` image; ``rng`` jitters position, size and stripe phase."""
    rng = rng if rng is not None else np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    row, col = POSITIONS[scene.position]
    cell = SIZE / 3
    cy = (row + 0.5) * cell + rng.uniform(-1.5, 1.5)
    cx = (col + 0.5) * cell + rng.uniform(-1.5, 1.5)
    r = cell * 0.55 + rng.uniform(-1, 1)
    mask = _shape_mask(scene.shape, yy, xx, cy, cx, r)
    phase = int(rng.integers(4))
    if scene.pattern == "striped":
        paint = mask & (((yy + xx + phase) // 3) % 2 == 0)
    elif scene.pattern == "checked":
        paint = mask & ((((yy + phase) // 4) + ((xx + phase) // 4)) % 2 == 0)
    elif scene.pattern == "outlined":
        inner = _shape_mask(scene.shape, yy, xx, cy, cx, r - 3.0)
        paint = mask & ~inner
    else:
        paint = mask
    img = np.empty((SIZE, SIZE, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    img[paint] = COLOURS[scene.colour]
    img += rng.normal(0, 2.0, img.shape)  # a little sensor noise keeps the VAE honest
    return np.clip(img, 0, 255).astype(np.uint8)


def sample(seed: int, index: int) -> tuple[np.ndarray, str, Scene]:
    """Item ``index`` of the dataset for ``seed``: (image, caption, scene)."""
    rng = np.random.default_rng([seed, index])
    scene = random_scene(rng)
    return render(scene, rng), scene.caption, scene


def batch(seed: int, start: int, size: int) -> tuple[np.ndarray, list[str]]:
    """Items ``start .. start + size - 1`` as a float32 ``(size, 3, SIZE, SIZE)`` array in [-1, 1] and captions."""
    images, captions = [], []
    for i in range(start, start + size):
        img, caption, _ = sample(seed, i)
        images.append(img)
        captions.append(caption)
    arr = np.stack(images).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return arr, captions


def detail_energy(images: np.ndarray) -> float:
    """Mean absolute Laplacian of ``(N, H, W, 3)`` uint8/float images: high for crisp stripes and checks,
    low for blur."""
    x = np.asarray(images, dtype=np.float32)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())
