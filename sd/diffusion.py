"""Diffusion arithmetic used by training, once, as pure functions (DDPM, Ho et al. 2020).

Notation: ``ᾱ_t`` = ``alphas_cumprod[t]`` of the noise scheduler; ``x0`` clean latents; ``ε`` noise.
All tensors are paddle tensors; ``t`` is int64 of shape (B,); latents are (B, C, h, w).
"""

from __future__ import annotations

import paddle


def _gather(alphas_cumprod: paddle.Tensor, t: paddle.Tensor, ndim: int) -> paddle.Tensor:
    """ᾱ_t for each sample, shaped (B, 1, ..., 1) to broadcast against a rank-``ndim`` tensor."""
    a = paddle.gather(alphas_cumprod.astype("float32"), t)
    return a.reshape([-1] + [1] * (ndim - 1))


def add_noise(x0: paddle.Tensor, noise: paddle.Tensor, t: paddle.Tensor,
              alphas_cumprod: paddle.Tensor) -> paddle.Tensor:
    """Forward process q(x_t | x_0): x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · ε. Shapes: (B, C, h, w)."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: paddle.Tensor, noise: paddle.Tensor, t: paddle.Tensor, alphas_cumprod: paddle.Tensor) -> paddle.Tensor:
    """v-prediction target (Salimans & Ho 2022): v = √ᾱ_t · ε − √(1 − ᾱ_t) · x0. Shapes: (B, C, h, w)."""
    a = _gather(alphas_cumprod, t, x0.ndim)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def snr(t: paddle.Tensor, alphas_cumprod: paddle.Tensor) -> paddle.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), shape (B,)."""
    a = paddle.gather(alphas_cumprod.astype("float32"), t)
    return a / (1 - a)


def min_snr_weights(snr_t: paddle.Tensor, gamma: float, prediction_type: str) -> paddle.Tensor:
    """Per-sample loss weights of Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556), shape (B,).

    ε-prediction: min(SNR, γ) / SNR; v-prediction: min(SNR, γ) / (SNR + 1).
    """
    clipped = paddle.minimum(snr_t, paddle.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")


def diffusion_loss(pred: paddle.Tensor, target: paddle.Tensor, weights: paddle.Tensor = None) -> paddle.Tensor:
    """Mean squared error per sample (over C, h, w), optionally weighted per sample, then averaged."""
    per_sample = ((pred.astype("float32") - target.astype("float32")) ** 2).mean(axis=list(range(1, pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
