"""paddlenlp Trainer for Stable Diffusion: only what differs from the stock Trainer.

* data: the streaming dataset through plain ``paddle.io.DataLoader``s; on resume the streams are
  fast-forwarded (no image decoded) instead of the stock Trainer's skip-by-iterating;
* data ranks: micro-batch k of an optimizer step on rank r is *data rank* d = r·A + k of D = R·A
  (R ranks, A accumulation steps): it reads data shard d of D and draws its noise from the seed of
  (run seed, d, step). So R ranks × A accumulation train on the same samples with the same noise for
  any split of the same D: 2 GPUs = 1 GPU with accumulation 2, up to floating-point summation order;
* loss: ``StableDiffusionModel.forward`` with that per-micro-batch seed;
* optimizer: one parameter group per trained module, each with its own learning rate;
* checkpoints: the trained modules in ``from_pretrained`` layout (``unet/``, EMA variant,
  ``text_encoder/``) plus ``sd_state.json`` (every rank's data-stream positions, batch count, EMA
  count) beside the Trainer's optimizer/scheduler/trainer state; resume loads exactly those. A
  checkpoint is written under a staging name and renamed into place when complete (sd/checkpoints.py);
* divergence guard: an update whose loss or gradients are not finite is skipped (every rank
  decides alike); after ``--max_nonfinite_steps`` in a row training stops, naming the last good checkpoint;
* after each optimizer step: the EMA update (training, so it runs whatever ``--report_to`` says);
  on rank 0 every ``image_logging_steps``: reconstructions and DDIM samples to VisualDL and a PNG.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import sys
import time
from typing import Dict, Optional

import numpy as np
import paddle
from paddlenlp.trainer import Trainer, TrainerCallback
from sd.log import logger

from sd import sampling
from sd.checkpoints import (CheckpointWriteError, describe_os_error, newest_complete_checkpoint, publish,
                            staging_root)
from sd.text_image_pair_dataset import collate_fn

STATE_FILE = "sd_state.json"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient; the message names the last good checkpoint."""


def batch_seed(run_seed: int, rank: int, batch_index: int) -> int:
    """Seed of all random draws of one batch on one rank (different on every rank and batch)."""
    return int(np.random.SeedSequence([run_seed, rank, batch_index]).generate_state(1)[0])


def _die_with_parent(worker_id: int) -> None:
    """Loader workers end with the trainer, even when it is killed with SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _RoundRobin:
    """Batches of several loaders in turn: one per accumulation micro-batch, step after step."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __iter__(self):
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            for it in iterators:
                try:
                    yield next(it)
                except StopIteration:
                    return


class _TimedLoader:
    """Iterate a DataLoader and add the time spent waiting for each batch to ``seconds`` (reader time)."""

    def __init__(self, loader):
        self.loader, self.seconds, self.batches = loader, 0.0, 0

    def __iter__(self):
        it = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            self.batches += 1
            yield batch


class _AfterStep(TrainerCallback):
    """Part of training, registered whatever ``--report_to`` says: the EMA update after every
    optimizer step, and (rank 0) image logging every ``image_logging_steps``."""

    def __init__(self, trainer: "StableDiffusionTrainer"):
        self.trainer = trainer

    def on_optimizer_end(self, args, state, control, **kwargs):
        ema = self.trainer.sd_model.ema
        if ema is not None and not self.trainer.update_skipped:
            ema.update(self.trainer.sd_model.unet)

    def on_step_end(self, args, state, control, **kwargs):
        every = self.trainer.sd_model.args.image_logging_steps
        if every > 0 and state.global_step % every == 0 and self.trainer.is_world_process_zero():
            self.trainer.log_images(state.global_step)


class StableDiffusionTrainer(Trainer):
    def __init__(self, model, args, train_dataset, resolution: int, run_config: Optional[dict] = None,
                 micro_datasets: Optional[list] = None, **kwargs):
        """``micro_datasets``: one dataset per accumulation micro-batch k, each built for data rank
        ``dataset_rank · A + k`` of ``dataset_world_size · A`` (default: ``[train_dataset]``, A = 1)."""
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        self.micro_datasets = micro_datasets or [train_dataset]
        if len(self.micro_datasets) != args.gradient_accumulation_steps:
            raise ValueError(f"{len(self.micro_datasets)} micro-batch datasets for gradient_accumulation_steps="
                             f"{args.gradient_accumulation_steps}: build one per accumulation step (as the training script does)")
        self.run_config = run_config or {}
        self.sd_model = model
        self.resolution = resolution
        self.stream_positions: Dict[int, Dict[int, int]] = {}  # data rank → loader-worker stream → draws consumed
        self.skipped: Dict[int, Dict[int, int]] = {}  # data rank → stream → records skipped so far
        self.batches_seen = 0  # micro-batches this process has trained on
        self._resume_state: Optional[dict] = None
        self._image_batch = None
        self._reader: Optional[_TimedLoader] = None
        self._reader_logged = (0.0, 0)  # reader seconds and batches at the previous log
        self._all_ranks_state: Dict[str, dict] = {}  # all processes' data ranks, gathered for a multi-process save
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0  # skipped updates (divergence guard)
        self.update_skipped = False  # the last optimizer step was skipped (the EMA skips it too)
        self._nonfinite_loss = False  # a micro-batch since the last optimizer step had a non-finite loss
        self.args.ignore_data_skip = True  # the dataset fast-forwards itself (see get_train_dataloader)
        groups = [{"params": params, "learning_rate": lr / args.learning_rate}
                  for (name, params), lr in zip(model.trainable_groups(), self._group_lrs())]
        self.optimizer_grouped_parameters = groups  # lr in a group is a multiplier of the scheduler's lr
        self.add_callback(_AfterStep(self))

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

    def data_rank(self, micro: int) -> int:
        return self.args.dataset_rank * self.args.gradient_accumulation_steps + micro

    def get_train_dataloader(self):
        batch_size, workers = self.args.per_device_train_batch_size, self.args.dataloader_num_workers
        accumulation = self.args.gradient_accumulation_steps
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
            steps = state["steps_per_data_rank"]
            self.batches_seen = steps * accumulation
            for k, dataset in enumerate(self.micro_datasets):
                d = self.data_rank(k)
                positions = {int(s): v for s, v in state["data_ranks"][str(d)]["stream_positions"].items()}
                dataset.fast_forward(steps * batch_size, batch_size, workers, positions=positions)
                self.stream_positions[d] = positions
            logger.info(f"data streams fast-forwarded past {steps} batches per data rank "
                        f"(positions {self.stream_positions})")
        loaders = [paddle.io.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                        collate_fn=getattr(dataset, "collate_fn", collate_fn),  # latents: their own
                                        worker_init_fn=_die_with_parent) for dataset in self.micro_datasets]
        self._reader = _TimedLoader(loaders[0] if len(loaders) == 1 else _RoundRobin(loaders))
        return self._reader

    # -- loss ------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False):
        accumulation = self.args.gradient_accumulation_steps
        d = self.data_rank(self.batches_seen % accumulation)  # the batch came from micro_datasets[k] (round robin)
        stream, position, skipped = inputs.pop("stream_state").numpy().tolist()  # after this batch's last sample
        self.stream_positions.setdefault(d, {})[stream] = position
        self.skipped.setdefault(d, {})[stream] = skipped
        seed = batch_seed(self.args.seed, d, self.batches_seen // accumulation)
        self.batches_seen += 1
        if self._image_batch is None and "pixel_values" in inputs:  # what every image log shows (the same each time)
            self._image_batch = {k: inputs[k] for k in ("pixel_values", "input_ids")}
        loss = model(seed=seed, **inputs)  # images and token ids, or precomputed latents and hidden states
        return (loss, None) if return_outputs else loss

    # -- divergence guard ------------------------------------------------------------------------
    def training_step(self, model, inputs):
        loss = super().training_step(model, inputs)
        if not bool(paddle.isfinite(loss).all()):
            self._nonfinite_loss = True
            return paddle.zeros_like(loss)  # keeps the logged running loss finite; the update is skipped below
        return loss

    def create_optimizer(self, lr_scheduler=None):
        optimizer = super().create_optimizer(lr_scheduler)
        if not getattr(optimizer, "_sd_guarded", False):  # every caller (plain or through GradScaler) goes through .step
            step = optimizer.step

            def guarded_step(*args, **kwargs):
                if self._update_is_finite():
                    self.nonfinite_in_a_row, self.update_skipped = 0, False
                    return step(*args, **kwargs)
                self._skip_update()

            optimizer.step, optimizer._sd_guarded = guarded_step, True
        return optimizer

    def _update_is_finite(self) -> bool:
        """False when a micro-batch loss of this step, on any rank, or a gradient was not finite."""
        bad = self._nonfinite_loss
        self._nonfinite_loss = False
        if not bad:
            grads = [p.grad for _, params in self.sd_model.trainable_groups() for p in params if p.grad is not None]
            if grads:  # one fused kernel (÷1 leaves finite gradients as they are; a non-finite step is skipped anyway)
                _, found = paddle._C_ops.check_finite_and_unscale_(grads, paddle.ones([1]),
                                                                   paddle.zeros([1], dtype="bool"))
                bad = bool(found)
        if self.args.world_size > 1:  # gradients agree after the all-reduce, losses need not: agree on the decision
            flag = paddle.to_tensor([1.0 if bad else 0.0])
            paddle.distributed.all_reduce(flag, op=paddle.distributed.ReduceOp.MAX)
            bad = bool(flag.item() > 0)
        return not bad

    def _skip_update(self) -> None:
        self.update_skipped = True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        step = self.state.global_step + 1
        limit = self.args.max_nonfinite_steps
        logger.warning(f"step {step}: non-finite loss or gradient, update skipped "
                       f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_total} in this run; limit {limit})")
        if self.nonfinite_in_a_row >= limit:
            last = newest_complete_checkpoint(self.args.output_dir)
            where = (f"the last good checkpoint is {last}: resume from it with a lower --learning_rate "
                     f"(--resume_from_checkpoint {last})") if last else "no checkpoint was written yet"
            raise NonFiniteLossError(f"training stopped at step {step}: {limit} consecutive steps had a non-finite "
                                     f"loss or gradient (no weights were updated with them); {where}")

    def log(self, logs, **kwargs):
        if "loss" in logs:  # a training log (not the final summary): add what the stock Trainer does not
            if self.skipped:
                logs["data_skipped"] = sum(n for s in self.skipped.values() for n in s.values())  # this process
            if self.nonfinite_total:
                logs["nonfinite_steps_skipped"] = self.nonfinite_total
            if self._reader is not None:  # mean seconds per batch spent waiting for the loader since the last log
                seconds, batches = self._reader.seconds - self._reader_logged[0], self._reader.batches - self._reader_logged[1]
                logs["reader_seconds_per_step"] = round(seconds / max(batches, 1), 5)
                self._reader_logged = (self._reader.seconds, self._reader.batches)
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
        data_ranks = self._all_ranks_state or self._rank_state()
        state = {"data_world_size": self.data_world_size, "data_ranks": data_ranks,
                 "steps_per_data_rank": self.batches_seen // self.args.gradient_accumulation_steps,
                 "batch_size": self.args.per_device_train_batch_size, "num_workers": self.args.dataloader_num_workers,
                 "ema_updates": m.ema.num_updates if m.ema is not None else 0,
                 "resolution": self.resolution, "model_paths": {k: os.path.abspath(v) if v and os.path.exists(v) else v for k, v in m.paths.items()}, "prediction_type": m.args.prediction_type}
        with open(os.path.join(output_dir, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())
        with open(os.path.join(output_dir, "run_config.json"), "w") as f:  # model and data arguments, as resolved
            json.dump(self.run_config, f, indent=2)

    def _rank_state(self) -> dict:
        """{data rank: its streams' positions and skips} for this process's data ranks."""
        return {str(self.data_rank(k)): {"stream_positions": dict(self.stream_positions.get(self.data_rank(k), {})),
                                         "skipped": dict(self.skipped.get(self.data_rank(k), {}))}
                for k in range(self.args.gradient_accumulation_steps)}

    def _save_checkpoint(self, model, metrics=None):
        """The stock checkpoint, written under ``.incomplete/`` and renamed into place once complete."""
        if self.args.world_size > 1:  # every rank's data-stream position goes into rank 0's sd_state.json
            gathered = []
            paddle.distributed.all_gather_object(gathered, self._rank_state())
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
