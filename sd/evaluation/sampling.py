"""The one sampler: ppdiffusers' StableDiffusionPipeline (``sd/components/pipeline.py``), shared by image
logging, the in-training scores and eval.py.

Seeding rule (what makes an image reproducible and independent of its batch):

* The image for (prompt, seed ``s``) starts from latents drawn by ``numpy.random.default_rng(s)``
  with shape (1, C, H / f, W / f), ``f`` the VAE's downsampling factor; the pipeline receives them
  through ``latents=``, so they do not depend on the other images of the batch.
* Deterministic samplers (ddim with eta 0, pndm, lms, dpm-solver++) draw nothing else. Prompts are
  batched; the only effect of the batch is float rounding in batched matrix products (measured: at
  most one intensity level out of 255 between batch sizes 1 and 8; the same call twice is identical).
* Samplers that draw fresh noise at every step (euler-ancestral) run one image at a time after
  ``paddle.seed(s)``, so their step noise also depends on the seed alone (exactly). The global RNG
  state is saved and restored around the call. ``paddle.Generator`` is not used: ppdiffusers 0.29
  replaces it with a tracker of CUDA RNG states, which does nothing on a CPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

import numpy as np
import paddle
from PIL import Image, ImageDraw

from sd.components import latent_factor
from sd.components.pipeline import build_pipeline
from sd.components.schedulers import SCHEDULERS, make_scheduler

STOCHASTIC = {"euler-ancestral"}  # draw noise inside scheduler.step


def scheduler_name(pipe) -> str:
    """The SCHEDULERS name of ``pipe.scheduler``."""
    cls = type(pipe.scheduler).__name__
    for name, class_name in SCHEDULERS.items():
        if class_name == cls:
            return name
    raise ValueError(f"{cls} is not one of the supported schedulers ({', '.join(SCHEDULERS.values())})")


@contextlib.contextmanager
def pipeline_with_ema(model, scheduler: str = "ddim") -> Iterator:
    """A pipeline around the modules of a training model, sampling with its UNet's EMA weights.

    Inside the ``with`` block the UNet is in eval mode and holds the EMA weights (when training keeps
    them; else its own); on leaving, also by an exception, it gets back exactly the weights and the mode
    it had, so training continues as without the sampling.

    Args:
        model: a ``StableDiffusionModel`` (``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``ema``
            or None, ``noise_scheduler``).
        scheduler: a key of ``SCHEDULERS``, built on the training noise schedule (its prediction type too).
    """
    unet = model.unet
    was_training = unet.training
    backup = model.ema.copy_to(unet) if model.ema is not None else None
    unet.eval()
    try:
        yield build_pipeline(model.vae, model.text_encoder, model.tokenizer, unet,
                             make_scheduler(scheduler, dict(model.noise_scheduler.config)))
    finally:
        if backup is not None:
            unet.set_state_dict(backup)
        if was_training:
            unet.train()


def initial_latents(pipe, seed: int, height: int, width: int) -> paddle.Tensor:
    """(1, C, height / f, width / f) standard-normal latents drawn from ``numpy.random.default_rng(seed)``."""
    f = latent_factor(pipe.vae.config)
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


@paddle.no_grad()
def generate(pipe, prompts: Sequence[str], *, guidance_scale: float, num_inference_steps: int, height: int, width: int,
             seed: int = 0, negative_prompt: Optional[str] = None, num_images_per_prompt: int = 1,
             seeds: Optional[Sequence[int]] = None) -> List[Image.Image]:
    """Images for ``prompts``, prompt-major: prompt 0's images, then prompt 1's, ...

    Image ``j`` of every prompt uses seed ``seed + j`` (the same starting noise for every prompt, so
    a row of prompts compares like with like). ``seeds`` instead gives one seed per output image
    (length ``len(prompts) * num_images_per_prompt``, same order). See the module docstring for why
    an image does not depend on its batch. ``height`` and ``width`` must be multiples of the VAE's
    downsampling factor.
    """
    n = num_images_per_prompt
    if seeds is None:
        seeds = [seed + j for _ in prompts for j in range(n)]
    if len(seeds) != len(prompts) * n:
        raise ValueError(f"generate needs {len(prompts) * n} seeds (one per image), got {len(seeds)}")
    f = latent_factor(pipe.vae.config)
    if height % f or width % f:
        raise ValueError(f"height {height} and width {width} must be multiples of {f} (the VAE's downsampling factor)")
    flat = [p for p in prompts for _ in range(n)]
    if not flat:
        return []
    pipe.set_progress_bar_config(disable=True)  # callers show progress across prompts instead

    def run(batch_prompts, batch_seeds):
        latents = paddle.concat([initial_latents(pipe, int(s), height, width) for s in batch_seeds])
        out = pipe(list(batch_prompts), guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                   height=height, width=width, latents=latents, output_type="pil",
                   negative_prompt=[negative_prompt] * len(batch_prompts) if negative_prompt else None)
        return out.images

    if scheduler_name(pipe) not in STOCHASTIC:
        return run(flat, seeds)
    state = paddle.get_rng_state()
    try:
        images = []
        for p, s in zip(flat, seeds):
            paddle.seed(int(s))  # the step noise of this image
            images += run([p], [s])
        return images
    finally:
        paddle.set_rng_state(state)


def make_grid(images: Sequence[Image.Image], rows: int, cols: int, labels: Optional[Sequence[str]] = None,
              tile: Optional[int] = None) -> Image.Image:
    """Tile images row-major into a rows × cols grid (grey where images run out).

    Args:
        labels: optional text per row, written in a black margin left of the row.
        tile: height in pixels of each tile (width scaled alike; nearest-neighbour, so small samples
            stay crisp); default the first image's size.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    if tile:
        w, h = max(1, round(w * tile / h)), tile
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = int(max(draw.textlength(t) for t in labels[:rows])) + 6 if labels else 0
    grid = Image.new("RGB", (margin + cols * w, rows * h), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (margin + c * w, r * h))
    if labels:
        draw.rectangle((0, 0, margin - 1, rows * h - 1), fill=(0, 0, 0))
        for r, text in enumerate(labels[:rows]):
            draw.text((3, r * h + max(0, h // 2 - 6)), text, fill=(255, 255, 255))
    return grid


def decode_latents_to_images(vae, latents: paddle.Tensor) -> List[Image.Image]:
    """Scaled latents (B, C, h, w) → PIL images, through the VAE decoder."""
    x = vae.decode(latents / vae.config.scaling_factor).sample
    arr = ((x.clip(-1, 1) + 1) * 127.5).round().astype("uint8").transpose([0, 2, 3, 1]).numpy()
    return [Image.fromarray(a) for a in arr]
