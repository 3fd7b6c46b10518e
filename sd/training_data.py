"""The training data stream of one data rank: images (the VAE and text encoder run every step) or
precomputed latents. Used by the training script and ``sd.benchmark``."""

from __future__ import annotations


def build_dataset(model, model_args, data_args, training_args, rank: int, world_size: int):
    """The training stream of data rank ``rank`` of ``world_size`` for ``model`` (its tokenizer, VAE and
    text encoder fix what precomputed latents must match)."""
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
    from sd.text_image_pair_dataset import TextImagePairDataset

    return TextImagePairDataset(
        data_args.file_list, model.tokenizer, resolution=data_args.resolution, line_format=data_args.line_format,
        interpolation=data_args.interpolation, center_crop=data_args.center_crop,
        drop_caption_prob=data_args.drop_caption_prob, allow_upscale=data_args.allow_upscale,
        max_bad_fraction=data_args.max_bad_fraction, seed=training_args.seed,
        rank=rank, world_size=world_size,
        model_max_length=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer)
