"""The one sampler: ppdiffusers' StableDiffusionPipeline, shared by image logging and eval.py.

Seeding rule: the image for (prompt, seed) starts from latents drawn by
``numpy.random.default_rng(seed)``, so it does not depend on which other prompts share its batch
(beyond float rounding: another batch size can move a pixel by a level or two).
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import paddle
from PIL import Image, ImageDraw

from sd.kit import latent_factor

# name → ppdiffusers scheduler class name (all exist in ppdiffusers 0.29)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
}
# SD v1's schedule; clip_sample off (latents are not in [-1, 1]) and the leading timestep offset.
SD_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                           steps_offset=1)


def make_scheduler(name: str, config: Optional[dict] = None):
    """A scheduler of kind ``name`` with the given (training) config, or SD v1's."""
    import ppdiffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(ppdiffusers, SCHEDULERS[name])
    cfg = dict(config or SD_SCHEDULER_CONFIG)
    extra = {"clip_sample": False, "set_alpha_to_one": False} if name == "ddim" else {}
    if name == "dpm-solver++":
        extra = {"algorithm_type": "dpmsolver++"}
    return cls.from_config({**cfg, **extra})


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler: str = "ddim", scheduler_config: Optional[dict] = None):
    """A StableDiffusionPipeline around in-memory modules (no safety checker)."""
    from ppdiffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_scheduler(scheduler, scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def load_pipeline(pretrained: str, unet: Optional[str] = None, text_encoder: Optional[str] = None,
                  variant: Optional[str] = None, scheduler: str = "ddim"):
    """Load a pipeline from folders; ``unet``/``text_encoder`` replace the pretrained ones."""
    from ppdiffusers.transformers import CLIPTextModel
    from ppdiffusers import StableDiffusionPipeline, UNet2DConditionModel

    kwargs = {}
    if unet:
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(unet, variant=variant)
    if text_encoder:
        kwargs["text_encoder"] = CLIPTextModel.from_pretrained(text_encoder)
    pipe = StableDiffusionPipeline.from_pretrained(pretrained, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, **kwargs)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    return pipe


def initial_latents(pipe, seed: int, height: int, width: int) -> paddle.Tensor:
    """(1, C, h, w) standard-normal latents drawn from ``default_rng(seed)``."""
    f = latent_factor(pipe.vae.config)
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@paddle.no_grad()
def generate(pipe, prompts: Sequence[str], *, guidance_scale: float, num_inference_steps: int, height: int, width: int,
             seeds: Sequence[int], negative_prompt: Optional[str] = None) -> List[Image.Image]:
    """One image per (prompt, seed) pair, in order; ``prompts`` and ``seeds`` have equal length."""
    if len(prompts) != len(seeds):
        raise ValueError("generate needs one seed per prompt")
    f = latent_factor(pipe.vae.config)
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling factor)")
    latents = paddle.concat([initial_latents(pipe, s, height, width) for s in seeds])
    pipe.set_progress_bar_config(disable=True)  # callers show progress across prompts instead
    out = pipe(list(prompts), guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, height=height,
               width=width, latents=latents, output_type="pil",
               generator=[paddle.Generator().manual_seed(int(s)) for s in seeds],  # per-image noise of ancestral samplers
               negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None)
    return out.images


def make_grid(images: Sequence[Image.Image], rows: int, cols: int, labels: Optional[Sequence[str]] = None) -> Image.Image:
    """Tile images row-major into a rows × cols grid; optional small text label per row."""
    w, h = images[0].size
    pad = 0 if not labels else 12
    grid = Image.new("RGB", (cols * w, rows * (h + pad)), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (c * w, r * (h + pad) + pad))
    if labels:
        for r, text in enumerate(labels[:rows]):
            draw.text((2, r * (h + pad)), text, fill=(255, 255, 255))
    return grid


def decode_latents_to_images(vae, latents: paddle.Tensor) -> List[Image.Image]:
    """Scaled latents (B, 4, h, w) → PIL images, through the VAE decoder."""
    x = vae.decode(latents / vae.config.scaling_factor).sample
    arr = ((x.clip(-1, 1) + 1) * 127.5).round().astype("uint8").transpose([0, 2, 3, 1]).numpy()
    return [Image.fromarray(a) for a in arr]
