"""The memory plan (sd/runtime/memory.py): exact terms against counted modules, the shape of the activation
estimate, largest_batch, the CLI, the pre-flight stop."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from sd.runtime import memory, preflight
from tests.helpers.common import ROOT

GiB = memory.GiB


@pytest.fixture(scope="module")
def kit_arch(tiny_kit):
    return memory.Architecture.from_paths(os.path.join(tiny_kit, "unet", "config.json"),
                                          os.path.join(tiny_kit, "vae"), os.path.join(tiny_kit, "text_encoder"))


@pytest.fixture(scope="module")
def sd_arch():
    return memory.Architecture.from_paths(os.path.join(ROOT, "unet_config.json"))


def _count(layer):
    return sum(int(np.prod(p.shape)) for p in layer.parameters())


def test_parameter_counts_equal_the_built_modules(tiny_kit, kit_arch):
    from paddlenlp.transformers import CLIPTextModel
    from ppdiffusers import AutoencoderKL

    from sd.components import init_unet_from_config

    unet = init_unet_from_config(os.path.join(tiny_kit, "unet", "config.json"))
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_kit, "vae"))
    text = CLIPTextModel.from_pretrained(os.path.join(tiny_kit, "text_encoder"))
    assert kit_arch.unet_params == _count(unet)
    assert kit_arch.vae_params == _count(vae)
    assert kit_arch.vae_encoder_params == _count(vae.encoder) + _count(vae.quant_conv)
    assert kit_arch.text_params == _count(text)


def test_sd_v1_counts(sd_arch):
    # the published sizes of SD v1's UNet, VAE and CLIP ViT-L/14 text tower
    assert (sd_arch.unet_params, sd_arch.vae_params, sd_arch.text_params) == (859_520_964, 83_653_863, 123_060_480)
    assert sd_arch.latent_factor == 8


def test_exact_terms_by_precision(kit_arch):
    n, frozen = kit_arch.unet_params, kit_arch.vae_params + kit_arch.text_params
    fp32 = memory.estimate(kit_arch, memory.MemoryConfig(batch=2, resolution=32, ema=True)).device_terms
    assert fp32["trained weights"] == 4 * n and fp32["gradients"] == 4 * n and fp32["EMA copy"] == 4 * n
    assert fp32["AdamW moments"] == 8 * n and fp32["frozen VAE + text encoder"] == 4 * frozen
    assert "fp32 master weights" not in fp32 and "16-bit weight casts (O1)" not in fp32
    o1 = memory.estimate(kit_arch, memory.MemoryConfig(batch=2, resolution=32, precision="bf16-O1")).device_terms
    assert o1["trained weights"] == 4 * n and o1["16-bit weight casts (O1)"] == 2 * n and "EMA copy" not in o1
    o2 = memory.estimate(kit_arch, memory.MemoryConfig(batch=2, resolution=32, precision="bf16-O2",
                                                       ema=True)).device_terms
    assert (o2["trained weights"], o2["gradients"], o2["fp32 master weights"], o2["AdamW moments"],
            o2["EMA copy"], o2["frozen VAE + text encoder"]) == (2 * n, 2 * n, 4 * n, 8 * n, 2 * n, 2 * frozen)
    static = lambda t: sum(v for k, v in t.items() if k not in ("activations", "encoders forward"))  # noqa: E731
    o2_no_ema = memory.estimate(kit_arch, memory.MemoryConfig(batch=2, resolution=32, precision="bf16-O2"))
    assert static(o2_no_ema.device_terms) == 16 * n + 2 * frozen  # vs fp32's 16·N + 4·frozen
    # activations: 16 bit are half of fp32 (the analytic estimate, same elements)
    a32 = memory.estimate(kit_arch, memory.MemoryConfig(batch=2, resolution=64)).device_terms["activations"]
    a16 = memory.estimate(kit_arch, memory.MemoryConfig(batch=2, resolution=64, precision="bf16-O2"))
    assert abs(a16.device_terms["activations"] - a32 / 2) <= 1


def test_checkpoint_bytes_keeps_the_fp32_figure():
    assert memory.checkpoint_bytes(1000, ema=False) == 4 * 1000 * 3
    assert memory.checkpoint_bytes(1000, ema=True) == 4 * 1000 * 4
    assert memory.checkpoint_bytes(1000, ema=True, precision="bf16-O2") == 1000 * (2 * 2 + 8 + 4)


def test_activations_grow_with_batch_and_resolution_and_recompute_lowers_them(sd_arch):
    def act(**kw):
        return memory.estimate(sd_arch, memory.MemoryConfig(**kw)).device_terms["activations"]

    for device in ("cpu", "gpu"):
        for r in (256, 512):
            values = [act(batch=b, resolution=r, device=device) for b in (1, 2, 4, 8)]
            assert values == sorted(values) and len(set(values)) == 4
            assert act(batch=4, resolution=r, device=device, recompute=True) < act(batch=4, resolution=r,
                                                                                    device=device)
        assert act(batch=2, resolution=512, device=device) > act(batch=2, resolution=256, device=device)
    # eager attention keeps heads × N² probabilities: faster than linear growth with the area on the CPU
    assert act(batch=1, resolution=512) / act(batch=1, resolution=256) > 4
    assert act(batch=1, resolution=512) > act(batch=1, resolution=512, device="gpu")


def test_analytic_elements_of_a_one_level_unet():
    # one DownBlock2D/UpBlock2D level, 32 channels, one resnet per block: count by hand
    cfg = {"block_out_channels": [32], "layers_per_block": 1, "down_block_types": ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"], "attention_head_dim": 2, "in_channels": 4, "out_channels": 4}
    n, c = 100, 32
    lin, quad = memory.unet_activation_elements(cfg, n, 77, recompute=False)
    resnets = 3 * (c + c) * n * 3 + 3 * (c + c + c) * n * 2  # down, mid ×2 (32 → 32); up ×2 (64 → 32)
    mid_attention = 3 * c * n + 28 * c * n + 2 * n * 77
    expected = 4 * n + resnets + mid_attention + 3 * c * n + 2 * 4 * n  # conv_in; out GroupNorm/SiLU/conv; loss
    probs = 2 * n * n  # 2 heads
    assert (lin, quad) == (expected, probs + 2 * probs)  # kept, and the backward's working set (the largest × 2)
    lin_r, quad_r = memory.unet_activation_elements(cfg, n, 77, recompute=True)
    # recompute: resnets keep their input, the transformer block its input; the re-run block counts once
    kept = 4 * n + c * n * 3 + 2 * c * n * 2 + 3 * c * n + c * n + 3 * c * n + 2 * 4 * n
    assert (lin_r, quad_r) == (kept + 28 * c * n + 2 * n * 77, probs + 2 * probs)


def test_largest_batch_is_consistent(sd_arch):
    cfg = memory.MemoryConfig(resolution=256, device="gpu", precision="bf16-O2", recompute=True)
    budget = memory.card_budget(40 * GiB)
    b = memory.largest_batch(sd_arch, cfg, budget)
    assert b >= 1
    assert memory.estimate(sd_arch, replace(cfg, batch=b)).device_peak <= budget
    assert memory.estimate(sd_arch, replace(cfg, batch=b + 1)).device_peak > budget
    assert memory.largest_batch(sd_arch, cfg, 1 * GiB) == 0
    assert memory.largest_batch(sd_arch, replace(cfg, recompute=False), budget) < b


def test_calibration_entry_replaces_the_analytic_estimate(kit_arch, monkeypatch):
    key = (kit_arch.unet_params, "cpu", "fp32", "math", False)
    monkeypatch.setitem(memory.CALIBRATION, key, memory.Fit(a=1000.0, q=0.0, c=5e6, source="test"))
    plan = memory.estimate(kit_arch, memory.MemoryConfig(batch=3, resolution=64))
    area = (64 // kit_arch.latent_factor) ** 2
    assert plan.calibrated and plan.device_terms["activations"] == int(3 * 1000.0 * area + 5e6)
    assert not memory.estimate(kit_arch, memory.MemoryConfig(batch=3, resolution=64, recompute=True)).calibrated


def test_cli_prints_the_requested_rows():
    r = subprocess.run([sys.executable, "-m", "sd.tools.memory_plan", "--markdown"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "859,520,964" in out and "Peak per device (step or save), 256 px" in out and "512 px" in out
    assert "| precision | recompute | EMA | B=1 | B=2 | B=4 | B=8 | B=16 | B=32 | B=64 |" in out
    assert "| px | precision | recompute | EMA | 24 GB | 32 GB | 40 GB | 80 GB |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| fp32", "| bf16"))]
    assert len(rows) == 2 * 3 * 2 * 2  # resolutions × precisions × recompute × EMA
    fits = [line for line in out.splitlines() if line.startswith(("| 256 |", "| 512 |"))]
    assert len(fits) == 2 * 3 * 2 * 2


def test_preflight_stops_when_the_host_is_too_small(sd_arch):
    cfg = memory.MemoryConfig(batch=2, resolution=256, ema=True, num_workers=2)
    plan = memory.estimate(sd_arch, cfg)
    (level, message), = preflight.check_memory(sd_arch, cfg, host_available=plan.host_peak - 1, environ={})
    assert level == "stop"
    what = "a checkpoint save" if plan.host_save > plan.host_step else "a step"  # a streamed save: the step
    assert message.startswith(f"needs ~{plan.host_peak / GiB:.1f} GiB of host memory for {what} at batch 2, 256 px")
    assert "--recompute" not in message or "--recompute True" in message
    assert "--use_ema False" in message and "SD_SKIP_MEMORY_CHECK=1" in message
    (level, _), = preflight.check_memory(sd_arch, cfg, host_available=plan.host_peak * 2, environ={})
    assert level == "ok"
    (level, message), = preflight.check_memory(sd_arch, cfg, 1, environ={"SD_SKIP_MEMORY_CHECK": "1"})
    assert level == "warn" and "skipped" in message
    with pytest.raises(preflight.UserError, match="needs ~"):
        preflight.report(preflight.check_memory(sd_arch, cfg, 1 * GiB, environ={}), lambda *a: None)


def test_preflight_names_the_batch_that_fits_on_a_card(sd_arch):
    cfg = memory.MemoryConfig(batch=64, resolution=512, device="gpu", precision="bf16-O2")
    found = preflight.check_memory(sd_arch, cfg, host_available=10 ** 15, device_total=40 * GiB, environ={})
    (level, message), = [f for f in found if "card" in f[1]]
    b = memory.largest_batch(sd_arch, cfg, memory.card_budget(40 * GiB))
    assert level == "stop" and 0 < b < 64 and f"--per_device_train_batch_size {b}" in message
    assert "of the card" in message and "--bf16 True" not in message  # O2 already
    fits_recomputed = memory.estimate(sd_arch, replace(cfg, recompute=True)).device_peak <= memory.card_budget(40 * GiB)
    assert ("--recompute True" in message) == fits_recomputed


def test_architecture_of_training_arguments(tiny_kit, kit_arch):
    from sd.sd_args import ModelArguments

    args = ModelArguments(pretrained_model_name_or_path=tiny_kit,
                          unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json"))
    assert memory.architecture_of(args).unet_params == kit_arch.unet_params
    with open(os.path.join(tiny_kit, "unet", "config.json")) as f:
        assert memory.architecture_of(args).unet == json.load(f)
    with pytest.raises(FileNotFoundError):
        memory.architecture_of(ModelArguments(pretrained_model_name_or_path="CompVis/stable-diffusion-v1-4"))
