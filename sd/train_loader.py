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
depends on W. An exception in a loader worker is raised again in the training process, as itself.
"""

from __future__ import annotations

import pickle
import time
import traceback
from typing import Dict, List, Optional

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


WORKER_ERROR = "loader_worker_error"  # the key of a loader worker's report of its exception (see _ReportFromWorker)


class LoaderWorkerError(RuntimeError):
    """A loader worker's exception that could not be carried to the main process as itself (it does not pickle)."""


class _ReportFromWorker(paddle.io.IterableDataset):
    """``dataset`` for a DataLoader with workers, whose error reaches the training loop as it was raised.

    Paddle re-raises a worker's exception in its loader thread, which prints it and kills its queue, and the
    training loop then fails with "Blocking queue is killed" (two tracebacks, the reason inside). Here a worker
    that raises sends a report of the exception as its next output instead (``{WORKER_ERROR: uint8 bytes}``,
    through the loader like any batch, so it arrives in order); :func:`_raise_reported` raises it in the main
    process, with the worker's traceback text in ``worker_traceback`` and the file that raised it in
    ``raised_in`` (sd/runtime/distributed.py reports it as the main process's own: one line or its traceback).
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        try:
            yield from self.dataset
        except Exception as e:  # noqa: BLE001 - reported to the main process, which raises it (_raise_reported)
            yield {WORKER_ERROR: np.frombuffer(_report(e), dtype=np.uint8)}

    @staticmethod
    def collate(collate):
        """``collate`` for the batches, a report passed on as it is."""
        return lambda part: part if isinstance(part, dict) and WORKER_ERROR in part else collate(part)


def _report(e: Exception) -> bytes:
    """Pickled ``(exception or None when it does not pickle, "Type: message", traceback text, file that raised)``."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    raised_in: Optional[str] = tb.tb_frame.f_code.co_filename if tb is not None else None
    try:
        exc = pickle.loads(pickle.dumps(e))
    except (pickle.PicklingError, TypeError, AttributeError):  # unpicklable fields, or a constructor pickle cannot call
        exc = None
    return pickle.dumps((exc, f"{type(e).__name__}: {e}", "".join(traceback.format_exception(e)), raised_in))


def _raise_reported(report: np.ndarray) -> None:
    """Raise the exception a loader worker reported (see :class:`_ReportFromWorker`)."""
    exc, summary, text, raised_in = pickle.loads(np.asarray(report).tobytes())
    if exc is None:
        exc = LoaderWorkerError(summary)
    exc.worker_traceback, exc.raised_in = text, raised_in
    raise exc


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
        self._parts = None  # per dataset, the iterator of its loader's outputs (its workers run from start())

    @property
    def steps(self) -> int:
        """Optimizer steps' worth of batches handed out."""
        return self.batches // len(self.datasets)

    def state(self) -> Dict[str, dict]:
        """{slot: its stream position and skips}, as a checkpoint stores it."""
        return {str(j): {"position": self.positions.get(j, 0), "skipped": self.skipped.get(j, 0)}
                for dataset in self.datasets for j in dataset.slots}

    def start(self) -> None:
        """Create the loaders and start their workers (forked now: see sd/build.py for why before the model).
        Iterating starts them otherwise."""
        if self._parts is None:
            self._parts = [self._loader_outputs(dataset) for dataset in self.datasets]

    @property
    def started(self) -> bool:
        return self._parts is not None

    def fast_forward(self, steps: int, slots_state: Dict[str, dict]) -> None:
        """Continue after ``steps`` optimizer steps, at the positions a checkpoint stored (before :meth:`start`:
        the loader workers stream from where the datasets are when they start)."""
        if self.started:
            raise RuntimeError("fast_forward after the loader workers started: they would not see it")
        self.batches = steps * len(self.datasets)
        for dataset in self.datasets:
            positions = {j: slots_state[str(j)]["position"] for j in dataset.slots}
            dataset.fast_forward(steps, positions=positions)
            self.positions.update(positions)
            self.skipped.update({j: slots_state[str(j)]["skipped"] for j in dataset.slots})

    def _loader_outputs(self, dataset):
        """(the loader's output iterator, its source, its number of workers) for ``dataset``."""
        workers = min(self.num_workers, len(dataset.slots))
        source = _ReportFromWorker(dataset) if workers else _RaiseInMainThread(dataset)
        collate = getattr(dataset, "collate_fn", collate_fn)  # latents: their own
        loader = paddle.io.DataLoader(source, batch_size=None, num_workers=workers,
                                      collate_fn=_ReportFromWorker.collate(collate) if workers else collate,
                                      worker_init_fn=die_with_parent)
        return iter(loader), source, workers

    def _micro_batches(self, parts, source, workers):
        """Endless joined micro-batches of one dataset: W' loader outputs each (see the module docstring)."""
        while True:
            batch = []
            for _ in range(max(workers, 1)):
                part = next(parts, None)
                if part is None:  # raised outside an except block: no "during handling of StopIteration" traceback
                    if getattr(source, "error", None) is not None:
                        raise source.error
                    return
                batch.append(part)
                if WORKER_ERROR in part:
                    _raise_reported(part[WORKER_ERROR].numpy())
            yield batch[0] if len(batch) == 1 else {k: paddle.concat([b[k] for b in batch]) for k in batch[0]}

    def __iter__(self):
        self.start()
        streams = [self._micro_batches(*parts) for parts in self._parts]
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
