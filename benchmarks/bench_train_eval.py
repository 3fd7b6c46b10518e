"""What the in-training scores (sd/evaluation/during_training.py) cost the CPU default, relative to its training steps.

    python -m benchmarks.bench_train_eval --kit ./tiny-sd [--rounds 3] [--eval_num_images 72]   # from the root

Builds the default kit's architecture at 32 px (its UNet from ``unet/config.json``, VAE, text encoder with
77 tokens) and times, interleaved (A B A B) in one process: a training step of one rank of the CPU
default (batch 16: VAE encode, text encode, UNet forward + backward, AdamW), and one rank's share of an
evaluation (eval_num_images / nproc images, DDIM ``--eval_num_inference_steps`` at guidance 5, VAE
decode). Prints the median of each and the cost of evaluating every ``--eval_steps`` steps as a share
of the training time. The scoring itself (tiny CLIP on rank 0) is timed separately.
"""

import argparse
import os
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kit", default="./tiny-sd")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--eval_num_images", type=int, default=72)
    p.add_argument("--eval_num_inference_steps", type=int, default=25)
    p.add_argument("--eval_steps", type=int, default=500)
    p.add_argument("--max_steps", type=int, default=3000)
    a = p.parse_args()

    import numpy as np
    import paddle
    import paddle.nn.functional as F
    from paddlenlp.transformers import CLIPTokenizer
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextModel

    from sd.components.pipeline import build_pipeline
    from sd.components.schedulers import make_scheduler
    from sd.data import demo_data
    from sd.evaluation import metrics, sampling

    vae = AutoencoderKL.from_pretrained(os.path.join(a.kit, "vae"))
    text = CLIPTextModel.from_pretrained(os.path.join(a.kit, "text_encoder"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.kit, "tokenizer"))
    unet = UNet2DConditionModel.from_pretrained(os.path.join(a.kit, "unet"))
    size = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=unet.parameters())
    prompts = [p[3] for p in demo_data.all_prompts()]
    rng = np.random.default_rng(0)
    pixels = paddle.to_tensor(rng.uniform(-1, 1, (a.batch_size, 3, size, size)).astype("float32"))
    ids = paddle.to_tensor(tok([prompts[i % 36] for i in range(a.batch_size)], padding="max_length",
                               max_length=tok.model_max_length, truncation=True)["input_ids"], dtype="int64")

    def train_step():
        with paddle.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            cond = text(ids)[0]
        noise = paddle.randn(latents.shape)
        t = paddle.randint(0, 1000, [a.batch_size])
        loss = F.mse_loss(unet(latents + noise, t, cond).sample, noise)
        loss.backward()
        opt.step()
        opt.clear_grad()

    pipe = build_pipeline(vae, text, tok, unet, make_scheduler("ddim"))
    share = list(range(0, a.eval_num_images, a.nproc))

    def eval_share():
        unet.eval()
        for k in range(0, len(share), 16):
            chunk = share[k : k + 16]
            sampling.generate(pipe, [prompts[i % 36] for i in chunk], guidance_scale=5.0, seeds=chunk,
                              num_inference_steps=a.eval_num_inference_steps, height=size, width=size)
        unet.train()

    train_step()  # warm-up
    eval_share()
    steps, evals = [], []
    for _ in range(a.rounds):
        t0 = time.perf_counter()
        for _ in range(5):
            train_step()
        steps.append((time.perf_counter() - t0) / 5)
        t0 = time.perf_counter()
        eval_share()
        evals.append(time.perf_counter() - t0)
    step, ev = statistics.median(steps), statistics.median(evals)
    clip_dir = os.path.join(a.kit, "clip")
    score = None
    if os.path.isdir(clip_dir):
        clip = metrics.load_clip(clip_dir)
        images = [demo_data.render(*demo_data.all_prompts()[i % 36][:3], size, rng) for i in range(a.eval_num_images)]
        t0 = time.perf_counter()
        metrics.clip_score_of(clip, images, [prompts[i % 36] for i in range(a.eval_num_images)])
        clip.image_features(images)  # FD-CLIP features of the same images
        score = time.perf_counter() - t0
    n_evals = a.max_steps // a.eval_steps
    total = step * a.max_steps
    extra = n_evals * (ev + (score or 0))
    print(f"training step (batch {a.batch_size}): {step:.3f} s (median of {a.rounds} × 5); "
          f"one rank's evaluation share ({len(share)} images, {a.eval_num_inference_steps} DDIM steps): {ev:.2f} s"
          + (f"; scoring {a.eval_num_images} images (rank 0): {score:.2f} s" if score is not None else ""))
    print(f"--eval_steps {a.eval_steps} over {a.max_steps} steps: {n_evals} evaluations, {extra:.1f} s on "
          f"{total:.0f} s of training = {extra / total:.1%}")


if __name__ == "__main__":
    main()
