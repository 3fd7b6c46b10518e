"""Side-by-side speed of the streaming dataset, in one process (the work of one loader worker).

The pipelines run over the same ~1024×768 JPEGs (``--content coco``: jittered, upscaled crops of a
COCO photo, ~120 KiB; ``detailed``: synthetic photos with full detail, ~290 KiB), timed in
interleaved rounds so that load from other processes affects all alike; the table gives each
pipeline's median rate, then the ratios taken within each round (median over rounds):

* ``straightforward``: read line → base64 → full decode → Lanczos resize of the whole image (shorter
  side R/0.9) → random crop → ToTensor → Normalize, with ``paddle.vision.transforms`` (PaddleMIX's way);
* ``ours (<filter>)``: ``TextImagePairDataset`` (reduced-size JPEG decode, resample of the crop
  window only, uint8 per sample, cached tokenization) + ``collate_fn`` per batch of 8 (float
  [-1, 1], paddle tensors); ``lanczos`` is the default (fast Lanczos-3), ``lanczos_exact`` Pillow's;
* ``decode_only``: what any pipeline over these files must do at least: read the line from the
  part file, split its fields, base64-decode the image, read its header and decode it at the
  reduced size ``ours`` asks for (the same request) — nothing else. Timed with OpenCV's decoder
  (the one ``ours`` uses) and Pillow's ``draft``; the faster of the two is the reference.

``--slots G1 G2 ...`` compares instead the loader at several slot counts (samples per global batch: the
slots, ``TextImagePairDataset(num_slots=G)`` iterated in one process, as with 0 loader workers, a step's G samples
through ``collate_fn``) with ``straightforward``, on one part file holding all the images and on one file per
image, in interleaved rounds (straightforward, then each slot count, A B A B); ratios are taken within each round
(median over rounds). With fewer files than slots the slots split a file by record: ``per-slot reads`` is the same
loader with each slot reading its file itself (the read amplification the shared reading removes), for reference.

``--shards`` compares instead the two ways the same images reach the same ``TextImagePairDataset``
(default filter, batches of 8 through ``collate_fn``): ``part file`` (lines ``caption \t NONE \t
base64``, ``.gz`` with ``--gzip`` as PaddleMIX writes them) and ``tar shard`` (an img2dataset
webdataset ``.tar``: ``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``, listed in the ``.filelist`` itself), in
interleaved rounds; the ratio is taken within each round (median over rounds). ``--size`` sets the
images' size (img2dataset writes ``--image_size`` 256 by default).

``--per_core R1 R2 ...`` measures instead what one loader worker delivers, and from it the loader workers a GPU
needs: ``TextImagePairDataset`` (one slot, default filter, ``allow_upscale``) + ``collate_fn`` per batch, in one
process, over LAION-like JPEGs (``--content detailed``, sizes spread evenly from half of ``--size`` to ``--size``,
quality 90) in one part file (``--gzip``: ``.gz``), read locally and over HTTP from a loopback server in another process
(``benchmarks/range_server.py``, range requests as ``sd/data/remote.py`` makes them), each resolution and source in
turn, interleaved rounds. Reported: wall samples/s and samples per CPU-second of this process (``time.process_time``:
all its threads, fsspec's included; robust to other processes' load, wall is not); workers per GPU =
ceil(needed rate × headroom / samples per CPU-second), the needed rates per GPU from ``--needed``.

    python -m benchmarks.bench_dataset --resolution 256 --num_images 48 --rounds 7 [--content detailed]  # from the root
    python -m benchmarks.bench_dataset --per_core 256 512 --content detailed --num_images 64 --rounds 2
    python -m benchmarks.bench_dataset --shards [--gzip] --size 1024 768 --resolution 256 --rounds 9
    python -m benchmarks.bench_dataset --slots 1 2 8 16 --num_images 24 --resolution 256 --rounds 7
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import statistics
import tarfile
import tempfile
import time

import cv2
import numpy as np
from PIL import Image

from sd.data.formats import (
    decode_image_b64,
    decode_line_bytes,
    encode_part_line,
    iter_part_file,
    parse_part_line,
    parse_part_line_bytes,
    write_filelists,
)
from sd.text_image_pair_dataset import INTERPOLATIONS, TextImagePairDataset, collate_fn, load_tokenizer

COCO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "paddlemix",
                    "coco_data", "val2014", "COCO_val2014_000000522418.jpg")


def interleaved_rates(runs: dict, rounds: int) -> tuple[dict, dict]:
    """Each run once to warm up (caches, connections, shuffle buffers), then ``rounds`` rounds of every run back to
    back (A B A B), so that other processes' load falls on all alike. A run returns how many samples it made.
    Returns samples per wall second and per CPU-second of this process, by key, one entry per round."""
    for run in runs.values():
        run()
    wall, cpu = {key: [] for key in runs}, {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            t, c = time.perf_counter(), time.process_time()
            n = run()
            wall[key].append(n / (time.perf_counter() - t))
            cpu[key].append(n / max(time.process_time() - c, 1e-9))
    return wall, cpu


def drain(samples, n: int, batch_size: int):
    """A run that takes ``n`` samples from the iterator ``samples`` through ``collate_fn`` in batches."""
    def run():
        done = 0
        while done < n:
            collate_fn([next(samples) for _ in range(min(batch_size, n - done))])
            done += batch_size
        return n
    return run


def photo_like_jpegs(n: int, size=(1024, 768), seed: int = 0) -> list:
    """n JPEGs (quality 90) of photo-like content: jittered crops of a COCO photo when available."""
    rng = np.random.default_rng(seed)
    if os.path.exists(COCO):
        src = Image.open(COCO).convert("RGB")
    else:  # smooth gradients and blobs
        yy, xx = np.mgrid[0:480, 0:640] / 640.0
        src = Image.fromarray((np.stack([np.sin(7 * xx + 3 * yy), np.cos(5 * yy), np.sin(9 * xx * yy)], -1) * 120
                               + 128).astype(np.uint8))
    out = []
    for _ in range(n):
        w, h = src.size
        f = rng.uniform(0.6, 1.0)
        x0, y0 = rng.uniform(0, w * (1 - f)), rng.uniform(0, h * (1 - f))
        im = src.resize(size, Image.BICUBIC, box=(x0, y0, x0 + w * f, y0 + h * f))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, np.float32) * rng.uniform(0.8, 1.2, 3) + rng.normal(0, 3, (size[1], size[0], 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def detailed_jpegs(n: int, size=(1024, 768), seed: int = 0) -> list:
    """n JPEGs (quality 90) with a photo's full detail at their own resolution: 1/f amplitude spectrum
    with a lens-like soft cut-off, in colour (the COCO crops above are upscaled, hence softer and
    quicker to decode)."""
    rng = np.random.default_rng(seed)
    w, h = size
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    amplitude = np.exp(-(f / 0.3) ** 2) / np.maximum(f, 1.0 / max(w, h))
    out = []
    for _ in range(n):
        base, tint = (np.fft.irfft2(amplitude * np.exp(2j * np.pi * rng.random(amplitude.shape)), s=(h, w))
                      for _ in range(2))
        img = np.stack([base + 0.3 * tint, base, base - 0.3 * tint], -1)
        img = (img - img.mean()) / img.std() * 45 + 120
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_tar_shard(path: str, captions: list, jpegs: list) -> None:
    """An img2dataset-like webdataset shard: KEY.jpg, KEY.txt, KEY.json per sample."""
    with tarfile.open(path, "w") as tar:
        for i, (caption, data) in enumerate(zip(captions, jpegs)):
            w, h = Image.open(io.BytesIO(data)).size
            meta = {"key": f"{i:09d}", "status": "success", "caption": caption, "width": w, "height": h,
                    "original_width": w, "original_height": h}
            for ext, member in (("jpg", data), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(member)
                tar.addfile(info, io.BytesIO(member))


def shards_main(a) -> None:
    """Part file vs tar shard of the same images, one process, interleaved rounds."""
    import gzip

    import paddle

    paddle.set_device("cpu")
    data_dir = a.data_dir or tempfile.mkdtemp(prefix="bench-shards-")
    os.makedirs(data_dir, exist_ok=True)
    size = tuple(a.size)
    jpegs = photo_like_jpegs(a.num_images, size) if a.content == "coco" else detailed_jpegs(a.num_images, size)
    captions = [f"a photo number {i % 7}" for i in range(len(jpegs))]
    part = os.path.join(data_dir, "part-000000" + (".gz" if a.gzip else ""))
    with (gzip.open(part, "wt", compresslevel=9, encoding="utf-8") if a.gzip
          else open(part, "w", encoding="utf-8")) as f:
        for caption, data in zip(captions, jpegs):
            f.write(encode_part_line(caption, data))
    shard = os.path.join(data_dir, "00000.tar")
    write_tar_shard(shard, captions, jpegs)
    lists = {"part file": write_filelists(data_dir, "parts", [part])[1],
             "tar shard": write_filelists(data_dir, "shards", [shard])[1]}
    print(f"{len(jpegs)} {a.content} JPEGs {size[0]}×{size[1]}, "
          f"mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB; "
          f"part file {'gzip' if a.gzip else 'plain'} {os.path.getsize(part) / 2 ** 20:.1f} MiB, tar "
          f"{os.path.getsize(shard) / 2 ** 20:.1f} MiB; resolution {a.resolution}, batch {a.batch_size}, "
          f"{a.rounds} rounds; load average {os.getloadavg()[0]:.1f}")
    tokenizer = load_tokenizer(None)
    streams = {name: itertools.chain.from_iterable(  # the samples of one slot
        TextImagePairDataset(fl, tokenizer, a.resolution, shuffle_buffer=16, allow_upscale=True))
               for name, fl in lists.items()}
    rates, _ = interleaved_rates({name: drain(it, len(jpegs), a.batch_size) for name, it in streams.items()},
                                 a.rounds)
    print("| source | samples/s (median of rounds) |")
    print("|---|---:|")
    for name, rs in rates.items():
        print(f"| {name} | {statistics.median(rs):.1f} |")
    ratio = statistics.median(t / p for t, p in zip(rates["tar shard"], rates["part file"]))
    print(f"tar shard / part file: per-round median {ratio:.2f}× "
          f"(min {min(t / p for t, p in zip(rates['tar shard'], rates['part file'])):.2f}, "
          f"max {max(t / p for t, p in zip(rates['tar shard'], rates['part file'])):.2f})")


def slots_main(a) -> None:
    """The loader at several slot counts vs straightforward, on one file and on many, interleaved rounds."""
    import gzip

    import paddle
    from paddle.vision import transforms

    paddle.set_device("cpu")
    cv2.setNumThreads(1)
    r = a.resolution
    data_dir = a.data_dir or tempfile.mkdtemp(prefix="bench-slots-")
    os.makedirs(data_dir, exist_ok=True)
    jpegs = photo_like_jpegs(a.num_images) if a.content == "coco" else detailed_jpegs(a.num_images)
    lines = [encode_part_line(f"a photo number {i % 7}", data) for i, data in enumerate(jpegs)]
    layouts = {}  # name → (file list, part files)
    for name, groups in (("one file", [lines]), (f"{len(lines)} files", [[line] for line in lines])):
        parts = []
        for f, group in enumerate(groups):
            parts.append(os.path.join(data_dir, f"{name.replace(' ', '-')}-part-{f:06d}" + (".gz" if a.gzip else "")))
            with (gzip.open(parts[-1], "wt", encoding="utf-8") if a.gzip
                  else open(parts[-1], "w", encoding="utf-8")) as out:
                out.writelines(group)
        layouts[name] = (write_filelists(data_dir, name.replace(" ", "-"), parts)[1], parts)
    print(f"{len(jpegs)} {a.content} JPEGs 1024×768, mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB, "
          f"resolution {r}, slots {a.slots}, shuffle buffer {a.shuffle_buffer}, {a.rounds} rounds, 0 loader workers, "
          f"part files {'gzip' if a.gzip else 'plain'}; "
          f"load average {os.getloadavg()[0]:.1f}; data in {data_dir}")
    baseline_tf = transforms.Compose([transforms.Resize(int(r / 0.9), interpolation="lanczos"),
                                      transforms.RandomCrop(r), transforms.ToTensor(),
                                      transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def straightforward(parts):
        def run():
            for path in parts:
                for raw in iter_part_file(path):
                    _, b64 = parse_part_line(decode_line_bytes(raw))
                    baseline_tf(Image.open(io.BytesIO(decode_image_b64(b64))).convert("RGB"))
            return len(jpegs)
        return run

    tokenizer = load_tokenizer(None)

    def ours(file_list, slots, shared):
        ds = TextImagePairDataset(file_list, tokenizer, r, num_slots=slots, shuffle_buffer=a.shuffle_buffer)
        if shared:
            steps = iter(ds)
        else:  # each slot reads its files itself
            steps = zip(*[ds._slot_samples(j) for j in range(slots)])

        def run():
            n = 0
            while n < len(jpegs):
                collate_fn(list(next(steps)))
                n += slots
            return n
        return run

    pipelines = {}  # (layout, name) → run
    for layout, (file_list, parts) in layouts.items():
        pipelines[layout, "straightforward"] = straightforward(parts)
        for g in a.slots:
            pipelines[layout, f"ours, {g} slots"] = ours(file_list, g, True)
            if len(parts) < g and g > 1:
                pipelines[layout, f"per-slot reads, {g} slots"] = ours(file_list, g, False)
    rates, _ = interleaved_rates(pipelines, a.rounds)
    print(f"| data | pipeline | samples/s (median of {a.rounds} rounds) | × straightforward (per-round median, "
          "min–max) |")
    print("|---|---|---:|---:|")
    for (layout, name), rs in rates.items():
        base = rates[layout, "straightforward"]
        x = [o / b for o, b in zip(rs, base)]
        print(f"| {layout} | {name} | {statistics.median(rs):.1f} | {statistics.median(x):.2f} "
              f"({min(x):.2f}–{max(x):.2f}) |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


# Images per second one GPU consumes (docs/performance.md, "SD v1 at full size": the estimate for a faithful step;
# at 256 px MosaicML's published 8×A100 rate with precomputed latents, ≈ 1 100 / 8 = 138, lies below it).
NEEDED_PER_GPU = {256: 150.0, 512: 35.0}


def laion_like_jpegs(n: int, largest=(1024, 768), content: str = "detailed") -> list:
    """n JPEGs (quality 90) whose sizes step evenly from half of ``largest`` to ``largest`` (5 sizes, cycled)."""
    sizes = [(int(largest[0] * f) // 8 * 8, int(largest[1] * f) // 8 * 8) for f in (0.5, 0.625, 0.75, 0.875, 1.0)]
    counts = [len(range(k, n, len(sizes))) for k in range(len(sizes))]
    make = detailed_jpegs if content == "detailed" else photo_like_jpegs
    groups = [make(c, size, seed=k) for k, (c, size) in enumerate(zip(counts, sizes))]
    return [groups[i % len(sizes)][i // len(sizes)] for i in range(n)]


def machine_name() -> str:
    """The CPU's model name from /proc/cpuinfo and the usable cores."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} usable cores"


def workers_per_gpu(needed: float, per_cpu_second: float, headroom: float) -> int:
    """Loader worker processes (one core each) that deliver ``needed`` samples/s with ``headroom`` to spare."""
    return math.ceil(needed * headroom / per_cpu_second)


def per_core_main(a) -> None:
    """One loader worker's samples per second and per CPU-second, local and over loopback HTTP, interleaved."""
    import gzip
    import subprocess
    import sys

    import paddle

    paddle.set_device("cpu")
    needed = dict(NEEDED_PER_GPU)
    for item in a.needed or []:
        r, _, rate = item.partition("=")
        try:
            needed[int(r)] = float(rate)
        except ValueError:
            raise ValueError(f"--needed {item!r}: give RESOLUTION=IMAGES_PER_S, e.g. 256=150") from None
    data_dir = a.data_dir or tempfile.mkdtemp(prefix="bench-per-core-")
    os.makedirs(data_dir, exist_ok=True)
    jpegs = laion_like_jpegs(a.num_images, tuple(a.size), a.content)
    part = os.path.join(data_dir, "part-000000" + (".gz" if a.gzip else ""))
    with (gzip.open(part, "wt", compresslevel=9, encoding="utf-8") if a.gzip
          else open(part, "w", encoding="utf-8")) as f:
        for i, data in enumerate(jpegs):
            f.write(encode_part_line(f"a photo number {i % 7}", data))
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.range_server", data_dir], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        port = int(server.stdout.readline().split()[1])
        lists = {"local": write_filelists(data_dir, "local", [part])[1],
                 "HTTP (loopback)": write_filelists(data_dir, "http",
                                                    [f"http://127.0.0.1:{port}/{os.path.basename(part)}"])[1]}
        sizes = sorted({Image.open(io.BytesIO(j)).size for j in jpegs})
        print(f"machine: {machine_name()}; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"load average (1 min) {os.getloadavg()[0]:.1f}")
        print(f"{len(jpegs)} {a.content} JPEGs, quality 90, sizes {', '.join(f'{w}×{h}' for w, h in sizes)}, "
              f"mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB, one {'gzip' if a.gzip else 'plain'} part file "
              f"({os.path.getsize(part) / 2 ** 20:.1f} MiB); batch {a.batch_size}, {a.rounds} rounds; "
              f"headroom {a.headroom}; data in {data_dir}")
        tokenizer = load_tokenizer(None)
        configs = [(r, source) for r in a.per_core for source in lists]
        streams = {(r, source): itertools.chain.from_iterable(  # the samples of one slot: one worker's
            TextImagePairDataset(lists[source], tokenizer, r, shuffle_buffer=16, allow_upscale=True))
            for r, source in configs}
        wall, cpu = interleaved_rates({config: drain(streams[config], len(jpegs), a.batch_size)
                                       for config in configs}, a.rounds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"| resolution | source | samples/s, wall (median of {a.rounds} rounds) | samples per CPU-s (median) | "
          "needed per GPU | workers per GPU |")
    print("|---:|---|---:|---:|---:|---:|")
    for r, source in configs:
        per_cpu = statistics.median(cpu[r, source])
        need = needed.get(r)
        workers = workers_per_gpu(need, per_cpu, a.headroom) if need else None
        print(f"| {r} | {source} | {statistics.median(wall[r, source]):.1f} | {per_cpu:.1f} | "
              f"{f'{need:g}' if need else '—'} | {workers if workers else '—'} |")
    print(f"workers per GPU = ceil(needed × {a.headroom} / samples per CPU-s); "
          f"load average after (1 min) {os.getloadavg()[0]:.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--num_images", type=int, default=48, help="distinct JPEGs; each round processes each once")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), nargs="+",
                   default=["lanczos", "lanczos_exact", "bilinear"],
                   help="filters to time for 'ours' (each is one more pipeline)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--content", choices=["coco", "detailed"], default="coco",
                   help="coco: jittered, upscaled crops of a COCO photo (softer); "
                        "detailed: synthetic full-detail photos")
    p.add_argument("--data_dir", default=None, help="where to write the part file (default: a temp folder)")
    p.add_argument("--shards", action="store_true", help="part file vs img2dataset tar shard of the same images")
    p.add_argument("--gzip", action="store_true",
                   help="--shards, --slots, --per_core: gzip the part files (PaddleMIX's --save_gzip_file)")
    p.add_argument("--size", type=int, nargs=2, default=[1024, 768], metavar=("W", "H"), help="image size")
    p.add_argument("--slots", type=int, nargs="+", default=None,
                   help="compare the loader at these slot counts with straightforward, one file and many")
    p.add_argument("--shuffle_buffer", type=int, default=16, help="--slots: each slot's shuffle buffer (training: 64)")
    p.add_argument("--per_core", type=int, nargs="+", default=None, metavar="R",
                   help="one loader worker's samples/s and samples per CPU-second at these resolutions, local and "
                        "over loopback HTTP, and the workers per GPU they imply")
    p.add_argument("--needed", nargs="+", default=None, metavar="R=RATE",
                   help="--per_core: images/s one GPU consumes at resolution R (default: "
                        + ", ".join(f"{r}={v:g}" for r, v in NEEDED_PER_GPU.items()) + ")")
    p.add_argument("--headroom", type=float, default=2.0,
                   help="--per_core: the loader's rate over the GPU's: a GPU host's cores also run the trainer, "
                        "LAION's images are larger than these, and loopback has no network latency")
    a = p.parse_args(argv)
    if a.per_core:
        return per_core_main(a)
    if a.shards:
        return shards_main(a)
    if a.slots:
        return slots_main(a)
    import paddle
    from paddle.vision import transforms

    paddle.set_device("cpu")
    cv2.setNumThreads(1)  # one core, as in a loader worker (the dataset sets this too when iterated)
    REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}
    r = a.resolution
    data_dir = a.data_dir or tempfile.mkdtemp(prefix="bench-dataset-")
    os.makedirs(data_dir, exist_ok=True)
    jpegs = photo_like_jpegs(a.num_images) if a.content == "coco" else detailed_jpegs(a.num_images)
    part = os.path.join(data_dir, "part-000000")
    with open(part, "w", encoding="utf-8") as f:
        for i, data in enumerate(jpegs):
            f.write(encode_part_line(f"a photo number {i % 7}", data))
    file_list = write_filelists(data_dir, "bench", [part])[1]
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs]
    print(f"{len(jpegs)} {a.content} JPEGs {sizes[0][0]}×{sizes[0][1]}, "
          f"mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB, "
          f"resolution {r}, batch {a.batch_size}, {a.rounds} rounds; data in {data_dir}")

    baseline_tf = transforms.Compose([transforms.Resize(int(r / 0.9), interpolation="lanczos"),
                                      transforms.RandomCrop(r), transforms.ToTensor(),
                                      transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def straightforward():
        for raw in iter_part_file(part):
            _, b64 = parse_part_line(decode_line_bytes(raw))
            baseline_tf(Image.open(io.BytesIO(decode_image_b64(b64))).convert("RGB"))
        return len(jpegs)

    tokenizer = load_tokenizer(None)
    streams = {}
    for interp in a.interpolation:
        ds = TextImagePairDataset(file_list, tokenizer, r, interpolation=interp, shuffle_buffer=16)
        streams[interp] = itertools.chain.from_iterable(ds)  # the samples of one slot

    short = r / 0.9

    def decode_only(decoder):
        def run():
            for raw in iter_part_file(part):
                data = decode_image_b64(parse_part_line_bytes(raw)[1])
                im = Image.open(io.BytesIO(data))  # the header: size and format, as ours reads it
                scale = short / min(im.size)
                wanted = (int(im.width * scale) + 1, int(im.height * scale) + 1)  # the request ours makes
                if decoder == "pillow":
                    im.draft("RGB", wanted)
                    im.load()
                else:
                    k = next((k for k in (8, 4, 2, 1) if min(im.width // wanted[0], im.height // wanted[1]) >= k), 1)
                    cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[k] | cv2.IMREAD_IGNORE_ORIENTATION)
            return len(jpegs)
        return run

    pipelines = {"straightforward": straightforward,
                 **{f"ours ({i})": drain(streams[i], len(jpegs), a.batch_size) for i in a.interpolation},
                 "decode_only (OpenCV)": decode_only("opencv"), "decode_only (Pillow draft)": decode_only("pillow")}
    rates, _ = interleaved_rates(pipelines, a.rounds)
    # decode_only: the faster of the two reduced-size decoders (by median rate), the stricter bar.
    rates["decode_only"] = max(rates["decode_only (OpenCV)"], rates["decode_only (Pillow draft)"],
                               key=statistics.median)
    base, ceiling = statistics.median(rates["straightforward"]), statistics.median(rates["decode_only"])
    print(f"| pipeline | samples/s (median of {a.rounds} rounds) | × straightforward | % of decode_only |")
    print("|---|---:|---:|---:|")
    for name, rs in rates.items():
        m = statistics.median(rs)
        print(f"| {name} | {m:.1f} | {m / base:.2f} | {100 * m / ceiling:.0f} % |")
    # The same ratios taken within each round (all pipelines run back to back), then their median:
    # robust to load from other processes that changes between rounds.
    for name in rates:
        if name.startswith("ours"):
            x = statistics.median(o / b for o, b in zip(rates[name], rates["straightforward"]))
            c = statistics.median(o / d for o, d in zip(rates[name], rates["decode_only"]))
            print(f"{name}: per-round median {x:.2f}× straightforward, {100 * c:.0f} % of decode_only")

if __name__ == "__main__":
    main()
