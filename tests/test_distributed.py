"""Data-parallel training with 2 CPU processes under ``python -m paddle.distributed.launch`` (gloo).

One 20-step run with 2 ranks is shared by the tests: it is compared with itself across ranks, with
1-process runs (accumulation 2: identical; doubled batch: statistically the same), and with a run
where rank 1 fails and the job is resumed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, train_command
from safetensors.numpy import load_file

RUNNER = os.path.join(ROOT, "tests", "fault_runner.py")
STEPS = ["--max_steps", "20", "--save_steps", "10", "--dataloader_num_workers", "1", "--report_to", "visualdl",
         "--image_logging_steps", "10", "--shuffle_buffer", "1"]


def launch(tiny_kit, file_list, out, log_dir, env=None, batch="4"):
    """The README's multi-process command on CPU: --nproc_per_node (the CPU build has no --gpus)."""
    args = train_command(tiny_kit, file_list, out, *STEPS)[2:]
    args[args.index("--per_device_train_batch_size") + 1] = batch
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
           RUNNER, *args]
    start = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)
    return r, time.time() - start


def worker_log(log_dir, rank):
    with open(os.path.join(log_dir, f"workerlog.{rank}")) as f:
        return f.read()


def spied(spy_dir, rank):
    """[(seed, [image hashes])] of every batch a rank trained on."""
    with open(os.path.join(spy_dir, f"rank-{rank}.txt")) as f:
        return [(int(line.split()[0]), line.split()[1:]) for line in f]


@pytest.fixture(scope="module")
def two_ranks(tiny_kit, demo_file_list, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    (root / "spy").mkdir()
    r, _ = launch(tiny_kit, demo_file_list, root / "out", root / "log", env={"SD_SPY_DIR": str(root / "spy")})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def test_ranks_stay_in_sync_and_split_data_and_noise(two_ranks):
    logs = [worker_log(two_ranks / "log", r) for r in (0, 1)]
    for log in logs:
        assert "global batch = 4 per device × 2 rank(s) × 1 accumulation = 8" in log
    sums = [re.search(rf"rank {r}: UNet parameter checksum (\S+)", logs[r]).group(1) for r in (0, 1)]
    assert sums[0] == sums[1]  # gradients were all-reduced: identical weights on both ranks
    batches = [spied(two_ranks / "spy", r) for r in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 20
    seeds = [{s for s, _ in b} for b in batches]
    assert len(seeds[0]) == len(seeds[1]) == 20 and not seeds[0] & seeds[1]  # own noise and timesteps per rank
    # Each pass over the 72 records (3 part files) is split by file: 48 and 24 records. With file order
    # (--shuffle_buffer 1), the first 6 batches of each rank lie in its first pass: 24 records each, disjoint.
    images = [{h for _, hs in b[:6] for h in hs} for b in batches]
    assert len(images[0]) == len(images[1]) == 24 and not images[0] & images[1]


def test_only_rank_zero_writes(two_ranks):
    out = two_ranks / "out"
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-10", "checkpoint-20"]
    events = [f for d, _, fs in os.walk(out / "runs") for f in fs if f.startswith("vdlrecords")]
    assert len(events) == 1  # one VisualDL event file for the run
    assert sorted(os.listdir(out / "images")) == ["step-0000010.png", "step-0000010.txt", "step-0000020.png",
                                                  "step-0000020.txt"]
    state = json.load(open(out / "checkpoint-20" / "sd_state.json"))
    assert state["data_world_size"] == 2 and sorted(state["data_ranks"]) == ["0", "1"]  # both ranks' data positions
    assert "rng_state_2.pth" in os.listdir(out / "checkpoint-20")


def test_one_process_with_accumulation_2_is_the_same_training(two_ranks, tiny_kit, demo_file_list, tmp_path):
    """Micro-batch k of a step reads data rank r·A + k and draws that data rank's noise: 1 process × 2
    accumulation steps reads and draws exactly what 2 ranks do, so the runs agree bit for bit here."""
    r = subprocess.run(train_command(tiny_kit, demo_file_list, tmp_path / "acc", *STEPS, "--gradient_accumulation_steps",
                                     "2"), capture_output=True, text=True, cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "global batch = 4 per device × 1 rank(s) × 2 accumulation = 8" in log
    curves = [re.findall(r" - loss: ([0-9.]+),", text) for text in (worker_log(two_ranks / "log", 0), log)]
    assert len(curves[0]) == 20 and curves[0] == curves[1]
    name = "unet/diffusion_paddle_model.safetensors"
    a, b = load_file(tmp_path / "acc" / "checkpoint-20" / name), load_file(two_ranks / "out" / "checkpoint-20" / name)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_same_training_as_one_process_with_double_batch(two_ranks, tiny_kit, demo_file_list, tmp_path):
    cmd = train_command(tiny_kit, demo_file_list, tmp_path / "one", *STEPS)
    cmd[cmd.index("--per_device_train_batch_size") + 1] = "8"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    curves = [[float(x) for x in re.findall(r" - loss: ([0-9.]+),", log)]
              for log in (worker_log(two_ranks / "log", 0), r.stdout + r.stderr)]
    assert len(curves[0]) == len(curves[1]) == 20
    a, b = (np.array(c) for c in curves)
    # Not bit-equal: the ranks read other samples and draw other noise than one process does. Measured on
    # this kit: mean losses within 1 %, single steps within 0.1; a wrong LR or loss scaling is far outside.
    assert abs(a.mean() - b.mean()) < 0.03 * b.mean()
    assert np.abs(a - b).max() < 0.15
    assert a[-5:].mean() < 0.85 * a[:5].mean() and b[-5:].mean() < 0.85 * b[:5].mean()  # both learned


def test_failing_rank_ends_the_job_and_resume_continues_exactly(two_ranks, tiny_kit, demo_file_list, tmp_path):
    out = tmp_path / "out"
    r, seconds = launch(tiny_kit, demo_file_list, out, tmp_path / "log", env={"SD_FAULT_RANK_DIES": "1:12:raise"})
    report = r.stdout + r.stderr
    assert r.returncode != 0
    # The failing rank names itself and the cause in its log; the launcher reports whichever rank it saw
    # fail first: rank 1 itself, or rank 0 aborting because its peer rank 1 was gone.
    assert "rank 1 failed: FileNotFoundError: [Errno 2] injected: part file missing on this node" in \
        worker_log(tmp_path / "log", 1)
    assert ("Container rank 1 status failed" in report and "rank 1 failed: FileNotFoundError" in report) or \
        ("Container rank 0 status failed" in report and "pair_rank = 1" in report), report[-3000:]
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
            f"sys.path.insert(0, {ROOT!r})\n"
            "from sd.distributed import leave_finished_rank\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ok'))\n"
            "leave_finished_rank()\n"
            "sys.exit(3)  # not reached\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
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
    from sd import shm

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
           os.path.join(ROOT, "tests", "rank_zero_toy.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=400,
                       env={**os.environ, "SD_TOY_SECONDS": "35", "SD_TOY_WAIT": "1"})
    logs = [worker_log(tmp_path, rank) for rank in (0, 1)]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + logs[1][-2000:]
    assert "rank 0 done: 6" in logs[0] and "rank 1 done: 6" in logs[1]


def test_a_two_rank_checkpoint_resumes_on_one_process_exactly(two_ranks, tiny_kit, demo_file_list, tmp_path):
    """Losing one of two machines: the survivor resumes the 2-rank checkpoint alone. Its accumulation
    becomes 2 (the checkpoint's 2 data ranks), so it trains on the same global batches, noise and
    timesteps, and ends with the 2-rank run's weights bit for bit."""
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(two_ranks / "out" / "checkpoint-10", out / "checkpoint-10")
    r = subprocess.run(train_command(tiny_kit, demo_file_list, out, *STEPS), capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "--gradient_accumulation_steps 1 → 2, the checkpoint's 2 data ranks" in log
    assert "global batch = 4 per device × 1 rank(s) × 2 accumulation = 8" in log
    curves = [re.findall(r" - loss: ([0-9.]+),", text) for text in (worker_log(two_ranks / "log", 0), log)]
    assert curves[1] == curves[0][10:]
    name = "unet/diffusion_paddle_model.safetensors"
    a, b = load_file(out / "checkpoint-20" / name), load_file(two_ranks / "out" / "checkpoint-20" / name)
    assert all(np.array_equal(a[k], b[k]) for k in a)
