"""The diffusion arithmetic against ppdiffusers' own scheduler and against hand computation."""

import numpy as np
import paddle
import pytest
from ppdiffusers import DDPMScheduler

from sd import diffusion

SCHED = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ACP = paddle.to_tensor(np.asarray(SCHED.alphas_cumprod, np.float32))


def fixed(shape, seed):
    return paddle.to_tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_add_noise_and_velocity_match_ppdiffusers():
    x0, noise = fixed((4, 4, 8, 8), 0), fixed((4, 4, 8, 8), 1)
    t = paddle.to_tensor([0, 10, 500, 999], dtype="int64")
    np.testing.assert_allclose(diffusion.add_noise(x0, noise, t, ACP).numpy(), SCHED.add_noise(x0, noise, t).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(diffusion.velocity(x0, noise, t, ACP).numpy(), SCHED.get_velocity(x0, noise, t).numpy(),
                               atol=1e-5)


def test_snr_is_alpha_over_one_minus_alpha():
    t = paddle.to_tensor([0, 999], dtype="int64")
    a = np.asarray(SCHED.alphas_cumprod, np.float64)[[0, 999]]
    np.testing.assert_allclose(diffusion.snr(t, ACP).numpy(), a / (1 - a), rtol=1e-5)


def test_min_snr_weights_per_sample():
    snr = paddle.to_tensor([0.5, 2.0, 10.0, 100.0])
    np.testing.assert_allclose(diffusion.min_snr_weights(snr, 5.0, "epsilon").numpy(), [1, 1, 0.5, 0.05], rtol=1e-6)
    np.testing.assert_allclose(diffusion.min_snr_weights(snr, 5.0, "v_prediction").numpy(),
                               [0.5 / 1.5, 2 / 3, 5 / 11, 5 / 101], rtol=1e-6)
    with pytest.raises(ValueError):
        diffusion.min_snr_weights(snr, 5.0, "sample")


def test_weighted_loss_by_hand():
    pred = paddle.to_tensor(np.array([[[[1.0, 3.0]]], [[[0.0, 0.0]]]], np.float32))  # (2, 1, 1, 2)
    target = paddle.zeros_like(pred)
    # per-sample MSE: [(1 + 9) / 2, 0] = [5, 0]; weights [0.5, 7] → mean([2.5, 0]) = 1.25
    assert float(diffusion.diffusion_loss(pred, target)) == pytest.approx(2.5)
    assert float(diffusion.diffusion_loss(pred, target, paddle.to_tensor([0.5, 7.0]))) == pytest.approx(1.25)
