"""Streaming text–image pairs from part files: sharded, infinite, deterministic, resumable.

Stream rules (see docs/ARCHITECTURE.md for the contract with the trainer):

* **Shards.** With R ranks and W loader workers there are S = R·max(W, 1) shards, shard
  ``rank·max(W,1) + worker``. A file list with at least S part-file entries is split by file (each
  pass, all shards shuffle its entries the same way, then shard k reads entries k, k+S, ...); one with
  fewer is split by record (every shard reads every file and keeps records k, k+S, ...), which is
  said once in the log. Either way the shards are disjoint and together complete, and no worker ever
  waits for data that is not there (PaddleMIX's loader hangs then).
* **Draws.** A shard's stream is a sequence of draws: pick a file list (by weight, or uniformly),
  take its next record (passes repeat forever, reshuffled). Draw ``i`` of a shard uses randomness
  derived from ``(seed, rank, worker, i)`` only, so the stream is a function of those.
* **Position.** Each sample carries its shard's position (draws made so far). Resuming with those
  positions replays the draws by reading lines without decoding any image.
* **Bad data** (undecodable text, base64 or image, too few fields, missing or truncated files) is
  skipped and counted by reason; every ``report_every`` skips a summary is logged; a
  ``max_bad_fraction`` can turn too much bad data into an error; a full pass over every file list
  without one usable sample is an error, never an endless loop.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import os
import time
from typing import Dict, Iterator, List, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from sd.data_format import (LINE_FORMATS, BadRecord, decode_image_b64, decode_line_bytes, iter_part_file,
                            parse_part_line, read_filelist, read_filelist_list)

try:  # paddle is needed only for the IterableDataset base and collate; the stream itself is numpy.
    import paddle
    from paddle.io import IterableDataset, get_worker_info
except ImportError:  # pragma: no cover - paddle is in requirements.txt
    paddle, IterableDataset = None, object

logger = logging.getLogger("sd.dataset")

INTERPOLATIONS = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
                  "box": Image.BOX, "nearest": Image.NEAREST}


# ---------------------------------------------------------------------------------------------
# One file list as an endless, sharded record source
# ---------------------------------------------------------------------------------------------
class _ListStream:
    """Records of one ``.filelist`` for one shard, pass after pass."""

    def __init__(self, name: str, parts: List[str], shard: int, num_shards: int, seed: int, list_index: int,
                 counters: collections.Counter):
        self.name, self.parts, self.shard, self.num_shards = name, parts, shard, num_shards
        self.by_file = len(parts) >= num_shards
        self.seed, self.list_index, self.counters = seed, list_index, counters
        self.pass_no = -1
        self.pass_length: Optional[int] = None  # lines in one pass, known after the first
        self._lines_this_pass = 0
        self._lines = iter(())

    def _pass_lines(self, pass_no: int) -> Iterator[bytes]:
        order = np.random.default_rng([self.seed, self.list_index, pass_no]).permutation(len(self.parts))
        files = [self.parts[i] for i in order]
        if self.by_file:
            files = files[self.shard :: self.num_shards]
        record = 0
        for path in files:
            try:
                for raw in iter_part_file(path):
                    if self.by_file or record % self.num_shards == self.shard:
                        yield raw
                    record += 1
            except FileNotFoundError:
                self.counters["missing_file"] += 1
                logger.warning("part file %s (listed in %s) is missing; skipped", path, self.name)
            except (EOFError, OSError) as err:  # truncated or corrupt gzip
                self.counters["truncated_file"] += 1
                logger.warning("part file %s is truncated or corrupt (%s); rest of the file skipped", path, err)

    def next_line(self) -> bytes:
        for _ in range(2):
            for raw in self._lines:
                self._lines_this_pass += 1
                return raw
            if self.pass_no >= 0:
                self.pass_length = self._lines_this_pass
            self.pass_no += 1
            self._lines_this_pass = 0
            self._lines = self._pass_lines(self.pass_no)
        raise RuntimeError(
            f"{self.name} gives shard {self.shard} of {self.num_shards} (ranks × loader workers) no record at all: "
            "every listed part file is missing or empty, or there are fewer records than shards; "
            "add data or use fewer ranks/workers")


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
class TextImagePairDataset(IterableDataset):
    """Infinite stream of ``{"pixel_values": uint8 (3,R,R), "input_ids": int64 (L,), ...}``.

    Args:
        file_list: a ``*.filelist.list`` (lines ``path/to/x.filelist [weight]``).
        tokenizer: a CLIP tokenizer; captions are padded/truncated to ``model_max_length``.
        resolution: output side R; images are resized so their shorter side is ``R / 0.9``, then cropped.
        line_format: ``laion400m`` or ``laion_aes`` (see ``sd/data_format.py``).
        interpolation: resize filter, one of ``INTERPOLATIONS`` (lanczos as in the seed).
        center_crop: crop the centre instead of a random window.
        drop_caption_prob: probability of replacing the caption by "" (classifier-free guidance).
        allow_upscale: keep images smaller than R (upscaled); by default they are skipped.
        max_bad_fraction: raise once more than this fraction of draws (after 1000) were bad.
        seed, rank, world_size: the stream is a function of (seed, rank, worker, draw).
        report_every: log a skip summary every this many skipped records.
        shuffle_buffer: undecoded lines held to shuffle the order within part files (1 = off).
    """

    def __init__(self, file_list: str, tokenizer, resolution: int = 256, line_format: str = "laion400m",
                 interpolation: str = "lanczos", center_crop: bool = False, drop_caption_prob: float = 0.1,
                 allow_upscale: bool = False, max_bad_fraction: Optional[float] = None, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 model_max_length: Optional[int] = None, report_every: int = 1000, shuffle_buffer: int = 256):
        if line_format not in LINE_FORMATS:
            raise ValueError(f"line_format must be one of {LINE_FORMATS}, got {line_format!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        if not 0.0 <= drop_caption_prob <= 1.0:
            raise ValueError(f"drop_caption_prob must be in [0, 1], got {drop_caption_prob}")
        self.lists = [(e.path, e.weight, [p.path for p in read_filelist(e.path)]) for e in read_filelist_list(file_list)]
        weights = [w for _, w, _ in self.lists]
        self.weights = None if weights[0] is None else np.array(weights, dtype=np.float64) / sum(weights)
        self.tokenizer = tokenizer
        self.max_length = model_max_length or tokenizer.model_max_length
        self.resolution, self.line_format = resolution, line_format
        self.resample = INTERPOLATIONS[interpolation]
        self.center_crop, self.drop_caption_prob, self.allow_upscale = center_crop, drop_caption_prob, allow_upscale
        self.max_bad_fraction, self.report_every, self.seed = max_bad_fraction, report_every, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        if rank is None or world_size is None:
            rank, world_size = (paddle.distributed.get_rank(), paddle.distributed.get_world_size()) if paddle else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.start_positions: Dict[int, int] = {}  # worker → draws to replay without decoding
        self.worker_offset = 0  # see fast_forward
        self._token_cache: Dict[str, np.ndarray] = {}

    # -- resume --------------------------------------------------------------------------------
    def fast_forward(self, positions: Dict[int, int], batches_consumed: int = 0) -> None:
        """Resume each worker's stream after ``positions[worker]`` draws (as reported in ``stream_state``).

        The DataLoader takes batch i from worker ``i % W``; a fresh loader starts again at worker 0, so
        after ``batches_consumed`` batches loader worker w continues the stream of worker
        ``(w + batches_consumed) % W``.
        """
        self.start_positions = {int(k): int(v) for k, v in positions.items()}
        self.worker_offset = int(batches_consumed)

    # -- per-sample work -----------------------------------------------------------------------
    def tokenize(self, caption: str) -> np.ndarray:
        ids = self._token_cache.get(caption)
        if ids is None:
            ids = np.asarray(self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.max_length,
                                            return_attention_mask=False)["input_ids"], dtype=np.int64)
            if len(self._token_cache) < 100_000:  # captions repeat; bound the memory anyway
                self._token_cache[caption] = ids
        return ids

    def load_image(self, data: bytes, rng: np.random.Generator) -> Optional[np.ndarray]:
        """Image bytes → uint8 (3, R, R); None when too small. Raises BadRecord when undecodable."""
        r = self.resolution
        try:
            im = Image.open(io.BytesIO(data))
            short = r / 0.9  # the seed resizes the shorter side to resolution / 0.9
            if im.format == "JPEG":  # decode at a reduced size (1/2, 1/4, 1/8) when that is still ≥ short
                scale = short / min(im.size)
                im.draft("RGB", (max(1, int(im.width * scale + 1)), max(1, int(im.height * scale + 1))))
            im = _to_rgb(im)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            raise BadRecord("bad_image", str(err)) from None
        w, h = im.size
        if min(w, h) < r and not self.allow_upscale:
            return None
        scale = short / min(w, h)
        nw, nh = max(r, round(w * scale)), max(r, round(h * scale))
        if self.center_crop:
            x0, y0 = (nw - r) // 2, (nh - r) // 2
        else:
            x0, y0 = int(rng.integers(0, nw - r + 1)), int(rng.integers(0, nh - r + 1))
        # Resample only the crop window: the same pixels as resize-then-crop, a fraction of the work.
        sx, sy = w / nw, h / nh  # exact per-axis ratios keep the box inside the image
        box = (x0 * sx, y0 * sy, (x0 + r) * sx, (y0 + r) * sy)
        try:
            out = im.resize((r, r), self.resample, box=box)
        except OSError as err:  # truncated image data surfaces at load time
            raise BadRecord("bad_image", str(err)) from None
        return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1).copy()

    # -- the stream ----------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info() if paddle else None
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (worker + self.worker_offset) % num_workers
        num_shards = self.world_size * num_workers
        shard = self.rank * num_workers + worker
        counters: collections.Counter = collections.Counter()
        streams = [_ListStream(path, parts, shard, num_shards, self.seed, i, counters)
                   for i, (path, _, parts) in enumerate(self.lists)]
        for s in streams:
            if not s.by_file and shard == 0:
                logger.info("%s has %d part-file entries for %d shards (ranks × workers): sharding it by record",
                            s.name, len(s.parts), num_shards)
        choice_rng = np.random.default_rng([self.seed, self.rank, worker, 0])
        skip = self.start_positions.get(worker, 0)
        buffer: List[tuple] = []  # (pass, raw line): a shuffle buffer of undecoded lines
        position, bad, reported, bad_run = 0, 0, 0, 0
        while True:
            # One draw: a line from a list (chosen by weight) enters the buffer, a random one leaves.
            k = 0 if len(streams) == 1 else int(choice_rng.choice(len(streams), p=self.weights))
            raw = streams[k].next_line()
            buffer.append((streams[k].pass_no, raw))
            position += 1
            rng = np.random.default_rng([self.seed, self.rank, worker, position])
            if len(buffer) < self.shuffle_buffer:
                continue  # filling up
            j = int(rng.integers(len(buffer)))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            epoch, raw = buffer.pop()
            if position <= skip:  # resuming: replay the draw without decoding
                continue
            try:
                sample = self._make_sample(raw, rng)
            except BadRecord as err:
                counters[err.reason] += 1
                sample = None
            if sample is not None:
                bad_run = 0
                sample.update(worker=worker, position=position, epoch=epoch, skipped=dict(counters))
                yield sample
                continue
            bad, bad_run = bad + 1, bad_run + 1
            seen = position - skip
            if sum(counters.values()) - reported >= self.report_every:
                reported = sum(counters.values())
                logger.warning("rank %d worker %d skipped %d of %d records so far: %s",
                               self.rank, worker, bad, seen, dict(counters))
            if self.max_bad_fraction is not None and seen >= 1000 and bad / seen > self.max_bad_fraction:
                raise RuntimeError(f"{bad} of {seen} records were bad (> max_bad_fraction "
                                   f"{self.max_bad_fraction}): {dict(counters)}")
            # Nothing usable in two full passes of every list (plus the buffer): fail, never loop forever.
            if all(s.pass_length is not None for s in streams) and \
                    bad_run > self.shuffle_buffer + 2 * sum(s.pass_length for s in streams):
                raise RuntimeError(
                    f"no usable sample in a full pass over {', '.join(s.name for s in streams)} for rank {self.rank} "
                    f"worker {worker} (skipped: {dict(counters)}); check the data, --line_format and --resolution")

    def _make_sample(self, raw: bytes, rng: np.random.Generator) -> Optional[dict]:
        if not raw.strip():
            raise BadRecord("empty_line")
        caption, b64 = parse_part_line(decode_line_bytes(raw), self.line_format)
        pixels = self.load_image(decode_image_b64(b64), rng)
        if pixels is None:
            raise BadRecord("too_small")
        if rng.random() < self.drop_caption_prob:
            caption = ""
        return {"pixel_values": pixels, "input_ids": self.tokenize(caption), "caption": caption}


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode → RGB: 16-bit and float scaled to 8 bits, alpha composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray((arr / peak * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[-1])
        return bg
    return im.convert("RGB") if im.mode != "RGB" else im


def collate_fn(samples: List[dict]) -> dict:
    """Stack a batch; pixels become float32 in [-1, 1] here, once per batch.

    Returns ``{"pixel_values": (B,3,R,R) float32, "input_ids": (B,L) int64, "stream_state": (3+,) int64}``
    where ``stream_state`` = [worker, position after the batch's last sample, total skipped].
    """
    pixels = np.stack([s["pixel_values"] for s in samples]).astype(np.float32)
    pixels = pixels * (2.0 / 255.0) - 1.0
    last = samples[-1]
    state = np.array([last["worker"], last["position"], sum(last["skipped"].values())], dtype=np.int64)
    # numpy, not paddle tensors: this runs inside loader workers, and the DataLoader converts.
    return {"pixel_values": pixels, "input_ids": np.stack([s["input_ids"] for s in samples]), "stream_state": state}


# ---------------------------------------------------------------------------------------------
# Benchmark / inspection CLI
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Stream K samples and print samples/s, skips and the shard layout.")
    p.add_argument("--file_list", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, e.g. ./tiny-sd/tokenizer")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--line_format", choices=LINE_FORMATS, default="laion400m")
    p.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default="lanczos")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_samples", type=int, default=512)
    a = p.parse_args(argv)
    from paddlenlp.transformers import CLIPTokenizer

    logging.basicConfig(level=logging.INFO)
    ds = TextImagePairDataset(a.file_list, CLIPTokenizer.from_pretrained(a.tokenizer), a.resolution, a.line_format,
                              a.interpolation, rank=0, world_size=1)
    for path, weight, parts in ds.lists:
        print(f"{path}: {len(parts)} part-file entries, weight {weight}, "
              f"{'by file' if len(parts) >= max(a.num_workers, 1) else 'by record'} over {max(a.num_workers, 1)} worker shard(s)")
    loader = paddle.io.DataLoader(ds, batch_size=a.batch_size, num_workers=a.num_workers, collate_fn=collate_fn)
    n, start, skipped = 0, None, {}
    for batch in loader:
        if start is None:
            start = time.time()  # exclude worker start-up from the rate
        else:
            n += batch["pixel_values"].shape[0]
        w, _, s = batch["stream_state"].numpy().tolist()
        skipped[w] = s
        if n >= a.num_samples:
            break
    elapsed = time.time() - start
    print(f"{n / elapsed:.1f} samples/s ({n} samples, {a.num_workers} workers, resolution {a.resolution}); "
          f"records skipped: {sum(skipped.values())}")


if __name__ == "__main__":
    main()
