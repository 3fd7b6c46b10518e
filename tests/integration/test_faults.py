"""Faults during training: kill -9 and resume, a save failing midway, non-finite losses, bad output dirs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from sd.runtime import shm
from tests.helpers.common import ROOT, env_with_root, train_command

RUNNER = os.path.join(ROOT, "tests", "helpers", "fault_runner.py")
COMMON = ["--max_steps", "8", "--save_steps", "2", "--dataloader_num_workers", "1", "--use_ema", "True",
          "--ema_decay", "0.9", "--report_to", "none", "--image_logging_steps", "0"]


def run(tiny_kit, file_list, out, *extra, faults=None):
    cmd = train_command(tiny_kit, file_list, out, *COMMON, *extra)
    if faults:
        cmd = [sys.executable, RUNNER] + cmd[2:]  # same arguments, through the fault injector
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env_with_root(**(faults or {})),
                          timeout=600)


def ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def losses(log):
    """{step: loss} of the per-step log lines."""
    found = {}
    for line in log.splitlines():
        if " - loss: " in line and "global_step: " in line:
            step = int(line.split("global_step: ")[1].split(",")[0])
            found[step] = line.split("loss: ")[1].split(",")[0]
    return found


def weights(checkpoint, variant=""):
    name = f"diffusion_paddle_model{'.' + variant if variant else ''}.safetensors"
    return load_file(os.path.join(checkpoint, "unet", name))


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_kit, demo_file_list, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "full"
    return out, ok(run(tiny_kit, demo_file_list, out))


def watch(tiny_kit, file_list, out, faults=None):
    """Run training until it ends by itself; returns (exit status, log, pids of it and its loader workers)."""
    cmd = train_command(tiny_kit, file_list, out, *COMMON)
    if faults:
        cmd = [sys.executable, RUNNER] + cmd[2:]
    log = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env_with_root(**(faults or {})))
        pids, deadline = {proc.pid}, time.time() + 300
        while proc.poll() is None:
            assert time.time() < deadline, "training did not end"
            pids.update(_children(proc.pid) if _alive(proc.pid) else [])
            time.sleep(0.05)
    return proc.returncode, log.read_text(), pids


def test_repeated_kills_then_resumes_equal_uninterrupted(tiny_kit, demo_file_list, uninterrupted, tmp_path):
    """Killed mid-step, then while fast-forwarding the data on resume, then mid-save; each time the same
    command resumes. The end equals one uninterrupted run, EMA included, and no process or shared memory
    of the killed runs is left."""
    full, full_log = uninterrupted
    out, every_pid = tmp_path / "killed", set()
    for faults, processes in (({"SD_FAULT_RANK_DIES": "0:4:kill"}, 2),  # mid-step 5: the trainer, its loader worker
                              ({"SD_FAULT_KILL_FAST_FORWARD": "1"}, 1),  # resuming from checkpoint-4 (no worker yet)
                              ({"SD_FAULT_KILL_SAVE_STEP": "6"}, 2)):  # once unet/ of checkpoint-6 is written
        code, log, pids = watch(tiny_kit, demo_file_list, out, faults)
        assert code == -signal.SIGKILL, log[-3000:]
        assert len(pids) >= processes, pids  # (a short-lived helper process may show up too)
        every_pid |= pids
        deadline = time.time() + 20
        while [p for p in pids if _alive(p)] and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]  # no orphaned loader worker left behind
        assert sorted(p.name for p in out.glob("checkpoint-*"))[-1] == "checkpoint-4"
    assert (out / ".incomplete" / "checkpoint-6" / "unet").is_dir()  # the killed save, out of the way
    code, resumed, pids = watch(tiny_kit, demo_file_list, out)
    assert code == 0, resumed[-3000:]
    assert f"found {out / 'checkpoint-4'}, the newest complete checkpoint" in resumed
    expected = {s: loss for s, loss in losses(full_log).items() if s > 4}
    assert losses(resumed) == expected and len(expected) == 4
    for variant in ("", "ema"):
        assert same(weights(full / "checkpoint-8", variant), weights(out / "checkpoint-8", variant)), variant
    # The killed runs' DataLoader files were removed when the next run started; the last run removed its own.
    left = [name for name, pid in shm.segments() if pid in every_pid | pids]
    assert left == [], left


def test_save_failing_midway_keeps_previous_checkpoint(tiny_kit, demo_file_list, uninterrupted, tmp_path):
    full, _ = uninterrupted
    out = tmp_path / "disk_full"
    r = run(tiny_kit, demo_file_list, out, "--save_total_limit", "1", faults={"SD_FAULT_FAIL_SAVE_STEP": "4"})
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    assert f"could not write checkpoint-4 in {out}: No space left on device (the disk is full" in log
    assert f"the newest complete checkpoint is {out / 'checkpoint-2'}" in log
    assert "Traceback" not in log
    # The failed save is not visible, and rotation (limit 1) did not delete the newest complete one.
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2"]
    assert (out / ".incomplete" / "checkpoint-4" / "unet").is_dir()  # the half-written folder, out of the way
    resumed = ok(run(tiny_kit, demo_file_list, out, "--save_total_limit", "1"))
    assert f"found {out / 'checkpoint-2'}, the newest complete checkpoint" in resumed
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-8"]
    assert os.listdir(out / ".incomplete") == []  # the stale staging folder was replaced and published
    assert same(weights(full / "checkpoint-8"), weights(out / "checkpoint-8"))


def test_nonfinite_steps_are_skipped_then_training_stops(tiny_kit, demo_file_list, tmp_path):
    out = tmp_path / "nan"
    r = run(tiny_kit, demo_file_list, out, "--save_steps", "1", "--max_nonfinite_steps", "3",
            faults={"SD_FAULT_NAN_BATCHES": "2,4-"})
    log = r.stdout + r.stderr
    assert r.returncode == 1, log[-3000:]
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in this run; limit 3)" in log
    assert "step 7: non-finite loss or gradient, update skipped (3 in a row, 4 in this run; limit 3)" in log
    assert (f"training stopped at step 7: 3 consecutive steps had a non-finite loss or gradient (no weights were "
            f"updated with them); the last good checkpoint is {out / 'checkpoint-6'}") in log
    # A skipped step changes neither the weights nor the EMA; steps between are applied.
    for variant in ("", "ema"):
        w = {s: weights(out / f"checkpoint-{s}", variant) for s in range(1, 7)}
        assert same(w[2], w[3]) and same(w[4], w[5]) and same(w[5], w[6]), variant
        assert not same(w[1], w[2]) and not same(w[3], w[4]), variant
        assert all(np.isfinite(a).all() for a in w[6].values())
    assert not (out / "checkpoint-7").exists()
    logged = losses(log)
    assert all(np.isfinite(float(v)) for v in logged.values())  # the running loss is not poisoned
    assert "nonfinite_steps_skipped: 1" in log


def test_unwritable_output_dir_fails_at_start(tiny_kit, demo_file_list, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = run(tiny_kit, demo_file_list, blocker / "out")
    log = r.stdout + r.stderr
    assert r.returncode == 1
    assert f"cannot write to --output_dir {blocker / 'out'}: " in log and "choose another --output_dir" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("victim", ["trainer_sigterm", "worker_sigkill"])
def test_stopped_run_leaves_no_shared_memory(tiny_kit, demo_file_list, tmp_path, victim):
    """SIGTERM of the trainer, or kill -9 of its loader worker: the run ends, non-zero, and removes the
    DataLoader files of its processes from /dev/shm."""
    out = tmp_path / "out"
    cmd = train_command(tiny_kit, demo_file_list, out, *COMMON)
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not ("global_step: 2," in log.read_text() and _children(proc.pid)):
                assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            workers = _children(proc.pid)
            assert [name for name, pid in shm.segments() if pid in workers]  # batches in flight
            if victim == "trainer_sigterm":
                proc.send_signal(signal.SIGTERM)
            else:
                os.kill(workers[0], signal.SIGKILL)
            code = proc.wait(timeout=60)
        finally:
            proc.kill()
    text = log.read_text()
    if victim == "trainer_sigterm":
        assert code == 128 + signal.SIGTERM and "training stopped by SIGTERM" in text, text[-3000:]
    else:
        assert code == 1, text[-3000:]
    assert not [w for w in workers if _alive(w)]
    left = [name for name, pid in shm.segments() if pid in workers + [proc.pid]]
    assert left == [], left


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_bug_in_the_dataset_prints_its_traceback_once(tiny_kit, demo_file_list, tmp_path, workers):
    """A bug in the dataset code (an AttributeError) is not a user's mistake: its traceback, from where it was
    raised (a loader worker or not), is printed once, and the run fails."""
    r = run(tiny_kit, demo_file_list, tmp_path / "out", "--dataloader_num_workers", str(workers),
            faults={"SD_FAULT_DATASET_BUG": "1"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.count("Traceback (most recent call last)") == 1, r.stderr[-5000:]
    assert "AttributeError" in r.stderr and "pixel_cache" in r.stderr and "buggy_make_sample" in r.stderr, \
        r.stderr[-3000:]
    assert "Blocking queue" not in r.stderr and "\nerror: " not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("how", ["auto", "fused", "sums", "each"])
def test_all_finite(how):
    import paddle

    from sd.sd_trainer import all_finite

    good = [paddle.ones([3, 2]), paddle.full([4], 1e30), paddle.full([3], 3e38)]  # the last one's sum overflows
    assert all_finite(good, how) and all_finite([], how)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in (0, 3, 999):
            t = paddle.ones([1000])
            t[where] = bad
            assert not all_finite(good + [t], how)
    t = paddle.ones([1000])
    t[1], t[2] = float("inf"), -float("inf")
    assert not all_finite([t], how)
    assert good[1].numpy()[0] == np.float32(1e30)  # the check leaves the values as they are
