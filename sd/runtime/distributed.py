"""How a training process starts and ends, alone or as a rank of ``paddle.distributed.launch``.

:func:`run` wraps the entry point's ``main()``:

* a rank ends with its launcher: ``kill -9`` of the launcher ends its ranks at once (and so their
  loader workers, which end with their rank) instead of leaving them to train on, and write
  checkpoints, as orphans;
* SIGTERM and SIGINT end the process through its exit handlers, and the shared memory of its loader
  workers is removed (sd/runtime/shm.py);
* a user mistake (a ``ValueError`` or ``FileNotFoundError`` raised by this repository's own checks,
  a failed checkpoint write, a diverged run) is one line and exit status 1; anything else is a bug and
  prints its traceback once; both alike when raised in a loader worker (sd/train_loader.py carries it here);
* work that only rank 0 does (sample grids, writing a checkpoint) ends with :func:`after_rank_zero_work`,
  so that the other ranks do not wait for it inside a collective (gloo gives one 30 s);
* a failing rank leaves at once with ``rank r failed: ...`` (which train.sh lists after a failed
  launch); a finished rank leaves without Paddle's C++ teardown (see :func:`leave_finished_rank`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import traceback
from typing import Callable

from sd.runtime import shm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


class UserError(Exception):
    """A mistake of the command line or the environment, reported as one line (its message says what to do)."""


def under_launcher(environ=os.environ) -> bool:
    """True in a rank started by ``paddle.distributed.launch`` for a job of several ranks."""
    return int(environ.get("PADDLE_TRAINERS_NUM", "1")) > 1


def rank_name(environ=os.environ) -> str:
    return f"rank {environ.get('PADDLE_TRAINER_ID', '0')}"


def die_with_parent(worker_id: int = 0) -> None:
    """The calling process ends when its parent does, even when the parent is killed with SIGKILL (Linux).

    A loader worker's ``worker_init_fn`` (sd/train_loader.py); a training rank calls it too (its parent is the
    launcher).
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def die_with_launcher() -> None:
    """This rank gets SIGKILL when its parent, the launcher, exits; it exits now if the parent is already gone."""
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the launcher died before the line above: nobody is left to stop this rank
        print(f"{rank_name()}: the launcher (pid {parent}) is gone; stopping", file=sys.stderr, flush=True)
        os._exit(1)


def is_user_mistake(exc: BaseException) -> bool:
    """A ``UserError``, or a ``ValueError``/``FileNotFoundError``/``NotADirectoryError`` raised in this repository's
    own code (``sd/`` and the top-level scripts: their checks of flags, files and folders). The same types
    raised inside a library (or a test's injected fault) are bugs."""
    if isinstance(exc, UserError):
        return True
    if not isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError)):
        return False
    filename = getattr(exc, "raised_in", None)  # raised in a loader worker (sd/train_loader.py), raised again here
    if filename is None:
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is None:
            return False
        filename = tb.tb_frame.f_code.co_filename
    filename = os.path.abspath(filename)
    folder = os.path.dirname(filename)
    return folder == ROOT or folder == os.path.join(ROOT, "sd") or folder.startswith(os.path.join(ROOT, "sd") + os.sep)


def after_rank_zero_work(tag: str) -> None:
    """Every rank returns once rank 0 has finished the work tagged ``tag`` (unique per occasion, e.g.
    ``checkpoint-500``) that only rank 0 does.

    Without it the other ranks wait for rank 0 in their next collective, and on the CPU (gloo) a
    collective gives up after 30 s: a 2-process CPU run failed with ``TIMEOUT self_rank = -1`` while
    rank 0 drew its step-500 sample grids on a loaded machine. The wait here goes through the job's
    TCP store instead, whose timeout is Paddle's store timeout (900 s by default), not gloo's.
    """
    import paddle

    if paddle.distributed.get_world_size() < 2:
        return
    from paddle.base import core

    store, key = core.create_or_get_global_tcp_store(), f"sd/rank0-done/{tag}"
    if paddle.distributed.get_rank() == 0:
        store.set(key, b"1")
    else:
        store.wait(key)


def leave_finished_rank() -> None:
    """A rank whose work is done and saved leaves without Paddle's C++ teardown.

    With 2 CPU ranks (gloo), about one run in fifteen ended with rank 0 aborting (SIGABRT, no message)
    after every Python exit handler had run, so the launcher reported a failed job although the model
    was saved. The exit handlers (Paddle's own: data-loader shared memory, process groups) still run
    here; only the interpreter's final teardown is skipped.
    """
    atexit._run_exitfuncs()  # noqa: SLF001 - what interpreter exit runs first (logging.shutdown among them)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fail(message: str, status: int = 1) -> None:
    """End the process with ``status``. A rank leaves at once (``rank r failed: message``): its peers'
    next collective then fails within seconds and the launcher stops the job; the line stays in this
    rank's log, which train.sh lists (the launcher reports whichever rank it saw fail first, often a
    peer that aborted because of this one)."""
    if under_launcher():
        print(f"{rank_name()} failed: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


def _on_signal(signum, frame):
    """SIGTERM/SIGINT: stop the loader workers, remove their shared memory, leave through the exit handlers."""
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process the default way
    shm.stop_children_and_clean()
    print(f"{rank_name() if under_launcher() else 'training'} stopped by {signal.Signals(signum).name}",
          file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def run(main: Callable[[], None], user_errors=()) -> None:
    """Run ``main()`` as a training process: see this module's docstring. ``user_errors``: further exception
    types reported as one line (their messages say what to do)."""
    if under_launcher():
        die_with_launcher()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    shm.remove_dead_segments()  # left by earlier runs that were killed
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure ends here: reported once, then a non-zero exit
        mistake = isinstance(e, tuple(user_errors)) or is_user_mistake(e)
        if not mistake:  # a loader worker's bug: the traceback where it happened (sd/train_loader.py)
            worker_traceback = getattr(e, "worker_traceback", None)
            if worker_traceback:
                print(worker_traceback, end="", file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
        elif not under_launcher():  # a rank's one line is the "rank r failed" below
            from tqdm import tqdm

            if tqdm._instances:  # the trainer's progress bar is open: the line it is on ends first
                print(file=sys.stderr)
            print(f"error: {e}", file=sys.stderr, flush=True)
        shm.stop_children_and_clean()
        fail(str(e) if mistake else f"{type(e).__name__}: {e}")
    if under_launcher():
        leave_finished_rank()
