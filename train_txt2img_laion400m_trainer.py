"""Pretrain the Stable Diffusion UNet on part-file data (frozen VAE and text encoder).

    python -u train_txt2img_laion400m_trainer.py --do_train --output_dir ./laion400m_pretrain_output_trainer \\
        --pretrained_model_name_or_path ./tiny-sd --unet_name_or_path ./tiny-sd/unet/config.json \\
        --file_list ./data/filelist/train.filelist.list --resolution 64 --max_steps 1000

Run it under ``python -m paddle.distributed.launch`` for several devices; see README.md.
"""

import os

import numpy as np
import paddle
from paddlenlp.trainer import PdArgumentParser

from sd.build import build_run
from sd.components import ComponentError
from sd.log import logger
from sd.runtime import preflight
from sd.runtime.checkpoints import CheckpointWriteError, check_output_dir, describe_os_error
from sd.runtime.distributed import UserError, after_rank_zero_work, run
from sd.runtime.run_state import find_resume_checkpoint, fit_global_batch, warn_if_schedule_moves
from sd.sd_args import ENV_SWITCHES, DataArguments, ModelArguments, SDTrainingArguments, finalize
from sd.sd_trainer import NonFiniteLossError


def parameter_checksum(layer: paddle.nn.Layer) -> str:
    """Sum and sum of squares of all parameters: equal on every rank when data parallelism keeps them in sync."""
    total, squares = 0.0, 0.0
    for p in layer.parameters():
        a = p.numpy().astype(np.float64)
        total, squares = total + a.sum(), squares + (a * a).sum()
    return f"{total:.10e}/{squares:.10e}"


def parse_arguments():
    """The three argument dataclasses, resolved (switches, device fallbacks, the layout of a resumed
    checkpoint's global batch) and checked against the machine; and the checkpoint to resume, if any."""
    preflight.report(preflight.check_port())  # before the arguments start the process group
    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    except ValueError as e:  # an impossible flag value or combination (paddlenlp's checks among them)
        raise UserError(str(e)) from None
    finalize(model_args, data_args, training_args,
             lambda msg, changed=True: (logger.warning if changed else logger.info)(msg))
    if training_args.should_save:
        check_output_dir(training_args.output_dir)
    resume = find_resume_checkpoint(training_args) if training_args.do_train else None
    fit_global_batch(training_args, data_args, resume)  # another number of ranks: the same global batch
    warn_if_schedule_moves(training_args, resume)
    ranks_here = int(os.environ.get("PADDLE_LOCAL_SIZE", "1"))  # processes of this job on this machine
    workers = training_args.dataloader_num_workers
    preflight.report(
        preflight.check_model_paths(model_args) + preflight.check_file_list(data_args.file_list)
        + preflight.check_env_flags(ENV_SWITCHES)
        + preflight.check_shm(0 if data_args.precomputed_latents else preflight.shm_bytes_needed(
            training_args.per_device_train_batch_size, data_args.resolution, workers,
            training_args.gradient_accumulation_steps, ranks_here))
        + preflight.check_memory_of_run(model_args, data_args, training_args, ranks_here))
    return model_args, data_args, training_args, resume


def main():
    model_args, data_args, training_args, resume = parse_arguments()
    built = build_run(model_args, data_args, training_args, resume)  # sd/build.py: data, model, trainer
    if not training_args.do_train:
        return
    trainer = built.trainer
    trainer.train(resume_from_checkpoint=resume)
    try:  # the final trained modules (rank 0 only, inside save_model)
        trainer.save_model()
        trainer.save_state()
    except OSError as e:
        raise CheckpointWriteError(f"could not write the final model in {training_args.output_dir}: "
                                   f"{describe_os_error(e)}") from None
    logger.info(f"rank {training_args.process_index}: UNet parameter checksum {parameter_checksum(built.model.unet)}")
    if training_args.world_size > 1:  # no rank leaves while another may still talk to it (clean gloo/NCCL exit)
        after_rank_zero_work("final-save")
        paddle.distributed.barrier()


if __name__ == "__main__":
    run(main, user_errors=(CheckpointWriteError, NonFiniteLossError, ComponentError))
