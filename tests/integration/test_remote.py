"""Remote shards: part files, webdataset tars and parquet shards read over HTTP and S3, on loopback only.

An HTTP server (stdlib, with Range support) on 127.0.0.1 serves shards built from the demo part files;
it can cut a response short or answer 5xx on demand. An S3-compatible server (moto's ThreadedMotoServer)
on 127.0.0.1 holds the same shards in a bucket. Nothing here contacts another address: the S3 client gets
an explicit endpoint and credentials, and instance metadata is switched off (AWS_EC2_METADATA_DISABLED).
"""

import base64
import functools
import gzip
import http.server
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest

from benchmarks.range_server import RangeHandler
from sd.data import img2dataset as i2d
from sd.data import remote
from sd.data.formats import iter_part_file, read_filelist, read_filelist_list
from tests.helpers.common import ROOT, env_with_root, train_command, weight_difference

SCRIPT = os.path.join(ROOT, "create_pretraining_data.py")
RUNNER = os.path.join(ROOT, "tests", "helpers", "fault_runner.py")
FAST_RETRIES = {"SD_REMOTE_RETRIES": "2", "SD_REMOTE_BACKOFF": "0.01"}


# ---------------------------------------------------------------------------------------------
# Shards and servers
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(demo_file_list, tmp_path_factory):
    """A folder with the demo records (3 part files of 24) as plain and gzip part files, img2dataset webdataset
    tars and img2dataset parquet shards (row groups of 8), each shard with its ``*_stats.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    www = tmp_path_factory.mktemp("remote") / "www"
    for sub in ("parts", "laion_shards", "laion_parquet"):
        (www / sub).mkdir(parents=True)
    (entry,) = read_filelist_list(demo_file_list)
    for index, part in enumerate(read_filelist(entry.path)):
        with open(part.path, "rb") as f:
            data = f.read()
        name = f"part-{index + 1:06d}"
        (www / "parts" / name).write_bytes(data)
        (www / "parts" / (name + ".gz")).write_bytes(gzip.compress(data, mtime=0))
        rows = []
        for i, line in enumerate(data.decode("utf-8").splitlines()):
            caption, _, b64 = line.split("\t")
            rows.append({"key": f"{index:05d}{i:04d}", "caption": caption, "png": base64.b64decode(b64),
                         "status": "success", "original_width": 32, "original_height": 32})
        with tarfile.open(www / "laion_shards" / f"{index:05d}.tar", "w") as tar:
            for row in rows:
                meta = {k: row[k] for k in ("key", "caption", "status", "original_width", "original_height")}
                for ext, payload in (("png", row["png"]), ("txt", row["caption"].encode()),
                                     ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{row['key']}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        pq.write_table(pa.Table.from_pylist(rows), www / "laion_parquet" / f"{index:05d}.parquet", row_group_size=8)
        stats = json.dumps({"count": len(rows), "successes": len(rows), "status_dict": {"success": len(rows)}})
        for sub in ("laion_shards", "laion_parquet"):
            (www / sub / f"{index:05d}_stats.json").write_text(stats)
    return www


class _RangeHandler(RangeHandler):
    """The benchmark's range server, plus the faults the server's ``plan`` asks for:
    ``cut``: {name: byte offset} the next response covering it stops there (the connection closes);
    ``fail``: {name: [status, times]} the next ``times`` requests for it get that status."""

    def _serve(self, body):
        plan = self.server.plan
        with plan["lock"]:
            fail = plan["fail"].get(self.path.lstrip("/"))
            if fail and fail[1] > 0:
                fail[1] -= 1
                self.send_error(fail[0])
                return
        super()._serve(body)

    def payload(self, start, data):
        name, plan = self.path.lstrip("/"), self.server.plan
        with plan["lock"]:
            cut = plan["cut"].get(name)
            if cut is not None and start <= cut < start + len(data):
                del plan["cut"][name]
                data = data[:cut - start]
            plan["served"].append((name, start, len(data)))
        self.close_connection = True  # a cut response ends here, short of its Content-Length
        return data


@pytest.fixture(scope="module")
def http_url(shards):
    """(base URL, fault plan) of a loopback HTTP server over ``shards``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(shards)))
    server.plan = {"lock": threading.Lock(), "cut": {}, "fail": {}, "served": []}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server.plan
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture
def plan(http_url, monkeypatch):
    _, plan = http_url
    for faults in (plan["cut"], plan["fail"], plan["served"]):
        faults.clear()
    for k, v in FAST_RETRIES.items():
        monkeypatch.setenv(k, v)
    return plan


def s3_env(endpoint):
    """The environment of a process that talks to the loopback S3 server only: explicit endpoint and credentials,
    no instance metadata, no config files, no proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and "proxy" not in k.lower()}
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="loopback", AWS_SECRET_ACCESS_KEY="loopback",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull, NO_PROXY="*", no_proxy="*")
    return env


@pytest.fixture(scope="module")
def s3(shards):
    """The loopback S3 server with bucket ``shards`` holding ``laion_shards/`` and ``laion_parquet/``: its env."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = s3_env(f"http://{host}:{port}")
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="loopback",
                          aws_secret_access_key="loopback", region_name="us-east-1")
    client.create_bucket(Bucket="shards")
    for sub in ("laion_shards", "laion_parquet"):
        for name in sorted(os.listdir(shards / sub)):
            client.upload_file(str(shards / sub / name), "shards", f"{sub}/{name}")
    yield env
    server.stop()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def file_list(folder, name, paths):
    """A .filelist.list in ``folder`` naming one .filelist of ``paths``."""
    fl = os.path.join(folder, f"{name}.filelist")
    with open(fl, "w") as f:
        f.write("".join(p + "\n" for p in paths))
    with open(fl + ".list", "w") as f:
        f.write(fl + "\n")
    return fl + ".list"


def dataset(listing, tokenizer, **kw):
    from sd.text_image_pair_dataset import TextImagePairDataset

    kw = {"return_meta": True, "drop_caption_prob": 0.1, "shuffle_buffer": 8, **kw}
    return TextImagePairDataset(listing, tokenizer, resolution=32, **kw)


def take(ds, steps):
    """The samples of the first ``steps`` steps (every slot's sample of each step)."""
    return list(itertools.chain.from_iterable(itertools.islice(iter(ds), steps)))


def shard_names(shards):
    return ([f"laion_shards/{i:05d}.tar" for i in range(3)] + [f"laion_parquet/{i:05d}.parquet" for i in range(3)]
            + [f"parts/part-{i:06d}{gz}" for i in (1, 2, 3) for gz in ("", ".gz")])


def convert(*args, cwd, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env, check=False)


def losses(log):
    """{step: loss} of the per-step log lines."""
    found = {}
    for line in log.splitlines():
        if " - loss: " in line and "global_step: " in line:
            found[int(line.split("global_step: ")[1].split(",")[0])] = line.split("loss: ")[1].split(",")[0]
    return found


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
def test_http_shards_give_the_local_samples_and_faults_are_retried_and_counted(shards, http_url, plan, tokenizer,
                                                                              tmp_path):
    """Every kind of shard over HTTP yields what the same files yield locally (captions, pixels, token ids,
    stream positions), over more than one pass and 3 slots; a response cut mid-tar and a 503 are retried."""
    base, _ = http_url
    names = shard_names(shards)
    local = file_list(str(tmp_path), "local", [str(shards / n) for n in names])
    far = file_list(str(tmp_path), "far", [f"{base}/{n}" for n in names])
    tar_size = os.path.getsize(shards / "laion_shards" / "00001.tar")
    plan["cut"]["laion_shards/00001.tar"] = tar_size // 2
    plan["fail"]["parts/part-000002.gz"] = [503, 2]  # HEAD and GET of its opening (fsspec tries both)
    steps = 12 * 24 // 3 + 10  # a little more than one pass of the 12 files of 24 records over 3 slots
    got, want = (take(dataset(listing, tokenizer, num_slots=3), steps) for listing in (far, local))
    assert len(got) == len(want) == 3 * steps
    assert max(s["epoch"] for s in want) == 1
    for a, b in zip(got, want):
        assert a["caption"] == b["caption"] and a["epoch"] == b["epoch"]
        for key in ("pixel_values", "input_ids", "stream_state"):
            assert np.array_equal(a[key], b[key]), key
    assert all(not s["skipped"] for s in want)
    retried = {}
    for s in got:  # each slot's counters, the last sample of each slot has its totals
        retried[int(s["stream_state"][0])] = dict(s["skipped"])
    total = {r: sum(c.get(r, 0) for c in retried.values()) for r in ("retry_connection", "retry_server_error")}
    assert total == {"retry_connection": 1, "retry_server_error": 1}, retried
    assert "laion_shards/00001.tar" not in plan["cut"]  # the cut happened
    assert plan["fail"]["parts/part-000002.gz"][1] == 0


def test_remote_shards_stream_by_range_requests(shards, http_url, plan, monkeypatch):
    """A tar's first sample, a parquet's first row group and a gzip part file's first line need only the first
    blocks of a 1 MB file (the parquet also its footer): nothing is fetched whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base, _ = http_url
    rng = np.random.default_rng(0)
    rows = [{"key": f"{i:09d}", "caption": f"sample {i}", "jpg": rng.bytes(20000)} for i in range(48)]
    (shards / "big").mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), shards / "big" / "00000.parquet", row_group_size=8)
    with tarfile.open(shards / "big" / "00000.tar", "w") as tar:
        for row in rows:
            for ext, payload in (("jpg", row["jpg"]), ("txt", row["caption"].encode())):
                info = tarfile.TarInfo(f"{row['key']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    lines = b"".join(f"{r['caption']}\tNONE\t".encode() + base64.b64encode(r["jpg"]) + b"\n" for r in rows)
    (shards / "big" / "part-000001.gz").write_bytes(gzip.compress(lines, compresslevel=1, mtime=0))
    monkeypatch.setattr(remote, "BLOCK_SIZE", 4096)
    for name, first in (("big/00000.tar", lambda url: next(i2d.iter_tar(url))),
                        ("big/00000.parquet", lambda url: next(i2d.iter_parquet(url))),
                        ("big/part-000001.gz", lambda url: next(iter_part_file(url)))):
        plan["served"].clear()
        assert first(f"{base}/{name}")
        size = os.path.getsize(shards / name)
        fetched = sum(n for served, _, n in plan["served"] if served == name)
        assert size > 900_000 and 0 < fetched < size / 4, (name, size, plan["served"])


def test_unreachable_and_missing_shards_are_skipped_and_counted(shards, http_url, plan, tokenizer, tmp_path, capfd):
    """A shard on a port nobody listens on and one answered 503 forever are retried, then skipped and counted as
    unreachable_file (once per pass, logged once); a 404 is a missing_file at once; the good shard goes on."""
    base, _ = http_url
    with socket.socket() as s:  # a loopback port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/00009.tar"
    plan["fail"]["laion_shards/00007.tar"] = [503, 10**6]
    paths = [f"{base}/laion_shards/00000.tar", closed, f"{base}/laion_shards/00007.tar", f"{base}/nowhere/00008.tar"]
    samples = take(dataset(file_list(str(tmp_path), "bad", paths), tokenizer, shuffle_buffer=1,
                              drop_caption_prob=0.0), 24 * 2 + 1)
    assert [s["epoch"] for s in samples] == [0] * 24 + [1] * 24 + [2]
    assert [s["caption"] for s in samples[:24]] == [s["caption"] for s in samples[24:48]]  # the good tar, twice
    skipped = samples[-1]["skipped"]
    # passes 0 and 1 met every bad shard, pass 2 those before the good one; each unreachable one was tried
    # 3 times (SD_REMOTE_RETRIES=2), each retry counted
    assert 2 * 2 <= skipped["unreachable_file"] <= 3 * 2 and 2 <= skipped["missing_file"] <= 3
    assert skipped["retry_connection"] % 2 == 0 and skipped["retry_server_error"] % 2 == 0
    assert skipped["retry_connection"] >= 4 and skipped["retry_server_error"] >= 4
    assert skipped["unreachable_file"] == (skipped["retry_connection"] + skipped["retry_server_error"]) // 2
    err = capfd.readouterr().err
    for url in (closed, paths[2]):
        assert err.count(f"file {url} (listed in") == 1 and "cannot be reached" in err
    assert err.count(f"file {paths[3]} (listed in") == 1


def test_skip_warnings_for_urls_with_credentials_hide_the_secrets_and_name_the_file(http_url, plan, tokenizer,
                                                                                    tmp_path, capfd):
    """A listed URL's password and query tokens never reach the log: not in the retry warnings of a refused
    connection, not in the skip warnings of it and of a 404; the host and path still do."""
    base, _ = http_url
    port = base.rsplit(":", 1)[1]
    with socket.socket() as s:  # a loopback port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://reader:hunter2@127.0.0.1:{s.getsockname()[1]}/private/00009.tar?X-Amz-Signature=f00d5ig"
    missing = f"http://reader:hunter2@127.0.0.1:{port}/nowhere/00008.tar?token=t0ken5ecret"
    listing = file_list(str(tmp_path), "secret", [f"{base}/laion_shards/00000.tar", closed, missing])
    samples = take(dataset(listing, tokenizer, shuffle_buffer=1), 30)
    assert samples[-1]["skipped"]["unreachable_file"] >= 1 and samples[-1]["skipped"]["missing_file"] >= 1
    err = capfd.readouterr().err
    assert "retry 1 of 2" in err and "cannot be reached" in err and "is missing" in err  # the warnings were logged
    for secret in ("hunter2", "f00d5ig", "t0ken5ecret"):
        assert secret not in err
    closed_port = closed.split("@127.0.0.1:")[1].split("/")[0]
    assert f"file http://***:***@127.0.0.1:{closed_port}/private/00009.tar?X-Amz-Signature=*** (listed in" in err
    assert f"file http://***:***@127.0.0.1:{port}/nowhere/00008.tar?token=*** (listed in" in err


def test_http_folder_link_only_lists_the_shard_urls(http_url, tmp_path):
    """An HTTP folder (its index page, listed by fsspec) gives the same --link_only lists as an S3 prefix."""
    base, _ = http_url
    r = convert("--input_path", f"{base}/laion_parquet/", "--output_path", "links", "--link_only", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "img2dataset folder: " in r.stdout and "(parquet, 3 of 3 shards)" in r.stdout
    (entry,) = read_filelist_list(str(tmp_path / "links" / "filelist" / "custom_dataset.filelist.list"))
    assert [e.path for e in read_filelist(entry.path)] == [f"{base}/laion_parquet/{i:05d}.parquet" for i in range(3)]


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------
def test_s3_link_only_conversion_and_listing(shards, s3, tmp_path):
    """create_pretraining_data lists an S3 prefix (--link_only: the shards' URLs) and converts one by streaming it:
    the part files equal those converted from the same shards on local disk."""
    r = convert("--input_path", "s3://shards/laion_shards", "--output_path", "links", "--link_only", cwd=tmp_path,
                env=s3)
    assert r.returncode == 0, r.stderr
    assert "img2dataset stats:  72 URLs, 72 downloaded, 0 failed" in r.stdout
    (entry,) = read_filelist_list(str(tmp_path / "links" / "filelist" / "custom_dataset.filelist.list"))
    assert [e.path for e in read_filelist(entry.path)] == [f"s3://shards/laion_shards/{i:05d}.tar" for i in range(3)]
    flags = ["--output_path", "parts", "--per_part_file_num", "10", "--save_gzip_file", "--num_workers", "1"]
    r = convert("--input_path", "s3://shards/laion_parquet", *flags, cwd=tmp_path / "links", env=s3)
    assert r.returncode == 0, r.stderr
    assert "records written:    72" in r.stdout
    r = convert("--input_path", str(shards / "laion_parquet"), *flags, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    far, near = tmp_path / "links" / "parts" / "laion400m_format_data", tmp_path / "parts" / "laion400m_format_data"
    assert sorted(os.listdir(far)) == sorted(os.listdir(near)) and len(os.listdir(near)) == 9
    for name in os.listdir(near):
        assert (far / name).read_bytes() == (near / name).read_bytes(), name
    r = convert("--input_path", "s3://shards/no_such_prefix", "--output_path", "none", cwd=tmp_path, env=s3)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.long
def test_s3_training_equals_local_and_resumes_exactly_after_a_kill(shards, s3, tiny_kit, tmp_path):
    """Training on the S3 shards (--link_only lists) logs the losses of the same shards read locally; killed
    mid-step 5 and resumed, it ends with the uninterrupted run's weights, EMA included."""
    r = convert("--input_path", "s3://shards/laion_shards", "--output_path", "links", "--link_only", cwd=tmp_path,
                env=s3)
    assert r.returncode == 0, r.stderr
    far = str(tmp_path / "links" / "filelist" / "custom_dataset.filelist.list")
    near = file_list(str(tmp_path), "near", [str(shards / "laion_shards" / f"{i:05d}.tar") for i in range(3)])
    common = ["--max_steps", "6", "--save_steps", "2", "--dataloader_num_workers", "1", "--use_ema", "True",
              "--ema_decay", "0.9", "--report_to", "none", "--image_logging_steps", "0"]

    def train(listing, out, faults=None):
        cmd = train_command(tiny_kit, listing, out, *common)
        if faults:
            cmd = [sys.executable, RUNNER] + cmd[2:]
        env = env_with_root(s3, **(faults or {}))  # the fault runner is started by file: sd on PYTHONPATH
        return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env,
                              timeout=600, check=False)

    runs = {}
    for name, listing in (("s3", far), ("local", near)):
        p = train(listing, tmp_path / name)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        runs[name] = losses(p.stdout + p.stderr)
    assert len(runs["s3"]) == 6 and runs["s3"] == runs["local"]
    assert weight_difference(tmp_path / "s3" / "checkpoint-6", tmp_path / "local" / "checkpoint-6") == (0.0, 0.0)
    killed = train(far, tmp_path / "killed", {"SD_FAULT_RANK_DIES": "0:4:kill"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert max(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == "checkpoint-4"
    resumed = train(far, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert losses(resumed.stdout + resumed.stderr) == {s: loss for s, loss in runs["s3"].items() if s > 4}
    assert weight_difference(tmp_path / "s3" / "checkpoint-6", tmp_path / "killed" / "checkpoint-6") == (0.0, 0.0)
    shutil.rmtree(tmp_path / "local")
