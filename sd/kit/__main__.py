"""`python -m sd.kit`: build an offline model kit — the tiny one (sd/kit/build.py) or SD v1's real sizes with
random weights (sd/kit/real_size.py) — check a tiny kit against its report, or write its untrained UNet."""

import argparse
import json
import os
from dataclasses import replace

from sd.components import read_json
from sd.kit.build import UNET_INIT, KitConfig, build_kit, check_kit, write_unet_init
from sd.kit.real_size import build_real_size_kit


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd.kit",
                                description="Build the offline tiny Stable Diffusion kit (see the module docstring).")
    p.add_argument("--output_dir", default=None,
                   help="kit folder (built beside it, then moved into place); "
                        "default ./tiny-sd, ./sd-v1-random for --preset sd-v1")
    p.add_argument("--seed", type=int, default=0, help="fixes every random draw; same seed → identical weights")
    p.add_argument("--preset", choices=["default", "test", "sd-v1"], default="default",
                   help="test: seconds, for the test suite; sd-v1: SD v1-4's real sizes and configs with random "
                        "weights, no training (sd/kit/real_size.py)")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels the kit is built for (default 32)")
    p.add_argument("--max_length", type=int, default=None,
                   help="tokenizer model_max_length = text positions (default 77, SD's); "
                        "the trainer's --model_max_length must not exceed it")
    p.add_argument("--captions", default=None, help="extra captions (.jsonl or one per line) for the tokenizer merges")
    p.add_argument("--clip_steps", type=int, default=None, help="contrastive text-encoder steps")
    p.add_argument("--vae_steps", type=int, default=None, help="VAE training steps")
    p.add_argument("--processes", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="2: train the VAE and the text encoder at the same time (same files); default 2 on ≥ 2 cores")
    p.add_argument("--check", metavar="DIR", default=None,
                   help="rebuild the kit in DIR from its kit_report.json and compare (exit status 1 when it differs)")
    p.add_argument("--unet_init", metavar="DIR", default=None,
                   help=f"write the kit DIR's untrained UNet weights ({UNET_INIT}) from its config and seed, and stop")
    p.add_argument("--rtol", type=float, default=1e-4, help="--check: relative tolerance of weights and figures")
    p.add_argument("--atol", type=float, default=1e-6, help="--check: absolute tolerance of weights and figures")
    a = p.parse_args(argv)
    if a.processes not in (1, 2):
        p.error("--processes must be 1 or 2")
    for flag, folder in (("--check", a.check), ("--unet_init", a.unet_init)):
        if folder and not os.path.isfile(os.path.join(folder, "kit_report.json")):
            p.error(f"{flag} {folder}: no kit_report.json there (not a kit folder)")
        if folder and read_json(os.path.join(folder, "kit_report.json")).get("preset") == "sd-v1":
            p.error(f"{flag} {folder}: a real-size random kit holds its UNet weights and takes seconds to build: "
                    f"rebuild it with `python -m sd.kit --preset sd-v1 --output_dir {folder}` (same --seed)")
    if a.preset == "sd-v1":
        tiny_only = [f for f, v in (("--resolution", a.resolution), ("--max_length", a.max_length),
                                    ("--captions", a.captions), ("--clip_steps", a.clip_steps),
                                    ("--vae_steps", a.vae_steps)) if v is not None]
        if tiny_only:
            p.error(f"{', '.join(tiny_only)}: the tiny kit's options; --preset sd-v1 has SD v1-4's sizes")
        try:
            report = build_real_size_kit(a.output_dir or "./sd-v1-random", a.seed)
        except ValueError as e:
            p.error(str(e))
        print(json.dumps(report, indent=2))
        return
    a.output_dir = a.output_dir or "./tiny-sd"
    if a.unet_init:
        try:
            write_unet_init(a.unet_init)
        except ValueError as e:
            p.error(str(e))
        return
    if a.check:
        raise SystemExit(0 if check_kit(a.check, a.rtol, a.atol, a.processes) else 1)
    cfg = KitConfig.test_preset() if a.preset == "test" else KitConfig()
    overrides = {k: v for k, v in (("resolution", a.resolution), ("max_length", a.max_length),
                                   ("clip_steps", a.clip_steps), ("vae_steps", a.vae_steps)) if v is not None}
    cfg = replace(cfg, **overrides)
    if cfg.resolution < 16 or cfg.max_length < 10:
        p.error("--resolution must be ≥ 16 and --max_length ≥ 10 (a demo caption is 9 tokens)")
    try:
        report = build_kit(a.output_dir, cfg, a.seed, captions_file=a.captions, processes=a.processes)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
