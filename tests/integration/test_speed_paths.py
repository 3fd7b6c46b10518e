"""The switchable speed paths: --frozen_inference (frozen VAE and text encoders through Paddle Inference) and
--to_static (the UNet and VAE encoder as static graphs) give the eager run's numbers to float rounding."""

import os
import subprocess

import numpy as np
import paddle
import pytest

from tests.helpers.common import ROOT, train_command
from tests.integration.test_golden import EXTRA, golden_losses


def _model(tiny_kit, **kw):
    from sd.model import StableDiffusionModel
    from sd.sd_args import ModelArguments

    args = ModelArguments(pretrained_model_name_or_path=tiny_kit,
                          unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json"),
                          model_max_length=16, image_logging_steps=0, **kw)
    paddle.seed(0)
    return StableDiffusionModel(args)


def test_frozen_inference_encodes_as_the_eager_encoders(tiny_kit):
    model = _model(tiny_kit)
    pixels = paddle.uniform([3, 3, 32, 32], min=-1, max=1)
    ids = paddle.to_tensor(np.random.default_rng(0).integers(0, 50, (3, 16)), dtype="int64")
    with paddle.no_grad():
        eager = model.encode_images(pixels, [np.random.default_rng(i) for i in range(3)]).numpy()
        eager_text = model.encode_text(ids).numpy()
        model.args.frozen_inference = True  # what --frozen_inference sets: predictors are built on the next call
        fast = model.encode_images(pixels, [np.random.default_rng(i) for i in range(3)]).numpy()
        fast_text = model.encode_text(ids).numpy()
        # another batch, same predictor
        other = model.encode_images(pixels[:2] * 0.5, [np.random.default_rng(i) for i in range(2)]).numpy()
    assert {type(model._static[k]).__name__ for k in ("vae", "text")} == {"InferenceFunction"}
    np.testing.assert_allclose(fast, eager, rtol=1e-4, atol=1e-5 * np.abs(eager).max())
    np.testing.assert_allclose(fast_text, eager_text, rtol=1e-4, atol=1e-5 * np.abs(eager_text).max())
    assert other.shape == (2,) + eager.shape[1:] and not np.allclose(other, eager[:2], atol=1e-3)


@pytest.mark.long
def test_to_static_and_frozen_inference_train_as_the_golden_eager_run(tiny_kit, demo_file_list, tmp_path):
    """The golden run's first steps with both switches (and the EMA of the golden run): same losses to 1e-4."""
    steps = 4
    extra = [a for a in EXTRA]
    extra[extra.index("--max_steps") + 1] = str(steps)
    extra[extra.index("--save_steps") + 1] = str(steps)
    r = subprocess.run(train_command(tiny_kit, demo_file_list, str(tmp_path / "run"), *extra, "--to_static", "True",
                                     "--frozen_inference", "True"),
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    losses = [float(line.split(" - loss: ")[1].split(",")[0]) for line in log.splitlines() if " - loss: " in line]
    golden = [float(x) for x in golden_losses()[:steps]]
    np.testing.assert_allclose(losses, golden, rtol=1e-4)
    assert os.path.isfile(os.path.join(tmp_path, "run", f"checkpoint-{steps}", "unet",
                                       "diffusion_paddle_model.ema.safetensors"))
