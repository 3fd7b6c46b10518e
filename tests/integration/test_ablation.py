"""benchmarks/ablation.py: rows train through train.sh, are scored on two seed sets, and survive a re-run."""

import json
import os
import subprocess
import sys

import pytest

from sd.runtime.run_state import RunState
from tests.helpers.common import ROOT

# Four short trainings through train.sh: a research tool's test, outside the default suite.
pytestmark = pytest.mark.slow


def run_ablation(tiny_kit, file_list, out, *rows):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "ablation.py"), "--output_dir", str(out),
           "--kit", tiny_kit, "--file_list", file_list, "--steps", "2", "--nproc", "1", "--num_seeds", "1",
           "--guidance", "5", "--num_inference_steps", "2", "--nice", "0", "--rows", *rows]
    env = {**os.environ, "MODEL_MAX_LENGTH": "16", "LOGGING_STEPS": "1", "NUM_WORKERS": "0"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_rows_are_trained_scored_and_tabled(tiny_kit, demo_file_list, tmp_path):
    out = tmp_path / "ablation"
    run_ablation(tiny_kit, demo_file_list, out, "baseline", "default", "no EMA")
    res = json.load(open(out / "ablation.json"))
    assert res["steps"] == 2 and res["nproc"] == 1 and res["tune_seeds"] == [0] and res["report_seeds"] == [1000]
    rows = res["rows"]
    assert list(rows) == ["baseline", "default", "no EMA"]
    assert rows["baseline"]["env"] == {"SNR_GAMMA": "", "NOISE_OFFSET": "0", "FLAG_USE_EMA": "0"}
    # the budget is counted at batch 32 whatever train.sh's own default batch is
    assert '"BATCH_SIZE": "32"' in (out / "default.train.log").read_text().splitlines()[0]
    for name, r in rows.items():
        assert r["train"]["steps"] == 2 and r["train"]["processes"] == 1, name
        for seeds in ("tune", "report"):
            s = r[seeds]["5"]
            assert set(s) >= {"colour", "shape", "background", "all"}, name
            assert all(0 <= s[k] <= 1 for k in ("colour", "shape", "background", "all")), (name, s)
    # the baseline trains without EMA and is scored on its raw weights; the default keeps an EMA
    assert rows["baseline"]["train"]["ema"] is False and rows["default"]["train"]["ema"] is True
    assert any(f.endswith(".ema.safetensors") for f in os.listdir(out / "default" / "unet"))
    # "no EMA" is the default's own training run, scored on its raw weights in separate eval folders
    assert rows["no EMA"]["train"] == {**rows["default"]["train"], "ema": False}
    assert (out / "default" / "eval_tune_raw" / "shapes_eval.json").is_file()
    assert not (out / "no_EMA").exists()
    table = (out / "ablation.md").read_text()
    for name in rows:
        assert f"| {name} |" in table


def test_random_text_encoder_row_and_a_rerun_reusing_its_training(tiny_kit, demo_file_list, tmp_path):
    out = tmp_path / "ablation"
    run_ablation(tiny_kit, demo_file_list, out, "random text encoder")
    row = out / "random_text_encoder"
    # trained (and therefore scored: eval.py follows the checkpoint's record) with the random encoder
    assert RunState.read(str(row)).model_paths["text_encoder"] == str(out / "text_encoder_random_init")
    assert os.path.isdir(row / "unet") and not os.path.isfile(row / "config.json")
    log = out / "random_text_encoder.train.log"
    first = log.stat().st_mtime_ns
    os.remove(out / "ablation.json")  # as if interrupted after training, before scoring
    run_ablation(tiny_kit, demo_file_list, out, "random text encoder")
    assert log.stat().st_mtime_ns == first  # not trained again
    assert "random text encoder" in json.load(open(out / "ablation.json"))["rows"]
