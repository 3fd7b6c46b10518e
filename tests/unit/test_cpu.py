"""sd/cpu.py: MKL's AVX2 kernels on AMD CPUs, set at ``import sd`` unless the user chose."""

import os
import subprocess
import sys

from sd import cpu
from tests.helpers.common import ROOT

AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx fma avx2\n\nprocessor\t: 1\n"
INTEL = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx fma avx2 avx512f\n"
OLD_AMD = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx\n"


def choose(tmp_path, cpuinfo, environ):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    return cpu.use_avx2_mkl_on_amd(environ, str(path))


def test_amd_with_avx2_gets_the_avx2_kernels(tmp_path):
    environ = {}
    note = choose(tmp_path, AMD, environ)
    assert environ == {"MKL_DEBUG_CPU_TYPE": "5"}
    assert note.startswith("MKL_DEBUG_CPU_TYPE=5") and "AMD" in note


def test_intel_old_amd_and_a_users_value_are_left_alone(tmp_path):
    for cpuinfo in (INTEL, OLD_AMD):
        environ = {}
        assert choose(tmp_path, cpuinfo, environ) is None and environ == {}
    environ = {"MKL_DEBUG_CPU_TYPE": ""}  # empty: MKL's own choice, kept
    assert choose(tmp_path, AMD, environ) is None and environ == {"MKL_DEBUG_CPU_TYPE": ""}
    assert cpu.use_avx2_mkl_on_amd({}, str(tmp_path / "missing")) is None


def test_import_sd_sets_it_for_this_machine():
    """In a fresh interpreter, ``import sd`` leaves the variable as use_avx2_mkl_on_amd decides for this CPU."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
    code = "import os, sd; print(os.environ.get('MKL_DEBUG_CPU_TYPE'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    expected = {}
    cpu.use_avx2_mkl_on_amd(expected)
    assert out.stdout.strip() == str(expected.get("MKL_DEBUG_CPU_TYPE"))


def test_set_threads_sets_mkls_thread_count():
    """--cpu_threads reaches the kernels: MKL's own count (in a fresh process: the count is process-wide)."""
    probe = ("import ctypes, os, paddle\n"
             "from sd import cpu\n"
             "mkl = ctypes.CDLL(os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libmklml_intel.so'))\n"
             "before = mkl.MKL_Get_Max_Threads()\n"
             "line = cpu.set_threads(2)\n"
             "print(before, mkl.MKL_Get_Max_Threads(), line)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120, check=True).stdout.split(maxsplit=2)
    assert out[:2] == ["1", "2"], out
    assert "use 2 threads" in out[2]
