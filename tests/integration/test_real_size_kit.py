"""The real-size random kit (`python -m sd.kit --preset sd-v1`): CLIP's tokenizer, the streamed safetensors files,
and (long) the whole build at SD v1-4's sizes loaded through sd/components."""

import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from sd.components import load_text_encoder, load_tokenizer, load_unet, load_vae
from sd.kit import real_size
from sd.kit.real_size import parameter_layout, random_tensor, write_safetensors, write_tokenizer
from sd.kit.tokenizer import find_clip_bpe
from tests.helpers.common import ROOT

PROMPT = "a photo of an astronaut riding a horse on mars"
PROMPT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]  # HF's / openai's CLIP tokenizer
needs_open_clip = pytest.mark.skipif(find_clip_bpe() is None, reason="open_clip not installed: "
                                     "pip install --no-deps -r requirements-kit.txt")

# CompVis/stable-diffusion-v1-4's published configs, field for field (library version fields and names aside)
PUBLISHED_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
                 "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
                 "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
                 "up_block_types": ["UpDecoderBlock2D"] * 4}
PUBLISHED_TEXT_ENCODER = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
                          "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
                          "initializer_factor": 1.0,
                          "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                          "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
                          "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
                          "vocab_size": 49408}
PUBLISHED_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                       "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                       "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
PUBLISHED_TOKENIZER = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
                       "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}
# counted: the parameters of the ppdiffusers modules these configs build (= the elements the safetensors files hold)
PARAMETERS = {"vae": 83_653_863, "text_encoder": 123_060_480, "unet": 859_520_964}


def _published_fields_equal(path, published):
    with open(path) as f:
        written = json.load(f)
    return {k: written.get(k, "<missing>") for k in published} == published


@needs_open_clip
def test_clip_tokenizer_gives_openai_ids(tmp_path):
    from paddlenlp.transformers import CLIPTokenizer

    source, size = write_tokenizer(str(tmp_path), log=lambda *a: None)
    assert "CLIP's BPE" in source and size == 49408
    with open(tmp_path / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    assert list(vocab.values()) == list(range(49408)) and vocab["<|startoftext|>"] == 49406
    assert vocab["<|endoftext|>"] == 49407 and vocab["a</w>"] == 320
    with open(tmp_path / "merges.txt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2" and lines[1] == "i n" and len(lines) == 1 + 48894
    assert _published_fields_equal(tmp_path / "tokenizer_config.json", PUBLISHED_TOKENIZER)
    for tok in (CLIPTokenizer.from_pretrained(str(tmp_path)), load_tokenizer(str(tmp_path))):  # paddlenlp's, the repo's
        assert tok(PROMPT)["input_ids"] == PROMPT_IDS
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
        assert tok.model_max_length == 77


def test_tokenizer_without_open_clip_falls_back_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(real_size, "find_clip_bpe", lambda: None)
    lines = []
    source, size = write_tokenizer(str(tmp_path), log=lines.append)
    assert "learned BPE" in source and size < 49408
    assert len(lines) == 1 and "NOT SD v1's" in lines[0]
    tok = load_tokenizer(str(tmp_path))
    ids = tok("a red circle on a blue background")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == size - 1


def test_random_tensors_are_seeded_by_name():
    a = random_tensor(0, "unet", "conv_in.weight", (320, 4, 3, 3), "fan_in", 36)
    assert np.array_equal(a, random_tensor(0, "unet", "conv_in.weight", (320, 4, 3, 3), "fan_in", 36))
    assert not np.array_equal(a, random_tensor(1, "unet", "conv_in.weight", (320, 4, 3, 3), "fan_in", 36))
    assert not np.array_equal(a, random_tensor(0, "vae", "conv_in.weight", (320, 4, 3, 3), "fan_in", 36))
    assert a.dtype == np.float32 and np.abs(a).max() <= 1 / 6 and a.std() == pytest.approx(1 / 6 / 3 ** 0.5, rel=0.05)
    e = random_tensor(0, "text_encoder", "e", (1000, 64), "embedding", 0)
    assert e.std() == pytest.approx(0.02, rel=0.05)
    assert np.array_equal(random_tensor(0, "vae", "n.weight", (8,), "one", 0), np.ones(8, np.float32))


def test_streamed_safetensors_load_through_the_repo_loader(tmp_path):
    """A small VAE (its attention has square Linear weights) written as the kit writes it loads with every tensor in
    place, not transposed."""
    import paddle
    from ppdiffusers import AutoencoderKL

    config = dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=16)
    with paddle.LazyGuard():
        lazy = AutoencoderKL(**config)
    layout = parameter_layout(lazy)
    assert {rule for _, _, rule, _ in layout} == {"fan_in", "one", "zero"}
    path = tmp_path / "diffusion_paddle_model.safetensors"
    write_safetensors(str(path), layout, lambda *t: random_tensor(3, "vae", *t), {"format": "pd"})
    lazy.save_config(str(tmp_path))
    vae = load_vae(str(tmp_path))
    loaded = vae.state_dict()
    with safe_open(str(path), "np") as f:
        assert f.metadata() == {"format": "pd"} and set(f.keys()) == set(loaded)
        for name in f.keys():
            assert np.array_equal(f.get_tensor(name), loaded[name].numpy()), name
    square = [n for n, shape, *_ in layout if len(shape) == 2 and shape[0] == shape[1]]
    assert square  # the case a transposing loader would get wrong silently
    assert np.isfinite(vae.decode(paddle.randn([1, 4, 8, 8])).sample.numpy()).all()


@pytest.mark.long
@needs_open_clip
def test_sd_v1_kit_sizes_configs_and_loaders(tmp_path, monkeypatch):
    """Build the real-size kit (~4.3 GB on disk, < 1 GB of memory), then load each part through sd/components
    and compare with SD v1-4's published configs."""
    import gc

    import paddle
    from ppdiffusers.models import modeling_utils

    # ppdiffusers' lazy loading (what LOW_CPU_MEM_USAGE_DEFAULT=1 selects): the UNet loads at a 7.3 GB peak instead of
    # 10.6 GB (fresh initial weights, then the file's); every tensor is compared with the file below either way
    monkeypatch.setattr(modeling_utils, "LOW_CPU_MEM_USAGE_DEFAULT", True)

    from sd.kit.__main__ import main

    kit = str(tmp_path / "sd-v1-random")
    main(["--preset", "sd-v1", "--output_dir", kit, "--seed", "5"])
    with open(os.path.join(kit, "kit_report.json")) as f:
        report = json.load(f)
    assert report["preset"] == "sd-v1" and report["seed"] == 5 and report["vocab_size"] == 49408
    assert {k: report[f"{k}_parameters"] for k in PARAMETERS} == PARAMETERS
    with open(os.path.join(kit, "model_index.json")) as f:
        index = json.load(f)
    assert index["safety_checker"] == index["feature_extractor"] == [None, None]
    assert not index["requires_safety_checker"]
    assert _published_fields_equal(os.path.join(kit, "vae", "config.json"), PUBLISHED_VAE)
    assert _published_fields_equal(os.path.join(kit, "text_encoder", "config.json"), PUBLISHED_TEXT_ENCODER)
    assert _published_fields_equal(os.path.join(kit, "scheduler", "scheduler_config.json"), PUBLISHED_SCHEDULER)
    assert _published_fields_equal(os.path.join(kit, "tokenizer", "tokenizer_config.json"), PUBLISHED_TOKENIZER)
    with open(os.path.join(ROOT, "unet_config.json")) as f:
        published_unet = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    assert _published_fields_equal(os.path.join(kit, "unet", "config.json"), published_unet)

    tokenizer = load_tokenizer(os.path.join(kit, "tokenizer"))
    assert tokenizer(PROMPT)["input_ids"] == PROMPT_IDS
    ids = paddle.to_tensor([tokenizer(PROMPT, padding="max_length", max_length=77)["input_ids"]])
    weights = {"vae": "diffusion_paddle_model.safetensors", "text_encoder": "model.safetensors",
               "unet": "diffusion_paddle_model.safetensors"}
    for part, loader in (("text_encoder", load_text_encoder), ("vae", load_vae), ("unet", load_unet)):
        model = loader(os.path.join(kit, part))
        assert sum(int(np.prod(p.shape)) for p in model.parameters()) == PARAMETERS[part], part
        state = model.state_dict()
        with safe_open(os.path.join(kit, part, weights[part]), "np") as f:
            assert set(f.keys()) == set(state), part
            for name in f.keys():  # every tensor as written (none transposed, none left at its initialisation)
                assert np.array_equal(f.get_tensor(name), state[name].numpy()), name
        del state
        with paddle.no_grad():
            if part == "text_encoder":
                hidden = model(ids)[0]  # (1, 77, 768): what the UNet cross-attends to
                assert hidden.shape == [1, 77, 768] and np.isfinite(hidden.numpy()).all()
            elif part == "vae":
                image = model.decode(paddle.randn([1, 4, 8, 8])).sample  # (1, 3, 64, 64)
                assert image.shape == [1, 3, 64, 64] and np.isfinite(image.numpy()).all()
            else:
                eps = model(paddle.randn([1, 4, 8, 8]), 10, encoder_hidden_states=hidden).sample
                assert eps.shape == [1, 4, 8, 8] and np.isfinite(eps.numpy()).all()
        del model
        gc.collect()


def test_cli_refuses_tiny_kit_options_and_checks_for_the_real_size_kit(tmp_path, capsys):
    from sd.kit.__main__ import main

    with pytest.raises(SystemExit):
        main(["--preset", "sd-v1", "--resolution", "64", "--output_dir", str(tmp_path / "kit")])
    assert "--resolution: the tiny kit's options" in capsys.readouterr().err
    assert not (tmp_path / "kit").exists()
    (tmp_path / "kit_report.json").write_text(json.dumps({"preset": "sd-v1", "seed": 0}))
    for flag in ("--check", "--unet_init"):
        with pytest.raises(SystemExit):
            main([flag, str(tmp_path)])
        assert "--preset sd-v1" in capsys.readouterr().err
