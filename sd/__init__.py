"""Stable Diffusion v1 pretraining on PaddlePaddle.

``USE_TORCH=0`` unless the caller set it: ppdiffusers 0.29 imports PyTorch at import time whenever
it is installed (for an optional ``.bin`` reader), and it may be (requirements-interop.txt). The
Paddle path never needs it: safetensors and ``.bin`` weights load without it.
"""

import os

os.environ.setdefault("USE_TORCH", "0")
