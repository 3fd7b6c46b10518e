"""create_pretraining_data.py: CLI, layout, bad records, safety, determinism, PaddleMIX compatibility."""

import base64
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import create_pretraining_data as cpd
from sd.data.formats import read_filelist, read_filelist_list
from tests.helpers.common import ROOT

SCRIPT = os.path.join(ROOT, "create_pretraining_data.py")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "paddlemix")  # written by PaddleMIX's own tool (its README)


def run(args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def part_bytes(path):
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.endswith(".gz") else data


def part_lines(path):
    return part_bytes(str(path)).decode("utf-8").splitlines()


def make_images(folder, n, size=(24, 16)):
    """n small distinct images (PNG and JPEG alternating) and a jsonl naming them; returns the records."""
    rng = np.random.default_rng(0)
    os.makedirs(folder / "imgs", exist_ok=True)
    records = []
    for i in range(n):
        name = f"imgs/{i:03d}." + ("png" if i % 2 else "jpg")
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name)
        records.append({"caption": f"image number {i}", "image": name, "image_id": i})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture
def data(tmp_path):
    make_images(tmp_path, 25)
    return tmp_path


def test_cli_has_paddlemix_flags_and_defaults(tmp_path):
    (tmp_path / "x.jsonl").write_text("")
    args = cpd.parse_args(["--input_path", str(tmp_path / "x.jsonl"), "--output_path", "./out"])
    assert (args.output_name, args.caption_key, args.image_key, args.per_part_file_num, args.save_gzip_file,
            args.num_repeat) == ("custom_dataset", "caption", "image", 1000, False, 1)
    assert (args.overwrite, args.max_image_size, args.num_workers) == (False, None, len(os.sched_getaffinity(0)))
    assert args.output_path == "out"
    for bad in (["--per_part_file_num", "0"], ["--num_repeat", "0"], ["--num_workers", "0"],
                ["--max_image_size", "0"], ["--jpeg_quality", "101"]):
        with pytest.raises(SystemExit):
            cpd.parse_args(["--input_path", str(tmp_path / "x.jsonl"), "--output_path", "out", *bad])
    r = run(["--input_path", "nope.jsonl", "--output_path", "out"], cwd=tmp_path)
    assert r.returncode == 2 and "--input_path nope.jsonl: no such file" in r.stderr


def test_paddlemix_command_layout_and_line_format(data):
    """PaddleMIX's command (gzip, repeats), from the data's parent folder; lines parse PaddleMIX's way."""
    r = run(["--input_path", "./data.jsonl", "--output_path", "./processed_data", "--per_part_file_num", "10",
             "--num_repeat", "3", "--save_gzip_file", "--num_workers", "2"], cwd=data)
    assert r.returncode == 0, r.stderr
    folder = data / "processed_data" / "laion400m_format_data"
    parts = sorted(os.listdir(folder))
    assert parts == ["part-000001.gz", "part-000002.gz", "part-000003.gz"]
    listed = (data / "processed_data" / "filelist" / "custom_dataset.filelist").read_text().split()
    assert listed == [f"processed_data/laion400m_format_data/{p}" for p in parts] * 3
    assert (data / "processed_data" / "filelist" / "custom_dataset.filelist.list").read_text().split() == \
        ["processed_data/filelist/custom_dataset.filelist"]
    records = [json.loads(line) for line in open(data / "data.jsonl")]
    lines = [line for p in parts for line in part_lines(folder / p)]
    assert [len(part_lines(folder / p)) for p in parts] == [10, 10, 5]
    for rec, line in zip(records, lines, strict=True):
        caption, _, img_b64 = line.split("\t")[:3]  # PaddleMIX's parser
        assert line.split("\t")[1] == "NONE"
        assert caption == rec["caption"]
        assert base64.b64decode(img_b64) == (data / rec["image"]).read_bytes()  # faithful: bytes unchanged
    assert "jsonl records read: 25" in r.stdout and "records written:    25" in r.stdout
    assert "records skipped:    0" in r.stdout and "images/s" in r.stderr  # tqdm's bar


def test_gzip_parts_are_single_standard_members(data):
    """Per-record deflate pieces joined into one gzip member: any reader gets every line, CRC checked."""
    assert run(["--input_path", "data.jsonl", "--output_path", "out", "--save_gzip_file",
                "--per_part_file_num", "100"], cwd=data).returncode == 0
    raw = (data / "out" / "laion400m_format_data" / "part-000001.gz").read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[3] == 0 and raw[4:8] == bytes(4)  # no file name, mtime 0
    one_member = zlib.decompressobj(wbits=31)  # reads one member only, and checks CRC and length
    text = one_member.decompress(raw)
    assert one_member.eof and one_member.unused_data == b""
    assert text == gzip.decompress(raw) and len(text.splitlines()) == 25
    if shutil.which("gzip"):
        assert subprocess.run(["gzip", "-t", "-"], input=raw, timeout=60).returncode == 0


def test_crc32_combine_matches_zlib():
    rng = np.random.default_rng(1)
    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 123457), (70000, 3)]:
        a, b = rng.bytes(n1), rng.bytes(n2)
        assert cpd.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_paths_resolve_from_run_folder_and_elsewhere(data, tmp_path_factory, monkeypatch):
    assert run(["--input_path", "data.jsonl", "--output_path", "out"], cwd=data).returncode == 0
    listing = str(data / "out" / "filelist" / "custom_dataset.filelist.list")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for cwd in (data, elsewhere, "/"):
        monkeypatch.chdir(cwd)
        (fl,) = read_filelist_list(listing)
        (part,) = read_filelist(fl.path)
        assert os.path.samefile(part.path, data / "out" / "laion400m_format_data" / "part-000001")


def test_every_kind_of_bad_record_is_skipped_counted_and_reported(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "good.png")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    lines = [
        "\ufeff" + json.dumps({"caption": "tab\there\r\nnew\nline", "image": "good.png"}),  # 1: kept, BOM
        "{not json",  # 2
        json.dumps({"image": "good.png"}),  # 3
        json.dumps({"caption": "x"}),  # 4
        json.dumps({"caption": "x", "image": "missing.png"}),  # 5
        json.dumps({"caption": "x", "image": "garbage.jpg"}),  # 6
        json.dumps({"caption": ["one", "two"], "image": str(tmp_path / "good.png")}),  # 7: 2 records, abs path
        json.dumps({"caption": 5, "image": "good.png"}),  # 8
        "",  # 9: blank, ignored
        json.dumps({"caption": "x", "image": "truncated.jpg"}),  # 10
        json.dumps({"caption": "x", "image": "empty.png"}),  # 11
        json.dumps({"caption": "x", "image": "folder.png"}),  # 12
        json.dumps([1, 2]),  # 13
        json.dumps({"caption": [], "image": "good.png"}),  # 14
        json.dumps({"caption": "x", "image": 7}),  # 15
        json.dumps({"caption": "x", "image": "missing2.png"}),  # 16..21: more missing files
        *[json.dumps({"caption": "x", "image": f"missing{i}.png"}) for i in range(3, 8)],
    ]
    raw = "\n".join(lines).encode("utf-8") + b"\n"
    raw += json.dumps({"caption": "caf", "image": "good.png"}).encode().replace(b"caf", b"caf\xe9") + b"\n"  # 22
    (tmp_path / "in.jsonl").write_bytes(raw)
    r = run(["--input_path", "in.jsonl", "--output_path", "out", "--num_workers", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = part_lines(tmp_path / "out" / "laion400m_format_data" / "part-000001")
    assert [line.split("\t")[0] for line in out] == ["tab here new line", "one", "two"]
    assert all(len(line.split("\t")) == 3 for line in out)
    good = (tmp_path / "good.png").read_bytes()
    assert all(base64.b64decode(line.split("\t")[2]) == good for line in out)
    assert "jsonl records read: 21\n" in r.stdout  # the blank line is not a record
    assert "records written:    3 " in r.stdout and "records skipped:    19\n" in r.stdout
    expected = {
        "image file missing: 7 (jsonl line 5, 16, 17, 18, 19, ...)",
        "image does not decode: 3 (jsonl line 6, 10, 11)",
        "corrupt JSON: 1 (jsonl line 2)",
        "no 'caption' key: 1 (jsonl line 3)",
        "no 'image' key: 1 (jsonl line 4)",
        "'caption' is not a string or a non-empty list of strings: 2 (jsonl line 8, 14)",
        "image file unreadable: 1 (jsonl line 12)",
        "not a JSON object: 1 (jsonl line 13)",
        "'image' is not a path: 1 (jsonl line 15)",
        "line is not UTF-8: 1 (jsonl line 22)",
    }
    reported = {line.strip() for line in r.stdout.splitlines() if line.startswith("  ")}
    assert reported == expected


@pytest.mark.parametrize("flags, message", [
    (["--image_key", "img"], "error: nothing was written: no record has key 'img' (--image_key); "
                             "keys seen: caption, image, image_id"),
    (["--caption_key", "text"], "no record has key 'text' (--caption_key); keys seen: caption, image, image_id"),
])
def test_nothing_written_is_a_one_line_error_naming_the_key(data, flags, message):
    r = run(["--input_path", "data.jsonl", "--output_path", "out", *flags], cwd=data)
    assert r.returncode == 1
    assert message in r.stderr.strip().splitlines()[-1]
    assert os.listdir(data / "out") == []
    assert run(["--input_path", "data.jsonl", "--output_path", "out"], cwd=data).returncode == 0  # no --overwrite


def test_nothing_written_empty_input_and_all_images_bad(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    r = run(["--input_path", "empty.jsonl", "--output_path", "out"], cwd=tmp_path)
    assert r.returncode == 1 and "empty.jsonl has no records" in r.stderr
    (tmp_path / "bad.jsonl").write_text(json.dumps({"caption": "a", "image": "nope.jpg"}) + "\n")
    r = run(["--input_path", "bad.jsonl", "--output_path", "out2"], cwd=tmp_path)
    assert r.returncode == 1 and "all 1 records of bad.jsonl were skipped" in r.stderr
    assert "image file missing: 1 (jsonl line 1)" in r.stdout
    (tmp_path / "junk.jsonl").write_text("{oops\n[1]\n")
    r = run(["--input_path", "junk.jsonl", "--output_path", "out3"], cwd=tmp_path)
    assert r.returncode == 1 and "all 2 records of junk.jsonl were skipped" in r.stderr


def test_refuses_non_empty_output_unless_overwrite_and_overwrite_clears_stale_parts(data):
    base = ["--input_path", "data.jsonl", "--output_path", "out"]
    assert run(base + ["--per_part_file_num", "10"], cwd=data).returncode == 0
    assert len(os.listdir(data / "out" / "laion400m_format_data")) == 3
    r = run(base, cwd=data)
    assert r.returncode != 0 and "is not empty; pass --overwrite" in r.stderr
    (data / "out" / "notes.txt").write_text("mine")
    assert run(base + ["--overwrite"], cwd=data).returncode == 0
    assert os.listdir(data / "out" / "laion400m_format_data") == ["part-000001"]  # no stale part-000002
    assert (data / "out" / "notes.txt").read_text() == "mine"
    (data / "afile").write_text("")
    r = run(["--input_path", "data.jsonl", "--output_path", "afile"], cwd=data)
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr


def test_part_appears_only_when_complete(tmp_path):
    writer = cpd.PartWriter(str(tmp_path), per_part=10, gzip_output=True)
    for i in range(13):
        writer.write(cpd.pack_line(f"c{i}\tNONE\tAAAA\n".encode(), gzip_output=True))
    assert sorted(os.listdir(tmp_path)) == ["part-000001.gz", "part-000002.gz.tmp"]
    writer.abort()
    assert sorted(os.listdir(tmp_path)) == ["part-000001.gz"]
    assert part_lines(tmp_path / "part-000001.gz") == [f"c{i}\tNONE\tAAAA" for i in range(10)]


def test_interrupted_run_leaves_whole_parts_and_no_file_list(data, monkeypatch):
    """Ctrl-C in the middle of part 2: part 1 is whole, part 2's temporary file is gone, nothing listed."""
    calls = []
    read_image = cpd.read_image

    def interrupting(path, opts):
        calls.append(path)
        if len(calls) == 20:  # in the second chunk of 16 lines, part 2 has 6 records
            raise KeyboardInterrupt
        return read_image(path, opts)

    monkeypatch.setattr(cpd, "read_image", interrupting)
    monkeypatch.chdir(data)
    with pytest.raises(KeyboardInterrupt):
        cpd.main(["--input_path", "data.jsonl", "--output_path", "out", "--per_part_file_num", "10",
                  "--save_gzip_file", "--num_workers", "1"])
    assert os.listdir(data / "out" / "laion400m_format_data") == ["part-000001.gz"]
    assert len(part_lines(data / "out" / "laion400m_format_data" / "part-000001.gz")) == 10
    assert not os.path.exists(data / "out" / "filelist")


@pytest.mark.parametrize("gz", [True, False])
def test_byte_identical_for_any_worker_count(data, gz):
    outs = []
    for i, workers in enumerate(("1", "2", "2")):
        out = f"out{i}"
        r = run(["--input_path", "data.jsonl", "--output_path", out, "--per_part_file_num", "7",
                 "--num_workers", workers] + (["--save_gzip_file"] if gz else []), cwd=data)
        assert r.returncode == 0, r.stderr
        d = data / out / "laion400m_format_data"
        outs.append({p: (d / p).read_bytes() for p in sorted(os.listdir(d))})
    assert len(outs[0]) == 4 and outs[0] == outs[1] == outs[2]


def _slow_identity(x):
    time.sleep(0.02 * (x % 3))  # later items often finish first
    return x


def test_ordered_map_keeps_order_and_reads_input_lazily():
    pulled = []

    def items():
        for i in range(40):
            pulled.append(i)
            yield i

    results = cpd.ordered_map(_slow_identity, items(), num_workers=2, max_pending=4)
    assert next(results) == 0
    assert len(pulled) <= 4  # bounded: the input is not read ahead of the window
    assert [0] + list(results) == list(range(40))
    assert list(cpd.ordered_map(_slow_identity, iter(range(5)), num_workers=1, max_pending=4)) == list(range(5))


def test_list_caption_records_fill_parts_across_a_boundary(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"caption": ["c1", "c2", "c3"], "image": "a.png"}) + "\n")
    r = run(["--input_path", "in.jsonl", "--output_path", "o", "--per_part_file_num", "2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "o" / "laion400m_format_data"
    assert [[line.split("\t")[0] for line in part_lines(folder / p)] for p in sorted(os.listdir(folder))] == \
        [["c1", "c2"], ["c3"]]


def test_max_image_size_reencodes_only_larger_images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.new("RGB", (20, 30)).save(tmp_path / "small.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"caption": "a", "image": "big.png"}) + "\n"
                                       + json.dumps({"caption": "b", "image": "small.png"}) + "\n")
    r = run(["--input_path", "in.jsonl", "--output_path", "out", "--max_image_size", "30", "--jpeg_quality", "80"],
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = part_lines(tmp_path / "out" / "laion400m_format_data" / "part-000001")
    imgs = [Image.open(io.BytesIO(base64.b64decode(line.split("\t")[2]))) for line in lines]
    assert imgs[0].format == "JPEG" and imgs[0].size == (45, 30)
    assert base64.b64decode(lines[1].split("\t")[2]) == (tmp_path / "small.png").read_bytes()  # untouched


def test_packs_the_demo_dataset(tmp_path):
    from sd.data import demo_data

    jsonl = demo_data.write_demo_jsonl(str(tmp_path / "demo"), num_images=6, size=32, seed=3)
    r = run(["--input_path", jsonl, "--output_path", str(tmp_path / "packed")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = part_lines(tmp_path / "packed" / "laion400m_format_data" / "part-000001")
    records = [json.loads(line) for line in open(jsonl)]
    assert [line.split("\t")[0] for line in lines] == [rec["caption"] for rec in records]


def test_same_output_as_paddlemix(tmp_path):
    """PaddleMIX's own run on its example: the same decompressed part-file text and the same listed paths.

    The .gz files themselves differ (PaddleMIX's gzip header holds a file name and mtime, and its deflate
    stream is cut differently), so the lines are compared after decompression, not the compressed bytes.
    """
    work = tmp_path / "pm"
    shutil.copytree(os.path.join(FIXTURE, "coco_data"), work / "coco_data")
    r = run(["--input_path", "./coco_data/coco_data.jsonl", "--output_path", "./processed_data",
             "--per_part_file_num", "1000", "--num_repeat", "3", "--save_gzip_file"], cwd=work)
    assert r.returncode == 0, r.stderr
    ref = os.path.join(FIXTURE, "processed_data")
    ours = work / "processed_data"
    assert os.listdir(ours / "laion400m_format_data") == os.listdir(os.path.join(ref, "laion400m_format_data"))
    assert part_bytes(str(ours / "laion400m_format_data" / "part-000001.gz")) == \
        part_bytes(os.path.join(ref, "laion400m_format_data", "part-000001.gz"))
    for name in ("custom_dataset.filelist", "custom_dataset.filelist.list"):
        with open(os.path.join(ref, "filelist", name)) as f:
            assert (ours / "filelist" / name).read_text().split() == f.read().split()


def test_paddlemix_example_command_works_unchanged(tmp_path):
    shutil.copytree(os.path.join(FIXTURE, "coco_data"), tmp_path / "coco_data")
    r = run(["--input_path", "./coco_data/coco_data.jsonl", "--output_path", "./processed_data", "--caption_key",
             "caption", "--image_key", "image", "--per_part_file_num", "1000", "--num_repeat", "100",
             "--save_gzip_file"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "processed_data")) == ["filelist", "laion400m_format_data"]
    assert sorted(os.listdir(tmp_path / "processed_data" / "filelist")) == \
        ["custom_dataset.filelist", "custom_dataset.filelist.list"]
    listed = (tmp_path / "processed_data" / "filelist" / "custom_dataset.filelist").read_text().splitlines()
    assert listed == ["processed_data/laion400m_format_data/part-000001.gz"] * 100


def test_image_over_pils_pixel_limit_is_skipped_with_its_own_reason(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (30, 30)).save(tmp_path / "huge.png")  # 900 px > 2 x the limit set below
    Image.new("RGB", (10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"caption": "a", "image": "huge.png"}) + "\n"
                                       + json.dumps({"caption": "b", "image": "ok.png"}) + "\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)
    monkeypatch.chdir(tmp_path)
    assert cpd.main(["--input_path", "in.jsonl", "--output_path", "out", "--num_workers", "1"]) == 0
    assert "image too large (over PIL's decompression-bomb limit): 1 (jsonl line 1)" in capsys.readouterr().out
    part = tmp_path / "out" / "laion400m_format_data" / "part-000001"
    assert [line.split("\t")[0] for line in part_lines(part)] == ["b"]
