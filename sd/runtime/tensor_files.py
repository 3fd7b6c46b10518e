"""Tensors to and from safetensors files one tensor at a time, so that saving never holds a second copy of
the model or of the optimizer state.

At real size a checkpoint holds the 860 M-parameter UNet (3.4 GB in fp32), its EMA (3.4 GB) and AdamW's two
moments (6.9 GB). The usual writers first convert everything they save to host arrays (ppdiffusers'
``save_pretrained``: every tensor to numpy, then ``safetensors`` builds the file's bytes in memory; ``paddle.save``
of an optimizer state: every tensor to numpy inside one pickle), which adds up to twice the saved size to the
peak memory of the save. Here the header is computed from shapes and dtypes alone, then each tensor is copied
to the host, written and released: the extra memory is the largest tensor (59 MB for SD v1's UNet).

The files are ordinary safetensors files (``safetensors.safe_open`` and ppdiffusers' ``from_pretrained`` read
them): an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}, "__metadata__":
{...}}``, then the tensors' bytes in header order. Nested dicts (an optimizer's state: accumulators, master
weights, the LR scheduler's numbers) are flattened with ``/`` in the names; values that are not tensors go, as
JSON, into the metadata, so :func:`load_state` gives back the same structure.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

# safetensors' dtype names; paddle's bfloat16 reaches the host as uint16 (and paddle.to_tensor maps uint16 back)
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
          "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
         "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
STATE_KEY = "sd_state_layout"  # metadata key of save_state: the non-tensor leaves and the nesting
SEPARATOR = "/"


def _dtype_name(t) -> str:
    name = str(t.dtype).replace("paddle.", "")
    if name not in DTYPES:
        raise TypeError(f"cannot write a tensor of dtype {t.dtype} to safetensors")
    return DTYPES[name]


def _nbytes(shape, code: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY[code]).itemsize


def save_tensors(tensors: Mapping[str, object], path: str, metadata: Optional[Dict[str, str]] = None) -> int:
    """Write ``tensors`` (paddle tensors or numpy arrays, by name) to the safetensors file ``path``, one at a
    time. Returns the file's size in bytes.

    Args:
        tensors: name → tensor; written in sorted name order, as ``safetensors`` does.
        path: the file to write (its folder must exist); a partly written file is left only if writing fails.
        metadata: strings for the header's ``__metadata__`` (e.g. ``{"format": "pd"}`` for ppdiffusers).
    """
    header, offset = {}, 0
    for name in sorted(tensors):
        t = tensors[name]
        code = _dtype_name(t)
        shape = [int(s) for s in t.shape]
        size = _nbytes(shape, code)
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in sorted(tensors):
            t = tensors[name]
            host = t if isinstance(t, np.ndarray) else t.cpu().numpy()
            f.write(np.ascontiguousarray(host).reshape(-1).view(np.uint8))  # no copy beyond the host one
            del host
    return os.path.getsize(path)


def read_header(path: str) -> Tuple[dict, int]:
    """(header, offset of the data) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > os.path.getsize(path):
            raise ValueError(f"{path} is not a safetensors file (header length {length} past its end)")
        return json.loads(f.read(length)), 8 + length


def is_safetensors(path: str) -> bool:
    """Whether ``path`` starts like a safetensors file (a header length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < os.path.getsize(path)


def iter_tensors(path: str) -> Iterator[Tuple[str, np.ndarray]]:
    """(name, array) of every tensor of ``path``, read one at a time (bfloat16 as uint16, as paddle expects)."""
    header, start = read_header(path)
    with open(path, "rb") as f:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            array = np.frombuffer(f.read(end - begin), dtype=NUMPY[entry["dtype"]])
            yield name, array.reshape(entry["shape"])


def _flatten(state: Mapping, prefix: str, tensors: Dict[str, object]) -> dict:
    """The layout of ``state`` (key → ["tensor"] | ["value", v] | ["dict", layout]); its tensors into ``tensors``."""
    layout = {}
    for key, value in state.items():
        if not isinstance(key, str) or SEPARATOR in key:
            raise ValueError(f"state key {key!r}: keys must be strings without {SEPARATOR!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            layout[key] = ["dict", _flatten(value, name + SEPARATOR, tensors)]
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            tensors[name] = value
            layout[key] = ["tensor"]
        else:
            layout[key] = ["value", value]  # JSON: numbers, strings, lists, None
    return layout


def save_state(state: Mapping, path: str) -> int:
    """Write a (nested) state dict, e.g. ``optimizer.state_dict()``, tensor by tensor. Returns the file size."""
    tensors = {}
    layout = _flatten(state, "", tensors)
    return save_tensors(tensors, path, {STATE_KEY: json.dumps(layout)})


def load_state(path: str, memmap: bool = False) -> dict:
    """Inverse of :func:`save_state`: the nested dict, its tensors created one at a time.

    Args:
        memmap: give the tensors as read-only numpy views of the file instead of paddle tensors. Paddle's
            optimizer keeps a loaded state until its accumulators exist and copies each in then; views of the
            file cost page cache, not a second copy of AdamW's moments in process memory.
    """
    import paddle

    header, start = read_header(path)
    layout = json.loads(header.get("__metadata__", {}).get(STATE_KEY, "null"))
    if layout is None:
        raise ValueError(f"{path} was not written by sd.runtime.tensor_files.save_state (no {STATE_KEY} metadata)")
    if memmap:
        data = np.memmap(path, dtype=np.uint8, mode="r")

        def tensor(entry):
            begin, end = entry["data_offsets"]
            return data[start + begin:start + end].view(NUMPY[entry["dtype"]]).reshape(entry["shape"])

        tensors = {name: tensor(entry) for name, entry in header.items() if name != "__metadata__"}
    else:
        tensors = {name: paddle.to_tensor(array) for name, array in iter_tensors(path)}

    def build(node: dict, prefix: str) -> dict:
        out = {}
        for key, (kind, *rest) in node.items():
            name = f"{prefix}{key}"
            if kind == "tensor":
                out[key] = tensors.pop(name)
            elif kind == "value":
                out[key] = rest[0]
            else:
                out[key] = build(rest[0], name + SEPARATOR)
        return out

    return build(layout, "")
