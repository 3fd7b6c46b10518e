"""img2dataset output as a record source: webdataset tar shards, parquet shards and ``files`` folders.

img2dataset (``--output_format webdataset | parquet | files``) writes, per shard ``00000``:

* webdataset: ``00000.tar`` with ``KEY.jpg`` (or ``.png``/``.webp``), ``KEY.txt`` (the caption) and
  ``KEY.json`` (url, key, status, width, height, original_width, original_height, sha256, and any
  ``--save_additional_columns``) per sample, plus ``00000.parquet`` (the metadata of every URL, also
  the failed ones, without images);
* parquet: ``00000.parquet`` with the image bytes in a column named after the encode format
  (``jpg``), the caption in ``caption`` and the metadata in the other columns; rows whose download
  failed are there too, with ``status`` other than ``success`` and no image;
* files: a folder ``00000/`` with ``KEY.jpg``, ``KEY.txt``, ``KEY.json``;
* and for each shard ``00000_stats.json``: count, successes and failures by reason (``status_dict``).

Everything here streams: a tar is read member by member in tarfile's stream mode (nothing is
extracted to disk), a parquet row group by row group, a folder one sample at a time. A shard yields
``Sample`` records, undecoded; ``decode_sample`` turns one into ``(caption, image bytes)`` or raises
``BadRecord(reason)``, the contract of the dataset's record decoders (``sd/data/formats.py``):

* ``no_caption``: no ``.txt`` (or no ``caption_key`` field); ``not_text``: a caption that is not UTF-8;
* ``empty_image``: no image member, or a parquet row without image bytes;
* ``not_downloaded``: a parquet row img2dataset could not fetch (its own failure, also in its stats);
* ``bad_json``: a ``.json`` that does not parse, when a filter or ``caption_key`` needs it;
* ``filtered``: a sample that fails ``--min_original_size`` or a ``--where`` threshold.

A truncated or corrupt tar raises ``EOFError`` naming the shard and the key it stopped at (the
stream counts ``truncated_file`` and skips the rest of that shard); an image that does not decode is
``bad_image`` where it is decoded (the dataset, or the converter's full decode).

A shard may be remote (an ``http(s)://`` or ``s3://`` URL, ``sd/data/remote.py``): it streams the same
way, by range requests; an output folder may be an S3 prefix (listed through fsspec).

Training reads ``.tar`` and ``.parquet`` shards listed in a ``.filelist`` through the record sources
registered in ``sd/data/record_stream.py``; their caption source and filters are the dataset's ``ShardOptions``
(default: the ``.txt``, no filter), handed to ``decode_sample`` with every record.
"""

from __future__ import annotations

import json
import operator
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from sd.data import remote
from sd.data.formats import BadRecord

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # image members / parquet columns, in order of preference
FORMATS = ("webdataset", "parquet", "files")
PARQUET_BATCH = 256  # rows per decoded batch when streaming a parquet shard
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq,
        "!=": operator.ne}
_WHERE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(<=|>=|==|!=|<|>)\s*([-+0-9.eE]+|nan|inf)\s*$")


@dataclass(frozen=True)
class Sample:
    """One img2dataset sample as read from its shard, nothing decoded.

    ``meta`` is the raw ``.json`` bytes (tar, files) or the row's metadata dict (parquet); ``text`` the
    raw ``.txt`` bytes (tar, files) or the caption column's value (parquet, str or None).
    """

    shard: str
    key: str
    image: Optional[bytes]
    text: Optional[object]
    meta: Optional[object]


# ---------------------------------------------------------------------------------------------
# Options: caption source and metadata filters
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Where:
    """``column OP number``: a threshold on one numeric metadata field."""

    column: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> "Where":
        m = _WHERE.match(text)
        if not m:
            raise ValueError(f"--where {text!r}: expected 'column OP number' with OP one of "
                             f"{' '.join(_OPS)}, e.g. 'pwatermark < 0.5'")
        return cls(m.group(1), m.group(2), float(m.group(3)))

    def holds(self, meta: dict) -> bool:
        value = meta.get(self.column)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False  # missing or not numeric: the sample cannot be shown to pass
        return bool(_OPS[self.op](value, self.value))

    def __str__(self) -> str:
        return f"{self.column} {self.op} {self.value:g}"


@dataclass(frozen=True)
class ShardOptions:
    """How a sample becomes a record.

    Args:
        caption_key: None: the caption is the ``.txt`` member (parquet: the ``caption`` column); else
            this field of the ``.json`` (parquet: this column).
        min_original_size: keep samples whose ``original_width`` and ``original_height`` are both at
            least this (0: no filter).
        where: thresholds every kept sample passes (``Where.parse("pwatermark < 0.5")``).
    """

    caption_key: Optional[str] = None
    min_original_size: int = 0
    where: Tuple[Where, ...] = field(default_factory=tuple)

    @property
    def needs_meta(self) -> bool:
        return self.caption_key is not None or self.min_original_size > 0 or bool(self.where)

    def describe_filters(self) -> str:
        parts = [f"original size >= {self.min_original_size}"] if self.min_original_size else []
        return ", ".join(parts + [str(w) for w in self.where]) or "none"


# ---------------------------------------------------------------------------------------------
# Decoding one sample
# ---------------------------------------------------------------------------------------------
def _meta_dict(sample: Sample) -> dict:
    if isinstance(sample.meta, dict):
        return sample.meta
    if sample.meta is None:
        raise BadRecord("bad_json", f"{sample.shard}: {sample.key} has no .json")
    try:
        meta = json.loads(sample.meta)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRecord("bad_json", f"{sample.shard}: {sample.key}.json: {err}") from None
    if not isinstance(meta, dict):
        raise BadRecord("bad_json", f"{sample.shard}: {sample.key}.json is not an object")
    return meta


def passes_filters(meta: dict, options: ShardOptions) -> bool:
    """True when the metadata satisfies the size minimum and every threshold of ``options``."""
    if options.min_original_size:
        w, h = meta.get("original_width"), meta.get("original_height")
        if not isinstance(w, int) or not isinstance(h, int) or min(w, h) < options.min_original_size:
            return False
    return all(w.holds(meta) for w in options.where)


def decode_sample(sample: Sample, line_format: Optional[str] = None,
                  options: Optional[ShardOptions] = None) -> Tuple[str, bytes]:
    """A ``Sample`` → ``(caption, image bytes)``; the image is not decoded here.

    ``line_format`` is ignored (the dataset's decoder signature); ``options`` default to ``ShardOptions()``.

    Raises:
        BadRecord("not_downloaded" | "no_caption" | "not_text" | "empty_image" | "bad_json" | "filtered")
    """
    options = ShardOptions() if options is None else options
    meta = None
    if isinstance(sample.meta, dict):  # a parquet row: img2dataset's own failures are in the file
        meta = sample.meta
        status = meta.get("status")
        if status is not None and status != "success":
            raise BadRecord("not_downloaded", f"{sample.shard}: {sample.key}: {meta.get('error_message')}")
    if options.needs_meta:
        meta = _meta_dict(sample)
    if options.caption_key is None:
        caption = sample.text
        if caption is None:
            raise BadRecord("no_caption", f"{sample.shard}: {sample.key} has no caption (.txt)")
    else:
        caption = meta.get(options.caption_key)
        if caption is None:
            raise BadRecord("no_caption", f"{sample.shard}: {sample.key} has no {options.caption_key!r}")
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadRecord("not_text", f"{sample.shard}: {sample.key}: caption is not UTF-8 ({err})") from None
    if not isinstance(caption, str):
        raise BadRecord("no_caption", f"{sample.shard}: {sample.key}: caption is a {type(caption).__name__}")
    if not sample.image:
        raise BadRecord("empty_image", f"{sample.shard}: {sample.key} has no image")
    if meta is not None and (options.min_original_size or options.where) and not passes_filters(meta, options):
        raise BadRecord("filtered", f"{sample.shard}: {sample.key} fails {options.describe_filters()}")
    return caption, sample.image


# ---------------------------------------------------------------------------------------------
# Readers, one per output format
# ---------------------------------------------------------------------------------------------
def _split_name(name: str) -> Tuple[str, str]:
    """``dir/KEY.ext.more`` → (``dir/KEY``, ``ext.more``), webdataset's rule (the first dot of the basename)."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def _group(shard: str, key: str, members: Dict[str, bytes]) -> Sample:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    return Sample(shard, key, image, members.get("txt"), members.get("json"))


def _open_binary(path: str):
    """A local file, or a remote one streamed by range requests (``sd/data/remote.py``)."""
    return remote.open_binary(path) if remote.is_remote(path) else open(path, "rb")


def iter_tar(path: str) -> Iterator[Sample]:
    """Samples of a webdataset ``.tar``, grouped by key, streamed (tarfile's stream mode).

    Raises:
        EOFError: the tar is truncated or corrupt; the message names the shard and the key where
            reading stopped (samples before it were yielded).
    """
    key, members = None, {}
    with _open_binary(path) as f:  # FileNotFoundError / PermissionError / IsADirectoryError: the caller's
        try:
            tar = tarfile.open(fileobj=f, mode="r|")
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key:
                    if key is not None:
                        yield _group(path, key, members)
                    key, members = k, {}
                members[ext] = tar.extractfile(member).read()
                tar.members = []  # tarfile keeps every header it read: memory would grow with the shard
            end = tar.offset
        except tarfile.ReadError as err:
            raise EOFError(f"{path}: truncated or corrupt tar at key {key or '(first)'} ({err})") from None
    # Stream mode ends quietly at an invalid or cut header; a whole tar ends with zero blocks there.
    with _open_binary(path) as f:
        f.seek(end)
        tail = f.read(1024)
    if len(tail) < 1024 or tail.strip(b"\0"):
        raise EOFError(f"{path}: truncated or corrupt tar at key {key or '(none)'} (no end-of-archive "
                       f"marker at byte {end})")
    if key is not None:
        yield _group(path, key, members)


def image_column(schema_names: Sequence[str]) -> Optional[str]:
    """The image-bytes column of an img2dataset parquet (``jpg``, ``png``, ...), or None."""
    return next((c for c in IMAGE_EXTENSIONS if c in schema_names), None)


def iter_parquet(path: str, caption_column: str = "caption") -> Iterator[Sample]:
    """Rows of an img2dataset ``--output_format parquet`` shard, streamed batch by batch.

    Raises:
        ValueError: the file has no image column (e.g. the metadata parquet beside a webdataset tar).
        OSError: the file is not parquet or is corrupt (pyarrow's ``ArrowInvalid`` is re-raised as one).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    stream = remote.open_binary(path) if remote.is_remote(path) else None
    try:
        pf = pq.ParquetFile(path if stream is None else stream)  # remote: the footer, then row group by row group
        names = pf.schema_arrow.names
        column = image_column(names)
        if column is None:
            raise ValueError(f"{path} has no image column ({', '.join(IMAGE_EXTENSIONS)}): it is not an "
                             "img2dataset parquet shard (a webdataset folder's .parquet holds only metadata; "
                             "list its .tar shards instead)")
        index = 0
        # remote: one row group at a time (pyarrow would fetch every row group it is given at once)
        groups = [None] if stream is None else [[g] for g in range(pf.num_row_groups)]
        for group in groups:
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH, row_groups=group):
                for row in batch.to_pylist():
                    image = row.pop(column)
                    yield Sample(path, str(row.get("key") or f"row {index}"), image, row.get(caption_column), row)
                    index += 1
    except pa.ArrowInvalid as err:
        raise OSError(f"{path}: not a readable parquet file ({err})") from None
    finally:
        if stream is not None:
            stream.close()


def iter_files(folder: str) -> Iterator[Sample]:
    """Samples of one ``files`` shard folder (``00000/KEY.jpg|.txt|.json``), in key order."""
    by_key: Dict[str, Dict[str, str]] = {}
    for name in os.listdir(folder):
        k, ext = _split_name(name)
        if ext:
            by_key.setdefault(k, {})[ext] = name
    for key in sorted(by_key):
        members = {}
        for ext, name in by_key[key].items():
            if ext in IMAGE_EXTENSIONS or ext in ("txt", "json"):
                with open(os.path.join(folder, name), "rb") as f:
                    members[ext] = f.read()
        yield _group(folder, key, members)


def iter_shard(path: str) -> Iterator[Sample]:
    """Samples of one shard of any format: ``.tar``, ``.parquet`` or a ``files`` folder."""
    if os.path.isdir(path):
        return iter_files(path)
    if path.endswith(".parquet"):
        return iter_parquet(path)
    return iter_tar(path)


# ---------------------------------------------------------------------------------------------
# Output folders and their stats
# ---------------------------------------------------------------------------------------------
_SHARD_NAME = re.compile(r"^\d+$")


def find_shards(folder: str) -> Tuple[str, List[str]]:
    """The format of an img2dataset output folder and its shards, sorted: (format, paths).

    webdataset: any ``*.tar``; files: numbered sub-folders; parquet: ``*.parquet`` with an image column.

    Raises:
        ValueError: the folder holds none of these.
    """
    if remote.is_remote(folder):  # an S3 prefix or an HTTP index page: shards are URLs, no 'files' folders
        kinds = remote.list_folder(folder)
        names, join, isdir = sorted(kinds), remote.join, lambda path: kinds[path.rsplit("/", 1)[1]] == "directory"
    else:
        names, join, isdir = sorted(os.listdir(folder)), os.path.join, os.path.isdir
    tars = [join(folder, n) for n in names if n.endswith(".tar")]
    if tars:
        return "webdataset", tars
    dirs = [join(folder, n) for n in names if _SHARD_NAME.match(n) and isdir(join(folder, n))]
    if dirs:
        if remote.is_remote(folder):
            raise ValueError(f"{folder}: an img2dataset 'files' folder cannot be read remotely; copy it, or "
                             "write the shards as webdataset or parquet")
        return "files", dirs
    parquets = [join(folder, n) for n in names if n.endswith(".parquet")]
    if parquets:
        if image_column(_parquet_columns(parquets[0])) is None:
            raise ValueError(f"{folder}: its .parquet files hold no image column and there are no .tar shards "
                             "or shard folders: not an img2dataset output folder with images")
        return "parquet", parquets
    raise ValueError(f"{folder}: no img2dataset shards (*.tar, numbered folders or *.parquet with images)")


def _parquet_columns(path: str) -> List[str]:
    import pyarrow.parquet as pq

    with _open_binary(path) as f:
        return pq.ParquetFile(f).schema_arrow.names


def looks_like_output(folder: str) -> bool:
    """True when ``folder`` is an img2dataset output folder (it has ``*_stats.json`` or shards)."""
    if not (remote.isdir(folder) if remote.is_remote(folder) else os.path.isdir(folder)):
        return False
    try:
        find_shards(folder)
    except ValueError:
        return False
    return True


def stats_path(shard: str) -> str:
    """``.../00000.tar`` (or ``.parquet``, or the folder ``00000``) → ``.../00000_stats.json``."""
    stem = shard.rstrip("/").rsplit(".", 1)[0] if remote.is_remote(shard) or not os.path.isdir(shard) \
        else shard.rstrip("/")
    return stem + "_stats.json"


@dataclass
class Stats:
    """img2dataset's own counts, summed over shards' ``*_stats.json``."""

    shards: int = 0  # shards with a stats file
    missing: int = 0  # shards without one
    count: int = 0  # URLs tried
    successes: int = 0
    failures: Dict[str, int] = field(default_factory=dict)  # status_dict minus success: reason → count

    def add(self, shard: str) -> None:
        path = stats_path(shard)
        try:
            with _open_binary(path) as f:
                data = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            self.missing += 1
            return
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not an img2dataset stats file ({err})") from None
        self.shards += 1
        self.count += int(data.get("count", 0))
        self.successes += int(data.get("successes", 0))
        for reason, n in (data.get("status_dict") or {}).items():
            if reason != "success":
                self.failures[reason] = self.failures.get(reason, 0) + int(n)


def read_stats(shards: Sequence[str]) -> Stats:
    """img2dataset's stats of these shards (the ``*_stats.json`` beside each)."""
    stats = Stats()
    for shard in shards:
        stats.add(shard)
    return stats
