"""Shared memory of Paddle's DataLoader: what a killed run leaves in /dev/shm, and removing it.

A loader worker hands each batch to its trainer through a shared-memory file
``/dev/shm/paddle_<pid>_<counter>_<random>`` (``pid``: the process that created it, on this build the
worker). The trainer unlinks a file once it has read the batch; a process killed with SIGKILL never
does, and the files of its queued batches stay until the machine reboots (with a full /dev/shm the
next DataLoader fails with "bus error" / exit code -7). Only files whose creating process is gone are
ever removed here: a live process's are never touched.
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Iterable, List, Optional

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^paddle_(\d+)_")


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def segments(shm_dir: str = SHM_DIR) -> List[tuple]:
    """[(file name, creating pid)] of Paddle's DataLoader files in ``shm_dir``."""
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return []
    return [(n, int(m.group(1))) for n in names if (m := _NAME.match(n))]


def dead_segments(shm_dir: str = SHM_DIR) -> List[str]:
    """Names of the DataLoader files whose creating process is gone."""
    alive = {}
    return [n for n, pid in segments(shm_dir) if not alive.setdefault(pid, pid_alive(pid))]


def remove_dead_segments(shm_dir: str = SHM_DIR, pids: Optional[Iterable[int]] = None) -> int:
    """Remove the DataLoader files of dead processes (of ``pids`` only, if given); returns how many."""
    wanted = None if pids is None else set(pids)
    removed, alive = 0, {}
    for name, pid in segments(shm_dir):
        if (wanted is None or pid in wanted) and not alive.setdefault(pid, pid_alive(pid)):
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed += 1
            except FileNotFoundError:  # removed meanwhile by its reader
                pass
            except PermissionError:  # another user's: not ours to remove
                pass
    return removed


def children(pid: Optional[int] = None) -> List[int]:
    """Direct child processes of ``pid`` (default: this process), e.g. its loader workers."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def stop_children_and_clean(timeout: float = 3.0, shm_dir: str = SHM_DIR) -> int:
    """Kill this process's children (its loader workers), wait until they are gone, then remove the
    DataLoader files of every dead process. Returns how many files were removed.

    The children are killed but not reaped: Paddle's own shutdown of its workers still finds them.
    Paddle's SIGCHLD handler (which raises when a worker dies) is removed first: this process is ending.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    kids = children()
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return remove_dead_segments(shm_dir)
