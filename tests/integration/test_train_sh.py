"""train.sh's recipes: which one runs where, with which arguments (DRY_RUN=1), and its one-line refusals."""

import json
import os
import shlex
import subprocess

import pytest

from tests.helpers.common import ROOT

# train.sh's settings: cleared from the test's environment so that only what a test sets counts
SETTINGS = ("RECIPE", "GPU_COUNT", "DRY_RUN", "KIT_DIR", "KIT_BUILD", "PRESET", "FILE_LIST", "DEMO_IMAGES",
            "OUTPUT_DIR", "GPUS", "IPS", "NPROC", "ELASTIC", "NNODES", "JOB_ID", "MAX_RESTART", "ELASTIC_TIMEOUT",
            "NODE_NAME",
            "PRETRAINED", "UNET_CONFIG", "RESOLUTION", "BATCH_SIZE", "MAX_STEPS", "LR", "LR_SCHEDULER", "WARMUP_STEPS",
            "SAVE_STEPS", "IMAGE_LOGGING_STEPS", "FIRST_IMAGE_LOGGING_STEP", "LOGGING_STEPS", "NUM_WORKERS",
            "SNR_GAMMA", "NOISE_OFFSET", "NUM_INFERENCE_STEPS", "EMA_DECAY", "BF16", "FROZEN_INFERENCE", "GRAD_ACCUM",
            "WEIGHT_DECAY", "ADAM_BETA2", "SAVE_TOTAL_LIMIT", "SEED", "MODEL_MAX_LENGTH", "MAX_GRAD_NORM",
            "DISABLE_TQDM", "CPU_THREADS")

# The demo's training arguments, exactly as train.sh has always launched them (after the launcher's own words)
DEMO_ARGUMENTS = [
    "train_txt2img_laion400m_trainer.py", "--do_train", "--output_dir", "./laion400m_pretrain_output_trainer",
    "--pretrained_model_name_or_path", "./tiny-sd", "--unet_name_or_path", "./tiny-sd/unet/config.json",
    "--file_list", "./data/filelist/train.filelist.list", "--resolution", "32", "--per_device_train_batch_size", "16",
    "--gradient_accumulation_steps", "1", "--learning_rate", "6e-3", "--weight_decay", "0.01", "--max_steps", "3000",
    "--lr_scheduler_type", "constant", "--adam_beta2", "0.999", "--warmup_steps", "0", "--image_logging_steps", "1000",
    "--first_image_logging_step", "300", "--frozen_inference", "True", "--logging_steps", "50", "--save_steps", "500",
    "--save_total_limit", "20", "--seed", "23", "--dataloader_num_workers", "1", "--model_max_length", "77",
    "--max_grad_norm", "-1", "--disable_tqdm", "False", "--bf16", "False", "--noise_offset", "0.1",
    "--snr_gamma", "5.0", "--num_inference_steps", "25", "--ema_decay", "0.999"]
PADDLEMIX_SWITCHES = {"FLAG_USE_EMA": "0", "FLAG_RECOMPUTE": "1", "FLAG_XFORMERS": "1", "FLAG_FUSED_LINEAR": "0",
                      "FLAGS_conv_workspace_size_limit": "4096"}


def has_gpu() -> bool:
    import paddle

    return paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def train_sh(*args, cwd=None, **settings):
    """Run train.sh with only ``settings`` among its variables; returns the finished process."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("FLAG_")}
    env.update(settings)
    return subprocess.run(["sh", os.path.join(ROOT, "train.sh"), *args], check=False, capture_output=True, text=True,
                          env=env, cwd=cwd or ROOT, timeout=300)


def dry_run(*args, **settings):
    """DRY_RUN=1 train.sh → (recipe line, {switch: value}, the launch command's words, stderr)."""
    r = train_sh(*args, DRY_RUN="1", **settings)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in r.stdout.splitlines()}
    environment = dict(word.split("=", 1) for word in shlex.split(lines["environment"]))
    return lines["recipe"], environment, shlex.split(lines["command"]), r.stderr


def flags(command):
    """{--flag: value} of the training script's arguments (every flag train.sh writes takes one value)."""
    words = command[command.index("--do_train") + 1:]
    return dict(zip(words[0::2], words[1::2]))


@pytest.fixture
def file_list(tmp_path):
    path = tmp_path / "custom_dataset.filelist.list"
    path.write_text("filelist/custom_dataset.filelist\n")
    return str(path)


@pytest.mark.skipif(has_gpu(), reason="the CPU default: a machine without a GPU")
def test_auto_on_a_cpu_is_the_demo_with_the_same_command_as_always():
    made_before = os.path.exists(os.path.join(ROOT, "data"))
    recipe, environment, command, _ = dry_run()
    assert recipe == "demo (GPUs: 0)"
    cores = len(os.sched_getaffinity(0))
    launcher = (["python", "-u", "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
                 "./laion400m_pretrain_output_trainer/launch_logs"] if cores >= 2 else ["python", "-u"])
    assert command == launcher + DEMO_ARGUMENTS
    assert environment == {"FLAG_USE_EMA": "1"}
    assert os.path.exists(os.path.join(ROOT, "data")) == made_before  # a dry run makes no demo data
    # extra arguments come last, unchanged; settings replace their defaults
    _, _, command, _ = dry_run("--use_ema", "True", "a b", NPROC="1", LR="1e-3")
    assert command[:3] == ["python", "-u", "train_txt2img_laion400m_trainer.py"]
    assert command[-3:] == ["--use_ema", "True", "a b"] and flags(command)["--learning_rate"] == "1e-3"


def test_sd_v1_is_paddlemixs_recipe(file_list):
    recipe, environment, command, said = dry_run(RECIPE="sd-v1", FILE_LIST=file_list, GPU_COUNT="1")
    assert recipe == "sd-v1 (GPUs: 1)" and said == ""
    assert command[:3] == ["python", "-u", "train_txt2img_laion400m_trainer.py"]
    f = flags(command)
    assert f["--pretrained_model_name_or_path"] == "CompVis/stable-diffusion-v1-4"  # a name, downloaded
    assert f["--unet_name_or_path"] == "./unet_config.json" and f["--file_list"] == file_list
    assert (f["--resolution"], f["--per_device_train_batch_size"], f["--max_steps"]) == ("256", "32", "200000")
    assert (f["--learning_rate"], f["--lr_scheduler_type"], f["--ema_decay"]) == ("1e-4", "constant", "0.9999")
    assert (f["--dataloader_num_workers"], f["--frozen_inference"], f["--bf16"]) == ("2", "False", "False")
    assert "--snr_gamma" not in f and f["--noise_offset"] == "0"
    assert environment == PADDLEMIX_SWITCHES
    _, environment, command, _ = dry_run(RECIPE="sd-v1", FILE_LIST=file_list, GPU_COUNT="8", BATCH_SIZE="8",
                                          PRETRAINED="./sd-v1-random", FLAG_USE_EMA="1", GPUS="0,1,2,3,4,5,6,7")
    f = flags(command)
    assert f["--per_device_train_batch_size"] == "8" and f["--pretrained_model_name_or_path"] == "./sd-v1-random"
    assert environment["FLAG_USE_EMA"] == "1"
    assert command[:6] == ["python", "-u", "-m", "paddle.distributed.launch", "--gpus", "0,1,2,3,4,5,6,7"]


def test_auto_picks_sd_v1_when_there_is_a_gpu(file_list):
    recipe, environment, command, _ = dry_run(FILE_LIST=file_list, GPU_COUNT="8")
    assert recipe == "sd-v1 (GPUs: 8)" and flags(command)["--resolution"] == "256"
    assert environment == PADDLEMIX_SWITCHES
    recipe, _, command, _ = dry_run(FILE_LIST=file_list, GPU_COUNT="0")
    assert recipe == "demo (GPUs: 0)" and flags(command)["--resolution"] == "32"


def test_sd_v1_without_a_gpu_says_once_what_it_switches_off(file_list):
    recipe, environment, command, said = dry_run(RECIPE="sd-v1", FILE_LIST=file_list, GPU_COUNT="0", BF16="True")
    assert recipe == "sd-v1 (GPUs: 0)" and said.count("\n") == 1 and "GPU-only settings forced off" in said
    assert "FLAG_XFORMERS" in said and "BF16" in said
    assert environment["FLAG_XFORMERS"] == "0" and flags(command)["--bf16"] == "False"
    assert command[:2] == ["python", "-u"]  # one process
    cores = len(os.sched_getaffinity(0))
    assert flags(command)["--cpu_threads"] == str(cores)  # Paddle's CPU kernels: every core, not one
    _, _, command, _ = dry_run(RECIPE="sd-v1", FILE_LIST=file_list, GPU_COUNT="0", NPROC="2")
    assert "--nproc_per_node" in command and flags(command)["--cpu_threads"] == str(max(1, cores // 2))
    _, _, command, _ = dry_run(RECIPE="sd-v1", FILE_LIST=file_list, GPU_COUNT="0", CPU_THREADS="3")
    assert flags(command)["--cpu_threads"] == "3"  # the user's choice stands


@pytest.mark.skipif(has_gpu(), reason="the sd-v1 recipe on a CPU")
def test_sd_v1_trains_on_a_cpu(tiny_kit, demo_file_list, tmp_path):
    """RECIPE=sd-v1 for real on this CPU (the kit for the real weights, 32 px, 1 step): the trainer gets
    PaddleMIX's switches with the GPU-only one off, and says nothing more about it."""
    r = train_sh("--report_to", "none", cwd=tmp_path, RECIPE="sd-v1", PRETRAINED=tiny_kit,
                 UNET_CONFIG=os.path.join(tiny_kit, "unet", "config.json"), FILE_LIST=demo_file_list,
                 OUTPUT_DIR=str(tmp_path / "out"), RESOLUTION="32", BATCH_SIZE="1", MAX_STEPS="1", SAVE_STEPS="1",
                 MODEL_MAX_LENGTH="16", NUM_WORKERS="0", IMAGE_LOGGING_STEPS="0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert log.count("GPU-only settings forced off: FLAG_XFORMERS") == 1 and "needs a GPU" not in log
    with open(tmp_path / "out" / "checkpoint-1" / "run_config.json") as f:
        config = json.load(f)["model"]
    assert config["enable_xformers_memory_efficient_attention"] is False and config["use_ema"] is False
    assert "switch recompute = True (env FLAG_RECOMPUTE)" in log
    assert f"Paddle's CPU kernels use {len(os.sched_getaffinity(0))} threads" in log
    assert "FLAGS_conv_workspace_size_limit" not in log  # cuDNN's: set on a GPU only


def test_sd_v1_without_its_file_list_stops_with_one_line(tmp_path):
    r = train_sh(RECIPE="sd-v1", FILE_LIST=str(tmp_path / "missing.filelist.list"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert all(word in r.stderr for word in ("missing.filelist.list", "create_pretraining_data.py", "docs/data.md"))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("settings, named", [({"RECIPE": "gpu"}, "RECIPE=gpu"),
                                             ({"GPU_COUNT": "two"}, "GPU_COUNT=two")])
def test_unknown_recipe_or_gpu_count_stops_with_one_line(settings, named):
    r = train_sh(DRY_RUN="1", **settings)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {named}:")
