"""The training entry point end to end (subprocess, test kit), resume, rotation, argument rules."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

from sd.runtime.run_state import RunState
from sd.sd_args import DataArguments, ModelArguments, SDTrainingArguments, finalize, resolve_switches
from tests.helpers.common import ROOT, WEIGHT_FILES, train_command


def train(tiny_kit, file_list, output_dir, *extra, env=None):
    cmd = train_command(tiny_kit, file_list, output_dir, *extra)
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def losses(log):
    return [line.split("loss: ")[1].split(",")[0] for line in log.splitlines() if " - loss: " in line]


def vdl_tags(folder):
    from visualdl import LogReader

    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.startswith("vdlrecords")]
    assert len(files) == 1, files  # scalars and images share the run's one event file
    reader = LogReader(file_path=files[0])
    return {kind: set(tags) for kind, tags in reader.get_tags().items()}


def test_end_to_end_checkpoints_images_logs(tiny_kit, demo_file_list, tmp_path):
    out = tmp_path / "run"
    log = train(tiny_kit, demo_file_list, out, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1",
                "--image_logging_steps", "2", "--report_to", "visualdl", env={"FLAG_USE_EMA": "1"})
    assert "switch use_ema = True (env FLAG_USE_EMA)" in log
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-4"]  # oldest deleted
    ckpt = out / "checkpoint-4"
    for f in ("unet/config.json", "unet/diffusion_paddle_model.safetensors", "optimizer.pdopt", "sd_state.json",
              "run_config.json", "trainer_state.json"):
        assert (ckpt / f).is_file(), f
    assert not (ckpt / "vae").exists()  # only_save_updated_model (default)
    assert RunState.read(str(ckpt)).resolution == 32
    assert sorted(os.listdir(out / "images")) == ["step-0000002.png", "step-0000002.txt", "step-0000004.png",
                                                  "step-0000004.txt"]
    assert (ckpt / "unet" / "diffusion_paddle_model.ema.safetensors").is_file()  # FLAG_USE_EMA=1 took effect
    tags = vdl_tags(out / "runs")
    assert {"train/loss", "train/learning_rate", "train/interval_samples_per_second",
            "train/reader_seconds_per_step"} <= tags["scalar"], tags
    assert {"images/original", "images/reconstruction", "images/guidance_1.0", "images/guidance_7.5"} <= tags["image"]


def test_image_logging_leaves_training_unchanged(tiny_kit, demo_file_list, tmp_path):
    """A grid at --first_image_logging_step and every --image_logging_steps: sampling draws nothing that training
    draws and leaves the UNet as it was, so losses, weights and EMA equal those of a run without grids."""
    common = ["--max_steps", "6", "--save_steps", "6", "--use_ema", "True", "--report_to", "none",
              "--dataloader_num_workers", "1"]
    shown = train(tiny_kit, demo_file_list, tmp_path / "shown", *common, "--first_image_logging_step", "1",
                  "--image_logging_steps", "4")
    plain = train(tiny_kit, demo_file_list, tmp_path / "plain", *common, "--image_logging_steps", "0")
    assert sorted(os.listdir(tmp_path / "shown" / "images")) == [
        "step-0000001.png", "step-0000001.txt", "step-0000004.png", "step-0000004.txt"]
    assert not (tmp_path / "plain" / "images").exists()
    assert len(losses(shown)) == 6 and losses(shown) == losses(plain)
    for name in ("diffusion_paddle_model.safetensors", "diffusion_paddle_model.ema.safetensors"):
        a = load_file(tmp_path / "shown" / "checkpoint-6" / "unet" / name)
        b = load_file(tmp_path / "plain" / "checkpoint-6" / "unet" / name)
        assert all(np.array_equal(a[k], b[k]) for k in a), name


@pytest.mark.long
def test_resume_is_exact(tiny_kit, demo_file_list, tmp_path):
    args = ["--max_steps", "6", "--save_steps", "3", "--dataloader_num_workers", "1", "--use_ema", "True",
            "--report_to", "none", "--image_logging_steps", "0"]
    full = train(tiny_kit, demo_file_list, tmp_path / "full", *args, env={"FLAG_USE_EMA": "0"})  # the CLI wins
    assert "switch use_ema = True (cli)" in full
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train(tiny_kit, demo_file_list, tmp_path / "resumed", *args)  # finds checkpoint-3 by itself
    assert "resuming from" in resumed
    assert losses(resumed) == losses(full)[3:]
    for name in ("diffusion_paddle_model.safetensors", "diffusion_paddle_model.ema.safetensors"):
        a = load_file(tmp_path / "full" / "checkpoint-6" / "unet" / name)
        b = load_file(tmp_path / "resumed" / "checkpoint-6" / "unet" / name)
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    # The EMA is updated by training itself (here with --report_to none): it moved between the
    # checkpoints and differs from the raw weights.
    ema3 = load_file(tmp_path / "full" / "checkpoint-3" / "unet" / "diffusion_paddle_model.ema.safetensors")
    ema6 = load_file(tmp_path / "full" / "checkpoint-6" / "unet" / "diffusion_paddle_model.ema.safetensors")
    raw6 = load_file(tmp_path / "full" / "checkpoint-6" / "unet" / "diffusion_paddle_model.safetensors")
    assert any(not np.array_equal(ema3[k], ema6[k]) for k in ema6)
    assert any(not np.array_equal(raw6[k], ema6[k]) for k in ema6)


def test_switch_precedence_cli_over_env_over_default():
    m, t = ModelArguments(use_ema=False), SDTrainingArguments(output_dir="x")
    env = {"FLAG_USE_EMA": "1", "FLAG_RECOMPUTE": "1"}
    got = resolve_switches((m, t), ["--use_ema", "False"], env)
    assert got["use_ema"] == (False, "cli") and m.use_ema is False
    assert got["recompute"] == (True, "env FLAG_RECOMPUTE") and t.recompute is True
    assert got["fused_linear"] == (False, "default")
    with pytest.raises(ValueError, match="FLAG_USE_EMA"):
        resolve_switches((ModelArguments(), SDTrainingArguments(output_dir="x")), [], {"FLAG_USE_EMA": "maybe"})


def test_finalize_rounds_image_logging_and_refuses_cpu_half_precision(monkeypatch):
    for k in ("FLAG_USE_EMA", "FLAG_RECOMPUTE", "FLAG_XFORMERS", "FLAG_FUSED_LINEAR"):
        monkeypatch.delenv(k, raising=False)
    m = ModelArguments(image_logging_steps=120, enable_xformers_memory_efficient_attention=True)
    t = SDTrainingArguments(output_dir="x", logging_steps=50)
    t.fp16, t.bf16 = True, True  # set after construction: paddlenlp validates them against the device
    said = []
    finalize(m, DataArguments(), t, lambda msg, changed=True: said.append(msg),
             argv=["--enable_xformers_memory_efficient_attention", "True"])
    assert m.image_logging_steps == 100
    assert not t.fp16 and not t.bf16 and not m.enable_xformers_memory_efficient_attention
    assert any("--fp16" in s for s in said) and any("--bf16" in s for s in said) and any("xformers" in s for s in said)


@pytest.fixture
def warnings_logged():
    """The messages of the warnings the project's logger gives while the test runs."""
    import logging

    from sd.log import logger

    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    logger.logger.addHandler(handler)
    yield said
    logger.logger.removeHandler(handler)


def test_resuming_keeps_the_checkpoints_global_batch(tmp_path, warnings_logged):
    """fit_global_batch: a layout that makes the saved global batch is kept; else the per-device batch, else the
    accumulation changes; else one line (a UserError) names the flags; another data order is logged."""
    from types import SimpleNamespace

    from sd.runtime.distributed import UserError
    from sd.runtime.run_state import DataOrder, Layout, RunState, fit_global_batch

    said = warnings_logged
    RunState(global_batch=8, slots={str(j): {"position": 3, "skipped": 0} for j in range(8)}, steps=3,
             layout=Layout(ranks=2, accumulation=1, per_device_batch=4),
             data_order=DataOrder(seed=5, file_list=str(tmp_path / "a.filelist.list"), shuffle_buffer=64),
             ema_updates=0, resolution=32, model_paths={"vae": "kit/vae"},
             prediction_type="epsilon").write(str(tmp_path))
    data = SimpleNamespace(file_list=str(tmp_path / "a.filelist.list"), shuffle_buffer=64)

    def fit(ranks, accumulation, batch, seed=5):
        a = SimpleNamespace(dataset_world_size=ranks, gradient_accumulation_steps=accumulation,
                            per_device_train_batch_size=batch, seed=seed)
        fit_global_batch(a, data, str(tmp_path))
        return a.gradient_accumulation_steps, a.per_device_train_batch_size

    assert fit(1, 2, 4) == (2, 4) and fit(2, 1, 4) == (1, 4)  # given so: kept
    assert fit(1, 1, 4) == (1, 8) and fit(2, 1, 8) == (1, 4) and fit(4, 1, 4) == (1, 2)  # the per-device batch
    assert fit(2, 3, 2) == (2, 2)  # 8 / (2·3) is not whole: the accumulation
    with pytest.raises(UserError, match="global batch of 8 samples, which 3 rank\\(s\\) cannot make with "
                                        "--gradient_accumulation_steps 1 or --per_device_train_batch_size 4"):
        fit(3, 1, 4)
    assert "--per_device_train_batch_size 4 → 8" in said[0] and not any("data order" in m for m in said)
    fit(1, 1, 8, seed=6)
    assert "another data order (--seed 5 → 6)" in said[-1]
    (tmp_path / "sd_state.json").write_text(json.dumps({"data_world_size": 2}))  # the per-data-rank format
    with pytest.raises(ValueError, match="sd_state.json holds no slot positions"):
        fit(1, 1, 8)


def test_bad_arguments_raise_early():
    with pytest.raises(ValueError, match="prediction_type"):
        ModelArguments(prediction_type="sample")
    with pytest.raises(ValueError, match="snr_gamma"):
        ModelArguments(snr_gamma=0)
    with pytest.raises(ValueError, match="line_format"):
        DataArguments(line_format="csv")
    with pytest.raises(ValueError, match="unet_learning_rate"):
        ModelArguments(unet_learning_rate=0.0)
    with pytest.raises(ValueError, match="image_logging_steps"):
        ModelArguments(image_logging_steps=-1)


def test_train_sh_cpu_default_with_overrides(tiny_kit, demo_file_list, tmp_path):
    """train.sh's CPU branch: settings from the environment, extra arguments passed through."""
    env = {**os.environ, "RECIPE": "demo", "KIT_DIR": tiny_kit, "FILE_LIST": demo_file_list,
           "OUTPUT_DIR": str(tmp_path / "out"),
           "MAX_STEPS": "2", "BATCH_SIZE": "2", "SAVE_STEPS": "2", "LOGGING_STEPS": "1", "IMAGE_LOGGING_STEPS": "0",
           "MODEL_MAX_LENGTH": "16", "NUM_WORKERS": "0", "FLAG_USE_EMA": "0"}
    r = subprocess.run(["sh", os.path.join(ROOT, "train.sh"), "--report_to", "none", "--prediction_type",
                        "v_prediction"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "unet" / "diffusion_paddle_model.safetensors").is_file()
    assert not (ckpt / "unet" / "diffusion_paddle_model.ema.safetensors").exists()  # FLAG_USE_EMA=0 beat the default
    config = json.load(open(ckpt / "run_config.json"))
    assert config["model"]["prediction_type"] == "v_prediction" and config["model"]["snr_gamma"] == 5.0
    assert config["model"]["ema_decay"] == 0.999 and config["model"]["noise_offset"] == 0.1
    assert config["data"]["resolution"] == 32 and not (tmp_path / "tiny-sd").exists()
    log = r.stdout + r.stderr  # rank 0's printout of its training arguments: the CPU recipe's optimizer settings
    assert re.search(r"- learning_rate\s+: 0\.006\b", log) and re.search(r"- adam_beta2\s+: 0\.999\b", log)
    assert re.search(r"- lr_scheduler_type\s+: SchedulerType\.CONSTANT", log)
    # One data-parallel process per core (up to 2) by default: both ranks logged, every slot's stream saved.
    ranks = 2 if len(os.sched_getaffinity(0)) >= 2 and os.cpu_count() >= 2 else 1
    state = RunState.read(str(ckpt))
    assert state.layout.ranks == ranks and sorted(state.slots, key=int) == [str(j) for j in range(2 * ranks)]
    assert (tmp_path / "out" / "launch_logs" / f"workerlog.{ranks - 1}").is_file() == (ranks == 2)


def test_stage_2_starts_from_a_checkpoints_unet_and_ema(tiny_kit, demo_file_list, tmp_path):
    """A 64 px run warm-started from a 32 px checkpoint (docs/training.md, stage 2): --unet_name_or_path
    <checkpoint>/unet loads its UNet, --ema_init_from <checkpoint> its EMA weights and EMA update count."""
    from sd.model import StableDiffusionModel

    train(tiny_kit, demo_file_list, tmp_path / "stage1", "--max_steps", "2", "--save_steps", "2", "--use_ema", "True",
          "--image_logging_steps", "0", "--report_to", "none")
    ckpt = tmp_path / "stage1" / "checkpoint-2"
    unet0, ema0 = (load_file(ckpt / name) for name in WEIGHT_FILES)
    assert any(not np.array_equal(unet0[k], ema0[k]) for k in unet0)  # two different sets of weights to tell apart
    model = StableDiffusionModel(ModelArguments(pretrained_model_name_or_path=tiny_kit, model_max_length=16,
                                                unet_name_or_path=str(ckpt / "unet"), use_ema=True,
                                                ema_init_from=str(ckpt)))
    assert model.ema.num_updates == 2
    assert all(np.array_equal(v.numpy(), unet0[k]) for k, v in model.unet.state_dict().items())
    assert all(np.array_equal(v.numpy(), ema0[k]) for k, v in model.ema.shadow.items())
    # The run itself, one step at 64 px: its EMA goes on from the checkpoint's (update 3: decay min(0.9999, 4/13)).
    train(tiny_kit, demo_file_list, tmp_path / "stage2", "--max_steps", "1", "--save_steps", "1", "--use_ema", "True",
          "--image_logging_steps", "0", "--report_to", "none", "--resolution", "64", "--allow_upscale", "True",
          "--unet_name_or_path", str(ckpt / "unet"), "--ema_init_from", str(ckpt))
    ckpt2 = tmp_path / "stage2" / "checkpoint-1"
    unet1, ema1 = (load_file(ckpt2 / name) for name in WEIGHT_FILES)
    decay = 4 / 13
    for k in unet1:
        np.testing.assert_allclose(ema1[k], decay * ema0[k] + (1 - decay) * unet1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    state = json.load(open(ckpt2 / "sd_state.json"))
    assert state["ema_updates"] == 3 and state["resolution"] == 64


def test_ema_init_from_needs_a_checkpoint_with_ema_and_the_ema_on(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="--ema_init_from .*: not a complete checkpoint with EMA weights"):
        ModelArguments(ema_init_from=str(tmp_path))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_paddle_model.ema.safetensors").write_bytes(b"")
    (tmp_path / "sd_state.json").write_text("{}")
    m = ModelArguments(ema_init_from=str(tmp_path))
    monkeypatch.delenv("FLAG_USE_EMA", raising=False)
    with pytest.raises(ValueError, match="starts the EMA, which is off: add --use_ema True"):
        finalize(m, DataArguments(), SDTrainingArguments(output_dir="x"), lambda msg, changed=True: None, argv=[])


def test_resuming_toward_another_step_count_warns_when_the_schedule_decays(tmp_path, warnings_logged):
    from types import SimpleNamespace

    from sd.runtime.run_state import warn_if_schedule_moves

    said = warnings_logged
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": 1000, "max_steps": 1000}))
    for schedule, steps in (("linear", 1000), ("constant", 1500), ("constant_with_warmup", 1500)):
        warn_if_schedule_moves(SimpleNamespace(lr_scheduler_type=schedule, max_steps=steps), str(tmp_path))
    warn_if_schedule_moves(SimpleNamespace(lr_scheduler_type="linear", max_steps=1500), None)  # nothing to resume
    assert said == []
    warn_if_schedule_moves(SimpleNamespace(lr_scheduler_type="linear", max_steps=1500), str(tmp_path))
    assert len(said) == 1 and "a run of 1000 steps, with --max_steps 1500: the linear LR schedule" in said[0]


def test_text_encoder_training_gets_its_own_learning_rate(tiny_kit, tmp_path):
    import paddle

    from sd.build import build_model
    from sd.sd_trainer import StableDiffusionTrainer

    m = ModelArguments(pretrained_model_name_or_path=tiny_kit,
                       unet_name_or_path=os.path.join(tiny_kit, "unet", "config.json"),
                       model_max_length=16, train_text_encoder=True, unet_learning_rate=2e-3,
                       text_encoder_learning_rate=1e-4)
    args = SDTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to=["none"], max_steps=1)
    model = build_model(m, DataArguments(resolution=32), args)
    trainer = StableDiffusionTrainer(model=model, args=args, train_dataset=None, resolution=32)
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    multiplier = {id(p): p.optimize_attr["learning_rate"] for g in trainer.optimizer._param_groups for p in g["params"]}
    assert {multiplier[id(p)] for p in model.unet.parameters()} == {2.0}
    assert {multiplier[id(p)] for p in model.text_encoder.parameters()} == {0.1}
    assert all(id(p) not in multiplier for p in model.vae.parameters())
    # one step moves the text encoder and not the VAE (after moving the UNet off its zero-initialised
    # output layers, which would otherwise block every gradient into the text encoder)
    for p in model.unet.parameters():
        p.set_value(p + 0.01 * paddle.randn(p.shape))
    ids = paddle.to_tensor(model.tokenizer(["a red circle on a white background"] * 2, padding="max_length",
                                           max_length=16,
                                           return_attention_mask=False)["input_ids"], dtype="int64")
    px = paddle.uniform([2, 3, 32, 32], min=-1, max=1)
    before = {n: {k: v.numpy().copy() for k, v in getattr(model, n).state_dict().items()}
              for n in ("text_encoder", "vae")}
    model.train()
    model(ids, px, seeds=[0, 1]).backward()
    trainer.optimizer.step()
    after = {n: {k: v.numpy() for k, v in getattr(model, n).state_dict().items()} for n in ("text_encoder", "vae")}
    assert any(not np.array_equal(before["text_encoder"][k], after["text_encoder"][k]) for k in before["text_encoder"])
    assert all(np.array_equal(before["vae"][k], after["vae"][k]) for k in before["vae"])


def test_all_bad_data_stops_with_one_line(tiny_kit, tmp_path):
    """Every record bad, no loader workers: Paddle's own loader thread would die and leave training waiting
    forever; the run stops instead, with one line and a non-zero status."""
    part = tmp_path / "part-000001"
    part.write_text("".join(f"caption {i}\tNONE\tnot base64 at all\n" for i in range(8)))
    (tmp_path / "bad.filelist").write_text(f"{part}\n")
    (tmp_path / "bad.filelist.list").write_text(f"{tmp_path / 'bad.filelist'}\n")
    cmd = train_command(tiny_kit, str(tmp_path / "bad.filelist.list"), tmp_path / "out", "--max_steps", "2",
                        "--report_to", "none", "--image_logging_steps", "0", "--dataloader_num_workers", "0")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: " in r.stderr and "no usable sample in a full pass" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_images_all_too_small_is_one_line_whatever_the_loader_workers(tiny_kit, tmp_path, workers):
    """Every image smaller than --resolution (no --allow_upscale): one line saying so and what to check, with
    or without loader workers (a worker's error is not Paddle's "Blocking queue is killed" and two tracebacks)."""
    import io

    from PIL import Image

    from sd.data.formats import encode_part_line

    part = tmp_path / "part-000001"
    lines = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(buf, "PNG")
        lines.append(encode_part_line(f"caption {i}", buf.getvalue()))
    part.write_text("".join(lines))
    (tmp_path / "small.filelist").write_text(f"{part}\n")
    (tmp_path / "small.filelist.list").write_text(f"{tmp_path / 'small.filelist'}\n")
    cmd = train_command(tiny_kit, str(tmp_path / "small.filelist.list"), tmp_path / "out", "--max_steps", "2",
                        "--report_to", "none", "--image_logging_steps", "0", "--dataloader_num_workers", str(workers))
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no usable sample in a full pass" in errors[0] and "too_small" in errors[0] \
        and "allow_upscale" in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Blocking queue" not in r.stderr, r.stderr[-3000:]
