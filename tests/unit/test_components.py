"""sd/components/__init__.py: names and folders, the newest-complete-checkpoint rule, download failure reasons,
SD v1's scheduler settings, and who may import what."""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest
import requests

from sd import components
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


def test_sd_scheduler_states_sd_v1_settings_for_every_sampler():
    import ppdiffusers

    pndm = components.sd_scheduler("PNDMScheduler")
    assert (pndm.config.clip_sample, pndm.config.skip_prk_steps, pndm.config.set_alpha_to_one) == (False, True, False)
    ddim = ppdiffusers.DDIMScheduler.from_config(pndm.config)
    assert (ddim.config.clip_sample, ddim.config.set_alpha_to_one, ddim.config.steps_offset) == (False, False, 1)
    ddpm = components.load_noise_scheduler(None, "v_prediction")  # training without a scheduler folder
    assert ddpm.config.prediction_type == "v_prediction" and ddpm.config.clip_sample is False
    stock = ppdiffusers.DDPMScheduler(**components.SD_NOISE_SCHEDULE)
    assert list(ddpm.alphas_cumprod.numpy()) == list(stock.alphas_cumprod.numpy())


def imports_of(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_who_imports_what():
    scripts = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    for path in glob.glob(os.path.join(ROOT, "sd", "*.py")):
        assert not imports_of(path) & scripts, f"{path} imports a top-level script"
    for path in glob.glob(os.path.join(ROOT, "sd", "*.py")) + [os.path.join(ROOT, "eval.py")]:
        if os.path.basename(path) not in ("components.py", "kit.py", "benchmark.py"):  # the benchmark builds kits
            assert "sd.kit" not in imports_of(path), f"{path} imports the kit builder"
    code = ("import sys, sd.model, sd.evaluation.sampling, sd.tools.export; "
            "print(sorted(m for m in sys.modules if m == 'sd.kit'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
