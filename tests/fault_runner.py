"""Run the training entry point with faults injected (used by tests/test_faults.py).

    python tests/fault_runner.py <train_txt2img_laion400m_trainer.py arguments>

Faults are chosen by environment variables:
  SD_FAULT_NAN_BATCHES="2,4-"   the loss of these batch indices (0-based, "4-" = 4 and every later one)
                                is multiplied by NaN, so the loss and every gradient are non-finite;
  SD_FAULT_FAIL_SAVE_STEP=4     saving checkpoint-4 fails with "No space left on device" after the
                                UNet weights were written (a disk filling up mid-save).
"""

import errno
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sd.model import StableDiffusionModel  # noqa: E402
from sd.sd_trainer import StableDiffusionTrainer  # noqa: E402


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

if os.environ.get("SD_FAULT_FAIL_SAVE_STEP"):
    fail_dir = f"checkpoint-{int(os.environ['SD_FAULT_FAIL_SAVE_STEP'])}"
    save = StableDiffusionTrainer._save

    def failing_save(self, output_dir=None, *args, **kwargs):
        if output_dir and os.path.basename(os.path.normpath(output_dir)) == fail_dir:
            self.sd_model.save_trained(output_dir)  # part of the checkpoint reaches the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "sd_state.json"))
        return save(self, output_dir, *args, **kwargs)

    StableDiffusionTrainer._save = failing_save

sys.argv = [os.path.join(ROOT, "train_txt2img_laion400m_trainer.py")] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
