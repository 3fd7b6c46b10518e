"""Synthetic captioned shapes: the demo dataset every machine can make offline, and its checker.

Each image holds one filled shape on a plain background; its caption is exactly
``a {colour} {shape} on a {background} background``. The vocabulary is fixed so that results compare
across versions. ``check`` reads colour, shape and background back from an image without any learned
model; ``eval.py --evaluate shapes`` uses it to score generated images.

CLI: ``python -m sd.demo_data --output_dir DIR --num_images N --size 64 --seed 0``
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


def check(image: Image.Image) -> Reading:
    """Read colour, shape and background from an image (deterministic, no learned model).

    * background: median brightness of the one-pixel border (white if above mid-grey);
    * foreground: pixels farther than 100 (RGB Euclidean) from the background colour;
    * colour: palette entry nearest to the foreground's median RGB;
    * shape: an upright triangle tapers (its top third is ~5× narrower than its bottom third);
      otherwise the fill ratio inside the (1st–99th percentile) bounding box tells a square (~1)
      from a circle (~π/4).
    Fields are ``"none"`` when there is no clear foreground (under 2 % of the image).
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = "white" if np.median(border.mean(axis=1)) > 127.5 else "black"
    dist = np.linalg.norm(arr - np.array(BACKGROUND_RGB[background], np.float32), axis=2)
    mask = dist > 100.0
    if mask.mean() < 0.02:
        return Reading("none", "none", background)
    fg = np.median(arr[mask], axis=0)
    colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE_RGB - fg, axis=1)))]
    # Re-threshold halfway between background and shape colour: the 50 % blend is the true edge,
    # which keeps blurred or reconstructed images close to their real extent.
    mask = dist > 0.5 * float(np.linalg.norm(fg - np.array(BACKGROUND_RGB[background], np.float32)))
    ys, xs = np.nonzero(mask)
    y_lo, y_hi = (int(v) for v in np.percentile(ys, [1, 99]))
    x_lo, x_hi = (int(v) for v in np.percentile(xs, [1, 99]))
    box = mask[y_lo : y_hi + 1, x_lo : x_hi + 1]
    fill = box.mean()
    widths = box.sum(axis=1)  # foreground pixels per row, top to bottom
    third = max(1, len(widths) // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1e-6)  # upright triangle ~0.2, others ~1
    shape = "triangle" if taper < 0.6 else "square" if fill > 0.89 else "circle"
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
