"""Checkpoint folders on disk: written under a staging name, made durable, then renamed.

A checkpoint is visible as ``<output_dir>/checkpoint-N`` only once every file in it is written and
fsynced: the Trainer writes into ``<output_dir>/.incomplete/checkpoint-N`` and ``publish`` renames
that folder into place (a rename within one file system is atomic). A kill at any moment leaves the
previous checkpoints untouched and at most a stale staging folder, which the next save clears and
resume never looks at.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from typing import Optional

STAGING_DIR = ".incomplete"  # under output_dir; not matched by the checkpoint-N pattern
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "sd_state.json"  # written last by the trainer's _save: a checkpoint without it is incomplete
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's own: global_step, max_steps, log_history


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, read-only, permissions); the message says what to do."""


def staging_root(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING_DIR)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """fsync every file and folder under ``folder`` (files first, then their folders)."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            _fsync_path(os.path.join(root, name))
        _fsync_path(root)


def publish(staged: str, final: str) -> None:
    """Make the complete folder ``staged`` visible as ``final`` (replacing an older ``final``)."""
    fsync_tree(staged)
    parent = os.path.dirname(final)
    if os.path.exists(final):  # the same step saved again (e.g. the closing save): swap, then drop the old
        old = staged + ".old"
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old)
    else:
        os.rename(staged, final)
    _fsync_path(parent)


def complete_checkpoints(output_dir: str) -> list:
    """``checkpoint-N`` folders of ``output_dir`` holding the trainer's state file, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def newest_complete_checkpoint(output_dir: str) -> Optional[str]:
    """The complete ``checkpoint-N`` of ``output_dir`` with the highest N (what resume starts from), or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def newest_model_folder(output_dir: str) -> Optional[str]:
    """The newest complete trained model under ``output_dir``: its newest complete checkpoint, or the
    final save in ``output_dir`` itself (complete by the same rule) when that is of a later step; None
    when there is neither. ``output_dir`` may itself be a checkpoint."""
    import json

    found = []
    newest = newest_complete_checkpoint(output_dir)
    if newest is not None:
        found.append((int(_CHECKPOINT.match(os.path.basename(newest)).group(1)), 1, newest))
    final = os.path.join(output_dir, TRAINER_STATE_FILE)
    if os.path.isfile(os.path.join(output_dir, STATE_FILE)):
        step = 0
        if os.path.isfile(final):
            with open(final, encoding="utf-8") as f:
                step = json.load(f).get("global_step", 0)
        found.append((step, 0, output_dir))
    return max(found)[2] if found else None


def describe_os_error(exc: OSError) -> str:
    hint = {errno.ENOSPC: "the disk is full: free space",
            errno.EDQUOT: "the disk quota is exhausted: free space",
            errno.EROFS: "the file system is read-only: choose another --output_dir",
            errno.EACCES: "permission denied: fix the permissions or choose another --output_dir",
            errno.EPERM: "permission denied: fix the permissions or choose another --output_dir",
            errno.ENOTDIR: "a path component is a file, not a folder: choose another --output_dir"}
    return f"{exc.strerror or exc} ({hint.get(exc.errno, 'check the disk and the path')})"


def check_output_dir(output_dir: str) -> None:
    """Fail at start-up, with a one-line reason, when ``output_dir`` cannot be created or written."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CheckpointWriteError(f"cannot write to --output_dir {output_dir}: {describe_os_error(e)}") from None


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
