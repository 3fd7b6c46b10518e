"""Measured memory of the real training step and save, to calibrate sd/runtime/memory.py.

Runs ``train_txt2img_laion400m_trainer.py`` (a subprocess, 2 steps, a checkpoint at step 2) for each batch ×
resolution × recompute × EMA, polling the process tree every 20 ms: the training process's peak RSS (VmHWM)
during the steps (until the log line of step 2) and during the save that follows, the tree's peak PSS
(workers included), and on a GPU the process's memory as ``nvidia-smi`` reports it. It then fits the UNet's
activations, per (precision, recompute), as ``a·B·A + q·B·A² + c`` (A = latent area) to

    measured step peak − the plan's exact terms (weights, gradients, moments, EMA, frozen encoders)
                       − HOST_BASELINE (CPU run)

and prints the rows to paste into ``CALIBRATION`` (with the measurements they come from). q needs two
resolutions; with one, q keeps the analytic value.

On the real components (a quiet machine; ~20 GiB of host memory for a CPU run at batch 2, 256 px):

    python benchmarks/bench_memory.py --pretrained_model_name_or_path ./sd-v1-components \\
        --unet unet_config.json --file_list ./data/filelist/train.filelist.list \\
        --resolutions 256 --batches 1 2 --recompute 0 1 --ema 0
    # GPU: add --bf16 True --fp16_opt_level O2 (or O1) via --extra, and --resolutions 256 512 --batches 1 2 4 8

On the test kit (seconds per run): ``--pretrained_model_name_or_path ./tiny-sd --unet ./tiny-sd/unet/config.json
--file_list <demo list> --resolutions 32 64 --batches 1 2 4 --model_max_length 16``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sd.runtime import memory  # noqa: E402

ENTRY = os.path.join(ROOT, "train_txt2img_laion400m_trainer.py")
SAVE_MARK = "global_step: 2,"  # the last step's log line: the checkpoint save of step 2 follows it


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _tree(pid: int) -> List[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open(f"/proc/{pids[i]}/task/{pids[i]}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
        i += 1
    return pids


def _gpu_mib(pid: int) -> int:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return 0
    return sum(int(used) for p, used in (line.split(",") for line in out.splitlines() if "," in line)
               if int(p) == pid)


def run_case(args, batch: int, resolution: int, recompute: bool, ema: bool, workers: int) -> Dict[str, float]:
    """One training run of 2 steps and a checkpoint; peaks in bytes."""
    out = tempfile.mkdtemp(prefix="bench_memory_")
    cmd = [sys.executable, "-u", ENTRY, "--do_train", "--output_dir", out,
           "--pretrained_model_name_or_path", args.pretrained_model_name_or_path, "--unet_name_or_path", args.unet,
           "--file_list", args.file_list, "--resolution", str(resolution), "--per_device_train_batch_size",
           str(batch), "--max_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
           "--image_logging_steps", "0", "--model_max_length", str(args.model_max_length),
           "--recompute", str(recompute), "--use_ema", str(ema), "--dataloader_num_workers", str(workers),
           "--allow_upscale", "True", *args.extra]
    env = dict(os.environ, **{memory.SKIP_ENV: "1"})  # measure what the check would refuse
    peaks = {"step_hwm": 0, "save_hwm": 0, "step_pss": 0, "save_pss": 0, "step_gpu": 0, "save_gpu": 0}
    saving = threading.Event()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    tail: List[str] = []

    def read():
        for line in proc.stdout:
            tail.append(line)
            del tail[:-40]
            if SAVE_MARK in line:
                saving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        phase = "save" if saving.is_set() else "step"
        hwm = _status_kib(proc.pid, "VmHWM") * 1024
        if phase == "step":
            peaks["step_hwm"] = max(peaks["step_hwm"], hwm)
        else:  # VmHWM is monotone: the save's peak is what it reaches after the mark
            peaks["save_hwm"] = max(peaks["save_hwm"], hwm)
        peaks[f"{phase}_pss"] = max(peaks[f"{phase}_pss"], sum(_pss_kib(p) for p in _tree(proc.pid)) * 1024)
        if args.gpu:
            peaks[f"{phase}_gpu"] = max(peaks[f"{phase}_gpu"], _gpu_mib(proc.pid) * 2 ** 20)
        time.sleep(0.02)
    reader.join(timeout=10)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({' '.join(cmd)}):\n{''.join(tail)}")
    return peaks


def fit(arch, rows, precision: str, device: str, recompute: bool, context_len: int) -> memory.Fit:
    """Least squares of the activation residuals on (B·A, B·A², 1); q analytic when one area only."""
    areas = {r["A"] for r in rows}
    y = np.array([r["residual"] for r in rows], float)
    if len(areas) >= 2 and len(rows) >= 3:
        x = np.array([[r["B"] * r["A"], r["B"] * r["A"] ** 2, 1.0] for r in rows])
        (a, q, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    else:
        attention = "flash" if device == "gpu" else "math"
        area = rows[0]["A"]
        q = memory.activation_fit(arch, device, precision, attention, recompute, area, context_len)[0].q
        x = np.array([[r["B"] * r["A"], 1.0] for r in rows])
        (a, c), *_ = np.linalg.lstsq(x, y - q * np.array([r["B"] * r["A"] ** 2 for r in rows]), rcond=None)
    where = "; ".join(f"B={r['B']} R={r['R']}: {r['measured'] / memory.GiB:.3f} GiB" for r in rows)
    return memory.Fit(float(a), float(q), float(c), f"peaks {where}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model_name_or_path", required=True)
    p.add_argument("--unet", required=True, help="UNet config .json (random init, as in pretraining)")
    p.add_argument("--file_list", required=True)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    p.add_argument("--recompute", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    p.add_argument("--ema", type=int, nargs="+", default=[0], choices=(0, 1))
    p.add_argument("--workers", type=int, default=0, help="--dataloader_num_workers of every run")
    p.add_argument("--model_max_length", type=int, default=77)
    p.add_argument("--precision", default="fp32", choices=memory.PRECISIONS,
                   help="what --extra sets (e.g. bf16-O2 with --extra --bf16 True --fp16_opt_level O2)")
    p.add_argument("--gpu", action="store_true", help="a GPU run: the device peak from nvidia-smi")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more training flags (last)")
    args = p.parse_args(argv)
    base = args.pretrained_model_name_or_path
    arch = memory.Architecture.from_paths(args.unet, os.path.join(base, "vae"), os.path.join(base, "text_encoder"))
    device = "gpu" if args.gpu else "cpu"
    results = []
    print("| R | B | recompute | EMA | workers | step peak RSS (GiB) | save peak RSS | tree PSS step | tree PSS save"
          + (" | GPU step | GPU save" if args.gpu else "") + " | planned step | planned save |")
    print("|" + "---|" * (11 + 2 * args.gpu))
    for r, b, rc, ema in itertools.product(args.resolutions, args.batches, args.recompute, args.ema):
        peaks = run_case(args, b, r, bool(rc), bool(ema), args.workers)
        cfg = memory.MemoryConfig(batch=b, resolution=r, precision=args.precision, recompute=bool(rc),
                                  ema=bool(ema), device=device, num_workers=args.workers,
                                  context_len=args.model_max_length)
        plan = memory.estimate(arch, cfg)
        step = peaks["step_gpu"] if args.gpu else peaks["step_hwm"]
        static = plan.device_step - max(plan.device_terms["activations"], plan.device_terms.get("encoders forward", 0))
        baseline = 0 if args.gpu else memory.HOST_BASELINE
        results.append({"R": r, "B": b, "A": (r // arch.latent_factor) ** 2, "recompute": bool(rc), "ema": bool(ema),
                        "measured": step, "residual": step - static - baseline})
        g = memory.GiB
        gpu = f" | {peaks['step_gpu'] / g:.3f} | {peaks['save_gpu'] / g:.3f}" if args.gpu else ""
        planned = (plan.device_step, plan.device_save) if args.gpu else (plan.host_step, plan.host_save)
        print(f"| {r} | {b} | {rc} | {ema} | {args.workers} | {peaks['step_hwm'] / g:.3f} | {peaks['save_hwm'] / g:.3f}"
              f" | {peaks['step_pss'] / g:.3f} | {peaks['save_pss'] / g:.3f}{gpu} | {planned[0] / g:.3f}"
              f" | {planned[1] / g:.3f} |", flush=True)
    print(f"\n# CALIBRATION rows ({device}, {args.precision}; measured {time.strftime('%Y-%m-%d')} on "
          f"{os.uname().nodename})")
    attention = "flash" if args.gpu else "math"
    for rc in sorted({r["recompute"] for r in results}):
        rows = [r for r in results if r["recompute"] == rc and not r["ema"]] or \
               [r for r in results if r["recompute"] == rc]
        f = fit(arch, rows, args.precision, device, rc, args.model_max_length)
        print(f"    ({arch.unet_params}, {device!r}, {args.precision!r}, {attention!r}, {rc}): "
              f"Fit(a={f.a:.6g}, q={f.q:.6g}, c={f.c:.6g}, source={f.source!r}),")
    return 0


if __name__ == "__main__":
    sys.exit(main())
