"""eval.py: outputs, determinism, schedulers, bad input, and the shapes scoring."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
from sd.demo_data import Reading
from sd.evaluate import confusion, format_report, score
from sd.sampling import SCHEDULERS


def run(tiny_kit, out, *extra):
    return eval_cli.main(["--pretrained_model_name_or_path", tiny_kit, "--unet_model_name_or_path",
                          os.path.join(tiny_kit, "unet"), "--output_dir", str(out), "--num_inference_steps", "2", *extra])


def test_outputs_manifest_and_determinism(tiny_kit, tmp_path):
    prompts = ["--prompt", "a red circle on a white background", "--prompt", "a blue square on a black background"]
    assert run(tiny_kit, tmp_path / "a", *prompts, "--guidance_scale", "1", "7.5", "--num_images_per_prompt", "2",
               "--batch_size", "3") == 0
    assert run(tiny_kit, tmp_path / "b", *prompts, "--guidance_scale", "1", "7.5", "--num_images_per_prompt", "2",
               "--batch_size", "3") == 0
    assert run(tiny_kit, tmp_path / "c", *prompts, "--guidance_scale", "1", "7.5", "--num_images_per_prompt", "2",
               "--batch_size", "8") == 0
    manifest = json.load(open(tmp_path / "a" / "manifest.json"))
    rows = manifest["images"]
    assert len(rows) == 8 and manifest["height"] == 32  # default size from the UNet config × VAE factor
    assert {r["file"] for r in rows} | {"grid.png", "manifest.json", "manifest.csv"} == set(os.listdir(tmp_path / "a"))
    assert "001_g7.5_s1.png" in {r["file"] for r in rows}
    with open(tmp_path / "a" / "manifest.csv") as f:
        assert [r["file"] for r in csv.DictReader(f)] == [r["file"] for r in rows]
    for r in rows:
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()  # same run: identical
        a = np.asarray(Image.open(tmp_path / "a" / r["file"]), dtype=int)
        c = np.asarray(Image.open(tmp_path / "c" / r["file"]), dtype=int)
        assert np.abs(a - c).max() <= 2  # another batch size: the same image up to float rounding


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_runs(tiny_kit, tmp_path, scheduler):
    assert run(tiny_kit, tmp_path, "--prompt", "a green triangle on a white background", "--scheduler", scheduler) == 0
    assert os.path.isfile(tmp_path / "000_g7.5_s0.png")


def expect_error(capsys, argv, text):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert text in err and len(err.strip().splitlines()) == 1, err


def test_bad_input_errors(tiny_kit, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./laion400m_pretrain_output_trainer here
    expect_error(capsys, [], "run `sh train.sh` first")
    expect_error(capsys, ["--unet_model_name_or_path", str(tmp_path / "nope")], "is not a folder")
    (tmp_path / "empty").mkdir()
    expect_error(capsys, ["--unet_model_name_or_path", str(tmp_path / "empty")], "no config.json")
    bad = tmp_path / "unet"
    shutil.copytree(os.path.join(tiny_kit, "unet"), bad)
    cfg = json.load(open(bad / "config.json"))
    cfg["cross_attention_dim"] = 48
    json.dump(cfg, open(bad / "config.json", "w"))
    expect_error(capsys, ["--pretrained_model_name_or_path", tiny_kit, "--unet_model_name_or_path", str(bad)],
                 "cross_attention_dim 48")
    kit_unet = os.path.join(tiny_kit, "unet")
    expect_error(capsys, ["--pretrained_model_name_or_path", tiny_kit, "--unet_model_name_or_path", kit_unet,
                          "--height", "33"], "multiples of 2")
    (tmp_path / "prompts.txt").write_text("\n  \n")
    expect_error(capsys, ["--pretrained_model_name_or_path", tiny_kit, "--unet_model_name_or_path", kit_unet,
                          "--prompt_file", "prompts.txt"], "has no prompts")


def test_scoring_by_hand():
    labels = [("red", "circle", "white"), ("red", "square", "black"), ("blue", "triangle", "white"), ("green", "circle", "black")]
    readings = [Reading("red", "circle", "white"),  # all right
                Reading("red", "circle", "black"),  # shape wrong
                Reading("blue", "triangle", "black"),  # background wrong
                Reading("none", "none", "black")]  # colour, shape wrong
    s = score(labels, readings)
    assert (s["colour"], s["shape"], s["background"], s["colour+shape"], s["all"]) == (0.75, 0.5, 0.75, 0.5, 0.25)
    assert confusion(labels, readings, "shape") == {"circle": {"circle": 1, "none": 1}, "square": {"circle": 1},
                                                   "triangle": {"triangle": 1}}
    report = format_report({"7.5": {"scores": s, "confusion": {f: confusion(labels, readings, f) for f in ("colour", "shape")}}})
    assert "| 7.5 | 75.0% | 50.0% | 75.0% | 50.0% | 25.0% | 4 |" in report
