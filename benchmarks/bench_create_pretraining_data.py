"""Packing throughput of create_pretraining_data.py in images/s: 1 worker vs. all workers, side by side.

Makes ``--num_images`` noisy 1024×768 JPEGs (quality 95, ~400 KB each, like a large COCO/LAION
photo) and a jsonl naming them, then runs the tool's ``main()`` on them for each setting, in
interleaved rounds (medians reported), so load from other processes hits every setting alike.
Reported per setting: images/s (wall clock of ``main()``: pool start-up and writing included,
interpreter start-up not) and CPU ms per image (the main process plus its workers). On a machine
shared with other jobs, images/s with all workers is bounded by the free cores; the CPU per image
shows what the tool itself costs: with k free cores expect about k × 1000 / (CPU ms per image).

    python benchmarks/bench_create_pretraining_data.py --num_images 96 --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import create_pretraining_data  # noqa: E402


def noisy_jpeg(rng: np.random.Generator, size=(1024, 768), sigma: float = 10.0) -> bytes:
    """A smooth colour pattern plus Gaussian noise (σ=10): ~400 KB at quality 95."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / w
    phase = rng.uniform(0, 6.3, 3)
    base = np.stack([np.sin(7 * xx + 3 * yy + phase[0]), np.cos(5 * yy + phase[1]), np.sin(9 * xx * yy + phase[2])], -1)
    arr = base * 100 + 128 + rng.normal(0, sigma, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_dataset(folder: str, n: int) -> float:
    """Write n JPEGs and data.jsonl into folder; returns the mean JPEG size in KB."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"))
    sizes = []
    with open(os.path.join(folder, "data.jsonl"), "w") as f:
        for i in range(n):
            data = noisy_jpeg(rng)
            with open(os.path.join(folder, "images", f"{i:05d}.jpg"), "wb") as img:
                img.write(data)
            sizes.append(len(data))
            f.write(json.dumps({"caption": f"noisy picture {i}", "image": f"images/{i:05d}.jpg"}) + "\n")
    return statistics.mean(sizes) / 1000


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(folder: str, n: int, workers: int, flags: tuple) -> tuple:
    """Pack once; returns (images/s, CPU ms per image)."""
    argv = ["--input_path", os.path.join(folder, "data.jsonl"), "--output_path", os.path.join(folder, "out"),
            "--overwrite", "--num_workers", str(workers), *flags]
    quiet = io.StringIO()
    cpu, wall = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        assert create_pretraining_data.main(argv) == 0, quiet.getvalue()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return n / wall, 1000 * cpu / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [(f"{w} worker{'s' * (w > 1)}", w, fmt, flags)
                for fmt, flags in (("plain", ()), (".gz", ("--save_gzip_file",)))
                for w in sorted({1, cores})]
    with tempfile.TemporaryDirectory() as folder:
        kb = make_dataset(folder, args.num_images)
        print(f"{args.num_images} JPEGs 1024x768 q95, mean {kb:.0f} KB; {cores} usable cores, load average "
              f"{os.getloadavg()[0]:.1f} before the runs; {args.rounds} interleaved rounds, medians")
        rates = {s: [] for s in settings}
        for _ in range(args.rounds):
            for s in settings:
                rates[s].append(run_once(folder, args.num_images, s[1], s[3]))
    print("| part files | workers | images/s | speed-up | CPU ms per image |")
    print("|---|---|---|---|---|")
    for fmt in ("plain", ".gz"):
        rows = [s for s in settings if s[2] == fmt]
        one = statistics.median(r for r, _ in rates[rows[0]])
        for s in rows:
            rate, cpu = statistics.median(r for r, _ in rates[s]), statistics.median(c for _, c in rates[s])
            print(f"| {fmt} | {s[0]} | {rate:.1f} | {rate / one:.2f}x | {cpu:.1f} |")


if __name__ == "__main__":
    main()
