"""Assembling a training run: the model, one dataset per accumulation micro-batch, the trainer.

The one place a run is put together: ``train_txt2img_laion400m_trainer.py`` trains what :func:`build_run`
returns, ``sd/tools/benchmark.py`` times it, and the tests build their runs here, so the three see the
same model, data and trainer for the same arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Sequence

import numpy as np
import paddle
from paddlenlp.trainer import set_seed

from sd import cpu
from sd.log import logger
from sd.model import StableDiffusionModel
from sd.runtime import memory, preflight
from sd.runtime.checkpoints import free_bytes
from sd.runtime.distributed import UserError
from sd.sd_trainer import StableDiffusionTrainer
from sd.text_image_pair_dataset import TextImagePairDataset


@dataclass
class Run:
    """A run ready to train: ``trainer.train()`` trains ``model`` on ``datasets``."""

    model: StableDiffusionModel
    datasets: List  # one per accumulation micro-batch k of this process (see build_data)
    trainer: StableDiffusionTrainer


def checkpoint_bytes(model: StableDiffusionModel, precision: str = "fp32") -> int:
    """Size of one checkpoint: trained weights, two AdamW moments, the EMA copy (sd/runtime/memory.py)."""
    n = sum(int(np.prod(p.shape)) for _, params in model.trainable_groups() for p in params)
    return memory.checkpoint_bytes(n, model.ema is not None, precision)


def build_model(model_args, data_args, training_args) -> StableDiffusionModel:
    """The model, after seeding every generator with ``--seed`` (the UNet's initial weights come from it);
    checks the resolution against the VAE and, where this process saves, the free disk."""
    if model_args.fused_linear:  # GPU only (finalize switched it off elsewhere); before any model is built
        paddle.nn.Linear = paddle.incubate.nn.FusedLinear
    if cpu.CHOICE:  # set at `import sd` (sd/cpu.py)
        logger.info(cpu.CHOICE)
    set_seed(training_args.seed)
    model = StableDiffusionModel(model_args, recompute=training_args.recompute)
    if data_args.resolution % model.latent_factor:
        raise UserError(f"--resolution {data_args.resolution} is not a multiple of the VAE's downsampling factor "
                        f"{model.latent_factor}")
    if training_args.should_save:
        preflight.report(preflight.check_disk(training_args.output_dir, checkpoint_bytes(model, memory.precision_of(training_args)), free_bytes))
    return model


def build_dataset(model, model_args, data_args, training_args, slots: Sequence[int], num_slots: int):
    """The training streams of ``slots`` of a global batch of ``num_slots``: images (VAE and text encoder run
    every step) or precomputed latents."""
    from sd.data import img2dataset

    img2dataset.configure(img2dataset.ShardOptions(  # .tar/.parquet shards in the lists (inherited by loader workers)
        caption_key=data_args.caption_key, min_original_size=data_args.min_original_size,
        where=tuple(img2dataset.Where.parse(w) for w in data_args.where or ())))
    if data_args.precomputed_latents:  # by sd/tools/precompute_latents.py for this VAE, text encoder, resolution
        from sd.latent_dataset import LatentDataset

        f, r = model.latent_factor, data_args.resolution
        expect = {"resolution": r, "model_max_length": model_args.model_max_length,
                  "latent_shape": [model.vae.config.latent_channels, r // f, r // f],
                  "hidden_shape": [model_args.model_max_length, model.text_encoder.config.hidden_size]}
        return LatentDataset(data_args.file_list, model.tokenizer, drop_caption_prob=data_args.drop_caption_prob,
                             max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
                             slots=slots, num_slots=num_slots,
                             shuffle_buffer=data_args.shuffle_buffer, expect=expect)
    return TextImagePairDataset(
        data_args.file_list, model.tokenizer, resolution=data_args.resolution, line_format=data_args.line_format,
        interpolation=data_args.interpolation, center_crop=data_args.center_crop,
        drop_caption_prob=data_args.drop_caption_prob, allow_upscale=data_args.allow_upscale,
        max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
        slots=slots, num_slots=num_slots,
        model_max_length=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer)


def build_data(model, model_args, data_args, training_args) -> list:
    """One dataset per accumulation micro-batch k: data rank d = r·A + k streams slots [d·b, (d+1)·b) of the
    global batch R·A·b (see sd/train_loader.py), so that any R, A, b of the same product see the same data
    and noise."""
    accumulation, world, b = (training_args.gradient_accumulation_steps, training_args.dataset_world_size,
                              training_args.per_device_train_batch_size)
    logger.info(f"global batch = {b} per device × {world} rank(s) × {accumulation} accumulation = "
                f"{b * world * accumulation}")
    if training_args.dataloader_num_workers > b:
        logger.info(f"--dataloader_num_workers {training_args.dataloader_num_workers}: each micro-batch's loader "
                    f"uses {b}, one per sample slot")
    first = training_args.dataset_rank * accumulation
    return [build_dataset(model, model_args, data_args, training_args, slots=range(d * b, (d + 1) * b),
                          num_slots=b * world * accumulation) for d in range(first, first + accumulation)]


def build_run(model_args, data_args, training_args) -> Run:
    """The model, its datasets and the trainer for the three argument dataclasses, as resolved
    (``sd.sd_args.finalize``, and ``sd.runtime.run_state.fit_global_batch`` when resuming)."""
    model = build_model(model_args, data_args, training_args)
    datasets = build_data(model, model_args, data_args, training_args)
    trainer = StableDiffusionTrainer(model=model, args=training_args, train_dataset=datasets[0],
                                     micro_datasets=datasets, resolution=data_args.resolution,
                                     run_config={"model": asdict(model_args), "data": asdict(data_args)})
    return Run(model=model, datasets=datasets, trainer=trainer)
