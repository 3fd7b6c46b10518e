"""A checkpoint's own state file (``sd_state.json``) and the rules for resuming from it.

:class:`RunState` is the file's one owner: the trainer writes it last into every checkpoint (it marks the
checkpoint complete, sd/runtime/checkpoints.py), resume reads it back, and sampling (sd/components) reads
the model folders, resolution and prediction type a checkpoint was trained with. Its fields are the JSON
keys, in the order they are written::

    global_batch     G = ranks × accumulation × per-device batch, the number of slots
    slots            {"j": {"position": records drawn, "skipped": records skipped}} for each slot j
    steps            optimizer steps' worth of samples each slot handed out
    layout           the ranks, accumulation and per-device batch that wrote it (information only)
    data_order       the data order's seed, file list (absolute) and shuffle buffer
    ema_updates      EMA updates so far (0 without EMA)
    resolution       training resolution in pixels
    model_paths      {vae, text_encoder, tokenizer, unet, scheduler: path (absolute when local) or hub name}
    prediction_type  "epsilon" or "v_prediction"

The resume rules (:func:`find_resume_checkpoint`, :func:`fit_global_batch`, :func:`warn_if_schedule_moves`)
read only argument values by name, so this module imports nothing of the model, trainer or arguments (and
the logger, thus paddlenlp, only when a rule runs: reading a checkpoint's state stays a light import).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, Optional

from sd.runtime.checkpoints import STATE_FILE, TRAINER_STATE_FILE, newest_complete_checkpoint
from sd.runtime.distributed import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class Layout:
    """The layout of the global batch that wrote a checkpoint (R·A·b = G)."""

    ranks: int
    accumulation: int
    per_device_batch: int


@dataclass
class DataOrder:
    """What fixes the order of the records besides the global batch; resuming with other values is allowed
    (and logged)."""

    seed: int
    file_list: Optional[str]
    shuffle_buffer: Optional[int]


@dataclass
class RunState:
    """The contents of ``sd_state.json`` (see the module docstring for each field)."""

    global_batch: int
    slots: Dict[str, Dict[str, int]]
    steps: int
    layout: Layout
    data_order: DataOrder
    ema_updates: int
    resolution: int
    model_paths: Dict[str, Optional[str]]
    prediction_type: str

    def problem(self) -> Optional[str]:
        """What is wrong with the values (the first thing found), or None."""
        if not _is_int(self.global_batch, 1):
            return f"global_batch {self.global_batch!r} is not a positive integer"
        if not isinstance(self.slots, dict):
            return "slots is not a mapping of slot → position"
        for j, slot in self.slots.items():
            whole = isinstance(slot, dict) and set(slot) == {"position", "skipped"} and all(map(_is_int, slot.values()))
            if not (isinstance(j, str) and j.isdigit() and whole):
                return f"slot {j!r} is not {{\"position\": n, \"skipped\": n}} with whole n ≥ 0"
        if not _is_int(self.steps):
            return f"steps {self.steps!r} is not a whole number ≥ 0"
        layout = (self.layout.ranks, self.layout.accumulation, self.layout.per_device_batch)
        if not all(_is_int(v, 1) for v in layout) or layout[0] * layout[1] * layout[2] != self.global_batch:
            return f"layout {asdict(self.layout)} does not make the global batch {self.global_batch}"
        order = self.data_order
        if not (_is_int(order.seed) and (order.file_list is None or isinstance(order.file_list, str))
                and (order.shuffle_buffer is None or _is_int(order.shuffle_buffer))):
            return f"data_order {asdict(order)} is not (whole seed, file list or null, whole shuffle buffer or null)"
        if not _is_int(self.ema_updates):
            return f"ema_updates {self.ema_updates!r} is not a whole number ≥ 0"
        if not _is_int(self.resolution, 1):
            return f"resolution {self.resolution!r} is not a positive integer"
        if not (isinstance(self.model_paths, dict)
                and all(isinstance(v, str) or v is None for v in self.model_paths.values())):
            return "model_paths is not a mapping of component → path or name"
        if self.prediction_type not in PREDICTION_TYPES:
            return f"prediction_type {self.prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
        return None

    def write(self, folder: str) -> str:
        """Write ``folder/sd_state.json`` (indented JSON, keys in field order); returns its path."""
        problem = self.problem()
        assert problem is None, problem  # the trainer fills every field from its own state
        path = os.path.join(folder, STATE_FILE)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def read(cls, folder: str) -> "RunState":
        """The state of the checkpoint ``folder``.

        Raises:
            FileNotFoundError: ``folder`` holds no ``sd_state.json``.
            ValueError: the file is not JSON, lacks a field, has one this version does not know, or a value
                is out of range (one line naming the file).
        """
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} is not a checkpoint of this trainer (no {STATE_FILE})")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; resume from an older "
                             f"one or start afresh with --overwrite_output_dir") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path} holds no JSON object: the checkpoint is damaged")
        if "global_batch" not in raw:
            raise ValueError(f"{path} holds no slot positions (written by an older version of this trainer, whose "
                             f"data order was per data rank): start afresh with --overwrite_output_dir")
        names = [f.name for f in fields(cls)]
        missing, unknown = [n for n in names if n not in raw], sorted(set(raw) - set(names))
        if missing or unknown:
            what = f"lacks {', '.join(missing)}" if missing else f"has unknown field(s) {', '.join(unknown)}"
            raise ValueError(f"{path} {what}: not a state file of this version of the trainer")
        try:
            state = cls(**{**raw, "layout": Layout(**raw["layout"]), "data_order": DataOrder(**raw["data_order"])})
        except TypeError:  # layout or data_order without exactly their keys (or not objects)
            raise ValueError(f"{path}: layout or data_order does not have the fields "
                             f"{[f.name for f in fields(Layout)]} / {[f.name for f in fields(DataOrder)]}") from None
        problem = state.problem()
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        return state


# ---------------------------------------------------------------------------------------------
# Resume rules
# ---------------------------------------------------------------------------------------------
def find_resume_checkpoint(training_args) -> Optional[str]:
    """``--resume_from_checkpoint`` if given, else the newest checkpoint in output_dir (unless
    ``--overwrite_output_dir``)."""
    from sd.log import logger

    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if os.path.isdir(training_args.output_dir) and not training_args.overwrite_output_dir:
        last = newest_complete_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info(f"found {last}, the newest complete checkpoint: resuming automatically "
                        f"(pass --overwrite_output_dir to start afresh)")
        return last
    return None


def fit_global_batch(training_args, data_args, checkpoint: Optional[str]) -> None:
    """Resuming ``checkpoint`` with ranks × accumulation × per-device batch ≠ its global batch G: keep G.

    Slot j of G is a stream of its own whichever rank reads it (sd/train_loader.py), so any layout with
    R·A·b = G continues the run exactly. A layout given so is taken as it is. Otherwise, on R ranks,
    the per-device batch becomes G / (R·A) if that is whole (the accumulation stays), else the
    accumulation becomes G / (R·b) (the per-device batch stays); when neither is, the run stops with
    one line. A data order other than the checkpoint's (seed, file list, shuffle buffer) is allowed and
    logged: the run goes on, but not as the uninterrupted one would have.

    Args:
        training_args: ``dataset_world_size``, ``gradient_accumulation_steps``, ``per_device_train_batch_size``
            (the last two changed in place), ``seed``.
        data_args: ``file_list``, ``shuffle_buffer``.
        checkpoint: the folder to resume, or None (nothing to do; nor when it has no state file, which
            the trainer's resume reports).
    """
    if not (checkpoint and os.path.isfile(os.path.join(checkpoint, STATE_FILE))):
        return
    from sd.log import logger

    state = RunState.read(checkpoint)
    saved, a = state.global_batch, training_args
    ranks, accumulation, batch = a.dataset_world_size, a.gradient_accumulation_steps, a.per_device_train_batch_size
    if ranks * accumulation * batch != saved:
        if saved % (ranks * accumulation) == 0:
            a.per_device_train_batch_size = saved // (ranks * accumulation)
            logger.warning(f"resuming {checkpoint} (global batch {saved}) on {ranks} rank(s): "
                           f"--per_device_train_batch_size {batch} → {a.per_device_train_batch_size}")
        elif saved % (ranks * batch) == 0:
            a.gradient_accumulation_steps = saved // (ranks * batch)
            logger.warning(f"resuming {checkpoint} (global batch {saved}) on {ranks} rank(s): "
                           f"--gradient_accumulation_steps {accumulation} → {a.gradient_accumulation_steps}")
        else:
            raise UserError(f"{checkpoint} was trained with a global batch of {saved} samples, which {ranks} rank(s) "
                            f"cannot make with --gradient_accumulation_steps {accumulation} or "
                            f"--per_device_train_batch_size {batch}: give both so that ranks × accumulation × "
                            f"per-device batch = {saved}, run on a number of ranks that divides {saved}, or start "
                            f"afresh with --overwrite_output_dir")
    now = {"seed": a.seed, "file_list": os.path.abspath(data_args.file_list),
           "shuffle_buffer": data_args.shuffle_buffer}
    changed = {k: (v, now[k]) for k, v in asdict(state.data_order).items() if v is not None and v != now[k]}
    if changed:
        what = ", ".join(f"--{k} {old} → {new}" for k, (old, new) in changed.items())
        logger.warning(f"resuming {checkpoint} with another data order ({what}): training goes on from its slot "
                       "positions, but not on the batches the interrupted run would have seen")


def warn_if_schedule_moves(training_args, checkpoint: Optional[str]) -> None:
    """A decaying LR schedule is laid over ``--max_steps``: resuming a checkpoint toward another step count
    changes the LR from there on (e.g. a linear decay that ended at 0 after 1000 steps restarts at a third
    of its peak when resumed toward 1500), which is logged."""
    path = os.path.join(checkpoint, TRAINER_STATE_FILE) if checkpoint else None
    schedule = getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type)
    if schedule in ("constant", "constant_with_warmup") or not (path and os.path.isfile(path)):
        return
    from sd.log import logger

    with open(path) as f:
        state = json.load(f)
    planned, step = state.get("max_steps"), state.get("global_step")
    if planned is not None and planned != training_args.max_steps:
        logger.warning(f"resuming {checkpoint}, a run of {planned} steps, with --max_steps {training_args.max_steps}: "
                       f"the {schedule} LR schedule now runs over {training_args.max_steps} steps, so from step {step} "
                       f"the LR is the one a {training_args.max_steps}-step run has there, after {step} steps on the "
                       f"{planned}-step schedule (a fresh run in another --output_dir follows one schedule throughout)")
