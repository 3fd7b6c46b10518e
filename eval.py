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

Outputs in --output_dir: ``{prompt index:03d}_g{guidance}_s{seed}.png`` per image, ``grid.png``
(a row per prompt), ``manifest.json`` and ``manifest.csv``. Image j of every prompt uses seed
``--seed + j``; the same command gives the same images (see sd/sampling.py for the seeding rule).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional

DEFAULT_OUTPUT = "./laion400m_pretrain_output_trainer"  # train.sh's OUTPUT_DIR
DEFAULT_KIT = "./tiny-sd"  # train.sh's KIT_DIR, used when a UNet folder records nothing else
STATE_FILE = "sd_state.json"  # written by sd/sd_trainer.py into every checkpoint
SEED_PROMPT = "a photo of an astronaut riding a horse on mars"  # the seed's example
COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")


class InputError(ValueError):
    """A user mistake; ``main`` prints it as one line and exits with status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    from sd import coco_eval
    from sd.sampling import SCHEDULERS

    p = argparse.ArgumentParser(description="Generate images with a Stable Diffusion pipeline (ppdiffusers), "
                                            "or score prompt adherence on the demo shapes.")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="SD folder (or hub name) with vae/ text_encoder/ tokenizer/ scheduler/ [unet/] "
                        "(default: what the checkpoint was trained with)")
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
                   help="shapes: the demo prompt-adherence benchmark (36 prompts × --num_seeds seeds per guidance scale); "
                        "coco: FID and CLIP score over a caption set (sd/coco_eval.py)")
    p.add_argument("--num_seeds", type=int, default=4, help="seeds per prompt for --evaluate shapes")
    coco_eval.add_arguments(p)
    args = p.parse_args(argv)
    for name in ("num_images_per_prompt", "batch_size", "num_seeds", "num_inference_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.guidance_scale is None:
        args.guidance_scale = {"shapes": [1.0, 7.5], "coco": [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}.get(args.evaluate, [7.5])
    if args.evaluate and (args.prompt or args.prompt_file):
        p.error("--evaluate shapes uses the 36 demo prompts; drop --prompt/--prompt_file")
    if args.evaluate == "coco":
        coco_eval.check_args(args, p)
    return args


# ---------------------------------------------------------------------------------------------
# Which weights (checked on the folders' configs, before any weight is loaded)
# ---------------------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_local(path: str) -> bool:
    """A path meant as a folder here; hub names look like ``org/name[/subfolder]``."""
    return os.path.exists(path) or path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+(/\w+)?", path)


def localise(path: str, what: str) -> str:
    """``path`` itself, or for a hub name its copy in the ppdiffusers cache (nothing touches the
    network: no model hub is reachable from this project's machines)."""
    if is_local(path):
        return path
    from sd.kit import check_local_or_explain

    try:
        return check_local_or_explain(path, what)
    except FileNotFoundError as e:
        raise InputError(str(e)) from None


def newest_checkpoint(output_dir: str) -> str:
    """The checkpoint folder with the highest step under ``output_dir`` (checkpoint-N, or the final
    save in ``output_dir`` itself when it is newer)."""
    found = []
    for d in glob.glob(os.path.join(output_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
        if m and os.path.isfile(os.path.join(d, "unet", "config.json")):
            found.append((int(m.group(1)), 1, d))
    final = os.path.join(output_dir, "trainer_state.json")
    if os.path.isfile(final) and os.path.isfile(os.path.join(output_dir, "unet", "config.json")):
        found.append((read_json(final).get("global_step", 0), 0, output_dir))
    if not found:
        raise InputError(f"no checkpoint under {output_dir}: train one with `sh train.sh`, "
                         "or pass --unet_model_name_or_path / --pretrained_model_name_or_path")
    return max(found)[2]


def locate_unet(args) -> Optional[str]:
    """The UNet folder (or hub path); None when it comes with --pretrained_model_name_or_path."""
    unet, pretrained = args.unet_model_name_or_path, args.pretrained_model_name_or_path
    if unet is None:
        if pretrained is not None:
            return None
        if not os.path.isdir(DEFAULT_OUTPUT):
            raise InputError(f"no {DEFAULT_OUTPUT} here: train a model with `sh train.sh`, "
                             "or pass --unet_model_name_or_path / --pretrained_model_name_or_path")
        return os.path.join(newest_checkpoint(DEFAULT_OUTPUT), "unet")
    unet = localise(unet, "UNet")
    if not os.path.isdir(unet):
        raise InputError(f"--unet_model_name_or_path {unet} is not a folder; pass a checkpoint's unet/ folder, "
                         f"e.g. {DEFAULT_OUTPUT}/checkpoint-1000/unet")
    if os.path.isfile(os.path.join(unet, "config.json")):
        return unet
    if os.path.isfile(os.path.join(unet, "unet", "config.json")) or glob.glob(os.path.join(unet, "checkpoint-*")):
        return os.path.join(newest_checkpoint(unet), "unet")  # a checkpoint or output folder: its (newest) UNet
    raise InputError(f"{unet} is not a UNet folder (no config.json) nor a checkpoint (no unet/config.json); "
                     f"pass a checkpoint's unet/ folder, e.g. {DEFAULT_OUTPUT}/checkpoint-1000/unet")


def resolve_models(args) -> Dict:
    """Decide every component's folder, the prediction type and the image size, and check the local
    configs against each other. Returns {vae, text_encoder, tokenizer, scheduler, unet: path,
    prediction_type, checkpoint, is_kit}; sets args.height/width when they can be known before loading."""
    unet = locate_unet(args)
    pretrained = args.pretrained_model_name_or_path
    if pretrained is not None:
        pretrained = localise(pretrained, "--pretrained_model_name_or_path")
        if not os.path.isdir(pretrained):
            raise InputError(f"--pretrained_model_name_or_path {pretrained} is not a folder")
        if not os.path.isdir(os.path.join(pretrained, "vae")):
            hint = (" (it is a training checkpoint: pass it as --unet_model_name_or_path)"
                    if os.path.isfile(os.path.join(pretrained, STATE_FILE)) else "")
            raise InputError(f"{pretrained} has no vae/ folder{hint}; pass a Stable Diffusion folder with "
                             f"vae/ text_encoder/ tokenizer/ scheduler/, e.g. {DEFAULT_KIT}")
        unet = unet or os.path.join(pretrained, "unet")
    if not os.path.isfile(os.path.join(unet, "config.json")):
        raise InputError(f"{unet} is not a UNet folder (no config.json); pass --unet_model_name_or_path")
    ckpt = os.path.dirname(os.path.abspath(unet))  # the checkpoint (or pipeline folder) the UNet belongs to
    state = read_json(os.path.join(ckpt, STATE_FILE)) if os.path.isfile(os.path.join(ckpt, STATE_FILE)) else {}
    if pretrained is not None:
        paths = {k: os.path.join(pretrained, k) for k in COMPONENTS}
    elif ckpt and os.path.isfile(os.path.join(ckpt, "model_index.json")):  # a whole-pipeline checkpoint
        paths = {k: os.path.join(ckpt, k) for k in COMPONENTS}
    elif state.get("model_paths"):
        paths = {k: localise(state["model_paths"].get(k) or "", k) for k in COMPONENTS}
        for k, path in paths.items():
            if not os.path.isdir(path):
                raise InputError(f"the {k} this checkpoint was trained with ({path}) is missing: rebuild the kit with "
                                 f"`python -m sd.kit --output_dir {DEFAULT_KIT}` or pass --pretrained_model_name_or_path")
    elif os.path.isdir(os.path.join(DEFAULT_KIT, "vae")):
        paths = {k: os.path.join(DEFAULT_KIT, k) for k in COMPONENTS}
    else:
        raise InputError(f"nothing records which VAE and text encoder go with {unet}: pass "
                         f"--pretrained_model_name_or_path (e.g. {DEFAULT_KIT}, built by `python -m sd.kit --output_dir {DEFAULT_KIT}`)")
    if args.text_encoder_model_name_or_path:
        paths["text_encoder"] = localise(args.text_encoder_model_name_or_path, "text encoder")
    elif os.path.isfile(os.path.join(ckpt, "text_encoder", "config.json")):
        paths["text_encoder"] = os.path.join(ckpt, "text_encoder")  # trained with --train_text_encoder
    for k in ("vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(paths[k]):
            also = " or --text_encoder_model_name_or_path" if k == "text_encoder" else ""
            raise InputError(f"{k} folder {paths[k]} does not exist; pass --pretrained_model_name_or_path{also}")
    if args.variant == "auto":  # the EMA weights sample better (README, section 6) when training kept them
        args.variant = "ema" if glob.glob(os.path.join(unet, "*.ema.*")) else None
    elif args.variant == "none":
        args.variant = None
    if args.variant and not glob.glob(os.path.join(unet, f"*.{args.variant}.*")):
        raise InputError(f"{unet} has no '{args.variant}' weights (EMA weights exist only when trained with "
                         "--use_ema True); drop --variant")

    def local_config(path, name="config.json"):
        f = os.path.join(path, name) if path else ""
        return read_json(f) if f and os.path.isfile(f) else None

    configs = {"unet": local_config(unet), "text_encoder": local_config(paths["text_encoder"]),
               "vae": local_config(paths["vae"])}
    if configs["unet"] is not None and configs["unet"].get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise InputError(f"{unet} holds a {configs['unet']['_class_name']}, not a UNet2DConditionModel")
    size = state.get("resolution")
    if size is None and ckpt and os.path.isfile(os.path.join(ckpt, "run_config.json")):
        size = read_json(os.path.join(ckpt, "run_config.json")).get("data", {}).get("resolution")
    if args.height is None or args.width is None:
        if size is None and configs["unet"] and configs["vae"]:
            size = configs["unet"]["sample_size"] * factor_of(configs["vae"])
        args.height, args.width = args.height or size, args.width or size
    check_configs(configs, args.height, args.width)
    sched = local_config(paths["scheduler"], "scheduler_config.json")
    return {**paths, "unet": unet, "checkpoint": ckpt, "prediction_type": state.get("prediction_type"),
            "scheduler_config": sched,
            "is_kit": any(v and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(v)), "kit_report.json"))
                          for v in (paths["vae"], state.get("model_paths", {}).get("vae")))}  # → demo prompts


def factor_of(vae_config) -> int:
    from sd.kit import latent_factor

    return latent_factor(vae_config)


def check_configs(configs: Dict[str, Optional[dict]], height: Optional[int], width: Optional[int]) -> None:
    """Cross-checks of the UNet, text encoder and VAE configs (any may be None = not known yet)."""
    unet, te, vae = configs.get("unet"), configs.get("text_encoder"), configs.get("vae")
    if unet and te and unet.get("cross_attention_dim") != te.get("hidden_size"):
        raise InputError(f"the UNet's cross_attention_dim {unet.get('cross_attention_dim')} does not match the text "
                         f"encoder's hidden_size {te.get('hidden_size')}: use the text encoder the UNet was trained "
                         "with (--pretrained_model_name_or_path / --text_encoder_model_name_or_path)")
    if unet and vae and unet.get("in_channels") != vae.get("latent_channels"):
        raise InputError(f"the UNet's in_channels {unet.get('in_channels')} does not match the VAE's latent_channels "
                         f"{vae.get('latent_channels')}: use the VAE the UNet was trained with (--pretrained_model_name_or_path)")
    if vae and height is not None and width is not None:
        f = factor_of(vae)
        if height % f or width % f or height < f or width < f:
            raise InputError(f"--height {height} and --width {width} must be positive multiples of {f}, "
                             "the VAE's downsampling factor")


def read_prompts(args, is_kit: bool) -> List[str]:
    """--prompt, or the lines of --prompt_file, or by default the 36 demo prompts for a kit model
    and the seed's astronaut prompt otherwise."""
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
        from sd.demo_data import all_prompts

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
    """Load every component with ppdiffusers' own loaders and wrap them in the shared pipeline."""
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import AutoTokenizer, CLIPTextModel

    from sd.sampling import build_pipeline, from_pretrained_kwargs

    sched = models["scheduler_config"] or {}  # none: SD v1's schedule
    if models["prediction_type"]:  # what the UNet was trained to predict
        sched = {**sched, "prediction_type": models["prediction_type"]}
    # folders of PyTorch weights (diffusers layout) are converted on load by ppdiffusers itself
    vae = AutoencoderKL.from_pretrained(models["vae"], **from_pretrained_kwargs(models["vae"]))
    text_encoder = CLIPTextModel.from_pretrained(models["text_encoder"], **from_pretrained_kwargs(models["text_encoder"]))
    unet = UNet2DConditionModel.from_pretrained(models["unet"], variant=args.variant, **from_pretrained_kwargs(models["unet"]))
    if args.height is None or args.width is None:  # hub weights: sizes known only now
        size = unet.config.sample_size * factor_of(vae.config)
        args.height, args.width = args.height or size, args.width or size
    check_configs({"unet": dict(unet.config), "text_encoder": text_encoder.config.to_dict(), "vae": dict(vae.config)},
                  args.height, args.width)
    return build_pipeline(vae, text_encoder, AutoTokenizer.from_pretrained(models["tokenizer"]), unet, args.scheduler,
                          dict(sched))


def image_name(prompt_index: int, guidance: float, seed: int) -> str:
    return f"{prompt_index:03d}_g{guidance:g}_s{seed}.png"


def generate_all(pipe, prompts: List[str], args) -> List[dict]:
    """Every (guidance, prompt, image) in batches of --batch_size; saves PNGs; returns manifest rows."""
    from tqdm import tqdm

    from sd.sampling import generate

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

    from sd.sampling import make_grid

    by_prompt = sorted(rows, key=lambda r: (r["prompt_index"], args.guidance_scale.index(r["guidance_scale"]), r["seed"]))
    images = [Image.open(os.path.join(args.output_dir, r["file"])) for r in by_prompt]
    cols = len(args.guidance_scale) * args.num_images_per_prompt
    labels = [f"{i}: {p}" for i, p in enumerate(prompts)]
    make_grid(images, rows=len(prompts), cols=cols, labels=labels, tile=max(64, args.height)).save(os.path.join(args.output_dir, "grid.png"))
    meta = {"unet": models["unet"], "variant": args.variant, "text_encoder": models["text_encoder"],
            "vae": models["vae"], "scheduler": args.scheduler, "num_inference_steps": args.num_inference_steps,
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
    print(f"UNet {models['unet']}{' (' + args.variant + ')' if args.variant else ''}, {args.width}×{args.height}, "
          f"{args.scheduler} {args.num_inference_steps} steps, guidance {' '.join(f'{g:g}' for g in args.guidance_scale)}")
    if args.evaluate == "coco":
        from sd import coco_eval

        return coco_eval.run_coco(pipe, args, unet=models["unet"])
    if args.evaluate == "shapes":
        from sd.evaluate import format_report, run_shapes_benchmark

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
