"""sd.tools.benchmark: figures from a real (tiny) training run, FLOP counting, and the CPU conv-bias path."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from sd import cpu
from sd.tools.benchmark import count_forward_flops, cpu_peak_gflops, run
from tests.helpers.common import ROOT


def test_run_reports_a_consistent_step_breakdown(tiny_kit, demo_file_list):
    r = run(tiny_kit, demo_file_list, resolution=32, batch_size=2, num_workers=0, steps=4, warmup=1,
            model_max_length=16, extra_args={"use_ema": True}, save_steps=2)
    assert r["steps"] == 4 and r["batch_size"] == 2
    assert r["saves"] == 2 and r["save_s"] > 0  # steps 2 and 4
    # the update's parts happen inside the optimizer's time
    assert min(r["finite_check_s"], r["adamw_s"], r["ema_update_s"]) > 0
    assert r["finite_check_s"] + r["adamw_s"] + r["ema_update_s"] <= r["optimizer_s"] * 1.05
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


def test_cpu_peak_counts_the_fma_units_width(tmp_path):
    def peak(vendor, family, flags, mhz="2450.000"):
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\ncpu MHz\t\t: {mhz}\n"
                        f"flags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\ncpu MHz\t\t: 1500.000\n")
        return cpu_peak_gflops(str(path))

    assert peak("AuthenticAMD", 23, "avx fma avx2")["gflops"] == pytest.approx(8 * 2 * 2 * 2.45)  # Zen 2: AVX2
    zen4 = peak("AuthenticAMD", 25, "avx fma avx2 avx512f", mhz="2596.146")  # Zen 4: AVX-512 on 256-bit units
    assert zen4["lanes"] == 8 and zen4["gflops"] == pytest.approx(8 * 2 * 2 * 2.596146) and "Zen 4" in zen4["isa"]
    assert peak("AuthenticAMD", 26, "avx fma avx2 avx512f")["lanes"] == 16  # Zen 5: 512-bit units
    assert peak("GenuineIntel", 6, "avx fma avx2 avx512f")["gflops"] == pytest.approx(16 * 2 * 2 * 2.45)
    assert peak("GenuineIntel", 6, "avx") is None  # no FMA: no peak claimed


@pytest.mark.long
def test_flops_only_cli_scales_with_resolution(tiny_kit):
    cfg = os.path.join(tiny_kit, "unet", "config.json")
    out = {}
    for res in (32, 64):
        r = subprocess.run([sys.executable, "-m", "sd.tools.benchmark", "--flops_only", "--unet_config", cfg,
                            "--resolution",
                            str(res), "--latent_factor", "2"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        out[res] = float(r.stdout.split("training (3 × forward) ")[1].split(" TFLOP")[0])
    assert out[64] >= 4 * out[32] * 0.99  # convolutions ×4, self-attention more


def test_dense_conv_bias_is_exact():
    from ppdiffusers.models.lora import LoRACompatibleConv  # what ppdiffusers' resnets use

    from sd.model import use_dense_conv_bias

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


# ---------------------------------------------------------------------------------------------
# --versus: the side-by-side run against PaddleMIX's example
# ---------------------------------------------------------------------------------------------
REFERENCE_EXAMPLE = os.path.join(ROOT, "..", "..", "shared", "reference", "paddlemix_stable_diffusion")
if not os.path.isdir(REFERENCE_EXAMPLE):  # a worktree two levels down, or a clone beside ../shared
    REFERENCE_EXAMPLE = os.path.join(ROOT, "..", "shared", "reference", "paddlemix_stable_diffusion")

# A stand-in for the example's entry script: it accepts exactly the flags the real example's argument
# classes define that the benchmark passes (an unknown flag fails, as PdArgumentParser does), records
# where and when it ran, and logs paddlenlp-style lines whose interval throughput it really measured.
STANDIN = r'''
import argparse, json, os, sys, time
start = time.time()
import sd  # must be this folder's sd/, not the repository's
p = argparse.ArgumentParser()
for name in ("do_train", "output_dir", "device", "per_device_train_batch_size", "gradient_accumulation_steps",
             "learning_rate", "weight_decay", "max_steps", "lr_scheduler_type", "warmup_steps", "image_logging_steps",
             "logging_steps", "resolution", "save_steps", "seed", "dataloader_num_workers",
             "pretrained_model_name_or_path", "vae_name_or_path", "text_encoder_name_or_path", "unet_name_or_path",
             "file_list", "model_max_length", "max_grad_norm", "disable_tqdm", "bf16", "report_to"):
    p.add_argument("--" + name, nargs="?", const="True")
a = p.parse_args()
os.makedirs(a.output_dir)
steps, every, batch = int(a.max_steps), int(a.logging_steps), int(a.per_device_train_batch_size)
t0 = time.perf_counter()
for step in range(1, steps + 1):
    time.sleep(0.02 if step <= every else 0.01)  # a slower first interval (warm-up)
    if step % every == 0:
        dt = time.perf_counter() - t0
        print(f"[2026-01-01 00:00:00,000] [    INFO] - loss: 0.5, learning_rate: 0.0001, global_step: {step}, "
              f"interval_runtime: {dt:.4f}, interval_samples_per_second: {batch * every / dt:.4f}, "
              f"interval_steps_per_second: {every / dt:.4f}, progress_or_epoch: 0.5", flush=True)
        t0 = time.perf_counter()
with open(os.path.join(a.output_dir, "standin.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "sd": os.path.dirname(os.path.abspath(sd.__file__)),
               "start": start, "end": time.time(), "mkl": os.environ.get("MKL_DEBUG_CPU_TYPE")}, f)
'''


@pytest.fixture
def standin_example(tmp_path):
    folder = tmp_path / "paddlemix_example"
    (folder / "sd").mkdir(parents=True)
    (folder / "sd" / "__init__.py").write_text("")
    (folder / "train_txt2img_laion400m_trainer.py").write_text(STANDIN)
    return str(folder)


def test_parse_log_reads_both_trainers_lines():
    from sd.tools.benchmark_versus import parse_log

    example = ("\x1b[32m[2026-12-01 10:37:08,317] [    INFO]\x1b[0m - loss: 1.00416031, learning_rate: 0.0001, "
               "global_step: 10, interval_runtime: 18.6769, interval_samples_per_second: 2.1417, "
               "interval_steps_per_second: 0.5354, progress_or_epoch: 0.3333\x1b[0m")
    ours = ("[2026-12-01 10:37:18,485] [    INFO] - loss: 0.9466, learning_rate: 0.0001, global_step: 20, "
            "reader_seconds_per_step: 0.0011, interval_runtime: 1.5, interval_samples_per_second: 26.6667, "
            "interval_steps_per_second: 6.6667")
    summary = "train_runtime: 38.9443, train_samples_per_second: 3.0813, train_steps_per_second: 0.7703"
    assert parse_log("\n".join([example, "noise", summary, ours])) == [
        {"global_step": 10, "samples_per_s": 2.1417}, {"global_step": 20, "samples_per_s": 26.6667}]


@pytest.mark.long
def test_versus_interleaves_and_reads_each_trainers_own_figures(standin_example, tiny_kit, demo_file_list, tmp_path):
    from sd.tools.benchmark_versus import describe_versus, versus

    before = sorted(os.listdir(standin_example))
    r = versus(standin_example, tiny_kit, demo_file_list, rounds=2, steps=4, logging_steps=2, warmup_logs=1,
               batch_size=2, resolution=32, num_workers=0, model_max_length=16, work_dir=str(tmp_path / "work"),
               ours_variants=[["--max_grad_norm", "1.0"]], example_envs=[{"MKL_DEBUG_CPU_TYPE": "7"}], timeout=600)
    sides = ["example", "example MKL_DEBUG_CPU_TYPE=7", "ours --max_grad_norm 1.0"]
    runs = r["runs"]
    assert r["sides"] == sides
    assert [(x["side"], x["round"]) for x in runs] == [(s, k) for k in (1, 2) for s in sides]  # A B C A B C
    for earlier, later in zip(runs, runs[1:]):  # one after the other, never at the same time
        assert later["start"] >= earlier["end"]
    for x in runs:
        assert x["logged_steps"] == [2, 4]
        assert x["samples_per_s"] == x["intervals"][1] > 0  # the warm-up interval is dropped
    for k, rnd in enumerate(r["rounds"], 1):
        speed = {x["side"]: x["samples_per_s"] for x in runs if x["round"] == k}
        assert rnd == {"samples_per_s": speed, "ratio": {s: speed[s] / speed["example"] for s in sides}}
    for s in sides:
        assert r["ratio"][s] == pytest.approx(np.median([x["ratio"][s] for x in r["rounds"]]))
    # the variant's flag reached our trainer (which logs its arguments), over the common command's -1
    log = open(os.path.join(runs[2]["folder"], "log.txt")).read()
    assert re.search(r"max_grad_norm\s*:\s*(-?[0-9.]+)", log).group(1) == "1.0"
    # the stand-in ran inside its example window, from a copy of its folder, with its own sd package
    for x in (x for x in runs if x["side"] == "example"):
        seen = json.load(open(os.path.join(x["folder"], "output", "standin.json")))
        assert x["start"] <= seen["start"] <= seen["end"] <= x["end"]
        assert seen["cwd"] == os.path.join(r["work_dir"], "paddlemix_example") == os.path.dirname(seen["sd"])
        argv = seen["argv"]
        assert argv[argv.index("--unet_name_or_path") + 1] == os.path.join(os.path.abspath(tiny_kit), "unet",
                                                                           "config.json")
        assert argv[argv.index("--resolution") + 1] == "32"
    # each example run had its own environment: the variable of its variant, none that `import sd` chose for ours
    seen = [json.load(open(os.path.join(x["folder"], "output", "standin.json")))["mkl"] for x in runs[:2]]
    assert seen == [None if cpu.CHOICE else os.environ.get("MKL_DEBUG_CPU_TYPE"), "7"]
    # the stand-in's interval figures are at most 2 × 2 / (2 × 0.01 s) = 200 samples/s: nothing is invented by the
    # parser
    assert 20 < r["samples_per_s"]["example"] <= 200
    assert sorted(os.listdir(standin_example)) == before  # the example folder itself is never written
    text = describe_versus(r)
    assert "round 2:" in text and f"{r['ratio'][sides[1]]:.2f}×" in text and "load average" in text


def test_the_example_runs_without_the_kernel_choice_made_for_ours(monkeypatch):
    """sd/cpu.py's MKL variable, set by `import sd`, is ours: the example runs as its users run it."""
    from sd.tools.benchmark_versus import _environment, parse_env

    monkeypatch.setattr(cpu, "CHOICE", "MKL_DEBUG_CPU_TYPE=5: ...")
    monkeypatch.setenv("MKL_DEBUG_CPU_TYPE", "5")
    assert "MKL_DEBUG_CPU_TYPE" not in _environment(True, {})
    assert _environment(True, parse_env("MKL_DEBUG_CPU_TYPE=5"))["MKL_DEBUG_CPU_TYPE"] == "5"
    assert _environment(False, {})["MKL_DEBUG_CPU_TYPE"] == "5"
    monkeypatch.setattr(cpu, "CHOICE", None)  # the user exported it: both sides keep it
    assert _environment(True, {})["MKL_DEBUG_CPU_TYPE"] == "5"
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        parse_env("MKL_DEBUG_CPU_TYPE")


def test_versus_cli_refuses_a_folder_that_is_not_the_example(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sd.tools.benchmark", "--versus", str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0
    assert "not a PaddleMIX examples/stable_diffusion folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not os.path.isdir(REFERENCE_EXAMPLE), reason="PaddleMIX's example is not in ../shared/reference")
def test_the_real_example_accepts_the_versus_command(tmp_path):
    """PaddleMIX's own argument classes parse the benchmark's command (names and values), without training."""
    from sd.tools.benchmark_versus import training_command

    cmd = training_command("x.py", "/kit", "/data/a.filelist.list", str(tmp_path / "out"), steps=60)
    check = ("import sys; from paddlenlp.trainer import PdArgumentParser; "
             "from sd import SDDataArguments, SDModelArguments, SDTrainingArguments; "
             "m, d, t = PdArgumentParser((SDModelArguments, SDDataArguments, SDTrainingArguments))"
             ".parse_args_into_dataclasses(sys.argv[1:]); "
             "print(t.resolution, t.per_device_train_batch_size, t.dataloader_num_workers, t.max_grad_norm, "
             "t.image_logging_steps, m.unet_name_or_path, d.file_list, t.device)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", check, *cmd[3:]], capture_output=True, text=True, timeout=300,
                       cwd=os.path.abspath(REFERENCE_EXAMPLE), env=dict(env, USE_TORCH="0"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-8:] == ["64", "4", "1", "-1.0", "-1", "/kit/unet/config.json", "/data/a.filelist.list",
                                     "cpu"]
