"""Pretrain the Stable Diffusion UNet on part-file data (frozen VAE and text encoder).

    python -u train_txt2img_laion400m_trainer.py --do_train --output_dir ./laion400m_pretrain_output_trainer \\
        --pretrained_model_name_or_path ./tiny-sd --unet_name_or_path ./tiny-sd/unet/config.json \\
        --file_list ./data/filelist/train.filelist.list --resolution 64 --max_steps 1000

Run it under ``python -m paddle.distributed.launch`` for several devices; see README.md.
"""


from dataclasses import asdict

import paddle
from paddlenlp.trainer import PdArgumentParser, set_seed
from paddlenlp.utils.log import logger

from sd.model import StableDiffusionModel
from sd.sd_args import DataArguments, ModelArguments, SDTrainingArguments, finalize
from sd.sd_trainer import StableDiffusionTrainer, find_resume_checkpoint
from sd.text_image_pair_dataset import TextImagePairDataset


def main():
    # 1. arguments
    parser = PdArgumentParser((ModelArguments, DataArguments, SDTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    finalize(model_args, data_args, training_args, lambda msg, changed=True: (logger.warning if changed else logger.info)(msg))
    if model_args.fused_linear:  # GPU only (finalize switched it off elsewhere); before any model is built
        paddle.nn.Linear = paddle.incubate.nn.FusedLinear
    set_seed(training_args.seed)

    # 2. model
    model = StableDiffusionModel(model_args, recompute=training_args.recompute)
    if data_args.resolution % model.latent_factor:
        raise ValueError(f"--resolution {data_args.resolution} is not a multiple of the VAE's downsampling factor "
                         f"{model.latent_factor}")

    # 3. data
    dataset = TextImagePairDataset(
        data_args.file_list, model.tokenizer, resolution=data_args.resolution, line_format=data_args.line_format,
        interpolation=data_args.interpolation, center_crop=data_args.center_crop,
        drop_caption_prob=data_args.drop_caption_prob, allow_upscale=data_args.allow_upscale,
        max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
        rank=training_args.dataset_rank, world_size=training_args.dataset_world_size,
        model_max_length=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer)
    world = training_args.dataset_world_size
    logger.info(f"global batch = {training_args.per_device_train_batch_size} per device × {world} rank(s) × "
                f"{training_args.gradient_accumulation_steps} accumulation = "
                f"{training_args.per_device_train_batch_size * world * training_args.gradient_accumulation_steps}")

    # 4. train
    trainer = StableDiffusionTrainer(model=model, args=training_args, train_dataset=dataset,
                                     resolution=data_args.resolution,
                                     run_config={"model": asdict(model_args), "data": asdict(data_args)})
    if training_args.do_train:
        trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        # 5. save the final trained modules (rank 0 only, inside save_model)
        trainer.save_model()
        trainer.save_state()


if __name__ == "__main__":
    main()
