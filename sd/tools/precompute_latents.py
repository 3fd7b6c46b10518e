"""Encode every image once with the frozen VAE and every caption once with the frozen text encoder.

    python -m sd.tools.precompute_latents --file_list ./data/filelist/train.filelist.list \\
        --pretrained_model_name_or_path ./tiny-sd --resolution 32 --output_path ./data_latents
    python train_txt2img_laion400m_trainer.py ... --file_list ./data_latents/filelist/train.filelist.list \\
        --precomputed_latents True

For each ``.filelist`` of the input ``.filelist.list`` it writes, under ``--output_path``:

* ``latents_data/part-NNNNNN[.gz]``: one line per usable record, in the input's order,
  ``caption \\t latents:<dtype>:<c,h,w>:<L,D> \\t b64(mean) \\t b64(std) \\t b64(hidden)``
  (``sd/data/formats.encode_latent_line``): the VAE posterior's mean and std of the image (resized
  as in training, **centre-cropped**) and the caption's last hidden states;
* ``filelist/<name>.filelist``: the latent parts in the order and with the repeats of the input list
  (so the stream shards by file or by record exactly as the images did);
* ``filelist/<name>.latents.json``: resolution, shapes, dtype, model paths, VAE scaling factor, the
  empty caption's hidden states (for caption dropout), counts;
* ``filelist/<input name>.filelist.list``: the lists with the input's weights.

Storing the hidden states (not token ids) is what removes the text encoder from the step; they cost
L·D·2 bytes a record in float16 (77×32: 4.9 KB for the kit; 77×768: 118 KB for SD v1, against 16 KB of
latents at 256 px), so for SD v1 at scale the text dominates the storage: keep ``--dtype float16``.
Each part is written to ``.partial`` and renamed when complete; running again skips finished parts
(resume after an interruption); ``--overwrite`` redoes them.
"""

from __future__ import annotations

import argparse
import base64
import collections
import gzip
import json
import os
import time
from typing import Dict, List, Optional

import numpy as np

from sd.data.formats import LINE_FORMATS, BadRecord, encode_latent_line, read_filelist, read_filelist_list
from sd.data.sources import source_for


def load_encoders(pretrained: str, vae: Optional[str] = None, text_encoder: Optional[str] = None,
                  tokenizer: Optional[str] = None):
    """(tokenizer, vae, text_encoder, paths) from folders or hub names (sd/components/__init__.py), frozen and in
    eval mode."""
    from sd import components

    paths = {"vae": vae or os.path.join(pretrained, "vae"),
             "text_encoder": text_encoder or os.path.join(pretrained, "text_encoder"),
             "tokenizer": tokenizer or os.path.join(pretrained, "tokenizer")}
    sources = {k: components.locate(v, k.replace("_", " "), k) for k, v in paths.items()}
    tok = components.load_tokenizer(sources["tokenizer"])
    v = components.load_vae(sources["vae"])
    t = components.load_text_encoder(sources["text_encoder"])
    v.eval()
    t.eval()
    return tok, v, t, paths


class Encoder:
    """Batched VAE posterior (mean, std) and text hidden states, cast to ``dtype`` on the way out."""

    def __init__(self, tokenizer, vae, text_encoder, max_length: int, dtype: str):
        self.tokenizer, self.vae, self.text_encoder = tokenizer, vae, text_encoder
        self.max_length, self.dtype = max_length, dtype
        self._text_cache: Dict[str, np.ndarray] = {}

    def text(self, captions: List[str]) -> List[np.ndarray]:
        """Captions → [(L, D)] hidden states; repeated captions are encoded once."""
        import paddle

        todo = sorted({c for c in captions if c not in self._text_cache})
        if todo:
            ids = self.tokenizer(todo, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_attention_mask=False)["input_ids"]
            with paddle.no_grad():
                hidden = self.text_encoder(paddle.to_tensor(ids, dtype="int64"))[0].numpy()
            if len(self._text_cache) > 100_000:
                self._text_cache.clear()
            self._text_cache.update(zip(todo, hidden.astype(self.dtype)))
        return [self._text_cache[c] for c in captions]

    def images(self, pixels: np.ndarray):
        """uint8 (B, 3, R, R) → mean, std (B, c, R/f, R/f)."""
        import paddle

        x = paddle.to_tensor(pixels.astype(np.float32) * (2.0 / 255.0) - 1.0)
        with paddle.no_grad():
            dist = self.vae.encode(x).latent_dist
        return dist.mean.numpy().astype(self.dtype), dist.std.numpy().astype(self.dtype)


def _write_part(part: str, out_path: str, encoder: Encoder, images, line_format: str, batch_size: int,
                counters) -> int:
    """Encode the usable records of input file ``part`` into ``out_path`` (atomically); returns lines written.

    ``part`` is read and its records decoded as the training stream does (``sd.data.sources.source_for``);
    ``images`` is the ``sd.data.image_codec.ImageCodec`` of training, with a centre crop.
    """
    source = source_for(part)
    opener = gzip.open if out_path.endswith(".gz") else open
    tmp = out_path + ".partial"
    written = 0
    with opener(tmp, "wt", encoding="utf-8") as f:
        batch: List[tuple] = []

        def flush():
            nonlocal written
            if not batch:
                return
            mean, std = encoder.images(np.stack([p for _, p in batch]))
            hidden = encoder.text([c for c, _ in batch])
            for i, (caption, _) in enumerate(batch):
                f.write(encode_latent_line(caption, mean[i], std[i], hidden[i]))
            written += len(batch)
            batch.clear()

        for record in source.read(part):
            try:
                caption, data = source.decode(record, line_format, None)
                pixels = images.decode(data, rng=None)  # centre crop: no randomness
            except BadRecord as err:
                counters[err.reason] += 1
                continue
            batch.append((caption, pixels))
            if len(batch) >= batch_size:
                flush()
        flush()
    os.replace(tmp, out_path)
    return written


def precompute(file_list: str, output_path: str, pretrained: str, resolution: int, batch_size: int = 32,
               dtype: str = "float16", model_max_length: int = 77, line_format: str = "laion400m",
               interpolation: str = "lanczos", allow_upscale: bool = False, overwrite: bool = False,
               gzip_output: bool = True, vae: Optional[str] = None, text_encoder: Optional[str] = None,
               tokenizer: Optional[str] = None, log=print) -> str:
    """Write the latent dataset of ``file_list`` (see the module docstring); returns its ``.filelist.list``."""
    import paddle

    from sd.components import latent_factor
    from sd.data.image_codec import ImageCodec

    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype must be float16 or float32, got {dtype!r}")
    tok, vae_model, text_model, paths = load_encoders(pretrained, vae, text_encoder, tokenizer)
    factor = latent_factor(vae_model.config)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    # The image side exactly as training does it (resize shorter side to R/0.9, then crop), centre crop.
    if line_format not in LINE_FORMATS:
        raise ValueError(f"--line_format must be one of {LINE_FORMATS}, got {line_format!r}")
    images = ImageCodec(resolution, interpolation, center_crop=True, allow_upscale=allow_upscale)
    encoder = Encoder(tok, vae_model, text_model, model_max_length, dtype)
    data_dir, list_dir = os.path.join(output_path, "latents_data"), os.path.join(output_path, "filelist")
    os.makedirs(data_dir, exist_ok=True)
    os.makedirs(list_dir, exist_ok=True)
    empty = encoder.text([""])[0]
    suffix = ".gz" if gzip_output else ""
    out_of: Dict[str, str] = {}  # input part → latent part (a part listed twice is encoded once)
    list_lines, totals, start = [], collections.Counter(), time.time()
    for entry in read_filelist_list(file_list):
        parts = [e.path for e in read_filelist(entry.path)]
        counters: collections.Counter = collections.Counter()
        records = 0
        for part in parts:
            if part in out_of:
                continue
            out = os.path.join(data_dir, f"part-{len(out_of) + 1:06d}{suffix}")
            out_of[part] = out
            if os.path.isfile(out) and not overwrite:
                log(f"{out}: already written, kept (pass --overwrite to redo)")
                continue
            try:
                records += _write_part(part, out, encoder, images, line_format, batch_size, counters)
            except FileNotFoundError:
                counters["missing_file"] += 1
                log(f"{part}: missing, skipped")
            except (EOFError, OSError) as err:  # truncated gzip: what was read so far is kept
                counters["truncated_file"] += 1
                log(f"{part}: truncated or corrupt ({err}); the records before the damage were kept")
                if os.path.isfile(out + ".partial"):
                    os.replace(out + ".partial", out)
            log(f"{part} → {out}")
        name = os.path.basename(entry.path)
        filelist = os.path.join(list_dir, name)
        with open(filelist, "w", encoding="utf-8") as f:
            f.write("".join(os.path.relpath(out_of[p]) + "\n" for p in parts if os.path.isfile(out_of[p])))
        mean_shape = [vae_model.config.latent_channels, resolution // factor, resolution // factor]
        info = {"resolution": resolution, "crop": "center", "interpolation": interpolation, "dtype": dtype,
                "latent_shape": mean_shape, "hidden_shape": list(empty.shape), "model_max_length": model_max_length,
                "vae": os.path.abspath(paths["vae"]), "text_encoder": os.path.abspath(paths["text_encoder"]),
                "tokenizer": os.path.abspath(paths["tokenizer"]),
                "scaling_factor": float(vae_model.config.scaling_factor),
                "empty_caption_hidden_states": {
                    "dtype": dtype, "shape": list(empty.shape),
                    "base64": base64.b64encode(empty.astype(dtype).tobytes()).decode("ascii")},
                "source": os.path.abspath(entry.path), "records_written": records, "skipped": dict(counters),
                "paddle": paddle.__version__}
        sidecar = (filelist[: -len(".filelist")] + ".latents.json" if filelist.endswith(".filelist")
                   else filelist + ".latents.json")
        with open(sidecar, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        list_lines.append(os.path.relpath(filelist) + ("" if entry.weight is None else f" {entry.weight}"))
        totals.update(counters)
        log(f"{entry.path}: {records} records encoded, skipped {dict(counters) or 'none'}")
    out_list = os.path.join(list_dir, os.path.basename(file_list))
    with open(out_list, "w", encoding="utf-8") as f:
        f.write("\n".join(list_lines) + "\n")
    log(f"wrote {out_list} in {time.time() - start:.0f} s; skipped {dict(totals) or 'none'}")
    return out_list


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--file_list", required=True, help="the image *.filelist.list to encode")
    p.add_argument("--output_path", required=True, help="folder for latents_data/ and filelist/")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="folder with vae/, text_encoder/, tokenizer/")
    p.add_argument("--vae_name_or_path", default=None)
    p.add_argument("--text_encoder_name_or_path", default=None)
    p.add_argument("--tokenizer_name", default=None)
    p.add_argument("--resolution", type=int, required=True, help="training image side in pixels (fixed here)")
    p.add_argument("--model_max_length", type=int, default=77, help="tokens per caption, as in training")
    p.add_argument("--line_format", choices=LINE_FORMATS, default="laion400m")
    p.add_argument("--interpolation", default="lanczos", help="resize filter, as in training")
    p.add_argument("--allow_upscale", action="store_true", help="keep images smaller than --resolution (upscaled)")
    p.add_argument("--batch_size", type=int, default=32, help="images per VAE forward")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage of mean, std, hidden")
    p.add_argument("--no_gzip", action="store_true", help="plain-text parts (default: .gz)")
    p.add_argument("--overwrite", action="store_true", help="encode parts again even if already written")
    a = p.parse_args(argv)
    try:
        precompute(a.file_list, a.output_path, a.pretrained_model_name_or_path, a.resolution, a.batch_size, a.dtype,
                   a.model_max_length, a.line_format, a.interpolation, a.allow_upscale, a.overwrite, not a.no_gzip,
                   a.vae_name_or_path, a.text_encoder_name_or_path, a.tokenizer_name)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))


if __name__ == "__main__":
    main()
