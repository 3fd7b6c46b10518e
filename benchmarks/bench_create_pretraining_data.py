"""Packing throughput of create_pretraining_data.py in images/s: 1 worker vs. all workers, side by side.

Makes ``--num_images`` noisy 1024×768 JPEGs (quality 95, ~400 KB each, like a large COCO/LAION
photo) and a jsonl naming them, then runs the tool's ``main()`` on them for each setting, in
interleaved rounds (medians reported), so load from other processes hits every setting alike.
Reported per setting: images/s (wall clock of ``main()``: pool start-up and writing included,
interpreter start-up not) and CPU ms per image (the main process plus its workers). On a machine
shared with other jobs, images/s with all workers is bounded by the free cores; the CPU per image
shows what the tool itself costs: with k free cores expect about k × 1000 / (CPU ms per image).

    python -m benchmarks.bench_create_pretraining_data --num_images 96 --rounds 3 [--from_shards]   # from the root

``--from_shards`` adds the same images read from an img2dataset webdataset shard (one ``.tar``).

``--img2dataset_rss 1000 100000`` instead measures memory when converting img2dataset webdataset
shards: it writes that many tiny samples (16×16 JPEG, caption, metadata; 10 000 per ``.tar``, as
img2dataset does) with ``tarfile`` and converts each set in a fresh process (gzip parts, all workers),
reporting the peak RSS of the main process and of the largest worker: flat in the number of samples
when nothing is held per sample.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

import create_pretraining_data


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


def run_once(folder: str, n: int, workers: int, flags: tuple, source: str = "data.jsonl") -> tuple:
    """Pack once; returns (images/s, CPU ms per image)."""
    argv = ["--input_path", os.path.join(folder, source), "--output_path", os.path.join(folder, "out"),
            "--overwrite", "--num_workers", str(workers), *flags]
    quiet = io.StringIO()
    cpu, wall = cpu_seconds(), time.perf_counter()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        assert create_pretraining_data.main(argv) == 0, quiet.getvalue()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return n / wall, 1000 * cpu / n


def write_shards(folder: str, n: int, per_shard: int = 10000) -> None:
    """n img2dataset-like webdataset samples (16×16 JPEG, .txt, .json) in shards of per_shard, with stats."""
    rng = np.random.default_rng(0)
    os.makedirs(folder)
    jpegs = []
    for _ in range(64):  # a few distinct tiny images, reused
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
    for shard in range(-(-n // per_shard)):
        count = min(per_shard, n - shard * per_shard)
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"
                meta = {"key": key, "status": "success", "caption": f"sample {key}", "width": 16, "height": 16,
                        "original_width": 16, "original_height": 16, "pwatermark": float(rng.random())}
                for ext, data in (("jpg", jpegs[i % 64]), ("txt", meta["caption"].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with open(os.path.join(folder, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"count": count, "successes": count, "status_dict": {"success": count}}, f)


def shard_from_jsonl(folder: str) -> None:
    """``folder/shards/00000.tar`` (+ stats): the jsonl's images and captions as an img2dataset webdataset shard."""
    os.makedirs(os.path.join(folder, "shards"))
    with open(os.path.join(folder, "data.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with tarfile.open(os.path.join(folder, "shards", "00000.tar"), "w") as tar:
        for i, rec in enumerate(records):
            with open(os.path.join(folder, rec["image"]), "rb") as img:
                data = img.read()
            meta = {"key": f"{i:09d}", "status": "success", "caption": rec["caption"]}
            for ext, member in (("jpg", data), ("txt", rec["caption"].encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))
    with open(os.path.join(folder, "shards", "00000_stats.json"), "w") as f:
        json.dump({"count": len(records), "successes": len(records), "status_dict": {"success": len(records)}}, f)


RSS_RUN = """
import resource
import create_pretraining_data  # `python -c` has its working directory, the repository root, on sys.path
rc = create_pretraining_data.main({argv!r})
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("RSS", rc, me.ru_maxrss, kids.ru_maxrss)
"""


def rss_main(sizes) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print("| samples | shards | seconds | samples/s | peak RSS main MB | peak RSS largest worker MB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        with tempfile.TemporaryDirectory() as folder:
            write_shards(os.path.join(folder, "shards"), n)
            argv = ["--input_path", os.path.join(folder, "shards"), "--output_path", os.path.join(folder, "out"),
                    "--save_gzip_file", "--where", "pwatermark < 2"]
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", RSS_RUN.format(argv=argv)], capture_output=True, text=True,
                               timeout=3600, cwd=root)
            elapsed = time.perf_counter() - t
            line = [row for row in r.stdout.splitlines() if row.startswith("RSS")]
            assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-2000:]
            _, rc, main_kb, worker_kb = line[0].split()
            assert rc == "0" and f"records written:    {n} " in r.stdout, r.stdout[-2000:]
            print(f"| {n} | {-(-n // 10000)} | {elapsed:.1f} | {n / elapsed:.0f} | {int(main_kb) / 1024:.0f} | "
                  f"{int(worker_kb) / 1024:.0f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num_images", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--img2dataset_rss", type=int, nargs="+", default=None, metavar="N",
                   help="measure peak RSS converting N synthetic webdataset samples, for each N")
    p.add_argument("--from_shards", action="store_true",
                   help="also pack the same JPEGs from an img2dataset webdataset shard (one .tar) instead of the jsonl")
    args = p.parse_args()
    if args.img2dataset_rss:
        return rss_main(args.img2dataset_rss)
    cores = len(os.sched_getaffinity(0))
    sources = ["data.jsonl"] + (["shards"] if args.from_shards else [])
    settings = [(f"{w} worker{'s' * (w > 1)}", w, fmt, flags, source)
                for fmt, flags in (("plain", ()), (".gz", ("--save_gzip_file",)))
                for source in sources for w in sorted({1, cores})]
    with tempfile.TemporaryDirectory() as folder:
        kb = make_dataset(folder, args.num_images)
        if args.from_shards:
            shard_from_jsonl(folder)
        print(f"{args.num_images} JPEGs 1024x768 q95, mean {kb:.0f} KB; {cores} usable cores, load average "
              f"{os.getloadavg()[0]:.1f} before the runs; {args.rounds} interleaved rounds, medians")
        rates = {s: [] for s in settings}
        for _ in range(args.rounds):
            for s in settings:
                rates[s].append(run_once(folder, args.num_images, s[1], s[3], s[4]))
    print("| input | part files | workers | images/s | speed-up | CPU ms per image |")
    print("|---|---|---|---|---|---|")
    for fmt in ("plain", ".gz"):
        for source in sources:
            rows = [s for s in settings if s[2] == fmt and s[4] == source]
            one = statistics.median(r for r, _ in rates[rows[0]])
            for s in rows:
                rate, cpu = statistics.median(r for r, _ in rates[s]), statistics.median(c for _, c in rates[s])
                name = "jsonl + files" if source == "data.jsonl" else "webdataset .tar"
                print(f"| {name} | {fmt} | {s[0]} | {rate:.1f} | {rate / one:.2f}x | {cpu:.1f} |")


if __name__ == "__main__":
    main()
