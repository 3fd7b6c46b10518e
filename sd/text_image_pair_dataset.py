"""Streaming text–image pairs from part files: sharded, infinite, deterministic, resumable.

Stream rules (the contract with the trainer is in docs/ARCHITECTURE.md):

* **Shards.** With R ranks and W loader workers there are S = R·max(W, 1) shards; shard
  ``rank·max(W,1) + worker``. A ``.filelist`` with at least S part-file entries is split by file
  (each pass, every shard shuffles its entries the same way and shard k reads entries k, k+S, ...);
  one with fewer is split by record (every shard reads every file and keeps records k, k+S, ...),
  which is logged once. Either way the shards are disjoint and together complete, and no worker
  waits for data that is not there (PaddleMIX's loader hangs then). ``num_workers`` 0 and 1 give
  the same stream.
* **Draws.** A shard's stream is a sequence of draws: pick a ``.filelist`` (by weight, or
  uniformly), put its next line into a shuffle buffer of undecoded lines, take a random line out.
  Each list repeats forever, its file order reshuffled every pass. Draw ``i`` uses randomness from
  ``(seed, rank, worker, i)`` and the pass order from ``(seed, list, pass)``, so the stream is a
  function of (seed, rank, worker, pass) and nothing else.
* **Resume.** ``fast_forward`` replays the draws of the samples already consumed, reading lines
  but decoding no image (see its docstring for the DataLoader mapping).
* **Bad data** (undecodable text, base64 or image, too few fields, images smaller than the
  resolution; part files missing, unreadable or truncated — also when they vanish mid-run) is
  skipped and counted by reason (``SKIP_REASONS``); a summary is logged every ``report_every``
  skips and when the stream ends; ``max_bad_fraction`` turns too much bad data into an error; two
  full passes of every list without one usable sample is an error, never an endless loop. A list
  whose part files all vanished is dropped (logged) while other lists still give records; when
  none does, the stream raises.
* **Speed** (per sample, in uint8): JPEGs are decoded at the smallest reduced size (1/2, 1/4,
  1/8, libjpeg's DCT scaling) that is still at least the resized size, by OpenCV straight into a
  numpy array (the same pixels as Pillow's ``draft``); only the crop window is resampled, with a
  fast Lanczos-3 (``resample_window``; ``interpolation="lanczos_exact"`` for Pillow's own);
  captions' token ids are cached; ``collate_fn`` converts a whole batch to float in one pass.
  ``benchmarks/bench_dataset.py`` measures this against the straightforward pipeline.
"""

from __future__ import annotations

import argparse
import collections
import io
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import cv2
import numpy as np
import paddle
from paddle.io import IterableDataset, get_worker_info
from PIL import Image, UnidentifiedImageError

from sd.data_format import (LINE_FORMATS, BadRecord, decode_image_b64, iter_part_file, parse_part_line_bytes,
                            read_filelist, read_filelist_list)

logger = logging.getLogger("sd.dataset")

# Resize filters. "lanczos" (default) is Lanczos-3 done fast (see ``resample_window``);
# "lanczos_exact" is Pillow's own Lanczos; the others are Pillow's filters of that name.
INTERPOLATIONS = {"lanczos": Image.LANCZOS, "lanczos_exact": Image.LANCZOS, "bicubic": Image.BICUBIC,
                  "bilinear": Image.BILINEAR, "box": Image.BOX, "nearest": Image.NEAREST}
FAST_LANCZOS_MAX_SCALE = 2.0  # above this many source pixels per output pixel, Pillow's Lanczos is used
# Skip reasons, in the order of the counts in a batch's ``stream_state`` (see collate_fn).
# File reasons count a part file once per pass in which it could not be read: ``missing_file`` (gone,
# e.g. deleted mid-run), ``unreadable_file`` (no permission, a directory), ``truncated_file``
# (truncated or corrupt gzip: the rest of that file is skipped). New reasons go at the end.
SKIP_REASONS = ("empty_line", "not_text", "too_few_fields", "bad_json", "no_caption", "empty_image", "bad_base64",
                "bad_image", "too_small", "missing_file", "truncated_file", "unreadable_file",
                "bad_latent")  # bad_latent: a record of precomputed latents (sd/latent_dataset.py) that does not parse
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


class _NoRecords(RuntimeError):
    """A list gives a shard no line in a whole pass (its part files are gone, empty or too few)."""


# ---------------------------------------------------------------------------------------------
# One file list as an endless, sharded record source
# ---------------------------------------------------------------------------------------------
class _ListStream:
    """Raw lines of one ``.filelist`` for one shard, pass after pass."""

    def __init__(self, name: str, parts: List[str], shard: int, num_shards: int, seed: int, list_index: int,
                 counters: collections.Counter):
        self.name, self.parts, self.shard, self.num_shards = name, parts, shard, num_shards
        self.by_file = len(parts) >= num_shards
        self.seed, self.list_index, self.counters = seed, list_index, counters
        self.pass_no = -1
        self.pass_length: Optional[int] = None  # this shard's lines in one pass, known after the first
        self._lines_this_pass = 0
        self._lines: Iterator[bytes] = iter(())
        self._warned: set = set()  # (path, reason) already logged

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
            except FileNotFoundError:  # listed at start-up, gone now (deleted or moved mid-run)
                self._skip_file("missing_file", path, "is missing; skipped")
            except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
                self._skip_file("unreadable_file", path, f"cannot be read ({err}); skipped")
            except (EOFError, OSError, zlib.error) as err:  # truncated or corrupt gzip, I/O error
                self._skip_file("truncated_file", path, f"is truncated or corrupt ({err}); rest of the file skipped")

    def _skip_file(self, reason: str, path: str, what: str) -> None:
        """Count a part file that could not be read in this pass; log it the first time only."""
        self.counters[reason] += 1
        if (path, reason) not in self._warned:
            self._warned.add((path, reason))
            logger.warning("part file %s (listed in %s) %s; counted as %s in every pass it recurs",
                           path, self.name, what, reason)

    def next_line(self) -> bytes:
        for _ in range(2):  # the current pass, else one fresh pass; two empty passes in a row is an error
            for raw in self._lines:
                self._lines_this_pass += 1
                return raw
            if self.pass_no >= 0:
                self.pass_length = self._lines_this_pass
            self.pass_no += 1
            self._lines_this_pass = 0
            self._lines = self._pass_lines(self.pass_no)
        raise _NoRecords(
            f"{self.name} gives shard {self.shard} of {self.num_shards} (ranks × loader workers) no record at all "
            f"(file skips so far: {_file_skips(self.counters)}): every listed part file is missing, unreadable "
            "or empty, or there are fewer records than shards; add data or use fewer ranks/workers")


def _file_skips(counters: collections.Counter) -> dict:
    return {r: counters[r] for r in ("missing_file", "unreadable_file", "truncated_file") if counters[r]}


@dataclass(frozen=True)
class _FastForward:
    samples_consumed: int  # samples this rank has consumed (whole batches)
    batch_size: int
    num_workers: Optional[int]  # the DataLoader's num_workers (0 = main process; None = not checked)
    positions: Optional[Dict[int, int]]  # stream → draws made, from the batches' stream_state

    @property
    def batches(self) -> int:
        return self.samples_consumed // self.batch_size

    def stream_of(self, loader_worker: int, num_workers: int) -> int:
        """The stream a fresh loader's worker continues (batch i came from worker i mod W)."""
        return (loader_worker + self.batches) % num_workers

    def samples_of(self, stream: int, num_workers: int) -> int:
        """Samples already consumed from ``stream``: B × the number of i < batches with i mod W == stream."""
        return self.batch_size * max(0, -(-(self.batches - stream) // num_workers))


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
class TextImagePairDataset(IterableDataset):
    """Infinite stream of ``{"pixel_values": uint8 (3, R, R), "input_ids": int64 (L,)}``.

    Args:
        file_list: a ``*.filelist.list`` (lines ``path/to/x.filelist [weight]``; relative paths by the
            path rule of ``sd/data_format.py``).
        tokenizer: a CLIP tokenizer; captions are padded/truncated to ``model_max_length``.
        resolution: output side R; images are resized so their shorter side is ``R / 0.9``, then cropped.
        line_format: ``laion400m`` or ``laion_aes`` (see ``sd/data_format.py``); never guessed.
        interpolation: resize filter, one of ``INTERPOLATIONS``: ``lanczos`` (default; the seed's filter,
            computed fast, see ``resample_window``), ``lanczos_exact`` (Pillow's), bicubic, bilinear, box, nearest.
        center_crop: crop the centre instead of a random window.
        drop_caption_prob: probability of replacing the caption by "" (classifier-free guidance).
        allow_upscale: keep images smaller than R (upscaled); by default they are skipped, as in the seed.
        max_bad_fraction: raise once more than this fraction of records (after 1000) were bad.
        seed, rank, world_size: the stream is a function of (seed, rank, worker, pass); rank and
            world_size default to ``paddle.distributed``'s.
        model_max_length: token length L (default: the tokenizer's).
        report_every: log a skip summary every this many skipped records.
        shuffle_buffer: undecoded lines held to mix records within part files (1 = file order).
        with_stream_state: put ``stream_state`` (int64 ``[stream, draws made, records skipped]``) into each
            sample, so that ``collate_fn`` passes the last one of each batch on: what the trainer saves
            for an exact ``fast_forward(positions=...)``. False gives exactly the two contract keys.
        return_meta: also put ``caption``, ``epoch`` (the pass) and ``skipped`` (counts by reason) into
            each sample (tests and the CLI; ``collate_fn`` turns ``skipped`` into ``skip_counts``).
    """

    def __init__(self, file_list: str, tokenizer, resolution: int = 256, line_format: str = "laion400m",
                 interpolation: str = "lanczos", center_crop: bool = False, drop_caption_prob: float = 0.1,
                 allow_upscale: bool = False, max_bad_fraction: Optional[float] = None, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None,
                 model_max_length: Optional[int] = None, report_every: int = 1000, shuffle_buffer: int = 256,
                 with_stream_state: bool = True, return_meta: bool = False):
        if line_format not in LINE_FORMATS:
            raise ValueError(f"line_format must be one of {LINE_FORMATS}, got {line_format!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}")
        if not 0.0 <= drop_caption_prob <= 1.0:
            raise ValueError(f"drop_caption_prob must be in [0, 1], got {drop_caption_prob}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        entries = [e for e in read_filelist_list(file_list) if e.weight is None or e.weight > 0]  # weight 0: never drawn
        self.lists = [(e.path, e.weight, [p.path for p in read_filelist(e.path)]) for e in entries]
        weights = [w for _, w, _ in self.lists]
        self.weights = None if weights[0] is None else np.array(weights, dtype=np.float64) / sum(weights)
        self.tokenizer = tokenizer
        self.max_length = model_max_length or tokenizer.model_max_length
        self.resolution, self.line_format = resolution, line_format
        self.interpolation = interpolation
        self.center_crop, self.drop_caption_prob, self.allow_upscale = center_crop, drop_caption_prob, allow_upscale
        self.max_bad_fraction, self.report_every, self.seed = max_bad_fraction, report_every, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.with_stream_state, self.return_meta = with_stream_state, return_meta
        if rank is None or world_size is None:
            rank, world_size = paddle.distributed.get_rank(), paddle.distributed.get_world_size()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self._fast_forward: Optional[_FastForward] = None
        self._token_cache: Dict[str, np.ndarray] = {}
        self._counters: Dict[int, collections.Counter] = {}  # stream → skips, for streams iterated in this process

    # -- resume --------------------------------------------------------------------------------
    def fast_forward(self, samples_consumed, batch_size: Optional[int] = None, num_workers: Optional[int] = None,
                     positions: Optional[Dict[int, int]] = None) -> None:
        """Make the next iteration continue where a run that consumed ``samples_consumed`` samples stopped.

        Args:
            samples_consumed: samples this rank has taken from its DataLoader (a multiple of batch_size).
            batch_size, num_workers: those of the DataLoader, before and after the resume (must match).
            positions: optional ``{stream: draws}`` from the last batch of each stream (``stream_state[:2]``
                of ``collate_fn``). With it the replay is exact whatever the data; without it, skipped
                records are classified usable or bad by their line, base64 and image header, which
                differs from the run only for an image whose header is valid but whose pixel data is
                corrupt. (The older call ``fast_forward(positions, batches_consumed)`` still works.)

        The mapping: paddle's DataLoader (``_DataLoaderIterMultiProcess._try_put_indices``) hands
        batch i of an IterableDataset to worker ``i mod W`` and returns batches in that order, each
        made of B consecutive samples of that worker's stream. After ``n = samples_consumed / B``
        batches, stream s has given ``B · #{i < n : i mod W = s}`` samples, and the next batch is
        from stream ``n mod W``; a fresh loader starts at worker 0, so its worker w continues stream
        ``(w + n) mod W``. No image of a skipped sample is decoded.
        """
        if isinstance(samples_consumed, dict):  # older form: (positions, batches_consumed)
            positions, samples_consumed, batch_size, num_workers = samples_consumed, batch_size or 0, 1, None
        if batch_size is None or batch_size < 1 or samples_consumed < 0 or (num_workers or 0) < 0:
            raise ValueError(f"bad fast_forward arguments: samples_consumed={samples_consumed}, "
                             f"batch_size={batch_size}, num_workers={num_workers}")
        if samples_consumed % batch_size:
            raise ValueError(f"samples_consumed={samples_consumed} is not a whole number of batches of {batch_size}")
        self._fast_forward = _FastForward(samples_consumed, batch_size, num_workers,
                                          None if positions is None else {int(k): int(v) for k, v in positions.items()})

    def state_dict(self) -> dict:
        """Fast-forward settings and skip counters of the streams iterated in this process.

        With loader workers (W > 0) the streams live in the worker processes; their counters reach
        the trainer through ``stream_state``/``skip_counts`` and the workers' own log lines.
        """
        ff = self._fast_forward
        return {"fast_forward": None if ff is None else dict(samples_consumed=ff.samples_consumed,
                                                             batch_size=ff.batch_size, num_workers=ff.num_workers,
                                                             positions=ff.positions),
                "skipped": {s: dict(c) for s, c in self._counters.items()}}

    # -- per-sample work -----------------------------------------------------------------------
    def tokenize(self, caption: str) -> np.ndarray:
        """Caption → int64 (L,) ids, padded/truncated; cached, since captions repeat a lot."""
        ids = self._token_cache.get(caption)
        if ids is None:
            ids = np.asarray(self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.max_length,
                                            return_attention_mask=False)["input_ids"], dtype=np.int64)
            if len(self._token_cache) < 100_000:  # bound the memory on caption-unique data
                self._token_cache[caption] = ids
        return ids

    def load_image(self, data: bytes, rng: Optional[np.random.Generator]) -> Optional[np.ndarray]:
        """Image bytes → uint8 (3, R, R), or None when smaller than R (and not ``allow_upscale``).

        The seed's geometry: shorter side resized to R/0.9 (computed on the original size), then a
        random (or centre) R×R window. Only that window is resampled (``resample_window``), from a
        JPEG decoded at the smallest reduced size (1/2, 1/4, 1/8) still at least the resized size.
        With ``rng=None`` only the header is read, to classify the record without decoding it; a
        usable image then gives an empty array. Raises BadRecord("bad_image") when undecodable.
        """
        r = self.resolution
        try:
            im = Image.open(io.BytesIO(data))
            w0, h0 = im.size  # original size: the geometry is defined on it
            if min(w0, h0) < r and not self.allow_upscale:
                return None
            if rng is None:
                return np.empty(0, np.uint8)
            scale = r / 0.9 / min(w0, h0)  # the seed resizes the shorter side to resolution / 0.9
            wanted = (int(w0 * scale) + 1, int(h0 * scale) + 1)  # ≥ the resized size
            fast = _decode_jpeg_reduced(data, im, wanted) if self.interpolation == "lanczos" else None
            if fast is not None:
                pixels, extent = fast  # BGR (h, w, 3)
            else:
                extent = (w0, h0)  # the original image in decoded-pixel units
                if im.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 size when that is still ≥ the resized size
                    drafted = im.draft("RGB", wanted)
                    if drafted is not None:
                        extent = drafted[1][2:]
                im.load()  # decode here, so that corrupt data is caught here
                pixels = _to_rgb(im)
        except _DECODE_ERRORS as err:
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

    def _make_sample(self, raw: bytes, rng: Optional[np.random.Generator]) -> dict:
        """One raw line → sample; ``rng=None``: classify only (no image decode). Raises BadRecord."""
        if not raw.strip():
            raise BadRecord("empty_line")
        caption, b64 = parse_part_line_bytes(raw, self.line_format)
        pixels = self.load_image(decode_image_b64(b64), rng)
        if pixels is None:
            raise BadRecord("too_small")
        if rng is None:
            return {}
        if rng.random() < self.drop_caption_prob:
            caption = ""
        sample = {"pixel_values": pixels, "input_ids": self.tokenize(caption)}
        if self.return_meta:
            sample["caption"] = caption
        return sample

    # -- the stream ----------------------------------------------------------------------------
    def __iter__(self):
        info = get_worker_info()
        loader_worker, loader_workers = (info.id, info.num_workers) if info is not None else (0, 0)
        # One core per stream: OpenCV's own thread pool would compete with the other loader workers
        # (and with the training step when num_workers=0). This is process-wide for OpenCV.
        cv2.setNumThreads(1)
        num_workers = max(loader_workers, 1)
        ff = self._fast_forward
        if ff is not None and ff.num_workers is not None and max(ff.num_workers, 1) != num_workers:
            raise ValueError(f"fast_forward was told num_workers={ff.num_workers} but the DataLoader has "
                             f"{loader_workers}; resume with the loader settings of the interrupted run")
        stream = ff.stream_of(loader_worker, num_workers) if ff is not None else loader_worker
        skip_draws = ff.positions.get(stream, 0) if ff is not None and ff.positions is not None else None
        skip_samples = ff.samples_of(stream, num_workers) if ff is not None and ff.positions is None else 0
        num_shards = self.world_size * num_workers
        shard = self.rank * num_workers + stream
        counters = self._counters[stream] = collections.Counter()
        streams = [_ListStream(path, parts, shard, num_shards, self.seed, i, counters)
                   for i, (path, _, parts) in enumerate(self.lists)]
        if shard == 0:
            for s in streams:
                if not s.by_file:
                    logger.info("%s has %d part-file entries for %d shards (ranks × loader workers): "
                                "sharding it by record instead of by file", s.name, len(s.parts), num_shards)
        choice_rng = np.random.default_rng([self.seed, self.rank, stream, 0])
        buffer: List[tuple] = []  # (list index, pass, raw line): undecoded lines waiting to be drawn
        position = produced = bad = examined = reported = 0
        bad_since_good = [0] * len(streams)  # per list: bad records since the last usable one
        alive = np.ones(len(streams), dtype=bool)  # lists that still give this shard records
        weights = self.weights  # None: uniform (kept as None while every list is alive: the same draws)
        where = f"rank {self.rank} stream {stream}"
        try:
            while True:
                # One draw: a line of a list (chosen by weight) enters the buffer, a random one leaves.
                k = 0 if len(streams) == 1 else int(choice_rng.choice(len(streams), p=weights))
                try:
                    line = streams[k].next_line()  # may start a new pass
                except _NoRecords as err:  # e.g. all its part files vanished mid-run
                    alive[k] = False
                    if not alive.any():
                        raise RuntimeError(f"{where}: no file list has any record left ({err}); "
                                           f"skipped: {dict(counters)}") from None
                    logger.warning("%s: %s; drawing from the other lists only", where, err)
                    weights = np.where(alive, self.weights if self.weights is not None else 1.0, 0.0)
                    weights /= weights.sum()
                    continue
                buffer.append((k, streams[k].pass_no, line))
                position += 1
                if len(buffer) < self.shuffle_buffer:
                    continue  # filling up
                rng = np.random.default_rng([self.seed, self.rank, stream, position])
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                k, epoch, raw = buffer.pop()
                if skip_draws is not None and position <= skip_draws:
                    continue  # exact resume: replay the draw, look at nothing
                replay = produced < skip_samples  # resume by sample count: classify without decoding
                examined += 1
                try:
                    sample = self._make_sample(raw, None if replay else rng)
                except BadRecord as err:
                    counters[err.reason] += 1
                    sample = None
                if sample is not None:
                    produced += 1
                    bad_since_good = [0] * len(streams)
                    if replay:
                        continue
                    if self.with_stream_state:
                        sample["stream_state"] = np.array([stream, position, bad], dtype=np.int64)
                    if self.return_meta:
                        sample.update(epoch=epoch, skipped=dict(counters))
                    yield sample
                    continue
                bad += 1
                bad_since_good[k] += 1
                if sum(counters.values()) - reported >= self.report_every:
                    reported = sum(counters.values())
                    logger.warning("%s: skipped %d of %d records so far: %s", where, bad, examined, dict(counters))
                if self.max_bad_fraction is not None and examined >= 1000 and bad / examined > self.max_bad_fraction:
                    raise RuntimeError(f"{where}: {bad} of {examined} records were bad, more than max_bad_fraction="
                                       f"{self.max_bad_fraction}: {dict(counters)}")
                # Two full passes of every list (plus the buffer) without a usable sample: fail, never loop.
                if all(not ok or (s.pass_length is not None and n >= 2 * s.pass_length + self.shuffle_buffer)
                       for s, n, ok in zip(streams, bad_since_good, alive)):
                    raise RuntimeError(
                        f"no usable sample in a full pass over {', '.join(s.name for s in streams)} ({where}; "
                        f"skipped: {dict(counters)}); check the data, line_format={self.line_format!r} and "
                        f"resolution={self.resolution} (smaller images are skipped unless allow_upscale)")
        finally:
            if counters:
                logger.info("%s: stream ended after %d records, %d skipped: %s", where, examined, bad, dict(counters))


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


def _decode_jpeg_reduced(data: bytes, im: Image.Image, wanted):
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


def _to_rgb(im: Image.Image) -> Image.Image:
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


def add_stream_fields(batch: dict, samples: List[dict]) -> dict:
    """Add ``stream_state`` and ``skip_counts`` of the batch's last sample (when present) to ``batch``."""
    last = samples[-1]
    if "stream_state" in last:
        batch["stream_state"] = last["stream_state"]
    if "skipped" in last:
        batch["skip_counts"] = np.array([last["skipped"].get(r, 0) for r in SKIP_REASONS], dtype=np.int64)
    return batch


def collate_fn(samples: List[dict]) -> dict:
    """Stack a batch; pixels become float32 in [-1, 1] here, once per batch (not per sample).

    Returns ``{"pixel_values": float32 (B, 3, R, R), "input_ids": int64 (B, L)}``, plus
    ``"stream_state"`` (int64 ``[stream, draws made, records skipped]`` after the batch's last sample)
    when the samples carry it, and ``"skip_counts"`` (int64, per ``SKIP_REASONS``) with ``return_meta``.
    Called in the main process it returns paddle tensors; in a loader worker numpy arrays, which the
    DataLoader turns into paddle tensors (paddle tensors made in a worker process crash it).
    """
    u8 = np.stack([s["pixel_values"] for s in samples])  # (B, 3, R, R) uint8
    flat = u8.reshape(-1, u8.shape[-1])  # 2-D for OpenCV: one vectorised pass, x · 2/255 - 1 in float32
    pixels = cv2.addWeighted(flat, 2.0 / 255.0, flat, 0.0, -1.0, dtype=cv2.CV_32F).reshape(u8.shape)
    batch = add_stream_fields({"pixel_values": pixels, "input_ids": np.stack([s["input_ids"] for s in samples])},
                              samples)  # ids (B, L)
    if get_worker_info() is None:
        # The pixels are handed over without a copy (DLPack): copying a fresh (B, 3, R, R) float
        # array costs about as much as computing it (page faults on new memory).
        batch = {k: paddle.utils.dlpack.from_dlpack(v) if k == "pixel_values" else paddle.to_tensor(v)
                 for k, v in batch.items()}
    return batch


def shard_layout(dataset: TextImagePairDataset, num_workers: int) -> List[str]:
    """Human-readable description of how each list is split over ranks × loader workers."""
    shards = dataset.world_size * max(num_workers, 1)
    return [f"{path}: {len(parts)} part-file entries, weight {weight}, split by "
            f"{'file' if len(parts) >= shards else 'record'} over {shards} shard(s) "
            f"({dataset.world_size} rank(s) × {max(num_workers, 1)} worker stream(s))"
            for path, weight, parts in dataset.lists]


# ---------------------------------------------------------------------------------------------
# Benchmark / inspection CLI
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Stream K samples through a DataLoader; print samples/s, skips "
                                            "by reason and the shard layout.")
    p.add_argument("--file_list", required=True, help="a *.filelist.list")
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer folder (e.g. ./tiny-sd/tokenizer); default: a byte-level one built on the fly")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--line_format", choices=LINE_FORMATS, default="laion400m")
    p.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default="lanczos")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_samples", type=int, default=512, help="samples to time (after one warm-up batch)")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world_size", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ds = TextImagePairDataset(a.file_list, load_tokenizer(a.tokenizer), a.resolution, a.line_format,
                              a.interpolation, rank=a.rank, world_size=a.world_size, return_meta=True)
    for line in shard_layout(ds, a.num_workers):
        print(line)
    loader = paddle.io.DataLoader(ds, batch_size=a.batch_size, num_workers=a.num_workers, collate_fn=collate_fn)
    n, start, skips = 0, None, {}
    for batch in loader:
        skips[int(batch["stream_state"][0])] = batch["skip_counts"].numpy()
        if start is None:
            start = time.perf_counter()  # exclude start-up (worker launch, first batch) from the rate
            continue
        n += batch["pixel_values"].shape[0]
        if n >= a.num_samples:
            break
    elapsed = time.perf_counter() - start
    total = np.sum(list(skips.values()), axis=0)
    by_reason = {r: int(c) for r, c in zip(SKIP_REASONS, total) if c}
    print(f"{n / elapsed:.1f} samples/s ({n} samples in {elapsed:.1f} s, {a.num_workers} workers, "
          f"resolution {a.resolution}, {a.interpolation}); records skipped: {by_reason or 'none'}")


def load_tokenizer(folder: Optional[str]):
    """A paddlenlp CLIPTokenizer from ``folder``, or a byte-level one (no merges) in a temp folder."""
    from paddlenlp.transformers import CLIPTokenizer

    if folder is None:
        import tempfile

        from sd.kit_tokenizer import save_tokenizer

        folder = tempfile.mkdtemp(prefix="sd-tokenizer-")
        save_tokenizer(folder, [], model_max_length=77)
    return CLIPTokenizer.from_pretrained(folder)


if __name__ == "__main__":
    main()
