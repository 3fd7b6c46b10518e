"""Pretrain the Stable Diffusion UNet on part-file data (frozen VAE and text encoder).

    python -u train_txt2img_laion400m_trainer.py --do_train --output_dir ./laion400m_pretrain_output_trainer \\
        --pretrained_model_name_or_path ./tiny-sd --unet_name_or_path ./tiny-sd/unet/config.json \\
        --file_list ./data/filelist/train.filelist.list --resolution 64 --max_steps 1000

Run it under ``python -m paddle.distributed.launch`` for several devices; see README.md.
"""

import os
from dataclasses import asdict

import numpy as np
import paddle
from paddlenlp.trainer import PdArgumentParser, set_seed

from sd import cpu

from sd.runtime import memory, preflight
from sd.runtime.checkpoints import CheckpointWriteError, check_output_dir, describe_os_error, free_bytes
from sd.components import ComponentError
from sd.runtime.distributed import UserError, after_rank_zero_work, run
from sd.log import logger
from sd.model import StableDiffusionModel
from sd.sd_args import DataArguments, ModelArguments, SDTrainingArguments, finalize
from sd.sd_trainer import (NonFiniteLossError, StableDiffusionTrainer, find_resume_checkpoint, fit_global_batch,
                           warn_if_schedule_moves)
from sd.train_loader import build_dataset


def parameter_checksum(layer: paddle.nn.Layer) -> str:
    """Sum and sum of squares of all parameters: equal on every rank when data parallelism keeps them in sync."""
    total, squares = 0.0, 0.0
    for p in layer.parameters():
        a = p.numpy().astype(np.float64)
        total, squares = total + a.sum(), squares + (a * a).sum()
    return f"{total:.10e}/{squares:.10e}"


def checkpoint_bytes(model: StableDiffusionModel, precision: str = "fp32") -> int:
    """Size of one checkpoint: trained weights, two AdamW moments, the EMA copy (sd/runtime/memory.py)."""
    n = sum(int(np.prod(p.shape)) for _, params in model.trainable_groups() for p in params)
    return memory.checkpoint_bytes(n, model.ema is not None, precision)


def _log(level: str, message: str) -> None:
    (logger.warning if level == "warn" else logger.info)(message)


def parse_arguments():
    """The three argument dataclasses, resolved (switches, device fallbacks, the layout of a resumed
    checkpoint's global batch) and checked against the machine; and the checkpoint to resume, if any."""
    preflight.report(preflight.check_port(), _log)  # before the arguments start the process group
    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    except ValueError as e:  # an impossible flag value or combination (paddlenlp's checks among them)
        raise UserError(str(e)) from None
    finalize(model_args, data_args, training_args, lambda msg, changed=True: (logger.warning if changed else logger.info)(msg))
    if training_args.should_save:
        check_output_dir(training_args.output_dir)
    resume = find_resume_checkpoint(training_args) if training_args.do_train else None
    fit_global_batch(training_args, data_args, resume)  # another number of ranks: the same global batch
    warn_if_schedule_moves(training_args, resume)
    ranks_here = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))  # processes of this job on this machine
    workers = training_args.dataloader_num_workers
    preflight.report(
        preflight.check_model_paths(model_args) + preflight.check_file_list(data_args.file_list)
        + preflight.check_env_flags()
        + preflight.check_shm(0 if data_args.precomputed_latents else preflight.shm_bytes_needed(
            training_args.per_device_train_batch_size, data_args.resolution, workers,
            training_args.gradient_accumulation_steps, ranks_here))
        + preflight.check_memory_of_run(model_args, data_args, training_args, ranks_here), _log)
    return model_args, data_args, training_args, resume


def build_model(model_args, data_args, training_args) -> StableDiffusionModel:
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
        preflight.report(preflight.check_disk(training_args.output_dir, checkpoint_bytes(
            model, memory.precision_of(training_args)), free_bytes), _log)
    return model


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


def main():
    model_args, data_args, training_args, resume = parse_arguments()
    model = build_model(model_args, data_args, training_args)
    datasets = build_data(model, model_args, data_args, training_args)
    trainer = StableDiffusionTrainer(model=model, args=training_args, train_dataset=datasets[0], micro_datasets=datasets,
                                     resolution=data_args.resolution,
                                     run_config={"model": asdict(model_args), "data": asdict(data_args)})
    if not training_args.do_train:
        return
    trainer.train(resume_from_checkpoint=resume)
    try:  # the final trained modules (rank 0 only, inside save_model)
        trainer.save_model()
        trainer.save_state()
    except OSError as e:
        raise CheckpointWriteError(f"could not write the final model in {training_args.output_dir}: "
                                   f"{describe_os_error(e)}") from None
    logger.info(f"rank {training_args.process_index}: UNet parameter checksum {parameter_checksum(model.unet)}")
    if training_args.world_size > 1:  # no rank leaves while another may still talk to it (clean gloo/NCCL exit)
        after_rank_zero_work("final-save")
        paddle.distributed.barrier()


if __name__ == "__main__":
    run(main, user_errors=(CheckpointWriteError, NonFiniteLossError, ComponentError))
