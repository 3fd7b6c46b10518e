"""Demo shapes: vocabulary, rendering rules, deterministic files, and the checker's accuracy."""

import io
import json

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sd.data import demo_data
from sd.data.demo_data import COLOURS, all_prompts, caption_for, check, render, write_demo_jsonl


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
        assert min(ys.max() - ys.min(), xs.max() - xs.min()) + 1 >= 48 / 3  # shorter extent ≥ a third


def test_checker_agrees_with_ground_truth():
    rng = np.random.default_rng(123)
    total = wrong = wrong_jpeg = 0
    for i in range(144):  # 4 images of each of the 36 prompts
        c, s, b, _ = all_prompts()[i % 36]
        img = render(c, s, b, 64, rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        total += 1
        wrong += check(img) != demo_data.Reading(c, s, b)
        wrong_jpeg += check(Image.open(buf)) != demo_data.Reading(c, s, b)
    assert wrong / total <= 0.01 and wrong_jpeg / total <= 0.01


def _agreement(size, transform, n=108, seed=5):
    rng, noise_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    ok = 0
    for i in range(n):
        c, s, b, _ = all_prompts()[i % 36]
        ok += check(transform(render(c, s, b, size, rng), noise_rng)) == demo_data.Reading(c, s, b)
    return ok / n


def test_checker_is_robust_to_what_generated_images_look_like():
    def noisy(img, rng):  # Gaussian pixel noise, σ = 40 of 255
        return Image.fromarray(np.clip(np.asarray(img) + rng.normal(0, 40, (img.height, img.width, 3)), 0,
                                       255).astype(np.uint8))

    assert _agreement(64, lambda im, r: im.filter(ImageFilter.GaussianBlur(1.5))) >= 0.99
    assert _agreement(32, lambda im, r: im.filter(ImageFilter.GaussianBlur(1.5))) >= 0.99  # a small, very soft shape
    assert _agreement(64, lambda im, r: im.resize((32, 32), Image.BICUBIC)) >= 0.99  # what training at 32 px sees
    assert _agreement(32, noisy) >= 0.99
    assert _agreement(64, noisy) >= 0.99


def test_checker_ignores_specks_and_off_white_backgrounds():
    rng = np.random.default_rng(9)
    for c, s, b, _ in all_prompts():
        arr = np.asarray(render(c, s, b, 64, rng)).astype(np.int16)
        arr = np.clip(arr + (-25 if b == "white" else 25), 0, 255)  # a grey-ish background and shape
        speck = (slice(1, 4), slice(1, 4)) if arr[2, 2].tolist() == arr[0, 0].tolist() \
            else (slice(60, 63), slice(60, 63))
        arr[speck] = demo_data.PALETTE[COLOURS[(COLOURS.index(c) + 3) % 6]]  # a stray 3×3 blob of another colour
        assert check(Image.fromarray(arr.astype(np.uint8))) == demo_data.Reading(c, s, b), (c, s, b)


def test_checker_says_none_without_a_shape():
    assert check(Image.new("RGB", (32, 32), (255, 255, 255))) == demo_data.Reading("none", "none", "white")
    assert check(Image.new("RGB", (64, 64), (10, 10, 10))) == demo_data.Reading("none", "none", "black")
    tiny = Image.new("RGB", (64, 64), (0, 0, 0))
    tiny.paste((220, 30, 30), (30, 30, 34, 34))  # 16 px: under 2 % of the image
    assert check(tiny) == demo_data.Reading("none", "none", "black")


def test_checker_tells_shapes_apart_by_form_not_size():
    # The same colour and area drawn as each shape must read as that shape.
    for shape, box in (("square", (20, 20, 43, 43)), ("circle", (18, 18, 45, 45))):
        img = Image.new("RGB", (64, 64), (255, 255, 255))
        (ImageDraw.Draw(img).rectangle if shape == "square" else ImageDraw.Draw(img).ellipse)(
            box, fill=demo_data.PALETTE["blue"])
        assert check(img).shape == shape
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(img).polygon([(32, 10), (10, 50), (54, 50)], fill=demo_data.PALETTE["green"])
    assert check(img) == demo_data.Reading("green", "triangle", "black")


def test_jsonl_is_balanced_and_deterministic(tmp_path):
    a = write_demo_jsonl(str(tmp_path / "a"), 72, size=32, seed=4)
    b = write_demo_jsonl(str(tmp_path / "b"), 72, size=32, seed=4)
    assert open(a).read() == open(b).read()
    recs = [json.loads(line) for line in open(a)]
    assert sorted(r["caption"] for r in recs) == sorted([p[3] for p in all_prompts()] * 2)
    for r in recs[:5]:
        assert (tmp_path / "a" / r["image"]).read_bytes() == (tmp_path / "b" / r["image"]).read_bytes()
        assert check(Image.open(tmp_path / "a" / r["image"])) == demo_data.Reading(r["colour"], r["shape"],
                                                                                   r["background"])
