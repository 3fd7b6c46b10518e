"""The training dataset: text–image pairs from part files, streamed, sharded, resumable.

    python -m sd.text_image_pair_dataset --file_list ./data/filelist/train.filelist.list --resolution 256 \\
        --num_workers 2 --num_samples 512    # samples/s, skips by reason and the shard layout

A thin join of three parts, each in its own module:

* ``sd/data/record_stream.py``: file lists and weights, one stream per slot of the global batch, shuffling,
  resume positions, skip counts (the stream's rules are in its docstring);
* ``sd/data/formats.py``: the record decoder (part-file line → caption, image bytes);
* ``sd/data/image_codec.py``: image bytes → the uint8 training crop (reduced JPEG decode, fast Lanczos).

Here: per record, decode → crop → caption dropout → token ids (cached, since captions repeat); the
slots of a dataset taken together, one sample of each per step; and ``collate_fn``, which stacks a
batch and converts it to float in one pass.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import paddle
from paddle.io import IterableDataset, get_worker_info

from sd.data.formats import LINE_FORMATS, read_filelist, read_filelist_list
from sd.data.image_codec import INTERPOLATIONS, ImageCodec, resample_window  # noqa: F401 (resample_window: re-exported)
from sd.data.record_stream import SKIP_REASONS, RecordSource, RecordStream, ResumePoint
from sd.data.sources import SOURCES

__all__ = ["TextImagePairDataset", "collate_fn", "add_stream_fields", "load_tokenizer", "INTERPOLATIONS",
           "SKIP_REASONS", "resample_window"]


class TokenCache:
    """Caption → int64 (L,) token ids, padded/truncated to L; cached, since captions repeat a lot."""

    MAX_ENTRIES = 100_000  # bounds the memory on caption-unique data

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self._ids: Dict[str, np.ndarray] = {}

    def __call__(self, caption: str) -> np.ndarray:
        ids = self._ids.get(caption)
        if ids is None:
            ids = np.asarray(self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.max_length,
                                            return_attention_mask=False)["input_ids"], dtype=np.int64)
            if len(self._ids) < self.MAX_ENTRIES:
                self._ids[caption] = ids
        return ids


class TextImagePairDataset(IterableDataset):
    """Infinite stream, per step, of the list of samples of its slots, in slot order; a sample is
    ``{"pixel_values": uint8 (3, R, R), "input_ids": int64 (L,)}``.

    Iterated by a DataLoader's workers, worker w of W takes the w-th of W contiguous blocks of the
    slots (so each step is W consecutive loader outputs); ``DataLoader(dataset, batch_size=None,
    collate_fn=collate_fn)`` collates each list into a batch.

    Args:
        file_list: a ``*.filelist.list`` (lines ``path/to/x.filelist [weight]``; relative paths by the
            path rule of ``sd/data/formats.py``).
        tokenizer: a CLIP tokenizer; captions are padded/truncated to ``model_max_length``.
        resolution: output side R; images are resized so their shorter side is ``R / 0.9``, then cropped.
        line_format: ``laion400m`` or ``laion_aes`` (see ``sd/data/formats.py``); never guessed.
        interpolation: resize filter, one of ``INTERPOLATIONS``: ``lanczos`` (default; PaddleMIX's filter,
            computed fast, see ``sd/data/image_codec.py``), ``lanczos_exact`` (Pillow's), bicubic, bilinear, box,
            nearest.
        center_crop: crop the centre instead of a random window.
        drop_caption_prob: probability of replacing the caption by "" (classifier-free guidance).
        allow_upscale: keep images smaller than R (upscaled); by default they are skipped, as in PaddleMIX.
        max_bad_fraction: raise once more than this fraction of records (after 1000) were bad.
        seed, num_slots: slot j's stream is a function of (seed, j, num_slots, file lists) only
            (``sd/data/record_stream.py``); num_slots is the global batch.
        slots: the slots this dataset streams (default: all ``num_slots``), e.g. one micro-batch's.
        model_max_length: token length L (default: the tokenizer's).
        report_every: log a skip summary every this many skipped records.
        shuffle_buffer: undecoded records each slot holds to mix records within part files (1 = file order).
        with_stream_state: put ``stream_state`` (int64 ``[slot, draws made, records skipped]``) into each
            sample, which ``collate_fn`` stacks: what the trainer saves for an exact
            ``fast_forward(positions=...)``. False gives exactly the two contract keys.
        return_meta: also put ``caption``, ``epoch`` (the pass) and ``skipped`` (counts by reason) into
            each sample (tests and the CLI; ``collate_fn`` turns ``skipped`` into ``skip_counts``).
        shard_options: img2dataset shards' caption field and metadata filters (``sd.data.img2dataset.ShardOptions``;
            default: the ``.txt`` caption, no filter), handed to their decoder with every record.
        sources: the kinds of listed files, chosen by file name (default ``sd.data.sources.SOURCES``).
    """

    def __init__(self, file_list: str, tokenizer, resolution: int = 256, line_format: str = "laion400m",
                 interpolation: str = "lanczos", center_crop: bool = False, drop_caption_prob: float = 0.1,
                 allow_upscale: bool = False, max_bad_fraction: Optional[float] = None, seed: int = 0,
                 slots: Optional[Sequence[int]] = None, num_slots: int = 1,
                 model_max_length: Optional[int] = None, report_every: int = 1000, shuffle_buffer: int = 64,
                 with_stream_state: bool = True, return_meta: bool = False, shard_options=None,
                 sources: Sequence[RecordSource] = SOURCES):
        if line_format not in LINE_FORMATS:
            raise ValueError(f"line_format must be one of {LINE_FORMATS}, got {line_format!r}")
        if not 0.0 <= drop_caption_prob <= 1.0:
            raise ValueError(f"drop_caption_prob must be in [0, 1], got {drop_caption_prob}")
        self.images = ImageCodec(resolution, interpolation, center_crop, allow_upscale)
        # weight 0: never drawn
        entries = [e for e in read_filelist_list(file_list) if e.weight is None or e.weight > 0]
        lists = [(e.path, e.weight, [p.path for p in read_filelist(e.path)]) for e in entries]
        self.stream = RecordStream(lists, seed, num_slots, shuffle_buffer, report_every, max_bad_fraction,
                                   hint=self._no_usable_hint(line_format, resolution), sources=sources)
        self.slots = list(range(num_slots) if slots is None else slots)
        if not self.slots or not all(0 <= j < num_slots for j in self.slots):
            raise ValueError(f"slots {self.slots} are not a non-empty subset of range({num_slots})")
        self.tokenizer = tokenizer
        self.tokenize = TokenCache(tokenizer, model_max_length or tokenizer.model_max_length)
        self.max_length = self.tokenize.max_length
        self.resolution, self.line_format, self.drop_caption_prob = resolution, line_format, drop_caption_prob
        self.with_stream_state, self.return_meta = with_stream_state, return_meta
        self.shard_options = shard_options  # data, as the loader workers receive it with the dataset
        self._resume: Dict[int, ResumePoint] = {}  # slot → where it continues

    @staticmethod
    def _no_usable_hint(line_format: str, resolution: int) -> str:
        return (f"check the data, line_format={line_format!r} and resolution={resolution} "
                "(smaller images are skipped unless allow_upscale)")

    @property
    def lists(self):
        """``(path, weight, part files)`` of each ``.filelist`` drawn from."""
        return self.stream.lists

    # -- resume --------------------------------------------------------------------------------
    def fast_forward(self, samples_consumed: int, positions: Optional[Dict[int, int]] = None) -> None:
        """Make the next iteration continue where a run that consumed ``samples_consumed`` steps stopped.

        Args:
            samples_consumed: samples each slot has given (one per step).
            positions: optional ``{slot: draws}`` from the last sample of each slot (``stream_state[1]``).
                With it the replay is exact whatever the data; without it, skipped records are
                checked usable or bad by their line, base64 and image header, which differs from the
                run only for an image whose header is valid but whose pixel data is corrupt. No image
                of a skipped sample is decoded.
        """
        if positions is not None and set(self.slots) - {int(j) for j in positions}:
            raise ValueError(f"fast_forward: no position for slots "
                             f"{sorted(set(self.slots) - set(map(int, positions)))}")
        self._resume = {j: ResumePoint(samples_consumed, None if positions is None else int(positions[j]))
                        for j in self.slots}

    def state_dict(self) -> dict:
        """Fast-forward settings and skip counters of the slots iterated in this process.

        With loader workers (W > 0) the streams live in the worker processes; their counters reach
        the trainer through ``stream_state`` and the workers' own log lines.
        """
        return {"fast_forward": {j: vars(r) for j, r in self._resume.items()},
                "skipped": {j: dict(state.skipped) for j, state in self.stream.states.items()}}

    def worker_slots(self, worker: int, num_workers: int) -> List[int]:
        """The slots loader worker ``worker`` of ``num_workers`` streams: the worker-th of that many contiguous
        blocks (so a step's loader outputs, joined in worker order, are in slot order)."""
        n = len(self.slots)
        if num_workers > n:
            raise ValueError(f"{num_workers} loader workers for {n} slots: use at most {n} (one slot each)")
        return self.slots[worker * n // num_workers:(worker + 1) * n // num_workers]

    # -- per-record work -----------------------------------------------------------------------
    def load_image(self, data: bytes, rng: Optional[np.random.Generator]) -> np.ndarray:
        """Image bytes → uint8 (3, R, R) (``ImageCodec.decode``); raises BadRecord("bad_image" | "too_small")."""
        return self.images.decode(data, rng)

    def _make_sample(self, source: RecordSource, record, rng: np.random.Generator) -> dict:
        """One record → sample. Raises BadRecord."""
        caption, data = source.decode(record, self.line_format, self.shard_options)
        pixels = self.load_image(data, rng)  # draws the crop window first
        if rng.random() < self.drop_caption_prob:
            caption = ""
        sample = {"pixel_values": pixels, "input_ids": self.tokenize(caption)}
        if self.return_meta:
            sample["caption"] = caption
        return sample

    def _check_record(self, source: RecordSource, record) -> None:
        """Would ``_make_sample`` use this record? The same decisions, reading only the image header."""
        _, data = source.decode(record, self.line_format, self.shard_options)
        self.images.check(data)

    def _slot_samples(self, slot: int, shared=None):
        for sample, epoch, state in self.stream.samples(slot, self._resume.get(slot), self._make_sample,
                                                        self._check_record, shared):
            if self.with_stream_state:
                sample["stream_state"] = state.stream_state()
            if self.return_meta:
                sample.update(epoch=epoch, skipped=dict(state.skipped))
            yield sample

    def __iter__(self):
        info = get_worker_info()
        slots = self.slots if info is None else self.worker_slots(info.id, info.num_workers)
        # One core per stream: OpenCV's own thread pool would compete with the other loader workers
        # (and with the training step when num_workers=0). This is process-wide for OpenCV.
        cv2.setNumThreads(1)
        shared = self.stream.shared_reads(slots)  # a file several of these slots split is read once per pass
        streams = [self._slot_samples(j, shared) for j in slots]
        try:
            for step in zip(*streams):  # the slot streams are endless (or raise)
                yield list(step)
        finally:
            for stream in streams:
                stream.close()  # its end-of-stream summary now


# ---------------------------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------------------------
def add_stream_fields(batch: dict, samples: List[dict]) -> dict:
    """Add the samples' ``stream_state`` (B, 3) and ``skip_counts`` (B, len(SKIP_REASONS)), when present, to
    ``batch``."""
    if "stream_state" in samples[0]:
        batch["stream_state"] = np.stack([s["stream_state"] for s in samples])
    if "skipped" in samples[0]:
        batch["skip_counts"] = np.array([[s["skipped"].get(r, 0) for r in SKIP_REASONS] for s in samples],
                                        dtype=np.int64)
    return batch


def collate_fn(samples: List[dict]) -> dict:
    """Stack a batch; pixels become float32 in [-1, 1] here, once per batch (not per sample).

    Returns ``{"pixel_values": float32 (B, 3, R, R), "input_ids": int64 (B, L)}``, plus
    ``"stream_state"`` (int64 (B, 3): per sample ``[slot, draws made, records skipped]`` of its slot)
    when the samples carry it, and ``"skip_counts"`` (int64 (B, len(SKIP_REASONS)): each sample's slot's
    counts so far) with ``return_meta``.
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


# ---------------------------------------------------------------------------------------------
# Inspection CLI
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd.text_image_pair_dataset",
                                description="Stream K samples through a DataLoader (one global batch of "
                                "--batch_size slots); print samples/s, skips by reason and the slot layout.")
    p.add_argument("--file_list", required=True, help="a *.filelist.list")
    p.add_argument("--tokenizer", default=None,
                   help="CLIP tokenizer folder (e.g. ./tiny-sd/tokenizer); default: a byte-level one built on the fly")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--line_format", choices=LINE_FORMATS, default="laion400m")
    p.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default="lanczos")
    p.add_argument("--num_workers", type=int, default=0, help="loader workers (at most --batch_size are used)")
    p.add_argument("--batch_size", type=int, default=8, help="samples per batch: the slots")
    p.add_argument("--num_samples", type=int, default=512, help="samples to time (after one warm-up batch)")
    a = p.parse_args(argv)
    try:  # a user's mistake (missing or malformed list, bad setting): one line, no traceback
        ds = TextImagePairDataset(a.file_list, load_tokenizer(a.tokenizer), a.resolution, a.line_format,
                                  a.interpolation, num_slots=a.batch_size, return_meta=True)
    except (ValueError, FileNotFoundError) as err:
        p.exit(2, f"{p.prog}: error: {err}\n")
    for line in ds.stream.layout():
        print(line)
    workers = min(a.num_workers, a.batch_size)
    loader = paddle.io.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=collate_fn)
    n, start, skips = 0, None, {}
    for batch in loader:  # each worker's share of a step (its slots)
        for state, counts in zip(batch["stream_state"].numpy(), batch["skip_counts"].numpy()):
            skips[int(state[0])] = counts
        if start is None:
            start = time.perf_counter()  # exclude start-up (worker launch, first batch) from the rate
            continue
        n += batch["pixel_values"].shape[0]
        if n >= a.num_samples:
            break
    elapsed = time.perf_counter() - start
    total = np.sum(list(skips.values()), axis=0)
    by_reason = {r: int(c) for r, c in zip(SKIP_REASONS, total) if c}
    print(f"{n / elapsed:.1f} samples/s ({n} samples in {elapsed:.1f} s, {workers} workers, "
          f"resolution {a.resolution}, {a.interpolation}); records skipped: {by_reason or 'none'}")


def load_tokenizer(folder: Optional[str]):
    """A paddlenlp CLIPTokenizer from ``folder``, or (None) a byte-level one with no merges.

    The byte-level one is written to a temporary folder, loaded (the tokenizer keeps its vocabulary
    in memory) and the folder removed.
    """
    from paddlenlp.transformers import CLIPTokenizer

    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"tokenizer folder {folder} not found (give a CLIP tokenizer folder, "
                                    "e.g. ./tiny-sd/tokenizer, or none for a byte-level one)")
        return CLIPTokenizer.from_pretrained(folder)
    from sd.kit.tokenizer import save_tokenizer

    with tempfile.TemporaryDirectory(prefix="sd-tokenizer-") as tmp:
        save_tokenizer(tmp, [], model_max_length=77)
        return CLIPTokenizer.from_pretrained(tmp)


if __name__ == "__main__":
    main()
