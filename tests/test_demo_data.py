"""Demo shapes: vocabulary, rendering rules, deterministic files, and the checker's accuracy."""

import io
import json

import numpy as np
from PIL import Image, ImageFilter

from sd import demo_data
from sd.demo_data import all_prompts, caption_for, check, render, write_demo_jsonl


def test_vocabulary_and_captions():
    prompts = all_prompts()
    assert len(prompts) == 36 and len(set(p[3] for p in prompts)) == 36
    assert prompts[0] == ("red", "circle", "white", "a red circle on a white background")
    assert caption_for("purple", "triangle", "black") == "a purple triangle on a black background"


def test_shape_is_inside_and_large_enough():
    rng = np.random.default_rng(0)
    for i in range(100):
        c, s, b, _ = all_prompts()[i % 36]
        arr = np.asarray(render(c, s, b, 48, rng)).astype(int)
        bg = np.array(demo_data.BACKGROUND_RGB[b])
        ys, xs = np.nonzero(np.abs(arr - bg).sum(axis=2) > 0)
        extent = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
        assert extent >= 48 / 3 - 1


def test_checker_agrees_with_ground_truth():
    rng = np.random.default_rng(123)
    total = wrong = wrong_jpeg = 0
    for i in range(360):
        c, s, b, _ = all_prompts()[i % 36]
        img = render(c, s, b, 64, rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        total += 1
        wrong += check(img) != demo_data.Reading(c, s, b)
        wrong_jpeg += check(Image.open(buf)) != demo_data.Reading(c, s, b)
    assert wrong / total <= 0.01 and wrong_jpeg / total <= 0.01


def test_checker_tolerates_blur_and_says_none_for_blank():
    rng = np.random.default_rng(5)
    ok = sum(check(render(c, s, b, 64, rng).filter(ImageFilter.GaussianBlur(1))) == demo_data.Reading(c, s, b)
             for c, s, b, _ in all_prompts() * 3)
    assert ok / 108 >= 0.9
    assert check(Image.new("RGB", (32, 32), (255, 255, 255))) == demo_data.Reading("none", "none", "white")


def test_jsonl_is_balanced_and_deterministic(tmp_path):
    a = write_demo_jsonl(str(tmp_path / "a"), 72, size=32, seed=4)
    b = write_demo_jsonl(str(tmp_path / "b"), 72, size=32, seed=4)
    assert open(a).read() == open(b).read()
    recs = [json.loads(l) for l in open(a)]
    assert sorted(r["caption"] for r in recs) == sorted([p[3] for p in all_prompts()] * 2)
    for r in recs[:5]:
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
        assert check(Image.open(tmp_path / "a" / r["image"])) == demo_data.Reading(r["colour"], r["shape"], r["background"])
