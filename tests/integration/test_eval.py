"""eval.py against a real (2-step) training checkpoint: defaults, outputs and manifest, PaddleMIX's
snippets, bad input; sd/evaluation/shapes.py: the shapes benchmark and its scoring on fixed images."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
from sd.data import demo_data
from sd.evaluation.shapes import chance, confusion, format_report, score
from sd.runtime.run_state import RunState
from tests.helpers.common import ROOT

OUT = "laion400m_pretrain_output_trainer"


def train(tiny_kit, file_list, output_dir, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"), "--do_train",
           "--output_dir", str(output_dir), "--pretrained_model_name_or_path", tiny_kit,
           "--unet_name_or_path", os.path.join(tiny_kit, "unet", "config.json"), "--file_list", file_list,
           "--resolution", "32", "--per_device_train_batch_size", "2", "--model_max_length", "16", "--report_to",
           "none",
           "--image_logging_steps", "0", "--dataloader_num_workers", "0", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def workdir(tiny_kit, demo_file_list, tmp_path_factory):
    """A folder holding train.sh's default output: 2 steps on the test kit, EMA, v-prediction."""
    folder = tmp_path_factory.mktemp("work")
    train(tiny_kit, demo_file_list, folder / OUT, "--max_steps", "2", "--save_steps", "1", "--use_ema", "True",
          "--prediction_type", "v_prediction")
    assert os.path.isfile(folder / OUT / "checkpoint-2" / "unet" / "config.json")
    return folder


def files_of(folder):
    return set(os.listdir(folder))


def test_no_arguments_uses_newest_checkpoint_and_its_kit(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    assert eval_cli.main(["--num_inference_steps", "2", "--output_dir", "default"]) == 0
    manifest = json.load(open(workdir / "default" / "manifest.json"))
    assert manifest["unet"] == os.path.join(".", OUT, "checkpoint-2", "unet")
    assert manifest["variant"] == "ema"  # trained with EMA: its weights by default
    assert (manifest["height"], manifest["width"]) == (32, 32)  # the training resolution
    rows = manifest["images"]
    assert [r["prompt"] for r in rows] == [p[3] for p in demo_data.all_prompts()]  # a kit model: the demo prompts
    assert files_of(workdir / "default") == {r["file"] for r in rows} | {"grid.png", "manifest.json", "manifest.csv"}
    # what the checkpoint records reaches the sampler: its kit, its prediction type
    args = eval_cli.parse_args([])
    models = eval_cli.resolve_models(args)
    assert models["vae"] == RunState.read(str(workdir / OUT / "checkpoint-2")).model_paths["vae"]
    pipe = eval_cli.build(models, args)
    assert pipe.scheduler.config.prediction_type == "v_prediction" and type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_outputs_manifest_and_determinism(workdir, tmp_path):
    unet = str(workdir / OUT / "checkpoint-2" / "unet")
    base = ["--unet_model_name_or_path", unet, "--num_inference_steps", "2", "--variant", "ema", "--prompt",
            "a red circle on a white background", "--prompt", "a blue square on a black background",
            "--guidance_scale", "1", "7.5", "--num_images_per_prompt", "2", "--seed", "10"]
    assert eval_cli.main([*base, "--batch_size", "3", "--output_dir", str(tmp_path / "a")]) == 0
    assert eval_cli.main([*base, "--batch_size", "3", "--output_dir", str(tmp_path / "b")]) == 0
    assert eval_cli.main([*base, "--batch_size", "8", "--output_dir", str(tmp_path / "c")]) == 0
    manifest = json.load(open(tmp_path / "a" / "manifest.json"))
    rows = manifest["images"]
    assert manifest["variant"] == "ema" and len(rows) == 8
    assert eval_cli.main([*base[:4], "--variant", "none", *base[6:12], "--output_dir", str(tmp_path / "raw")]) == 0
    assert json.load(open(tmp_path / "raw" / "manifest.json"))["variant"] is None
    assert {r["file"] for r in rows} == {f"{i:03d}_g{g}_s{s}.png" for i in (0, 1)
                                         for g in ("1", "7.5") for s in (10, 11)}
    assert files_of(tmp_path / "a") == {r["file"] for r in rows} | {"grid.png", "manifest.json", "manifest.csv"}
    with open(tmp_path / "a" / "manifest.csv") as f:
        assert [{**r, "prompt_index": int(r["prompt_index"]), "seed": int(r["seed"]),
                 "guidance_scale": float(r["guidance_scale"])} for r in csv.DictReader(f)] == rows
    for r in rows:
        assert Image.open(tmp_path / "a" / r["file"]).size == (32, 32)
        assert r["scheduler"] == "ddim" and r["prompt"] == ["a red circle on a white background",
                                                           "a blue square on a black background"][r["prompt_index"]]
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()  # identical
        a = np.asarray(Image.open(tmp_path / "a" / r["file"]), dtype=int)
        c = np.asarray(Image.open(tmp_path / "c" / r["file"]), dtype=int)
        assert np.abs(a - c).max() <= 2  # another batch size: the same image up to float rounding
    grid = Image.open(tmp_path / "a" / "grid.png")
    assert grid.size[1] == 2 * 64 and grid.size[0] > 4 * 64  # a row per prompt, 4 tiles + the label margin


def test_euler_ancestral_through_the_cli(workdir, tmp_path):
    args = ["--unet_model_name_or_path", str(workdir / OUT), "--num_inference_steps", "3", "--scheduler",
            "euler-ancestral", "--prompt", "a green triangle on a white background", "--num_images_per_prompt", "2"]
    assert eval_cli.main([*args, "--output_dir", str(tmp_path / "a"), "--batch_size", "1"]) == 0
    assert eval_cli.main([*args, "--output_dir", str(tmp_path / "b"), "--batch_size", "2"]) == 0
    for name in ("000_g7.5_s0.png", "000_g7.5_s1.png"):  # exact, whatever the batch
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert json.load(open(tmp_path / "a" / "manifest.json"))["images"][0]["scheduler"] == "euler-ancestral"


@pytest.mark.long
def test_whole_pipeline_checkpoint_with_trained_text_encoder(tiny_kit, demo_file_list, tmp_path):
    train(tiny_kit, demo_file_list, tmp_path / "run", "--max_steps", "1", "--save_steps", "1",
          "--only_save_updated_model", "False", "--train_text_encoder", "True")
    ckpt = tmp_path / "run" / "checkpoint-1"
    prompt = ["--prompt", "a red circle on a white background", "--num_inference_steps", "2"]
    assert eval_cli.main(["--unet_model_name_or_path", str(ckpt), *prompt, "--output_dir", str(tmp_path / "a")]) == 0
    manifest = json.load(open(tmp_path / "a" / "manifest.json"))
    assert (manifest["unet"], manifest["text_encoder"], manifest["vae"]) == (
        str(ckpt / "unet"), str(ckpt / "text_encoder"), str(ckpt / "vae"))  # the checkpoint's own, trained, modules
    # the same folder as --pretrained_model_name_or_path (it is a whole pipeline): the same image
    assert eval_cli.main(["--pretrained_model_name_or_path", str(ckpt), *prompt, "--output_dir",
                          str(tmp_path / "b")]) == 0
    name = "000_g7.5_s0.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# PaddleMIX's README snippets 5.1 and 5.2, as they read for the kit (the README shows these).
SNIPPET_5_1 = '''
from ppdiffusers import StableDiffusionPipeline, UNet2DConditionModel
unet_model_name_or_path = "./tiny-sd/unet"
unet = UNet2DConditionModel.from_pretrained(unet_model_name_or_path)
pipe = StableDiffusionPipeline.from_pretrained("./tiny-sd", safety_checker=None, unet=unet)
prompt = "a red circle on a white background"
image = pipe(prompt, guidance_scale=7.5, width=32, height=32).images[0]
image.save("red_circle.png")
'''
SNIPPET_5_2 = '''
from ppdiffusers import StableDiffusionPipeline, UNet2DConditionModel
unet_model_name_or_path = "./laion400m_pretrain_output_trainer/checkpoint-1000/unet"
unet = UNet2DConditionModel.from_pretrained(unet_model_name_or_path)
pipe = StableDiffusionPipeline.from_pretrained("./tiny-sd", safety_checker=None, unet=unet)
prompt = "a red circle on a white background"
# trained at 32x32: sample at the training resolution
image = pipe(prompt, guidance_scale=7.5, width=32, height=32).images[0]
image.save("red_circle.png")
'''


def test_seed_snippets_run_against_our_folders(workdir, tiny_kit, monkeypatch):
    monkeypatch.chdir(workdir)
    if not os.path.exists("tiny-sd"):
        os.symlink(tiny_kit, "tiny-sd")
    for snippet in (SNIPPET_5_1, SNIPPET_5_2.replace("checkpoint-1000", "checkpoint-2")):
        exec(compile(snippet, "snippet", "exec"), {})
        assert Image.open("red_circle.png").size == (32, 32)
        os.remove("red_circle.png")


def test_shapes_benchmark_through_the_cli(workdir, tmp_path):
    args = ["--unet_model_name_or_path", str(workdir / OUT / "checkpoint-2" / "unet"), "--evaluate", "shapes",
            "--num_seeds", "1", "--num_inference_steps", "1", "--guidance_scale", "1", "3", "--batch_size", "36",
            "--output_dir", str(tmp_path)]
    assert eval_cli.main(args) == 0
    report = json.load(open(tmp_path / "shapes_eval.json"))
    assert set(report["guidance"]) == {"1", "3"} and report["height"] == 32
    for res in report["guidance"].values():
        assert res["scores"]["n"] == 36
        assert 0 <= res["scores"]["all"] <= res["scores"]["colour+shape"] <= res["scores"]["colour"]
        assert sum(sum(row.values()) for row in res["confusion"]["shape"].values()) == 36
    assert report["reference"]["rendered"]["scores"]["all"] >= 0.9  # the checker reads clean renders
    assert {"shapes_eval.md", "shapes_grid_g1.png", "shapes_grid_g3.png"} <= files_of(tmp_path)
    assert "| guidance 3 |" in (tmp_path / "shapes_eval.md").read_text()


def test_scoring_on_rendered_images_by_hand():
    rng = np.random.default_rng(0)
    drawn = [("red", "circle", "white"), ("blue", "square", "black"), ("green", "triangle", "white"),
             ("yellow", "circle", "black"), ("purple", "square", "white"), ("orange", "triangle", "black")]
    images = [demo_data.render(*d, 64, rng) for d in drawn]
    labels = [("red", "circle", "white"),  # right
              ("blue", "circle", "black"),  # shape wrong
              ("red", "triangle", "white"),  # colour wrong
              ("yellow", "circle", "white"),  # background wrong
              ("green", "circle", "white"),  # colour and shape wrong
              ("red", "square", "white")]  # all wrong
    readings = [demo_data.check(im) for im in images]
    assert [(r.colour, r.shape, r.background) for r in readings] == drawn  # the checker reads renders
    s = score(labels, readings)
    assert (s["colour"], s["shape"], s["background"], s["colour+shape"], s["all"], s["n"]) == \
        (3 / 6, 3 / 6, 4 / 6, 2 / 6, 1 / 6, 6)
    assert confusion(labels, readings, "shape") == {"circle": {"circle": 2, "square": 2}, "triangle": {"triangle": 1},
                                                   "square": {"triangle": 1}}
    assert confusion(labels, readings, "colour")["red"] == {"red": 1, "green": 1, "orange": 1}
    report = format_report({"guidance": {"7.5": {"scores": s, "confusion": {f: confusion(labels, readings, f)
                                                                            for f in ("colour", "shape")}}}})
    assert "| guidance 7.5 | 50.0% | 50.0% | 66.7% | 33.3% | 16.7% | 6 |" in report
    assert "| circle | 2 | 2 | 0 | 0 |" in report  # shape confusion row: circle, square, triangle, none
    assert chance()["all"] == pytest.approx(1 / 36)
    with pytest.raises(ValueError):
        score(labels, readings[:-1])


# -- bad input: one line, exit status 2, before any model is loaded --------------------------------
def expect_error(capsys, argv, text):
    assert eval_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert text in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_bad_input_errors(workdir, tiny_kit, tmp_path, capsys, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(eval_cli, "build", no_loading)
    monkeypatch.chdir(tmp_path)  # no ./laion400m_pretrain_output_trainer here
    ckpt = str(workdir / OUT / "checkpoint-2")
    expect_error(capsys, [], "train a model with `sh train.sh`")
    os.makedirs(OUT)
    expect_error(capsys, [], "no checkpoint under ./laion400m_pretrain_output_trainer")
    expect_error(capsys, ["--unet_model_name_or_path", "./nope"], "is not a folder")
    expect_error(capsys, ["--pretrained_model_name_or_path", "./CompVis/stable-diffusion-v1-4"],
                 "is not a folder")  # a path, not a hub name (those: tests/integration/test_hub.py)
    os.makedirs("empty")
    expect_error(capsys, ["--unet_model_name_or_path", "empty"], "not a UNet folder (no config.json)")
    expect_error(capsys, ["--unet_model_name_or_path", os.path.join(tiny_kit, "vae")], "not a UNet2DConditionModel")
    expect_error(capsys, ["--pretrained_model_name_or_path", ckpt], "pass it as --unet_model_name_or_path")
    expect_error(capsys, ["--unet_model_name_or_path", os.path.join(tiny_kit, "unet"), "--variant", "ema"],
                 "no 'ema' weights")
    shutil.copytree(ckpt, "moved")  # a checkpoint whose kit is gone
    state = RunState.read("moved")
    state.model_paths["vae"] = str(tmp_path / "gone" / "vae")
    state.write("moved")
    expect_error(capsys, ["--unet_model_name_or_path", "moved/unet"], "python -m sd.kit --output_dir ./tiny-sd")
    cfg = json.load(open("moved/unet/config.json"))
    json.dump({**cfg, "cross_attention_dim": 48}, open("moved/unet/config.json", "w"))
    expect_error(capsys, ["--pretrained_model_name_or_path", tiny_kit, "--unet_model_name_or_path", "moved/unet"],
                 "cross_attention_dim 48 does not match the text encoder's hidden_size 32")
    kit = ["--unet_model_name_or_path", os.path.join(ckpt, "unet")]
    expect_error(capsys, [*kit, "--height", "33"], "must be positive multiples of 2, the VAE's downsampling factor")
    open("prompts.txt", "w").write("\n  \n")
    expect_error(capsys, [*kit, "--prompt_file", "prompts.txt"], "has no prompts")
    expect_error(capsys, [*kit, "--prompt_file", "missing.txt"], "does not exist")
    expect_error(capsys, [*kit, "--device", "tpu"], "use cpu, gpu or gpu:N")
    with pytest.raises(SystemExit):  # argparse: unknown scheduler
        eval_cli.main([*kit, "--scheduler", "heun"])


def test_prompt_table_puts_each_prompt_in_its_colour_row_and_shape_background_column():
    from sd.evaluation.shapes import prompt_table

    prompts = demo_data.all_prompts()
    # solid tiles: the colour's palette RGB, darker for black backgrounds, so every cell is identifiable
    images = [Image.new("RGB", (32, 32), tuple(v // (1 if b == "white" else 2) for v in demo_data.PALETTE[c]))
              for c, s, b, _ in prompts]
    table = np.asarray(prompt_table(images, tile=64))
    cols = len(demo_data.SHAPES) * len(demo_data.BACKGROUNDS)
    margin = table.shape[1] - cols * 64
    assert table.shape[0] == 28 + 6 * 64 and margin > 0  # header, six colour rows; a label margin
    for r, colour in enumerate(demo_data.COLOURS):
        for c, (shape, background) in enumerate((s, b) for s in demo_data.SHAPES for b in demo_data.BACKGROUNDS):
            want = [v // (1 if background == "white" else 2) for v in demo_data.PALETTE[colour]]
            assert table[28 + r * 64 + 40, margin + c * 64 + 40].tolist() == want, (colour, shape, background)
    assert table[2:26, margin:].max() > 200  # the header holds the column names (white text on black)
    with pytest.raises(ValueError):
        prompt_table(images[:35])
