"""Pack a coco_karpathy-style jsonl + images, or an img2dataset output folder, into the part files that
training streams.

    python create_pretraining_data.py --input_path ./coco_data/coco_data.jsonl \\
        --output_path ./processed_data --per_part_file_num 1000 --num_repeat 100 --save_gzip_file
    python create_pretraining_data.py --input_path ./laion_shards --output_path ./processed_data \\
        --where "pwatermark < 0.5" --min_original_size 256 [--num_shards N --shard_index i] [--link_only]

Input: one JSON object per line, ``{"caption": "...", "image": "val2014/x.jpg", ...}``; the image path
is relative to the jsonl's folder (or absolute); a list of captions gives one record per caption.
Output (the PaddleMIX layout, line format in ``sd/data/formats.py``):

* ``<output_path>/laion400m_format_data/part-000001[.gz]``: ``caption \\t NONE \\t base64(image bytes)``
  per line, ``--per_part_file_num`` lines per file, the image bytes exactly as read from disk
  (unless ``--max_image_size``);
* ``<output_path>/filelist/<output_name>.filelist``: the part paths, the whole list ``--num_repeat``
  times, written as ``<output_path>/laion400m_format_data/part-...`` (relative to the folder this was
  run from, as PaddleMIX does; the loader also resolves them from the list's own folder);
* ``<output_path>/filelist/<output_name>.filelist.list``: the path of the ``.filelist``.

How it works: the main process reads the jsonl as a stream and hands chunks of raw lines to a
fixed pool of workers, at most a few chunks ahead. A worker parses, reads and fully decodes each
image (so a broken image is caught here, not in training), base64-encodes it and, for ``.gz`` output,
deflates each line on its own. The main process takes the results in input order and appends them
to the current part, so the output is byte-identical for any ``--num_workers``. Parts are written
as ``*.tmp`` and renamed when complete; the file lists are written last.

img2dataset input (``--input_path`` a folder written with ``--output_format webdataset``, ``parquet`` or
``files``, detected; ``sd/data/img2dataset.py`` reads it): the shards are streamed in name order (a tar
member by member, a parquet batch by batch), the image bytes are verified and copied unchanged, and
each shard gets its own parts, ``part-<shard>-000001[.gz]`` ...; samples without caption or image,
with a caption that is not UTF-8, failing ``--min_original_size``/``--where``, or truncated tars are
skipped and counted by reason with shard and key, beside img2dataset's own failures from its
``*_stats.json``. ``--num_shards N --shard_index i`` takes the i-th of N contiguous runs of shards:
its parts are the very files a single run writes for those shards, and the N ``.filelist``s
concatenated in index order are the single run's ``.filelist``. ``--link_only`` converts nothing and
lists the ``.tar``/``.parquet`` shards themselves, which training reads in place.

The img2dataset folder may be remote, ``s3://bucket/prefix`` or ``http(s)://host/folder/`` (listed and
read through ``sd/data/remote.py``): ``--link_only`` lists the shards' URLs, and conversion streams them;
retried reads are counted in the summary, a shard that stays unreachable is skipped as ``unreachable_file``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import io
import json
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing import Pool
from typing import Counter, Dict, Iterable, Iterator, List, Optional, Tuple

from PIL import Image
from tqdm import tqdm

from sd.data import img2dataset as i2d
from sd.data import remote
from sd.data.formats import BadRecord, encode_part_line, write_filelists

PART_DIR = "laion400m_format_data"
CHUNK_LINES = 16  # jsonl lines per worker task: small, so ~400 KB images keep memory low
SHOW_LINES = 5  # offending jsonl line numbers (or shard:key) shown per skip reason
INPUT_FORMATS = ("auto", "jsonl", "img2dataset")
GZIP_LEVEL = 9  # PaddleMIX's level; base64 of JPEG gains ~1 % over level 1, and costs ~1.3x the time
# Exceptions PIL raises for bytes that are not a usable image (truncated, corrupt, unknown format).
# UnidentifiedImageError is an OSError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        super().error(remote.redact(message))  # a URL's password or token never reaches the terminal


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input_path", required=True,
                   help="jsonl file (one JSON object per line), or an img2dataset output folder")
    p.add_argument("--input_format", choices=INPUT_FORMATS, default="auto",
                   help="auto: a folder is img2dataset output (webdataset, parquet or files), a file is jsonl")
    p.add_argument("--output_path", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--output_name", default="custom_dataset", help="name of the .filelist(.list) files")
    p.add_argument("--caption_key", default=None,
                   help="jsonl: JSON key of the caption (a string or a list of strings; default 'caption'); "
                        "img2dataset: a field of KEY.json / a parquet column (default: KEY.txt / 'caption')")
    p.add_argument("--image_key", default="image", help="JSON key of the image path (relative to the jsonl's folder)")
    p.add_argument("--per_part_file_num", type=int, default=1000, help="records per part file")
    p.add_argument("--save_gzip_file", action="store_true", help="gzip the part files (part-000001.gz)")
    p.add_argument("--num_repeat", type=int, default=1, help="times the list of parts is repeated in the .filelist")
    p.add_argument("--overwrite", action="store_true",
                   help=f"write into a non-empty output folder, replacing its {PART_DIR}/ and filelist/")
    p.add_argument("--num_workers", type=int, default=usable_cores(),
                   help="worker processes (default: the number of usable cores); 1 = no pool")
    p.add_argument("--max_image_size", type=int, default=None,
                   help="re-encode images whose shorter side exceeds N pixels to JPEG with shorter side N "
                        "(smaller data, faster training decode); default: off, images are copied unchanged")
    p.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality 1-100 for --max_image_size")
    g = p.add_argument_group("img2dataset input")
    g.add_argument("--min_original_size", type=int, default=0,
                   help="skip samples whose original_width or original_height is below N pixels (counted as filtered)")
    g.add_argument("--where", action="append", default=[], metavar="'COLUMN OP NUMBER'",
                   help="keep samples whose numeric metadata passes, e.g. --where 'pwatermark < 0.5' --where "
                        "'aesthetic >= 5' (OP: < <= > >= == !=; others counted as filtered); repeatable")
    g.add_argument("--link_only", action="store_true",
                   help="write only the .filelist/.filelist.list naming the .tar/.parquet shards "
                        "(train on them in place)")
    g.add_argument("--num_shards", type=int, default=1, help="split the input shards over N machines (runs)")
    g.add_argument("--shard_index", type=int, default=0, help="which of the --num_shards runs this is, 0..N-1")
    args = p.parse_args(argv)
    args.output_path = os.path.normpath(args.output_path)  # "./x" is listed as "x", as PaddleMIX does
    for name in ("per_part_file_num", "num_repeat", "num_workers", "max_image_size", "num_shards"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be at least 1, got {value}")
    if not 1 <= args.jpeg_quality <= 100:
        p.error(f"--jpeg_quality must be in 1..100, got {args.jpeg_quality}")
    far = remote.is_remote(args.input_path)
    if far:
        if args.input_format == "jsonl":
            p.error(f"--input_path {args.input_path}: a remote input must be an img2dataset output folder (webdataset "
                    "or parquet shards); copy a jsonl and its images to local disk")
        args.input_format = "img2dataset"
    elif not os.path.exists(args.input_path):
        p.error(f"--input_path {args.input_path}: no such file")
    if args.input_format == "auto":
        args.input_format = "img2dataset" if os.path.isdir(args.input_path) else "jsonl"
    if args.input_format == "jsonl":
        if not os.path.isfile(args.input_path):
            p.error(f"--input_path {args.input_path} is a folder, not a jsonl file (an img2dataset folder needs "
                    "--input_format img2dataset or auto)")
        for flag, value in (("--where", args.where), ("--min_original_size", args.min_original_size),
                            ("--link_only", args.link_only), ("--num_shards", args.num_shards != 1)):
            if value:
                p.error(f"{flag} applies to img2dataset input only; --input_path {args.input_path} is a jsonl file")
        args.caption_key = args.caption_key or "caption"
    else:
        try:
            args.shard_options = i2d.ShardOptions(args.caption_key, args.min_original_size,
                                                  tuple(i2d.Where.parse(w) for w in args.where))
            if not far and not os.path.isdir(args.input_path):
                raise ValueError(f"--input_path {args.input_path} is a file; img2dataset input is its output folder")
            args.format, args.shards = i2d.find_shards(args.input_path)
        except ValueError as err:
            p.error(str(err))
        except (FileNotFoundError, PermissionError, remote.RemoteUnreachable) as err:  # remote: listing failed
            p.error(f"--input_path {args.input_path}: cannot be listed ({err})")
        if args.min_original_size < 0:
            p.error(f"--min_original_size must be at least 0, got {args.min_original_size}")
        if not 0 <= args.shard_index < args.num_shards:
            p.error(f"--shard_index must be in 0..{args.num_shards - 1} (--num_shards {args.num_shards}), "
                    f"got {args.shard_index}")
        if args.num_shards > len(args.shards):
            p.error(f"--num_shards {args.num_shards} exceeds the {len(args.shards)} shards of {args.input_path}")
        if args.link_only and args.format == "files":
            p.error(f"--link_only needs .tar or .parquet shards; {args.input_path} is a 'files' folder: "
                    "convert it (drop --link_only)")
        if args.link_only and (args.where or args.min_original_size or args.caption_key or args.max_image_size):
            p.error("--link_only converts nothing, so --where, --min_original_size, --caption_key and "
                    "--max_image_size cannot apply; drop them or drop --link_only")
    if os.path.exists(args.output_path) and not os.path.isdir(args.output_path):
        p.error(f"--output_path {args.output_path} is a file, not a folder")
    return args


# ---------------------------------------------------------------------------------------------
# Worker: jsonl lines → packed records
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    root: str  # the jsonl's folder: relative image paths start here
    caption_key: str
    image_key: str
    gzip: bool
    max_image_size: Optional[int]
    jpeg_quality: int
    shard_options: Optional[i2d.ShardOptions] = None  # img2dataset input: caption source and filters


# One part-file line, ready to append: (data, crc32 of the line, length of the line), where data is
# the line itself, or for .gz output the line deflated on its own (see PartWriter).
Packed = Tuple[bytes, int, int]


@dataclass
class ChunkResult:
    records: List[Packed] = field(default_factory=list)  # in input order
    skipped: List[Tuple[object, str]] = field(default_factory=list)  # (jsonl line number or shard:key, reason)
    keys: Counter = field(default_factory=collections.Counter)  # keys of the JSON objects seen
    shard: int = 0  # img2dataset input: index of the shard the chunk belongs to


class Skip(ValueError):
    """A jsonl record that is not packed; the message is the reason counted in the summary."""


def load_object(raw: bytes) -> dict:
    """One raw jsonl line → its JSON object. Raises Skip."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Skip("line is not UTF-8") from None
    except json.JSONDecodeError:
        raise Skip("corrupt JSON") from None
    if not isinstance(rec, dict):
        raise Skip("not a JSON object")
    return rec


def record_fields(rec: dict, opts: Options) -> Tuple[List[str], str]:
    """A JSON record → (captions, image path). Raises Skip."""
    if opts.caption_key not in rec:
        raise Skip(f"no '{opts.caption_key}' key")
    if opts.image_key not in rec:
        raise Skip(f"no '{opts.image_key}' key")
    captions, path = rec[opts.caption_key], rec[opts.image_key]
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise Skip(f"'{opts.caption_key}' is not a string or a non-empty list of strings")
    if not isinstance(path, str) or not path:
        raise Skip(f"'{opts.image_key}' is not a path")
    return captions, os.path.join(opts.root, path)  # join keeps an absolute path as it is


def read_image(path: str, opts: Options) -> bytes:
    """The image file's bytes, verified by a full decode (re-encoded if --max_image_size asks).

    Raises Skip for a missing, unreadable or undecodable file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise Skip("image file missing") from None
    except OSError:
        raise Skip("image file unreadable") from None
    return verify_image(data, opts)


def verify_image(data: bytes, opts: Options) -> bytes:
    """Image bytes, verified by a full decode; unchanged unless --max_image_size re-encodes them.

    Raises Skip for bytes that do not decode, or decode to more pixels than PIL allows.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: a truncated file fails here, not in training
            if opts.max_image_size is not None and min(im.size) > opts.max_image_size:
                scale = opts.max_image_size / min(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                out = io.BytesIO()
                im.convert("RGB").resize(size, Image.LANCZOS).save(out, "JPEG", quality=opts.jpeg_quality)
                data = out.getvalue()
    except Image.DecompressionBombError:  # training would refuse it too
        raise Skip("image too large (over PIL's decompression-bomb limit)") from None
    except DECODE_ERRORS:
        raise Skip("image does not decode") from None
    return data


def pack_line(line: bytes, gzip_output: bool) -> Packed:
    """One encoded part-file line → what PartWriter appends (deflated on its own for .gz)."""
    if not gzip_output:
        return line, 0, len(line)
    deflate = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, no header
    # Z_SYNC_FLUSH ends on a byte boundary without marking the last block, so such pieces can be
    # concatenated into one deflate stream (as pigz does).
    return deflate.compress(line) + deflate.flush(zlib.Z_SYNC_FLUSH), zlib.crc32(line), len(line)


def pack_chunk(chunk: List[Tuple[int, bytes]], opts: Options) -> ChunkResult:
    """Worker task: numbered raw jsonl lines → packed records, skips and keys seen."""
    out = ChunkResult()
    for line_no, raw in chunk:
        try:
            rec = load_object(raw)
            out.keys.update(rec.keys())
            captions, path = record_fields(rec, opts)
            image = read_image(path, opts)
        except Skip as err:
            out.skipped.append((line_no, str(err)))
            continue
        out.records.extend(pack_line(encode_part_line(c, image).encode("utf-8"), opts.gzip) for c in captions)
    return out


def pack_samples(chunk: Tuple[int, List[i2d.Sample]], opts: Options) -> ChunkResult:
    """Worker task: img2dataset samples of one shard → packed records and skips (reasons as the dataset's)."""
    shard, samples = chunk
    out = ChunkResult(shard=shard)
    for sample in samples:
        try:
            caption, image = i2d.decode_sample(sample, options=opts.shard_options)
            image = verify_image(image, opts)
        except BadRecord as err:
            out.skipped.append((f"{os.path.basename(remote.redact(sample.shard))}:{sample.key}", err.reason))
            continue
        except Skip as err:
            reason = "bad_image" if str(err) == "image does not decode" else "image_too_large"
            out.skipped.append((f"{os.path.basename(remote.redact(sample.shard))}:{sample.key}", reason))
            continue
        out.records.append(pack_line(encode_part_line(caption, image).encode("utf-8"), opts.gzip))
    return out


# ---------------------------------------------------------------------------------------------
# Part files
# ---------------------------------------------------------------------------------------------
# gzip header: deflate, no flags (so no file name), mtime 0, "max compression", OS unknown; the
# same bytes Python's gzip module writes for mtime=0, level 9. Fixed, so same input → same file.
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
DEFLATE_END = b"\x03\x00"  # an empty final block (fixed Huffman): closes the concatenated stream
_CRC_POLY = 0xEDB88320  # CRC-32 polynomial, bit-reversed


def _crc_mulmod(a: int, b: int) -> int:
    """a·b modulo the CRC-32 polynomial over GF(2), in CRC-32's reflected bit order."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1
    return product


_X_POW_2N = [1 << 30]  # x^(2^n) mod poly for n = 0, 1, ...: x^1 is 1 << 30 when reflected
for _ in range(63):
    _X_POW_2N.append(_crc_mulmod(_X_POW_2N[-1], _X_POW_2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32(a + b) from crc1 = crc32(a), crc2 = crc32(b), len2 = len(b) (zlib's crc32_combine).

    Appending len2 bytes multiplies a's CRC by x^(8·len2) modulo the polynomial.
    """
    shift, n, k = 1 << 31, len2, 3  # shift = x^0; x^(8·len2) = product of x^(2^k) over the bits of len2·8
    while n:
        if n & 1:
            shift = _crc_mulmod(_X_POW_2N[k], shift)
        n >>= 1
        k += 1
    return _crc_mulmod(shift, crc1) ^ crc2


class PartWriter:
    """Appends packed records to ``part-000001[.gz]``, ... in ``folder``, ``per_part`` per file.

    Each part is written as ``<name>.tmp`` and renamed when complete, so a part file that exists
    is always whole. For ``.gz``, the file is one gzip member: header, the records' deflate pieces,
    an end block, and the CRC-32 and length of all the lines (readable by any gzip reader).
    """

    def __init__(self, folder: str, per_part: int, gzip_output: bool, prefix: str = "part-"):
        self.folder, self.per_part, self.gzip_output, self.prefix = folder, per_part, gzip_output, prefix
        self.paths: List[str] = []  # completed parts, in order
        self._file = None

    def write(self, packed: Packed) -> None:
        data, crc, size = packed
        if self._file is None:
            name = f"{self.prefix}{len(self.paths) + 1:06d}" + (".gz" if self.gzip_output else "")
            self._path = os.path.join(self.folder, name)
            self._file = open(self._path + ".tmp", "wb")
            self._file.write(GZIP_HEADER if self.gzip_output else b"")
            self._count, self._crc, self._size = 0, 0, 0
        self._file.write(data)
        if self.gzip_output:
            self._crc, self._size = crc32_combine(self._crc, crc, size), self._size + size
        self._count += 1
        if self._count == self.per_part:
            self.close()

    def close(self) -> None:
        """Finish the current part (if any) and rename it into place."""
        if self._file is None:
            return
        if self.gzip_output:
            self._file.write(DEFLATE_END + struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before it gets its final name
        self._file.close()
        os.replace(self._path + ".tmp", self._path)
        self.paths.append(self._path)
        self._file = None

    def abort(self) -> None:
        """Delete the unfinished part (after an error or Ctrl-C)."""
        if self._file is not None:
            self._file.close()
            os.remove(self._path + ".tmp")
            self._file = None


# ---------------------------------------------------------------------------------------------
# Main process
# ---------------------------------------------------------------------------------------------
def read_chunks(path: str, lines_per_chunk: int) -> Iterator[List[Tuple[int, bytes]]]:
    """Stream the jsonl as chunks of (line number, raw line); blank lines are left out."""
    chunk = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            if raw.strip():
                chunk.append((line_no, raw))
                if len(chunk) == lines_per_chunk:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def ordered_map(fn, items: Iterable, num_workers: int, max_pending: int) -> Iterator:
    """``map(fn, items)`` on ``num_workers`` processes, in input order, at most ``max_pending`` ahead.

    (``Pool.imap`` would read ``items`` to the end at once: a 10-million-line jsonl in memory.)
    """
    if num_workers == 1:
        yield from map(fn, items)
        return
    with Pool(num_workers) as pool:  # leaving the block (also on error) terminates the workers
        pending = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_output(output_path: str, overwrite: bool) -> None:
    if os.path.isdir(output_path) and os.listdir(output_path):
        if not overwrite:
            raise SystemExit(f"error: output folder {output_path} is not empty; pass --overwrite to replace its "
                             f"{PART_DIR}/ and filelist/, or choose another --output_path")
        for sub in (PART_DIR, "filelist"):
            shutil.rmtree(os.path.join(output_path, sub), ignore_errors=True)
    os.makedirs(os.path.join(output_path, PART_DIR), exist_ok=True)


def nothing_written_error(args, lines: int, keys: Counter) -> str:
    """The one-line reason why no record was written."""
    if lines == 0:
        return f"{args.input_path} has no records (it is empty or blank)"
    for flag, key in (("--caption_key", args.caption_key), ("--image_key", args.image_key)):
        if keys and key not in keys:
            return f"no record has key '{key}' ({flag}); keys seen: {', '.join(k for k, _ in keys.most_common(10))}"
    return f"all {lines} records of {args.input_path} were skipped (reasons above)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.input_format == "img2dataset":
        return convert_img2dataset(args)
    prepare_output(args.output_path, args.overwrite)
    opts = Options(os.path.dirname(os.path.abspath(args.input_path)), args.caption_key, args.image_key,
                   args.save_gzip_file, args.max_image_size, args.jpeg_quality)
    writer = PartWriter(os.path.join(args.output_path, PART_DIR), args.per_part_file_num, args.save_gzip_file)
    skip_count: Counter = collections.Counter()  # reason → records skipped
    skip_lines: Dict[str, List[int]] = collections.defaultdict(list)  # reason → first SHOW_LINES line numbers
    keys: Counter = collections.Counter()
    lines = written = 0

    def counted(chunks):
        nonlocal lines
        for chunk in chunks:
            lines += len(chunk)
            yield chunk

    start = time.time()
    bar = tqdm(desc="packing", unit=" images", dynamic_ncols=True, mininterval=1.0)
    chunks = counted(read_chunks(args.input_path, CHUNK_LINES))
    # A window of 2 chunks per worker keeps every worker busy while the main process writes.
    results = ordered_map(functools.partial(pack_chunk, opts=opts), chunks, args.num_workers,
                          max_pending=2 * args.num_workers + 2)
    try:
        for result in results:
            for packed in result.records:
                writer.write(packed)
            for line_no, reason in result.skipped:
                skip_count[reason] += 1
                if len(skip_lines[reason]) < SHOW_LINES:
                    skip_lines[reason].append(line_no)
            keys.update(result.keys)
            written += len(result.records)
            bar.update(len(result.records))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()  # stops the pool's workers now, also on error
        bar.close()
    elapsed = time.time() - start

    print(f"jsonl records read: {lines}")
    print(f"records written:    {written} (one per caption) in {len(writer.paths)} part file(s), "
          f"{written / max(elapsed, 1e-9):.1f} images/s")
    print(f"records skipped:    {sum(skip_count.values())}")
    for reason, count in skip_count.most_common():
        more = ", ..." if count > SHOW_LINES else ""
        print(f"  {reason}: {count} (jsonl line {', '.join(map(str, skip_lines[reason]))}{more})")
    if written == 0:
        os.rmdir(writer.folder)  # empty: a corrected re-run then needs no --overwrite
        print(f"error: nothing was written: {nothing_written_error(args, lines, keys)}", file=sys.stderr)
        return 1
    _, filelist_list = write_filelists(args.output_path, args.output_name, writer.paths, args.num_repeat)
    print(f"file list for training: {filelist_list}")
    return 0


# ---------------------------------------------------------------------------------------------
# img2dataset input
# ---------------------------------------------------------------------------------------------
def my_shards(shards: List[str], num_shards: int, shard_index: int) -> List[str]:
    """The shard_index-th of num_shards contiguous runs of ``shards`` (sizes differ by at most one)."""
    n = len(shards)
    return shards[shard_index * n // num_shards:(shard_index + 1) * n // num_shards]


def shard_stem(shard: str) -> str:
    """``.../00003.tar`` → ``00003``: the name part files of this shard carry."""
    return os.path.basename(shard.rstrip("/")).split(".")[0]


def list_name(args) -> str:
    """The .filelist name of this run: ``<output_name>`` or, split, ``<output_name>-i-of-N``."""
    if args.num_shards == 1:
        return args.output_name
    return f"{args.output_name}-{args.shard_index:05d}-of-{args.num_shards:05d}"


def prepare_split_output(args, shards: List[str]) -> None:
    """Split runs may share one output folder: only this run's own files count as taken (or are replaced)."""
    folder = os.path.join(args.output_path, PART_DIR)
    os.makedirs(folder, exist_ok=True)
    prefixes = tuple(f"part-{shard_stem(s)}-" for s in shards)
    mine = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefixes)]
    listing = os.path.join(args.output_path, "filelist", list_name(args) + ".filelist")
    mine += [p for p in (listing, listing + ".list") if os.path.exists(p)]
    if mine and not args.overwrite:
        raise SystemExit(f"error: {len(mine)} output file(s) of shard_index {args.shard_index} already exist in "
                         f"{args.output_path} (e.g. {mine[0]}); pass --overwrite to replace them")
    for path in mine:
        os.remove(path)


def sample_chunks(shards: List[str], file_skips: List[Tuple[str, str]], counts: Counter):
    """(shard index, CHUNK_LINES samples) in shard order; a truncated or unreachable shard is noted in
    ``file_skips``, the retried reads of remote shards are counted in ``counts`` (``retry_*``)."""
    for index, shard in enumerate(shards):
        chunk = []
        samples = i2d.iter_shard(shard)
        if remote.is_remote(shard):
            samples = remote.counting_retries(samples, counts)
        try:
            for sample in samples:
                counts["samples"] += 1
                chunk.append(sample)
                if len(chunk) == CHUNK_LINES:
                    yield index, chunk
                    chunk = []
        except remote.RemoteUnreachable as err:
            file_skips.append((remote.redact(err), "unreachable_file"))
        except (EOFError, OSError) as err:
            file_skips.append((remote.redact(err), "truncated_file"))
        if chunk:
            yield index, chunk


def print_stats(args, shards: List[str]) -> i2d.Stats:
    stats = i2d.read_stats(shards)
    split = f"; this run: shard_index {args.shard_index} of {args.num_shards}" if args.num_shards > 1 else ""
    print(f"img2dataset folder: {remote.redact(args.input_path)} ({args.format}, {len(shards)} of "
          f"{len(args.shards)} shards{split})")
    failed = ", ".join(f"{r}: {n}" for r, n in sorted(stats.failures.items(), key=lambda x: -x[1])) or "none"
    print(f"img2dataset stats:  {stats.count} URLs, {stats.successes} downloaded, "
          f"{stats.count - stats.successes} failed ({failed})"
          + (f"; {stats.missing} shard(s) without *_stats.json" if stats.missing else ""))
    return stats


def convert_img2dataset(args) -> int:
    """img2dataset output → part files and file lists (or, --link_only, file lists of the shards)."""
    shards = my_shards(args.shards, args.num_shards, args.shard_index)
    stats = print_stats(args, shards)
    if args.link_only:
        if args.num_shards == 1:
            prepare_output(args.output_path, args.overwrite)
        else:
            prepare_split_output(args, shards)
        os.rmdir(os.path.join(args.output_path, PART_DIR))
        _, filelist_list = write_filelists(args.output_path, list_name(args), shards, args.num_repeat)
        print(f"shards listed:      {len(shards)} (converted nothing; training reads them in place)")
        print(f"file list for training: {filelist_list}")
        return 0
    if args.num_shards == 1:
        prepare_output(args.output_path, args.overwrite)
    else:
        prepare_split_output(args, shards)
    opts = Options("", args.caption_key, "", args.save_gzip_file, args.max_image_size, args.jpeg_quality,
                   args.shard_options)
    folder = os.path.join(args.output_path, PART_DIR)
    skip_count: Counter = collections.Counter()
    skip_where: Dict[str, List[str]] = collections.defaultdict(list)  # reason → first SHOW_LINES shard:key
    file_skips: List[Tuple[str, str]] = []
    counts: Counter = collections.Counter()
    part_paths: List[str] = []
    written, writer, current = 0, None, None

    def note(where: str, reason: str) -> None:
        skip_count[reason] += 1
        if len(skip_where[reason]) < SHOW_LINES:
            skip_where[reason].append(where)

    start = time.time()
    bar = tqdm(desc="packing", unit=" images", dynamic_ncols=True, mininterval=1.0)
    results = ordered_map(functools.partial(pack_samples, opts=opts), sample_chunks(shards, file_skips, counts),
                          args.num_workers, max_pending=2 * args.num_workers + 2)
    try:
        for result in results:
            if result.shard != current:  # a new shard: its own parts
                if writer is not None:
                    writer.close()
                    part_paths += writer.paths
                current = result.shard
                writer = PartWriter(folder, args.per_part_file_num, args.save_gzip_file,
                                    prefix=f"part-{shard_stem(shards[current])}-")
            for packed in result.records:
                writer.write(packed)
            for where, reason in result.skipped:
                note(where, reason)
            written += len(result.records)
            bar.update(len(result.records))
        if writer is not None:
            writer.close()
            part_paths += writer.paths
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        results.close()
        bar.close()
    elapsed = time.time() - start
    for where, reason in file_skips:
        note(where, reason)

    print(f"samples read:       {counts['samples']}")
    print(f"records written:    {written} in {len(part_paths)} part file(s), "
          f"{written / max(elapsed, 1e-9):.1f} images/s")
    print(f"records skipped:    {sum(skip_count.values())}"
          + (f" (filters: {args.shard_options.describe_filters()})" if skip_count["filtered"] else ""))
    for reason, count in skip_count.most_common():
        more = ", ..." if count > SHOW_LINES else ""
        print(f"  {reason}: {count} ({', '.join(skip_where[reason])}{more})")
    retries = {r: counts[r] for r in remote.RETRY_REASONS if counts[r]}
    if retries:
        print(f"remote reads retried: {sum(retries.values())} ({', '.join(f'{r}: {n}' for r, n in retries.items())})")
    # img2dataset's rows: webdataset/files hold its successes, parquet every URL it tried.
    expected = stats.count if args.format == "parquet" else stats.successes
    if stats.missing == 0 and counts["samples"] != expected:
        print(f"warning: read {counts['samples']} samples, img2dataset's stats say {expected} "
              f"({'URLs' if args.format == 'parquet' else 'successes'}); see the skips above", file=sys.stderr)
    if written == 0:
        print(f"error: nothing was written: all {counts['samples']} samples of {remote.redact(args.input_path)} "
              "were skipped "
              "(reasons above)", file=sys.stderr)
        return 1
    _, filelist_list = write_filelists(args.output_path, list_name(args), part_paths, args.num_repeat)
    print(f"file list for training: {filelist_list}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
