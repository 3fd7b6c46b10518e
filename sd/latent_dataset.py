"""Streaming precomputed latents (written by ``sd/tools/precompute_latents.py``): the image stream's rules, no VAE.

``LatentDataset`` is ``TextImagePairDataset`` with another per-record step: the record stream
(``sd/data/record_stream.py``: one stream per slot of the global batch, shuffle buffer, skip counters,
``fast_forward``) and the slots' loader workers are the parent's, unchanged, so a latent dataset streams,
shards and resumes exactly like the images it was made from.
Each record gives the VAE posterior's mean and std (the model samples ``μ + σ·ε`` every step, as in
the faithful mode) and the caption's text-encoder hidden states; with probability
``drop_caption_prob`` the hidden states of the empty caption are used instead (classifier-free
guidance), read from the dataset's ``*.latents.json`` sidecar.
"""

from __future__ import annotations

import base64
import json
import os
from typing import List, Optional, Sequence

import numpy as np
import paddle
from paddle.io import get_worker_info

from sd.data.formats import BadRecord, parse_latent_line
from sd.data.remote import redact
from sd.text_image_pair_dataset import TextImagePairDataset, add_stream_fields

INFO_SUFFIX = ".latents.json"


def info_path(filelist: str) -> str:
    """The sidecar of a latent ``.filelist``: ``train.filelist`` → ``train.latents.json``."""
    base = filelist[: -len(".filelist")] if filelist.endswith(".filelist") else filelist
    return base + INFO_SUFFIX


def read_info(filelist: str) -> dict:
    path = info_path(filelist)
    if not os.path.isfile(path):
        raise FileNotFoundError(redact(f"{path}: no such file; {filelist} is not a latent dataset written by "
                                       "sd.tools.precompute_latents (train on images, or precompute the latents "
                                       "first)"))
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def decode_array(entry: dict) -> np.ndarray:
    """``{"dtype", "shape", "base64"}`` → numpy array."""
    return np.frombuffer(base64.b64decode(entry["base64"]), dtype=np.dtype(entry["dtype"]).newbyteorder("<")) \
        .reshape(entry["shape"]).astype(entry["dtype"])


class LatentDataset(TextImagePairDataset):
    """Infinite stream of ``{"latent_mean": (c, h, w), "latent_std": (c, h, w), "encoder_hidden_states": (L, D)}``
    (float16 or float32 as stored), plus ``input_ids`` (L,) of the used caption when a tokenizer is given.

    Args:
        file_list: a ``*.filelist.list`` of latent ``.filelist``s (each with its ``*.latents.json``).
        tokenizer: optional; gives ``input_ids`` of each caption ("" when dropped), for image logs.
        drop_caption_prob, max_bad_fraction, seed, slots, num_slots, report_every, shuffle_buffer,
            with_stream_state, return_meta: as in ``TextImagePairDataset``.
        expect: optional ``{"resolution", "latent_shape", "hidden_shape"}`` the model needs; a
            mismatch with the sidecar raises ValueError before training starts.
    """

    def __init__(self, file_list: str, tokenizer=None, drop_caption_prob: float = 0.1,
                 max_bad_fraction: Optional[float] = None, seed: int = 0, slots: Optional[Sequence[int]] = None,
                 num_slots: int = 1, report_every: int = 1000, shuffle_buffer: int = 64,
                 with_stream_state: bool = True, return_meta: bool = False, expect: Optional[dict] = None):
        from sd.data.formats import read_filelist_list

        infos = [read_info(e.path) for e in read_filelist_list(file_list) if e.weight is None or e.weight > 0]
        first = infos[0]
        keys = ("resolution", "latent_shape", "hidden_shape", "dtype", "model_max_length")
        for info in infos[1:]:
            if any(info[k] != first[k] for k in keys):
                raise ValueError(redact(f"{file_list}: its lists were precomputed with different settings: "
                                        f"{[{k: i[k] for k in keys} for i in infos]}"))
        for k, v in (expect or {}).items():
            if list(first[k]) != list(v) if isinstance(v, (list, tuple)) else first[k] != v:
                raise ValueError(redact(f"{file_list}: latents were precomputed with {k}={first[k]}, the model "
                                        f"needs {v}; precompute them again with this model and --resolution"))
        super().__init__(file_list, tokenizer, resolution=first["resolution"], drop_caption_prob=drop_caption_prob,
                         max_bad_fraction=max_bad_fraction, seed=seed, slots=slots, num_slots=num_slots,
                         model_max_length=first["model_max_length"], report_every=report_every,
                         shuffle_buffer=shuffle_buffer, with_stream_state=with_stream_state, return_meta=return_meta)
        self.info = first
        self.latent_shape, self.hidden_shape = tuple(first["latent_shape"]), tuple(first["hidden_shape"])
        self.empty_hidden = decode_array(first["empty_caption_hidden_states"])  # (L, D)

    def _decode(self, record):
        """One latent record → ``(caption, mean, std, hidden)``. Raises BadRecord."""
        caption, mean, std, hidden = parse_latent_line(record)
        if mean.shape != self.latent_shape or hidden.shape != self.hidden_shape:
            raise BadRecord("bad_latent",
                            f"shapes {mean.shape}, {hidden.shape} ≠ {self.latent_shape}, {self.hidden_shape}")
        return caption, mean, std, hidden

    def _check_record(self, source, record) -> None:
        """The same checks as ``_make_sample`` (there is no image to skip decoding here)."""
        self._decode(record)

    def _make_sample(self, source, record, rng: np.random.Generator) -> dict:
        """One latent line → sample (latent part files are read as part files; their lines are not images)."""
        caption, mean, std, hidden = self._decode(record)
        if rng.random() < self.drop_caption_prob:  # the same draw, at the same place, as the image dataset's
            caption, hidden = "", self.empty_hidden
        sample = {"latent_mean": mean, "latent_std": std, "encoder_hidden_states": hidden}
        if self.tokenizer is not None:
            sample["input_ids"] = self.tokenize(caption)
        if self.return_meta:
            sample["caption"] = caption
        return sample

    @staticmethod
    def collate_fn(samples: List[dict]) -> dict:
        """Stack a batch, stored dtype kept (the model casts to float32 on the device: half the copy).

        Returns ``latent_mean``/``latent_std`` (B, c, h, w), ``encoder_hidden_states`` (B, L, D), and
        ``input_ids``/``stream_state``/``skip_counts`` when present, as ``collate_fn`` of the image dataset.
        """
        batch = add_stream_fields({k: np.stack([s[k] for s in samples]) for k in
                                   ("latent_mean", "latent_std", "encoder_hidden_states",
                                    "input_ids") if k in samples[0]},
                                  samples)
        if get_worker_info() is None:
            batch = {k: paddle.to_tensor(v) for k, v in batch.items()}
        return batch
