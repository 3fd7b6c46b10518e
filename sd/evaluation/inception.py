"""The FID Inception network in Paddle: pytorch-fid's ``InceptionV3`` up to pool-3 (2048-d features).

This is the Inception v3 graph of TensorFlow's original FID code (``inception-2015-12-05``) as
pytorch-fid defines it on top of torchvision's ``Inception3``, with its three departures from
torchvision: the average pools inside the A, C and first E blocks ignore the zero padding
(TensorFlow's ``count_include_pad=False``, Paddle's ``exclusive=True``), and the last E block
pools with a max instead of an average. Input: RGB in [0, 1] of any size, resized to 299 × 299
(bilinear, half-pixel centres, no antialiasing) and mapped to [-1, 1], as pytorch-fid does.

Parameter names are torchvision's (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.weight``,
...; Paddle's batch-norm statistics ``_mean``/``_variance`` stand for ``running_mean``/``running_var``),
so the weights load from any of:

* pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with PyTorch, ``weights_only=True``;
  PyTorch is imported only for this format);
* a ``.safetensors`` file with the same key names, made once from the ``.pth`` by
  ``python -m sd.evaluation.inception convert pt_inception-2015-12-05-6726825d.pth NAME.safetensors`` (NAME:
  ``pt_inception-2015-12-05-6726825d``)
  (needs PyTorch that once; afterwards nothing does);
* PaddleMIX's ``pp_inception-2015-12-05-6726825d.pdparams`` (paddle.vision naming, renamed on load).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from typing import Dict, Optional

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.safetensors",
                "pp_inception-2015-12-05-6726825d.pdparams")
# where pytorch-fid (torch hub) and PaddleMIX (paddle.utils.download) keep these files once downloaded
WEIGHT_CACHES = ("~/.cache/torch/hub/checkpoints", "~/.cache/paddle/hapi/weights")
FEATURE_DIM = 2048


class BasicConv2d(nn.Layer):
    """Convolution without bias, batch norm (eps 1e-3, TensorFlow's), ReLU."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2D(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias_attr=False)
        self.bn = nn.BatchNorm2D(out_channels, epsilon=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x):
    # TensorFlow's average pool divides by the number of real (unpadded) inputs
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, exclusive=True)


class InceptionA(nn.Layer):
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return paddle.concat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_no_pad(x))], axis=1)


class InceptionB(nn.Layer):
    """Grid reduction 35 → 17."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return paddle.concat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], axis=1)


class InceptionC(nn.Layer):
    """Factorised 7 × 7 convolutions (1 × 7 then 7 × 1)."""

    def __init__(self, in_channels, channels_7x7):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7_2 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c, 1)
        self.branch7x7dbl_2 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c, c, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c, c, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return paddle.concat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_no_pad(x))], axis=1)


class InceptionD(nn.Layer):
    """Grid reduction 17 → 8."""

    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return paddle.concat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], axis=1)


class InceptionE(nn.Layer):
    """Expanded filter bank; ``pool`` is "avg" (unpadded average) or "max" (the FID graph's last block)."""

    def __init__(self, in_channels, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = paddle.concat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = paddle.concat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], axis=1)
        pooled = _avg_pool_no_pad(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return paddle.concat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], axis=1)


class FIDInceptionV3(nn.Layer):
    """Images (B, 3, H, W) in [0, 1] → pool-3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, images):
        x = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (B, 2048, 8, 8)
        return x.mean(axis=[2, 3])  # (B, 2048): global average pool


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
_PADDLEMIX_STEM = {"conv_1a_3x3": "Conv2d_1a_3x3", "conv_2a_3x3": "Conv2d_2a_3x3", "conv_2b_3x3": "Conv2d_2b_3x3",
                   "conv_3b_1x1": "Conv2d_3b_1x1", "conv_4a_3x3": "Conv2d_4a_3x3"}
_MIXED = ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
          "Mixed_7a", "Mixed_7b", "Mixed_7c")
_BN_NAMES = {"running_mean": "_mean", "running_var": "_variance"}


def _from_paddlemix_name(key: str) -> Optional[str]:
    """paddle.vision naming (PaddleMIX's port) → ours, e.g. ``inception_block_list.0.branch_pool_conv.1._mean``
    → ``Mixed_5b.branch_pool.bn._mean``; None for the classifier."""
    m = re.fullmatch(r"inception_stem\.(\w+)\.([01])\.(\w+)", key)
    if m and m.group(1) in _PADDLEMIX_STEM:
        return f"{_PADDLEMIX_STEM[m.group(1)]}.{'conv' if m.group(2) == '0' else 'bn'}.{m.group(3)}"
    m = re.fullmatch(r"inception_block_list\.(\d+)\.(\w+)\.([01])\.(\w+)", key)
    if m and int(m.group(1)) < len(_MIXED):
        branch = "branch_pool" if m.group(2) == "branch_pool_conv" else m.group(2)
        return f"{_MIXED[int(m.group(1))]}.{branch}.{'conv' if m.group(3) == '0' else 'bn'}.{m.group(4)}"
    return None


def read_weight_file(path: str) -> Dict[str, np.ndarray]:
    """The tensors of a ``.pth``, ``.safetensors`` or ``.pdparams`` file, as numpy, under their own names;
    ValueError (naming the file) for a file its loader cannot read (truncated, corrupt, another format)."""
    from safetensors import SafetensorError

    try:
        return _read_weight_file(path)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError,
            SafetensorError) as e:  # torch, paddle, safetensors
        raise ValueError(f"{path} is not a readable weight file ({type(e).__name__}: {e}); download it again") from None


def _read_weight_file(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".pth") or path.endswith(".pt"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path} is a PyTorch file and PyTorch is not installed: install it "
                             "(pip install -r requirements-interop.txt), or convert the file once elsewhere with "
                             f"`python -m sd.evaluation.inception convert {path} OUT.safetensors`") from None
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v.detach().cpu().numpy() for k, v in state.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if path.endswith(".pdparams"):
        return {k: np.asarray(v) for k, v in paddle.load(path, return_numpy=True).items()}
    raise ValueError(f"{path}: unknown weight format; pass a .pth, .safetensors or .pdparams file")


def to_our_names(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Rename torchvision/pytorch-fid or PaddleMIX keys to FIDInceptionV3's; drops the classifier
    (``fc.*``) and ``num_batches_tracked``."""
    out = {}
    for key, value in state.items():
        if key.startswith("inception_"):
            key = _from_paddlemix_name(key)
            if key is None:
                continue
        if key.startswith(("fc.", "AuxLogits.")) or key.endswith("num_batches_tracked"):
            continue
        head, _, last = key.rpartition(".")
        out[f"{head}.{_BN_NAMES.get(last, last)}"] = value
    return out


def find_weights() -> Optional[str]:
    """A weight file already downloaded by pytorch-fid or PaddleMIX, if any."""
    for folder in WEIGHT_CACHES:
        for name in WEIGHT_FILES:
            path = os.path.join(os.path.expanduser(folder), name)
            if os.path.isfile(path):
                return path
    return None


def load_fid_inception(path: str) -> FIDInceptionV3:
    """FIDInceptionV3 in eval mode with the weights of ``path`` (see the module docstring for formats).

    Raises ``FileNotFoundError`` / ``ValueError`` (missing file, unknown format, wrong keys or shapes),
    naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--inception_weights {path} does not exist")
    state = to_our_names(read_weight_file(path))
    model = FIDInceptionV3()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} is not the FID Inception network: {len(missing)} missing keys (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); pass pytorch-fid's "
                         f"{WEIGHT_FILES[0]} or PaddleMIX's {WEIGHT_FILES[2]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, the FID Inception network needs "
                             f"{tuple(v.shape)}")
    model.set_state_dict({k: paddle.to_tensor(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    model.eval()
    return model


def convert(src: str, dst: str) -> None:
    """Write the tensors of ``src`` (any format above) to a safetensors file ``dst`` under
    torchvision's names (running_mean/running_var), readable without PyTorch."""
    from safetensors.numpy import save_file

    state = read_weight_file(src)
    if any(k.startswith("inception_") for k in state):  # PaddleMIX naming → torchvision's
        back = {v: k for k, v in _BN_NAMES.items()}
        state = {f"{h}.{back.get(last, last)}": v for k, v in to_our_names(state).items()
                 for h, _, last in [k.rpartition(".")]}
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="FID Inception weights: convert a .pth (or .pdparams) to .safetensors "
                                            "once.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="SRC (.pth/.pdparams/.safetensors) → DST.safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    a = p.parse_args(argv)
    if not os.path.isfile(a.src):
        p.exit(2, f"error: {a.src} does not exist\n")
    try:
        convert(a.src, a.dst)
    except ValueError as e:  # not a weight file of the FID network
        p.exit(2, f"error: {e}\n")
    print(f"wrote {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
