"""The offline model kit: a tiny but real Stable Diffusion folder, built here from demo data.

    python -m sd.kit --output_dir ./tiny-sd

writes the ``from_pretrained`` layout of ``CompVis/stable-diffusion-v1-4`` (``model_index.json``,
``tokenizer/``, ``text_encoder/``, ``vae/``, ``unet/``, ``scheduler/``) with small sizes:

* tokenizer: CLIP byte-level BPE learned from the demo captions (``sd/kit_tokenizer.py``);
* text encoder: a small ``CLIPTextModel`` trained contrastively (CLIP's loss) against a small image
  tower on demo image–caption pairs; only the text tower is kept;
* VAE: a small ``AutoencoderKL`` trained on demo images (reconstruction + small KL); its
  ``scaling_factor`` is 1 / std of its latents, measured;
* UNet: a tiny ``UNet2DConditionModel`` config (cross-attention width = text encoder width) and its
  fresh initial weights: the part that training learns;
* scheduler: SD v1's noise schedule.

``kit_report.json`` records the measured figures (PSNR, checker agreement, retrieval accuracy, time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from sd import demo_data
from sd.kit_tokenizer import learn_bpe, save_tokenizer

# SD v1's noise schedule (CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)


@dataclass
class KitConfig:
    resolution: int = 32  # image side the kit is built for (the CPU default trains at this size)
    text_hidden: int = 32  # CLIP text width = UNet cross-attention width
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 37
    max_length: int = 77  # tokenizer model_max_length and text positions (SD's 77)
    clip_steps: int = 600  # contrastive steps, batch = the 36 demo prompts × clip_repeat
    clip_repeat: int = 2
    clip_lr: float = 2e-3
    vae_channels: Tuple[int, ...] = (16, 16, 32)  # 3 blocks: downsampling factor 4 (32 px → 8×8 latents)
    vae_steps: int = 700
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_channels: Tuple[int, ...] = (32, 64)
    unet_attention_head_dim: int = 8
    eval_images: int = 216  # held-out demo images for the figures (6 per prompt)

    @classmethod
    def test_preset(cls) -> "KitConfig":
        """Seconds to build; figures are not expected to meet the targets."""
        return cls(resolution=32, vae_channels=(32, 32), clip_steps=20, vae_steps=20, vae_batch=4,
                   unet_channels=(32, 32), eval_images=36, max_length=16)


# ---------------------------------------------------------------------------------------------
# Local loading (no hub)
# ---------------------------------------------------------------------------------------------
def check_local_or_explain(name_or_path: str, what: str = "model") -> str:
    """Return ``name_or_path`` if it is a local file or folder; otherwise raise a helpful error.

    No model hub is reachable from this project's machines, so a hub name must already be a folder.
    """
    if os.path.exists(name_or_path):
        return name_or_path
    raise FileNotFoundError(
        f"{what} '{name_or_path}' is not a local file or folder and no model hub is reachable. Either download it "
        f"on a connected machine (e.g. `huggingface-cli download CompVis/stable-diffusion-v1-4 --local-dir DIR`) and "
        f"pass the folder, or build the offline kit with `python -m sd.kit --output_dir ./tiny-sd` and pass ./tiny-sd"
    )


def latent_factor(vae_config) -> int:
    """Spatial downsampling of an AutoencoderKL: 2 ** (number of blocks - 1)."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


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


def build_text_encoder(cfg: KitConfig, tokenizer, seed: int, log=print):
    """Train a CLIPTextModel contrastively against a small image tower on demo pairs.

    Each step's batch holds every demo prompt ``clip_repeat`` times with freshly rendered images;
    the loss is CLIP's symmetric InfoNCE over distinct captions, applied both to the pooled (EOT)
    feature and to the mean of the token features, so that the per-token states the UNet
    cross-attends to carry the words too. Returns (model, retrieval accuracy on held-out images).
    """
    import paddle
    import paddle.nn.functional as F
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel
    from tqdm import tqdm

    _seed_everything(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=cfg.text_hidden,
                            intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                            num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
                            projection_dim=cfg.text_hidden, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text = CLIPTextModel(config)
    image = _image_tower(2 * cfg.text_hidden)
    proj = paddle.nn.Linear(cfg.text_hidden, cfg.text_hidden)
    log_scale = paddle.create_parameter([1], "float32", default_initializer=paddle.nn.initializer.Constant(math.log(10.0)))
    params = text.parameters() + image.parameters() + proj.parameters() + [log_scale]
    opt = paddle.optimizer.AdamW(learning_rate=cfg.clip_lr, parameters=params, weight_decay=0.0)
    prompts = demo_data.all_prompts()
    captions = [p[3] for p in prompts]
    ids = paddle.to_tensor(tokenizer(captions, padding="max_length", max_length=cfg.max_length,
                                     truncation=True, return_attention_mask=False)["input_ids"], dtype="int64")
    mask = (ids != tokenizer.pad_token_id).astype("float32")
    mask[:, :] = paddle.maximum(mask, F.one_hot(paddle.argmax((ids == tokenizer.eos_token_id).astype("int32"), -1), ids.shape[1]))
    rng = np.random.default_rng(seed)

    def text_features(input_ids, token_mask):
        hidden, pooled = text(input_ids, return_dict=False)[:2]  # (B, L, D), (B, D)
        mean = (hidden * token_mask[:, :, None]).sum(1) / token_mask.sum(1, keepdim=True)
        return F.normalize(pooled, axis=-1), F.normalize(proj(mean), axis=-1)

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

    # Held-out retrieval: for fresh images, is the nearest of the 36 captions the right one?
    text.eval()
    image.eval()
    correct, eval_rng = 0, np.random.default_rng(seed + 1)
    with paddle.no_grad():
        t_pool, _ = text_features(ids, mask)
        reps = max(1, cfg.eval_images // len(prompts))
        for _ in range(reps):
            x, _ = _demo_batch(eval_rng, cfg.resolution, prompts)
            img_a = F.normalize(image(paddle.to_tensor(x))[:, : cfg.text_hidden], axis=-1)
            correct += int((paddle.argmax(img_a @ t_pool.T, -1) == paddle.arange(len(prompts))).sum())
    accuracy = correct / (reps * len(prompts))
    log(f"kit: caption→image retrieval on {reps * len(prompts)} held-out images: {accuracy:.1%}")
    return text, accuracy


def build_vae(cfg: KitConfig, seed: int, log=print):
    """Train a small AutoencoderKL on demo images; returns (vae, figures dict)."""
    import paddle
    from ppdiffusers import AutoencoderKL
    from tqdm import tqdm

    _seed_everything(seed)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(cfg.vae_channels),
                        layers_per_block=1, latent_channels=4, norm_num_groups=min(32, min(cfg.vae_channels)),
                        sample_size=cfg.resolution)
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


def build_kit(output_dir: str, config: Optional[KitConfig] = None, seed: int = 0, log=print) -> Dict:
    """Build the whole kit into ``output_dir``; returns the report (also saved as kit_report.json)."""
    import paddle
    from paddlenlp.transformers import CLIPTokenizer
    from ppdiffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    cfg = config or KitConfig()
    start = time.time()
    merges = learn_bpe(p[3] for p in demo_data.all_prompts())
    tok_dir = os.path.join(output_dir, "tokenizer")
    vocab_size = save_tokenizer(tok_dir, merges, cfg.max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder, retrieval = build_text_encoder(cfg, tokenizer, seed, log)
    vae, vae_figures = build_vae(cfg, seed, log)
    _seed_everything(seed)
    unet = UNet2DConditionModel(**unet_config(cfg, latent_factor(vae.config)))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(output_dir)
    report = {"seed": seed, "config": asdict(cfg), "vocab_size": vocab_size, "num_merges": len(merges),
              "retrieval_accuracy": retrieval, **vae_figures,
              "unet_parameters": int(sum(int(np.prod(p.shape)) for p in unet.parameters())),
              "build_seconds": round(time.time() - start, 1), "paddle": paddle.__version__}
    with open(os.path.join(output_dir, "kit_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build the offline tiny Stable Diffusion kit.")
    p.add_argument("--output_dir", default="./tiny-sd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["default", "test"], default="default", help="test: seconds, for the test suite")
    a = p.parse_args(argv)
    cfg = KitConfig.test_preset() if a.preset == "test" else KitConfig()
    report = build_kit(a.output_dir, cfg, a.seed)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
