"""Generate images from published or trained weights, and score prompt adherence on the demo shapes.

    python eval.py                                   # newest checkpoint of `sh train.sh`, with its kit
    python eval.py --prompt "a red circle on a white background" --guidance_scale 1 7.5 --num_images_per_prompt 4
    python eval.py --evaluate shapes --num_seeds 4   # the demo prompt-adherence benchmark
    python eval.py --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --unet_model_name_or_path ./laion400m_pretrain_output_trainer/checkpoint-5000/unet --height 256 --width 256

Which weights: with neither --pretrained_model_name_or_path nor --unet_model_name_or_path, the newest
checkpoint under ./laion400m_pretrain_output_trainer (train.sh's output) with the VAE, text encoder,
tokenizer and noise schedule it was trained with (recorded in the checkpoint's sd_state.json). A
--unet_model_name_or_path alone takes those from its checkpoint too; --pretrained_model_name_or_path
supplies them (and the UNet, when no other is given). Sizes default to the training resolution.
A name that is not a local folder (``CompVis/stable-diffusion-v1-4``) is downloaded by the libraries'
own code into their caches: from ppdiffusers' server, or the Hugging Face Hub with ``--from_hf_hub
true`` (sd/components/__init__.py).

Outputs in --output_dir: ``{prompt index:03d}_g{guidance}_s{seed}.png`` per image, ``grid.png``
(a row per prompt), ``manifest.json`` and ``manifest.csv``. Image j of every prompt uses seed
``--seed + j``; the same command gives the same images (see sd/evaluation/sampling.py for the seeding rule).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from typing import Dict, List

from sd import components
from sd.components import ComponentError as InputError  # a user mistake: `main` prints one line, exits with 2

SEED_PROMPT = "a photo of an astronaut riding a horse on mars"  # PaddleMIX's example prompt


def parse_args(argv=None) -> argparse.Namespace:
    from sd.components.schedulers import SCHEDULERS
    from sd.evaluation import coco

    p = argparse.ArgumentParser(description="Generate images with a Stable Diffusion pipeline (ppdiffusers), "
                                            "or score prompt adherence on the demo shapes.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="SD folder or hub name (e.g. CompVis/stable-diffusion-v1-4) with vae/ text_encoder/ tokenizer/ "
                        "scheduler/ [unet/] (default: what the checkpoint was trained with)")
    p.add_argument("--from_hf_hub", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="true: hub names come from the Hugging Face Hub (HF_ENDPOINT), not ppdiffusers' server")
    p.add_argument("--unet_model_name_or_path", default=None,
                   help="a UNet folder such as <output_dir>/checkpoint-N/unet, or a checkpoint folder "
                        "(default: the newest checkpoint of train.sh, or <pretrained>/unet)")
    p.add_argument("--text_encoder_model_name_or_path", default=None,
                   help="a trained text encoder folder (default: the checkpoint's text_encoder/ if it has one)")
    p.add_argument("--variant", default="auto",
                   help="UNet weights variant: auto (ema when the checkpoint has EMA weights, else the raw ones), "
                        "ema, or none")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", default=None, help="a prompt; repeat the flag for several")
    src.add_argument("--prompt_file", default=None, help="a UTF-8 text file with one prompt per line")
    p.add_argument("--negative_prompt", default=None, help="used when guidance > 1")
    p.add_argument("--guidance_scale", type=float, nargs="+", default=None,
                   help="one or several classifier-free guidance scales (default: 7.5; --evaluate shapes: 1 7.5)")
    p.add_argument("--num_inference_steps", type=int, default=50, help="sampler steps")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="the sampler")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the checkpoint's training resolution)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the checkpoint's training resolution)")
    p.add_argument("--num_images_per_prompt", type=int, default=1, help="image j of each prompt uses seed + j")
    p.add_argument("--batch_size", type=int, default=8, help="images generated at once")
    p.add_argument("--seed", type=int, default=0, help="seed of each prompt's first image")
    p.add_argument("--output_dir", default="./eval_output", help="where images, grid and manifest go")
    p.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")
    p.add_argument("--evaluate", choices=["shapes", "coco"], default=None,
                   help="shapes: the demo prompt-adherence benchmark (36 prompts × --num_seeds seeds per guidance "
                        "scale); coco: FID and CLIP score over a caption set (sd/evaluation/coco.py)")
    p.add_argument("--num_seeds", type=int, default=4, help="seeds per prompt for --evaluate shapes")
    coco.add_arguments(p)
    args = p.parse_args(argv)
    for name in ("num_images_per_prompt", "batch_size", "num_seeds", "num_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.guidance_scale is None:
        args.guidance_scale = {"shapes": [1.0, 7.5], "coco": [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}.get(args.evaluate, [7.5])
    if args.evaluate and (args.prompt or args.prompt_file):
        p.error("--evaluate shapes uses the 36 demo prompts; drop --prompt/--prompt_file")
    if args.evaluate == "coco":
        coco.check_args(args, p)
    return args


# ---------------------------------------------------------------------------------------------
# Which weights (sd/components/__init__.py; checked on the configs, before any weight is loaded)
# ---------------------------------------------------------------------------------------------
def resolve_models(args) -> Dict:
    """Every component's source, the prediction type, the variant and the image size (written back
    to ``args.variant``/``height``/``width``), checked against each other."""
    models = components.resolve_for_sampling(args.unet_model_name_or_path, args.pretrained_model_name_or_path,
                                             args.text_encoder_model_name_or_path, args.variant, args.height,
                                             args.width, from_hf_hub=getattr(args, "from_hf_hub", False))
    args.variant, args.height, args.width = models["variant"], models["height"], models["width"]
    return models


def read_prompts(args, is_kit: bool) -> List[str]:
    """--prompt, or the lines of --prompt_file, or by default the 36 demo prompts for a kit model
    and PaddleMIX's astronaut prompt otherwise."""
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise InputError(f"--prompt_file {args.prompt_file} does not exist")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise InputError(f"--prompt_file {args.prompt_file} has no prompts; write one prompt per line")
        return prompts
    if args.prompt:
        if not all(p.strip() for p in args.prompt):
            raise InputError("--prompt is empty")
        return args.prompt
    if is_kit:
        from sd.data.demo_data import all_prompts

        return [p[3] for p in all_prompts()]
    return [SEED_PROMPT]


def check_device(device: str) -> None:
    import paddle

    if not re.fullmatch(r"cpu|gpu(:\d+)?", device):
        raise InputError(f"--device {device}: use cpu, gpu or gpu:N")
    if device != "cpu" and not paddle.is_compiled_with_cuda():
        raise InputError(f"--device {device}: this paddle has no CUDA support; use --device cpu")


# ---------------------------------------------------------------------------------------------
# Loading and generating
# ---------------------------------------------------------------------------------------------
def build(models: Dict, args):
    """Load every component (sd/components/__init__.py) and wrap them in the shared pipeline."""
    models.update(variant=args.variant, height=args.height, width=args.width)
    pipe = components.load_for_sampling(models, args.scheduler)
    args.height, args.width = models["height"], models["width"]  # hub weights: sizes known only now
    return pipe


def image_name(prompt_index: int, guidance: float, seed: int) -> str:
    return f"{prompt_index:03d}_g{guidance:g}_s{seed}.png"


def generate_all(pipe, prompts: List[str], args) -> List[dict]:
    """Every (guidance, prompt, image) in batches of --batch_size; saves PNGs; returns manifest rows."""
    from tqdm import tqdm

    from sd.evaluation.sampling import generate

    n = args.num_images_per_prompt
    jobs = [(g, i, args.seed + j) for g in args.guidance_scale for i in range(len(prompts)) for j in range(n)]
    rows = []
    bar = tqdm(total=len(prompts) * len(args.guidance_scale), unit="prompt", desc="generating")
    for g in args.guidance_scale:
        mine = [job for job in jobs if job[0] == g]
        for k in range(0, len(mine), args.batch_size):
            chunk = mine[k : k + args.batch_size]
            images = generate(pipe, [prompts[i] for _, i, _ in chunk], guidance_scale=g, seeds=[s for _, _, s in chunk],
                              num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                              negative_prompt=args.negative_prompt)
            for (_, i, seed), image in zip(chunk, images):
                name = image_name(i, g, seed)
                image.save(os.path.join(args.output_dir, name))
                rows.append({"prompt_index": i, "prompt": prompts[i], "seed": seed, "guidance_scale": g,
                             "scheduler": args.scheduler, "file": name})
                if seed == args.seed + n - 1:
                    bar.update(1)  # this prompt's last image at this guidance
    bar.close()
    return rows


def write_outputs(rows: List[dict], prompts: List[str], models: Dict, args) -> None:
    """grid.png (a row per prompt: each guidance scale's images in turn), manifest.json and .csv."""
    from PIL import Image

    from sd.evaluation.sampling import make_grid

    by_prompt = sorted(rows, key=lambda r: (r["prompt_index"], args.guidance_scale.index(r["guidance_scale"]),
                                            r["seed"]))
    images = [Image.open(os.path.join(args.output_dir, r["file"])) for r in by_prompt]
    cols = len(args.guidance_scale) * args.num_images_per_prompt
    labels = [f"{i}: {p}" for i, p in enumerate(prompts)]
    make_grid(images, rows=len(prompts), cols=cols, labels=labels, tile=max(64, args.height)).save(
        os.path.join(args.output_dir, "grid.png"))
    meta = {"unet": components.source_name(models["unet"]), "variant": args.variant,
            "text_encoder": components.source_name(models["text_encoder"]),
            "vae": components.source_name(models["vae"]), "scheduler": args.scheduler,
            "num_inference_steps": args.num_inference_steps,
            "height": args.height, "width": args.width, "negative_prompt": args.negative_prompt,
            "grid": "grid.png (rows: prompts; columns: guidance scales in the order given, seeds ascending)"}
    with open(os.path.join(args.output_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "images": rows}, f, indent=2, ensure_ascii=False)
    with open(os.path.join(args.output_dir, "manifest.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        models = resolve_models(args)
        prompts = None if args.evaluate else read_prompts(args, models["is_kit"])
        check_device(args.device)
        import paddle

        paddle.set_device(args.device)
        pipe = build(models, args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    print(f"UNet {components.source_name(models['unet'])}{' (' + args.variant + ')' if args.variant else ''}, "
          f"{args.width}×{args.height}, {args.scheduler} {args.num_inference_steps} steps, "
          f"guidance {' '.join(f'{g:g}' for g in args.guidance_scale)}")
    if args.evaluate == "coco":
        from sd.evaluation import coco

        return coco.run_coco(pipe, args, unet=models["unet"])
    if args.evaluate == "shapes":
        from sd.evaluation.shapes import format_report, run_shapes_benchmark

        results = run_shapes_benchmark(pipe, args.guidance_scale, [args.seed + i for i in range(args.num_seeds)],
                                       args.num_inference_steps, args.height, args.width, args.output_dir,
                                       batch_size=args.batch_size, scheduler=args.scheduler)
        print(format_report(results))
        print(f"written: {args.output_dir}/shapes_eval.json, shapes_eval.md, shapes_grid_g*.png, shapes_table_g*.png")
        return 0
    rows = generate_all(pipe, prompts, args)
    write_outputs(rows, prompts, models, args)
    print(f"{len(rows)} images, grid.png, manifest.json and manifest.csv written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
