"""Export a training checkpoint to the Hugging Face diffusers layout (PyTorch safetensors).

    python -m sd.tools.export --checkpoint ./laion400m_pretrain_output_trainer/checkpoint-1000 \\
        --to diffusers --output_dir ./sd-diffusers [--variant auto|ema|none]

The output folder is a whole ``StableDiffusionPipeline``: ``model_index.json``, ``unet/`` (the
checkpoint's EMA weights when it has them, as ``eval.py`` picks; ``--variant none`` for the raw
ones), and the VAE, text encoder (the trained one when the checkpoint has it), tokenizer and noise
schedule the checkpoint was trained with (from its ``sd_state.json``, found by ``sd/components/__init__.py`` as for
``eval.py``), so that with PyTorch::

    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained("./sd-diffusers")

The conversion itself is ppdiffusers' own (``save_pretrained(..., to_diffusers=True)``: Paddle's
``Linear`` weights transposed, keys renamed, safetensors tagged ``format: pt``); PyTorch is not
needed to export. The folder is written beside the target and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from sd import components
from sd.components import ComponentError


def parse_args(argv=None) -> argparse.Namespace:
    from sd.components.schedulers import SCHEDULERS

    p = argparse.ArgumentParser(description="Export a training checkpoint as a diffusers (PyTorch) pipeline folder.")
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder (<output_dir>/checkpoint-N), its unet/ folder, or an output folder (its "
                        "newest checkpoint)")
    p.add_argument("--to", default="diffusers", choices=["diffusers"], help="target format (only diffusers)")
    p.add_argument("--output_dir", required=True, help="folder to write; must not exist unless --overwrite")
    p.add_argument("--variant", default="auto",
                   help="UNet weights to export: auto (the EMA weights when the checkpoint has them, as eval.py), "
                        "ema, none (raw)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="SD folder supplying vae/ text_encoder/ tokenizer/ scheduler/ (default: what the checkpoint "
                        "was trained with)")
    p.add_argument("--scheduler", default="pndm", choices=list(SCHEDULERS),
                   help="sampler written to scheduler/ (the training noise schedule and prediction type are kept); "
                        "pndm is what SD v1 pipelines ship with")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return p.parse_args(argv)


def export_to_diffusers(checkpoint: str, output_dir: str, variant: str = "auto", pretrained_model_name_or_path=None,
                        scheduler: str = "pndm", overwrite: bool = False) -> dict:
    """Write the diffusers pipeline folder of ``checkpoint`` to ``output_dir``.

    Returns what went in: {unet, variant, vae, text_encoder, tokenizer, scheduler, prediction_type}.
    Raises ``ComponentError`` (a ``ValueError``) for a wrong checkpoint or an existing output folder.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ComponentError(f"--output_dir {output_dir} exists and is not empty; pass --overwrite or another folder")
    if not os.path.isdir(checkpoint):
        raise ComponentError(f"--checkpoint {checkpoint} is not a folder; pass <output_dir>/checkpoint-N")
    models = components.resolve_for_sampling(checkpoint, pretrained_model_name_or_path, variant=variant)
    pipe = components.load_for_sampling(models, scheduler)

    partial = output_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, to_diffusers=True)  # ppdiffusers' own Paddle → PyTorch conversion
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(partial) for f in fs if f.endswith((".pdparams", ".pdopt"))]
    assert not leftovers, f"Paddle files in the export: {leftovers}"
    keep_sd_sampler_settings(os.path.join(partial, "scheduler", "scheduler_config.json"))
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(partial, output_dir)
    name = components.source_name
    return {"unet": name(models["unet"]), "variant": models["variant"], "vae": name(models["vae"]),
            "text_encoder": name(models["text_encoder"]), "tokenizer": name(models["tokenizer"]),
            "scheduler": scheduler,
            "prediction_type": models["prediction_type"]}


def keep_sd_sampler_settings(config_file: str) -> None:
    """Add SD v1's sampler settings the scheduler class did not store (e.g. ``clip_sample: false``
    for PNDM), as the hub's SD v1 folders do: a sampler swapped in with ``XScheduler.from_config``
    then samples like this repository's instead of taking diffusers' defaults (DDIM would clip)."""
    from sd.components.schedulers import SD_SCHEDULER_CONFIG

    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    for key, value in SD_SCHEDULER_CONFIG.items():
        config.setdefault(key, value)
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = export_to_diffusers(args.checkpoint, args.output_dir, variant=args.variant,
                                   pretrained_model_name_or_path=args.pretrained_model_name_or_path,
                                   scheduler=args.scheduler, overwrite=args.overwrite)
    except ComponentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"UNet {info['unet']}" + (f" ({info['variant']} weights)" if info["variant"] else "")
          + f", VAE {info['vae']}, text encoder {info['text_encoder']}, tokenizer {info['tokenizer']}, "
          f"{info['scheduler']} scheduler (prediction type {info['prediction_type'] or 'epsilon'})")
    print(f"diffusers pipeline written to {os.path.abspath(args.output_dir)}; load it with PyTorch:\n"
          f"  diffusers.StableDiffusionPipeline.from_pretrained({os.path.abspath(args.output_dir)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
