"""Run the training entry point with faults injected (used by tests/integration/test_faults.py).

    PYTHONPATH=. python tests/helpers/fault_runner.py <train_txt2img_laion400m_trainer.py arguments>

from the repository root: the caller puts the repository on PYTHONPATH (the tests through
``tests.helpers.common.env_with_root``), which a rank that ``paddle.distributed.launch`` starts inherits.

Faults are chosen by environment variables:
  SD_FAULT_NAN_BATCHES="2,4-"   the loss of these batch indices (0-based, "4-" = 4 and every later one)
                                is multiplied by NaN, so the loss and every gradient are non-finite;
  SD_FAULT_FAIL_SAVE_STEP=4     saving checkpoint-4 fails with "No space left on device" after the
                                UNet weights were written (a disk filling up mid-save);
  SD_FAULT_KILL_SAVE_STEP=4     the process kills itself (SIGKILL) while saving checkpoint-4, after the UNet
                                weights were written;
  SD_FAULT_KILL_FAST_FORWARD=1  the process kills itself (SIGKILL) while fast-forwarding its data streams
                                on resume;
  SD_FAULT_RANK_DIES="1:2:raise"  rank 1 fails at its batch index 2 with a FileNotFoundError (as for a
                                part file missing on one node); ":kill" instead kills it with SIGKILL.
  SD_FAULT_DATASET_BUG=1        the image dataset's per-record function raises AttributeError (a bug in the
                                dataset code), in whichever process streams it (loader workers too);
and one spy:
  SD_SPY_DIR=DIR                each rank appends a line per batch to DIR/rank-R.txt: per sample, its noise
                                seed, a hash of its image and a hash of its token ids (``seed:image:ids``).
"""

import errno
import os
import runpy
import signal
import sys

from sd.model import StableDiffusionModel
from sd.sd_trainer import StableDiffusionTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _batches(spec: str):
    fixed, start = set(), None
    for part in filter(None, spec.split(",")):
        if part.endswith("-"):
            start = int(part[:-1])
        else:
            fixed.add(int(part))
    return lambda i: i in fixed or (start is not None and i >= start)


if os.environ.get("SD_FAULT_NAN_BATCHES"):
    is_bad = _batches(os.environ["SD_FAULT_NAN_BATCHES"])
    forward, calls = StableDiffusionModel.forward, [0]

    def nan_forward(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls[0] += 1
        return loss * float("nan") if is_bad(calls[0] - 1) else loss

    StableDiffusionModel.forward = nan_forward


def break_save(step: int, then) -> None:
    """Saving checkpoint-``step`` writes the trained modules, then calls ``then(output_dir)`` (which raises or
    kills)."""
    save, broken_dir = StableDiffusionTrainer._save, f"checkpoint-{step}"

    def broken_save(self, output_dir=None, *args, **kwargs):
        if output_dir and os.path.basename(os.path.normpath(output_dir)) == broken_dir:
            self.sd_model.save_trained(output_dir)  # part of the checkpoint reaches the disk
            then(output_dir)
        return save(self, output_dir, *args, **kwargs)

    StableDiffusionTrainer._save = broken_save


def disk_full(output_dir):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "sd_state.json"))


if os.environ.get("SD_FAULT_FAIL_SAVE_STEP"):
    break_save(int(os.environ["SD_FAULT_FAIL_SAVE_STEP"]), disk_full)

if os.environ.get("SD_FAULT_KILL_SAVE_STEP"):
    break_save(int(os.environ["SD_FAULT_KILL_SAVE_STEP"]), lambda output_dir: os.kill(os.getpid(), signal.SIGKILL))

if os.environ.get("SD_FAULT_KILL_FAST_FORWARD"):
    from sd.text_image_pair_dataset import TextImagePairDataset

    def killed_fast_forward(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    TextImagePairDataset.fast_forward = killed_fast_forward

if os.environ.get("SD_FAULT_RANK_DIES"):
    rank, batch, how = os.environ["SD_FAULT_RANK_DIES"].split(":")
    compute_loss = StableDiffusionTrainer.compute_loss

    def dying_compute_loss(self, *args, **kwargs):
        if self.args.process_index == int(rank) and self.streams.batches - 1 == int(batch):  # this batch's index
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise FileNotFoundError(errno.ENOENT, "injected: part file missing on this node", "part-00001.gz")
        return compute_loss(self, *args, **kwargs)

    StableDiffusionTrainer.compute_loss = dying_compute_loss

if os.environ.get("SD_FAULT_DATASET_BUG"):
    from sd.text_image_pair_dataset import TextImagePairDataset

    def buggy_make_sample(self, source, record, rng):
        return self.pixel_cache  # no such attribute

    TextImagePairDataset._make_sample = buggy_make_sample

if os.environ.get("SD_SPY_DIR"):
    import hashlib

    import paddle

    spied_forward = StableDiffusionModel.forward

    def spy_forward(self, input_ids, pixel_values, seeds, **kwargs):
        def digest(a):
            return hashlib.sha1(a.tobytes()).hexdigest()[:16]

        samples = [f"{s}:{digest(x)}:{digest(i)}" for s, x, i in zip(seeds, pixel_values.numpy(), input_ids.numpy())]
        path = os.path.join(os.environ["SD_SPY_DIR"], f"rank-{paddle.distributed.get_rank()}.txt")
        with open(path, "a") as f:
            f.write(" ".join(samples) + "\n")
        return spied_forward(self, input_ids, pixel_values, seeds, **kwargs)

    StableDiffusionModel.forward = spy_forward

sys.argv = [os.path.join(ROOT, "train_txt2img_laion400m_trainer.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
