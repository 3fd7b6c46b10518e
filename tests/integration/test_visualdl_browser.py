"""VisualDL, for real: a short training run served by `visualdl`, read through its HTTP API and
rendered by headless Chromium (scalar page and image page: DOM after the scripts ran, screenshots).

Needs Debian's ``chromium`` (.ci/run installs it); skipped, saying so, where it is missing.
"""

import io
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest

from scripts.readme_figures import (
    dump_dom,
    find_chromium,
    loss_curve_figure,
    samples_over_steps_figure,
    screenshot,
    serve_visualdl,
    visualdl_api,
)
from tests.helpers.common import ROOT

pytestmark = [pytest.mark.long, pytest.mark.skipif(find_chromium() is None,
                                                  reason="no chromium for the VisualDL browser test: apt-get install "
                                                         "-y chromium")]
IMAGE_TAGS = {"images/original", "images/reconstruction", "images/guidance_1.0", "images/guidance_7.5"}


@pytest.fixture(scope="module")
def run(tiny_kit, demo_file_list, tmp_path_factory):
    """4 steps with VisualDL logging: scalars every step, images at steps 2 and 4."""
    out = tmp_path_factory.mktemp("vdl") / "out"
    cmd = [sys.executable, os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"), "--do_train", "--output_dir",
           str(out),
           "--pretrained_model_name_or_path", tiny_kit, "--unet_name_or_path",
           os.path.join(tiny_kit, "unet", "config.json"),
           "--file_list", demo_file_list, "--resolution", "32", "--per_device_train_batch_size", "2",
           "--learning_rate", "1e-3", "--model_max_length", "16", "--num_inference_steps", "2", "--logging_steps", "1",
           "--max_steps", "4", "--save_steps", "100", "--seed", "7", "--report_to", "visualdl",
           "--image_logging_steps", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_visualdl_serves_the_run_to_a_browser(run, tmp_path):
    from PIL import Image

    history = json.load(open(run / "trainer_state.json"))["log_history"]
    logged_loss = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(logged_loss) == [1, 2, 3, 4]
    with serve_visualdl(str(run)) as base:
        # --- VisualDL's own HTTP API: the tags and the logged steps
        (name,) = visualdl_api(base, "runs")
        scalar_tags = set(visualdl_api(base, "scalar/tags")["tags"][0])
        assert {"train/loss", "train/learning_rate"} <= scalar_tags, scalar_tags
        loss = visualdl_api(base, "scalar/list", run=name, tag="train/loss")  # [[wall time, step, value], ...]
        assert [p[1] for p in loss] == [1, 2, 3, 4]
        assert np.allclose([p[2] for p in loss], [logged_loss[s] for s in (1, 2, 3, 4)], rtol=1e-6)
        lr = visualdl_api(base, "scalar/list", run=name, tag="train/learning_rate")
        assert [p[1] for p in lr] == [1, 2, 3, 4] and all(p[2] > 0 for p in lr)
        image_tags = set(visualdl_api(base, "image/tags")["tags"][0])
        assert IMAGE_TAGS <= image_tags, image_tags
        for tag in IMAGE_TAGS:
            assert [e["step"] for e in visualdl_api(base, "image/list", run=name, tag=tag)] == [2, 4], tag
        query = urllib.parse.urlencode({"run": name, "tag": "images/original", "index": 0})
        with urllib.request.urlopen(f"{base}/app/api/image/image?{query}") as r:
            original = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))  # the step-2 strip, as served

        # --- the pages, rendered by Chromium: one chart per scalar tag, one image card per image tag
        dom = dump_dom(f"{base}/app/scalar")
        assert dom.count("<canvas") == len(scalar_tags), dom.count("<canvas")
        dom = dump_dom(f"{base}/app/sample/image")
        assert all(tag in dom for tag in IMAGE_TAGS)
        assert dom.count('src="blob:') == len(image_tags)  # each card shows a fetched image
        shots = {page: screenshot(f"{base}/app/{page}", str(tmp_path / f"{page.replace('/', '_')}.png"), height=1000)
                 for page in ("scalar", "sample/image")}

    for path in shots.values():
        im = np.asarray(Image.open(path).convert("RGB"))
        assert im.shape == (1000, 1400, 3) and len(np.unique(im.reshape(-1, 3), axis=0)) > 50, path
    # the image page shows the logged pictures: the demo shapes' flat colours of the original strip
    # (a card opens at the first logged step, scaled up) cover many pixels of the screenshot
    shot = np.asarray(Image.open(shots["sample/image"]).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(original.reshape(-1, 3), axis=0, return_counts=True)
    shape_colours = [c for c, n in zip(colours, counts) if n > 30 and c.max() - c.min() > 60]  # saturated: shapes
    assert shape_colours, "no flat shape colour in the logged originals"
    for c in shape_colours:
        assert (shot == c).all(axis=1).sum() > 100, f"colour {c} of the logged originals not on the image page"


def test_readme_figures_from_the_run(run, tmp_path):
    from PIL import Image

    curve = Image.open(loss_curve_figure(str(run), str(tmp_path / "loss.png")))
    grid = Image.open(samples_over_steps_figure(str(run), str(tmp_path / "steps.png")))
    step2 = Image.open(run / "images" / "step-0000002.png")
    assert curve.size == (800, 420)
    # steps 2 and 4 (×2), a header each
    assert grid.width == 2 * step2.width and grid.height == 2 * (2 * step2.height + 18)
    with pytest.raises(FileNotFoundError, match="image_logging_steps"):
        samples_over_steps_figure(str(tmp_path), str(tmp_path / "none.png"))
