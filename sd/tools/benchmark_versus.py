"""Side-by-side throughput: this repository's trainer against PaddleMIX's example, interleaved.

    python -m sd.tools.benchmark --versus ../shared/reference/paddlemix_stable_diffusion --rounds 3

Both trainers run as their own entry scripts (``train_txt2img_laion400m_trainer.py`` here and in the
example folder) on the same command line — the example's flag names, its benchmark config (batch 4,
64 px, 1 loader worker, fp32, no gradient clipping, no image logging), the same local components
and the same file list — one after the other, A B A B, for ``rounds`` rounds. Each side's throughput
is what its own trainer logs, ``interval_samples_per_second`` (paddlenlp's samples per second over
each ``--logging_steps`` interval); the first ``warmup_logs`` intervals of every run (loader start,
first allocations) are dropped. Per run the median interval is taken; the ratio is computed per
round (same moment of the machine's load) and its median is the reported figure.

The example folder is copied to a temporary folder first (it is only read), and it runs with that
folder as its working directory and nothing of this repository on its path. It downloads nothing:
every ``--*_name_or_path`` is a local folder. Its data must be in its part-file format with
``laion400m`` in the part files' paths (how it picks the line layout); ``create_pretraining_data.py``
writes exactly that.

The example runs in the environment a user of it would have: when ``import sd`` chose MKL's AVX2
kernels for this process (``sd/cpu.py``; the example does not), the variable is taken out of the
example's environment. ``example_envs`` adds example runs with variables of their own (e.g.
``MKL_DEBUG_CPU_TYPE=5``: the example on the same kernels as ours), each in every round; ratios stay
against the plain example.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from sd import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
ENTRY = "train_txt2img_laion400m_trainer.py"
_STEP = re.compile(r"\bglobal_step: (\d+)")
_SPEED = re.compile(r"\binterval_samples_per_second: ([0-9.eE+-]+)")


def check_example_folder(path: str) -> str:
    """The absolute path of a PaddleMIX ``examples/stable_diffusion`` folder, or a one-line ValueError."""
    folder = os.path.abspath(path)
    if not os.path.isfile(os.path.join(folder, ENTRY)) or not os.path.isdir(os.path.join(folder, "sd")):
        raise ValueError(f"--versus {path}: not a PaddleMIX examples/stable_diffusion folder (it needs {ENTRY} and "
                         f"sd/); pass the folder that holds PaddleMIX's {ENTRY}")
    return folder


def training_command(script: str, kit: str, file_list: str, output_dir: str, steps: int, batch_size: int = 4,
                     resolution: int = 64, num_workers: int = 1, logging_steps: int = 10, model_max_length: int = 77,
                     seed: int = 23, device: str = "cpu") -> List[str]:
    """The command both trainers accept: the flags of PaddleMIX's README command (learning rate 1e-4, weight
    decay 0.01, constant schedule, no gradient clipping), the benchmark's config, local components."""
    return [sys.executable, "-u", script, "--do_train", "--output_dir", output_dir, "--device", device,
            "--per_device_train_batch_size", str(batch_size), "--gradient_accumulation_steps", "1",
            "--learning_rate", "1e-4", "--weight_decay", "0.01", "--max_steps", str(steps),
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--image_logging_steps", "0",
            "--logging_steps", str(logging_steps), "--resolution", str(resolution), "--save_steps", str(10 * steps),
            "--seed", str(seed), "--dataloader_num_workers", str(num_workers),
            "--pretrained_model_name_or_path", kit, "--vae_name_or_path", os.path.join(kit, "vae"),
            "--text_encoder_name_or_path", os.path.join(kit, "text_encoder"),
            "--unet_name_or_path", os.path.join(kit, "unet", "config.json"), "--file_list", file_list,
            "--model_max_length", str(model_max_length), "--max_grad_norm", "-1", "--disable_tqdm", "True",
            "--bf16", "False", "--report_to", "none"]


def absolute_file_list(file_list: str, folder: str) -> str:
    """A copy of ``file_list`` and its ``.filelist`` files with every path absolute (the example opens them
    relative to its working directory; this repository also relative to the listing file); returns its path."""
    from sd.data.formats import read_filelist, read_filelist_list

    os.makedirs(folder, exist_ok=True)
    lines = []
    for k, entry in enumerate(read_filelist_list(file_list)):
        listing = os.path.join(folder, f"part-list-{k}.filelist")
        with open(listing, "w") as f:
            f.writelines(os.path.abspath(e.path) + "\n" for e in read_filelist(entry.path))
        lines.append(listing + ("" if entry.weight is None else f" {entry.weight}"))
    out = os.path.join(folder, "versus.filelist.list")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def parse_log(text: str) -> List[Dict[str, float]]:
    """Each training log line's ``global_step`` and ``interval_samples_per_second``, in order."""
    rows = []
    for line in text.splitlines():
        speed, step = _SPEED.search(line), _STEP.search(line)
        if speed and step:
            rows.append({"global_step": int(step.group(1)), "samples_per_s": float(speed.group(1))})
    return rows


def _environment(example: bool, extra_env: Dict[str, str]) -> Dict[str, str]:
    env = dict(os.environ, USE_TORCH="0", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PADDLE_TRAINER_ID", None)
    if example:  # its own sd/ package, not this repository's
        env.pop("PYTHONPATH", None)
        if cpu.CHOICE:  # set by `import sd` in this process, not by the user: not the example's
            env.pop(cpu.MKL_VARIABLE, None)
    else:
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra_env)
    return env


def run_side(side: str, script: str, cwd: str, command_args: dict, extra: Sequence[str], work: str, round_: int,
             warmup_logs: int, timeout: float, example: bool, extra_env: Dict[str, str]) -> dict:
    """One training run of one side (its files in ``work/round-<k>``); returns its per-interval and median
    throughput and its timing."""
    out = os.path.join(work, f"round-{round_}")
    cmd = training_command(script, output_dir=os.path.join(out, "output"), **command_args) + list(extra)
    os.makedirs(out, exist_ok=True)
    load_before, start = os.getloadavg()[0], time.time()
    with open(os.path.join(out, "log.txt"), "w") as log:
        r = subprocess.run(cmd, cwd=cwd, env=_environment(example, extra_env), stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout)
    end = time.time()
    with open(os.path.join(out, "log.txt"), errors="replace") as f:
        text = f.read()
    if r.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise RuntimeError(f"{side} run {round_} failed (exit {r.returncode}): {shlex.join(cmd)}\n{tail}")
    rows = parse_log(text)
    measured = [row["samples_per_s"] for row in rows[warmup_logs:]]
    if not measured:
        raise RuntimeError(f"{side} run {round_}: no interval_samples_per_second after {warmup_logs} warm-up "
                           f"log(s) in {os.path.join(out, 'log.txt')}; raise --versus_steps")
    return {"side": side, "round": round_, "start": start, "end": end, "load_before": load_before,
            "load_after": os.getloadavg()[0], "intervals": [row["samples_per_s"] for row in rows],
            "logged_steps": [row["global_step"] for row in rows], "samples_per_s": statistics.median(measured),
            "folder": out}


def side_name(ours_args: Sequence[str]) -> str:
    """``ours`` for the default command, ``ours --flag value ...`` for a variant."""
    return " ".join(["ours", *ours_args])


def parse_env(pairs: str) -> Dict[str, str]:
    """``"A=1 B=2"`` → ``{"A": "1", "B": "2"}`` (an --example_env value)."""
    env = {}
    for pair in shlex.split(pairs):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--example_env: {pair!r} is not NAME=VALUE")
        env[key] = value
    return env


def versus(example_dir: str, kit: str, file_list: str, rounds: int = 3, steps: int = 60, logging_steps: int = 10,
           warmup_logs: int = 1, batch_size: int = 4, resolution: int = 64, num_workers: int = 1,
           model_max_length: int = 77, ours_variants: Sequence[Sequence[str]] = ((),),
           example_args: Sequence[str] = (), example_envs: Sequence[Dict[str, str]] = (),
           work_dir: Optional[str] = None, timeout: float = 1800) -> dict:
    """Run the example and this repository's trainer interleaved for ``rounds`` rounds (see module doc).

    Args:
        example_dir: PaddleMIX's ``examples/stable_diffusion`` folder (copied, never written).
        kit: a local pretrained folder (vae/, text_encoder/, tokenizer/, unet/config.json) both sides load.
        file_list: a ``*.filelist.list`` of laion400m-format part files (rewritten with absolute paths).
        ours_variants: one entry per run of ours in each round, each a list of extra flags (``[]`` = the
            default command; e.g. ``[[], ["--frozen_inference", "True"]]``: A B C A B C ...).
        example_args: extra flags for the example only.
        example_envs: one more example run per entry in each round, with these environment variables.
    Returns:
        ``{"sides": [example, ours...], "runs": [...] in run order, "rounds": [{"samples_per_s": {side: x},
        "ratio": {side: x / example}}], "ratio": {side: median ratio}, "samples_per_s": {side: median},
        "load": (min, max) 1-minute load average seen, "failed": the error that ended the series early or None}``;
        throughput in samples/s. A run that fails after at least one complete round ends the series there.
    """
    import paddle

    if rounds < 1 or warmup_logs < 0 or steps < (warmup_logs + 1) * logging_steps or not ours_variants:
        raise ValueError(f"need rounds ≥ 1, a variant of ours and steps ≥ (warmup_logs + 1) × logging_steps, got "
                         f"rounds {rounds}, steps {steps}, logging_steps {logging_steps}, warmup_logs {warmup_logs}")
    source = check_example_folder(example_dir)
    work = work_dir or tempfile.mkdtemp(prefix="sd-versus-")
    example_copy = os.path.join(work, "paddlemix_example")
    if not os.path.isdir(example_copy):
        shutil.copytree(source, example_copy, ignore=shutil.ignore_patterns("__pycache__"))
    device = "gpu" if paddle.is_compiled_with_cuda() and "gpu" in paddle.device.get_device() else "cpu"
    file_list = absolute_file_list(file_list, os.path.join(work, "filelist"))
    command_args = dict(kit=os.path.abspath(kit), file_list=file_list, steps=steps,
                        batch_size=batch_size, resolution=resolution, num_workers=num_workers,
                        logging_steps=logging_steps, model_max_length=model_max_length, device=device)
    example = (os.path.join(example_copy, ENTRY), example_copy, list(example_args))
    sides = {"example": (*example, True, {})}  # name: (script, folder, flags, is the example, environment)
    for env in example_envs:
        sides[" ".join(["example", *(f"{k}={v}" for k, v in env.items())])] = (*example, True, dict(env))
    for variant in ours_variants:
        sides[side_name(variant)] = (os.path.join(ROOT, ENTRY), ROOT, list(variant), False, {})
    runs, per_round, failed = [], [], None
    for k in range(1, rounds + 1):
        speeds = {}
        for n, (side, (script, cwd, extra, is_example, extra_env)) in enumerate(sides.items()):
            try:
                run = run_side(side, script, cwd, command_args, extra, os.path.join(work, f"{n}"), k, warmup_logs,
                               timeout, is_example, extra_env)
            # a crashed run (e.g. a loader worker's segfault) ends the series, keeps the rounds done
            except RuntimeError as e:
                if not per_round:
                    raise
                failed = str(e)
                break
            runs.append(run)
            speeds[side] = run["samples_per_s"]
        if failed:
            break
        per_round.append({"samples_per_s": speeds, "ratio": {s: v / speeds["example"] for s, v in speeds.items()}})
    loads = [r[key] for r in runs for key in ("load_before", "load_after")]
    return {"sides": list(sides), "runs": runs, "rounds": per_round,
            "ratio": {s: statistics.median(r["ratio"][s] for r in per_round) for s in sides},
            "samples_per_s": {s: statistics.median(r["samples_per_s"][s] for r in per_round) for s in sides},
            "load": (min(loads), max(loads)), "failed": failed,
            "config": {**command_args, "rounds": rounds, "warmup_logs": warmup_logs,
                       "ours_variants": [list(v) for v in ours_variants], "example_args": list(example_args),
                       "example_envs": [dict(e) for e in example_envs]},
            "work_dir": work}


def describe_versus(result: dict) -> str:
    """Human summary: per round each side's samples/s and ratio to the example, then the medians and the load."""
    c = result["config"]
    lines = [f"side by side (run order per round: {' | '.join(result['sides'])}); batch {c['batch_size']}, "
             f"{c['resolution']} px, {c['num_workers']} loader worker(s), {c['steps']} steps per run; samples/s = "
             "median "
             f"of each run's interval_samples_per_second after {c['warmup_logs']} warm-up interval(s) of "
             f"{c['logging_steps']} steps"]
    for k, r in enumerate(result["rounds"], 1):
        parts = [f"{s} {r['samples_per_s'][s]:.2f}" + ("" if s == "example" else f" ({r['ratio'][s]:.2f}×)")
                 for s in result["sides"]]
        lines.append(f"round {k}: " + ", ".join(parts))
    for s in result["sides"][1:]:
        ratios = ", ".join(f"{r['ratio'][s]:.2f}" for r in result["rounds"])
        lines.append(f"{s} / example = {result['ratio'][s]:.2f}× (median of per-round ratios {ratios}); "
                     f"{result['samples_per_s'][s]:.2f} vs {result['samples_per_s']['example']:.2f} samples/s "
                     "(medians of rounds)")
    lo, hi = result["load"]
    lines.append(f"1-minute load average during the runs {lo:.1f}-{hi:.1f} on {os.cpu_count()} CPU(s)")
    if result.get("failed"):
        lines.append(f"stopped after {len(result['rounds'])} complete round(s): {result['failed'].splitlines()[0]}")
    return "\n".join(lines)
