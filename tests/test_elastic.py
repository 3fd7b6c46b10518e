"""A lost node under ``paddle.distributed.launch``'s elastic mode, with a real etcd server on loopback.

Two "nodes" (two launchers on this machine, one rank each) run tests/elastic_toy.py with
``--master etcd://127.0.0.1:PORT --nnodes 1:2 --elastic_level 1``; one node is killed outright
(launcher and rank, SIGKILL, like a machine that disappears) mid-run; the survivor's launcher must
restart the job with one node, from the step counter the job saved last, and finish.

Skipped when the etcd server (Debian's etcd-server) or the etcd3 client (requirements-elastic.txt) is
missing.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT

TOY = os.path.join(ROOT, "tests", "elastic_toy.py")
STEPS = 60  # toy steps of the whole job
STEP_SECONDS = 0.2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """Pids whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # the process ended while we looked
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return kids


def kill_node(launcher):
    """SIGKILL a launcher and its ranks' process groups (each rank runs in a session of its own)."""
    ranks = children(launcher.pid)
    launcher.kill()
    for pid in ranks:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.wait(timeout=10)


@pytest.fixture
def etcd(tmp_path):
    """An etcd server on a free loopback port, with its data in tmp_path: yields its client port."""
    if shutil.which("etcd") is None:
        pytest.skip("no etcd server (apt-get install etcd-server)")
    pytest.importorskip("etcd3", reason="no etcd3 client (pip install -r requirements-elastic.txt)")
    client, peer = free_port(), free_port()
    cmd = ["etcd", "--name", "test", "--data-dir", str(tmp_path / "etcd"),
           "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
           "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
           "--initial-cluster", f"test=http://127.0.0.1:{peer}"]
    with open(tmp_path / "etcd.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 20
        while b"ready to serve client requests" not in (tmp_path / "etcd.log").read_bytes():
            assert server.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
            assert time.time() < deadline, "etcd did not start in 20 s"
            time.sleep(0.2)
        yield client
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


def start_node(port, name, tmp_path, job_id):
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--master", f"etcd://127.0.0.1:{port}",
           "--nnodes", "1:2", "--nproc_per_node", "1", "--job_id", job_id, "--elastic_level", "1",
           "--max_restart", "3", "--elastic_timeout", "5", "--log_dir", str(tmp_path / f"log_{name}"),
           TOY, "--state_dir", str(tmp_path / "state"), "--steps", str(STEPS), "--step_seconds", str(STEP_SECONDS)]
    with open(tmp_path / f"launch_{name}.out", "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(tmp_path))


def read(path):
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("victim_rank", [0, 1])
def test_survivor_restarts_alone_and_finishes(etcd, tmp_path, victim_rank):
    (tmp_path / "state").mkdir()
    nodes = {name: start_node(etcd, name, tmp_path, f"toy{victim_rank}") for name in "ab"}
    try:
        # Both ranks running and a few steps done with two nodes.
        deadline = time.time() + 60
        while not read(tmp_path / "state" / "counter") or int(read(tmp_path / "state" / "counter")) < 5:
            assert all(p.poll() is None for p in nodes.values()), "a launcher ended before the kill"
            assert time.time() < deadline, "the 2-node job did not reach step 5 in 60 s"
            time.sleep(0.2)
        victim = next(n for n in "ab" if f"rank {victim_rank}/2 starts" in read(tmp_path / f"log_{n}" / "workerlog.0"))
        survivor = "b" if victim == "a" else "a"
        kill_node(nodes[victim])
        killed_at = int(read(tmp_path / "state" / "counter"))

        rc = nodes[survivor].wait(timeout=120)
        out = read(tmp_path / f"launch_{survivor}.out")
        assert rc == 0, out[-3000:]
        steps = [tuple(map(int, line.split())) for line in read(tmp_path / "state" / "steps.log").splitlines()]
        # Two nodes up to the kill, then the survivor alone from the saved counter to the end.
        assert {s for s, _ in steps} == set(range(STEPS))
        restart = next(i for i, (_, world) in enumerate(steps) if world == 1)
        assert all(world == 2 for _, world in steps[:restart]) and all(world == 1 for _, world in steps[restart:])
        resumed_at = steps[restart][0]
        assert killed_at <= resumed_at <= killed_at + 1  # the surviving rank 0 may log one step after the kill
        assert steps[restart - 1][0] + 1 - resumed_at in (0, 1)  # 1: killed between the log line and the save
        assert f"rank 0/1 starts at step {resumed_at}" in out
    finally:
        for p in nodes.values():
            if p.poll() is None:
                kill_node(p)
