"""Assembling a training run: the model, one dataset per accumulation micro-batch, the trainer.

The one place a run is put together: ``train_txt2img_laion400m_trainer.py`` trains what :func:`build_run`
returns, ``sd/tools/benchmark.py`` times it, and the tests build their runs here, so the three see the
same model, data and trainer for the same arguments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import numpy as np
import paddle
from paddlenlp.trainer import set_seed

from sd import components, cpu
from sd.log import logger
from sd.model import StableDiffusionModel
from sd.runtime import memory, preflight
from sd.runtime.checkpoints import free_bytes
from sd.runtime.distributed import UserError
from sd.runtime.run_state import RunState
from sd.sd_trainer import StableDiffusionTrainer
from sd.text_image_pair_dataset import TextImagePairDataset
from sd.train_loader import MicroBatchStreams


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
    if training_args.cpu_threads:
        logger.info(cpu.set_threads(training_args.cpu_threads))
    set_seed(training_args.seed)
    model = StableDiffusionModel(model_args, recompute=training_args.recompute)
    if data_args.resolution % model.latent_factor:  # (build_run checks it before the data; callers of this alone)
        raise UserError(f"--resolution {data_args.resolution} is not a multiple of the VAE's downsampling factor "
                        f"{model.latent_factor}")
    if training_args.should_save:
        size = checkpoint_bytes(model, memory.precision_of(training_args))
        preflight.report(preflight.check_disk(training_args.output_dir, size, free_bytes))
    return model


def build_dataset(tokenizer, sources, model_args, data_args, training_args, slots: Sequence[int], num_slots: int):
    """The training streams of ``slots`` of a global batch of ``num_slots``: images (VAE and text encoder run
    every step) or precomputed latents. Needs the tokenizer and the components' configs, not the model."""
    from sd.data import img2dataset

    if data_args.precomputed_latents:  # by sd/tools/precompute_latents.py for this VAE, text encoder, resolution
        from sd.latent_dataset import LatentDataset

        vae, text = components.config_of(sources["vae"]), components.config_of(sources["text_encoder"])
        f, r = components.latent_factor(vae), data_args.resolution
        expect = {"resolution": r, "model_max_length": model_args.model_max_length,
                  "latent_shape": [vae["latent_channels"], r // f, r // f],
                  "hidden_shape": [model_args.model_max_length, text["hidden_size"]]}
        return LatentDataset(data_args.file_list, tokenizer, drop_caption_prob=data_args.drop_caption_prob,
                             max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
                             slots=slots, num_slots=num_slots,
                             shuffle_buffer=data_args.shuffle_buffer, expect=expect)
    return TextImagePairDataset(
        data_args.file_list, tokenizer, resolution=data_args.resolution, line_format=data_args.line_format,
        interpolation=data_args.interpolation, center_crop=data_args.center_crop,
        drop_caption_prob=data_args.drop_caption_prob, allow_upscale=data_args.allow_upscale,
        max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
        slots=slots, num_slots=num_slots,
        model_max_length=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer,
        shard_options=img2dataset.ShardOptions(  # .tar/.parquet shards in the lists: caption field, filters
            caption_key=data_args.caption_key, min_original_size=data_args.min_original_size,
            where=tuple(img2dataset.Where.parse(w) for w in data_args.where or ())))


def build_data(tokenizer, sources, model_args, data_args, training_args) -> list:
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
    return [build_dataset(tokenizer, sources, model_args, data_args, training_args, slots=range(d * b, (d + 1) * b),
                          num_slots=b * world * accumulation) for d in range(first, first + accumulation)]


def build_run(model_args, data_args, training_args, resume: Optional[str] = None) -> Run:
    """The datasets, the model and the trainer for the three argument dataclasses, as resolved
    (``sd.sd_args.finalize``, and ``sd.runtime.run_state.fit_global_batch`` when resuming ``resume``).

    The data streams, fast-forwarded to ``resume``'s positions, start their loader workers before the model
    exists. A worker forked from a process that holds the model shares its pages, and every page the training
    then writes (each parameter, at each update) is copied, the worker keeping the old one: at SD v1's size a
    worker grew to the size of the model within the first step (the OOM killer ended a 1-worker run on a 24 GB
    host there). Forked first, a worker holds only what it streams.
    """
    sources = components.training_sources(model_args)  # hub names checked here, before anything is built
    vae_config = components.config_of(sources["vae"])
    if vae_config and data_args.resolution % components.latent_factor(vae_config):
        raise UserError(f"--resolution {data_args.resolution} is not a multiple of the VAE's downsampling factor "
                        f"{components.latent_factor(vae_config)}")
    datasets = build_data(components.load_tokenizer(sources["tokenizer"]), sources, model_args, data_args,
                          training_args)
    streams = MicroBatchStreams(datasets, training_args.seed, training_args.dataloader_num_workers)
    if resume:
        state = RunState.read(resume)
        streams.fast_forward(state.steps, state.slots)
    streams.start()
    model = build_model(model_args, data_args, training_args)
    trainer = StableDiffusionTrainer(model=model, args=training_args, train_dataset=datasets[0],
                                     micro_datasets=datasets, streams=streams, resolution=data_args.resolution,
                                     run_config={"model": asdict(model_args), "data": asdict(data_args)})
    return Run(model=model, datasets=datasets, trainer=trainer)
