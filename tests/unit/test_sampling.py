"""sd/evaluation/sampling.py: seeded generation (determinism, batch independence), each
scheduler on the tiny kit, the latent factor from the VAE config, grids, sampling with the EMA weights."""

import numpy as np
import paddle
import pytest
from PIL import Image

from sd.components import load_pipeline
from sd.components.schedulers import SCHEDULERS, make_scheduler
from sd.evaluation.sampling import generate, initial_latents, make_grid, pipeline_with_ema

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a white background"]


@pytest.fixture(scope="module")
def pipe(tiny_kit):
    return load_pipeline(tiny_kit, scheduler="ddim")


def arr(im):
    return np.asarray(im, dtype=int)


def test_same_seed_same_images_whatever_the_batch(pipe):
    kw = dict(guidance_scale=7.5, num_inference_steps=3, height=32, width=32)
    a = generate(pipe, PROMPTS, seed=4, num_images_per_prompt=2, **kw)
    b = generate(pipe, PROMPTS, seed=4, num_images_per_prompt=2, **kw)
    assert len(a) == 6 and all(np.array_equal(arr(x), arr(y)) for x, y in zip(a, b))  # identical on CPU
    # prompt-major order, image j of each prompt uses seed 4 + j
    explicit = generate(pipe, PROMPTS, seeds=[4, 5, 4, 5, 4, 5], num_images_per_prompt=2, **kw)
    assert all(np.array_equal(arr(x), arr(y)) for x, y in zip(a, explicit))
    alone = generate(pipe, PROMPTS[1:2], seeds=[5], **kw)[0]  # (prompt 1, seed 5) in a batch of one
    assert np.abs(arr(alone) - arr(a[3])).max() <= 2  # float rounding of batched matmuls only
    assert np.abs(arr(a[2]) - arr(a[3])).max() > 20  # another seed is another image


def test_latent_size_comes_from_the_vae(pipe):
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert f == 2  # the test kit's VAE has two blocks (a real SD VAE: 8)
    assert initial_latents(pipe, 0, 32, 48).shape == [1, pipe.unet.config.in_channels, 16, 24]
    with pytest.raises(ValueError, match="multiples of 2"):
        generate(pipe, PROMPTS[:1], guidance_scale=1, num_inference_steps=1, height=33, width=32)
    with pytest.raises(ValueError, match="needs 2 seeds"):
        generate(pipe, PROMPTS[:2], guidance_scale=1, num_inference_steps=1, height=32, width=32, seeds=[1])


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_each_scheduler_runs(pipe, name):
    original = pipe.scheduler
    pipe.scheduler = make_scheduler(name, dict(original.config))
    try:
        kw = dict(guidance_scale=7.5, num_inference_steps=4, height=32, width=32, negative_prompt="a black background")
        images = generate(pipe, PROMPTS[:2], seeds=[1, 2], **kw)
        again = generate(pipe, PROMPTS[1:2], seeds=[2], **kw)
        before = paddle.get_rng_state()
        assert [im.size for im in images] == [(32, 32)] * 2
        assert np.abs(arr(images[1]) - arr(again[0])).max() <= (0 if name == "euler-ancestral" else 2)
        assert arr(images[0]).std() > 1  # an image, not a blank
        if name == "euler-ancestral":  # seeded step noise, and the caller's RNG left as it was
            expected = paddle.rand([4]).numpy()
            paddle.set_rng_state(before)
            generate(pipe, PROMPTS[:1], seeds=[7], **kw)
            assert np.array_equal(paddle.rand([4]).numpy(), expected)
    finally:
        pipe.scheduler = original


def test_euler_ancestral_noise_follows_the_seed(pipe):
    original = pipe.scheduler
    pipe.scheduler = make_scheduler("euler-ancestral", dict(original.config))
    try:
        kw = dict(guidance_scale=1, num_inference_steps=4, height=32, width=32)
        paddle.seed(1)
        a = generate(pipe, PROMPTS[:1], seed=3, **kw)[0]
        paddle.seed(2)  # another global RNG state: same image
        b = generate(pipe, PROMPTS[:1], seed=3, **kw)[0]
        assert np.array_equal(arr(a), arr(b))
    finally:
        pipe.scheduler = original


def test_make_grid():
    ims = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    g = make_grid(ims, rows=2, cols=2)
    assert g.size == (16, 16)
    assert g.getpixel((12, 4)) == (0, 255, 0) and g.getpixel((4, 12)) == (0, 0, 255)
    assert g.getpixel((12, 12)) == (128, 128, 128)  # no fourth image
    labelled = make_grid(ims, rows=2, cols=2, labels=["first row", "second row"], tile=16)
    margin = labelled.size[0] - 32
    assert labelled.size[1] == 32 and margin > 20
    assert labelled.getpixel((margin + 1, 1)) == (255, 0, 0) and labelled.getpixel((0, 0)) == (0, 0, 0)


def test_pipeline_with_ema_samples_with_the_ema_weights_and_restores_exactly(pipe, tiny_kit):
    import os
    import types

    from sd import components
    from sd.model import EMA

    unet = pipe.unet
    before = {k: v.numpy().copy() for k, v in unet.state_dict().items()}
    ema = EMA(unet, 0.9)
    ema.shadow = {k: v * 0.5 for k, v in ema.shadow.items()}  # averaged weights unlike the UNet's own
    noise_scheduler = components.load_noise_scheduler(os.path.join(tiny_kit, "scheduler"), "epsilon")
    model = types.SimpleNamespace(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                  ema=ema, noise_scheduler=noise_scheduler)
    kw = dict(guidance_scale=1, num_inference_steps=2, height=32, width=32, seeds=[0])

    def unchanged():
        return all(np.array_equal(v.numpy(), before[k]) for k, v in unet.state_dict().items())

    unet.train()  # as during training
    try:
        with pipeline_with_ema(model) as p:
            assert p.unet is unet and not unet.training and type(p.scheduler).__name__ == "DDIMScheduler"
            assert all(np.array_equal(v.numpy(), ema.shadow[k].numpy()) for k, v in unet.state_dict().items())
            with_ema = generate(p, PROMPTS[:1], **kw)
        assert unet.training and unchanged()
        with pytest.raises(KeyboardInterrupt):
            with pipeline_with_ema(model):
                raise KeyboardInterrupt
        assert unet.training and unchanged()
        model.ema = None  # training without EMA: the UNet's own weights
        with pipeline_with_ema(model) as p:
            own = generate(p, PROMPTS[:1], **kw)
        assert unet.training and unchanged()
        assert np.abs(arr(with_ema[0]) - arr(own[0])).max() > 0
        unet.eval()
        assert np.array_equal(arr(own[0]), arr(generate(pipe, PROMPTS[:1], **kw)[0]))  # the kit's own DDIM settings
    finally:
        unet.eval()
