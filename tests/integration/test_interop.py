"""Checkpoints to and from the diffusers (PyTorch) world, checked against PyTorch itself.

* Load: a tiny pipeline saved by ``diffusers`` / ``transformers`` (safetensors) is loaded by
  the trainer's own model (``sd.model.StableDiffusionModel``) through ppdiffusers' ``from_diffusers``
  conversion; tokenizer ids, text encoder, VAE and UNet outputs match PyTorch's on the same inputs.
  The trainer and ``eval.py`` run on such a folder.
* Export: ``python -m sd.tools.export`` writes a folder that ``diffusers.StableDiffusionPipeline`` loads;
  one UNet step (same latents, timesteps and text embeddings) and a whole 2-step DDIM generation
  (same initial latents and prompt embeddings) match Paddle's.
* PyTorch, diffusers and transformers are never imported by training or eval (``python -X importtime``).

PyTorch runs in a subprocess (this file run as a script): diffusers and transformers read the same
``USE_TORCH`` variable that ``sd`` sets to 0 for ppdiffusers, and the two frameworks stay apart.
Tolerance: float32 on CPU, different kernels; measured max |Paddle - PyTorch| relative to the output's
max |value| is ~1e-6 (see TOL), images differ by < 1e-4 of the [0, 1] range.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.common import ROOT, env_with_root

MISSING = [m for m in ("torch", "diffusers", "transformers") if importlib.util.find_spec(m) is None]
pytestmark = [pytest.mark.long,
              pytest.mark.skipif(bool(MISSING), reason=f"interop tests need {', '.join(MISSING)} (PyTorch side): "
                                                                         "pip install -r requirements-interop.txt")]
TOL = 1e-4  # max |paddle - torch| / max |torch| allowed; measured values are ~1e-6 (float32, CPU)
PROMPTS = ["a red circle on a white background", "a blue square"]
TORCH_LIBS = {"torch", "diffusers", "transformers"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def torch_side(*args):
    """Run this file's PyTorch half in a clean subprocess (no USE_TORCH from ``sd``)."""
    # run by file: the repository on PYTHONPATH for tests.helpers (the PyTorch half imports nothing of sd)
    env = env_with_root({k: v for k, v in os.environ.items() if k != "USE_TORCH"})
    r = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, args)], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def run_paddle(script_args, what):
    """Run a Paddle entry point under ``-X importtime``; return its log, asserting that none of
    torch/diffusers/transformers was imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", *script_args], capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert len(imported) > 50, "no -X importtime report"  # the check below would pass vacuously
    assert not imported & TORCH_LIBS, f"{what} imported {sorted(imported & TORCH_LIBS)}"
    return r.stdout + r.stderr


def train_args(kit_or_folder, file_list, out, *extra):
    return [os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"), "--do_train", "--output_dir", str(out),
            "--pretrained_model_name_or_path", kit_or_folder, "--file_list", file_list, "--resolution", "32",
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--model_max_length", "16",
            "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--image_logging_steps", "0", *extra]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def inputs_for(unet_config, text_dim, seq_len, seed=0):
    """Fixed inputs shared by both frameworks: latents, timesteps, text embeddings, images."""
    rng = np.random.default_rng(seed)
    c, s = unet_config["in_channels"], unet_config["sample_size"]
    return {"latents": rng.standard_normal((2, c, s, s), dtype=np.float32),
            "timesteps": np.array([981, 20], np.int64),
            "embeddings": rng.standard_normal((2, seq_len, text_dim), dtype=np.float32),
            "negative_embeddings": rng.standard_normal((2, seq_len, text_dim), dtype=np.float32),
            "pixels": rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_folder(tiny_kit, tmp_path_factory):
    """A tiny SD pipeline saved by diffusers itself (random PyTorch weights, the kit's configs and
    tokenizer), as safetensors and as .bin, plus PyTorch's outputs on fixed inputs."""
    work = tmp_path_factory.mktemp("diffusers")
    unet_cfg = json.load(open(os.path.join(tiny_kit, "unet", "config.json")))
    te_cfg = json.load(open(os.path.join(tiny_kit, "text_encoder", "config.json")))
    np.savez(work / "inputs.npz", **inputs_for(unet_cfg, te_cfg["hidden_size"], 16))
    torch_side("make", tiny_kit, work / "sd", work / "inputs.npz", work / "torch_out.npz")
    return {"safetensors": str(work / "sd"), "bin": str(work / "sd-bin"), "inputs": dict(np.load(work / "inputs.npz")),
            "torch": dict(np.load(work / "torch_out.npz"))}


@pytest.fixture(scope="module")
def trained_run(tiny_kit, demo_file_list, tmp_path_factory):
    """2 steps of pretraining on the test kit with EMA (the checkpoint export reads), under -X importtime."""
    out = tmp_path_factory.mktemp("run") / "out"
    log = run_paddle(train_args(tiny_kit, demo_file_list, out, "--unet_name_or_path",
                                os.path.join(tiny_kit, "unet", "config.json"), "--max_steps", "2", "--save_steps", "2",
                                "--use_ema", "True", "--ema_decay", "0.9"), "training")
    assert (out / "checkpoint-2" / "unet" / "diffusion_paddle_model.ema.safetensors").is_file(), log[-2000:]
    return out


# ---------------------------------------------------------------------------------------------
# load: diffusers → Paddle
# ---------------------------------------------------------------------------------------------
def load_trainer_model(folder):
    from sd.model import StableDiffusionModel
    from sd.sd_args import ModelArguments

    return StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=folder, model_max_length=16))


def paddle_outputs(model, inputs):
    import paddle

    with paddle.no_grad():
        ids = model.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                              return_tensors="pd").input_ids
        out = {"ids": ids.numpy(), "text": model.text_encoder(ids)[0].numpy()}
        posterior = model.vae.encode(paddle.to_tensor(inputs["pixels"])).latent_dist
        out["vae_mean"], out["vae_std"] = posterior.mean.numpy(), posterior.std.numpy()
        out["vae_decode"] = model.vae.decode(paddle.to_tensor(inputs["latents"])).sample.numpy()
        out["unet"] = model.unet(paddle.to_tensor(inputs["latents"]), paddle.to_tensor(inputs["timesteps"]),
                                 encoder_hidden_states=paddle.to_tensor(inputs["embeddings"])).sample.numpy()
    return out


def test_diffusers_folder_loads_in_the_trainer_and_matches_pytorch(diffusers_folder):
    from sd.components import saved_by_pytorch

    folder = diffusers_folder["safetensors"]
    assert all(saved_by_pytorch(os.path.join(folder, c)) for c in ("unet", "vae", "text_encoder"))
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    model = load_trainer_model(folder)
    ours, ref = paddle_outputs(model, diffusers_folder["inputs"]), diffusers_folder["torch"]
    assert np.array_equal(ours["ids"], ref["ids"])  # same BPE through paddlenlp's and transformers' tokenizers
    errors = {k: rel_err(ours[k], ref[k]) for k in ("text", "vae_mean", "vae_std", "vae_decode", "unet")}
    print("relative max error, Paddle vs PyTorch:", errors)
    assert max(errors.values()) < TOL, errors
    assert np.abs(ref["unet"]).max() > 0.1  # random init: a real signal, not zeros compared with zeros


def test_component_flags_mix_diffusers_and_paddle_folders(diffusers_folder, tiny_kit):
    """--vae_name_or_path / --text_encoder_name_or_path / --unet_name_or_path each take a diffusers
    folder beside Paddle ones (here: the kit's tokenizer and noise schedule)."""
    import paddle

    from sd.model import StableDiffusionModel
    from sd.sd_args import ModelArguments

    folder = diffusers_folder["safetensors"]
    model = StableDiffusionModel(ModelArguments(
        pretrained_model_name_or_path=tiny_kit, vae_name_or_path=os.path.join(folder, "vae"),
        text_encoder_name_or_path=os.path.join(folder, "text_encoder"), unet_name_or_path=os.path.join(folder, "unet"),
        model_max_length=16))
    ours, ref = paddle_outputs(model, diffusers_folder["inputs"]), diffusers_folder["torch"]
    assert max(rel_err(ours[k], ref[k]) for k in ("text", "vae_decode", "unet")) < TOL
    pixels = diffusers_folder["inputs"]["pixels"]
    loss = model(paddle.to_tensor(ours["ids"]), paddle.to_tensor(pixels), seeds=list(range(len(pixels))))
    assert np.isfinite(float(loss))  # the training forward runs on the converted modules



def test_bin_only_folder_is_refused_with_the_fix(diffusers_folder):
    """PyTorch .bin weights: ppdiffusers 0.29's and paddlenlp 2.8.1's pickle readers fail under numpy 2
    (np.cfloat), so the load stops early with what to do instead of a traceback from deep inside."""
    folder = diffusers_folder["bin"]
    assert os.path.isfile(os.path.join(folder, "vae", "diffusion_pytorch_model.bin"))
    with pytest.raises(ValueError, match="PyTorch .bin weights only.*save_pretrained"):
        load_trainer_model(folder)


def test_kit_is_not_taken_for_pytorch_weights(tiny_kit, tmp_path):
    from sd.components import saved_by_pytorch

    assert not any(saved_by_pytorch(os.path.join(tiny_kit, c)) for c in ("unet", "vae", "text_encoder", "tokenizer"))
    assert not saved_by_pytorch(os.path.join(tiny_kit, "unet", "config.json"))  # a file: random init
    (tmp_path / "empty").mkdir()
    assert not saved_by_pytorch(str(tmp_path / "empty"))


def test_train_and_eval_run_on_a_diffusers_folder(diffusers_folder, demo_file_list, tmp_path):
    """Fine-tune the diffusers UNet for 1 step with its own VAE/text encoder, then eval.py on the
    checkpoint and on the folder itself; neither imports PyTorch."""
    out = tmp_path / "ft"
    run_paddle(train_args(diffusers_folder["safetensors"], demo_file_list, out, "--max_steps", "1", "--save_steps",
                          "1"),
               "training")
    from sd.runtime.run_state import RunState  # (not at the top: this file's PyTorch half runs without sd)

    state = RunState.read(str(out / "checkpoint-1"))
    assert state.model_paths["vae"] == os.path.join(diffusers_folder["safetensors"], "vae")
    for name, source in (("ckpt", ["--unet_model_name_or_path", str(out / "checkpoint-1")]),
                         ("folder",
                          ["--pretrained_model_name_or_path", diffusers_folder["safetensors"], "--height", "32",
                                     "--width", "32"])):
        log = run_paddle([os.path.join(ROOT, "eval.py"), *source, "--prompt", PROMPTS[0], "--num_inference_steps", "2",
                          "--guidance_scale", "1", "--output_dir", str(tmp_path / name)], "eval.py")
        assert (tmp_path / name / "000_g1_s0.png").is_file(), log[-2000:]


# ---------------------------------------------------------------------------------------------
# export: Paddle checkpoint → diffusers
# ---------------------------------------------------------------------------------------------
def test_export_loads_in_diffusers_and_matches(trained_run, tiny_kit, tmp_path):
    import paddle
    from ppdiffusers import UNet2DConditionModel

    from sd.components.pipeline import build_pipeline
    from sd.components.schedulers import make_scheduler
    from sd.model import StableDiffusionModel
    from sd.sd_args import ModelArguments

    out = tmp_path / "exported"
    log = run_paddle(["-m", "sd.tools.export", "--checkpoint", str(trained_run / "checkpoint-2"), "--to", "diffusers",
                      "--output_dir", str(out)], "sd.tools.export")  # --variant auto: the EMA weights, as eval.py
    assert "diffusers pipeline written to" in log and "(ema weights)" in log
    for f in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (out / f).is_file(), f
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".pdparams")]

    # Paddle side: the checkpoint's EMA UNet and the kit's modules, on the same fixed inputs
    unet = UNet2DConditionModel.from_pretrained(str(trained_run / "checkpoint-2" / "unet"), variant="ema")
    raw = UNet2DConditionModel.from_pretrained(str(trained_run / "checkpoint-2" / "unet"))
    kit = StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=tiny_kit, model_max_length=16,
                                              unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json")))
    inputs = inputs_for(dict(unet.config), kit.text_encoder.config.hidden_size, 16, seed=1)
    np.savez(tmp_path / "inputs.npz", **inputs)
    torch_side("exported", out, tmp_path / "inputs.npz", tmp_path / "torch_out.npz")
    ref = dict(np.load(tmp_path / "torch_out.npz"))

    with paddle.no_grad():
        step = unet(paddle.to_tensor(inputs["latents"]), paddle.to_tensor(inputs["timesteps"]),
                    encoder_hidden_states=paddle.to_tensor(inputs["embeddings"])).sample.numpy()
        raw_step = raw(paddle.to_tensor(inputs["latents"]), paddle.to_tensor(inputs["timesteps"]),
                       encoder_hidden_states=paddle.to_tensor(inputs["embeddings"])).sample.numpy()
        ids = kit.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                            return_tensors="pd").input_ids
        text = kit.text_encoder(ids)[0].numpy()
    assert np.abs(step).max() > 1e-3 and rel_err(raw_step, step) > 1e-3  # trained, and the EMA weights differ
    assert rel_err(step, ref["unet"]) < TOL, rel_err(step, ref["unet"])  # one UNet step: the exported EMA weights
    assert np.array_equal(ids.numpy(), ref["ids"])
    assert rel_err(text, ref["text"]) < TOL

    # a whole generation: DDIM, 2 steps, guidance 7.5, the same initial latents and prompt embeddings
    pipe = build_pipeline(kit.vae, kit.text_encoder, kit.tokenizer, unet,
                          make_scheduler("ddim", json.load(open(out / "scheduler" / "scheduler_config.json"))))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt_embeds=paddle.to_tensor(inputs["embeddings"]),
                  negative_prompt_embeds=paddle.to_tensor(inputs["negative_embeddings"]),
                  latents=paddle.to_tensor(inputs["latents"]), num_inference_steps=2, guidance_scale=7.5,
                  height=32, width=32, output_type="np").images
    err = float(np.abs(np.asarray(images) - ref["images"]).max())
    print(f"UNet step rel. error {rel_err(step, ref['unet']):.2e}, text {rel_err(text, ref['text']):.2e}, "
          f"image max abs error {err:.2e}")
    assert np.asarray(images).std() > 0.01 and err < 1e-3, err


def test_export_refuses_bad_arguments(trained_run, tmp_path):
    def export(*args):
        return subprocess.run([sys.executable, "-m", "sd.tools.export", *args], capture_output=True, text=True,
                              cwd=ROOT,
                              timeout=300)

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    r = export("--checkpoint", str(trained_run / "checkpoint-2"), "--output_dir", str(tmp_path / "full"))
    assert r.returncode == 2 and "exists and is not empty" in r.stderr and (tmp_path / "full" / "x").is_file()
    r = export("--checkpoint", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "is not a folder" in r.stderr
    r = export("--checkpoint", str(trained_run / "checkpoint-2"), "--output_dir", str(tmp_path / "o"), "--variant",
               "fp16")
    assert r.returncode == 2 and "no 'fp16' weights" in r.stderr and not (tmp_path / "o").exists()
    r = export("--checkpoint", str(trained_run / "checkpoint-2"), "--output_dir", str(tmp_path / "o"), "--to", "onnx")
    assert r.returncode == 2 and "invalid choice" in r.stderr


# ---------------------------------------------------------------------------------------------
# the PyTorch half (run as a script by torch_side)
# ---------------------------------------------------------------------------------------------
def _torch_make(kit, out, inputs_file, result_file):
    """Save a tiny SD pipeline with diffusers/transformers (random weights, the kit's configs and
    tokenizer) as safetensors and as .bin, and PyTorch's outputs on the fixed inputs."""
    import diffusers
    import torch
    import transformers

    torch.manual_seed(0)

    def config(name):
        return json.load(open(os.path.join(kit, name, "config.json")))

    unet = diffusers.UNet2DConditionModel.from_config(config("unet"))
    vae = diffusers.AutoencoderKL.from_config(config("vae"))
    te_cfg = {k: v for k, v in config("text_encoder").items()
              if k not in ("paddlenlp_version", "architectures", "dtype")}
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**te_cfg))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(kit, "tokenizer"))
    scheduler = diffusers.PNDMScheduler.from_pretrained(os.path.join(kit, "scheduler"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(out)
    pipe.save_pretrained(out + "-bin", safe_serialization=False)
    _torch_outputs(pipe, inputs_file, result_file, with_images=False)


def _torch_exported(folder, inputs_file, result_file):
    """Load an exported folder with diffusers.StableDiffusionPipeline and run it on the fixed inputs."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None
    _torch_outputs(pipe, inputs_file, result_file, with_images=True)


def _torch_outputs(pipe, inputs_file, result_file, with_images):
    import diffusers
    import torch

    inp = {k: torch.from_numpy(v) for k, v in np.load(inputs_file).items()}
    out = {}
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt").input_ids
        out["ids"] = ids.numpy()
        out["text"] = pipe.text_encoder(ids)[0].numpy()
        posterior = pipe.vae.encode(inp["pixels"]).latent_dist
        out["vae_mean"], out["vae_std"] = posterior.mean.numpy(), posterior.std.numpy()
        out["vae_decode"] = pipe.vae.decode(inp["latents"]).sample.numpy()
        out["unet"] = pipe.unet(inp["latents"], inp["timesteps"],
                                encoder_hidden_states=inp["embeddings"]).sample.numpy()
        if with_images:
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            out["images"] = pipe(prompt_embeds=inp["embeddings"], negative_prompt_embeds=inp["negative_embeddings"],
                                 latents=inp["latents"], num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                                 output_type="np").images
    np.savez(result_file, **out)


if __name__ == "__main__":
    {"make": _torch_make, "exported": _torch_exported}[sys.argv[1]](*sys.argv[2:])
