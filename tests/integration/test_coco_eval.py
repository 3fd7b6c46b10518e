"""``eval.py --evaluate coco``: sharded over ranks, resumable, scored into a table and a curve.

On the test kit (untrained UNet, its tiny CLIP) with demo captions and rendered demo images as the
reference; FD-CLIP, because no Inception weights exist offline. Ranks are simulated with the variables
paddle.distributed.launch sets (PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM).
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.common import ROOT

N = 6


def run_eval(kit, demo, out, *extra, env=None):
    cmd = [sys.executable, "eval.py", "--evaluate", "coco", "--pretrained_model_name_or_path", kit,
           "--captions", os.path.join(demo, "demo.jsonl"), "--num_images", str(N), "--guidance_scale", "3", "5",
           "--reference", os.path.join(demo, "images"), "--fid_features", "clip",
           "--clip_model_name_or_path", os.path.join(kit, "clip"), "--num_inference_steps", "2",
           "--batch_size", "4", "--output_dir", out, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "1", **(env or {})})


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from sd.data.demo_data import write_demo_jsonl

    folder = str(tmp_path_factory.mktemp("demo"))
    write_demo_jsonl(folder, 12, size=32, seed=3)
    return folder


def images_of(out, g):
    folder = os.path.join(out, f"mscoco.en_g{g}")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_sharded_resumable_run_writes_table_and_curve(tiny_kit, demo, tmp_path):
    out = str(tmp_path / "eval")
    r1 = run_eval(tiny_kit, demo, out, env={"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "2"})
    assert r1.returncode == 0, r1.stderr[-3000:]
    for g in ("3", "5"):  # rank 1 of 2: the odd images only, and no scoring
        assert images_of(out, g) == [f"{i:05d}_000.png" for i in range(1, N, 2)]
    assert not os.path.exists(os.path.join(out, "coco_eval.json"))

    r0 = run_eval(tiny_kit, demo, out, env={"PADDLE_TRAINER_ID": "0", "PADDLE_TRAINERS_NUM": "2"})
    assert r0.returncode == 0, r0.stderr[-3000:]
    assert f"rank 0: {N} images generated" in r0.stdout  # its 3 per guidance scale
    for g in ("3", "5"):
        assert images_of(out, g) == [f"{i:05d}_000.png" for i in range(N)]
    res = json.load(open(os.path.join(out, "coco_eval.json")))
    assert res["fd_name"] == "FD-CLIP" and [r["guidance_scale"] for r in res["rows"]] == [3, 5]
    for row in res["rows"]:
        assert row["n"] == N and row["FD-CLIP"] > 0 and isinstance(row["clip_score"], float)
        assert set(row["shapes"]) >= {"colour", "shape", "background", "all"}  # demo captions: the shapes score too
    md = open(os.path.join(out, "coco_eval.md")).read()
    assert md.count("\n") == 4 and "| 3 |" in md and "| 5 |" in md
    with open(os.path.join(out, "fid_vs_clip.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # resume: nothing is generated again; a missing image is regenerated alone
    kept = os.path.join(out, "mscoco.en_g3", "00000_000.png")
    before = os.stat(kept).st_mtime_ns
    os.remove(os.path.join(out, "mscoco.en_g5", "00004_000.png"))
    r = run_eval(tiny_kit, demo, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: 1 images generated" in r.stdout
    assert os.stat(kept).st_mtime_ns == before
    again = json.load(open(os.path.join(out, "coco_eval.json")))
    assert again["rows"][0]["clip_score"] == pytest.approx(res["rows"][0]["clip_score"], rel=1e-6)


def test_missing_flags_fail_in_one_line(tiny_kit, demo, tmp_path):
    r = run_eval(tiny_kit, demo, str(tmp_path / "x"), "--reference", str(tmp_path / "nowhere.npz"))
    assert r.returncode == 2 and "--reference" in r.stderr and "Traceback" not in r.stderr
    r = run_eval(tiny_kit, demo, str(tmp_path / "x"), "--num_images", "100")
    assert r.returncode == 2 and "only 12 captions" in r.stderr and "Traceback" not in r.stderr


def _losses(log):
    return [line.split(" - loss: ")[1].split(",")[0] for line in log.splitlines() if " - loss: " in line]


@pytest.mark.long
def test_scores_during_training_are_logged_and_change_nothing(tiny_kit, demo_jsonl, demo_file_list, tmp_path):
    """--eval_steps 2 over 4 steps: two evaluations in scores.jsonl and VisualDL (eval/ tags beside the
    loss); the losses and final weights equal those of the same run without scoring."""
    from safetensors.numpy import load_file
    from visualdl import LogReader

    from tests.helpers.common import train_command

    common = ("--max_steps", "4", "--save_steps", "4", "--use_ema", "True", "--image_logging_steps", "0")
    scored = tmp_path / "scored"
    r = subprocess.run(train_command(tiny_kit, demo_file_list, scored, *common, "--report_to", "visualdl",
                                     "--eval_steps", "2", "--eval_captions", demo_jsonl, "--eval_num_images", "6",
                                     "--eval_num_inference_steps", "2",
                                     "--eval_reference", os.path.join(os.path.dirname(demo_jsonl), "images")),
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = [json.loads(line) for line in open(scored / "eval" / "scores.jsonl")]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert row["images"] == 6 and {"clip_score", "fd_clip", "shapes_all"} <= set(row)
    assert len(os.listdir(scored / "eval" / "step-0000004")) == 6
    events = [os.path.join(d, f) for d, _, fs in os.walk(scored / "runs") for f in fs if "vdlrecords" in f]
    assert len(events) == 1
    tags = LogReader(file_path=events[0]).get_tags()["scalar"]
    assert {"eval/clip_score", "eval/fd_clip"} <= set(tags) and any("loss" in t for t in tags)

    plain = tmp_path / "plain"
    r2 = subprocess.run(train_command(tiny_kit, demo_file_list, plain, *common, "--report_to", "none"),
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    assert _losses(r.stdout + r.stderr) == _losses(r2.stdout + r2.stderr) and len(_losses(r2.stdout + r2.stderr)) == 4
    for name in ("diffusion_paddle_model.safetensors", "diffusion_paddle_model.ema.safetensors"):
        a = load_file(str(scored / "checkpoint-4" / "unet" / name))
        b = load_file(str(plain / "checkpoint-4" / "unet" / name))
        assert all((a[k] == b[k]).all() for k in a), name
