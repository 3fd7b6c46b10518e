"""sd.benchmark: figures from a real (tiny) training run, FLOP counting, and the CPU conv-bias path."""

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from sd.benchmark import count_forward_flops, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_reports_a_consistent_step_breakdown(tiny_kit, demo_file_list):
    r = run(tiny_kit, demo_file_list, resolution=32, batch_size=2, num_workers=0, steps=4, warmup=1,
            model_max_length=16)
    assert r["steps"] == 4 and r["batch_size"] == 2
    assert r["samples_per_s"] == pytest.approx(2 / r["step_s"])
    for k in ("data_s", "forward_backward_s", "optimizer_s", "vae_encode_s", "text_encode_s", "unet_forward_s"):
        assert r[k] >= 0, k
    assert r["vae_encode_s"] > 0 and r["unet_forward_s"] > 0 and r["optimizer_s"] > 0
    # the components happen inside forward+backward, which happens inside the step
    assert r["vae_encode_s"] + r["text_encode_s"] + r["unet_forward_s"] <= r["forward_backward_s"] * 1.05
    assert r["forward_backward_s"] + r["optimizer_s"] <= r["step_s"] * 1.05
    assert r["peak_rss_mb"] > 100
    assert r["model_flops_per_step"] == 2 * (3 * r["unet_forward_flops_per_image"] + r["vae_encode_flops_per_image"]
                                             + r["text_encode_flops_per_image"])
    assert "achieved_tflops" not in r  # GPU only


def test_flop_count_of_known_layers():
    conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
    assert count_forward_flops(conv, paddle.zeros([2, 3, 16, 16])) == 2 * (2 * 8 * 16 * 16) * (3 * 9)
    lin = paddle.nn.Linear(5, 7)
    assert count_forward_flops(lin, paddle.zeros([4, 5])) == 2 * 4 * 7 * 5
    from ppdiffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    x, ctx = paddle.zeros([1, 10, 16]), paddle.zeros([1, 6, 12])
    projections = 2 * (10 * 16 * 16 + 6 * 12 * 16 * 2 + 10 * 16 * 16)  # q, k, v, out
    assert count_forward_flops(attn, x, encoder_hidden_states=ctx) == projections + 2 * 2 * 10 * 6 * 16


def test_flops_only_cli_scales_with_resolution(tiny_kit):
    cfg = os.path.join(tiny_kit, "unet", "config.json")
    out = {}
    for res in (32, 64):
        r = subprocess.run([sys.executable, "-m", "sd.benchmark", "--flops_only", "--unet_config", cfg, "--resolution",
                            str(res), "--latent_factor", "2"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        out[res] = float(r.stdout.split("training (3 × forward) ")[1].split(" TFLOP")[0])
    assert out[64] >= 4 * out[32] * 0.99  # convolutions ×4, self-attention more


def test_dense_conv_bias_is_exact():
    from sd.model import use_dense_conv_bias

    from ppdiffusers.models.lora import LoRACompatibleConv  # what ppdiffusers' resnets use

    paddle.seed(0)
    make = lambda: paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.SiLU(),  # noqa: E731
                                        LoRACompatibleConv(8, 4, 3, stride=2, padding=1), paddle.nn.Conv2D(4, 4, 1))
    stock, fast = make(), make()
    fast.set_state_dict(stock.state_dict())
    assert use_dense_conv_bias(fast) == 3
    x = paddle.randn([2, 3, 12, 12])
    a, b = stock(x), fast(x)
    assert np.array_equal(a.numpy(), b.numpy())
    (a ** 2).sum().backward()
    (b ** 2).sum().backward()
    for p, q in zip(stock.parameters(), fast.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-5, atol=1e-6)
