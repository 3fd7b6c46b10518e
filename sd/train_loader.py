"""The training loader: the micro-batches of one process, each the samples of its slots of the global batch.

The global batch of G = R·A·b samples (R ranks, A accumulation steps, b per device) has G slots,
each a record stream of its own (sd/data/record_stream.py). Micro-batch k of an optimizer step on rank r
is data rank d = r·A + k and holds slots [d·b, (d+1)·b); every random draw of sample j at step t
comes from its slot's stream (crop, caption dropout) or from :func:`sample_seed` (run seed, j, t)
(posterior sample, noise, timestep). So any R, A, b with the same product train on the same samples
with the same noise, up to floating-point summation order: 2 GPUs × 4 = 1 GPU × 8 = 1 GPU × 4 × 2.

:class:`MicroBatchStreams` is what the trainer iterates. It hands out the micro-batches in turn, each
with the ``seeds`` of its samples, and keeps what a checkpoint needs and the log shows: every slot's
stream position and skip count, the batches handed out, and the time spent waiting for them. On
resume it fast-forwards the slots (no image decoded). Loader workers: a micro-batch's DataLoader has
W' = min(W, b) workers, worker w streaming the w-th of W' contiguous blocks of its slots; W'
consecutive loader outputs are one micro-batch, joined in worker order (= slot order), so nothing
depends on W.
"""

from __future__ import annotations

import time
from typing import Dict, List

import numpy as np
import paddle

from sd.runtime.distributed import die_with_parent
from sd.text_image_pair_dataset import collate_fn


def sample_seed(run_seed: int, slot: int, step: int) -> int:
    """Seed of the model's random draws for the sample of ``slot`` at optimizer step ``step`` (0-based).

    The 1 keeps these apart from the data streams' own draws, seeded ``(seed, 0, slot, draw)``.
    """
    return int(np.random.SeedSequence([run_seed, 1, slot, step]).generate_state(1)[0])


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
    """The micro-batches of ``datasets`` (one per micro-batch k, each streaming its slots) in turn.

    Each batch is the collated dict of its slots' samples (in slot order) without ``stream_state``, with
    ``seeds``: the :func:`sample_seed` of each sample. Iteration ends when any stream ends.
    """

    def __init__(self, datasets: List, run_seed: int, num_workers: int):
        self.datasets, self.run_seed, self.num_workers = datasets, run_seed, num_workers
        self.positions: Dict[int, int] = {}  # slot → draws consumed
        self.skipped: Dict[int, int] = {}  # slot → records skipped so far
        self.batches = 0  # micro-batches handed out (this process, since the start of the run)
        self.seconds = 0.0  # spent waiting for them

    @property
    def steps(self) -> int:
        """Optimizer steps' worth of batches handed out."""
        return self.batches // len(self.datasets)

    def state(self) -> Dict[str, dict]:
        """{slot: its stream position and skips}, as a checkpoint stores it."""
        return {str(j): {"position": self.positions.get(j, 0), "skipped": self.skipped.get(j, 0)}
                for dataset in self.datasets for j in dataset.slots}

    def fast_forward(self, steps: int, slots_state: Dict[str, dict]) -> None:
        """Continue after ``steps`` optimizer steps, at the positions a checkpoint stored."""
        self.batches = steps * len(self.datasets)
        for dataset in self.datasets:
            positions = {j: slots_state[str(j)]["position"] for j in dataset.slots}
            dataset.fast_forward(steps, positions=positions)
            self.positions.update(positions)
            self.skipped.update({j: slots_state[str(j)]["skipped"] for j in dataset.slots})

    def _micro_batches(self, dataset):
        """Endless joined micro-batches of one dataset: W' loader outputs each (see the module docstring)."""
        workers = min(self.num_workers, len(dataset.slots))
        source = dataset if workers else _RaiseInMainThread(dataset)
        loader = paddle.io.DataLoader(source, batch_size=None, num_workers=workers,
                                      collate_fn=getattr(dataset, "collate_fn", collate_fn),  # latents: their own
                                      worker_init_fn=die_with_parent)
        parts = iter(loader)
        while True:
            batch = []
            for _ in range(max(workers, 1)):
                try:
                    batch.append(next(parts))
                except StopIteration:
                    if getattr(source, "error", None) is not None:
                        raise source.error
                    return
            yield batch[0] if len(batch) == 1 else {k: paddle.concat([b[k] for b in batch]) for k in batch[0]}

    def __iter__(self):
        streams = [self._micro_batches(dataset) for dataset in self.datasets]
        accumulation = len(streams)
        while True:
            k = self.batches % accumulation
            start = time.perf_counter()
            batch = next(streams[k], None)
            if batch is None:
                return
            self.seconds += time.perf_counter() - start
            step = self.batches // accumulation
            slots = []
            for slot, position, skipped in batch.pop("stream_state").numpy().tolist():  # after each sample
                self.positions[slot], self.skipped[slot] = position, skipped
                slots.append(slot)
            batch["seeds"] = [sample_seed(self.run_seed, j, step) for j in slots]
            self.batches += 1
            yield batch
