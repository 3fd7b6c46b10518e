"""img2dataset output, tested against img2dataset itself: its three formats read, converted, filtered, split.

A session fixture renders demo images, serves them from a loopback HTTP server (127.0.0.1 only), writes a
URL parquet (with two bad URLs: a 404 and a file that is not an image) and runs the real ``img2dataset``
CLI into webdataset, parquet and files folders. img2dataset lives in its own virtualenv (its
dependencies would disturb the pinned stack): ``IMG2DATASET`` names its CLI, else ``.venv-img2dataset``
in the repository (what ``.ci/run`` makes from requirements-img2dataset.txt), else ``img2dataset`` on
PATH; without one these tests skip and say so.
"""

import base64
import collections
import functools
import gzip
import http.server
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from sd.data import img2dataset as i2d
from sd.data.formats import BadRecord, read_filelist, read_filelist_list
from tests.helpers.common import ROOT

SCRIPT = os.path.join(ROOT, "create_pretraining_data.py")
PER_SHARD = 16  # img2dataset --number_sample_per_shard: 42 URLs → 3 shards
FORMATS = ("webdataset", "parquet", "files")


def img2dataset_cli():
    for candidate in (os.environ.get("IMG2DATASET"), os.path.join(ROOT, ".venv-img2dataset", "bin", "img2dataset"),
                      shutil.which("img2dataset")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def loopback_env():
    """The environment for img2dataset: no update checks, no wandb, no proxy between it and 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", WANDB_DISABLED="true", WANDB_SILENT="true",
               no_proxy="*", NO_PROXY="*")
    return env


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def urls(tmp_path_factory):
    """The served folder and URL parquet: 36 demo images at 64 px, 4 at 24 px, a 404 and a non-image.

    Metadata columns for the filters: aesthetic (0..9) and pwatermark (0..1) vary by row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sd.data import demo_data

    root = tmp_path_factory.mktemp("i2d")
    www = root / "www"
    www.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    prompts = demo_data.all_prompts()
    for i, (colour, shape, background, caption) in enumerate(prompts + prompts[:4]):
        size = 64 if i < len(prompts) else 24
        demo_data.render(colour, shape, background, size, rng).save(www / f"{i:03d}.png")
        rows.append(dict(url=f"{i:03d}.png", caption=caption, aesthetic=float(i % 10), pwatermark=(i % 7) / 6))
    (www / "not_an_image.png").write_bytes(b"<html>this is not an image</html>")
    rows.append(dict(url="missing.png", caption="gone", aesthetic=9.0, pwatermark=0.0))
    rows.append(dict(url="not_an_image.png", caption="text", aesthetic=9.0, pwatermark=0.0))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    for row in rows:
        row["url"] = base + row["url"]
    pq.write_table(pa.Table.from_pylist(rows), root / "urls.parquet")
    yield root, rows
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def outputs(urls):
    """{format: img2dataset output folder}, the three runs of the real CLI side by side (~20 s)."""
    cli = img2dataset_cli()
    if cli is None:
        pytest.skip("img2dataset is not installed (pip install -r requirements-img2dataset.txt into a virtualenv "
                    "and set IMG2DATASET to its bin/img2dataset, or let .ci/run make .venv-img2dataset)")
    root, _ = urls
    runs = {}
    for fmt in FORMATS:
        out = root / f"out_{fmt}"
        cmd = [cli, "--url_list", str(root / "urls.parquet"), "--input_format", "parquet", "--url_col", "url",
               "--caption_col", "caption", "--save_additional_columns", '["aesthetic","pwatermark"]',
               "--output_format", fmt, "--output_folder", str(out), "--image_size", "48", "--processes_count", "1",
               "--thread_count", "8", "--number_sample_per_shard", str(PER_SHARD), "--timeout", "5",
               "--enable_wandb", "False", "--retries", "0"]
        log = open(root / f"img2dataset_{fmt}.log", "w")
        runs[fmt] = (out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=loopback_env(), cwd=root),
                     log)
    folders = {}
    for fmt, (out, proc, log) in runs.items():
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
        assert proc.returncode == 0, (root / f"img2dataset_{fmt}.log").read_text()[-3000:]
        folders[fmt] = str(out)
    return folders


def convert(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def report(stdout):
    """The converter's summary: {"samples read": n, "records written": n, ..., reason: (n, [where])}."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^(samples read|records written|records skipped):\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
        m = re.match(r"^  (\w+): (\d+) \((.*)\)$", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), m.group(3).split(", "))
    return out


def part_records(output_path, filelist_list):
    """(caption, image bytes) of every line of every part listed, in list order."""
    (entry,) = read_filelist_list(filelist_list)
    records = []
    for part in read_filelist(entry.path):
        data = open(part.path, "rb").read()
        text = gzip.decompress(data) if part.path.endswith(".gz") else data
        for line in text.decode("utf-8").splitlines():
            caption, _, b64 = line.split("\t")
            records.append((caption, base64.b64decode(b64)))
    return records


def shard_samples(folder):
    fmt, shards = i2d.find_shards(folder)
    return fmt, shards, [s for shard in shards for s in i2d.iter_shard(shard)]


# ---------------------------------------------------------------------------------------------
# Reading img2dataset's own output
# ---------------------------------------------------------------------------------------------
def test_img2dataset_wrote_all_formats_and_counted_its_failures(outputs):
    for fmt, folder in outputs.items():
        found, shards = i2d.find_shards(folder)
        assert found == fmt and len(shards) == 3
        stats = i2d.read_stats(shards)
        assert (stats.shards, stats.count, stats.successes) == (3, 42, 40), fmt
        assert sum(stats.failures.values()) == 2 and any("404" in r for r in stats.failures), stats.failures


def test_readers_give_the_same_samples_in_every_format(outputs, urls):
    _, rows = urls
    caption_of_url = {r["url"]: r["caption"] for r in rows}
    by_format = {}
    for fmt, folder in outputs.items():
        _, shards, samples = shard_samples(folder)
        decoded = {}
        for s in samples:
            try:
                decoded[s.key] = i2d.decode_sample(s, options=i2d.ShardOptions())
            except BadRecord as err:
                assert fmt == "parquet" and err.reason == "not_downloaded", (fmt, s.key, err)
        counts = collections.Counter(s.image is not None for s in samples)
        stats = i2d.read_stats(shards)
        # webdataset and files hold img2dataset's successes, parquet every URL (failures without image)
        assert len(decoded) == stats.successes
        assert len(samples) == (stats.count if fmt == "parquet" else stats.successes)
        assert counts[False] == (2 if fmt == "parquet" else 0)
        for s in samples:
            meta = i2d._meta_dict(s) if s.image is not None else s.meta
            if s.image is not None:
                assert decoded[s.key][0] == caption_of_url[meta["url"]]
                assert Image.open(io.BytesIO(s.image)).size == (48, 48)
                assert meta["original_width"] in (64, 24)
        by_format[fmt] = decoded
    assert by_format["webdataset"] == by_format["files"] == by_format["parquet"]  # same keys, captions, bytes


def test_tar_is_streamed_never_extracted(outputs, monkeypatch):
    """The tar reader uses stream mode only: a seekable-mode open or an extraction would fail here."""
    def refuse(*args, **kwargs):
        raise AssertionError("tar extracted or opened in seekable mode")

    real_open = tarfile.open

    def stream_only(*args, mode="r", **kwargs):
        assert "|" in mode, mode
        return real_open(*args, mode=mode, **kwargs)

    monkeypatch.setattr(tarfile, "open", stream_only)
    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    monkeypatch.setattr(tarfile.TarFile, "extract", refuse)
    _, _, samples = shard_samples(outputs["webdataset"])
    assert len(samples) == 40


# ---------------------------------------------------------------------------------------------
# Converting to part files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_each_format_counts_equal_img2dataset_stats_and_bytes_unchanged(outputs, fmt, tmp_path):
    r = convert("--input_path", outputs[fmt], "--output_path", "out", "--per_part_file_num", "7", "--save_gzip_file",
                "--num_workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = report(r.stdout)
    stats = i2d.read_stats(i2d.find_shards(outputs[fmt])[1])
    assert "img2dataset stats:  42 URLs, 40 downloaded, 2 failed (" in r.stdout
    assert got["samples read"] == (stats.count if fmt == "parquet" else stats.successes)
    assert got["records written"] == stats.successes == 40
    assert got["records skipped"] == (2 if fmt == "parquet" else 0)
    if fmt == "parquet":
        assert got["not_downloaded"][0] == sum(stats.failures.values())
    assert "warning" not in r.stderr
    records = part_records(tmp_path / "out", tmp_path / "out" / "filelist" / "custom_dataset.filelist.list")
    _, _, samples = shard_samples(outputs[fmt])
    expected = [i2d.decode_sample(s, options=i2d.ShardOptions()) for s in samples if s.image is not None]
    assert records == expected  # shard order, the same captions and image bytes
    parts = sorted(os.listdir(tmp_path / "out" / "laion400m_format_data"))
    assert parts[:3] == ["part-00000-000001.gz", "part-00000-000002.gz", "part-00000-000003.gz"]  # 16 = 7+7+2
    assert len(parts) == 8  # shards of 16, 16 and 8 downloads


def test_filters_on_original_size_and_metadata_thresholds(outputs, tmp_path):
    folder = outputs["webdataset"]
    r = convert("--input_path", folder, "--output_path", "out", "--min_original_size", "32", "--where",
                "pwatermark < 0.5", "--where", "aesthetic >= 5", "--num_workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    _, _, samples = shard_samples(folder)
    metas = [json.loads(s.meta) for s in samples]
    keep = [m for m in metas if min(m["original_width"], m["original_height"]) >= 32 and m["pwatermark"] < 0.5
            and m["aesthetic"] >= 5]
    got = report(r.stdout)
    assert 0 < len(keep) < 40 and any(m["original_width"] == 24 and m["aesthetic"] >= 5 and m["pwatermark"] < 0.5
                                      for m in metas)  # the size filter has work of its own
    assert got["records written"] == len(keep) and got["filtered"][0] == 40 - len(keep)
    assert "(filters: original size >= 32, pwatermark < 0.5, aesthetic >= 5)" in r.stdout
    records = part_records(tmp_path / "out", tmp_path / "out" / "filelist" / "custom_dataset.filelist.list")
    assert sorted(c for c, _ in records) == sorted(m["caption"] for m in keep)
    # a caption from a .json field instead of the .txt
    r = convert("--input_path", folder, "--output_path", "url_caption", "--caption_key", "url", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    records = part_records(tmp_path, tmp_path / "url_caption" / "filelist" / "custom_dataset.filelist.list")
    assert all(c.startswith("http://127.0.0.1:") for c, _ in records) and len(records) == 40


@pytest.mark.parametrize("flags, message", [
    (["--where", "pwatermark ~ 3"], "--where 'pwatermark ~ 3': expected 'column OP number'"),
    (["--shard_index", "3", "--num_shards", "3"], "--shard_index must be in 0..2"),
    (["--num_shards", "4"], "--num_shards 4 exceeds the 3 shards"),
    (["--input_format", "jsonl"], "is a folder, not a jsonl file"),
])
def test_flag_mistakes_are_one_line(outputs, tmp_path, flags, message):
    r = convert("--input_path", outputs["webdataset"], "--output_path", "out", *flags, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def tamper(outputs, tmp_path):
    """A copy of the webdataset and parquet folders with one bad thing of each kind, and its expectations."""
    wds = tmp_path / "bad_wds"
    shutil.copytree(outputs["webdataset"], wds)
    shards = sorted(str(p) for p in wds.glob("*.tar"))
    with tarfile.open(shards[0]) as tar:  # (test set-up: read the original whole)
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    no_txt, not_utf8, corrupt = keys[1], keys[2], keys[3]
    with tarfile.open(shards[0], "w") as tar:
        for m, data in members:
            key, ext = m.name.split(".", 1)
            if key == no_txt and ext == "txt":
                continue
            if key == not_utf8 and ext == "txt":
                data = "café".encode("latin-1")
            if key == corrupt and ext == "jpg":
                data = data[:20] + bytes(len(data) - 20)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    data = open(shards[1], "rb").read()
    with tarfile.open(shards[1]) as tar:
        cut_at = tar.getmembers()[10]  # cut inside a member: the 4th sample's .txt header and beyond
    open(shards[1], "wb").write(data[:cut_at.offset + 300])
    expect = {"no_caption": [f"00000.tar:{no_txt}"], "not_text": [f"00000.tar:{not_utf8}"],
              "bad_image": [f"00000.tar:{corrupt}"]}
    return wds, expect


def test_bad_members_skipped_and_counted_by_reason_with_shard_and_key(outputs, tmp_path):
    wds, expect = tamper(outputs, tmp_path)
    r = convert("--input_path", str(wds), "--output_path", "out", "--num_workers", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = report(r.stdout)
    for reason, where in expect.items():
        assert got[reason] == (1, where), (reason, r.stdout)
    count, (where,) = got["truncated_file"]
    assert count == 1 and "00001.tar: truncated or corrupt tar at key" in where
    assert got["samples read"] == 40 - 16 + 3  # shard 1 gave its first 3 samples before the cut
    assert got["records written"] == got["samples read"] - 3
    assert "read 27 samples, img2dataset's stats say 40 (successes)" in r.stderr  # the loss is reported

    # parquet: a success row whose image bytes are gone
    import pyarrow as pa
    import pyarrow.parquet as pq

    pqdir = tmp_path / "bad_parquet"
    shutil.copytree(outputs["parquet"], pqdir)
    table = pq.read_table(pqdir / "00000.parquet")
    rows = table.to_pylist()
    rows[5]["jpg"] = None
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), pqdir / "00000.parquet")
    r = convert("--input_path", str(pqdir), "--output_path", "out_parquet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = report(r.stdout)
    assert got["empty_image"] == (1, [f"00000.parquet:{rows[5]['key']}"]) and got["records written"] == 39
    assert got["not_downloaded"][0] == 2


def test_all_bad_input_is_an_error(outputs, tmp_path):
    r = convert("--input_path", outputs["files"], "--output_path", "out", "--where", "aesthetic > 100", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == \
        f"error: nothing was written: all 40 samples of {outputs['files']} were skipped (reasons above)"
    assert not os.path.exists(tmp_path / "out" / "filelist")


def test_split_over_machines_combines_by_concatenation(outputs, tmp_path):
    folder = outputs["parquet"]
    base = ["--input_path", folder, "--per_part_file_num", "5", "--save_gzip_file", "--num_workers", "1"]
    assert convert(*base, "--output_path", "single", cwd=tmp_path).returncode == 0
    single = (tmp_path / "single" / "filelist" / "custom_dataset.filelist").read_text()
    for n in (2, 3):
        for i in reversed(range(n)):  # any order, one shared folder
            r = convert(*base, "--output_path", f"split{n}", "--num_shards", str(n), "--shard_index", str(i),
                        cwd=tmp_path)
            assert r.returncode == 0, r.stderr
        lists = [(tmp_path / f"split{n}" / "filelist" / f"custom_dataset-{i:05d}-of-{n:05d}.filelist").read_text()
                 for i in range(n)]
        assert "".join(lists).replace(f"split{n}/", "single/") == single
        parts = sorted(os.listdir(tmp_path / f"split{n}" / "laion400m_format_data"))
        assert parts == sorted(os.listdir(tmp_path / "single" / "laion400m_format_data"))
        for p in parts:
            assert (tmp_path / f"split{n}" / "laion400m_format_data" / p).read_bytes() == \
                (tmp_path / "single" / "laion400m_format_data" / p).read_bytes()
    r = convert(*base, "--output_path", "split2", "--num_shards", "2", "--shard_index", "0", cwd=tmp_path)
    assert r.returncode == 1 and "of shard_index 0 already exist" in r.stderr and "--overwrite" in r.stderr


def test_link_only_lists_the_shards(outputs, tmp_path):
    r = convert("--input_path", outputs["webdataset"], "--output_path", "links2", "--link_only", "--num_repeat", "2",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (entry,) = read_filelist_list(str(tmp_path / "links2" / "filelist" / "custom_dataset.filelist.list"))
    listed = [e.path for e in read_filelist(entry.path)]
    assert [os.path.basename(p) for p in listed] == ["00000.tar", "00001.tar", "00002.tar"] * 2
    assert os.listdir(tmp_path / "links2") == ["filelist"]
    r = convert("--input_path", outputs["files"], "--output_path", "links3", "--link_only", cwd=tmp_path)
    assert r.returncode == 2 and "--link_only needs .tar or .parquet shards" in r.stderr


# ---------------------------------------------------------------------------------------------
# Training on the shards directly
# ---------------------------------------------------------------------------------------------
def file_list(folder, name, paths, weights=None):
    """A .filelist.list in ``folder`` with one .filelist per group of ``paths``."""
    lines = []
    for i, group in enumerate(paths):
        fl = os.path.join(folder, f"{name}{i}.filelist")
        with open(fl, "w") as f:
            f.write("".join(p + "\n" for p in group))
        lines.append(fl + ("" if weights is None else f" {weights[i]}"))
    listing = os.path.join(folder, f"{name}.filelist.list")
    with open(listing, "w") as f:
        f.write("\n".join(lines) + "\n")
    return listing


def dataset(listing, tokenizer, **kw):
    from sd.text_image_pair_dataset import TextImagePairDataset

    kw = {"return_meta": True, "drop_caption_prob": 0.0, "shuffle_buffer": 1, **kw}
    return TextImagePairDataset(listing, tokenizer, resolution=32, **kw)


def take(ds, n):
    """The first n samples of a one-slot dataset."""
    return list(itertools.islice(itertools.chain.from_iterable(ds), n))


def test_dataset_streams_tar_and_parquet_shards_beside_part_files(outputs, urls, tokenizer, tmp_path):
    _, rows = urls
    tars = i2d.find_shards(outputs["webdataset"])[1]
    parquets = i2d.find_shards(outputs["parquet"])[1]
    r = convert("--input_path", outputs["files"], "--output_path", "parts", "--num_workers", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    parts = [e.path for e in read_filelist(str(tmp_path / "parts" / "filelist" / "custom_dataset.filelist"))]
    listing = file_list(str(tmp_path), "mixed", [tars + parquets + parts])
    samples = take(dataset(listing, tokenizer), 120)  # one pass: 40 + 40 + 40 usable records
    assert all(s["epoch"] == 0 for s in samples) and samples[-1]["skipped"] == {"not_downloaded": 2}
    good = collections.Counter(r["caption"] for r in rows[:40])
    assert collections.Counter(s["caption"] for s in samples) == good + good + good
    assert all(s["pixel_values"].shape == (3, 32, 32) for s in samples)
    # sharding over 4 slots: disjoint shares that make up the whole (9 files, split by file)
    shares = []
    ds = dataset(listing, tokenizer, num_slots=4)
    for slot in range(4):
        it = ds.stream.samples(slot, None, ds._make_sample, ds._check_record)
        shares.append([s["caption"] for s, epoch, _ in itertools.takewhile(lambda x: x[1] == 0, it)])
    assert sum(map(collections.Counter, shares), collections.Counter()) == good + good + good
    assert all(shares)


def test_weights_caption_dropout_and_filters_on_shards(outputs, tokenizer, tmp_path):
    tars = i2d.find_shards(outputs["webdataset"])[1]
    parquets = i2d.find_shards(outputs["parquet"])[1]
    failed_rows = {}
    for weights in ([3, 1], [1, 3]):
        listing = file_list(str(tmp_path), "weighted", [tars, parquets], weights=weights)
        samples = take(dataset(listing, tokenizer, shuffle_buffer=8), 400)
        failed_rows[weights[1]] = samples[-1]["skipped"].get("not_downloaded", 0)  # 2 per pass of the parquet list
    # 400 draws: ~100 (weight 1/4) or ~300 (3/4) parquet rows, i.e. ~2.4 or ~7 passes of its 42 rows
    assert 2 <= failed_rows[1] <= 6 and 12 <= failed_rows[3] <= 16, failed_rows
    dropped = take(dataset(listing, tokenizer, drop_caption_prob=1.0), 10)
    assert all(s["caption"] == "" for s in dropped)
    filters = i2d.ShardOptions(where=(i2d.Where.parse("aesthetic >= 5"),))
    kept = take(dataset(file_list(str(tmp_path), "tars", [tars]), tokenizer, shard_options=filters), 60)
    metas = [json.loads(s.meta) for t in tars for s in i2d.iter_tar(t)]
    assert collections.Counter(s["caption"] for s in kept[:sum(m["aesthetic"] >= 5 for m in metas)]) == \
        collections.Counter(m["caption"] for m in metas if m["aesthetic"] >= 5)
    assert kept[-1]["skipped"]["filtered"] >= sum(m["aesthetic"] < 5 for m in metas)


def test_bad_shard_members_counted_by_reason_in_the_stream(outputs, tokenizer, tmp_path):
    wds, _ = tamper(outputs, tmp_path)
    tars = sorted(str(p) for p in wds.glob("*.tar"))
    samples = take(dataset(file_list(str(tmp_path), "bad", [tars]), tokenizer), 50)
    first_pass = [s for s in samples if s["epoch"] == 0]
    assert len(first_pass) == 40 - 16 + 3 - 3  # shard 1 cut after 3 samples; 3 bad samples in shard 0
    skipped = samples[-1]["skipped"]
    assert {k: skipped[k] for k in ("no_caption", "not_text", "bad_image")} == {"no_caption": 2, "not_text": 2,
                                                                                  "bad_image": 2}  # two passes
    assert skipped["truncated_file"] == 2


def test_train_on_webdataset_shards_directly_and_resume_exactly(outputs, tiny_kit, tmp_path):
    """10 steps on the tar shards (a --link_only file list), with a loader worker; resumed from step 5,
    the run logs the same losses and ends with the same weights."""
    from safetensors.numpy import load_file

    from tests.helpers.common import train_command

    r = convert("--input_path", outputs["webdataset"], "--output_path", "links", "--link_only", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listing = str(tmp_path / "links" / "filelist" / "custom_dataset.filelist.list")
    args = ["--max_steps", "10", "--save_steps", "5", "--dataloader_num_workers", "1", "--report_to", "none",
            "--image_logging_steps", "0"]

    def train(out):
        cmd = train_command(tiny_kit, listing, out, *args)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return [line.split("loss: ")[1].split(",")[0] for line in (p.stdout + p.stderr).splitlines()
                if " - loss: " in line]

    full = train(tmp_path / "full")
    assert len(full) == 10
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-5", tmp_path / "resumed" / "checkpoint-5")
    resumed = train(tmp_path / "resumed")
    assert resumed == full[5:]
    name = "diffusion_paddle_model.safetensors"
    a = load_file(tmp_path / "full" / "checkpoint-10" / "unet" / name)
    b = load_file(tmp_path / "resumed" / "checkpoint-10" / "unet" / name)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.long
def test_training_flags_filter_the_shards(outputs, tiny_kit, tmp_path):
    """--where reaches the shards read by training: a threshold no sample passes leaves nothing usable,
    which stops the run with a one-line error counting the filtered samples; a malformed one stops at parsing."""
    from tests.helpers.common import train_command

    r = convert("--input_path", outputs["webdataset"], "--output_path", "links", "--link_only", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listing = str(tmp_path / "links" / "filelist" / "custom_dataset.filelist.list")
    for where, expected in (("aesthetic > 1000", "filtered"), ("aesthetic >> 5", "expected 'column OP number'")):
        cmd = train_command(tiny_kit, listing, tmp_path / "out", "--max_steps", "2", "--report_to", "none",
                            "--image_logging_steps", "0", "--where", where)
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert p.returncode != 0 and expected in p.stderr, p.stderr[-3000:]
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
