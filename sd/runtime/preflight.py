"""Checks at start-up, before anything heavy: one line each, a warning or a stop with what to do.

* the model flags: a local path that exists;
* the file list: readable, every listed ``.filelist`` and part file present and readable;
* ``FLAGS_*`` (Paddle's) and ``FLAG_*`` (this trainer's switches) environment values that parse;
* /dev/shm: room for the batches the loader workers keep in flight;
* the port of this rank's endpoint, when under ``paddle.distributed.launch``;
* free space in the output dir for the next two checkpoints (once the model's size is known).

Every check returns ``(level, message)`` pairs, level ``"ok"``, ``"warn"`` or ``"stop"``; :func:`report`
logs them and raises :class:`~sd.runtime.distributed.UserError` with the first stop.
"""

from __future__ import annotations

import os
import socket
from typing import Callable, Dict, List, Optional, Tuple

from sd.runtime.distributed import UserError

Finding = Tuple[str, str]
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
PREFETCH = 2  # batches per loader worker in flight (paddle.io.DataLoader's prefetch_factor default)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_file_list(file_list: str, flag: str = "--file_list") -> List[Finding]:
    """The ``*.filelist.list``, each ``.filelist`` it names and each part file those name.

    Remote part files (URLs) are not looked up here: one that cannot be reached is skipped and counted when read.
    """
    from sd.data import remote
    from sd.data.formats import read_filelist, read_filelist_list

    if not remote.is_remote(file_list) and not os.path.isfile(file_list):
        return [("stop", f"{flag} {file_list}: no such file; give the *.filelist.list that create_pretraining_data.py "
                         f"wrote (its --output_path/filelist/)")]
    try:
        lists = read_filelist_list(file_list)
        parts = [p for entry in lists for p in read_filelist(entry.path)]
    except UnicodeDecodeError:
        return [("stop", f"{flag} {file_list}: not a text file list; give the *.filelist.list that "
                         f"create_pretraining_data.py wrote")]
    except (ValueError, FileNotFoundError, OSError) as e:
        return [("stop", f"{flag}: {e}")]
    unreadable = [p.path for p in parts if not remote.is_remote(p.path) and not os.access(p.path, os.R_OK)]
    if unreadable:
        return [("stop", f"{flag}: {len(unreadable)} part file(s) not readable, first {unreadable[0]}: fix their "
                         f"permissions")]
    far = sum(remote.is_remote(p.path) for p in parts)
    return [("ok", f"{flag} {file_list}: {len(lists)} file list(s), {len(parts)} part file(s)"
                   + (f", {far} of them remote" if far else ""))]


MODEL_FLAGS = ("pretrained_model_name_or_path", "vae_name_or_path", "text_encoder_name_or_path", "unet_name_or_path",
               "tokenizer_name")


def check_model_paths(model_args) -> List[Finding]:
    """Each model flag that names a local path (absolute, or starting with ``.`` or ``~``) names one that exists;
    other values may be hub names, which the model loader resolves (or explains)."""
    found = []
    for flag in MODEL_FLAGS:
        value = getattr(model_args, flag, None)
        if value and (os.path.isabs(value) or value.startswith((".", "~"))) and not os.path.exists(os.path.expanduser(value)):
            found.append(("stop", f"--{flag} {value}: no such file or folder; pass a model folder "
                                  f"(`python -m sd.kit --output_dir ./tiny-sd` builds the offline kit)"))
    return found


def _parses(raw: str, like) -> bool:
    text = raw.strip()
    if isinstance(like, bool):
        return text.lower() in _TRUE | _FALSE
    try:
        (int if isinstance(like, int) else float if isinstance(like, float) else str)(text)
        return True
    except ValueError:
        return False


def check_env_flags(environ=os.environ, switches: Optional[Dict[str, str]] = None) -> List[Finding]:
    """``FLAGS_*`` values of the environment against the type of Paddle's flag (Paddle itself ignores a bool it
    cannot parse and reads ``12abc`` as 12); ``FLAG_*`` against this trainer's switches (0/1)."""
    from paddle.base import core

    from sd.sd_args import ENV_SWITCHES

    known = core.globals()
    switches = ENV_SWITCHES if switches is None else switches
    found = []
    for name in sorted(environ):
        raw = environ[name]
        if name.startswith("FLAGS_"):
            if name not in known:
                found.append(("warn", f"{name}={raw}: not a flag of this Paddle build's core (fine for a GPU-only or "
                                      f"Python-side flag; otherwise check the spelling)"))
            elif not _parses(raw, known[name]):
                kind = type(known[name]).__name__
                found.append(("stop", f"{name}={raw!r} is not a {kind} (Paddle's {name} is a {kind}): fix or unset it"))
        elif name.startswith("FLAG_"):
            if name not in switches.values():
                found.append(("warn", f"{name}={raw}: not a switch of this trainer (known: "
                                      f"{', '.join(sorted(switches.values()))}); ignored"))
            elif raw.strip().lower() not in _TRUE | _FALSE:
                found.append(("stop", f"{name}={raw!r} is not a boolean: use 0 or 1"))
    return found


def shm_bytes_needed(batch_size: int, resolution: int, num_workers: int, loaders: int, processes: int,
                     prefetch: int = PREFETCH) -> int:
    """Shared memory of the batches in flight, for every loader of every process on this machine: each of a
    micro-batch's W' = min(W, batch) workers keeps ``prefetch`` parts of batch / W' samples of
    ``3 × resolution² × 4`` bytes (float32 pixels, collated in the worker; sd/train_loader.py), so a loader
    holds ``prefetch × batch`` samples whatever W; none without workers (the batches stay in the process)."""
    if num_workers == 0:
        return 0
    return batch_size * 3 * resolution * resolution * 4 * prefetch * loaders * processes


def check_shm(needed: int, shm_dir: str = "/dev/shm") -> List[Finding]:
    if needed == 0:
        return []
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return [("warn", f"{shm_dir} not found: the loader workers need about {_gib(needed)} of shared memory")]
    free = st.f_bavail * st.f_frsize
    what = (f"the loader workers keep about {_gib(needed)} of batches in flight, {shm_dir} has {_gib(free)} free")
    if needed > free:
        return [("stop", f"{what}: enlarge it (docker: --shm-size), lower "
                         f"--per_device_train_batch_size, or load in the training process (--dataloader_num_workers 0)")]
    if needed > free / 2:
        return [("warn", f"{what}: little room left for anything else")]
    return [("ok", what)]


def check_port(environ=os.environ) -> List[Finding]:
    """Under the launcher: the port of this rank's endpoint (``PADDLE_CURRENT_ENDPOINT``) is free to bind."""
    endpoint = environ.get("PADDLE_CURRENT_ENDPOINT")
    if not endpoint or int(environ.get("PADDLE_TRAINERS_NUM", "1")) <= 1:
        return []
    host, port = endpoint.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", int(port)))
        except OSError as e:
            return [("stop", f"port {port} of this rank's endpoint {endpoint} is taken ({e.strerror}): stop what "
                             f"holds it (a job left running?) or give the launcher another --start_port")]
    return [("ok", f"port {port} of this rank's endpoint is free")]


def check_disk(output_dir: str, checkpoint_bytes: int, free_bytes: Callable[[str], int]) -> List[Finding]:
    """Room in the output dir for the next two checkpoints."""
    free = free_bytes(output_dir)
    if free < 2 * checkpoint_bytes:
        level = "stop" if free < checkpoint_bytes else "warn"
        return [(level, f"{_gib(free)} free in --output_dir {output_dir}, one checkpoint takes about "
                        f"{_gib(checkpoint_bytes)}: free some space or choose another --output_dir")]
    return [("ok", f"{_gib(free)} free in --output_dir {output_dir} (a checkpoint: about {_gib(checkpoint_bytes)})")]


def report(findings: List[Finding], log) -> None:
    """Log each finding (``log(level, message)``), then raise :class:`UserError` with the first stop."""
    for level, message in findings:
        if level != "stop":
            log(level, f"pre-flight: {message}")
    stops = [m for level, m in findings if level == "stop"]
    if stops:
        raise UserError(stops[0])
