"""The on-disk data format, defined once for both ends (data preparation and the dataset).

Three kinds of file (the PaddleMIX layout):

* ``*.filelist.list``: one ``path/to/x.filelist [weight]`` per line.
* ``*.filelist``: one part-file path per line (the same path may repeat).
* part files (``.gz`` or plain text), one record per line, in one of two line formats:

  - ``laion400m``: ``caption \\t placeholder \\t base64(image bytes)``
  - ``laion_aes``: column 3 (index 2) is a JSON object holding ``caption_en`` or
    ``blip_caption_en``; column 6 (index 5) is the base64 image.

Path rule (used for every relative path inside a ``.filelist.list`` or ``.filelist``):
a relative path is tried, in order, against

1. the current working directory (PaddleMIX's rule: its tools write paths relative to the folder
   they were run from, e.g. ``processed_data/laion400m_format_data/part-000001.gz``);
2. the folder of the file that lists it, then each parent folder of that folder, up to the root.

The first candidate that exists wins. Rule 2 makes a dataset written from one folder usable from any
other folder, without rewriting its file lists.

Remote files (``sd/data/remote.py``): any listed path may be an ``http(s)://`` or ``s3://`` URL, kept as
written and not looked up when the list is read (a shard that cannot be reached is skipped and counted
when it is read); a relative path inside a remote list is relative to that list's URL.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from sd.data import remote

LINE_FORMATS = ("laion400m", "laion_aes")
PLACEHOLDER = "NONE"  # what PaddleMIX's create_pretraining_data.py writes in column 2
_CAPTION_BREAKS = re.compile(r"[\t\r\n]+")


class BadRecord(ValueError):
    """A part-file line that cannot be used. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Part-file lines
# ---------------------------------------------------------------------------------------------
def normalize_caption(caption: str) -> str:
    """Replace every run of tabs, CRs and newlines by one space (they would break the TSV line).

    Everything else, leading and trailing spaces included, is kept as it is (PaddleMIX keeps it too).
    """
    return _CAPTION_BREAKS.sub(" ", caption)


def encode_part_line(caption: str, image_bytes: bytes) -> str:
    """One ``laion400m`` line, newline included: ``caption \\t NONE \\t base64(image_bytes)\\n``."""
    b64 = base64.b64encode(image_bytes).decode("ascii")
    return f"{normalize_caption(caption)}\t{PLACEHOLDER}\t{b64}\n"


def decode_line_bytes(raw: bytes) -> str:
    """Decode one raw line: UTF-8 first, then GB18030 (as PaddleMIX's loader does).

    Raises:
        BadRecord("not_text"): neither encoding decodes it.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("gb18030")
    except UnicodeDecodeError as err:
        raise BadRecord("not_text", str(err)) from None


def parse_part_line(line: str, line_format: str = "laion400m") -> Tuple[str, str]:
    """Split one part-file line into ``(caption, image_base64)``; nothing is decoded yet.

    Raises:
        BadRecord("too_few_fields" | "bad_json" | "no_caption" | "empty_image")
    """
    return _pick_fields(line.rstrip("\r\n").split("\t"), line_format, lambda text: text)


def parse_part_line_bytes(raw: bytes, line_format: str = "laion400m") -> Tuple[str, bytes]:
    """Like ``parse_part_line`` on a raw line, but only the text fields are decoded.

    The base64 field (most of the line) stays bytes: decoding it as text and encoding it back
    for ``base64`` would copy it twice. Splitting the bytes at tabs is safe for UTF-8 and GB18030,
    whose multi-byte characters never contain a tab byte.

    Raises:
        BadRecord("not_text" | "too_few_fields" | "bad_json" | "no_caption" | "empty_image")
    """
    return _pick_fields(raw.rstrip(b"\r\n").split(b"\t"), line_format, decode_line_bytes)


def _pick_fields(fields, line_format: str, to_text):
    """(caption, base64 field) from split fields; ``to_text`` turns a text field into str."""
    if line_format == "laion400m":
        if len(fields) < 3:
            raise BadRecord("too_few_fields", f"{len(fields)} fields, need 3")
        caption, b64 = to_text(fields[0]), fields[2]
    elif line_format == "laion_aes":
        if len(fields) < 6:
            raise BadRecord("too_few_fields", f"{len(fields)} fields, need 6")
        try:
            meta = json.loads(to_text(fields[2]))
        except json.JSONDecodeError as err:
            raise BadRecord("bad_json", str(err)) from None
        if not isinstance(meta, dict):
            raise BadRecord("bad_json", "column 3 is not a JSON object")
        caption = meta.get("caption_en") or meta.get("blip_caption_en")
        if not isinstance(caption, str):
            raise BadRecord("no_caption", "neither caption_en nor blip_caption_en")
        b64 = fields[5]
    else:
        raise ValueError(f"unknown line format {line_format!r}; choose one of {LINE_FORMATS}")
    if not b64.strip():
        raise BadRecord("empty_image")
    return caption, b64


def decode_image_b64(b64: str) -> bytes:
    """base64 text → image bytes. Raises BadRecord("bad_base64")."""
    try:
        return base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as err:
        raise BadRecord("bad_base64", str(err)) from None


def decode_part_record(raw: bytes, line_format: str = "laion400m") -> Tuple[str, bytes]:
    """One raw part-file line → ``(caption, image bytes)``: the record decoder of part files.

    Raises:
        BadRecord("empty_line" | "not_text" | "too_few_fields" | "bad_json" | "no_caption" | "empty_image"
        | "bad_base64")
    """
    if not raw.strip():
        raise BadRecord("empty_line")
    caption, b64 = parse_part_line_bytes(raw, line_format)
    return caption, decode_image_b64(b64)


def iter_part_file(path: str) -> Iterator[bytes]:
    """Yield the raw lines (bytes, newline kept) of a part file; ``.gz`` is decompressed on the fly.

    A truncated or corrupt gzip raises ``EOFError``/``OSError`` (``gzip.BadGzipFile``) part-way
    through; callers count that as a bad file and move on.
    """
    if remote.is_remote(path):
        with remote.open_binary(path) as stream, (gzip.open(stream, "rb") if path.endswith(".gz") else stream) as f:
            yield from f
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for raw in f:
            yield raw


# ---------------------------------------------------------------------------------------------
# File lists
# ---------------------------------------------------------------------------------------------
def resolve_path(path: str, listed_in: Optional[str] = None) -> str:
    """Resolve a path found in ``listed_in`` by the module's path rule.

    Returns the first existing candidate; if none exists, the CWD candidate (so the caller's
    "missing file" error shows the path as written).
    """
    if remote.is_remote(path):
        return path
    if listed_in is not None and remote.is_remote(listed_in):
        return remote.join(listed_in.rsplit("/", 1)[0], path)
    path = os.path.expanduser(path)
    if os.path.isabs(path) or os.path.exists(path):
        return path
    if listed_in is not None:
        folder = os.path.dirname(os.path.abspath(listed_in))
        while True:
            candidate = os.path.join(folder, path)
            if os.path.exists(candidate):
                return candidate
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    return path


@dataclass(frozen=True)
class ListEntry:
    path: str  # resolved path of the listed file
    weight: Optional[float]  # None when the line gives no weight
    listed_in: str  # the listing file
    line_no: int  # 1-based line number in the listing file


def _open_listing(listing: str):
    """A ``.filelist(.list)`` opened as text: a local file, or a remote one read whole."""
    if remote.is_remote(listing):
        try:
            return io.StringIO(remote.read_text(listing))
        except (FileNotFoundError, PermissionError, remote.RemoteUnreachable) as err:
            raise FileNotFoundError(remote.redact(f"{listing}: cannot be read ({err})")) from None
    if not os.path.isfile(listing):
        raise FileNotFoundError(f"{listing}: no such file")
    return open(listing, "r", encoding="utf-8")


def _read_listing(listing: str, with_weight: bool) -> List[ListEntry]:
    entries = []
    listing = os.fspath(listing)
    with _open_listing(listing) as f:
        for line_no, line in enumerate(f, 1):
            parts = line.strip().split()
            if not parts or parts[0].startswith("#"):
                continue
            weight = None
            if with_weight and len(parts) >= 2:
                try:
                    weight = float(parts[1])
                except ValueError:
                    raise ValueError(remote.redact(
                        f"{listing}:{line_no}: weight {parts[1]!r} is not a number "
                        "(expected 'path/to/x.filelist [weight]')"
                    )) from None
                if weight < 0:
                    raise ValueError(remote.redact(f"{listing}:{line_no}: weight {weight} is negative"))
            elif len(parts) > 1:
                raise ValueError(remote.redact(f"{listing}:{line_no}: expected one path per line, "
                                               f"got {line.strip()!r}"))
            resolved = resolve_path(parts[0], listing)
            if not remote.is_remote(resolved) and not os.path.exists(resolved):
                raise FileNotFoundError(remote.redact(
                    f"{listing}:{line_no}: {parts[0]} not found (tried relative to the current "
                    f"directory {os.getcwd()} and to {os.path.dirname(os.path.abspath(listing))} and "
                    "its parents); fix the path or run from the folder the data was prepared in"
                ))
            entries.append(ListEntry(resolved, weight, listing, line_no))
    if not entries:
        raise ValueError(remote.redact(f"{listing}: lists no files"))
    return entries


def read_filelist_list(path: str) -> List[ListEntry]:
    """Entries of a ``*.filelist.list`` (each a ``.filelist`` with an optional weight)."""
    entries = _read_listing(path, with_weight=True)
    weights = [e.weight for e in entries]
    if any(w is not None for w in weights) and any(w is None for w in weights):
        raise ValueError(remote.redact(f"{path}: give a weight on every line or on none"))
    if all(w is not None for w in weights) and sum(weights) <= 0:
        raise ValueError(remote.redact(f"{path}: the weights add up to 0"))
    return entries


def read_filelist(path: str) -> List[ListEntry]:
    """Entries of a ``*.filelist`` (each a part file; repeats are kept)."""
    return _read_listing(path, with_weight=False)


def write_filelists(output_path: str, output_name: str, part_paths: List[str], num_repeat: int = 1) -> Tuple[str, str]:
    """Write ``<output_path>/filelist/<name>.filelist`` and ``<name>.filelist.list``.

    ``part_paths`` are written as given (PaddleMIX writes them relative to the directory the tool
    ran in); the whole list is repeated ``num_repeat`` times. Returns the two paths written.
    """
    folder = os.path.join(output_path, "filelist")
    os.makedirs(folder, exist_ok=True)
    filelist = os.path.join(folder, f"{output_name}.filelist")
    with open(filelist, "w", encoding="utf-8") as f:
        f.write("\n".join(list(part_paths) * num_repeat) + "\n")
    filelist_list = filelist + ".list"
    with open(filelist_list, "w", encoding="utf-8") as f:
        f.write(filelist + "\n")
    return filelist, filelist_list


# ---------------------------------------------------------------------------------------------
# Precomputed-latent part files (sd/tools/precompute_latents.py writes them, sd/latent_dataset.py reads them)
# ---------------------------------------------------------------------------------------------
# Line: ``caption \t spec \t base64(mean) \t base64(std) \t base64(hidden)`` with spec
# ``latents:<dtype>:<c,h,w>:<L,D>``: the VAE posterior's mean and std (c, h, w) and the text
# encoder's last hidden states (L, D), raw little-endian arrays of ``dtype`` (float16 or float32).
LATENT_TAG = "latents"
LATENT_DTYPES = ("float16", "float32")


def encode_latent_line(caption: str, mean, std, hidden) -> str:
    """One precomputed-latent line (newline included) from numpy arrays of one dtype."""
    dtype = str(mean.dtype)
    if dtype not in LATENT_DTYPES or std.dtype != mean.dtype or hidden.dtype != mean.dtype or std.shape != mean.shape:
        raise ValueError(f"mean/std/hidden must share a dtype in {LATENT_DTYPES} and mean/std a shape; got "
                         f"{mean.dtype}{mean.shape}, {std.dtype}{std.shape}, {hidden.dtype}{hidden.shape}")
    spec = f"{LATENT_TAG}:{dtype}:{','.join(map(str, mean.shape))}:{','.join(map(str, hidden.shape))}"
    b64 = [base64.b64encode(a.astype(a.dtype.newbyteorder("<")).tobytes()).decode("ascii") for a in (mean, std, hidden)]
    return "\t".join([normalize_caption(caption), spec, *b64]) + "\n"


def parse_latent_line(raw: bytes):
    """Raw precomputed-latent line → ``(caption, mean, std, hidden)`` numpy arrays (read-only views).

    Raises:
        BadRecord("empty_line" | "not_text" | "too_few_fields" | "bad_latent" | "bad_base64")
    """
    import numpy as np

    fields = raw.rstrip(b"\r\n").split(b"\t")
    if not raw.strip():
        raise BadRecord("empty_line")
    if len(fields) < 5:
        raise BadRecord("too_few_fields", f"{len(fields)} fields, need 5 (is this a latent part file?)")
    try:
        tag, dtype, latent_shape, hidden_shape = fields[1].decode("ascii").split(":")
        latent_shape = tuple(int(x) for x in latent_shape.split(","))
        hidden_shape = tuple(int(x) for x in hidden_shape.split(","))
    except (UnicodeDecodeError, ValueError) as err:
        raise BadRecord("bad_latent", f"bad spec {fields[1][:60]!r}: {err}") from None
    if tag != LATENT_TAG or dtype not in LATENT_DTYPES:
        raise BadRecord("bad_latent", f"spec {fields[1][:60]!r} is not latents:<float16|float32>:<c,h,w>:<L,D>")
    arrays = []
    for field, shape in ((fields[2], latent_shape), (fields[3], latent_shape), (fields[4], hidden_shape)):
        try:
            data = base64.b64decode(field, validate=False)
        except (binascii.Error, ValueError) as err:
            raise BadRecord("bad_base64", str(err)) from None
        count = 1
        for n in shape:
            count *= n
        if len(data) != count * np.dtype(dtype).itemsize:
            raise BadRecord("bad_latent", f"{len(data)} bytes for {dtype} {shape}")
        arrays.append(np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape))
    return (decode_line_bytes(fields[0]), *arrays)
