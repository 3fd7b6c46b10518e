"""Generate images from published or trained weights, and score prompt adherence on the demo shapes.

    python eval.py                                   # newest checkpoint of `sh train.sh`, demo prompts
    python eval.py --prompt "a red circle on a white background" --guidance_scale 1 7.5
    python eval.py --evaluate shapes --num_seeds 4   # the demo prompt-adherence benchmark
    python eval.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --unet_model_name_or_path ./laion400m_pretrain_output_trainer/checkpoint-5000/unet --height 256 --width 256
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from typing import List, Optional

DEFAULT_OUTPUT = "./laion400m_pretrain_output_trainer"  # train.sh's output directory
SEED_PROMPT = "a photo of an astronaut riding a horse on mars"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate images with a Stable Diffusion pipeline (ppdiffusers).")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="SD folder for vae/text_encoder/tokenizer/scheduler (default: what the checkpoint was trained with)")
    p.add_argument("--unet_model_name_or_path", default=None,
                   help="a UNet folder, e.g. <output_dir>/checkpoint-N/unet (default: newest checkpoint of train.sh)")
    p.add_argument("--text_encoder_model_name_or_path", default=None, help="a trained text encoder folder")
    p.add_argument("--variant", default=None, help="weights variant of the UNet, e.g. ema")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeat the flag for several)")
    p.add_argument("--prompt_file", default=None, help="a text file with one prompt per line")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--guidance_scale", type=float, nargs="+", default=[7.5], help="one or several guidance scales")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", help="ddim | pndm | euler-ancestral | lms | dpm-solver++")
    p.add_argument("--height", type=int, default=None, help="default: the training resolution of the checkpoint")
    p.add_argument("--width", type=int, default=None, help="default: the training resolution of the checkpoint")
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--batch_size", type=int, default=8, help="images generated at once")
    p.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed + j")
    p.add_argument("--output_dir", default="./eval_output")
    p.add_argument("--device", default="cpu", help="cpu or gpu (gpu:0, ...)")
    p.add_argument("--evaluate", choices=["shapes"], default=None, help="run the demo prompt-adherence benchmark")
    p.add_argument("--num_seeds", type=int, default=4, help="seeds per prompt for --evaluate shapes")
    args = p.parse_args(argv)
    from sd.sampling import SCHEDULERS

    if args.scheduler not in SCHEDULERS:
        p.error(f"--scheduler must be one of {', '.join(SCHEDULERS)}")
    if args.num_images_per_prompt < 1 or args.batch_size < 1 or args.num_seeds < 1 or args.num_inference_steps < 1:
        p.error("--num_images_per_prompt, --batch_size, --num_seeds and --num_inference_steps must be ≥ 1")
    return args


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def resolve_models(args) -> dict:
    """Decide every component's folder and the default size, checking what can be checked before loading."""
    from paddlenlp.trainer.trainer_utils import get_last_checkpoint

    state = {}
    if args.unet_model_name_or_path is None:
        ckpt = get_last_checkpoint(DEFAULT_OUTPUT) if os.path.isdir(DEFAULT_OUTPUT) else None
        if ckpt is None:
            fail(f"no checkpoint under {DEFAULT_OUTPUT}: run `sh train.sh` first, or pass --unet_model_name_or_path")
        args.unet_model_name_or_path = os.path.join(ckpt, "unet")
        if args.text_encoder_model_name_or_path is None and os.path.isdir(os.path.join(ckpt, "text_encoder")):
            args.text_encoder_model_name_or_path = os.path.join(ckpt, "text_encoder")
    unet = args.unet_model_name_or_path
    if os.path.isdir(unet):
        if not os.path.isfile(os.path.join(unet, "config.json")):
            fail(f"{unet} is not a UNet folder (no config.json); pass a checkpoint's unet/ folder")
        state_file = os.path.join(os.path.dirname(os.path.abspath(unet)), "sd_state.json")
        if os.path.isfile(state_file):
            state = read_json(state_file)
    elif os.path.exists(unet) or unet.startswith((".", "/")):
        fail(f"{unet} is not a folder; pass a checkpoint's unet/ folder, e.g. {DEFAULT_OUTPUT}/checkpoint-N/unet")
    trained = state.get("model_paths", {})
    paths = {k: trained.get(k) for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    if args.pretrained_model_name_or_path:
        base = args.pretrained_model_name_or_path
        paths = {k: os.path.join(base, k) for k in paths}
    if args.text_encoder_model_name_or_path:
        paths["text_encoder"] = args.text_encoder_model_name_or_path
    if not paths["vae"]:
        fail("no VAE/text encoder known for this UNet: pass --pretrained_model_name_or_path (e.g. ./tiny-sd)")
    for name in ("vae", "text_encoder", "tokenizer"):
        if paths[name].startswith((".", "/")) and not os.path.isdir(paths[name]):
            fail(f"{name} folder {paths[name]} does not exist; pass --pretrained_model_name_or_path")
    # Cheap consistency checks on the configs, before any weight is loaded.
    if os.path.isdir(unet) and os.path.isdir(paths["text_encoder"]):
        cross = read_json(os.path.join(unet, "config.json")).get("cross_attention_dim")
        width = read_json(os.path.join(paths["text_encoder"], "config.json")).get("hidden_size")
        if cross != width:
            fail(f"the UNet's cross_attention_dim {cross} does not match the text encoder's hidden size {width}: "
                 "use the text encoder the UNet was trained with (--pretrained_model_name_or_path)")
    factor = 8
    if os.path.isdir(paths["vae"]):
        factor = 2 ** (len(read_json(os.path.join(paths["vae"], "config.json"))["block_out_channels"]) - 1)
    size = state.get("resolution") or (512 if not os.path.isdir(unet) else None)
    if size is None:
        size = read_json(os.path.join(unet, "config.json"))["sample_size"] * factor
    args.height, args.width = args.height or size, args.width or size
    if args.height % factor or args.width % factor:
        fail(f"--height {args.height} and --width {args.width} must be multiples of {factor}, the VAE's downsampling factor")
    return {**paths, "unet": unet, "is_kit": os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(paths["vae"])), "kit_report.json"))}


def read_prompts(args, is_kit: bool) -> List[str]:
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            fail(f"--prompt_file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            fail(f"--prompt_file {args.prompt_file} has no prompts (one per line)")
        return prompts
    if args.prompt:
        return args.prompt
    if is_kit:
        from sd.demo_data import all_prompts

        return [p[3] for p in all_prompts()]
    return [SEED_PROMPT]


def build(paths: dict, args):
    """Load the pipeline from the resolved folders (ppdiffusers' own loaders)."""
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import AutoTokenizer, CLIPTextModel

    from sd.sampling import build_pipeline

    sched = read_json(os.path.join(paths["scheduler"], "scheduler_config.json")) if paths.get("scheduler") and \
        os.path.isfile(os.path.join(paths["scheduler"], "scheduler_config.json")) else None
    return build_pipeline(AutoencoderKL.from_pretrained(paths["vae"]), CLIPTextModel.from_pretrained(paths["text_encoder"]),
                          AutoTokenizer.from_pretrained(paths["tokenizer"]),
                          UNet2DConditionModel.from_pretrained(paths["unet"], variant=args.variant), args.scheduler,
                          {k: v for k, v in (sched or {}).items() if not k.startswith("_")} or None)


def main(argv=None) -> int:
    args = parse_args(argv)
    paths = resolve_models(args)
    prompts = None if args.evaluate else read_prompts(args, paths["is_kit"])
    import paddle
    from tqdm import tqdm

    from sd.sampling import generate, make_grid

    paddle.set_device(args.device)
    pipe = build(paths, args)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.evaluate == "shapes":
        from sd.evaluate import format_report, run_shapes_benchmark

        results = run_shapes_benchmark(pipe, args.guidance_scale, [args.seed + i for i in range(args.num_seeds)],
                                       args.num_inference_steps, args.height, args.width, args.output_dir,
                                       batch_size=args.batch_size)
        print(format_report(results))
        print(f"written: {args.output_dir}/shapes_eval.json, shapes_eval.md")
        return 0

    jobs = [(i, p, g, args.seed + j) for g in args.guidance_scale for i, p in enumerate(prompts)
            for j in range(args.num_images_per_prompt)]
    rows, images = [], []
    for k in tqdm(range(0, len(jobs), args.batch_size), desc="generating", unit="batch"):
        chunk = jobs[k : k + args.batch_size]
        by_g = {}
        for job in chunk:
            by_g.setdefault(job[2], []).append(job)
        for g, group in by_g.items():
            out = generate(pipe, [j[1] for j in group], guidance_scale=g, num_inference_steps=args.num_inference_steps,
                           height=args.height, width=args.width, seeds=[j[3] for j in group],
                           negative_prompt=args.negative_prompt)
            for (i, prompt, g_, seed), im in zip(group, out):
                name = f"{i:03d}_g{g_:g}_s{seed}.png"
                im.save(os.path.join(args.output_dir, name))
                images.append(im)
                rows.append({"prompt_index": i, "prompt": prompt, "seed": seed, "guidance_scale": g_,
                             "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps, "file": name})
    cols = args.num_images_per_prompt
    grid = make_grid(images, rows=len(images) // cols, cols=cols)
    grid.save(os.path.join(args.output_dir, "grid.png"))
    with open(os.path.join(args.output_dir, "manifest.json"), "w") as f:
        json.dump({"unet": paths["unet"], "variant": args.variant, "height": args.height, "width": args.width,
                   "images": rows}, f, indent=2)
    with open(os.path.join(args.output_dir, "manifest.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} images, grid.png and manifest.json/csv written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
