"""Image bytes → the training crop: reduced-size JPEG decode, fast Lanczos of the crop window, RGB.

The geometry is PaddleMIX's: the shorter side is resized to ``R / 0.9`` (computed on the original
size), then an R×R window is cut, at random or in the centre. Two shortcuts make it fast, in uint8:

* a JPEG is decoded at the smallest reduced size (1/2, 1/4, 1/8: libjpeg's DCT scaling) that is still
  at least the resized size, by OpenCV straight into a numpy array (the same pixels as Pillow's
  ``draft``; ``decode_jpeg_reduced``);
* only the crop window is resampled, with a fast Lanczos-3 (``resample_window``;
  ``interpolation="lanczos_exact"`` gives Pillow's own).

``ImageCodec.check`` is the cheap half used when a resumed stream replays records: it reads the
header only and takes exactly the usable/skipped decision ``ImageCodec.decode`` takes, except for an
image whose header reads but whose pixel data is corrupt (only decoding finds that).
``benchmarks/bench_dataset.py`` measures the speed against the straightforward pipeline.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from sd.data.formats import BadRecord

# Resize filters. "lanczos" (default) is Lanczos-3 done fast (see ``resample_window``);
# "lanczos_exact" is Pillow's own Lanczos; the others are Pillow's filters of that name.
INTERPOLATIONS = {"lanczos": Image.LANCZOS, "lanczos_exact": Image.LANCZOS, "bicubic": Image.BICUBIC,
                  "bilinear": Image.BILINEAR, "box": Image.BOX, "nearest": Image.NEAREST}
FAST_LANCZOS_MAX_SCALE = 2.0  # above this many source pixels per output pixel, Pillow's Lanczos is used
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageCodec:
    """Image bytes → uint8 (3, R, R) crops, by PaddleMIX's geometry.

    Args:
        resolution: output side R.
        interpolation: resize filter, one of ``INTERPOLATIONS``: ``lanczos`` (default; PaddleMIX's
            filter, computed fast), ``lanczos_exact`` (Pillow's), bicubic, bilinear, box, nearest.
        center_crop: cut the centre window instead of a random one.
        allow_upscale: keep images smaller than R (upscaled); by default they are skipped, as in PaddleMIX.
    """

    resolution: int
    interpolation: str = "lanczos"
    center_crop: bool = False
    allow_upscale: bool = False

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def _open(self, data: bytes):
        """(PIL image with only its header read, original width, height); BadRecord when unusable."""
        try:
            im = Image.open(io.BytesIO(data))
        except DECODE_ERRORS as err:
            raise BadRecord("bad_image", f"{type(err).__name__}: {err}") from None
        w0, h0 = im.size  # original size: the geometry is defined on it
        if min(w0, h0) < self.resolution and not self.allow_upscale:
            raise BadRecord("too_small", f"{w0}×{h0} < {self.resolution}")
        return im, w0, h0

    def check(self, data: bytes) -> None:
        """Is this image usable? Reads the header only (no decode).

        Raises:
            BadRecord("bad_image"): the header does not read; BadRecord("too_small"): smaller than R
            (and not ``allow_upscale``).
        """
        self._open(data)

    def decode(self, data: bytes, rng: Optional[np.random.Generator]) -> np.ndarray:
        """Image bytes → uint8 (3, R, R): the window of the resized image drawn from ``rng``.

        ``rng`` draws the window's left, then top edge (unused, and may be None, with ``center_crop``).

        Raises:
            BadRecord("bad_image" | "too_small"), the decisions of ``check`` plus undecodable pixel data.
        """
        r = self.resolution
        im, w0, h0 = self._open(data)
        scale = r / 0.9 / min(w0, h0)  # PaddleMIX resizes the shorter side to resolution / 0.9
        try:
            wanted = (int(w0 * scale) + 1, int(h0 * scale) + 1)  # ≥ the resized size
            fast = decode_jpeg_reduced(data, im, wanted) if self.interpolation == "lanczos" else None
            if fast is not None:
                pixels, extent = fast  # BGR (h, w, 3)
            else:
                extent = (w0, h0)  # the original image in decoded-pixel units
                if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 size when that is still ≥ the resized size
                    drafted = im.draft("RGB", wanted)
                    if drafted is not None:
                        extent = drafted[1][2:]
                im.load()  # decode here, so that corrupt data is caught here
                pixels = to_rgb(im)
        except DECODE_ERRORS as err:
            raise BadRecord("bad_image", f"{type(err).__name__}: {err}") from None
        nw, nh = max(r, round(w0 * scale)), max(r, round(h0 * scale))
        if self.center_crop:
            x0, y0 = (nw - r) // 2, (nh - r) // 2
        else:
            x0, y0 = int(rng.integers(0, nw - r + 1)), int(rng.integers(0, nh - r + 1))
        sx, sy = extent[0] / nw, extent[1] / nh  # decoded pixels per resized pixel
        box = (x0 * sx, y0 * sy, (x0 + r) * sx, (y0 + r) * sy)
        window = resample_window(pixels, box, r, self.interpolation)  # (R, R, 3)
        if fast is not None:
            window = window[:, :, ::-1]  # OpenCV's BGR → RGB
        return window.transpose(2, 0, 1).copy()  # (3, R, R)


def resample_window(image, box, size: int, interpolation: str = "lanczos") -> np.ndarray:
    """Resample the window ``box`` of an image to ``size``×``size``: uint8 (size, size, 3).

    ``image`` is an RGB PIL image or a uint8 (H, W, 3) array (its channel order is kept). ``box =
    (left, top, right, bottom)`` is in pixel-edge coordinates, as for Pillow's ``resize(box=...)``:
    output pixel i has its centre at ``left + (i + 0.5) · (right - left) / size``. Pixels outside the
    box still feed the filter, so the result equals resize-whole-image-then-crop (up to rounding).

    ``lanczos`` (default) computes Lanczos-3 in two cheap steps with OpenCV's vectorised code: (1) a
    separable low-pass with the Lanczos-3 kernel stretched by the scale s (source pixels per output
    pixel; Pillow's kernel), sampled at the offset that puts the window's first output centre on
    the filtered grid; (2) bicubic interpolation at the exact output positions (``cv2.resize`` by
    1/s). Step 1 is the band limit Lanczos resampling applies; step 2 only interpolates within it,
    where bicubic and Lanczos agree closely. Against Pillow's Lanczos on the same pixels and window
    the mean absolute difference is 0.1-0.7 grey levels (of 255), the largest single one 13 on a
    COCO photo (tests/test_dataset.py bounds it on synthetic photos), most at scales near 1 on
    hard edges; at the image border the filter repeats the edge pixel where Pillow renormalises
    its kernel. Scales outside
    [1, FAST_LANCZOS_MAX_SCALE] (upscaling, or a large non-JPEG image that draft decoding could not
    reduce) use Pillow's Lanczos, as does ``lanczos_exact``; the other names are Pillow's filters.
    """
    sx, sy = (box[2] - box[0]) / size, (box[3] - box[1]) / size
    if interpolation != "lanczos" or not (1.0 <= min(sx, sy) and max(sx, sy) <= FAST_LANCZOS_MAX_SCALE):
        im = image if isinstance(image, Image.Image) else Image.fromarray(image)
        return np.asarray(im.resize((size, size), INTERPOLATIONS[interpolation], box=box), dtype=np.uint8)
    arr = np.asarray(image)  # (H, W, 3)
    kx, ax, (xa, xb), j0x = _window_axis(box[0], sx, size, arr.shape[1])
    ky, ay, (ya, yb), j0y = _window_axis(box[1], sy, size, arr.shape[0])
    # float32 from here: more precise, and OpenCV's uint8 → float32 filter is the faster one.
    filtered = cv2.sepFilter2D(arr[ya:yb, xa:xb], cv2.CV_32F, kx, ky, anchor=(ax, ay),
                               borderType=cv2.BORDER_REPLICATE)
    out = cv2.resize(filtered, None, fx=1.0 / sx, fy=1.0 / sy, interpolation=cv2.INTER_CUBIC)
    assert out.shape[0] >= j0y + size and out.shape[1] >= j0x + size, (out.shape, j0x, j0y)
    window = cv2.threshold(out[j0y:j0y + size, j0x:j0x + size], 0.0, 0.0, cv2.THRESH_TOZERO)[1]  # ringing < 0 → 0
    return cv2.convertScaleAbs(window)  # round to nearest, saturate at 255: uint8 (size, size, 3)


_CV2_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_jpeg_reduced(data: bytes, im: Image.Image, wanted):
    """A JPEG decoded by OpenCV with Pillow's draft reduction: (BGR uint8 (h, w, 3), extent), or None.

    Same reduced-size (DCT-domain) libjpeg-turbo decode as ``Image.draft(mode, wanted)`` — equal
    pixels, tested — but straight into a numpy array, saving Pillow's copy out of its image.
    ``extent`` is the original image in decoded pixels. Only for YCbCr/RGB and grayscale JPEGs
    that end with the EOI marker: OpenCV decodes a truncated JPEG without error (grey below the
    cut) where Pillow raises and the record counts as bad. None (Pillow decodes it) otherwise, or
    when OpenCV fails or disagrees on the size.
    """
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    if not (data.endswith(b"\xff\xd9") or data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9")):  # EOI: complete
        return None
    w0, h0 = im.size
    most = min(w0 // wanted[0], h0 // wanted[1])  # Pillow's draft rule: the largest of 8, 4, 2, 1 ≤ this
    k = next((k for k in (8, 4, 2, 1) if most >= k), 1)  # 1: no reduction (also when upscaling)
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_REDUCED[k] | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:
        return None
    if bgr is None or bgr.shape != (-(-h0 // k), -(-w0 // k), 3):
        return None
    return bgr, (w0 / k, h0 / k)


def _window_axis(start: float, s: float, size: int, length: int):
    """One axis of ``resample_window``'s fast path: (kernel, anchor, (a, b), j0).

    The source pixels [a, b) are low-passed into g, g[q] being the Lanczos-3 average (stretched
    by s) of the source around the point ``a + q + d``; ``cv2.resize`` by 1/s puts output j's centre
    at g coordinate ``(j + 0.5)·s - 0.5``. Output j0 + i must sit at the window's i-th centre
    ``start + (i + 0.5)·s - 0.5`` (pixel centres at integers): that holds with
    j0 = floor((start - a)/s) and d = start - a - j0·s, in [0, s).
    """
    support = 3.0 * s  # Lanczos-3 stretched by the scale (Pillow's support when downscaling)
    margin = int(np.ceil(support + s)) + 3  # the kernel's reach + the offset d (< s) + bicubic's taps
    a = max(0, int(np.floor(start)) - margin)
    b = min(length, int(np.ceil(start + size * s)) + margin)
    j0 = int(np.floor((start - a) / s))
    d = start - a - j0 * s
    taps = np.arange(int(np.floor(d - support)) + 1, int(np.ceil(d + support)))  # |t - d| < 3s; includes 0
    x = (taps - d) / s
    kernel = np.sinc(x) * np.sinc(x / 3.0)  # Lanczos-3: sinc(x)·sinc(x/3) for |x| < 3
    return (kernel / kernel.sum()).astype(np.float32), int(-taps[0]), (a, b), j0


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: 16-bit and float scaled to 8 bits, transparency composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr / peak * 255 + 0.5).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode in ("P", "PA") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im
