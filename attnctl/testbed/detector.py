"""Detector for shapes images: colour segmentation, connected components, a nearest-centroid shape classifier.

Each saturated pixel takes the palette colour of nearest hue (unsaturated pixels are background, so
pale or dark renderings of a colour still count as that colour); each 4-connected component of one
colour that is big enough is an object. Its shape comes from three scale-free features of its box, compared
with centroids measured on rendered data: fill ratio (square 1, circle pi/4, triangle 1/2), and how
full the top and bottom corner patches are (a square fills all four corners, an upward triangle only
the bottom ones, a circle none).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .data import BACKGROUND, COLORS, SHAPES, ShapeObject, generate

# Pixels less saturated than this (HSV saturation) or darker than MIN_VALUE are background.
MIN_SATURATION = 0.35
MIN_VALUE = 0.2
# Smaller components are noise: the smallest rendered object (a 9 px triangle) covers ~45 px.
MIN_AREA_FRACTION = 16 / (32 * 32)
DETECTOR_EVAL_SEED = 777_000_001


@dataclass(frozen=True)
class Detection:
    """A detected object; `box` is (x0, y0, x1, y1), x1/y1 exclusive; `area` in pixels."""

    color: str
    shape: str
    box: tuple[int, int, int, int]
    area: int


def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """Objects in an RGB image (PIL or H x W x 3 uint8), largest first."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    labels = _color_labels(pixels)
    min_area = max(4, int(round(MIN_AREA_FRACTION * labels.size)))
    names = list(COLORS)
    detections = []
    for ci, color in enumerate(names, start=1):
        for mask in _components(labels == ci):
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            crop = mask[box[1] : box[3], box[0] : box[2]]
            detections.append(Detection(color, classify_shape(crop), box, area))
    return sorted(detections, key=lambda d: -d.area)


def classify_shape(crop: np.ndarray) -> str:
    """Shape name of a boolean mask cropped to its box."""
    features = shape_features(crop)
    centroids = _centroids()
    return min(SHAPES, key=lambda s: float(np.sum((features - centroids[s]) ** 2)))


def shape_features(crop: np.ndarray) -> np.ndarray:
    """(fill ratio, top-corner fill, bottom-corner fill) of a cropped mask."""
    h, w = crop.shape
    ph, pw = max(1, h // 4), max(1, w // 4)
    top = (crop[:ph, :pw].mean() + crop[:ph, -pw:].mean()) / 2
    bottom = (crop[-ph:, :pw].mean() + crop[-ph:, -pw:].mean()) / 2
    return np.array([crop.mean(), top, bottom], dtype=np.float64)


def evaluate(seed: int = DETECTOR_EVAL_SEED, n: int = 500, iou: float = 0.5) -> dict[str, float]:
    """Accuracy on ground-truth renders (held-out combinations allowed; seed unused by training).

    `image_accuracy`: the detected (colour, shape) multiset equals the truth and every true box is
    matched with IoU >= `iou`. `object_accuracy`: fraction of true objects found with right colour,
    shape and box.
    """
    samples = generate(seed, n, allow_heldout=True)
    images_ok = objects_ok = n_objects = 0
    for sample in samples:
        found = detect(sample.image)
        matched = sum(_matched(obj, found, iou) for obj in sample.objects)
        same = Counter((d.color, d.shape) for d in found) == Counter(
            (o.color, o.shape) for o in sample.objects
        )
        images_ok += int(same and matched == len(sample.objects))
        objects_ok += matched
        n_objects += len(sample.objects)
    return {"image_accuracy": images_ok / n, "object_accuracy": objects_ok / n_objects, "n_images": n}


def box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes."""
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _matched(obj: ShapeObject, found: list[Detection], iou: float) -> bool:
    return any(
        d.color == obj.color and d.shape == obj.shape and box_iou(d.box, obj.box) >= iou for d in found
    )


def _color_labels(pixels: np.ndarray) -> np.ndarray:
    # 0 = background, i = i-th palette colour (nearest hue on the colour circle).
    hue, sat, val = _hsv(pixels)
    palette_hue = _hsv(np.array([list(COLORS.values())], dtype=np.float32))[0][0]
    diff = np.abs(hue[:, :, None] - palette_hue[None, None])
    labels = np.minimum(diff, 1 - diff).argmin(-1) + 1
    labels[(sat < MIN_SATURATION) | (val < MIN_VALUE)] = 0
    return labels


def _hsv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in [0, 1), saturation and value of RGB pixels in [0, 255]."""
    rgb = pixels / 255.0
    hi, lo = rgb.max(-1), rgb.min(-1)
    chroma = hi - lo
    safe = np.where(chroma > 0, chroma, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = (
        np.where(hi == r, ((g - b) / safe) % 6, np.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    )
    return np.where(chroma > 0, hue, 0.0), chroma / np.where(hi > 0, hi, 1.0), hi


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (flood fill; images here are tiny)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(comp)
    return out


@functools.cache
def _centroids() -> dict[str, np.ndarray]:
    """Mean features per shape over single-object renders at every size (fixed seed)."""
    feats: dict[str, list[np.ndarray]] = {s: [] for s in SHAPES}
    for sample in generate(DETECTOR_EVAL_SEED - 1, 300, n_objects=1, allow_heldout=True):
        obj = sample.objects[0]
        x0, y0, x1, y1 = obj.box
        mask = np.any(sample.image[y0:y1, x0:x1] != np.array(BACKGROUND, dtype=np.uint8), axis=-1)
        feats[obj.shape].append(shape_features(mask))
    return {s: np.mean(v, axis=0) for s, v in feats.items()}
