"""FID and CLIP score against the references, on the same random weights.

* FID: pytorch-fid's own InceptionV3 (run by ``tests/helpers/fid_reference.py`` in the parity venv, which has
  torchvision; see .ci/run) and ``sd.evaluation.inception`` get the same random weights; features must agree to
  1e-4 relative and FID to 1e-3 on 32 images. Skipped, saying why, when the venv is missing.
* CLIP score: a tiny random ``transformers.CLIPModel`` saved by transformers itself; our score (Paddle,
  Hugging Face layout, and the same weights in paddlenlp layout) must equal transformers' to 1e-4.
* Without any reference: the Fréchet distance on Gaussians with a closed form, the caption formats, the
  one-line errors of the CLI.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers.common import ROOT

PARITY_VENV = os.environ.get("SD_PARITY_VENV", os.path.join(os.path.expanduser("~"), ".cache", "sd-parity-venv"))
PARITY_PYTHON = os.path.join(PARITY_VENV, "bin", "python")


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "sd.evaluation.metrics", *args], cwd=ROOT, capture_output=True,
                          text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def write_images(folder, n, seed, size=48):
    """n smooth random RGB images (blobs of colour, different per seed)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.zeros((size, size, 3))
        for _ in range(3):
            cx, cy, r = rng.uniform(0, 1, 3)
            img += rng.uniform(0, 1, 3) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.1 * r))[..., None]
        img += rng.normal(0, 0.05, img.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}_000.png"))
    return folder


def random_inception_state(seed=0):
    """Random weights for the FID Inception network under torchvision's names (as pytorch-fid's .pth):
    He-scaled convolutions, batch-norm statistics near identity, plus the unused classifier."""
    from sd.evaluation.inception import FIDInceptionV3

    rng = np.random.default_rng(seed)
    names = {"_mean": "running_mean", "_variance": "running_var"}
    state = {}
    for key, value in FIDInceptionV3().state_dict().items():
        shape = tuple(value.shape)
        head, _, last = key.rpartition(".")
        if last == "weight" and len(shape) == 4:
            w = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif last == "weight":
            w = rng.uniform(0.5, 1.5, shape)
        elif last == "bias":
            w = rng.normal(0, 0.1, shape)
        elif last == "_mean":
            w = rng.normal(0, 0.1, shape)
        else:
            w = rng.uniform(0.5, 2.0, shape)
        state[f"{head}.{names.get(last, last)}"] = w.astype(np.float32)
        if last == "_variance":
            state[f"{head}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    state["fc.weight"] = rng.normal(0, 0.01, (1008, 2048)).astype(np.float32)
    state["fc.bias"] = np.zeros(1008, dtype=np.float32)
    return state


# ---------------------------------------------------------------------------------------------
# The Fréchet distance itself
# ---------------------------------------------------------------------------------------------
def test_frechet_distance_closed_form():
    """Commuting covariances: d² = |Δμ|² + Σ (√a - √b)² over the eigenvalues."""
    from sd.evaluation.metrics import frechet_distance

    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, q @ np.diag(a) @ q.T, mu1, q @ np.diag(a) @ q.T) == pytest.approx(0, abs=1e-9)


def test_paddlemix_weight_names_map_to_ours():
    """PaddleMIX's .pdparams (paddle.vision naming) loads into the same network: every key of ours is
    produced exactly once from its names, and the classifier is dropped."""
    from sd.evaluation.inception import FIDInceptionV3, to_our_names

    ours = set(FIDInceptionV3().state_dict())
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    stem = {"Conv2d_1a_3x3": "conv_1a_3x3", "Conv2d_2a_3x3": "conv_2a_3x3", "Conv2d_2b_3x3": "conv_2b_3x3",
            "Conv2d_3b_1x1": "conv_3b_1x1", "Conv2d_4a_3x3": "conv_4a_3x3"}
    paddlemix = {}
    for key in ours:  # write our names the way paddle.vision's InceptionV3 spells them
        block, *rest = key.split(".")
        branch, layer, param = (rest if len(rest) == 3 else [None, *rest])
        idx = "0" if layer == "conv" else "1"
        if block in stem:
            paddlemix[f"inception_stem.{stem[block]}.{idx}.{param}"] = key
        else:
            branch = "branch_pool_conv" if branch == "branch_pool" else branch
            paddlemix[f"inception_block_list.{mixed.index(block)}.{branch}.{idx}.{param}"] = key
    renamed = to_our_names({**{k: np.zeros(1) for k in paddlemix}, "fc.weight": np.zeros(1), "fc.bias": np.zeros(1)})
    assert set(renamed) == ours


# ---------------------------------------------------------------------------------------------
# FID against pytorch-fid
# ---------------------------------------------------------------------------------------------
N_FID = 12  # images per side: 24 in all


@pytest.fixture(scope="module")
def fid_parity(tmp_path_factory):
    """Both sides on the same 2 × 12 images and random weights: pytorch-fid's features and FID, ours."""
    if not os.path.isfile(PARITY_PYTHON):
        pytest.skip(f"no parity venv at {PARITY_VENV} (pytorch-fid + torchvision; .ci/run creates it, "
                    "or set SD_PARITY_VENV)")
    from safetensors.numpy import save_file

    from sd.evaluation.inception import load_fid_inception
    from sd.evaluation.metrics import inception_features, list_images

    tmp = tmp_path_factory.mktemp("fid")
    dirs = {"a": write_images(str(tmp / "a"), N_FID, seed=1), "b": write_images(str(tmp / "b"), N_FID, seed=2)}
    state = random_inception_state()
    np.savez(tmp / "weights.npz", **state)
    save_file(state, str(tmp / "weights.safetensors"))
    ref = tmp / "ref"
    ref.mkdir()
    proc = subprocess.run([PARITY_PYTHON, os.path.join(ROOT, "tests", "helpers", "fid_reference.py"),
                           str(tmp / "weights.npz"),
                           dirs["a"], dirs["b"], str(ref)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_fid_inception(str(tmp / "weights.safetensors"))
    return {"tmp": tmp, "ref": ref, **dirs, "fid": json.load(open(ref / "fid.json"))["fid"],
            **{f"ref_{k}": np.load(ref / f"features_{k}.npy") for k in dirs},
            **{f"ours_{k}": inception_features(list_images(d), model, batch_size=5) for k, d in dirs.items()}}


@pytest.mark.long
def test_fid_features_equal_pytorch_fid(fid_parity):
    """Features within 1e-4 (relative, per image) of pytorch-fid's (the FID itself: the next test)."""
    p = fid_parity
    for side in ("a", "b"):
        ours, ref = p[f"ours_{side}"], p[f"ref_{side}"]
        assert ours.shape == ref.shape == (N_FID, 2048)
        rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() <= 1e-4, rel.max()


@pytest.mark.long
def test_fid_cli_with_pth_or_safetensors_and_npz_statistics(fid_parity, tmp_path):
    """``python -m sd.evaluation.metrics fid DIR stats.npz`` prints pytorch-fid's FID last, with pytorch-fid's own
    .pth (torchvision's state dict, read with weights_only=True) when PyTorch is installed, else with
    the .safetensors copy; the .npz holds the other side's (mu, sigma)."""
    from sd.evaluation.metrics import statistics

    p = fid_parity
    mu, sigma = statistics(p["ours_b"])
    np.savez(tmp_path / "b.npz", mu=mu, sigma=sigma)
    try:
        import torch  # noqa: F401

        weights = str(p["ref"] / "weights.pth")
    except ImportError:
        weights = str(p["tmp"] / "weights.safetensors")
    out = run_cli("fid", p["a"], str(tmp_path / "b.npz"), "--inception_weights", weights)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("FID ")
    assert float(last.split()[1]) == pytest.approx(p["fid"], rel=1e-3)
    assert p["fid"] > 1.0  # two different image sets: a distance well above rounding


@pytest.mark.long
def test_paddle_path_never_imports_torch(tmp_path):
    """With .safetensors weights the FID features run without PyTorch (here: with torch made unimportable;
    ``fid_stats``, the same path as ``fid`` up to the distance, which is numpy/scipy only)."""
    from safetensors.numpy import save_file

    save_file(random_inception_state(), str(tmp_path / "w.safetensors"))
    a = write_images(str(tmp_path / "a"), 2, seed=1, size=16)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked by the test')\n")
    out = run_cli("fid_stats", a, str(tmp_path / "a.npz"), "--inception_weights", str(tmp_path / "w.safetensors"),
                  env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr[-2000:]
    with np.load(tmp_path / "a.npz") as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)


def test_cli_user_mistakes_are_one_line(tmp_path):
    a = write_images(str(tmp_path / "a"), 2, seed=1, size=16)
    corrupt = tmp_path / "pt_inception.safetensors"
    corrupt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    cases = [("fid", a, str(tmp_path / "none"), "--inception_weights", str(tmp_path / "w.safetensors")),
             ("fid", a, a, "--fid_features", "clip"),
             ("fid", a, a, "--inception_weights", str(corrupt)),  # a truncated download
             ("clip_score", "--clip_model_name_or_path", str(tmp_path), "--images", a, "--captions",
              str(tmp_path / "c.txt"))]
    for args in cases:
        out = run_cli(*args, env={"HOME": str(tmp_path)})  # no cached Inception weights either
        assert out.returncode == 2, (args, out.stderr[-2000:])
        lines = out.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("error: ") and "Traceback" not in out.stderr, (args, out.stderr[-2000:])


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def test_caption_formats(tmp_path):
    from sd.evaluation.metrics import MetricsError, read_captions

    images = write_images(str(tmp_path / "img"), 3, seed=0, size=8)
    (tmp_path / "lines.txt").write_text("first\nsecond\n\nthird\nfourth\n")
    files, caps = read_captions(str(tmp_path / "lines.txt"), images)
    assert [os.path.basename(f) for f in files] == ["00000_000.png", "00001_000.png", "00002_000.png"]
    assert caps == ["first", "second", "third"]  # the first N for N images
    # PaddleMIX's coco30k.tsv: tab-separated with a header, captions in column caption_en
    (tmp_path / "coco.tsv").write_text("id\tcaption_en\tcaption_zh\n"
                                       "7\ta cat, on a mat\t猫\n8\ta dog\t狗\n9\ta cow\t牛\n",
                                       encoding="utf-8")
    assert read_captions(str(tmp_path / "coco.tsv"), images)[1] == ["a cat, on a mat", "a dog", "a cow"]
    recs = [{"image": "00002_000.png", "caption": "x"}, {"image": "00000_000.png", "caption": "y"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    files, caps = read_captions(str(tmp_path / "pairs.jsonl"), images)
    assert [os.path.basename(f) for f in files] == ["00002_000.png", "00000_000.png"] and caps == ["x", "y"]
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(MetricsError, match="1 captions for 3 images"):
        read_captions(str(tmp_path / "short.txt"), images)


# ---------------------------------------------------------------------------------------------
# CLIP score against transformers
# ---------------------------------------------------------------------------------------------
def demo_pairs(folder, n=12, size=40, seed=0):
    """n rendered demo images (larger than the CLIP input: resize and crop are exercised) and their captions."""
    from sd.data import demo_data

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    prompts = demo_data.all_prompts()[:n]
    for i, (c, s, b, _) in enumerate(prompts):
        demo_data.render(c, s, b, size, rng).save(os.path.join(folder, f"{i:05d}.png"))
    return [p[3] for p in prompts]


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny random CLIPModel, CLIPTokenizer and CLIPImageProcessor saved by transformers, and
    transformers' own CLIP scores of 12 demo images (tests/helpers/clip_reference.py, in a subprocess without
    USE_TORCH=0)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("PyTorch or transformers not installed (pip install -r requirements-interop.txt)")
    from sd.data import demo_data
    from sd.kit.tokenizer import learn_bpe, save_tokenizer

    tmp = tmp_path_factory.mktemp("clip")
    save_tokenizer(str(tmp / "tok"), learn_bpe([p[3] for p in demo_data.all_prompts()]), model_max_length=16)
    captions = demo_pairs(str(tmp / "images"))
    (tmp / "captions.txt").write_text("\n".join(captions) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "helpers", "clip_reference.py"),
                           str(tmp / "tok"),
                           str(tmp / "images"), str(tmp / "captions.txt"), str(tmp)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = str(tmp / "hf_clip")
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    ref = np.load(tmp / "reference.npz")
    cos, scale = ref["cos"], float(ref["logit_scale"])
    return {"folder": folder, "images": str(tmp / "images"), "captions": str(tmp / "captions.txt"), "cos": cos,
            "clip_score": float((scale * cos).mean()), "torchmetrics": float((100 * np.maximum(cos, 0)).mean()),
            "image_features": ref["image_features"]}


def test_clip_score_equals_transformers(hf_clip):
    from sd.evaluation.metrics import clip_score_of, load_clip, read_captions

    clip = load_clip(hf_clip["folder"])
    assert clip.layout == "hf"
    res = clip_score_of(clip, *read_captions(hf_clip["captions"], hf_clip["images"]))
    ref_scores = np.asarray(res["per_image"]) / res["logit_scale"]
    assert np.abs(ref_scores - hf_clip["cos"]).max() <= 1e-5  # every pair's cosine
    assert res["clip_score"] == pytest.approx(hf_clip["clip_score"], rel=1e-4)
    assert res["clip_score_torchmetrics"] == pytest.approx(hf_clip["torchmetrics"], rel=1e-4)
    assert abs(hf_clip["clip_score"]) > 1e-3  # not a trivially small mean
    out = run_cli("clip_score", "--clip_model_name_or_path", hf_clip["folder"], "--images", hf_clip["images"],
                  "--captions", hf_clip["captions"])
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("CLIP score ") and float(last.split()[-1]) == pytest.approx(hf_clip["clip_score"], rel=1e-4)


def test_fd_clip_uses_the_clip_image_embeddings(hf_clip):
    from sd.evaluation.metrics import FeatureExtractor, list_images

    feats = FeatureExtractor("clip", clip_model_name_or_path=hf_clip["folder"])(list_images(hf_clip["images"]))
    np.testing.assert_allclose(feats, hf_clip["image_features"], rtol=1e-4, atol=1e-5)


def test_the_kits_clip_loads_in_paddlenlp_layout_and_is_meaningful(tiny_kit, tmp_path):
    """tiny-sd/clip: paddlenlp's CLIPModel with the kit's text encoder as its text tower, unchanged;
    matching captions score higher than shuffled ones."""
    import paddle
    from ppdiffusers.transformers import CLIPTextModel

    from sd.evaluation.metrics import clip_score_of, load_clip, read_captions

    clip = load_clip(os.path.join(tiny_kit, "clip"))
    assert clip.layout == "paddlenlp"
    captions = demo_pairs(str(tmp_path / "images"), n=36, size=32, seed=5)
    ids = clip.processor.tokenizer(captions, padding="max_length", max_length=16,
                                   return_attention_mask=False)["input_ids"]
    ids = paddle.to_tensor(np.asarray(ids, dtype=np.int64))
    kit_text = CLIPTextModel.from_pretrained(os.path.join(tiny_kit, "text_encoder"))
    kit_text.eval()
    with paddle.no_grad():
        np.testing.assert_allclose(clip.model.text_model(ids)[1].numpy(), kit_text(ids)[1].numpy(), rtol=1e-5,
                                   atol=1e-5)
    files, caps = read_captions(_write(tmp_path / "c.txt", captions), str(tmp_path / "images"))
    matched = clip_score_of(clip, files, caps)["clip_score"]
    shuffled = clip_score_of(clip, files, caps[7:] + caps[:7])["clip_score"]
    assert matched > shuffled + 1.0, (matched, shuffled)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# PaddleMIX's FID code in the shared reference folder: beside a clone (../shared) or two levels up from a worktree
PADDLEMIX_FID = next((p for p in (os.path.join(ROOT, "..", "shared", "reference", "paddlemix_fid_clip_score"),
                                  os.path.join(ROOT, "..", "..", "shared", "reference", "paddlemix_fid_clip_score"))
                      if os.path.isdir(p)), os.path.join(ROOT, "..", "shared", "reference", "paddlemix_fid_clip_score"))


def test_paddlemix_port_and_pdparams_give_our_features(tmp_path, monkeypatch):
    """PaddleMIX's own Paddle port (its inception.py, read from the reference folder) with random weights
    saved as a .pdparams in its naming: our network loads that file and gives the same features."""
    import importlib.util

    import paddle

    path = os.path.join(PADDLEMIX_FID, "inception.py")
    if not os.path.isfile(path):
        pytest.skip(f"PaddleMIX's reference code is not at {PADDLEMIX_FID}")
    spec = importlib.util.spec_from_file_location("paddlemix_inception", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    weights = str(tmp_path / "pp_inception-2015-12-05-6726825d.pdparams")
    monkeypatch.setattr(ref, "get_weights_path_from_url", lambda *a, **k: weights)  # its download, made local
    paddle.save({}, weights)
    names = ref.fid_inception_v3().state_dict()  # an empty file: random init, to read its names and shapes
    rng = np.random.default_rng(3)
    state = {}
    for key, value in names.items():
        shape = tuple(value.shape)
        w = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])) if len(shape) == 4 else 0.1, shape)
        if key.endswith("_variance"):
            w = np.abs(w) + 0.5
        elif key.endswith(".1.weight"):  # batch-norm scale
            w = w + 1.0
        state[key] = paddle.to_tensor(w.astype(np.float32))
    paddle.save(state, weights)
    theirs = ref.InceptionV3([3])
    theirs.eval()

    from sd.evaluation.inception import load_fid_inception

    ours = load_fid_inception(weights)
    x = paddle.to_tensor(np.random.default_rng(0).uniform(0, 1, (2, 3, 40, 40)).astype(np.float32))
    with paddle.no_grad():
        a = ours(x).numpy()
        b = theirs(x)[0].squeeze(3).squeeze(2).numpy()
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert rel.max() <= 1e-5, rel.max()
