"""The offline model kit: a tiny but real Stable Diffusion folder, built here from demo data.

    python -m sd.kit --output_dir ./tiny-sd

writes the ``from_pretrained`` layout of ``CompVis/stable-diffusion-v1-4`` (``model_index.json``,
``tokenizer/``, ``text_encoder/``, ``vae/``, ``unet/``, ``scheduler/``) with small sizes:

* tokenizer: CLIP byte-level BPE learned from the demo captions (``sd/kit/tokenizer.py``);
* text encoder: a small ``CLIPTextModel`` trained contrastively (CLIP's loss) against a small image
  tower on demo image–caption pairs; only the text tower is kept;
* VAE: a small ``AutoencoderKL`` trained on demo images (reconstruction + small KL); its
  ``scaling_factor`` is 1 / std of its latents, measured;
* UNet: a tiny ``UNet2DConditionModel`` config (cross-attention width = text encoder width) and its
  fresh initial weights: the part that training learns;
* scheduler: SD v1's noise schedule and sampler settings;
* ``clip/``: a full tiny CLIP for scoring generated images offline (``sd.evaluation.metrics``): the text encoder
  above, frozen, with a ``CLIPVisionModel`` tower trained contrastively against it, in paddlenlp's
  layout with its tokenizer and image processor. Built last, so the other parts do not depend on it.

Every config has the fields of ``CompVis/stable-diffusion-v1-4``'s own files (e.g. the scheduler's
``clip_sample: false``), so a scheduler built with ``from_config`` from the kit samples as with SD v1.

``kit_report.json`` records the measured figures (retrieval accuracy, token separation, PSNR, checker
agreement, sizes, build time), the config and the seed; ``SHA256SUMS`` every file's digest. Options:
``--seed``, ``--resolution`` (default 32), ``--max_length`` (default 77), ``--captions FILE`` (extra
tokenizer captions), ``--preset test`` (seconds, for tests), ``--processes 1|2`` (the VAE trained in a
second process while the text encoder trains: the same files).

    python -m sd.kit --preset sd-v1 --output_dir ./sd-v1-random   # SD v1-4's real sizes, random weights (real_size.py)
    python -m sd.kit --check ./tiny-sd        # rebuild from its kit_report.json and compare (check_kit)
    python -m sd.kit --unet_init ./tiny-sd    # remake the untrained UNet weights the repository does not ship
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from sd.components import latent_factor, read_json
from sd.components.pipeline import build_pipeline
from sd.components.schedulers import make_scheduler
from sd.data import demo_data
from sd.kit.tokenizer import learn_bpe, save_tokenizer


@dataclass
class KitConfig:
    """Sizes and training lengths of the kit; the defaults build the default kit (~7 min on 2 cores)."""

    resolution: int = 32  # image side the kit is built for (the CPU default trains at this size)
    text_hidden: int = 32  # CLIP text width = UNet cross-attention width
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 37
    max_length: int = 77  # tokenizer model_max_length and text positions (SD's 77)
    max_merges: int = 2000  # BPE merges at most (the demo captions alone need ~50)
    clip_steps: int = 600  # contrastive steps, batch = the 36 demo prompts × clip_repeat
    clip_repeat: int = 2
    clip_lr: float = 2e-3
    vae_channels: Tuple[int, ...] = (16, 16, 32)  # 3 blocks: downsampling factor 4 (32 px → 8×8 latents)
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_channels: Tuple[int, ...] = (32, 64)
    # heads per attention layer (ppdiffusers' attention_head_dim is SD v1's head count, 8); 2 here: heads of
    # 16-32 channels; 8 heads of 4 channels made the step 1.22× slower on CPU (docs/performance.md)
    unet_attention_head_dim: int = 2
    eval_images: int = 216  # held-out demo images for the figures (6 per prompt)

    @classmethod
    def test_preset(cls) -> "KitConfig":
        """Seconds to build; figures are not expected to meet the targets."""
        return cls(resolution=32, vae_channels=(32, 32), clip_steps=20, vae_steps=20, vae_batch=4,
                   unet_channels=(32, 32), eval_images=36, max_length=16)


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _demo_batch(rng: np.random.Generator, size: int, labels: List[Tuple[str, str, str, str]]):
    """Render one image per label; returns (float32 (B,3,H,W) in [-1,1], captions)."""
    imgs = [np.asarray(demo_data.render(c, s, b, size, rng)) for c, s, b, _ in labels]
    x = np.stack(imgs).astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
    return x, [cap for *_, cap in labels]


def _image_tower(width: int):
    from paddle import nn

    return nn.Sequential(
        nn.Conv2D(3, 32, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2D(32, 64, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2D(64, 64, 3, stride=2, padding=1), nn.GELU(),
        nn.Conv2D(64, 64, 3, stride=1, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2D(1), nn.Flatten(), nn.Linear(64, width),
    )


def token_separation(text_encoder, tokenizer, max_length: int) -> float:
    """How far the UNet's conditioning moves when one word of a demo caption changes.

    Over every pair of demo captions that differ in one word (colour, shape or background), the
    distance between the two final hidden states (``last_hidden_state``, after the final layer
    norm: what SD cross-attends to) at that word's position, divided by the RMS norm of the hidden
    states, i.e. on the scale where a feature vector has length 1. A randomly initialised encoder
    gives ~0.1–0.3; the UNet needs clearly separated words.
    """
    import paddle

    prompts = demo_data.all_prompts()
    ids = tokenizer([p[3] for p in prompts], padding="max_length", max_length=max_length, truncation=True,
                    return_attention_mask=False)["input_ids"]
    was_training = text_encoder.training
    text_encoder.eval()
    with paddle.no_grad():
        hidden = text_encoder(paddle.to_tensor(ids, dtype="int64"), return_dict=False)[0].numpy()  # (36, L, D)
    text_encoder.train(was_training)
    scale = float(np.sqrt((hidden ** 2).sum(-1).mean()))
    shifts = []
    for i, a in enumerate(prompts):
        for j in range(i + 1, len(prompts)):
            diff = [k for k in range(3) if a[k] != prompts[j][k]]
            if len(diff) == 1:
                word = prompts[j][3].split()[(1, 2, 5)[diff[0]]]  # "a {colour} {shape} on a {background} ..."
                pos = 1 + sum(len(tokenizer.tokenize(w)) for w in a[3].split()[: (1, 2, 5)[diff[0]]])
                assert tokenizer.tokenize(word) == [word + "</w>"]
                shifts.append(float(np.linalg.norm(hidden[i, pos] - hidden[j, pos])) / scale)
    return float(np.mean(shifts))


def text_encoder_config(cfg: KitConfig, tokenizer):
    """The kit's ``CLIPTextConfig``: the sizes of ``cfg``, the vocabulary and special ids of ``tokenizer``."""
    from ppdiffusers.transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=cfg.text_hidden,
                          intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                          num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
                          projection_dim=cfg.text_hidden, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def new_vae(cfg: KitConfig):
    """The kit's ``AutoencoderKL``, freshly initialised from the global RNG: SD's block layout with ``cfg``'s sizes."""
    from ppdiffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
                         layers_per_block=1, latent_channels=4, norm_num_groups=min(32, min(cfg.vae_channels)),
                         sample_size=cfg.resolution)


def build_text_encoder(cfg: KitConfig, tokenizer, seed: int, log=print):
    """Train a CLIPTextModel contrastively against a small image tower on demo pairs.

    Each step's batch holds every demo prompt ``clip_repeat`` times with freshly rendered images;
    the loss is CLIP's symmetric InfoNCE over distinct captions, applied both to the pooled (EOT)
    feature and to the mean of the token features, so that the per-token states the UNet
    cross-attends to carry the words too. Returns (model, figures: retrieval accuracies and token separation).
    """
    import paddle
    import paddle.nn.functional as F
    from ppdiffusers.transformers import CLIPTextModel
    from tqdm import tqdm

    _seed_everything(seed)
    text = CLIPTextModel(text_encoder_config(cfg, tokenizer))
    image = _image_tower(2 * cfg.text_hidden)
    proj = paddle.nn.Linear(cfg.text_hidden, cfg.text_hidden)
    log_scale = paddle.create_parameter([1], "float32",
                                        default_initializer=paddle.nn.initializer.Constant(math.log(10.0)))
    params = text.parameters() + image.parameters() + proj.parameters() + [log_scale]
    opt = paddle.optimizer.AdamW(learning_rate=cfg.clip_lr, parameters=params, weight_decay=0.0)
    prompts = demo_data.all_prompts()
    captions = [p[3] for p in prompts]
    ids = paddle.to_tensor(tokenizer(captions, padding="max_length", max_length=cfg.max_length,
                                     truncation=True, return_attention_mask=False)["input_ids"], dtype="int64")
    mask = (ids != tokenizer.pad_token_id).astype("float32")
    mask[:, :] = paddle.maximum(mask, F.one_hot(paddle.argmax((ids == tokenizer.eos_token_id).astype("int32"), -1),
                                                ids.shape[1]))
    rng = np.random.default_rng(seed)

    def text_features(input_ids, token_mask):
        hidden, pooled = text(input_ids, return_dict=False)[:2]  # (B, L, D), (B, D)
        mean = (hidden * token_mask[:, :, None]).sum(1) / token_mask.sum(1, keepdim=True)
        return F.normalize(pooled, axis=-1), F.normalize(proj(mean), axis=-1)

    separation_random = token_separation(text, tokenizer, cfg.max_length)
    labels = paddle.arange(len(prompts) * cfg.clip_repeat) % len(prompts)
    for step in tqdm(range(cfg.clip_steps), desc="kit: text encoder (contrastive)", unit="step"):
        x, _ = _demo_batch(rng, cfg.resolution, prompts * cfg.clip_repeat)
        img = image(paddle.to_tensor(x))  # (B, 2D): one half per text feature
        img_a = F.normalize(img[:, : cfg.text_hidden], axis=-1)
        img_b = F.normalize(img[:, cfg.text_hidden :], axis=-1)
        t_pool, t_mean = text_features(ids, mask)  # (36, D) each
        scale = log_scale.exp().clip(max=100.0)
        loss = 0.0
        for i_f, t_f in ((img_a, t_pool), (img_b, t_mean)):
            logits = scale * i_f @ t_f.T  # (B, 36): image → caption
            loss = loss + F.cross_entropy(logits, labels[:, None]) + \
                F.cross_entropy(logits.T, paddle.arange(len(prompts))[:, None])  # caption → its images
        loss.backward()
        opt.step()
        opt.clear_grad()

    # Held-out retrieval (images never seen in training, one per prompt per round):
    #   image → caption: is the nearest of the 36 captions the image's own caption?
    #   caption → image: among the round's 36 images (one per prompt), is the nearest its image?
    text.eval()
    image.eval()
    hits_i2t = hits_t2i = 0
    eval_rng = np.random.default_rng(seed + 1)
    with paddle.no_grad():
        t_pool, _ = text_features(ids, mask)
        reps = max(1, cfg.eval_images // len(prompts))
        for _ in range(reps):
            x, _ = _demo_batch(eval_rng, cfg.resolution, prompts)
            img_a = F.normalize(image(paddle.to_tensor(x))[:, : cfg.text_hidden], axis=-1)
            sim = (img_a @ t_pool.T).numpy()  # (36 images, 36 captions)
            hits_i2t += int((sim.argmax(1) == np.arange(len(prompts))).sum())
            hits_t2i += int((sim.argmax(0) == np.arange(len(prompts))).sum())
    n = reps * len(prompts)
    figures = {"retrieval_accuracy": hits_i2t / n, "retrieval_caption_to_image": hits_t2i / n,
               "retrieval_eval_images": n,
               "token_separation_random": separation_random,
               "token_separation": token_separation(text, tokenizer, cfg.max_length)}
    log(f"kit: retrieval on {n} held-out images: image→caption {figures['retrieval_accuracy']:.1%} (top-1 of 36 "
        f"captions), caption→image {figures['retrieval_caption_to_image']:.1%} (top-1 of 36 images); one-word change "
        f"moves the word's final hidden state by {figures['token_separation']:.2f} "
        f"(random init: {separation_random:.2f})")
    return text, figures


def build_vae(cfg: KitConfig, seed: int, log=print):
    """Train a small AutoencoderKL on demo images; returns (vae, figures dict)."""
    import paddle
    from tqdm import tqdm

    _seed_everything(seed)
    vae = new_vae(cfg)
    opt = paddle.optimizer.AdamW(learning_rate=cfg.vae_lr, parameters=vae.parameters(), weight_decay=0.0)
    prompts = demo_data.all_prompts()
    rng = np.random.default_rng(seed + 2)
    bar = tqdm(range(cfg.vae_steps), desc="kit: VAE", unit="step")
    for step in bar:
        labels = [prompts[i] for i in rng.integers(0, len(prompts), cfg.vae_batch)]
        x = paddle.to_tensor(_demo_batch(rng, cfg.resolution, labels)[0])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec_loss = paddle.abs(recon - x).mean() + ((recon - x) ** 2).mean()
        kl = posterior.kl().mean() / np.prod(x.shape[1:])
        loss = rec_loss + cfg.vae_kl_weight * kl
        loss.backward()
        opt.step()
        opt.clear_grad()
        if step % 50 == 0:
            bar.set_postfix(loss=float(rec_loss))

    vae.eval()
    eval_rng = np.random.default_rng(seed + 3)
    psnrs, same_colour, same_shape, latents = [], 0, 0, []
    with paddle.no_grad():
        for _ in range(max(1, cfg.eval_images // len(prompts))):
            x_np, _ = _demo_batch(eval_rng, cfg.resolution, prompts)
            x = paddle.to_tensor(x_np)
            z = vae.encode(x).latent_dist.mean
            latents.append(z.numpy())
            rec = vae.decode(z).sample.clip(-1, 1).numpy()
            for a, b in zip(x_np, rec):
                mse = float((((a - b) / 2) ** 2).mean())
                psnrs.append(10 * math.log10(1.0 / max(mse, 1e-12)))
                ra, rb = demo_data.check(_to_pil(a)), demo_data.check(_to_pil(b))
                same_colour += ra.colour == rb.colour
                same_shape += ra.shape == rb.shape
    total = len(psnrs)
    std = float(np.concatenate(latents).std())
    figures = {"vae_psnr_db": float(np.mean(psnrs)), "vae_same_colour": same_colour / total,
               "vae_same_shape": same_shape / total, "vae_latent_std": std, "vae_eval_images": total}
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"kit: VAE PSNR {figures['vae_psnr_db']:.1f} dB, checker agrees on colour {figures['vae_same_colour']:.1%} "
        f"and shape {figures['vae_same_shape']:.1%} of {total} held-out images; scaling_factor 1/{std:.4f}")
    return vae, figures


def _vae_job(cfg: KitConfig, seed: int):
    """``build_vae`` in a process of its own: (config, weights as numpy arrays, figures), all picklable."""
    vae, figures = build_vae(cfg, seed)
    return dict(vae.config), {k: v.numpy() for k, v in vae.state_dict().items()}, figures


def _vae_from(config: Dict, weights: Dict[str, np.ndarray]):
    """The VAE that ``_vae_job`` described (the same float32 values, so the same saved bytes)."""
    import paddle
    from ppdiffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(config)
    vae.register_to_config(scaling_factor=config["scaling_factor"])  # from_config restores the class default
    vae.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.items()})
    vae.eval()
    return vae


def _to_pil(x: np.ndarray):
    from PIL import Image

    return Image.fromarray(((x.transpose(1, 2, 0) + 1) * 127.5).round().clip(0, 255).astype(np.uint8))


def unet_config(cfg: KitConfig, factor: int) -> Dict:
    """The kit's tiny UNet: SD v1's block layout, scaled down; cross-attention = text width."""
    down = ["CrossAttnDownBlock2D"] * (len(cfg.unet_channels) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(cfg.unet_channels) - 1)
    return dict(sample_size=cfg.resolution // factor, in_channels=4, out_channels=4,
                block_out_channels=list(cfg.unet_channels), layers_per_block=1, down_block_types=down,
                up_block_types=up, cross_attention_dim=cfg.text_hidden,
                attention_head_dim=cfg.unet_attention_head_dim, norm_num_groups=min(32, min(cfg.unet_channels)))


def new_unet(config: Dict, seed: int):
    """The kit's UNet with its initial weights: ``UNet2DConditionModel.from_config(config)`` right after seeding
    everything with ``seed``, i.e. a function of the config, the seed and Paddle's RNG alone (no training)."""
    from ppdiffusers import UNet2DConditionModel

    _seed_everything(seed)
    return UNet2DConditionModel.from_config(config)


def read_captions(path: str) -> List[str]:
    """Captions for the tokenizer: a ``.jsonl`` (its ``caption`` values, lists too) or one caption per line."""
    captions = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    value = json.loads(line).get("caption")
                except (json.JSONDecodeError, AttributeError) as e:
                    raise ValueError(f"{path}:{n}: not a JSON object with a 'caption' ({e})") from None
                captions += value if isinstance(value, list) else [value] if isinstance(value, str) else []
            else:
                captions.append(line.strip())
    if not captions:
        raise ValueError(f"{path}: no captions found")
    return captions


def _update_json(path: str, defaults: Dict, drop=()) -> None:
    """Add ``defaults`` the file does not state yet, remove the keys in ``drop``."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key in drop:
        config.pop(key, None)
    for key, value in defaults.items():
        config.setdefault(key, value)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (OpenAI's, CLIPImageProcessor's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip(cfg: KitConfig, text_encoder, tokenizer, output_dir: str, seed: int, log=print) -> Dict:
    """A full tiny CLIP for scoring: a ``CLIPVisionModel`` tower trained contrastively against the
    kit's *frozen* text encoder, saved with it as a CLIP model folder in paddlenlp's layout (loadable by
    ``paddlenlp.transformers.CLIPModel`` and ``CLIPProcessor``, as PaddleMIX's CLIP score loads
    ``openai/clip-vit-base-patch32``).

    The text tower is the kit's text encoder unchanged; trained are the vision tower (a ViT with the
    text tower's sizes, patches of resolution / 8), both projections and the logit scale, with CLIP's
    symmetric InfoNCE on freshly rendered demo images (every prompt ``clip_repeat`` times per step,
    ``clip_steps`` steps). Images are normalised as ``CLIPImageProcessor`` does. Runs after every other
    part is saved, on its own seed, so nothing else in the kit changes.

    Returns the figures: held-out image→caption retrieval, and the mean CLIP score (logit_scale.exp() · cos)
    of matching and of mismatched (image, caption) pairs.
    """
    import paddle
    import paddle.nn.functional as F
    from paddlenlp.transformers import CLIPConfig as PaddleNLPCLIPConfig
    from paddlenlp.transformers import CLIPImageProcessor, CLIPProcessor
    from paddlenlp.transformers import CLIPModel as PaddleNLPCLIPModel
    from ppdiffusers.transformers import CLIPConfig, CLIPModel
    from tqdm import tqdm

    _seed_everything(seed + 17)
    vision = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                  num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads, image_size=cfg.resolution,
                  patch_size=max(1, cfg.resolution // 8), projection_dim=cfg.text_hidden)
    text = text_encoder.config.to_dict()
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.text_hidden)
    clip = CLIPModel(config)
    clip.text_model.set_state_dict(text_encoder.text_model.state_dict())
    for p in clip.text_model.parameters():
        p.stop_gradient = True
    clip.text_model.eval()
    trained = clip.vision_model.parameters() + clip.visual_projection.parameters() + \
        clip.text_projection.parameters() + [clip.logit_scale]
    opt = paddle.optimizer.AdamW(learning_rate=cfg.clip_lr, parameters=trained, weight_decay=0.0)
    prompts = demo_data.all_prompts()
    ids = paddle.to_tensor(tokenizer([p[3] for p in prompts], padding="max_length", max_length=cfg.max_length,
                                     truncation=True, return_attention_mask=False)["input_ids"], dtype="int64")
    with paddle.no_grad():
        pooled = clip.text_model(ids, return_dict=False)[1]  # (36, D): the frozen tower's EOT states
    mean = paddle.to_tensor(np.array(CLIP_MEAN, np.float32).reshape(1, 3, 1, 1))
    std = paddle.to_tensor(np.array(CLIP_STD, np.float32).reshape(1, 3, 1, 1))
    n = len(prompts)

    def pixels(rng, labels):
        return (paddle.to_tensor(_demo_batch(rng, cfg.resolution, labels)[0]) + 1) / 2  # [0, 1]

    def embeddings(x):
        img = F.normalize(clip.get_image_features(pixel_values=(x - mean) / std), axis=-1)
        return img, F.normalize(clip.text_projection(pooled), axis=-1)

    rng = np.random.default_rng(seed + 17)
    labels = paddle.arange(n * cfg.clip_repeat) % n
    for _ in tqdm(range(cfg.clip_steps), desc="kit: CLIP image tower (contrastive)", unit="step"):
        img, txt = embeddings(pixels(rng, prompts * cfg.clip_repeat))
        logits = clip.logit_scale.exp().clip(max=100.0) * img @ txt.T  # (36 R images, 36 captions)
        loss = F.cross_entropy(logits, labels[:, None])  # image → caption
        for r in range(cfg.clip_repeat):  # caption → its image among each round of 36
            loss = loss + F.cross_entropy(logits[r * n : (r + 1) * n].T, paddle.arange(n)[:, None]) / cfg.clip_repeat
        loss.backward()
        opt.step()
        opt.clear_grad()

    clip.eval()
    eval_rng = np.random.default_rng(seed + 18)
    hits, matched, mismatched = 0, [], []
    with paddle.no_grad():
        scale = float(clip.logit_scale.exp())
        for _ in range(max(1, cfg.eval_images // n)):
            img, txt = embeddings(pixels(eval_rng, prompts))
            sim = (img @ txt.T).numpy()  # (36 images, 36 captions)
            hits += int((sim.argmax(1) == np.arange(n)).sum())
            matched += list(scale * np.diag(sim))
            mismatched += list(scale * sim[~np.eye(n, dtype=bool)])
    figures = {"clip_retrieval_accuracy": hits / len(matched), "clip_score_matched": float(np.mean(matched)),
               "clip_score_mismatched": float(np.mean(mismatched)), "clip_logit_scale": scale,
               "clip_eval_images": len(matched)}

    # paddlenlp's layout: its own parameter names, filled from ours through its PyTorch-name table
    # (whose source names are ours; our linear weights are already in Paddle's (in, out) order)
    nlp_config = PaddleNLPCLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.text_hidden,
                                     logit_scale_init_value=config.logit_scale_init_value)
    ours = clip.state_dict()
    nlp = PaddleNLPCLIPModel(nlp_config)
    target = nlp.state_dict()
    state = {m.target_name: ours[m.source_name].reshape(target[m.target_name].shape)
             for m in PaddleNLPCLIPModel._get_name_mappings(nlp_config)}
    if set(state) != set(target):
        raise AssertionError(f"CLIP name table misses {sorted(set(target) - set(state))[:5]}")
    nlp.set_state_dict(state)
    nlp.save_pretrained(output_dir)
    processor = CLIPProcessor(CLIPImageProcessor(size={"shortest_edge": cfg.resolution},
                                                 crop_size={"height": cfg.resolution, "width": cfg.resolution}),
                              tokenizer)
    processor.save_pretrained(output_dir)
    tok_config = os.path.join(output_dir, "tokenizer_config.json")
    with open(tok_config, encoding="utf-8") as f:
        tok_cfg = json.load(f)
    tok_cfg.pop("special_tokens_map_file", None)  # a build-time path
    with open(tok_config, "w", encoding="utf-8") as f:
        json.dump(tok_cfg, f, indent=2)
    log(f"kit: CLIP image tower: held-out retrieval {figures['clip_retrieval_accuracy']:.1%} (top-1 of {n} captions), "
        f"CLIP score {figures['clip_score_matched']:.1f} on matching pairs vs {figures['clip_score_mismatched']:.1f} "
        f"on mismatched ones")
    return figures


def _disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


MANIFEST = "SHA256SUMS"  # `sha256sum -c SHA256SUMS` inside the kit checks it too
UNET_INIT = "unet/diffusion_paddle_model.safetensors"  # the UNet's initial weights: remade by write_unet_init


def file_digests(folder: str) -> Dict[str, str]:
    """SHA-256 of every file below ``folder`` but the manifest, by path relative to it ('/'-separated)."""
    digests = {}
    for d, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(d, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if rel != MANIFEST:
                digests[rel] = _sha256(path)
    return dict(sorted(digests.items()))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def write_manifest(folder: str) -> None:
    """Write ``folder/SHA256SUMS`` in ``sha256sum``'s format: one ``<digest>  <path>`` line per file."""
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as f:
        f.writelines(f"{digest}  {rel}\n" for rel, digest in file_digests(folder).items())


def _manifest(folder: str) -> Dict[str, str]:
    """``folder/SHA256SUMS`` as {path: digest}; ValueError naming the line that is not ``<sha256>  <path>``."""
    path, listed = os.path.join(folder, MANIFEST), {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64:
                raise ValueError(f"{path}:{n}: not a '<sha256>  <path>' line")
            listed[rel] = digest
    return listed


def manifest_problems(folder: str) -> List[str]:
    """How ``folder`` differs from its ``SHA256SUMS``: missing, changed and unlisted files (empty: it matches)."""
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        return [f"{os.path.join(folder, MANIFEST)}: no manifest"]
    listed = _manifest(folder)
    actual = file_digests(folder)
    return ([f"{rel}: missing" for rel in listed if rel not in actual]
            + [f"{rel}: not in {MANIFEST}" for rel in actual if rel not in listed]
            + [f"{rel}: SHA-256 differs from {MANIFEST}" for rel in actual
               if rel in listed and listed[rel] != actual[rel]])


def write_unet_init(kit_dir: str, log=print) -> str:
    """Write the kit's untrained UNet weights (``UNET_INIT``) from ``unet/config.json`` and the kit's seed.

    They are what ``build_kit`` saved (``new_unet``), so the repository need not carry them: training
    initialises its UNet from the config with its own seed, and only ``from_pretrained(kit)`` without a
    ``unet=`` reads them. The file must have the SHA-256 the kit's ``SHA256SUMS`` lists (else ValueError:
    another Paddle draws other numbers). Returns the file's path.
    """
    target = os.path.join(kit_dir, UNET_INIT)
    unet = new_unet(read_json(os.path.join(kit_dir, "unet", "config.json")),
                    read_json(os.path.join(kit_dir, "kit_report.json"))["seed"])
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".init-") as tmp:
        unet.save_pretrained(tmp)
        made = os.path.join(tmp, os.path.basename(UNET_INIT))
        digest = _sha256(made)
        listed = _manifest(kit_dir).get(UNET_INIT) if os.path.isfile(os.path.join(kit_dir, MANIFEST)) else None
        if listed is not None and digest != listed:
            raise ValueError(f"{target}: the UNet init made here has SHA-256 {digest[:12]}…, "
                             f"{MANIFEST} lists {listed[:12]}… "
                             f"(another Paddle build?); rebuild the kit with `python -m sd.kit --output_dir {kit_dir}`")
        os.replace(made, target)
    checked = f"the SHA-256 {MANIFEST} lists" if listed else f"not checked: no {UNET_INIT} in a {MANIFEST}"
    log(f"kit: wrote the UNet's initial weights {target} from unet/config.json and the kit's seed ({checked})")
    return target


def _tensors(path: str) -> Dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    import paddle

    return {k: v.numpy() for k, v in paddle.load(path, return_numpy=False).items()}


def _json_close(a, b, rtol: float, atol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_close(a[k], b[k], rtol, atol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_close(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and math.isclose(a, b, rel_tol=rtol, abs_tol=atol))
    return a == b


# kit_report.json fields that differ between two builds of the same kit: the time, and the size, which
# counts the parameter names clip/model_state.pdparams records (they number the layers made before)
VOLATILE_REPORT_KEYS = ("build_seconds", "disk_bytes")


def compare_kits(ours: str, rebuilt: str, rtol: float, atol: float) -> Tuple[List[str], List[str]]:
    """Compare two kit folders file by file: (differences beyond the tolerance, files not byte-identical).

    Weights (``.safetensors``, ``.pdparams``): the same tensor names and shapes, values within
    ``np.allclose(ours, rebuilt, rtol, atol)``; JSON: the same structure, floats within the same tolerance
    (``kit_report.json`` without its build time and size); other files: the same bytes.
    """
    a, b = file_digests(ours), file_digests(rebuilt)
    problems = ([f"{rel}: only in {ours}" for rel in a if rel not in b]
                + [f"{rel}: only in {rebuilt}" for rel in b if rel not in a])
    not_identical = []
    for rel in sorted(set(a) & set(b)):
        if a[rel] == b[rel]:
            continue
        pa, pb = os.path.join(ours, rel), os.path.join(rebuilt, rel)
        if rel == "kit_report.json":
            ja, jb = ({k: v for k, v in read_json(p).items() if k not in VOLATILE_REPORT_KEYS} for p in (pa, pb))
            if ja == jb:
                continue
            not_identical.append(rel)
            if not _json_close(ja, jb, rtol, atol):
                problems.append(f"{rel}: the figures differ beyond rtol {rtol}, atol {atol}")
            continue
        not_identical.append(rel)
        if rel.endswith((".safetensors", ".pdparams")):
            ta, tb = _tensors(pa), _tensors(pb)
            if ta.keys() != tb.keys():
                problems.append(f"{rel}: tensor names differ ({sorted(set(ta) ^ set(tb))[:5]})")
                continue
            for k in sorted(ta):
                if ta[k].shape != tb[k].shape:
                    problems.append(f"{rel}: {k} has shape {ta[k].shape} vs {tb[k].shape}")
                elif not np.allclose(ta[k], tb[k], rtol=rtol, atol=atol):
                    gap = float(np.abs(ta[k].astype(np.float64) - tb[k]).max())
                    problems.append(f"{rel}: {k} differs by up to {gap:.3g} (rtol {rtol}, atol {atol})")
        elif rel.endswith(".json"):
            if not _json_close(read_json(pa), read_json(pb), rtol, atol):
                problems.append(f"{rel}: the JSON differs beyond rtol {rtol}, atol {atol}")
        else:
            problems.append(f"{rel}: the bytes differ")
    return problems, not_identical


def check_kit(folder: str, rtol: float = 1e-4, atol: float = 1e-6, processes: int = 1, log=print) -> bool:
    """Rebuild the kit in ``folder`` from its ``kit_report.json`` (config, seed, captions) and compare.

    True when ``folder`` matches its manifest and the rebuild matches ``folder`` within the tolerance
    (``compare_kits``); what differs is logged, and which files are not byte-identical (on the CPU and
    Paddle build that made the kit every file is expected identical, the report's build time and size aside).
    """
    report = read_json(os.path.join(folder, "kit_report.json"))
    cfg = KitConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["config"].items()})
    with tempfile.TemporaryDirectory(prefix="kit-check-") as tmp:
        rebuilt = os.path.join(tmp, "kit")
        # first: clip/model_state.pdparams records Paddle's parameter names, which count the layers made before
        build_kit(rebuilt, cfg, report["seed"], log, captions_file=report.get("captions_file"), processes=processes)
        if not os.path.isfile(os.path.join(folder, UNET_INIT)):
            write_unet_init(folder, log)
        problems = manifest_problems(folder)
        differences, not_identical = compare_kits(folder, rebuilt, rtol, atol)
    problems += differences
    for line in problems:
        log(f"kit check: {line}")
    identical = "every file byte-identical" if not not_identical else f"not byte-identical: {', '.join(not_identical)}"
    log(f"kit check: {folder} {'matches' if not problems else 'does NOT match'} a rebuild "
        f"(rtol {rtol}, atol {atol}); {identical} (kit_report.json's build time and size aside)")
    return not problems


def build_kit(output_dir: str, config: Optional[KitConfig] = None, seed: int = 0, log=print,
              captions_file: Optional[str] = None, processes: int = 1) -> Dict:
    """Build the whole kit into ``output_dir``; returns the report (also saved as ``kit_report.json``).

    Args:
        output_dir: the kit folder. It is built beside it (``<output_dir>.partial``) and moved into
            place when complete, so an interrupted build never leaves a half kit; an existing kit
            there is replaced, any other non-empty folder is refused.
        config: sizes and training lengths (``KitConfig()``: the default kit; ``KitConfig.test_preset()``).
        seed: fixes everything (python, numpy, paddle); the same seed gives identical weights.
        captions_file: extra captions (``.jsonl`` or one per line) for the tokenizer's merges,
            learned together with the demo captions.
        processes: 2 trains the VAE in a second process while this one trains the text encoder
            (the same files, in about half the time on 2 cores); 1 trains them one after the other.
    """
    import shutil

    import paddle
    from paddlenlp.transformers import CLIPTokenizer

    cfg = config or KitConfig()
    output_dir = os.path.normpath(output_dir)
    if (os.path.isdir(output_dir) and os.listdir(output_dir)
            and not os.path.isfile(os.path.join(output_dir, "kit_report.json"))):
        raise ValueError(f"{output_dir} is not empty and holds no kit (no kit_report.json); "
                         "choose another --output_dir")
    if cfg.resolution % 2 ** (len(cfg.vae_channels) - 1):
        raise ValueError(f"resolution {cfg.resolution} is not a multiple of the VAE's factor "
                         f"{2 ** (len(cfg.vae_channels) - 1)}")
    start = time.time()
    work = output_dir + ".partial"
    shutil.rmtree(work, ignore_errors=True)

    captions = [p[3] for p in demo_data.all_prompts()]
    if captions_file:
        captions += read_captions(captions_file)
    merges = learn_bpe(captions, max_merges=cfg.max_merges)
    tok_dir = os.path.join(work, "tokenizer")
    vocab_size = save_tokenizer(tok_dir, merges, cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    words = sorted({w for c in demo_data.all_prompts() for w in c[3].split()})
    split = [w for w in words if tokenizer.tokenize(w) != [w + "</w>"]]
    if split:
        raise ValueError(f"demo words {split} are not single tokens after {len(merges)} merges; raise max_merges")
    if processes > 1:  # the VAE in a second process meanwhile: each part seeds itself, so the bytes are the same
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            vae_job = pool.submit(_vae_job, cfg, seed)
            text_encoder, text_figures = build_text_encoder(cfg, tokenizer, seed, log)
            vae_config, vae_weights, vae_figures = vae_job.result()
        vae = _vae_from(vae_config, vae_weights)
    else:
        text_encoder, text_figures = build_text_encoder(cfg, tokenizer, seed, log)
        vae, vae_figures = build_vae(cfg, seed, log)
    unet = new_unet(unet_config(cfg, latent_factor(vae.config)), seed)
    pipe = build_pipeline(vae, text_encoder, tokenizer, unet, make_scheduler("pndm"))
    pipe.save_pretrained(work)
    # the fields of SD v1's files that the libraries do not write themselves; special_tokens_map_file
    # is a build-time path (the file sits beside it anyway)
    _update_json(os.path.join(work, "tokenizer", "tokenizer_config.json"), {"add_prefix_space": False},
                 drop=("special_tokens_map_file",))
    _update_json(os.path.join(work, "text_encoder", "config.json"), {"dropout": 0.0, "torch_dtype": "float32"})
    # and no more: a field SD v1 leaves to each class's default (timestep spacing: leading for DDIM/PNDM,
    # linspace for Euler/LMS/DPM-solver) would otherwise reach every scheduler built with from_config
    _update_json(os.path.join(work, "scheduler", "scheduler_config.json"), {},
                 drop=("timestep_spacing", "prediction_type"))
    # last: changes nothing else
    clip_figures = build_clip(cfg, text_encoder, tokenizer, os.path.join(work, "clip"), seed, log)
    report = {"seed": seed, "config": asdict(cfg), "captions_file": captions_file, "vocab_size": vocab_size,
              "num_merges": len(merges), **text_figures, **vae_figures, **clip_figures,
              "unet_parameters": int(sum(int(np.prod(p.shape)) for p in unet.parameters())),
              "text_encoder_parameters": int(sum(int(np.prod(p.shape)) for p in text_encoder.parameters())),
              "vae_parameters": int(sum(int(np.prod(p.shape)) for p in vae.parameters())),
              "disk_bytes": _disk_bytes(work), "build_seconds": round(time.time() - start, 1),
              "paddle": paddle.__version__}
    with open(os.path.join(work, "kit_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_manifest(work)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(work, output_dir)
    log(f"kit: built {output_dir} in {report['build_seconds']:.0f} s, {report['disk_bytes'] / 1e6:.1f} MB")
    return report
