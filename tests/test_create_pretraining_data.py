"""create_pretraining_data.py: layout, bad records, determinism, PaddleMIX compatibility."""

import base64
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd import demo_data
from sd.data_format import read_filelist, read_filelist_list

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "create_pretraining_data.py")
FIXTURE = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "paddlemix")


def run(args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True)


def read_lines(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read().splitlines()


@pytest.fixture
def demo(tmp_path):
    demo_data.write_demo_jsonl(str(tmp_path / "raw"), num_images=25, size=32, seed=3)
    return tmp_path


def test_layout_filelists_and_seed_line_format(demo):
    r = run(["--input_path", "raw/demo.jsonl", "--output_path", "./out", "--per_part_file_num", "10",
             "--num_repeat", "2", "--save_gzip_file", "--num_workers", "2"], cwd=demo)
    assert r.returncode == 0, r.stderr
    parts = sorted(os.listdir(demo / "out" / "laion400m_format_data"))
    assert parts == ["part-000001.gz", "part-000002.gz", "part-000003.gz"]
    listed = (demo / "out" / "filelist" / "custom_dataset.filelist").read_text().split()
    assert listed == [f"out/laion400m_format_data/{p}" for p in parts] * 2
    assert (demo / "out" / "filelist" / "custom_dataset.filelist.list").read_text().split() == ["out/filelist/custom_dataset.filelist"]
    records = [json.loads(l) for l in open(demo / "raw" / "demo.jsonl")]
    lines = [l for p in parts for l in read_lines(str(demo / "out" / "laion400m_format_data" / p))]
    assert len(lines) == 25
    for rec, line in zip(records, lines):
        caption, _, img_b64 = line.split("\t")[:3]  # the seed's parser
        assert caption == rec["caption"]
        assert base64.b64decode(img_b64) == (demo / "raw" / rec["image"]).read_bytes()


def test_paths_resolve_from_run_folder_and_elsewhere(demo, tmp_path, monkeypatch):
    assert run(["--input_path", "raw/demo.jsonl", "--output_path", "out"], cwd=demo).returncode == 0
    for cwd in (demo, tmp_path.parent):
        monkeypatch.chdir(cwd)
        (fl,) = read_filelist_list(str(demo / "out" / "filelist" / "custom_dataset.filelist.list"))
        (part,) = read_filelist(fl.path)
        assert os.path.samefile(part.path, demo / "out" / "laion400m_format_data" / "part-000001")


def test_bad_records_skipped_counted_and_reported(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    lines = [
        json.dumps({"caption": "tab\there\r\nnewline", "image": "good.png"}),  # 1: kept, normalised
        "{not json",  # 2
        json.dumps({"image": "good.png"}),  # 3: no caption
        json.dumps({"caption": "x"}),  # 4: no image
        json.dumps({"caption": "x", "image": "missing.png"}),  # 5
        json.dumps({"caption": "x", "image": "broken.jpg"}),  # 6
        json.dumps({"caption": ["one", "two"], "image": "good.png"}),  # 7: two records
        json.dumps({"caption": 5, "image": "good.png"}),  # 8: wrong type
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    r = run(["--input_path", "in.jsonl", "--output_path", "out", "--num_workers", "1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = read_lines(str(tmp_path / "out" / "laion400m_format_data" / "part-000001"))
    assert [l.split("\t")[0] for l in out] == ["tab here newline", "one", "two"]
    assert all(len(l.split("\t")) == 3 for l in out)
    assert "records read: 8 jsonl lines; written: 3; skipped: 6" in r.stdout
    for reason, line_no in [("corrupt JSON", 2), ("no 'caption' key", 3), ("no 'image' key", 4),
                            ("image file missing", 5), ("image does not decode", 6),
                            ("'caption' is not a string", 8)]:
        assert any(reason in l and f"jsonl lines {line_no}" in l for l in r.stdout.splitlines()), (reason, r.stdout)


def test_nothing_written_is_an_error_naming_the_key(demo):
    r = run(["--input_path", "raw/demo.jsonl", "--output_path", "out", "--image_key", "img"], cwd=demo)
    assert r.returncode != 0
    assert "nothing was written" in r.stderr and "keys seen in the jsonl: caption, image" in r.stderr
    assert not os.path.exists(demo / "out" / "filelist")


def test_refuses_non_empty_output_unless_overwrite(demo):
    args = ["--input_path", "raw/demo.jsonl", "--output_path", "out"]
    assert run(args, cwd=demo).returncode == 0
    r = run(args, cwd=demo)
    assert r.returncode != 0 and "--overwrite" in r.stderr
    assert run(args + ["--overwrite"], cwd=demo).returncode == 0


def test_interrupted_part_never_listed(demo, monkeypatch):
    """A part is renamed into place only when complete: a failure mid-part leaves only a .tmp."""
    import create_pretraining_data as cpd

    writer = cpd.PartWriter(str(demo), per_part=10, gzip_output=True)
    for i in range(13):
        writer.write(f"c{i}\tNONE\tAAAA\n")
    assert sorted(os.listdir(demo)) == ["part-000001.gz", "part-000002.gz.tmp", "raw"]
    writer.close()
    assert len(read_lines(str(demo / "part-000002.gz"))) == 3


def test_deterministic_across_worker_counts(demo):
    outs = []
    for workers in ("1", "2"):
        out = f"out{workers}"
        r = run(["--input_path", "raw/demo.jsonl", "--output_path", out, "--per_part_file_num", "7",
                 "--save_gzip_file", "--num_workers", workers], cwd=demo)
        assert r.returncode == 0, r.stderr
        d = demo / out / "laion400m_format_data"
        outs.append({p: (d / p).read_bytes() for p in sorted(os.listdir(d))})
    assert outs[0] == outs[1]


def test_max_image_size_reencodes_large_images(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    Image.new("RGB", (20, 30)).save(tmp_path / "small.png")
    (tmp_path / "in.jsonl").write_text(json.dumps({"caption": "a", "image": "big.png"}) + "\n"
                                       + json.dumps({"caption": "b", "image": "small.png"}) + "\n")
    r = run(["--input_path", "in.jsonl", "--output_path", "out", "--max_image_size", "30"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import io

    imgs = [Image.open(io.BytesIO(base64.b64decode(l.split("\t")[2])))
            for l in read_lines(str(tmp_path / "out" / "laion400m_format_data" / "part-000001"))]
    assert imgs[0].format == "JPEG" and imgs[0].size == (45, 30)
    assert imgs[1].format == "PNG" and imgs[1].size == (20, 30)  # not larger than N: untouched


@pytest.mark.skipif(not os.path.isdir(FIXTURE), reason="PaddleMIX fixtures not beside the repository")
def test_matches_paddlemix_output(tmp_path):
    work = tmp_path / "pm"
    shutil.copytree(os.path.join(FIXTURE, "coco_data"), work / "coco_data")
    r = run(["--input_path", "./coco_data/coco_data.jsonl", "--output_path", "./processed_data",
             "--per_part_file_num", "1000", "--num_repeat", "3", "--save_gzip_file"], cwd=work)
    assert r.returncode == 0, r.stderr
    ref = os.path.join(FIXTURE, "processed_data")
    ours = work / "processed_data"
    assert read_lines(str(ours / "laion400m_format_data" / "part-000001.gz")) == \
        read_lines(os.path.join(ref, "laion400m_format_data", "part-000001.gz"))
    for name in ("custom_dataset.filelist", "custom_dataset.filelist.list"):
        assert (ours / "filelist" / name).read_text().split() == open(os.path.join(ref, "filelist", name)).read().split()
