"""sd/components: names and folders, the newest-complete-checkpoint rule, download failure reasons,
SD v1's scheduler settings and the one scheduler factory (schedulers.py), and who may import what."""

import json
import os
import subprocess
import sys

import pytest
import requests

from sd import components
from sd.components.schedulers import SCHEDULERS, SD_NOISE_SCHEDULE, make_scheduler
from sd.runtime import checkpoints
from tests.helpers.common import ROOT


def test_hub_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert components.is_hub_name("CompVis/stable-diffusion-v1-4")
    assert components.is_hub_name("CompVis/stable-diffusion-v1-4/vae")
    assert not any(components.is_hub_name(n) for n in ("./CompVis/sd", "/abs/path", "~/x/y", "tiny-sd", "a b/c"))
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not components.is_hub_name("org/name")  # a local folder wins, as in from_pretrained
    assert components.split_hub_name("CompVis/stable-diffusion-v1-4/vae") == ("CompVis/stable-diffusion-v1-4", "vae")
    assert components.split_hub_name("org/name") == ("org/name", "")
    with pytest.raises(components.ComponentError,
                       match="--vae_name_or_path VAE ./nope does not exist.*python -m sd.kit"):
        components.locate("./nope", "VAE", "vae", flag="--vae_name_or_path")


def make_checkpoint(folder, step=None, complete=True):
    os.makedirs(os.path.join(folder, "unet"), exist_ok=True)
    open(os.path.join(folder, "unet", "config.json"), "w").write("{}")
    if step is not None:
        json.dump({"global_step": step}, open(os.path.join(folder, "trainer_state.json"), "w"))
    if complete:
        open(os.path.join(folder, components.STATE_FILE), "w").write("{}")


def test_one_newest_complete_checkpoint_rule(tmp_path):
    out = str(tmp_path)
    assert checkpoints.newest_model_folder(out) is None
    make_checkpoint(os.path.join(out, "checkpoint-2"), 2)
    make_checkpoint(os.path.join(out, "checkpoint-10"), 10)
    make_checkpoint(os.path.join(out, "checkpoint-30"), 30, complete=False)  # killed while saving
    assert checkpoints.newest_complete_checkpoint(out) == os.path.join(out, "checkpoint-10")  # resume
    assert checkpoints.newest_model_folder(out) == os.path.join(out, "checkpoint-10")  # eval, export
    assert components.find_unet(out, None) == os.path.join(out, "checkpoint-10", "unet")
    make_checkpoint(out, 12)  # the final save in output_dir itself, a later step
    assert checkpoints.newest_model_folder(out) == out
    assert checkpoints.newest_complete_checkpoint(out) == os.path.join(out,
                                                                       "checkpoint-10")  # resume needs a checkpoint
    assert checkpoints.newest_model_folder(os.path.join(out, "checkpoint-2")) == os.path.join(out, "checkpoint-2")


def http_error(status, url="http://127.0.0.1:1/x/resolve/main/vae/config.json"):
    response = requests.Response()
    response.status_code, response.url, response.reason = status, url, "reason"
    return requests.HTTPError(f"{status} Client Error", response=response)


def test_download_reason_names_the_cause():
    assert components.download_reason(http_error(404)).startswith("HTTP 404 (not found) for http://127.0.0.1:1/x/")
    assert "huggingface-cli login" in components.download_reason(http_error(401))
    refused = requests.ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded "
                                       "(Caused by NewConnectionError(...: [Errno 111] Connection refused'))")
    try:  # the way ppdiffusers re-raises it: an EnvironmentError whose context is the connection error
        try:
            raise refused
        except requests.ConnectionError:
            raise EnvironmentError("does not appear to have a file named config.json")
    except EnvironmentError as e:
        assert components.download_reason(e) == "no connection to 127.0.0.1 (Connection refused)"
    assert components.download_reason(ValueError("first line\n  second")) == "first line second"


def test_make_scheduler_settings():
    ddim = make_scheduler("ddim").config
    assert (ddim.num_train_timesteps, ddim.beta_start, ddim.beta_end, ddim.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    assert (ddim.clip_sample, ddim.set_alpha_to_one, ddim.steps_offset) == (False, False, 1)
    # a given (training) config wins over SD v1's defaults, overrides over both; keys a class does not
    # take stay in its config without reaching the class
    v = make_scheduler("lms", {"_class_name": "PNDMScheduler", "prediction_type": "epsilon", "skip_prk_steps": True},
                       prediction_type="v_prediction")
    assert v.config.prediction_type == "v_prediction" and v.config.skip_prk_steps is True
    assert "_class_name" not in v.config
    assert v.config.beta_schedule == "linear"  # the class's default: SD v1's settings are not mixed into a given config
    assert make_scheduler("pndm").config.skip_prk_steps is True  # PLMS, as SD v1 samples
    assert make_scheduler("dpm-solver++", {"algorithm_type": "dpmsolver"}).config.algorithm_type == "dpmsolver++"
    assert {type(make_scheduler(n)).__name__ for n in SCHEDULERS} == set(SCHEDULERS.values())
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("heun")


def test_sd_v1_settings_reach_every_sampler():
    import ppdiffusers

    pndm = make_scheduler("pndm")  # what the kit's scheduler/ folder holds
    assert (pndm.config.clip_sample, pndm.config.skip_prk_steps, pndm.config.set_alpha_to_one) == (False, True, False)
    ddim = ppdiffusers.DDIMScheduler.from_config(pndm.config)
    assert (ddim.config.clip_sample, ddim.config.set_alpha_to_one, ddim.config.steps_offset) == (False, False, 1)
    ddpm = components.load_noise_scheduler(None, "v_prediction")  # training without a scheduler folder
    assert ddpm.config.prediction_type == "v_prediction" and ddpm.config.clip_sample is False
    sd_v1 = ppdiffusers.DDPMScheduler(**SD_NOISE_SCHEDULE)
    assert list(ddpm.alphas_cumprod.numpy()) == list(sd_v1.alphas_cumprod.numpy())


def test_noise_scheduler_from_a_folder_keeps_the_sampler_settings(tmp_path):
    """A DDPM schedule read from a PNDM folder keeps the settings DDPM does not take (set_alpha_to_one), so the
    image-logging sampler built from it (sampling.pipeline_with_ema) samples as SD v1."""
    import ppdiffusers

    make_scheduler("pndm").save_pretrained(str(tmp_path / "scheduler"))
    ddpm = components.load_noise_scheduler(str(tmp_path / "scheduler"), "epsilon")
    assert type(ddpm) is ppdiffusers.DDPMScheduler and ddpm.config.set_alpha_to_one is False
    sd_v1 = ppdiffusers.DDPMScheduler(**SD_NOISE_SCHEDULE)
    assert list(ddpm.alphas_cumprod.numpy()) == list(sd_v1.alphas_cumprod.numpy())
    assert make_scheduler("ddim", dict(ddpm.config)).config.set_alpha_to_one is False


def test_the_training_path_and_the_sampler_do_not_load_the_kit_builder():
    """(Which folder may import which is tests/unit/test_layering.py.)"""
    code = ("import sys, sd.model, sd.evaluation.sampling, sd.tools.export; "
            "print(sorted(m for m in sys.modules if m == 'sd.kit'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
