"""Stable Diffusion v1 pretraining on PaddlePaddle.

``USE_TORCH=0`` unless the caller set it: ppdiffusers 0.29 imports PyTorch at import time whenever
it is installed (for an optional ``.bin`` reader), and it may be (requirements-interop.txt). The
Paddle path never needs it: safetensors and ``.bin`` weights load without it.

On AMD CPUs, MKL's AVX2 kernels unless the user chose (``sd/cpu.py``): set here, before the first
computation of any entry point.
"""

import os

os.environ.setdefault("USE_TORCH", "0")

from sd import cpu  # noqa: E402  (after the environment it reads is complete)

cpu.CHOICE = cpu.use_avx2_mkl_on_amd()
