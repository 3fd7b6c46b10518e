"""Weights by name (sd/components/__init__.py) against a hub on 127.0.0.1 (tests/helpers/hub_mimic.py).

The libraries read their servers from the environment at import, so every download runs in a
subprocess with ``HF_ENDPOINT`` (huggingface_hub: the Hugging Face Hub) and ``PPNLP_ENDPOINT``
(ppdiffusers' and paddlenlp's download server) pointing at the mimic, and fresh caches
(``HF_HOME``, ``PPNLP_HOME``) in a temporary folder. Nothing here contacts anything but loopback.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from sd.runtime.run_state import RunState
from tests.helpers.common import ROOT, train_command
from tests.helpers.hub_mimic import HubMimic

REPO = "some-org/tiny-sd"
PROMPT = ["--prompt", "a red circle on a white background", "--num_inference_steps", "2", "--guidance_scale", "1"]


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def hub_env(cache, url):
    (cache / "ppnlp").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE",
                                                            "XDG_CACHE_HOME")}
    return {**env, "HF_ENDPOINT": url, "PPNLP_ENDPOINT": url, "HF_HOME": str(cache / "hf"),
            "PPNLP_HOME": str(cache / "ppnlp"), "HF_HUB_DISABLE_TELEMETRY": "1"}


def run(cmd, env, timeout=600):
    start = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    return r, time.time() - start


def eval_cmd(out, *args):
    return [sys.executable, os.path.join(ROOT, "eval.py"), *args, *PROMPT, "--output_dir", str(out)]


def cached_files(folder):
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}


# ---------------------------------------------------------------------------------------------
def test_endpoints_and_caches_are_the_libraries_own():
    from paddlenlp.transformers.utils import resolve_cache_dir
    from ppdiffusers.utils import constants

    from sd import components

    assert components.cache_dirs(False) == (constants.PPDIFFUSERS_CACHE, resolve_cache_dir(False, False, None))
    assert components.cache_dirs(True) == (constants.DIFFUSERS_CACHE, resolve_cache_dir(True, False, None))
    assert components.endpoint(False) == constants.PPNLP_BOS_RESOLVE_ENDPOINT
    assert components.endpoint(True) == constants.HUGGINGFACE_CO_RESOLVE_ENDPOINT


def test_local_folders_make_no_connection(tiny_kit, monkeypatch):
    import eval as eval_cli
    from sd.model import StableDiffusionModel
    from sd.sd_args import ModelArguments

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access with local folders only: {args}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    m = StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=tiny_kit, model_max_length=16,
                                            from_hf_hub=True))
    assert m.unet.config.cross_attention_dim == m.text_encoder.config.hidden_size
    args = eval_cli.parse_args(["--pretrained_model_name_or_path", tiny_kit, "--from_hf_hub", "true"])
    pipe = eval_cli.build(eval_cli.resolve_models(args), args)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False


def test_unreachable_names_fail_fast_in_one_line(tiny_kit, tmp_path, demo_file_list):
    """The offline case on loopback: nothing listens at the servers' address (connection refused)."""
    env = hub_env(tmp_path / "cache", f"http://127.0.0.1:{closed_port()}")
    for hub in ([], ["--from_hf_hub", "true"]):
        r, seconds = run(eval_cmd(tmp_path / "o", "--pretrained_model_name_or_path", "CompVis/stable-diffusion-v1-4",
                                  "--unet_model_name_or_path", "CompVis/stable-diffusion-v1-4/unet", *hub), env, 120)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "warn" not in line.lower()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: cannot download the "), r.stderr
        assert "CompVis/stable-diffusion-v1-4/" in lines[0] and "Connection refused" in lines[0], lines[0]
        assert "python -m sd.kit" in lines[0] and str(tmp_path / "cache") in lines[0]  # what to do, the cache to fill
        assert seconds < 60 and not os.path.exists(tmp_path / "o")
    # PaddleMIX's section 4.2: the VAE by name (the rest from the kit)
    cmd = train_command(tiny_kit, demo_file_list, tmp_path / "run", "--max_steps", "1",
                        "--vae_name_or_path", "CompVis/stable-diffusion-v1-4/vae")
    r, seconds = run(cmd, env, 180)
    log = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in log, log[-3000:]
    assert "cannot download the VAE 'CompVis/stable-diffusion-v1-4/vae'" in log and "Connection refused" in log, \
        log[-2000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoint-1")


def test_a_name_the_hub_does_not_have_is_a_404(tiny_kit, tmp_path):
    with HubMimic({REPO: tiny_kit}) as hub:
        r, _ = run(eval_cmd(tmp_path / "o", "--pretrained_model_name_or_path", "other-org/missing", "--from_hf_hub",
                            "true"),
                   hub_env(tmp_path / "cache", hub.url), 120)
    assert r.returncode == 2 and "HTTP 404 (not found)" in r.stderr and "other-org/missing/vae" in r.stderr, r.stderr


@pytest.mark.parametrize("server", [pytest.param("hf", marks=pytest.mark.long), "ppdiffusers"])
def test_eval_downloads_a_pipeline_by_name_then_uses_the_cache(tiny_kit, tmp_path, server):
    """The whole kit by name into a fresh cache; the second run sends no request; the images equal
    those of the same folder loaded locally (wrong weights would show)."""
    hub_flag = ["--from_hf_hub", "true"] if server == "hf" else []
    r, _ = run(eval_cmd(tmp_path / "local", "--pretrained_model_name_or_path", tiny_kit), dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    with HubMimic({REPO: tiny_kit}) as hub:
        env = hub_env(tmp_path / "cache", hub.url)
        r, _ = run(eval_cmd(tmp_path / "a", "--pretrained_model_name_or_path", REPO, *hub_flag), env)
        assert r.returncode == 0, r.stderr[-3000:]
        first = hub.count()
        got = {p for m, p in hub.requests if m == "GET"}
        r, _ = run(eval_cmd(tmp_path / "b", "--pretrained_model_name_or_path", REPO, *hub_flag), env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert hub.count() == first, hub.requests[first:]  # the cache, without a request
    weights = ("unet/diffusion_paddle_model.safetensors", "vae/diffusion_paddle_model.safetensors",
               "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json")
    assert all(any(p.endswith(w) for p in got) for w in weights), got
    cache = cached_files(tmp_path / "cache")
    assert all(any(f.endswith(w) for f in cache) for w in weights), cache
    name = "000_g1_s0.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() == \
        (tmp_path / "local" / name).read_bytes()
    assert json.load(open(tmp_path / "a" / "manifest.json"))["unet"] == f"{REPO}/unet"


@pytest.mark.long
def test_training_downloads_by_name_from_the_hf_hub(tiny_kit, demo_file_list, tmp_path):
    with HubMimic({REPO: tiny_kit}) as hub:
        env = hub_env(tmp_path / "cache", hub.url)
        cmd = train_command(REPO, demo_file_list, tmp_path / "run", "--max_steps", "2", "--save_steps", "2",
                            "--report_to", "none", "--image_logging_steps", "0", "--dataloader_num_workers", "0",
                            "--from_hf_hub", "true")
        i = cmd.index("--unet_name_or_path")
        del cmd[i:i + 2]  # the kit's UNet weights, by name too
        r, _ = run(cmd, env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        first = hub.count()
        assert first > 0
        r, _ = run(cmd, env)  # the same command again: resumes (nothing left to train), from the cache
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert hub.count() == first, hub.requests[first:]
        # eval.py on the checkpoint: the recorded names, from the server the run used (its run_config.json)
        r, _ = run(eval_cmd(tmp_path / "e", "--unet_model_name_or_path", str(tmp_path / "run" / "checkpoint-2")), env)
        assert r.returncode == 0 and (tmp_path / "e" / "000_g1_s0.png").is_file(), r.stderr[-3000:]
        assert hub.count() == first, hub.requests[first:]
    paths = RunState.read(str(tmp_path / "run" / "checkpoint-2")).model_paths
    assert paths["vae"] == f"{REPO}/vae" and paths["unet"] == f"{REPO}/unet"


TEXT_ENCODER_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from ppdiffusers.transformers import CLIPTextModel
    from sd import components

    out = {}
    for folder, repo in zip(sys.argv[1::2], sys.argv[2::2]):
        local = components.load_text_encoder(folder).state_dict()
        hub = components.load_text_encoder(components.locate(repo, "text encoder", "text_encoder", True)).state_dict()
        res = {"equal": sorted(local) == sorted(hub)
               and all(np.array_equal(local[k].numpy(), hub[k].numpy()) for k in local)}
        org, name, sub = repo.split("/", 2) + [""] * (2 - repo.count("/"))
        try:  # paddlenlp's own default for the hub: convert_from_torch, whatever the weights' layout
            stock = CLIPTextModel.from_pretrained(org + "/" + name, subfolder=sub or None,
                                                  from_hf_hub=True).state_dict()
            q = [k for k in local if k.endswith("q_proj.weight")][0]
            res["q_equal"] = bool(np.array_equal(local[q].numpy(), stock[q].numpy()))
            res["q_transposed"] = bool(np.array_equal(local[q].numpy().T, stock[q].numpy()))
        except RuntimeError as e:  # recorded: what the stock call does is what this test reports
            res["error"] = str(e).splitlines()[1][:200] if len(str(e).splitlines()) > 1 else str(e)[:200]
        out[repo] = res
    print("RESULT " + json.dumps(out))
''')


def test_a_paddle_text_encoder_from_the_hf_hub_loads_the_same_tensors(tiny_kit, tmp_path):
    """paddlenlp takes the Hugging Face Hub's model.safetensors for PyTorch weights and transposes its
    Linear layers: the kit's non-square fc1/fc2 fail to load, and with a square MLP every weight loads,
    q/k/v transposed, without an error. components reads the header (as for local folders) instead."""
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    square = tmp_path / "square"
    config = CLIPTextModel.from_pretrained(os.path.join(tiny_kit, "text_encoder")).config.to_dict()
    config["intermediate_size"] = config["hidden_size"]
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(str(square), safe_serialization=True)  # as the kit
    with HubMimic({REPO: tiny_kit, "some-org/square": str(square)}) as hub:
        r, _ = run([sys.executable, "-c", TEXT_ENCODER_SCRIPT, os.path.join(tiny_kit, "text_encoder"),
                    f"{REPO}/text_encoder",
                    str(square), "some-org/square"], hub_env(tmp_path / "cache", hub.url))
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split("RESULT ", 1)[1])
    kit, sq = result[f"{REPO}/text_encoder"], result["some-org/square"]
    assert kit["equal"] and sq["equal"], result  # components: the very tensors of the folder
    assert "fc1.weight receives a shape" in kit["error"], kit  # the fact guarded against, as paddlenlp 2.8.1 has it
    assert sq["q_transposed"] and not sq["q_equal"] and "error" not in sq, sq
