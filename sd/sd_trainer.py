"""paddlenlp Trainer for Stable Diffusion: only what differs from the stock Trainer.

* data: the micro-batch streams of sd/train_loader.py (one per accumulation micro-batch, each a data
  rank of its own, each batch with its noise seed); on resume they are fast-forwarded (no image
  decoded) instead of the stock Trainer's skip-by-iterating;
* loss: ``StableDiffusionModel.forward`` with the micro-batch's seed;
* optimizer: one parameter group per trained module, each with its own learning rate;
* the update step (:meth:`StableDiffusionTrainer.update_step`): finite check (all ranks agree) →
  optimizer step → EMA update → counters. A step with a non-finite loss or gradient is skipped; after
  ``--max_nonfinite_steps`` in a row training stops, naming the last good checkpoint;
* checkpoints: the trained modules in ``from_pretrained`` layout (``unet/``, EMA variant,
  ``text_encoder/``) plus ``sd_state.json`` (every rank's data-stream positions, batch count, EMA
  count) beside the Trainer's optimizer/scheduler/trainer state; resume loads exactly those. A
  checkpoint is written under a staging name and renamed into place when complete (sd/checkpoints.py);
* images: on rank 0 at ``first_image_logging_step`` and every ``image_logging_steps``, reconstructions and
  DDIM samples to VisualDL and a PNG.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional

import numpy as np
import paddle
from paddlenlp.trainer import Trainer

from sd import sampling
from sd.checkpoints import (STATE_FILE, CheckpointWriteError, describe_os_error, newest_complete_checkpoint, publish,
                            staging_root)
from sd.distributed import after_rank_zero_work
from sd.log import logger
from sd.train_eval import ScoreCallback
from sd.train_loader import MicroBatchStreams


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the message names the last good checkpoint."""


def all_finite(tensors, fused: bool = True) -> bool:
    """True when every value of every tensor is finite; one host sync.

    ``fused``: Paddle's one-kernel check over all tensors (the AMP loss scaler's, here with scale 1, which
    leaves finite values as they are), when this build has it: 206 UNet gradients of the test kit take
    3-6 ms that way on CPU, 12-18 ms with one ``isfinite`` per tensor (the fallback).
    """
    if not tensors:
        return True
    check = getattr(paddle._C_ops, "check_finite_and_unscale_", None) if fused else None
    if check is not None:
        _, found_inf = check(list(tensors), paddle.ones([1]), paddle.zeros([1], dtype="bool"))
        return not bool(found_inf)
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
                 micro_datasets: Optional[list] = None, **kwargs):
        """``micro_datasets``: one dataset per accumulation micro-batch k, each built for data rank
        ``dataset_rank · A + k`` of ``dataset_world_size · A`` (default: ``[train_dataset]``, A = 1)."""
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
                             f"{args.gradient_accumulation_steps}: build one per accumulation step (as the training script does)")
        self.run_config = run_config or {}
        self.sd_model = model
        self.resolution = resolution
        accumulation = args.gradient_accumulation_steps
        self.streams = MicroBatchStreams(self.micro_datasets, [args.dataset_rank * accumulation + k for k in range(accumulation)],
                                         args.seed, args.per_device_train_batch_size, args.dataloader_num_workers)
        self._resume_state: Optional[dict] = None
        self._image_batch = None
        self._images_logged_at = 0  # the step of the last image log
        self._reader_logged = (0.0, 0)  # reader seconds and batches at the previous log
        self._all_ranks_state: Dict[str, dict] = {}  # all processes' data ranks, gathered for a multi-process save
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0  # skipped updates (divergence guard)
        self._nonfinite_loss = False  # a micro-batch since the last optimizer step had a non-finite loss
        self.args.ignore_data_skip = True  # the dataset fast-forwards itself (see get_train_dataloader)
        groups = [{"params": params, "learning_rate": lr / args.learning_rate}
                  for (name, params), lr in zip(model.trainable_groups(), self._group_lrs())]
        self.optimizer_grouped_parameters = groups  # lr in a group is a multiplier of the scheduler's lr
        if args.eval_captions:  # scores of generated images every --eval_steps (sd/train_eval.py)
            self.add_callback(ScoreCallback(self))

    def _group_lrs(self):
        a, m = self.args, self.sd_model.args
        lrs = [m.unet_learning_rate or a.learning_rate]
        if m.train_text_encoder:
            lrs.append(m.text_encoder_learning_rate or a.learning_rate)
        return lrs

    # -- data ------------------------------------------------------------------------------------
    @property
    def data_world_size(self) -> int:
        return self.args.dataset_world_size * self.args.gradient_accumulation_steps

    def get_train_dataloader(self):
        """The micro-batch streams (sd/train_loader.py), fast-forwarded to the checkpoint when resuming."""
        batch_size, workers = self.args.per_device_train_batch_size, self.args.dataloader_num_workers
        if self._resume_state is not None:
            state = self._resume_state
            if (state.get("batch_size", batch_size), state.get("num_workers", workers)) != (batch_size, workers):
                raise ValueError(f"resuming needs the checkpoint's per-device batch size and loader workers "
                                 f"({state['batch_size']}, {state['num_workers']}), got ({batch_size}, {workers})")
            if state.get("data_world_size") != self.data_world_size:
                raise ValueError(f"the checkpoint was written with {state.get('data_world_size')} data ranks (ranks × "
                                 f"accumulation steps), this run has {self.data_world_size}: resume with the same "
                                 f"number of devices and --gradient_accumulation_steps (every rank's data stream is "
                                 f"part of the checkpoint), or start a new run with --overwrite_output_dir")
            self.streams.fast_forward(state["steps_per_data_rank"], state["data_ranks"])
            self._reader_logged = (self.streams.seconds, self.streams.batches)
            logger.info(f"data streams fast-forwarded past {state['steps_per_data_rank']} batches per data rank "
                        f"(positions {self.streams.positions})")
        return self.streams

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False):
        if self._image_batch is None and "pixel_values" in inputs:  # what every image log shows (the same each time)
            self._image_batch = {k: inputs[k] for k in ("pixel_values", "input_ids")}
        loss = model(**inputs)  # images and token ids (or precomputed latents), and the micro-batch's noise seed
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
        if not self._update_is_finite():
            self._skip_update(step)
            return
        self.optimizer.inner.step()
        if self.sd_model.ema is not None:
            self.sd_model.ema.update(self.sd_model.unet)
        self.nonfinite_in_a_row = 0

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
            if self.streams.skipped:
                logs["data_skipped"] = sum(n for s in self.streams.skipped.values() for n in s.values())  # this process
            if self.nonfinite_total:
                logs["nonfinite_steps_skipped"] = self.nonfinite_total
            # mean seconds per batch spent waiting for the loader since the last log
            seconds, batches = self.streams.seconds - self._reader_logged[0], self.streams.batches - self._reader_logged[1]
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
        data_ranks = self._all_ranks_state or self.streams.state()
        state = {"data_world_size": self.data_world_size, "data_ranks": data_ranks,
                 "steps_per_data_rank": self.streams.steps,
                 "batch_size": self.args.per_device_train_batch_size, "num_workers": self.args.dataloader_num_workers,
                 "ema_updates": m.ema.num_updates if m.ema is not None else 0,
                 "resolution": self.resolution, "model_paths": {k: os.path.abspath(v) if v and os.path.exists(v) else v for k, v in m.paths.items()}, "prediction_type": m.args.prediction_type}
        with open(os.path.join(output_dir, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())
        with open(os.path.join(output_dir, "run_config.json"), "w") as f:  # model and data arguments, as resolved
            json.dump(self.run_config, f, indent=2)

    def _save_checkpoint(self, model, metrics=None):
        """The stock checkpoint, written under ``.incomplete/`` and renamed into place once complete."""
        if self.args.world_size > 1:  # every rank's data-stream position goes into rank 0's sd_state.json
            gathered = []
            paddle.distributed.all_gather_object(gathered, self.streams.state())
            self._all_ranks_state = {d: s for part in gathered for d, s in part.items()}
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

    def _load_from_checkpoint(self, resume_from_checkpoint=None):
        if not resume_from_checkpoint:
            return
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint to resume from in {self.args.output_dir}")
        state_file = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{resume_from_checkpoint} is not a checkpoint of this trainer (no {STATE_FILE})")
        logger.info(f"resuming from {resume_from_checkpoint}")
        self.sd_model.load_trained(resume_from_checkpoint)
        with open(state_file) as f:
            self._resume_state = json.load(f)
        if self.sd_model.ema is not None:
            self.sd_model.ema.num_updates = self._resume_state["ema_updates"]

    # -- images ----------------------------------------------------------------------------------
    @paddle.no_grad()
    def log_images(self, step: int, max_images: int = 8) -> str:
        """Originals, VAE reconstructions and DDIM samples (guidance 1 and 7.5) of the first batch's captions."""
        from PIL import Image

        m = self.sd_model
        batch = self._image_batch
        if batch is None:
            if not getattr(self, "_said_no_images", False):
                logger.warning("image logging needs image batches: off with --precomputed_latents")
                self._said_no_images = True
            return ""
        was_training = m.unet.training
        m.unet.eval()
        n = min(max_images, batch["pixel_values"].shape[0])
        pixels = batch["pixel_values"][:n]
        prompts = m.tokenizer.batch_decode(batch["input_ids"][:n].numpy().tolist(), skip_special_tokens=True)
        originals = sampling.decode_latents_to_images(m.vae, m.vae.encode(pixels).latent_dist.mean * m.scaling_factor)
        arr = ((pixels.clip(-1, 1) + 1) * 127.5).round().astype("uint8").transpose([0, 2, 3, 1]).numpy()
        rows = {"original": [Image.fromarray(a) for a in arr], "reconstruction": originals}
        pipe = sampling.build_pipeline(m.vae, m.text_encoder, m.tokenizer, m.unet, "ddim",
                                       dict(m.noise_scheduler.config))
        for g in (1.0, 7.5):
            rows[f"guidance_{g}"] = sampling.generate(pipe, prompts, guidance_scale=g, num_inference_steps=m.args.num_inference_steps,
                                                      height=self.resolution, width=self.resolution, seeds=list(range(n)))
        if was_training:
            m.unet.train()
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


    def _visualdl_writer(self):
        """The LogWriter of paddlenlp's VisualDL callback (one event file per run), if VisualDL is on."""
        for cb in self.callback_handler.callbacks:
            if getattr(cb, "vdl_writer", None) is not None:
                return cb.vdl_writer
        return None


def keep_data_ranks(training_args, checkpoint: Optional[str]) -> None:
    """Resuming ``checkpoint`` on another number of ranks R: change the accumulation steps to D / R, where D is
    the checkpoint's number of data ranks (ranks × accumulation when it was written).

    Micro-batch k of rank r is data rank r·A + k of D (sd/train_loader.py), so the same D keeps every global
    batch (its samples, noise and timesteps) as the uninterrupted run had it: losing one of two machines
    continues on the survivor with accumulation 2. A per-device batch other than the checkpoint's is
    refused later (the streams' positions count its batches).
    """
    state_file = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
    if not (state_file and os.path.isfile(state_file)):
        return
    with open(state_file) as f:
        saved = json.load(f).get("data_world_size")
    ranks, accumulation = training_args.dataset_world_size, training_args.gradient_accumulation_steps
    if not saved or saved == ranks * accumulation or not training_args.keep_data_ranks:
        return
    if saved % ranks:
        raise ValueError(f"{checkpoint} was written by {saved} data ranks (ranks × accumulation steps); {ranks} "
                         f"ranks cannot share them evenly: resume on a number of ranks that divides {saved}, or "
                         f"start afresh with --overwrite_output_dir")
    training_args.gradient_accumulation_steps = saved // ranks
    logger.warning(f"resuming {checkpoint} on {ranks} rank(s): --gradient_accumulation_steps {accumulation} → "
                   f"{saved // ranks}, the checkpoint's {saved} data ranks (--keep_data_ranks)")


def find_resume_checkpoint(training_args) -> Optional[str]:
    """``--resume_from_checkpoint`` if given, else the newest checkpoint in output_dir (unless
    ``--overwrite_output_dir``)."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if os.path.isdir(training_args.output_dir) and not training_args.overwrite_output_dir:
        last = newest_complete_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info(f"found {last}, the newest complete checkpoint: resuming automatically "
                        f"(pass --overwrite_output_dir to start afresh)")
        return last
    return None
