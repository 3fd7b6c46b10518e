"""Checks at start-up, before anything heavy: one line each, a warning or a stop with what to do.

* the model flags: a local path that exists;
* the file list: readable, every listed ``.filelist`` and part file present and readable;
* ``FLAGS_*`` (Paddle's) and ``FLAG_*`` (this trainer's switches) environment values that parse;
* /dev/shm: room for the batches the loader workers keep in flight;
* the port of this rank's endpoint, when under ``paddle.distributed.launch``;
* free space in the output dir for the next two checkpoints (once the model's size is known);
* memory: the step and a checkpoint save against the host's available memory (a CPU run: everything is on
  the host) and the card's (a GPU run), estimated by :mod:`sd.runtime.memory`.

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
        if (value and (os.path.isabs(value) or value.startswith((".", "~")))
                and not os.path.exists(os.path.expanduser(value))):
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


def check_env_flags(switches: Dict[str, str], environ=os.environ) -> List[Finding]:
    """``FLAGS_*`` values of the environment against the type of Paddle's flag (Paddle itself ignores a bool it
    cannot parse and reads ``12abc`` as 12); ``FLAG_*`` against this trainer's switches (0/1).

    Args:
        switches: {argument: its ``FLAG_*`` variable} (``sd.sd_args.ENV_SWITCHES``).
    """
    from paddle.base import core

    known = core.globals()
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
        return [("stop", f"{what}: enlarge it (docker: --shm-size), lower --per_device_train_batch_size, "
                         f"or load in the training process (--dataloader_num_workers 0)")]
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


def log_finding(level: str, message: str) -> None:
    """A finding through the one logger: a warning, or info."""
    from sd.data.remote import redact
    from sd.log import logger

    (logger.warning if level == "warn" else logger.info)(redact(message))


def report(findings: List[Finding], log: Callable[[str, str], None] = log_finding) -> None:
    """Log each finding (``log(level, message)``), then raise :class:`UserError` with the first stop."""
    for level, message in findings:
        if level != "stop":
            log(level, f"pre-flight: {message}")
    stops = [m for level, m in findings if level == "stop"]
    if stops:
        from sd.data.remote import redact

        raise UserError(redact(stops[0]))


def _mem_available() -> int:
    """The host's MemAvailable (/proc/meminfo) plus what this process already holds (VmRSS): the plan counts
    this process from its start."""
    values = {}
    for path in ("/proc/meminfo", "/proc/self/status"):
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemAvailable", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024  # "kB"
    return values["MemAvailable"] + values.get("VmRSS", 0)


def _largest_terms(plan, save: bool, where: str) -> str:
    terms = dict(plan.device_terms) if (where == "device" or plan.config.device == "cpu") else {}
    if where == "host":
        terms.update(plan.host_terms)
    if save:
        terms.pop("activations", None), terms.pop("encoders forward", None)
        terms.update(plan.device_save_terms if (where == "device" or plan.config.device == "cpu") else {})
        terms.update(plan.host_save_terms if where == "host" else {})
    top = sorted(terms.items(), key=lambda kv: -kv[1])[:4]
    return ", ".join(f"{k} {v / 2**30:.1f}" for k, v in top)


def check_memory(arch, config, host_available: int, device_total: Optional[int] = None,
                 environ=os.environ) -> List[Finding]:
    """The planned peaks of a step and of a checkpoint save against ``host_available`` bytes and, on a GPU
    run, the budget of a card of ``device_total`` bytes (:func:`sd.runtime.memory.card_budget`). A stop names
    the changes that would fit, each alone (or all of them together when none does alone)."""
    from dataclasses import replace

    from sd.runtime import memory

    if environ.get(memory.SKIP_ENV, "").strip().lower() in _TRUE:
        return [("warn", f"memory check skipped ({memory.SKIP_ENV} set)")]
    limits = [("host", host_available)]
    if config.device == "gpu" and device_total:
        limits.insert(0, ("device", memory.card_budget(device_total)))

    def peaks(cfg, where):
        plan = memory.estimate(arch, cfg)
        return plan, (plan.device_step, plan.device_save) if where == "device" else (plan.host_step, plan.host_save)

    found = []
    for where, budget in limits:
        plan, (step, save) = peaks(config, where)
        need, is_save = max(step, save), save > step
        label = "host memory" if where == "host" else "memory of the card"
        what = (f"needs ~{_gib(need)} of {label} for {'a checkpoint save' if is_save else 'a step'} at batch "
                f"{config.batch}, {config.resolution} px ({_largest_terms(plan, is_save, where)} GiB)")
        avail = f"{_gib(budget)} {'available' if where == 'host' else 'usable (card minus the CUDA reserve)'}"
        if need <= budget:
            level = "warn" if need > 0.9 * budget else "ok"
            found.append((level, f"{what}; {avail}" + (": little room left" if level == "warn" else "")))
            continue
        changes = []
        b = memory.largest_batch(arch, config, budget, where)
        if 0 < b < config.batch:
            changes.append((f"--per_device_train_batch_size {b}", replace(config, batch=b)))
        if not config.recompute:
            changes.append(("--recompute True", replace(config, recompute=True)))
        if config.ema:
            changes.append(("--use_ema False", replace(config, ema=False)))
        if config.num_workers and where == "host":
            changes.append(("--dataloader_num_workers 0", replace(config, num_workers=0)))
        if config.device == "gpu" and not config.precision.endswith("O2"):
            changes.append(("--bf16 True --fp16_opt_level O2", replace(config, precision="bf16-O2")))
        alone = [flag for flag, cfg in changes if max(peaks(cfg, where)[1]) <= budget]
        advice = (" or ".join(alone) if alone else " and ".join(f for f, _ in changes) + " (none alone is enough)"
                  if changes else "a machine with more memory")
        found.append(("stop", f"{what}; {avail}: use {advice} (estimate of sd/runtime/memory.py; if it is wrong, "
                              f"{memory.SKIP_ENV}=1 skips this check)"))
    return found


def check_memory_of_run(model_args, data_args, training_args, processes: int) -> List[Finding]:
    """:func:`check_memory` for the training command's arguments (configs read from the local component
    folders; a hub name leaves the memory unestimated)."""
    import paddle

    from sd.runtime import memory

    on_gpu = paddle.is_compiled_with_cuda() and "gpu" in paddle.device.get_device()
    config = memory.config_from_args(model_args, data_args, training_args, "gpu" if on_gpu else "cpu", processes)
    total = paddle.device.cuda.get_device_properties().total_memory if on_gpu else None
    try:
        return check_memory(memory.architecture_of(model_args), config, _mem_available(), total)
    except (FileNotFoundError, ValueError, KeyError) as e:  # a hub name, a config the memory model cannot read
        return [("ok", f"memory not estimated ({e})")]
