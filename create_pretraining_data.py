"""Pack a coco_karpathy-style jsonl + images into the part files that training streams.

    python create_pretraining_data.py --input_path ./coco_data/coco_data.jsonl \\
        --output_path ./processed_data --per_part_file_num 1000 --num_repeat 100 --save_gzip_file

Writes ``<output_path>/laion400m_format_data/part-000001[.gz] ...`` (one ``caption \\t NONE \\t
base64(image)`` line per record, see ``sd/data_format.py``) and ``<output_path>/filelist/
<output_name>.filelist(.list)``. Image paths in the jsonl are relative to the jsonl's folder.
Bad records are skipped, counted and reported; nothing half-written is ever listed.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import os
import shutil
import sys
import time
from multiprocessing import Pool
from typing import Dict, Iterator, List, Optional, Tuple

from PIL import Image, UnidentifiedImageError

from sd.data_format import encode_part_line, write_filelists

PART_DIR = "laion400m_format_data"
SHOW_LINES = 5  # offending jsonl line numbers shown per skip reason


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pack a jsonl of captions + image paths into part files.")
    p.add_argument("--input_path", required=True, help="jsonl file, one JSON object per line")
    p.add_argument("--output_path", required=True, help="output folder")
    p.add_argument("--output_name", default="custom_dataset", help="name of the .filelist(.list) files")
    p.add_argument("--caption_key", default="caption", help="JSON key of the caption (a string or a list of strings)")
    p.add_argument("--image_key", default="image", help="JSON key of the image path, relative to the jsonl's folder")
    p.add_argument("--per_part_file_num", type=int, default=1000, help="records per part file")
    p.add_argument("--save_gzip_file", action="store_true", help="gzip the part files (part-000001.gz)")
    p.add_argument("--num_repeat", type=int, default=1, help="times the part list is repeated in the .filelist")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty output folder")
    p.add_argument("--num_workers", type=int, default=os.cpu_count() or 1, help="processes reading images")
    p.add_argument("--max_image_size", type=int, default=None,
                   help="re-encode images whose shorter side exceeds N pixels down to N (JPEG); off by default")
    p.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality for --max_image_size")
    args = p.parse_args(argv)
    args.output_path = os.path.normpath(args.output_path)  # "./x" is listed as "x", as PaddleMIX does
    if args.per_part_file_num < 1 or args.num_repeat < 1 or args.num_workers < 1:
        p.error("--per_part_file_num, --num_repeat and --num_workers must be ≥ 1")
    if args.max_image_size is not None and args.max_image_size < 1:
        p.error("--max_image_size must be ≥ 1")
    return args


# ---------------------------------------------------------------------------------------------
# Reading records (main process) and images (workers)
# ---------------------------------------------------------------------------------------------
Task = Tuple[int, str, str]  # (jsonl line number, caption, image path)
Skip = Tuple[int, str]  # (jsonl line number, reason)


def iter_tasks(jsonl: str, caption_key: str, image_key: str) -> Iterator[Tuple[Optional[Task], Optional[Skip], Dict]]:
    """Stream the jsonl; yield (task, None, record) or (None, skip, record) per caption/line."""
    root = os.path.dirname(os.path.abspath(jsonl))
    with open(jsonl, "r", encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                yield None, (line_no, "corrupt JSON"), {}
                continue
            if not isinstance(rec, dict):
                yield None, (line_no, "not a JSON object"), {}
                continue
            cap, img = rec.get(caption_key), rec.get(image_key)
            if cap is None:
                yield None, (line_no, f"no '{caption_key}' key"), rec
                continue
            if not isinstance(img, str) or not img:
                yield None, (line_no, f"no '{image_key}' key" if img is None else f"'{image_key}' is not a path"), rec
                continue
            captions = cap if isinstance(cap, list) else [cap]
            if not captions or not all(isinstance(c, str) for c in captions):
                yield None, (line_no, f"'{caption_key}' is not a string or list of strings"), rec
                continue
            path = img if os.path.isabs(img) else os.path.join(root, img)
            for c in captions:
                yield (line_no, c, path), None, rec


def load_image(task: Task, max_image_size: Optional[int], jpeg_quality: int):
    """Worker: read and verify one image. Returns (line_no, caption, bytes) or (line_no, reason)."""
    line_no, caption, path = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return line_no, "image file missing"
    except OSError:
        return line_no, "image file unreadable"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # full decode: a truncated file fails here, not in training
            if max_image_size is not None and min(im.size) > max_image_size:
                scale = max_image_size / min(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                out = io.BytesIO()
                im.convert("RGB").resize(size, Image.LANCZOS).save(out, "JPEG", quality=jpeg_quality)
                data = out.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return line_no, "image does not decode"
    return line_no, caption, data


def _load(args):
    return load_image(*args)


# ---------------------------------------------------------------------------------------------
# Writing part files atomically
# ---------------------------------------------------------------------------------------------
class PartWriter:
    """Writes part files under a temporary name and renames each when it is complete."""

    def __init__(self, folder: str, per_part: int, gzip_output: bool):
        self.folder, self.per_part, self.gzip_output = folder, per_part, gzip_output
        self.paths: List[str] = []  # final paths of completed parts
        self._f = None
        self._raw = None
        self._count = 0

    def _open(self):
        name = f"part-{len(self.paths) + 1:06d}" + (".gz" if self.gzip_output else "")
        self._final = os.path.join(self.folder, name)
        self._raw = open(self._final + ".tmp", "wb")
        # mtime=0 and no file name in the header: the same input gives byte-identical files.
        self._f = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=9, mtime=0) if self.gzip_output else self._raw

    def write(self, line: str):
        if self._f is None:
            self._open()
        self._f.write(line.encode("utf-8"))
        self._count += 1
        if self._count == self.per_part:
            self.close()

    def close(self):
        if self._f is None:
            return
        if self._f is not self._raw:
            self._f.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self._final + ".tmp", self._final)
        self.paths.append(self._final)
        self._f = self._raw = None
        self._count = 0


def prepare_output(output_path: str, overwrite: bool) -> None:
    if os.path.isdir(output_path) and os.listdir(output_path):
        if not overwrite:
            raise SystemExit(f"error: output folder {output_path} is not empty; pass --overwrite to replace its "
                             f"{PART_DIR}/ and filelist/, or choose another --output_path")
        for sub in (PART_DIR, "filelist"):
            shutil.rmtree(os.path.join(output_path, sub), ignore_errors=True)
    os.makedirs(os.path.join(output_path, PART_DIR), exist_ok=True)


def _batches(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(args.input_path):
        raise SystemExit(f"error: --input_path {args.input_path} does not exist")
    prepare_output(args.output_path, args.overwrite)
    from tqdm import tqdm

    writer = PartWriter(os.path.join(args.output_path, PART_DIR), args.per_part_file_num, args.save_gzip_file)
    skipped: Dict[str, List[int]] = collections.defaultdict(list)
    keys_seen: collections.Counter = collections.Counter()
    lines_read, last_line, written = 0, 0, 0
    window = 256 * args.num_workers  # bounded: never more than this many images in flight
    start = time.time()
    pool = Pool(args.num_workers) if args.num_workers > 1 else None
    try:
        bar = tqdm(desc="packing", unit="img", dynamic_ncols=True)
        for batch in _batches(iter_tasks(args.input_path, args.caption_key, args.image_key), window):
            tasks = []
            for task, skip, rec in batch:
                line_no = skip[0] if skip is not None else task[0]
                if line_no != last_line:  # a list caption yields several tasks from one line
                    lines_read, last_line = lines_read + 1, line_no
                    keys_seen.update(rec.keys())
                if skip is not None:
                    skipped[skip[1]].append(skip[0])
                else:
                    tasks.append((task, args.max_image_size, args.jpeg_quality))
            results = pool.map(_load, tasks, chunksize=16) if pool else [_load(t) for t in tasks]
            for res in results:
                if len(res) == 2:
                    skipped[res[1]].append(res[0])
                else:
                    writer.write(encode_part_line(res[1], res[2]))
                    written += 1
            bar.update(len(tasks))
        bar.close()
        writer.close()
    finally:
        if pool:
            pool.close()
            pool.join()

    elapsed = time.time() - start
    n_skipped = sum(len(v) for v in skipped.values())
    print(f"records read: {lines_read} jsonl lines; written: {written}; skipped: {n_skipped} "
          f"({written / max(elapsed, 1e-9):.1f} images/s)")
    for reason, lines in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
        more = " ..." if len(lines) > SHOW_LINES else ""
        print(f"  skipped {len(lines)}: {reason} (jsonl lines {', '.join(map(str, lines[:SHOW_LINES]))}{more})")
    if written == 0:
        hint = ""
        if any(r.startswith("no '") for r in skipped):
            hint = f"; keys seen in the jsonl: {', '.join(k for k, _ in keys_seen.most_common(10)) or 'none'}"
        print(f"error: nothing was written from {args.input_path}{hint}", file=sys.stderr)
        return 1
    filelist, filelist_list = write_filelists(args.output_path, args.output_name, writer.paths, args.num_repeat)
    print(f"wrote {len(writer.paths)} part file(s); file list: {filelist_list}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
