"""Data-parallel training with 2 CPU processes under ``python -m paddle.distributed.launch`` (gloo).

One 20-step run with 2 ranks × batch 4 and one with 1 process × batch 8 are shared by the tests: they
are compared with each other (the same global batches: the same training up to float summation
order), across ranks, with 1 process × batch 4 × accumulation 2 (bit for bit), with resumes of each
one's checkpoint on the other layout, and with a run where rank 1 fails and the job is resumed.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from sd.runtime.run_state import Layout, RunState
from tests.helpers.common import ROOT, env_with_root, train_command, weight_difference

RUNNER = os.path.join(ROOT, "tests", "helpers", "fault_runner.py")
STEPS = ["--max_steps", "20", "--save_steps", "10", "--dataloader_num_workers", "1", "--report_to", "visualdl",
         "--image_logging_steps", "10", "--shuffle_buffer", "1", "--use_ema", "True"]
# Another layout of the same global batch trains on the same samples with the same draws; only the float
# summation order differs (VAE, text encoder and UNet on batches of 8 instead of 4, the gradient
# all-reduce). Measured after 20 steps on this kit (2 × 4 against 1 × 8, and both resumes across them):
# losses within 2.3e-7 relative; UNet and EMA weights within 4.8e-6 relative (L2 norm of the difference
# over all weights) and 6.7e-5 absolute at worst (a few near-zero biases, whose Adam steps of up to the
# learning rate, 1e-3, magnify the rounding). Data in another order is far outside: 0.036 absolute.
LOSS_RTOL, WEIGHT_ATOL, WEIGHT_RTOL = 1e-5, 5e-4, 1e-4


def same_to_float_order(a_dir, b_dir):
    largest, relative = weight_difference(a_dir, b_dir)
    return largest < WEIGHT_ATOL and relative < WEIGHT_RTOL


def launch(tiny_kit, file_list, out, log_dir, *extra, env=None, batch="4"):
    """The README's multi-process command on CPU: --nproc_per_node (the CPU build has no --gpus)."""
    args = train_command(tiny_kit, file_list, out, *STEPS, *extra)[2:]
    args[args.index("--per_device_train_batch_size") + 1] = batch
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           RUNNER, *args]
    start = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env_with_root(**(env or {})), timeout=600)
    return r, time.time() - start


def worker_log(log_dir, rank):
    with open(os.path.join(log_dir, f"workerlog.{rank}")) as f:
        return f.read()


def spied(spy_dir, rank):
    """Per batch a rank trained on, its samples as ``seed:image hash:token ids hash``
    (tests/helpers/fault_runner.py)."""
    with open(os.path.join(spy_dir, f"rank-{rank}.txt")) as f:
        return [line.split() for line in f]


def curve(log):
    return [float(x) for x in re.findall(r" - loss: ([0-9.]+),", log)]


def bit_equal(a_dir, b_dir):
    return weight_difference(a_dir, b_dir)[0] == 0.0


@pytest.fixture(scope="module")
def two_ranks(tiny_kit, demo_file_list, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    (root / "spy").mkdir()
    r, _ = launch(tiny_kit, demo_file_list, root / "out", root / "log", env={"SD_SPY_DIR": str(root / "spy")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


@pytest.fixture(scope="module")
def one_process_batch_8(tiny_kit, demo_file_list, tmp_path_factory):
    """The 2-rank run's global batch (8) on one process: (folder, log)."""
    root = tmp_path_factory.mktemp("one")
    (root / "spy").mkdir()
    cmd = [sys.executable, RUNNER] + train_command(tiny_kit, demo_file_list, root / "out", *STEPS)[2:]
    cmd[cmd.index("--per_device_train_batch_size") + 1] = "8"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=env_with_root(SD_SPY_DIR=str(root / "spy")))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, r.stdout + r.stderr


def test_ranks_stay_in_sync_and_split_data_and_noise(two_ranks):
    logs = [worker_log(two_ranks / "log", r) for r in (0, 1)]
    for log in logs:
        assert "global batch = 4 per device × 2 rank(s) × 1 accumulation = 8" in log
    sums = [re.search(rf"rank {r}: UNet parameter checksum (\S+)", logs[r]).group(1) for r in (0, 1)]
    assert sums[0] == sums[1]  # gradients were all-reduced: identical weights on both ranks
    batches = [spied(two_ranks / "spy", r) for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 20 and all(len(b) == 4 for b in batches[0] + batches[1])
    seeds = [{s.split(":")[0] for b in rank for s in b} for rank in batches]
    assert len(seeds[0]) == len(seeds[1]) == 80 and not seeds[0] & seeds[1]  # own noise and timesteps per sample
    # 3 part files for 8 slots: slot j reads file j mod 3 of each pass and keeps 1/3 or 1/2 of it (8 or 12
    # records). With file order (--shuffle_buffer 1) the first 8 steps lie in the first pass: disjoint samples.
    images = [{s.split(":")[1] for b in rank[:8] for s in b} for rank in batches]
    assert len(images[0]) == len(images[1]) == 32 and not images[0] & images[1]


def test_only_rank_zero_writes(two_ranks):
    out = two_ranks / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-10", "checkpoint-20"]
    events = [f for d, _, fs in os.walk(out / "runs") for f in fs if f.startswith("vdlrecords")]
    assert len(events) == 1  # one VisualDL event file for the run
    assert sorted(os.listdir(out / "images")) == ["step-0000010.png", "step-0000010.txt", "step-0000020.png",
                                                  "step-0000020.txt"]
    state = RunState.read(str(out / "checkpoint-20"))
    assert state.global_batch == 8 and sorted(state.slots, key=int) == [str(j) for j in range(8)]  # both ranks'
    assert state.layout == Layout(ranks=2, accumulation=1, per_device_batch=4)
    assert "rng_state_2.pth" in os.listdir(out / "checkpoint-20")


@pytest.mark.long
def test_one_process_with_accumulation_2_is_the_same_training(two_ranks, tiny_kit, demo_file_list, tmp_path):
    """Micro-batch k holds the slots of data rank r·A + k: 1 process × 2 accumulation steps of 4 reads and
    draws exactly what 2 ranks of 4 do, on batches of the same size, so the runs agree bit for bit here."""
    r = subprocess.run(train_command(tiny_kit, demo_file_list, tmp_path / "acc", *STEPS,
                                     "--gradient_accumulation_steps",
                                     "2"), capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "global batch = 4 per device × 1 rank(s) × 2 accumulation = 8" in log
    curves = [re.findall(r" - loss: ([0-9.]+),", text) for text in (worker_log(two_ranks / "log", 0), log)]
    assert len(curves[0]) == 20 and curves[0] == curves[1]
    assert bit_equal(tmp_path / "acc" / "checkpoint-20", two_ranks / "out" / "checkpoint-20")


def test_one_process_with_double_batch_is_the_same_training(two_ranks, one_process_batch_8):
    """1 process × 8 sees the 2 ranks' global batches: the same samples with the same noise, timestep and
    caption dropout each, in the same slots; losses and weights agree to float summation order."""
    root, log = one_process_batch_8
    one = spied(root / "spy", 0)
    ranks = [spied(two_ranks / "spy", r) for r in (0, 1)]
    assert len(one) == 20 and one == [a + b for a, b in zip(*ranks)]
    a, b = np.array(curve(worker_log(two_ranks / "log", 0))), np.array(curve(log))
    assert len(a) == len(b) == 20
    assert np.allclose(a, b, rtol=LOSS_RTOL, atol=0), (a, b)
    assert b[15:20].mean() < 0.85 * b[:5].mean()  # it learned
    assert same_to_float_order(root / "out" / "checkpoint-20", two_ranks / "out" / "checkpoint-20")


@pytest.mark.long
def test_failing_rank_ends_the_job_and_resume_continues_exactly(two_ranks, tiny_kit, demo_file_list, tmp_path):
    out = tmp_path / "out"
    r, seconds = launch(tiny_kit, demo_file_list, out, tmp_path / "log", env={"SD_FAULT_RANK_DIES": "1:12:raise"})
    report = r.stdout + r.stderr
    assert r.returncode != 0
    # The failing rank names itself and the cause in its log; the launcher reports whichever rank it saw
    # fail first: rank 1 itself, or rank 0 aborting in gloo because its peer rank 1 was gone (gloo says so as
    # "pair_rank = 1" or, when the peer's socket closed mid-read, "Connection reset by peer").
    assert "rank 1 failed: FileNotFoundError: [Errno 2] injected: part file missing on this node" in \
        worker_log(tmp_path / "log", 1)
    peer_gone = report + worker_log(tmp_path / "log", 0)
    assert ("Container rank 1 status failed" in report and "rank 1 failed: FileNotFoundError" in report) or \
        ("Container rank 0 status failed" in report and
         ("pair_rank = 1" in peer_gone or "Connection reset by peer" in peer_gone)), report[-3000:]
    assert seconds < 180, seconds  # no hang: the peer's collective fails at once, the launcher stops the job
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-10"]
    r, _ = launch(tiny_kit, demo_file_list, out, tmp_path / "log2")  # the same command again
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"found {out / 'checkpoint-10'}, the newest complete checkpoint" in worker_log(tmp_path / "log2", 0)
    name = "unet/diffusion_paddle_model.safetensors"
    a, b = load_file(out / "checkpoint-20" / name), load_file(two_ranks / "out" / "checkpoint-20" / name)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_finished_rank_runs_exit_handlers_then_leaves_with_0(tmp_path):
    """A finished rank skips the C++ teardown (where rank 0 sometimes aborted) but not Python's exit handlers,
    which hold Paddle's own clean-up (data-loader shared memory, process groups)."""
    marker = tmp_path / "handler-ran"
    code = ("import atexit, sys\n"
            "from sd.runtime.distributed import leave_finished_rank\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))\n"
            "leave_finished_rank()\n"
            "sys.exit(3)  # not reached\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env_with_root())
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker.read_text() == "ok"


def _descendants(pid):
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def test_ranks_end_with_their_launcher(tiny_kit, demo_file_list, tmp_path):
    """kill -9 of paddle.distributed.launch: both ranks and their loader workers end at once, and no
    checkpoint is written after it."""
    from sd.runtime import shm

    out = tmp_path / "out"
    args = train_command(tiny_kit, demo_file_list, out, "--max_steps", "400", "--save_steps", "2",
                         "--dataloader_num_workers", "1", "--report_to", "none", "--image_logging_steps", "0")[1:]
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
           str(tmp_path / "log"), *args]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes = []
    try:
        deadline = time.time() + 300
        while not (out / "checkpoint-2").exists():
            if launcher.poll() is not None or time.time() > deadline:
                logs = "".join(open(p).read()[-2000:] for p in sorted((tmp_path / "log").glob("workerlog.*")))
                raise AssertionError(f"the job ended (status {launcher.poll()}) before its first checkpoint:\n{logs}")
            time.sleep(0.05)
        processes = _descendants(launcher.pid)
        ranks = [p for p in processes if shm.pid_alive(p) and
                 int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]) == launcher.pid]
        assert len(ranks) == 2 and len(processes) >= 4, processes  # 2 ranks, each with its loader worker
        launcher.kill()
        launcher.wait(timeout=60)
        deadline = time.time() + 5
        while [p for p in processes if shm.pid_alive(p)] and time.time() < deadline:
            time.sleep(0.05)
        assert not [p for p in processes if shm.pid_alive(p)], "a rank or loader worker outlived its launcher"
        written = sorted(os.listdir(out))
        time.sleep(3)
        assert sorted(os.listdir(out)) == written  # nothing written after the launcher died
    finally:  # whatever outlived the test (the launcher, or orphans when the test failed)
        launcher.kill()
        for p in processes:
            if shm.pid_alive(p):
                os.kill(p, signal.SIGKILL)
    shm.remove_dead_segments(pids=processes)  # what the next run's start-up would remove


@pytest.mark.long  # 35 s of rank-0 work by design
def test_other_ranks_outwait_rank_zero_work_longer_than_a_gloo_collective(tmp_path):
    """Rank 0 works alone for 35 s (as when it draws sample grids on a loaded machine); a gloo collective
    gives up after 30 s, so the ranks must meet through after_rank_zero_work's store wait first.
    (Without that call the same job fails with ``TIMEOUT self_rank = -1``.)"""
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path),
           os.path.join(ROOT, "tests", "helpers", "rank_zero_toy.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400,
                       env=env_with_root(SD_TOY_SECONDS="35", SD_TOY_WAIT="1"))
    logs = [worker_log(tmp_path, rank) for rank in (0, 1)]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + logs[1][-2000:]
    assert "rank 0 done: 6" in logs[0] and "rank 1 done: 6" in logs[1]


@pytest.mark.parametrize("extra,expect", [
    ((), "--per_device_train_batch_size 4 → 8"),  # the same command on one process: the batch doubles
    (("--gradient_accumulation_steps", "2"), "global batch = 4 per device × 1 rank(s) × 2 accumulation = 8")])
def test_a_two_rank_checkpoint_resumes_on_one_process(two_ranks, tiny_kit, demo_file_list, tmp_path, extra, expect):
    """Losing one of two machines: the survivor resumes the 2-rank checkpoint alone, with the same command
    (its per-device batch becomes 8, keeping the global batch) or with accumulation 2 given (taken as it is,
    bit for bit); either way it ends with the 2-rank run's weights."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(two_ranks / "out" / "checkpoint-10", out / "checkpoint-10")
    r = subprocess.run(train_command(tiny_kit, demo_file_list, out, *STEPS, *extra), capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert expect in log
    full = curve(worker_log(two_ranks / "log", 0))
    if extra:  # batches of 4, as on the 2 ranks
        assert curve(log)[:10] == full[10:20] and bit_equal(out / "checkpoint-20", two_ranks / "out" / "checkpoint-20")
    else:
        assert np.allclose(curve(log)[:10], full[10:20], rtol=LOSS_RTOL, atol=0), (curve(log), full)
        assert same_to_float_order(out / "checkpoint-20", two_ranks / "out" / "checkpoint-20")


def test_a_one_process_checkpoint_resumes_on_two_ranks(one_process_batch_8, tiny_kit, demo_file_list, tmp_path):
    """The other way: 1 process × 8 → 2 ranks with the same command (per-device batch 8 → 4) and another number
    of loader workers; it ends with the 1-process run's weights."""
    import shutil

    root, log = one_process_batch_8
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(root / "out" / "checkpoint-10", out / "checkpoint-10")
    r, _ = launch(tiny_kit, demo_file_list, out, tmp_path / "log", "--dataloader_num_workers", "2", batch="8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = worker_log(tmp_path / "log", 0)
    assert "--per_device_train_batch_size 8 → 4" in resumed
    assert np.allclose(curve(resumed)[:10], curve(log)[10:20], rtol=LOSS_RTOL, atol=0), (curve(resumed), curve(log))
    assert same_to_float_order(out / "checkpoint-20", root / "out" / "checkpoint-20")
