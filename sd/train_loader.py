"""The training loader: the data streams of one process, one per accumulation micro-batch, taken in turn.

Micro-batch k of an optimizer step on rank r is *data rank* d = r·A + k of D = R·A (R ranks, A
accumulation steps): it reads data shard d of D and draws its noise from the seed of (run seed, d,
step). So R ranks × A accumulation train on the same samples with the same noise for any split of the
same D: 2 GPUs = 1 GPU with accumulation 2, up to floating-point summation order.

:class:`MicroBatchStreams` is what the trainer iterates. It hands out the batches of its streams in
turn, each with the ``seed`` of its random draws, and keeps what a checkpoint needs and the log shows:
every data rank's stream positions and skip counts, the batches handed out, and the time spent waiting
for them. On resume it fast-forwards the streams (no image decoded).
"""

from __future__ import annotations

import ctypes
import signal
import sys
import time
from typing import Dict, List

import numpy as np
import paddle

from sd.text_image_pair_dataset import TextImagePairDataset, collate_fn


def batch_seed(run_seed: int, data_rank: int, step: int) -> int:
    """Seed of all random draws of one micro-batch (different on every data rank and step)."""
    return int(np.random.SeedSequence([run_seed, data_rank, step]).generate_state(1)[0])


def die_with_parent(worker_id: int = 0) -> None:
    """The calling process ends when its parent does, even when the parent is killed with SIGKILL (Linux).

    A loader worker's ``worker_init_fn``; a training rank calls it too (its parent is the launcher).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def build_dataset(model, model_args, data_args, training_args, rank: int, world_size: int):
    """The training stream of data rank ``rank`` of ``world_size``: images (VAE and text encoder run every
    step) or precomputed latents."""
    from sd import img2dataset

    img2dataset.configure(img2dataset.ShardOptions(  # .tar/.parquet shards in the lists (inherited by loader workers)
        caption_key=data_args.caption_key, min_original_size=data_args.min_original_size,
        where=tuple(img2dataset.Where.parse(w) for w in data_args.where or ())))
    if data_args.precomputed_latents:  # written by sd/precompute_latents.py for this VAE, text encoder, resolution
        from sd.latent_dataset import LatentDataset

        f = model.latent_factor
        expect = {"resolution": data_args.resolution, "model_max_length": model_args.model_max_length,
                  "latent_shape": [model.vae.config.latent_channels, data_args.resolution // f, data_args.resolution // f],
                  "hidden_shape": [model_args.model_max_length, model.text_encoder.config.hidden_size]}
        return LatentDataset(data_args.file_list, model.tokenizer, drop_caption_prob=data_args.drop_caption_prob,
                             max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
                             rank=rank, world_size=world_size,
                             shuffle_buffer=data_args.shuffle_buffer, expect=expect)
    return TextImagePairDataset(
        data_args.file_list, model.tokenizer, resolution=data_args.resolution, line_format=data_args.line_format,
        interpolation=data_args.interpolation, center_crop=data_args.center_crop,
        drop_caption_prob=data_args.drop_caption_prob, allow_upscale=data_args.allow_upscale,
        max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
        rank=rank, world_size=world_size,
        model_max_length=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer)


class _RaiseInMainThread(paddle.io.IterableDataset):
    """``dataset`` for a DataLoader without workers, whose error reaches the training loop.

    Without workers, Paddle's DataLoader iterates the dataset in a thread of its own; when the dataset raises
    (all records bad, say), that thread dies and the training loop waits for its next batch forever. Here the
    iteration ends instead and the error is kept, for :class:`MicroBatchStreams` to raise.
    """

    def __init__(self, dataset):
        self.dataset, self.error = dataset, None

    def __iter__(self):
        try:
            yield from self.dataset
        except Exception as e:  # noqa: BLE001 - raised again in the main thread (MicroBatchStreams.__iter__)
            self.error = e


class MicroBatchStreams:
    """The batches of ``datasets`` (one per micro-batch k, built for data rank ``data_ranks[k]``) in turn.

    Each batch is the dataset's collated dict without its ``stream_state`` and with ``seed``, the
    :func:`batch_seed` of its data rank and step. Iteration ends when any stream ends.
    """

    def __init__(self, datasets: List, data_ranks: List[int], run_seed: int, batch_size: int, num_workers: int):
        if len(datasets) != len(data_ranks):
            raise ValueError(f"{len(datasets)} datasets for {len(data_ranks)} data ranks")
        self.datasets, self.data_ranks, self.run_seed = datasets, data_ranks, run_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self.positions: Dict[int, Dict[int, int]] = {}  # data rank → loader-worker stream → draws consumed
        self.skipped: Dict[int, Dict[int, int]] = {}  # data rank → stream → records skipped so far
        self.batches = 0  # micro-batches handed out (this process, since the start of the run)
        self.seconds = 0.0  # spent waiting for them

    @property
    def steps(self) -> int:
        """Optimizer steps' worth of batches handed out."""
        return self.batches // len(self.datasets)

    def state(self) -> Dict[str, dict]:
        """{data rank: its streams' positions and skips}, as a checkpoint stores it."""
        return {str(d): {"stream_positions": dict(self.positions.get(d, {})), "skipped": dict(self.skipped.get(d, {}))}
                for d in self.data_ranks}

    def fast_forward(self, steps: int, data_ranks_state: Dict[str, dict]) -> None:
        """Continue after ``steps`` optimizer steps, at the positions a checkpoint stored."""
        self.batches = steps * len(self.datasets)
        for dataset, d in zip(self.datasets, self.data_ranks):
            positions = {int(s): v for s, v in data_ranks_state[str(d)]["stream_positions"].items()}
            dataset.fast_forward(steps * self.batch_size, self.batch_size, self.num_workers, positions=positions)
            self.positions[d] = positions

    def __iter__(self):
        sources = [d if self.num_workers else _RaiseInMainThread(d) for d in self.datasets]
        loaders = [paddle.io.DataLoader(source, batch_size=self.batch_size, num_workers=self.num_workers,
                                        collate_fn=getattr(dataset, "collate_fn", collate_fn),  # latents: their own
                                        worker_init_fn=die_with_parent)
                   for source, dataset in zip(sources, self.datasets)]
        iterators = [iter(loader) for loader in loaders]
        accumulation = len(iterators)
        while True:
            k = self.batches % accumulation
            start = time.perf_counter()
            try:
                batch = next(iterators[k])
            except StopIteration:
                if getattr(sources[k], "error", None) is not None:
                    raise sources[k].error
                return
            self.seconds += time.perf_counter() - start
            d = self.data_ranks[k]
            stream, position, skipped = batch.pop("stream_state").numpy().tolist()  # after the batch's last sample
            self.positions.setdefault(d, {})[stream] = position
            self.skipped.setdefault(d, {})[stream] = skipped
            batch["seed"] = batch_seed(self.run_seed, d, self.batches // accumulation)
            self.batches += 1
            yield batch
