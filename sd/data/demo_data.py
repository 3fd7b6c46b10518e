"""Synthetic captioned shapes: the demo dataset every machine can make offline, and its checker.

Each image holds one filled shape on a plain background; its caption is exactly
``a {colour} {shape} on a {background} background``. The vocabulary is fixed so that results compare
across versions. ``check`` reads colour, shape and background back from an image without any learned
model; ``eval.py --evaluate shapes`` uses it to score generated images.

CLI: ``python -m sd.data.demo_data --output_dir DIR --num_images N --size 64 --seed 0``
writes ``DIR/demo.jsonl`` (coco_karpathy style, image paths relative to DIR) and ``DIR/images/``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black")

# RGB used to draw each colour; the checker classifies by the nearest of these.
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (240, 225, 30),
    "purple": (140, 40, 190),
    "orange": (250, 140, 20),
}
BACKGROUND_RGB = {"white": (255, 255, 255), "black": (0, 0, 0)}


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_prompts() -> List[Tuple[str, str, str, str]]:
    """The 36 ``(colour, shape, background, caption)`` tuples, colour-major, then shape, then background."""
    return [(c, s, b, caption_for(c, s, b)) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def render(colour: str, shape: str, background: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one filled ``shape`` of ``colour`` on ``background``; RGB, ``size`` × ``size``.

    The shape's extent ``s`` (diameter, side, or base = height of an upright triangle) is drawn from
    ``[size / 3, 0.6 * size]`` and its position so that it lies wholly inside the image.
    """
    if colour not in PALETTE or shape not in SHAPES or background not in BACKGROUND_RGB:
        raise ValueError(f"unknown demo label {(colour, shape, background)}")
    img = Image.new("RGB", (size, size), BACKGROUND_RGB[background])
    s = int(rng.integers(int(np.ceil(size / 3)), int(0.6 * size) + 1))
    x0 = int(rng.integers(0, size - s + 1))
    y0 = int(rng.integers(0, size - s + 1))
    box = (x0, y0, x0 + s - 1, y0 + s - 1)
    draw = ImageDraw.Draw(img)
    fill = PALETTE[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + (s - 1) / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    return img


@dataclass(frozen=True)
class Reading:
    """What ``check`` reads from an image; each field is a vocabulary word or ``"none"``."""

    colour: str
    shape: str
    background: str


_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)
_SHAPE_MIN_FRACTION = 0.02  # a foreground smaller than this share of the image reads as "none"


def _box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1)² window around each pixel (edges replicated)."""
    k = 2 * r + 1
    c = np.pad(x, r, mode="edge").cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask."""
    h, w = mask.shape
    label = np.zeros(mask.shape, np.int32)
    best, best_size, n = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if label[y0, x0]:
            continue
        n += 1
        label[y0, x0] = n
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for yy in (y - 1, y, y + 1):
                for xx in (x - 1, x, x + 1):
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not label[yy, xx]:
                        label[yy, xx] = n
                        stack.append((yy, xx))
        if size > best_size:
            best, best_size = n, size
    return label == best


def _templates(area: float, cx: float, cy: float, xs: np.ndarray, ys: np.ndarray) -> dict:
    """Pixel coverage (4×4 supersampled) of each shape with the given area and centroid.

    Coordinates are pixel centres (``xs``, ``ys``: 1-D, the window's columns and rows + 0.5).
    The triangle is upright with base = height = s, so its centroid sits 2/3 of the way down.
    """
    off = (np.arange(4) + 0.5) / 4 - 0.5
    x = (xs[:, None] + off[None, :]).reshape(-1)[None, :]  # (1, 4W)
    y = (ys[:, None] + off[None, :]).reshape(-1)[:, None]  # (4H, 1)
    r = np.sqrt(area / np.pi)
    half = np.sqrt(area) / 2
    s = np.sqrt(2 * area)
    top = cy - 2 * s / 3
    inside = {
        "circle": (x - cx) ** 2 + (y - cy) ** 2 <= r * r,
        "square": (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half),
        "triangle": (y >= top) & (y <= top + s) & (np.abs(x - cx) <= (y - top) / 2),
    }
    out = {}
    for name, m in inside.items():
        m = np.broadcast_to(m, (len(ys) * 4, len(xs) * 4)).astype(np.float32)
        out[name] = m.reshape(len(ys), 4, len(xs), 4).mean(axis=(1, 3))
    return out


_BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # Gaussian σ (pixels) tried on each template: blur is a nuisance


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with zeros outside (the window already has a margin)."""
    if sigma <= 0:
        return x

    def matrix(n: int) -> np.ndarray:
        i = np.arange(n)
        k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
        return k / np.exp(-0.5 * (np.arange(-n, n + 1) / sigma) ** 2).sum()

    return matrix(x.shape[0]) @ x @ matrix(x.shape[1])


def check(image: Image.Image) -> Reading:
    """Read colour, shape and background from an image (deterministic, no learned model).

    Built to score generated images (blurred, noisy, slightly off-colour), at any size:

    * background: the median colour of the one-pixel border; white if its brightness is above
      mid-grey, else black;
    * foreground: the largest connected region whose (3×3-smoothed) RGB distance from that
      background colour exceeds 100; ``"none"`` for colour and shape if it covers < 2 % of the image;
    * colour: the median of the region's core (its most distinct half), assigned to the palette
      colour whose segment *background → colour* passes nearest (so blends with the background,
      as at blurred edges, still read as their colour);
    * shape: each pixel's coverage ``α`` = how far it lies from the background towards that colour;
      the area ``Σα`` and the centroid give, for each candidate shape, the one template (circle,
      square, upright triangle) with that area and centroid; the template closest to ``α`` (L1)
      wins. Area and centroid survive blur, JPEG and noise, so the templates sit where the shape is.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg = np.median(border, axis=0)
    background = "white" if bg.mean() > 127.5 else "black"
    dist = np.linalg.norm(arr - bg, axis=2)
    mask = _box_mean(dist, 1) > 100.0
    if mask.mean() < _SHAPE_MIN_FRACTION:
        return Reading("none", "none", background)
    region = _largest_component(mask)
    if region.mean() < _SHAPE_MIN_FRACTION:
        return Reading("none", "none", background)
    d = dist[region]
    fg = np.median(arr[region][d >= np.median(d)], axis=0)
    seg = _PALETTE_RGB - bg  # (6, 3): background → palette colour
    t = np.clip(seg @ (fg - bg) / (seg * seg).sum(1), 0.0, 1.0)
    colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(bg + t[:, None] * seg - fg, axis=1)))]

    # Coverage α in a window around the region (margin for blur), zero-mean noise left unclipped.
    ys, xs = np.nonzero(region)
    m = max(4, int(round(0.08 * max(h, w))))
    y0, y1, x0, x1 = max(0, ys.min() - m), min(h, ys.max() + m + 1), max(0, xs.min() - m), min(w, xs.max() + m + 1)
    near = _box_mean(region.astype(np.float32), m)[y0:y1, x0:x1] > 0  # the region grown by m pixels
    v = fg - bg
    alpha = np.clip((arr[y0:y1, x0:x1] - bg) @ v / float(v @ v), -1.0, 2.0) * near
    area = float(alpha.sum())
    if area <= 1.0:
        return Reading(colour, "none", background)
    gy, gx = np.arange(y0, y1) + 0.5, np.arange(x0, x1) + 0.5
    cy = float((alpha.sum(1) * gy).sum() / area)
    cx = float((alpha.sum(0) * gx).sum() / area)
    errors = {name: min(float(np.abs(alpha - _blur(tpl, s)).sum()) for s in _BLURS)
              for name, tpl in _templates(area, cx, cy, gx, gy).items()}
    shape = min(SHAPES, key=lambda name: errors[name])
    return Reading(colour, shape, background)


def write_demo_jsonl(output_dir: str, num_images: int, size: int = 64, seed: int = 0, image_format: str = "png") -> str:
    """Write ``num_images`` demo images and ``output_dir/demo.jsonl``; returns the jsonl's path.

    Labels cycle through all 36 prompts in a seeded random order (balanced); the same arguments
    give byte-identical files.
    """
    from tqdm import tqdm

    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    jsonl = os.path.join(output_dir, "demo.jsonl")
    order: List[int] = []
    with open(jsonl, "w", encoding="utf-8") as f:
        for i in tqdm(range(num_images), desc="demo images", unit="img"):
            if not order:
                order = list(rng.permutation(len(prompts)))
            colour, shape, background, caption = prompts[order.pop()]
            name = f"images/{i:06d}.{image_format}"
            img = render(colour, shape, background, size, rng)
            if image_format == "png":
                img.save(os.path.join(output_dir, name), format="PNG", optimize=False)
            else:
                img.save(os.path.join(output_dir, name), format="JPEG", quality=95)
            record = {"caption": caption, "image": name, "image_id": f"demo_{i:06d}",
                      "colour": colour, "shape": shape, "background": background}
            f.write(json.dumps(record) + "\n")
    return jsonl


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="folder for demo.jsonl and images/")
    p.add_argument("--num_images", type=int, default=2000, help="number of images to write")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, help="fixes labels, sizes and positions")
    p.add_argument("--image_format", choices=["png", "jpg"], default="png")
    a = p.parse_args(argv)
    if a.size < 16 or a.num_images < 1:
        p.error("--size must be ≥ 16 and --num_images ≥ 1")
    print(write_demo_jsonl(a.output_dir, a.num_images, a.size, a.seed, a.image_format))


if __name__ == "__main__":
    main()
