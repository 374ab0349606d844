"""Embedded toy data: one class object (a coloured shape) per image on a cluttered, class-neutral background.

A class is a shape (circle, square, ...) drawn in a saturated colour whose hue lies near the class's own hue;
the background and its clutter are muted (low saturation), so nothing outside the object tells the class.
The object covers about a quarter of the image side, so a patch selector has something to find and the
ground-truth boxes (``boxes.json``) say whether it found it. Everything is drawn from a seed: the same call
writes the same bytes.
"""

from __future__ import annotations

import colorsys
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from patchdd.formats.outputs import atomic_directory

Point = tuple[float, float]
BOXES_FILE = "boxes.json"
SPLITS = {"train": 0, "val": 1}


def _regular_polygon(n: int, phase: float = 0.0) -> list[Point]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int = 5, inner: float = 0.45) -> list[Point]:
    outer = _regular_polygon(points, -math.pi / 2)
    inner_pts = [(inner * x, inner * y) for x, y in _regular_polygon(points, -math.pi / 2 + math.pi / points)]
    return [p for pair in zip(outer, inner_pts) for p in pair]


def _cross(arm: float = 0.33) -> list[Point]:
    a = arm
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def _arrow() -> list[Point]:
    return [(-1, -0.3), (0.1, -0.3), (0.1, -0.8), (1, 0), (0.1, 0.8), (0.1, 0.3), (-1, 0.3)]


# Each shape is a list of polygons in [-1, 1]^2; a polygon drawn with fill=None is cut out (drawn in background).
SHAPES: dict[str, list[tuple[list[Point], bool]]] = {
    "circle": [(_regular_polygon(48), True)],
    "square": [([(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], True)],
    "triangle": [(_regular_polygon(3, -math.pi / 2), True)],
    "cross": [(_cross(), True)],
    "star": [(_star(), True)],
    "ring": [(_regular_polygon(48), True), ([(0.55 * x, 0.55 * y) for x, y in _regular_polygon(48)], False)],
    "diamond": [([(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], True)],
    "hexagon": [(_regular_polygon(6), True)],
    "crescent": [(_regular_polygon(48), True),
                 ([(0.85 * x + 0.45, 0.85 * y - 0.1) for x, y in _regular_polygon(48)], False)],
    "arrow": [(_arrow(), True)],
}


def _muted(rng: np.random.Generator, low: float = 50, high: float = 200, spread: float = 30) -> tuple[int, ...]:
    """A low-saturation colour: a grey level plus small per-channel offsets (carries no class hue)."""
    grey = rng.uniform(low, high)
    return tuple(int(np.clip(grey + rng.uniform(-spread, spread), 0, 255)) for _ in range(3))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Muted gradient, blurred blobs, thin random lines and speckle noise: clutter with no class signal."""
    base = np.asarray(_muted(rng, 70, 180), np.float32)
    tilt = rng.uniform(-40, 40, size=(2, 1))
    yy, xx = np.mgrid[0:size, 0:size] / size
    pixels = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 8)):  # soft blobs
        cx, cy, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size * 0.08, size * 0.3)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_muted(rng))
    image = image.filter(ImageFilter.GaussianBlur(radius=size / 16))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(6, 12)):  # clutter lines
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([x0, y0, x1, y1], fill=_muted(rng, 0, 255, 40), width=int(rng.integers(1, 3)))
    noise = rng.normal(0, 10, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))


def object_colour(class_id: int, num_classes: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour whose hue lies near the class's own hue (jittered); brightness varies freely."""
    hue = (class_id / num_classes + rng.uniform(-0.35, 0.35) / num_classes) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.6, 1.0))
    return tuple(int(255 * c) for c in rgb)


def _transform(points: list[Point], cx: float, cy: float, half: float, angle: float) -> list[Point]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + half * (c * x - s * y), cy + half * (s * x + c * y)) for x, y in points]


def draw_toy_image(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int,
                   object_scale: tuple[float, float]) -> tuple[Image.Image, list[int]]:
    """One image holding one ``shape`` and its box ``[x0, y0, x1, y1]`` (pixels, exclusive end)."""
    image = _background(rng, size)
    side = rng.uniform(*object_scale) * size
    half = side / 2
    cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
    angle = rng.uniform(-0.25, 0.25)
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    for polygon, filled in SHAPES[shape]:
        draw.polygon(_transform(polygon, cx, cy, half, angle), fill=255 if filled else 0)
    image.paste(Image.new("RGB", (size, size), colour), (0, 0), layer)
    x0, y0, x1, y1 = layer.getbbox()
    return image, [x0, y0, x1, y1]


def write_toy_dataset(
    out: str = "data/toy",
    num_classes: int = 10,
    image_size: int = 128,
    train_per_class: int = 100,
    val_per_class: int = 20,
    object_scale: tuple[float, float] = (0.22, 0.32),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the embedded toy dataset (shapes on clutter, with ground-truth boxes) as an ImageFolder.

    Layout: ``out/train/<shape>/00000.png``, ``out/val/<shape>/...`` and ``out/boxes.json`` mapping
    ``"train/<shape>/00000.png"`` to ``[x0, y0, x1, y1]``. The folder is built beside ``out`` and renamed into
    place when complete: a cut run leaves no half-written dataset, and a non-empty ``out`` is never mixed into.

    Args:
        out: the dataset folder (must not exist or be empty, unless ``overwrite``).
        num_classes: shape classes (at most the number of shapes).
        image_size: side of every image in pixels.
        train_per_class: training images per class.
        val_per_class: validation images per class.
        object_scale: range of the object's size as a fraction of the image side.
        seed: seed of every image.
        overwrite: replace a non-empty ``out`` whole.
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be between 1 and {len(SHAPES)}, got {num_classes}")
    if min(image_size, train_per_class, val_per_class) < 1:
        raise ValueError("image_size, train_per_class and val_per_class must be at least 1")
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} is not empty; choose another --out or pass --overwrite true to replace it")
    with atomic_directory(target) as root:
        boxes = _write_images(root, num_classes, image_size, {"train": train_per_class, "val": val_per_class},
                              object_scale, seed)
    print(f"wrote {len(boxes)} toy images ({num_classes} classes) to {target}")
    return target


def _write_images(root: Path, num_classes: int, image_size: int, counts: dict[str, int],
                  object_scale: tuple[float, float], seed: int) -> dict[str, list[int]]:
    """Every split's images and ``boxes.json`` into ``root``; returns the boxes."""
    boxes: dict[str, list[int]] = {}
    for split, count in counts.items():
        for class_id, shape in enumerate(list(SHAPES)[:num_classes]):
            folder = root / split / shape
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([seed, SPLITS[split], class_id, i])
                colour = object_colour(class_id, num_classes, rng)
                image, box = draw_toy_image(shape, colour, rng, image_size, object_scale)
                name = f"{split}/{shape}/{i:05d}.png"
                image.save(root / name)
                boxes[name] = box
    (root / BOXES_FILE).write_text(json.dumps(boxes, indent=0))
    return boxes


def load_boxes(root: str | Path) -> dict[str, list[int]]:
    """Ground-truth boxes of a toy dataset, keyed by ``"<split>/<class>/<file>"``."""
    return json.loads((Path(root) / BOXES_FILE).read_text())


def box_overlap(a: list[int], b: list[int]) -> float:
    """Intersection area over the area of ``b`` (how much of the object ``b`` lies inside the patch ``a``)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = max(1, (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / area
