"""The offline kit: layout, stock loaders, tokenizer behaviour, determinism, offline errors."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from sd.demo_data import COLOURS, SHAPES, all_prompts
from sd.kit import KitConfig, build_kit, check_local_or_explain, latent_factor


def test_layout_and_report(tiny_kit):
    for sub in ("model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/config.json",
                "vae/config.json", "unet/config.json", "scheduler/scheduler_config.json", "kit_report.json"):
        assert os.path.isfile(os.path.join(tiny_kit, sub)), sub
    report = json.load(open(os.path.join(tiny_kit, "kit_report.json")))
    vae_cfg = json.load(open(os.path.join(tiny_kit, "vae", "config.json")))
    assert vae_cfg["scaling_factor"] == pytest.approx(1 / report["vae_latent_std"])  # measured, not copied
    unet_cfg = json.load(open(os.path.join(tiny_kit, "unet", "config.json")))
    text_cfg = json.load(open(os.path.join(tiny_kit, "text_encoder", "config.json")))
    assert unet_cfg["cross_attention_dim"] == text_cfg["hidden_size"]
    assert unet_cfg["sample_size"] * latent_factor(vae_cfg) == report["config"]["resolution"]


def test_stock_tokenizers_load_and_demo_words_are_single_tokens(tiny_kit):
    from paddlenlp.transformers import AutoTokenizer, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(tiny_kit, "tokenizer"))
    auto = AutoTokenizer.from_pretrained(os.path.join(tiny_kit, "tokenizer"))
    for word in COLOURS + SHAPES + ("background", "white", "black", "on", "a"):
        assert tok.tokenize(word) == [word + "</w>"], word
    caption = all_prompts()[0][3]
    assert auto(caption)["input_ids"] == tok(caption)["input_ids"]
    ids = tok("Zebra ünïcode 42!")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]  # byte fallback: no unknown tokens
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "zebraünïcode42!"


def test_pipeline_loads_and_generates(tiny_kit):
    import paddle
    from ppdiffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_kit, safety_checker=None)
    img = pipe("a red circle on a white background", num_inference_steps=2, height=32, width=32,
               generator=paddle.Generator().manual_seed(0)).images[0]
    assert img.size == (32, 32)


def test_build_is_deterministic(tiny_kit, tmp_path):
    again = tmp_path / "again"
    build_kit(str(again), KitConfig.test_preset(), seed=0, log=lambda *a: None)
    for part in ("text_encoder/model.safetensors", "vae/diffusion_paddle_model.safetensors",
                 "unet/diffusion_paddle_model.safetensors"):
        a, b = load_file(os.path.join(tiny_kit, part)), load_file(str(again / part))
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), part
    assert (again / "tokenizer" / "merges.txt").read_text() == open(os.path.join(tiny_kit, "tokenizer", "merges.txt")).read()


def test_unavailable_model_name_fails_fast_with_a_hint():
    with pytest.raises(FileNotFoundError, match="python -m sd.kit"):
        check_local_or_explain("CompVis/stable-diffusion-v1-4/vae", "VAE")
