"""FID and CLIP score, as PaddleMIX's ``compute_fid_clip_score.py`` defines them, as a module and a CLI.

    python -m sd.evaluation.metrics fid DIR_A DIR_B_or_stats.npz --inception_weights W        # FID
    python -m sd.evaluation.metrics fid DIR_A DIR_B --fid_features clip --clip_model_name_or_path ./tiny-sd/clip
    python -m sd.evaluation.metrics fid_stats DIR OUT.npz --inception_weights W    # reference statistics (mu, sigma)
    python -m sd.evaluation.metrics clip_score --clip_model_name_or_path M --images DIR --captions FILE

(W: the FID Inception weights, e.g. pytorch-fid's pt_inception-2015-12-05-6726825d.pth; the second line: FD-CLIP.)

* **FID** (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the pool-3 features
  (2048-d) of the FID Inception network (``sd/evaluation/inception.py``, pytorch-fid's graph) of two image sets,
  ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. Images are read as RGB, scaled to [0, 1] and resized
  by the network to 299 × 299 (pytorch-fid's and PaddleMIX's pipeline; ``--resolution N`` first resizes
  every image to N × N, as PaddleMIX's ``fid_score.py --resolution``). A set is a folder
  of images (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp; sorted by name) or a ``.npz`` with ``mu`` and
  ``sigma``, such as PaddleMIX's COCO statistics.
* **FD-CLIP** (``--fid_features clip``): the same distance on the CLIP image embeddings
  (``get_image_features``, the projected, unnormalised embedding), for when no Inception weights exist.
  Not comparable with FID numbers.
* **CLIP score**: for each (image, caption) pair the cosine of the CLIP image and text embeddings;
  PaddleMIX reports ``logit_scale.exp() · cos`` averaged over pairs (100 · cos for the OpenAI models);
  torchmetrics' ``CLIPScore`` is ``100 · max(cos, 0)``. Both are printed, PaddleMIX's last.
  Captions: a text file with one caption per line matching the images in sorted file-name order (the
  first N lines for N images), PaddleMIX's ``coco30k.tsv``/``.csv`` (tab-separated, column ``caption_en``),
  or a ``.jsonl`` of ``{"image": path, "caption": text}`` (paths relative to --images or to the jsonl).

CLIP models: a folder in paddlenlp layout (``paddlenlp.transformers.CLIPModel.save_pretrained``, e.g. the
kit's ``tiny-sd/clip``) or in Hugging Face layout (transformers ``save_pretrained``, safetensors), each with
its tokenizer and ``preprocessor_config.json``; or a name such as ``openai/clip-vit-base-patch32`` that
paddlenlp's ``from_pretrained`` finds in its cache or downloads (on a connected machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")


class MetricsError(ValueError):
    """A user mistake (missing file, wrong format, too few captions); the CLI prints it as one line."""


# ---------------------------------------------------------------------------------------------
# Image sets
# ---------------------------------------------------------------------------------------------
def list_images(folder: str) -> List[str]:
    """The image files directly inside ``folder``, sorted by name."""
    if not os.path.isdir(folder):
        raise MetricsError(f"{folder} is not a folder of images (nor a .npz of statistics)")
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, n)))
    if not files:
        raise MetricsError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _same_size_batches(files: Sequence[str], batch_size: int, resolution: Optional[int] = None):
    """Consecutive runs of at most ``batch_size`` images of one size, as float32 (B, 3, H, W) in [0, 1];
    with ``resolution``, each image is first resized to resolution × resolution (PIL's default bicubic,
    PaddleMIX's ``--resolution``)."""
    from PIL import Image

    batch, size = [], None
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resolution and im.size != (resolution, resolution):
                im = im.resize((resolution, resolution))
            arr = np.asarray(im, dtype=np.float32) / 255.0  # (H, W, 3)
        if batch and (arr.shape != size or len(batch) == batch_size):
            yield np.stack(batch).transpose(0, 3, 1, 2)
            batch = []
        batch.append(arr)
        size = arr.shape
    if batch:
        yield np.stack(batch).transpose(0, 3, 1, 2)


def inception_features(files: Sequence[str], model, batch_size: int = 50, desc: str = "FID features",
                       resolution: Optional[int] = None) -> np.ndarray:
    """Pool-3 features (N, 2048) float64 of ``files`` through ``model`` (``sd.evaluation.inception.FIDInceptionV3``).
    A feature does not depend on its batch: the network resizes and pools each image alone."""
    import paddle
    from tqdm import tqdm

    out = []
    with paddle.no_grad(), tqdm(total=len(files), desc=desc, unit="image") as bar:
        for x in _same_size_batches(files, batch_size, resolution):
            out.append(model(paddle.to_tensor(x)).numpy().astype(np.float64))
            bar.update(len(x))
    return np.concatenate(out)


def statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)): the mean and the unbiased covariance of features (N, D)."""
    if len(features) < 2:
        raise MetricsError(f"a covariance needs at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``.

    The matrix square root is scipy's ``sqrtm``; when the product is singular (fewer images than
    dimensions) ``eps`` is added to both diagonals first, and a negligible imaginary part from rounding
    is dropped (as pytorch-fid does, so the numbers agree).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"the two statistics differ in size ({mu1.shape[0]} vs {mu2.shape[0]} features): "
                           "compute both with the same network")
    root = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"the square root of the covariance product has an imaginary part "
                             f"{np.abs(root.imag).max():g}")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def read_stats(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a ``.npz`` with those two arrays (pytorch-fid's and PaddleMIX's statistics files)."""
    if not os.path.isfile(path):
        raise MetricsError(f"{path} does not exist")
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise MetricsError(f"{path} has no 'mu' and 'sigma' arrays (found {', '.join(f.files)})")
        return f["mu"][:], f["sigma"][:]


# ---------------------------------------------------------------------------------------------
# Feature networks
# ---------------------------------------------------------------------------------------------
def load_inception(weights: Optional[str]):
    """The FID Inception network with ``weights`` (or a copy pytorch-fid / PaddleMIX downloaded before)."""
    from sd.evaluation import inception

    path = weights or inception.find_weights()
    if path is None:
        raise MetricsError("no FID Inception weights: pass --inception_weights FILE (pytorch-fid's "
                           f"{inception.WEIGHT_FILES[0]} from its GitHub release, or PaddleMIX's "
                           f"{inception.WEIGHT_FILES[2]}), "
                           "or use --fid_features clip --clip_model_name_or_path M for FD-CLIP")
    try:
        return inception.load_fid_inception(path)
    except (FileNotFoundError, ValueError) as e:  # a missing file, or not the FID network's weights
        raise MetricsError(str(e)) from None


class FeatureExtractor:
    """Images → features for a Fréchet distance: ``kind`` "inception" (FID) or "clip" (FD-CLIP)."""

    def __init__(self, kind: str = "inception", inception_weights: Optional[str] = None,
                 clip_model_name_or_path: Optional[str] = None, batch_size: int = 50,
                 resolution: Optional[int] = None):
        self.kind, self.batch_size, self.resolution = kind, batch_size, resolution
        if kind == "inception":
            from sd.evaluation.inception import find_weights

            self.source = inception_weights or find_weights()
            self.model = load_inception(self.source)
        elif kind == "clip":
            if not clip_model_name_or_path:
                raise MetricsError("--fid_features clip needs --clip_model_name_or_path (e.g. ./tiny-sd/clip)")
            self.source = clip_model_name_or_path
            self.clip = load_clip(clip_model_name_or_path)
        else:
            raise MetricsError(f"--fid_features {kind}: use inception or clip")

    def __call__(self, files: Sequence[str]) -> np.ndarray:
        if self.kind == "inception":
            return inception_features(files, self.model, self.batch_size, resolution=self.resolution)
        return self.clip.image_features(files, self.batch_size).astype(np.float64)

    def stats_of(self, path: str) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) of a folder of images, or read from a ``.npz``."""
        if path.endswith(".npz"):
            return read_stats(path)
        return statistics(self(list_images(path)))


def fid(path_a: str, path_b: str, extractor: FeatureExtractor) -> float:
    """The Fréchet distance between two image sets (folders or ``.npz`` statistics)."""
    return frechet_distance(*extractor.stats_of(path_a), *extractor.stats_of(path_b))


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------
def _weight_keys(folder: str) -> List[str]:
    """The tensor names of a model folder's weight file (safetensors header, or a .pdparams)."""
    import struct

    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                return [k for k in json.loads(f.read(n)) if k != "__metadata__"]
        if name.endswith(".pdparams"):
            import paddle

            return list(paddle.load(path, return_numpy=True))
    return []


class Clip:
    """A loaded CLIP model with its processor: image and text embeddings, and the logit scale.

    ``layout`` is "paddlenlp" (paddlenlp's own parameter names: ``vision_model.ln_pre``,
    ``vision_projection``, ...) or "hf" (Hugging Face names, loaded by ppdiffusers' CLIPModel,
    converting PyTorch weights on load). Both classes give the same embeddings (tested).
    """

    def __init__(self, model, processor, layout: str, source: str):
        self.model, self.processor, self.layout, self.source = model, processor, layout, source
        self.model.eval()

    @property
    def logit_scale(self) -> float:
        return float(np.exp(np.asarray(self.model.logit_scale.numpy(), dtype=np.float64).reshape(-1)[0]))

    def image_features(self, images, batch_size: int = 64) -> np.ndarray:
        """(N, P) projected image embeddings of image paths or PIL images."""
        import paddle
        from PIL import Image
        from tqdm import tqdm

        out = []
        with paddle.no_grad():
            for i in tqdm(range(0, len(images), batch_size), desc="CLIP images", unit="batch",
                          disable=len(images) <= batch_size):
                chunk = [Image.open(im).convert("RGB") if isinstance(im, str) else im.convert("RGB")
                         for im in images[i : i + batch_size]]
                pixels = self.processor.image_processor(images=chunk, return_tensors="np")["pixel_values"]
                out.append(self.model.get_image_features(pixel_values=paddle.to_tensor(pixels)).numpy())
        return np.concatenate(out).astype(np.float64)

    def text_features(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N, P) projected text embeddings; captions are padded to and truncated at the tokenizer's
        ``model_max_length`` (PaddleMIX's call)."""
        import paddle

        tok = self.processor.tokenizer
        out = []
        with paddle.no_grad():
            for i in range(0, len(texts), batch_size):
                ids = tok(list(texts[i : i + batch_size]), padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_attention_mask=False)["input_ids"]
                out.append(self.model.get_text_features(input_ids=paddle.to_tensor(np.asarray(ids,
                                                                                              dtype=np.int64))).numpy())
        return np.concatenate(out).astype(np.float64)


def _local_name(name_or_path: str) -> Optional[str]:
    """A local folder for ``name_or_path``: itself, or its copy in the ppdiffusers or paddlenlp cache."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from paddlenlp.utils.env import MODEL_HOME
    from ppdiffusers.utils import PPDIFFUSERS_CACHE

    for cache in (PPDIFFUSERS_CACHE, MODEL_HOME):
        folder = os.path.join(cache, name_or_path)
        if not os.path.isabs(name_or_path) and os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    return None


def load_clip(name_or_path: str) -> Clip:
    """A CLIP model and processor from a folder (paddlenlp or Hugging Face layout) or a model name.

    A name that no cache holds goes to paddlenlp's ``from_pretrained`` (which downloads on a connected
    machine, as PaddleMIX does); offline that fails with a ``MetricsError`` saying what to pass.
    """
    from paddlenlp.transformers import CLIPModel, CLIPProcessor

    folder = _local_name(name_or_path)
    if folder is None:
        if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")):
            raise MetricsError(f"--clip_model_name_or_path {name_or_path} is not a folder")
        try:  # a hub name: paddlenlp's from_pretrained, as in PaddleMIX
            return Clip(CLIPModel.from_pretrained(name_or_path), CLIPProcessor.from_pretrained(name_or_path),
                        "paddlenlp", name_or_path)
        except OSError:
            raise MetricsError(f"CLIP model '{name_or_path}' is not a local folder nor cached, and could not be "
                               "downloaded: pass --clip_model_name_or_path FOLDER (a CLIP saved by paddlenlp or "
                               "transformers, with its "
                               "tokenizer and preprocessor_config.json; offline: the kit's ./tiny-sd/clip)") from None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise MetricsError(f"{folder} has no config.json: pass a CLIP model folder (e.g. ./tiny-sd/clip)")
    if not os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        raise MetricsError(f"{folder} has no preprocessor_config.json: save the CLIP processor there too "
                           "(CLIPProcessor.save_pretrained)")
    return Clip(*_load_clip_model(folder), source=folder)


def _load_clip_model(folder: str):
    """(model, processor, layout) of a local CLIP folder; the layout is read off the weight names."""
    from paddlenlp.transformers import CLIPModel, CLIPProcessor

    from sd.components import from_pretrained_kwargs

    keys = _weight_keys(folder)
    processor = CLIPProcessor.from_pretrained(folder)
    if any(k.startswith("vision_model.ln_pre") or k == "vision_projection" for k in keys):
        return CLIPModel.from_pretrained(folder), processor, "paddlenlp"
    if not any(k.startswith("visual_projection") for k in keys):
        raise MetricsError(f"{folder}: no CLIP weights found (neither paddlenlp's nor Hugging Face's parameter names)")
    from ppdiffusers.transformers import CLIPModel as HFNamedCLIPModel

    try:
        kwargs = from_pretrained_kwargs(folder)
    except ValueError as e:
        raise MetricsError(str(e)) from None
    return HFNamedCLIPModel.from_pretrained(folder, **kwargs), processor, "hf"


def read_captions(captions_file: str, images_dir: Optional[str]) -> Tuple[List[str], List[str]]:
    """(image paths, captions), pair by pair.

    * ``.jsonl``: one ``{"image", "caption"}`` per line; a relative image path is looked up in
      ``images_dir`` first, then beside the jsonl.
    * ``.tsv`` / ``.csv`` with a ``caption_en`` column (PaddleMIX's coco30k files, tab-separated), or
      any other text file with one caption per line: the captions in order, matched to the images of
      ``images_dir`` sorted by name (the first N captions for N images).
    """
    if not os.path.isfile(captions_file):
        raise MetricsError(f"--captions {captions_file} does not exist")
    if captions_file.endswith(".jsonl"):
        images, captions = [], []
        with open(captions_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    image, caption = rec["image"], rec["caption"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise MetricsError(f"{captions_file}:{n}: not a JSON object with 'image' and 'caption' "
                                       f"({e})") from None
                where = [os.path.join(d, image) for d in (images_dir, os.path.dirname(captions_file)) if d]
                found = next((p for p in where if os.path.isfile(p)), None)
                if found is None:
                    raise MetricsError(f"{captions_file}:{n}: image {image} not found in {' or '.join(where)}")
                images.append(found)
                captions.append(caption)
        if not images:
            raise MetricsError(f"{captions_file} holds no records")
        return images, captions
    if images_dir is None:
        raise MetricsError(f"--captions {captions_file} lists captions only: pass --images DIR too")
    captions = read_caption_list(captions_file)
    images = list_images(images_dir)
    if len(captions) < len(images):
        raise MetricsError(f"{captions_file} has {len(captions)} captions for {len(images)} images in {images_dir}")
    return images, captions[: len(images)]


def read_caption_list(path: str) -> List[str]:
    """Captions in order: the ``caption_en`` column of a PaddleMIX ``.tsv``/``.csv`` (tab-separated with
    a header), else every non-empty line."""
    with open(path, encoding="utf-8", newline="") as f:
        first = f.readline()
        f.seek(0)
        if "caption_en" in first.rstrip("\r\n").split("\t") or "caption_en" in first.rstrip("\r\n").split(","):
            delimiter = "\t" if "\t" in first else ","
            captions = [row["caption_en"] for row in csv.DictReader(f, delimiter=delimiter)]
        else:
            captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise MetricsError(f"{path} holds no captions")
    return captions


def clip_score_of(clip: Clip, images, captions: Sequence[str], batch_size: int = 64) -> Dict[str, float]:
    """CLIP scores of (image, caption) pairs.

    Returns:
        {"clip_score": mean of logit_scale.exp() · cos (PaddleMIX's), "clip_score_torchmetrics":
        mean of 100 · max(cos, 0), "cosine": mean cos, "logit_scale": exp(logit_scale), "n": pairs,
        "per_image": the PaddleMIX score of each pair}.
    """
    if len(images) != len(captions) or not images:
        raise MetricsError(f"CLIP score needs one caption per image (got {len(images)} images, {len(captions)} "
                           "captions)")
    img = clip.image_features(images, batch_size)
    txt = clip.text_features(captions, batch_size)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True) * (txt / np.linalg.norm(txt, axis=1, keepdims=True))).sum(1)
    scale = clip.logit_scale
    return {"clip_score": float((scale * cos).mean()),
            "clip_score_torchmetrics": float((100 * np.maximum(cos, 0)).mean()),
            "cosine": float(cos.mean()), "logit_scale": scale, "n": len(images), "per_image": (scale * cos).tolist()}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sd.evaluation.metrics",
                                description="FID / FD-CLIP and CLIP score (see the module docstring).")
    sub = p.add_subparsers(dest="command", required=True)

    def features(q):
        q.add_argument("--fid_features", choices=["inception", "clip"], default="inception",
                       help="inception: FID (pool-3 of the FID Inception network); clip: FD-CLIP (CLIP image "
                            "embeddings)")
        q.add_argument("--inception_weights", default=None,
                       help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, a .safetensors copy, or PaddleMIX's "
                            "pp_inception-2015-12-05-6726825d.pdparams (default: a copy already in the torch or "
                            "paddle cache)")
        q.add_argument("--clip_model_name_or_path", default=None, help="the CLIP model for --fid_features clip")
        q.add_argument("--batch_size", type=int, default=50, help="images per forward pass")
        q.add_argument("--resolution", type=int, default=None,
                       help="resize every image to N × N first (PaddleMIX's --resolution; default: as they are, "
                            "the network resizes to 299)")
        q.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")

    f = sub.add_parser("fid", help="Fréchet distance between two image folders (or .npz statistics)")
    f.add_argument("path_a")
    f.add_argument("path_b")
    features(f)
    s = sub.add_parser("fid_stats", help="save the (mu, sigma) of a folder of images to a .npz")
    s.add_argument("images")
    s.add_argument("output")
    features(s)
    c = sub.add_parser("clip_score", help="CLIP score of images against their captions")
    c.add_argument("--clip_model_name_or_path", default="openai/clip-vit-base-patch32",
                   help="CLIP folder (paddlenlp or Hugging Face layout) or name (default: PaddleMIX's)")
    c.add_argument("--images", default=None, help="folder of images (sorted by name, matched to the caption lines)")
    c.add_argument("--captions", required=True, help="one caption per line, PaddleMIX's coco30k .tsv/.csv, or a jsonl "
                                                     "of {image, caption}")
    c.add_argument("--batch_size", type=int, default=64, help="pairs per forward pass")
    c.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error("--batch_size must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import paddle

    try:
        if a.device != "cpu" and not paddle.is_compiled_with_cuda():
            raise MetricsError(f"--device {a.device}: this paddle has no CUDA support; use --device cpu")
        paddle.set_device(a.device)
        if a.command == "clip_score":
            images, captions = read_captions(a.captions, a.images)
            res = clip_score_of(load_clip(a.clip_model_name_or_path), images, captions, a.batch_size)
            print(f"{res['n']} images, mean cosine {res['cosine']:.6f}, logit scale {res['logit_scale']:.4f}")
            print(f"CLIP score (100·max(cos, 0), torchmetrics) {res['clip_score_torchmetrics']:.6f}")
            print(f"CLIP score {res['clip_score']:.6f}")
            return 0
        extractor = FeatureExtractor(a.fid_features, a.inception_weights, a.clip_model_name_or_path, a.batch_size,
                                     a.resolution)
        name = "FID" if a.fid_features == "inception" else "FD-CLIP"
        if a.command == "fid_stats":
            mu, sigma = extractor.stats_of(a.images)
            np.savez_compressed(a.output, mu=mu, sigma=sigma)
            print(f"wrote {a.output} ({name} statistics of {a.images})")
            return 0
        value = fid(a.path_a, a.path_b, extractor)
    except (MetricsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{name} {value:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
