"""The README's pictures, made from a training output folder.

    python -m scripts.readme_figures --output_dir ./laion400m_pretrain_output_trainer --images_dir docs/images

from the repository root.


Writes into --images_dir:
  demo_dataset.png         a sample of the demo shapes dataset (images and captions, as sd/data/demo_data.py draws them)
  samples_over_steps.png   the trainer's logged image grids (<output_dir>/images/step-N.png) at a few steps, top to
                           bottom
  loss_curve.png           training loss per logged step (trainer_state.json), raw and smoothed
  visualdl_scalars.png     VisualDL's scalar page for the run, in headless Chromium (needs `chromium`)
  visualdl_images.png      VisualDL's image page (reconstructions and samples)

The VisualDL helpers (serve_visualdl, visualdl_api, screenshot) are also what
tests/test_visualdl_browser.py uses.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from typing import Iterator, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--hide-scrollbars",
                  "--disable-dev-shm-usage", "--no-first-run"]


# ---------------------------------------------------------------------------------------------
# VisualDL in a browser
# ---------------------------------------------------------------------------------------------
def find_chromium() -> Optional[str]:
    """Path of Debian's ``chromium`` (``apt-get install -y chromium``), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_visualdl(logdir: str, port: Optional[int] = None, timeout: float = 90.0,
                   cwd: Optional[str] = None) -> Iterator[str]:
    """Run ``visualdl --logdir LOGDIR --host 127.0.0.1 --port PORT`` (in ``cwd``: run names are the
    event folders' paths as given); yield its base URL once its API answers; stop it (that process
    only) on exit."""
    port = port or free_port()
    exe = shutil.which("visualdl")
    cmd = [exe] if exe else [sys.executable, "-m", "visualdl"]
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd + ["--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"visualdl exited with "
                                   f"{proc.returncode}:\n{log.read().decode(errors='replace')[-2000:]}")
            try:
                visualdl_api(base, "runs")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"visualdl did not answer on {base} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def visualdl_api(base: str, path: str, **params):
    """``data`` of VisualDL's JSON API at ``/app/api/<path>`` (e.g. ``scalar/list`` with run and tag)."""
    url = f"{base}/app/api/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.loads(r.read())
    if body.get("status") != 0:
        raise RuntimeError(f"VisualDL API {url}: {body.get('msg')}")
    return body["data"]


def screenshot(url: str, out_png: str, width: int = 1400, height: int = 900, wait_ms: int = 15000,
               chromium: Optional[str] = None) -> str:
    """Load ``url`` in headless Chromium, let its scripts run for ``wait_ms`` of virtual time, save a PNG."""
    run_chromium([f"--window-size={width},{height}", f"--virtual-time-budget={wait_ms}",
                  f"--screenshot={os.path.abspath(out_png)}", url], chromium)
    if not os.path.isfile(out_png):
        raise RuntimeError(f"chromium wrote no {out_png}")
    return out_png


def run_chromium(args: List[str], chromium: Optional[str] = None, timeout: float = 90.0, attempts: int = 3) -> str:
    """Run headless Chromium (fresh profile) with ``args``; its stdout. A run that hangs (seen now and
    then on a loaded machine) is killed after ``timeout`` seconds and tried again, ``attempts`` in all."""
    chromium = chromium or find_chromium()
    if not chromium:
        raise FileNotFoundError("no chromium: apt-get install -y chromium")
    for attempt in range(1, attempts + 1):
        with tempfile.TemporaryDirectory() as profile:
            try:
                r = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                                   capture_output=True,
                                   text=True, timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                if attempt == attempts:
                    raise
    if r.returncode != 0:
        raise RuntimeError(f"chromium failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def dump_dom(url: str, wait_ms: int = 15000, chromium: Optional[str] = None) -> str:
    """The page's DOM after its scripts ran for ``wait_ms`` of virtual time (``chromium --dump-dom``)."""
    return run_chromium(["--window-size=1400,1000", f"--virtual-time-budget={wait_ms}", "--dump-dom", url], chromium)


def visualdl_screenshots(logdir: str, images_dir: str) -> List[str]:
    """Screenshots of VisualDL's scalar and image pages for ``logdir``."""
    logdir = os.path.abspath(logdir)  # served as its base name, so runs read "<output_dir>/runs/<date>_<host>"
    with serve_visualdl(os.path.basename(logdir), cwd=os.path.dirname(logdir)) as base:
        return [screenshot(f"{base}/app/scalar", os.path.join(images_dir, "visualdl_scalars.png"), height=900),
                screenshot(f"{base}/app/sample/image", os.path.join(images_dir, "visualdl_images.png"), height=1000)]


# ---------------------------------------------------------------------------------------------
# Pictures from files
# ---------------------------------------------------------------------------------------------
def demo_dataset_figure(out_png: str, num_images: int = 12, size: int = 64, seed: int = 0) -> str:
    """A grid of demo images with their captions (the same generator as the kit's demo data)."""
    from PIL import Image

    from sd.data.demo_data import write_demo_jsonl
    from sd.evaluation.sampling import make_grid

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_demo_jsonl(tmp, num_images=num_images, size=size, seed=seed)
        with open(jsonl, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        images, captions = [], []
        for rec in records:  # {"caption": ..., "image": "images/000000.png", ...}
            images.append(Image.open(os.path.join(tmp, rec["image"])).convert("RGB"))
            captions.append(rec["caption"])
    tiles = [caption_tile(im, cap, 160) for im, cap in zip(images, captions)]
    cols = 4
    return save(make_grid(tiles, rows=(len(tiles) + cols - 1) // cols, cols=cols), out_png)


def caption_tile(image, caption: str, width: int):
    """``image`` scaled to ``width`` with its caption (wrapped) below, on white."""
    from PIL import Image, ImageDraw

    im = image.resize((width, width), Image.NEAREST)
    lines, words = [], caption.split()
    draw = ImageDraw.Draw(im)
    while words:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}") < width - 6:
            line += " " + words.pop(0)
        lines.append(line)
    tile = Image.new("RGB", (width, width + 14 * len(lines) + 6), (255, 255, 255))
    tile.paste(im, (0, 0))
    d = ImageDraw.Draw(tile)
    for i, line in enumerate(lines):
        d.text((3, width + 3 + 14 * i), line, fill=(0, 0, 0))
    return tile


def logged_steps(output_dir: str) -> List[int]:
    """Steps with an image grid in ``<output_dir>/images`` (step-N.png, written by the trainer)."""
    return sorted(int(os.path.basename(p)[5:-4]) for p in glob.glob(os.path.join(output_dir, "images", "step-*.png")))


def samples_over_steps_figure(output_dir: str, out_png: str, max_rows: int = 4, scale: int = 2) -> str:
    """The trainer's image grids at up to ``max_rows`` evenly spaced logged steps, stacked, each headed
    "step N" (rows inside a grid: original, reconstruction, then a sample row per guidance scale)."""
    from PIL import Image, ImageDraw

    steps = logged_steps(output_dir)
    if not steps:
        raise FileNotFoundError(f"no {output_dir}/images/step-*.png: train with --image_logging_steps N (> 0)")
    n = min(max_rows, len(steps))
    picks = sorted({steps[round(i * (len(steps) - 1) / max(1, n - 1))] for i in range(n)})  # first and last included
    grids = [Image.open(os.path.join(output_dir, "images", f"step-{s:07d}.png")).convert("RGB") for s in picks]
    grids = [g.resize((g.width * scale, g.height * scale), Image.NEAREST) for g in grids]
    head = 18
    out = Image.new("RGB", (max(g.width for g in grids), sum(g.height + head for g in grids)), (255, 255, 255))
    y, draw = 0, ImageDraw.Draw(out)
    for s, g in zip(picks, grids):
        draw.text((4, y + 3), f"step {s}", fill=(0, 0, 0))
        out.paste(g, (0, y + head))
        y += g.height + head
    return save(out, out_png)


def read_losses(output_dir: str):
    """[(step, loss)] from ``trainer_state.json`` (the output folder's, else the newest checkpoint's)."""
    candidates = [os.path.join(output_dir, "trainer_state.json")]
    candidates += sorted(glob.glob(os.path.join(output_dir, "checkpoint-*", "trainer_state.json")),
                         key=lambda p: int(p.split("checkpoint-")[-1].split(os.sep)[0]), reverse=True)
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                history = json.load(f).get("log_history", [])
            points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
            if points:
                return points
    raise FileNotFoundError(f"no logged loss in {output_dir}/trainer_state.json (nor in its checkpoints)")


def loss_curve_figure(output_dir: str, out_png: str, width: int = 800, height: int = 420,
                      smoothing: float = 0.9) -> str:
    """Loss against step: raw points (light) and an exponential moving average (dark), drawn with PIL."""
    from PIL import Image, ImageDraw

    points = read_losses(output_dir)
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    smooth, acc = [], 0.0
    for i, v in enumerate(losses, 1):  # debiased EMA (as TensorBoard/VisualDL smoothing)
        acc = smoothing * acc + (1 - smoothing) * v
        smooth.append(acc / (1 - smoothing ** i))
    left, right, top, bottom = 70, 20, 30, 50
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1e-6
    x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def xy(s, v):
        return (left + (s - x0) / (x1 - x0) * (width - left - right),
                top + (hi - v) / (hi - lo) * (height - top - bottom))

    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    for i in range(5):  # horizontal grid lines and loss ticks
        v = lo + (hi - lo) * i / 4
        y = xy(x0, v)[1]
        d.line((left, y, width - right, y), fill=(225, 225, 225))
        d.text((4, y - 6), f"{v:.4f}", fill=(0, 0, 0))
    for i in range(5):  # step ticks
        s = x0 + (x1 - x0) * i / 4
        x = xy(s, lo)[0]
        d.text((x - 12, height - bottom + 6), f"{int(round(s))}", fill=(0, 0, 0))
    d.text((width // 2 - 15, height - 20), "step", fill=(0, 0, 0))
    d.text((left, 8), f"training loss ({len(points)} logged steps; dark: EMA {smoothing})", fill=(0, 0, 0))
    if len(points) > 1:
        d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(160, 180, 235), width=1)
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 40, 160), width=2)
    else:
        x, y = xy(steps[0], losses[0])
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 40, 160))
    return save(im, out_png)


def save(image, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, optimize=True)
    return path


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate the README's images from a training output folder.")
    p.add_argument("--output_dir", default="./laion400m_pretrain_output_trainer",
                   help="a training output folder (train.sh's OUTPUT_DIR), with images/ and runs/ (--report_to "
                        "visualdl)")
    p.add_argument("--images_dir", default="docs/images", help="where the PNGs go")
    p.add_argument("--skip_visualdl", action="store_true", help="no VisualDL screenshots (no chromium needed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.output_dir):
        print(f"error: --output_dir {args.output_dir} does not exist: train first (sh train.sh)", file=sys.stderr)
        return 2
    made = [demo_dataset_figure(os.path.join(args.images_dir, "demo_dataset.png")),
            samples_over_steps_figure(args.output_dir, os.path.join(args.images_dir, "samples_over_steps.png")),
            loss_curve_figure(args.output_dir, os.path.join(args.images_dir, "loss_curve.png"))]
    if not args.skip_visualdl:
        if not find_chromium():
            print("error: no chromium for the VisualDL screenshots: apt-get install -y chromium, or pass "
                  "--skip_visualdl",
                  file=sys.stderr)
            return 2
        made += visualdl_screenshots(args.output_dir, args.images_dir)
    for path in made:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
