"""The matrix kernels Paddle's CPU build runs, chosen before the first computation.

Paddle's x86 wheels do their matrix products (and, through im2col, their convolutions) in the Intel
MKL 2019 they ship (``paddle/libs/libmklml_intel.so``). That MKL picks its kernels by CPU vendor: on
an AMD processor it takes a generic path, not its AVX2 kernels, although the core has AVX2 and FMA.
``MKL_DEBUG_CPU_TYPE=5`` makes it take the AVX2 kernels (MKL reads it at its first call, and MKL
releases up to 2020.0 honour it; later ones ignore it). Measured on one AMD EPYC core: a 1024³ SGEMM
16-21 → 52-58 GFLOP/s, the tiny kit's UNet training step 1.6× faster, the CPU default's whole step
1.3× (docs/performance.md).

:func:`use_avx2_mkl_on_amd` sets it on AMD CPUs with AVX2 and FMA unless it is already set (a value
the user exported wins; ``MKL_DEBUG_CPU_TYPE=`` — empty — keeps MKL's own choice). Intel CPUs are
left alone: MKL already runs its best kernels there, AVX-512 included, which the variable would
rule out. ``import sd`` calls it, so every entry point of this repository does it before Paddle
computes anything; results stay deterministic run to run (other kernels round differently, so the
numbers differ from a run without it in the last bits, as between two machines).
"""

import os
from typing import Dict, List, MutableMapping, Optional

MKL_VARIABLE = "MKL_DEBUG_CPU_TYPE"

# What use_avx2_mkl_on_amd did in this process, for the training log; None = nothing.
CHOICE: Optional[str] = None


def cpuinfo_fields(cpuinfo: str) -> Dict[str, List[str]]:
    """Every value of each key of a /proc/cpuinfo text, one per processor, in order."""
    fields: Dict[str, List[str]] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


def cpu_description(cpuinfo: str) -> tuple:
    """``(vendor_id, set of flags)`` of the first processor in a /proc/cpuinfo text."""
    fields = cpuinfo_fields(cpuinfo)
    return fields.get("vendor_id", [""])[0], set(fields.get("flags", [""])[0].split())


def widest_vector_isa(flags) -> str:
    """``"avx512"``, ``"avx2"`` or ``"sse"``: the widest vector instruction set among a CPU's flags, which
    Paddle's and MKL's kernels are chosen by."""
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"


def use_avx2_mkl_on_amd(environ: MutableMapping[str, str] = os.environ,
                        cpuinfo_path: str = "/proc/cpuinfo") -> Optional[str]:
    """Set ``MKL_DEBUG_CPU_TYPE=5`` in ``environ`` on an AMD CPU with AVX2 + FMA when it is unset.

    Returns a one-line description of what was set, or None (not AMD, no AVX2, already set, no
    /proc/cpuinfo)."""
    if MKL_VARIABLE in environ:
        return None
    try:
        with open(cpuinfo_path) as f:
            vendor, flags = cpu_description(f.read())
    except OSError:
        return None
    if vendor != "AuthenticAMD" or not {"avx2", "fma"} <= flags:
        return None
    environ[MKL_VARIABLE] = "5"
    return (f"{MKL_VARIABLE}=5: Paddle's MKL runs its AVX2 kernels on this AMD CPU (it would take a generic "
            f"path, ~3× slower matrix products); export {MKL_VARIABLE}= (empty) to keep MKL's own choice")


def set_threads(n: int) -> str:
    """Let Paddle's CPU kernels (MKL's matrix products, oneDNN's convolutions) use ``n`` threads in this process;
    Paddle starts them with one. Returns the line to log. Results differ in the last bits between thread counts and
    repeat exactly at a given count. Through Paddle's own setter, not ``OMP_NUM_THREADS`` (at import Paddle warns
    about any value above 1)."""
    import paddle

    if paddle.version.with_mkl != "ON":
        return f"--cpu_threads {n}: this Paddle build does not use MKL; its CPU kernels keep their threads"
    paddle.base.core.set_num_threads(n)
    return f"--cpu_threads {n}: Paddle's CPU kernels use {n} threads in this process"
