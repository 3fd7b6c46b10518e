"""paddlenlp Trainer for Stable Diffusion: only what differs from the stock Trainer.

* data: the micro-batch streams of sd/train_loader.py (one per accumulation micro-batch, each the
  samples of its slots of the global batch, each sample with its noise seed); on resume they are
  fast-forwarded (no image decoded) instead of the stock Trainer's skip-by-iterating;
* loss: ``StableDiffusionModel.forward`` with the samples' seeds;
* optimizer: one parameter group per trained module, each with its own learning rate;
* the update step (:meth:`StableDiffusionTrainer.update_step`): finite check (all ranks agree) →
  optimizer step → EMA update → counters. A step with a non-finite loss or gradient is skipped; after
  ``--max_nonfinite_steps`` in a row training stops, naming the last good checkpoint;
* checkpoints: the trained modules in ``from_pretrained`` layout (``unet/``, EMA variant,
  ``text_encoder/``) plus ``sd_state.json`` (:class:`sd.runtime.run_state.RunState`: the global batch, every
  slot's stream position, step count, EMA count) beside the Trainer's optimizer/scheduler/trainer state; resume
  loads exactly those. A checkpoint is written under a staging name and renamed into place when complete
  (sd/runtime/checkpoints.py);
* images: on rank 0 at ``first_image_logging_step`` and every ``image_logging_steps``, reconstructions and
  DDIM samples (with the EMA weights when kept) to VisualDL and a PNG; :meth:`StableDiffusionTrainer.log_scalars`
  writes other scalars (the in-training scores) to the same VisualDL log;
* resuming on another layout: ``sd.runtime.run_state.fit_global_batch`` keeps the checkpoint's global batch
  before the data is built.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Dict, Optional

import numpy as np
import paddle
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

from sd.evaluation import sampling
from sd.evaluation.during_training import ScoreCallback
from sd.log import logger
from sd.runtime import tensor_files
from sd.runtime.checkpoints import (
    CheckpointWriteError,
    describe_os_error,
    newest_complete_checkpoint,
    publish,
    staging_root,
)
from sd.runtime.distributed import after_rank_zero_work
from sd.runtime.run_state import DataOrder, Layout, RunState
from sd.train_loader import MicroBatchStreams


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the message names the last good checkpoint."""


def all_finite(tensors, how: str = "auto") -> bool:
    """True when every value of every tensor is finite; one host sync (two when a sum overflows).

    ``how``:
      - ``"fused"``: Paddle's one-kernel check over all tensors (the AMP loss scaler's, here with scale 1, which
        leaves finite values as they are): one launch on a GPU, but on a CPU it reads and rewrites every value;
      - ``"sums"``: one sum per tensor, read only. A sum is finite exactly when no value is NaN or infinite,
        unless finite values overflow it; a non-finite sum is therefore re-checked value by value;
      - ``"each"``: one ``isfinite`` per tensor;
      - ``"auto"``: ``"fused"`` on a GPU, ``"sums"`` elsewhere. The SD v1 UNet's 860 M fp32 gradients on one
        Zen 4 core: sums 0.12 s, each 0.43-0.55 s, fused 0.53-0.66 s per check (docs/performance.md).
    """
    if not tensors:
        return True
    if how == "auto":
        on_gpu = paddle.is_compiled_with_cuda() and tensors[0].place.is_gpu_place()
        how = "fused" if on_gpu and hasattr(paddle._C_ops, "check_finite_and_unscale_") else "sums"
    if how == "fused":
        _, found_inf = paddle._C_ops.check_finite_and_unscale_(
            list(tensors), paddle.ones([1]), paddle.zeros([1], dtype="bool"))
        return not bool(found_inf)
    if how == "sums" and bool(paddle.isfinite(paddle.stack([paddle.sum(t) for t in tensors])).all()):
        return True
    return bool(paddle.stack([paddle.isfinite(t).all() for t in tensors]).all())


class _UpdateStep:
    """The optimizer as the stock training loop sees it: its ``step()`` is the trainer's
    :meth:`StableDiffusionTrainer.update_step`; everything else (state dict, parameter groups,
    ``clear_grad``, the learning rate) is the wrapped optimizer's own."""

    def __init__(self, optimizer, update_step):
        self.inner, self._update_step = optimizer, update_step

    def step(self):
        self._update_step()

    def __getattr__(self, name):
        return getattr(self.inner, name)


class StableDiffusionTrainer(Trainer):
    def __init__(self, model, args, train_dataset, resolution: int, run_config: Optional[dict] = None,
                 micro_datasets: Optional[list] = None, streams: Optional[MicroBatchStreams] = None, **kwargs):
        """``micro_datasets``: one dataset per accumulation micro-batch k, each streaming the slots of data
        rank ``d = dataset_rank · A + k``, [d·b, (d+1)·b) of the global batch (default: ``[train_dataset]``, A = 1)."""
        # --to_static: the model compiles its UNet and VAE encoder itself (StableDiffusionModel.compile_static)
        # instead of paddlenlp converting the whole model, so that the step's numpy draws stay eager
        to_static, args.to_static = args.to_static, False
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        args.to_static = to_static
        if to_static:
            model.compile_static()
        self.micro_datasets = micro_datasets or [train_dataset]
        if len(self.micro_datasets) != args.gradient_accumulation_steps:
            raise ValueError(f"{len(self.micro_datasets)} micro-batch datasets for gradient_accumulation_steps="
                             f"{args.gradient_accumulation_steps}: build one per accumulation step "
                             f"(as the training script does)")
        self.run_config = run_config or {}
        self.sd_model = model
        self.resolution = resolution
        # (sd/build.py passes them started, fast-forwarded to the checkpoint it resumes)
        self.streams = streams or MicroBatchStreams(self.micro_datasets, args.seed, args.dataloader_num_workers)
        self._resume_state: Optional[RunState] = None
        self._image_batch = None
        self._images_logged_at = 0  # the step of the last image log
        self._reader_logged = (0.0, 0)  # reader seconds and batches at the previous log
        self._all_ranks_state: Dict[str, dict] = {}  # all processes' slots, gathered for a multi-process save
        self._timed: Callable[[str, Callable], Callable] = lambda name, fn: fn  # see instrument
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0  # skipped updates (divergence guard)
        self._nonfinite_loss = False  # a micro-batch since the last optimizer step had a non-finite loss
        self.args.ignore_data_skip = True  # the dataset fast-forwards itself (see get_train_dataloader)
        # The optimizer state (AdamW's moments: 6.9 GB at SD v1's size) is written tensor by tensor instead of
        # through one pickle that first copies all of it to the host (read back in _load_optimizer_and_scheduler).
        self._save_ckpt_func = tensor_files.save_state
        groups = [{"params": params, "learning_rate": lr / args.learning_rate}
                  for (name, params), lr in zip(model.trainable_groups(), self._group_lrs())]
        self.optimizer_grouped_parameters = groups  # lr in a group is a multiplier of the scheduler's lr
        if args.eval_captions:  # scores of generated images every --eval_steps (sd/evaluation/during_training.py)
            self.add_callback(ScoreCallback(self))

    def _group_lrs(self):
        a, m = self.args, self.sd_model.args
        lrs = [m.unet_learning_rate or a.learning_rate]
        if m.train_text_encoder:
            lrs.append(m.text_encoder_learning_rate or a.learning_rate)
        return lrs

    # -- data ------------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        a = self.args
        return a.dataset_world_size * a.gradient_accumulation_steps * a.per_device_train_batch_size

    def get_train_dataloader(self):
        """The micro-batch streams (sd/train_loader.py), fast-forwarded to the checkpoint when resuming."""
        if self._resume_state is not None:
            state = self._resume_state
            if state.global_batch != self.global_batch:  # fit_global_batch makes them agree before the data is built
                raise ValueError(f"the checkpoint's global batch is {state.global_batch}, "
                                 f"this run's {self.global_batch}")
            if not self.streams.started:
                self.streams.fast_forward(state.steps, state.slots)
            elif self.streams.steps != state.steps:
                raise ValueError(f"the data streams were started at step {self.streams.steps}, the checkpoint "
                                 f"resumed is at step {state.steps}: build the run with its resume checkpoint")
            self._reader_logged = (self.streams.seconds, self.streams.batches)
            slots, positions = sorted(self.streams.positions), self.streams.positions
            logger.info(f"data streams of slots {slots[0]}-{slots[-1]} fast-forwarded past {state.steps} samples "
                        f"each (at {min(positions.values())}-{max(positions.values())} records read)")
        return self.streams

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False):
        if self._image_batch is None and "pixel_values" in inputs:  # what every image log shows (the same each time)
            self._image_batch = {k: inputs[k] for k in ("pixel_values", "input_ids")}
        loss = model(**inputs)  # images and token ids (or precomputed latents), and the samples' noise seeds
        return (loss, None) if return_outputs else loss

    # -- the update step -------------------------------------------------------------------------
    def training_step(self, model, inputs):
        """Forward and backward of one micro-batch; a non-finite loss is remembered for :meth:`update_step`."""
        loss = super().training_step(model, inputs)
        if not bool(paddle.isfinite(loss).all()):
            self._nonfinite_loss = True
            return paddle.zeros_like(loss)  # keeps the logged running loss finite; the update is skipped
        return loss

    def create_optimizer(self, lr_scheduler=None):
        optimizer = super().create_optimizer(lr_scheduler)
        if not isinstance(optimizer, _UpdateStep):
            self.optimizer = _UpdateStep(optimizer, self.update_step)
        return self.optimizer

    def update_step(self) -> None:
        """One optimizer update, after the gradients of all micro-batches (and ranks) are in.

        1. finite check: skipped when a loss of this step, on any rank, or a gradient is not finite
           (every rank decides alike); after ``--max_nonfinite_steps`` in a row, training stops;
        2. the optimizer step (AdamW, each trained module at its own learning rate);
        3. the EMA update of the UNet;
        4. counters. The stock loop then steps the LR schedule (skipped updates too: the schedule
           follows the step count), clears the gradients and counts the step.
        """
        step = self.state.global_step + 1
        if not self._timed("finite_check", self._update_is_finite)():
            self._skip_update(step)
            return
        self._timed("adamw", self.optimizer.inner.step)()
        if self.sd_model.ema is not None:
            self._timed("ema_update", self.sd_model.ema.update)(self.sd_model.unet)
        self.nonfinite_in_a_row = 0

    def instrument(self, wrap: Callable[[str, Callable], Callable]) -> None:
        """Call the parts of an update and the checkpoint save through ``wrap(name, fn)``, which returns a function
        doing what ``fn`` does (a timer, say): ``finite_check``, ``adamw`` (the optimizer's step), ``ema_update``
        and ``save`` (one whole checkpoint). The model's own parts: :meth:`StableDiffusionModel.instrument`."""
        self._timed = wrap
        self._save_checkpoint = wrap("save", self._save_checkpoint)

    def _update_is_finite(self) -> bool:
        """False when a micro-batch loss of this step, on any rank, or a gradient was not finite."""
        bad = self._nonfinite_loss
        self._nonfinite_loss = False
        if not bad:
            grads = [p.grad for _, params in self.sd_model.trainable_groups() for p in params if p.grad is not None]
            bad = not all_finite(grads)
        if self.args.world_size > 1:  # gradients agree after the all-reduce, losses need not: agree on the decision
            flag = paddle.to_tensor([1.0 if bad else 0.0])
            paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
            bad = bool(flag.item() > 0)
        return not bad

    def _skip_update(self, step: int) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.args.max_nonfinite_steps
        logger.warning(f"step {step}: non-finite loss or gradient, update skipped "
                       f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in this run; limit {limit})")
        if self.nonfinite_in_a_row >= limit:
            last = newest_complete_checkpoint(self.args.output_dir)
            where = (f"the last good checkpoint is {last}: resume from it with a lower --learning_rate "
                     f"(--resume_from_checkpoint {last})") if last else "no checkpoint was written yet"
            raise NonFiniteLossError(f"training stopped at step {step}: {limit} consecutive steps had a non-finite "
                                     f"loss or gradient (no weights were updated with them); {where}")

    def _maybe_log_save_evaluate(self, tr_loss, model, epoch, ignore_keys_for_eval, **kwargs):
        """After each optimizer step (and at the end): rank 0 logs images at ``first_image_logging_step`` and
        every ``image_logging_steps``, then the stock logging and checkpointing."""
        m, step = self.sd_model.args, self.state.global_step
        due = step == m.first_image_logging_step or (m.image_logging_steps > 0 and step % m.image_logging_steps == 0)
        if step > 0 and due and step != self._images_logged_at:
            if self.is_world_process_zero():
                self.log_images(step)
            self._images_logged_at = step
            after_rank_zero_work(f"images-{step}")
        super()._maybe_log_save_evaluate(tr_loss, model, epoch, ignore_keys_for_eval, **kwargs)

    def log(self, logs, **kwargs):
        if "loss" in logs:  # a training log (not the final summary): add what the stock Trainer does not
            if any(self.streams.skipped.values()):
                logs["data_skipped"] = sum(self.streams.skipped.values())  # this process's slots
            if self.nonfinite_total:
                logs["nonfinite_steps_skipped"] = self.nonfinite_total
            # mean seconds per batch spent waiting for the loader since the last log
            seconds = self.streams.seconds - self._reader_logged[0]
            batches = self.streams.batches - self._reader_logged[1]
            logs["reader_seconds_per_step"] = round(seconds / max(batches, 1), 5)
            self._reader_logged = (self.streams.seconds, self.streams.batches)
            if self.optimizer is not None and len(self.optimizer._param_groups) > 1:  # one LR per trained module
                lr = self._get_learning_rate()
                for (name, _), group in zip(self.sd_model.trainable_groups(), self.optimizer._param_groups):
                    logs[f"learning_rate_{name}"] = float(f"{lr * group.get('learning_rate', 1.0):.3e}")
        super().log(logs, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------
    def _save(self, output_dir: Optional[str] = None, state_dict=None, merge_tensor_parallel=False):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        m = self.sd_model
        if m.args.only_save_updated_model:
            m.save_trained(output_dir)
        else:  # a whole pipeline folder, loadable on its own
            m.save_pipeline(output_dir)
        a, data = self.args, self.run_config.get("data", {})
        RunState(global_batch=self.global_batch, slots=self._all_ranks_state or self.streams.state(),
                 steps=self.streams.steps,
                 layout=Layout(ranks=a.dataset_world_size, accumulation=a.gradient_accumulation_steps,
                               per_device_batch=a.per_device_train_batch_size),  # how it was made (information)
                 data_order=DataOrder(seed=a.seed,
                                      file_list=data.get("file_list") and os.path.abspath(data["file_list"]),
                                      shuffle_buffer=data.get("shuffle_buffer")),
                 ema_updates=m.ema.num_updates if m.ema is not None else 0, resolution=self.resolution,
                 model_paths={k: os.path.abspath(v) if v and os.path.exists(v) else v for k, v in m.paths.items()},
                 prediction_type=m.args.prediction_type).write(output_dir)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())
        with open(os.path.join(output_dir, "run_config.json"), "w") as f:  # model and data arguments, as resolved
            json.dump(self.run_config, f, indent=2)

    def _save_checkpoint(self, model, metrics=None):
        """The stock checkpoint, written under ``.incomplete/`` and renamed into place once complete."""
        if self.args.world_size > 1:  # every rank's slot positions go into rank 0's sd_state.json
            gathered = []
            paddle.distributed.all_gather_object(gathered, self.streams.state())
            self._all_ranks_state = {j: s for part in gathered for j, s in part.items()}
        final_root, name = self.args.output_dir, f"checkpoint-{self.state.global_step}"
        staging = staging_root(final_root)
        writer = self.args.should_save
        try:
            if writer and os.path.exists(os.path.join(staging, name)):  # left by a run killed while saving
                shutil.rmtree(os.path.join(staging, name))
            # The stock method writes to <args.output_dir>/checkpoint-N: point it at the staging folder.
            self.args.output_dir = staging
            try:
                super()._save_checkpoint(model, metrics=metrics)
            finally:
                self.args.output_dir = final_root
            if writer:
                publish(os.path.join(staging, name), os.path.join(final_root, name))
        except OSError as e:
            last = newest_complete_checkpoint(final_root)
            raise CheckpointWriteError(
                f"could not write {name} in {final_root}: {describe_os_error(e)}. Training stopped; the newest "
                f"complete checkpoint is {last or 'none'}; rerun the same command to resume from it") from None
        self._all_ranks_state = {}
        # paddlenlp 2.8 rotates only where local_rank == 0, i.e. never in a single process (-1).
        if writer:
            self._rotate_checkpoints()
        after_rank_zero_work(name)

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        # Order by step number, not modification time: the newest checkpoint is never the one deleted.
        super()._rotate_checkpoints(use_mtime=False, output_dir=output_dir or self.args.output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """The optimizer state written by ``tensor_files.save_state`` (a pickled one, from an older checkpoint,
        through the stock method), then the LR schedule; every rank reads the checkpoint itself."""
        path = os.path.join(checkpoint, OPTIMIZER_NAME) if checkpoint else ""
        if not (os.path.isfile(path) and tensor_files.is_safetensors(path)):
            return super()._load_optimizer_and_scheduler(checkpoint)
        state = tensor_files.load_state(path, memmap=True)  # copied into the moments as AdamW creates them
        if state.get("master_weights"):  # bf16/fp16 O2: fp32 master weights, which paddle uses as tensors
            state["master_weights"] = {k: paddle.to_tensor(v) for k, v in state["master_weights"].items()}
        self.optimizer.set_state_dict(state)
        self.lr_scheduler.set_state_dict(paddle.load(os.path.join(checkpoint, SCHEDULER_NAME)))

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        if not resume_from_checkpoint:
            return
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
        state = RunState.read(resume_from_checkpoint)
        logger.info(f"resuming from {resume_from_checkpoint}")
        self.sd_model.load_trained(resume_from_checkpoint)
        self._resume_state = state
        if self.sd_model.ema is not None:
            self.sd_model.ema.num_updates = state.ema_updates

    # -- images ----------------------------------------------------------------------------------
    @paddle.no_grad()
    def log_images(self, step: int, max_images: int = 8) -> str:
        """Originals, VAE reconstructions and DDIM samples (guidance 1 and 7.5) of the first batch's captions;
        the samples use the UNet's EMA weights when training keeps them (``sampling.pipeline_with_ema``)."""
        from PIL import Image

        m = self.sd_model
        batch = self._image_batch
        if batch is None:
            if not getattr(self, "_said_no_images", False):
                logger.warning("image logging needs image batches: off with --precomputed_latents")
                self._said_no_images = True
            return ""
        n = min(max_images, batch["pixel_values"].shape[0])
        pixels = batch["pixel_values"][:n]
        prompts = m.tokenizer.batch_decode(batch["input_ids"][:n].numpy().tolist(), skip_special_tokens=True)
        originals = sampling.decode_latents_to_images(m.vae, m.vae.encode(pixels).latent_dist.mean * m.scaling_factor)
        arr = ((pixels.clip(-1, 1) + 1) * 127.5).round().astype("uint8").transpose([0, 2, 3, 1]).numpy()
        rows = {"original": [Image.fromarray(a) for a in arr], "reconstruction": originals}
        with sampling.pipeline_with_ema(m) as pipe:
            for g in (1.0, 7.5):
                rows[f"guidance_{g}"] = sampling.generate(pipe, prompts, guidance_scale=g,
                                                          num_inference_steps=m.args.num_inference_steps,
                                                          height=self.resolution, width=self.resolution,
                                                          seeds=list(range(n)))
        grid = sampling.make_grid([im for r in rows.values() for im in r], rows=len(rows), cols=n, labels=list(rows))
        folder = os.path.join(self.args.output_dir, "images")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:07d}.png")
        grid.save(path)
        with open(os.path.join(folder, f"step-{step:07d}.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
        writer = self._visualdl_writer()
        if writer is not None:
            for name, images in rows.items():
                strip = sampling.make_grid(images, rows=1, cols=len(images))
                writer.add_image(tag=f"images/{name}", img=np.asarray(strip), step=step)
            writer.flush()
        logger.info(f"step {step}: images written to {path}")
        return path

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step`` to the run's VisualDL log (nothing when VisualDL is off)."""
        writer = self._visualdl_writer()
        if writer is None:
            return
        for tag, value in scalars.items():
            writer.add_scalar(tag=tag, value=float(value), step=step)
        writer.flush()

    def _visualdl_writer(self):
        """The LogWriter of paddlenlp's VisualDL callback (one event file per run), if VisualDL is on."""
        for cb in self.callback_handler.callbacks:
            if getattr(cb, "vdl_writer", None) is not None:
                return cb.vdl_writer
        return None
