"""Pretrain the Stable Diffusion UNet on part-file data (frozen VAE and text encoder).

    python -u train_txt2img_laion400m_trainer.py --do_train --output_dir ./laion400m_pretrain_output_trainer \\
        --pretrained_model_name_or_path ./tiny-sd --unet_name_or_path ./tiny-sd/unet/config.json \\
        --file_list ./data/filelist/train.filelist.list --resolution 64 --max_steps 1000

Run it under ``python -m paddle.distributed.launch`` for several devices; see README.md.
"""


import atexit
import os
import sys
import traceback
from dataclasses import asdict

import numpy as np
import paddle
from paddlenlp.trainer import PdArgumentParser, set_seed
from sd.log import logger

from sd.checkpoints import CheckpointWriteError, check_output_dir, describe_os_error, free_bytes
from sd.model import StableDiffusionModel
from sd.sd_args import DataArguments, ModelArguments, SDTrainingArguments, finalize
from sd.sd_trainer import NonFiniteLossError, StableDiffusionTrainer, find_resume_checkpoint
from sd.text_image_pair_dataset import TextImagePairDataset


def build_dataset(model, model_args, data_args, training_args, rank: int, world_size: int):
    """The training stream of data rank ``rank`` of ``world_size``: images (VAE and text encoder run every
    step) or precomputed latents."""
    if data_args.precomputed_latents:  # written by sd/precompute_latents.py for this VAE, text encoder, resolution
        from sd.latent_dataset import LatentDataset

        f = model.latent_factor
        expect = {"resolution": data_args.resolution, "model_max_length": model_args.model_max_length,
                  "latent_shape": [model.vae.config.latent_channels, data_args.resolution // f, data_args.resolution // f],
                  "hidden_shape": [model_args.model_max_length, model.text_encoder.config.hidden_size]}
        return LatentDataset(data_args.file_list, model.tokenizer, drop_caption_prob=data_args.drop_caption_prob,
                             max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
                             rank=rank, world_size=world_size,
                             shuffle_buffer=data_args.shuffle_buffer, expect=expect)
    return TextImagePairDataset(
        data_args.file_list, model.tokenizer, resolution=data_args.resolution, line_format=data_args.line_format,
        interpolation=data_args.interpolation, center_crop=data_args.center_crop,
        drop_caption_prob=data_args.drop_caption_prob, allow_upscale=data_args.allow_upscale,
        max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
        rank=rank, world_size=world_size,
        model_max_length=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer)


def parameter_checksum(layer: paddle.nn.Layer) -> str:
    """Sum and sum of squares of all parameters: equal on every rank when data parallelism keeps them in sync."""
    total, squares = 0.0, 0.0
    for p in layer.parameters():
        a = p.numpy().astype(np.float64)
        total, squares = total + a.sum(), squares + (a * a).sum()
    return f"{total:.10e}/{squares:.10e}"


def checkpoint_bytes(model: StableDiffusionModel) -> int:
    """Rough size of one checkpoint: trained weights, two AdamW moments, the EMA copy (fp32)."""
    n = sum(int(np.prod(p.shape)) for _, params in model.trainable_groups() for p in params)
    return 4 * n * (3 + (model.ema is not None))


def main():
    # 1. arguments
    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    finalize(model_args, data_args, training_args, lambda msg, changed=True: (logger.warning if changed else logger.info)(msg))
    if training_args.should_save:
        check_output_dir(training_args.output_dir)
    if model_args.fused_linear:  # GPU only (finalize switched it off elsewhere); before any model is built
        paddle.nn.Linear = paddle.incubate.nn.FusedLinear
    set_seed(training_args.seed)

    # 2. model
    model = StableDiffusionModel(model_args, recompute=training_args.recompute)
    if data_args.resolution % model.latent_factor:
        raise ValueError(f"--resolution {data_args.resolution} is not a multiple of the VAE's downsampling factor "
                         f"{model.latent_factor}")

    # 3. data
    # One stream per accumulation micro-batch: data rank r·A + k of R·A (see sd/sd_trainer.py), so that
    # R ranks × A accumulation steps see the same data and noise for any split of R·A.
    accumulation = training_args.gradient_accumulation_steps
    datasets = [build_dataset(model, model_args, data_args, training_args,
                              rank=training_args.dataset_rank * accumulation + k,
                              world_size=training_args.dataset_world_size * accumulation)
                for k in range(accumulation)]
    world = training_args.dataset_world_size
    if training_args.should_save and free_bytes(training_args.output_dir) < 2 * checkpoint_bytes(model):
        logger.warning(f"only {free_bytes(training_args.output_dir) / 2**30:.1f} GiB free in {training_args.output_dir}; "
                       f"one checkpoint takes about {checkpoint_bytes(model) / 2**30:.1f} GiB")
    logger.info(f"global batch = {training_args.per_device_train_batch_size} per device × {world} rank(s) × "
                f"{training_args.gradient_accumulation_steps} accumulation = "
                f"{training_args.per_device_train_batch_size * world * training_args.gradient_accumulation_steps}")

    # 4. train
    trainer = StableDiffusionTrainer(model=model, args=training_args, train_dataset=datasets[0], micro_datasets=datasets,
                                     resolution=data_args.resolution,
                                     run_config={"model": asdict(model_args), "data": asdict(data_args)})
    if training_args.do_train:
        trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        # 5. save the final trained modules (rank 0 only, inside save_model)
        try:
            trainer.save_model()
            trainer.save_state()
        except OSError as e:
            raise CheckpointWriteError(f"could not write the final model in {training_args.output_dir}: "
                                       f"{describe_os_error(e)}") from None
        logger.info(f"rank {training_args.process_index}: UNet parameter checksum {parameter_checksum(model.unet)}")
        if training_args.world_size > 1:  # no rank leaves while another may still talk to it (clean gloo/NCCL exit)
            paddle.distributed.barrier()


def _leave_distributed_run() -> None:
    """A rank whose work is done and saved leaves without Paddle's C++ teardown.

    With 2 CPU ranks (gloo), about one run in fifteen ended with rank 0 aborting (SIGABRT, no message)
    after every Python exit handler had run, so the launcher reported a failed job although the model
    was saved (4 of 62 runs of tests/test_distributed.py's job on a loaded machine; 0 of 30 with this
    function). The exit handlers (Paddle's own: data-loader shared memory, process groups) still run
    here; only the interpreter's final teardown is skipped.
    """
    atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter exit runs first (logging.shutdown among them)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _exit_now_if_distributed(exc: BaseException) -> None:
    """Under paddle.distributed.launch, a failing rank leaves at once with its rank and cause.

    Its peers' next collective then fails within seconds (gloo: the connection drops; the
    launcher also stops the other ranks once one has exited). The line ``rank r failed: ...``
    stays in this rank's log, which train.sh lists after a failed launch: the launcher's own
    report shows whichever rank it saw fail first, often a peer that aborted because of this one.
    """
    if paddle.distributed.get_world_size() > 1:
        rank = paddle.distributed.get_rank()
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    try:
        main()
        if paddle.distributed.get_world_size() > 1:
            _leave_distributed_run()
    except (CheckpointWriteError, NonFiniteLossError) as e:
        logger.error(str(e))
        _exit_now_if_distributed(e)
        sys.exit(1)
    except Exception as e:  # noqa: BLE001 - reported with its traceback, then the process exits non-zero
        traceback.print_exc()
        _exit_now_if_distributed(e)
        raise
