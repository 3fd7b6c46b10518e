"""FID and CLIP score against the references, on the same random weights.

* FID: pytorch-fid's own InceptionV3 (run by ``tests/fid_reference.py`` in the parity venv, which has
  torchvision; see .ci/run) and ``sd.inception`` get the same random weights; features must agree to
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARITY_VENV = os.environ.get("SD_PARITY_VENV", os.path.join(os.path.expanduser("~"), ".cache", "sd-parity-venv"))
PARITY_PYTHON = os.path.join(PARITY_VENV, "bin", "python")


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "sd.metrics", *args], cwd=ROOT, capture_output=True, text=True,
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
    from sd.inception import FIDInceptionV3

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
    from sd.metrics import frechet_distance

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
    from sd.inception import FIDInceptionV3, to_our_names

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
@pytest.fixture(scope="module")
def fid_parity(tmp_path_factory):
    """Both sides on the same 2 × 16 images and weights: (our features, reference outputs, paths)."""
    if not os.path.isfile(PARITY_PYTHON):
        pytest.skip(f"no parity venv at {PARITY_VENV} (pytorch-fid + torchvision; .ci/run creates it, "
                    "or set SD_PARITY_VENV)")
    tmp = tmp_path_factory.mktemp("fid")
    dir_a, dir_b = write_images(str(tmp / "a"), 16, seed=1), write_images(str(tmp / "b"), 16, seed=2)
    state = random_inception_state()
    np.savez(tmp / "weights.npz", **state)
    from safetensors.numpy import save_file

    save_file(state, str(tmp / "weights.safetensors"))
    ref = tmp / "ref"
    ref.mkdir()
    proc = subprocess.run([PARITY_PYTHON, os.path.join(ROOT, "tests", "fid_reference.py"), str(tmp / "weights.npz"),
                           dir_a, dir_b, str(ref)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "a": dir_a, "b": dir_b, "ref": ref,
            "features_a": np.load(ref / "features_a.npy"), "features_b": np.load(ref / "features_b.npy"),
            "fid": json.load(open(ref / "fid.json"))["fid"]}


def test_fid_features_and_value_equal_pytorch_fid(fid_parity):
    """The CLI with the .safetensors weights: FID within 1e-3 of pytorch-fid's; our features within
    1e-4 (relative, per image) of pytorch-fid's."""
    from sd.inception import load_fid_inception
    from sd.metrics import inception_features, list_images

    p = fid_parity
    model = load_fid_inception(str(p["tmp"] / "weights.safetensors"))
    for side in ("a", "b"):
        ours, ref = inception_features(list_images(p[side]), model, batch_size=5), p[f"features_{side}"]
        assert ours.shape == ref.shape == (16, 2048)
        rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() <= 1e-4, rel.max()
    out = run_cli("fid", p["a"], p["b"], "--inception_weights", str(p["tmp"] / "weights.safetensors"))
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("FID ")
    assert float(last.split()[1]) == pytest.approx(p["fid"], rel=1e-3)
    assert p["fid"] > 1.0  # two different image sets: a distance well above rounding


def test_fid_from_pth_and_npz_statistics(fid_parity, tmp_path):
    """pytorch-fid's own .pth (torchvision's state dict, read with weights_only=True) and a statistics
    .npz saved by fid_stats give the same FID."""
    pytest.importorskip("torch")
    p = fid_parity
    pth = str(p["ref"] / "weights.pth")
    stats = str(tmp_path / "b.npz")
    out = run_cli("fid_stats", p["b"], stats, "--inception_weights", pth)
    assert out.returncode == 0, out.stderr[-2000:]
    out = run_cli("fid", p["a"], stats, "--inception_weights", pth)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1].split()[1]) == pytest.approx(p["fid"], rel=1e-3)


def test_paddle_path_never_imports_torch(tmp_path):
    """With .safetensors weights the FID path runs without PyTorch (here: with torch made unimportable)."""
    from safetensors.numpy import save_file

    save_file(random_inception_state(), str(tmp_path / "w.safetensors"))
    a, b = write_images(str(tmp_path / "a"), 2, seed=1, size=16), write_images(str(tmp_path / "b"), 2, seed=2, size=16)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked by the test')\n")
    out = run_cli("fid", a, b, "--inception_weights", str(tmp_path / "w.safetensors"),
                  env={"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("FID ")
