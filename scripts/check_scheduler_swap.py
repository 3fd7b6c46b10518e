"""Swap the sampler as a user of the stock pipeline does, and check the images still follow the prompt.

    python -m scripts.check_scheduler_swap --checkpoint ./laion400m_pretrain_output_trainer/checkpoint-1000 \\
        [--kit ./tiny-sd] [--num_seeds 2] [--guidance_scale 7.5] [--min_colour 0.9]     # from the repository root

For DDIM, PNDM, Euler-ancestral, LMS and DPM-solver++: ``pipe.scheduler = X.from_config(pipe.scheduler.config)``
on ``StableDiffusionPipeline.from_pretrained(kit, unet=<the checkpoint's UNet, EMA weights when present>)``,
then the shapes benchmark of ``eval.py --evaluate shapes`` (36 demo prompts × seeds). Prints the
colour / shape / all scores per sampler and exits 1 when a sampler's colour score is below
``--min_colour`` (a kit whose scheduler config lacked ``clip_sample: false`` gave ~3 % with DDIM).
"""

import argparse
import glob
import os
import sys
import tempfile

CLASSES = ("DDIMScheduler", "PNDMScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
           "DPMSolverMultistepScheduler")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a checkpoint folder (checkpoint-N) of the trained default model")
    p.add_argument("--kit", default="./tiny-sd", help="the pipeline folder it was trained with")
    p.add_argument("--num_seeds", type=int, default=2, help="seeds per prompt")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--min_colour", type=float, default=0.9)
    a = p.parse_args(argv)

    import ppdiffusers

    from sd.evaluation.shapes import run_shapes_benchmark
    from sd.runtime.checkpoints import STATE_FILE
    from sd.runtime.run_state import RunState

    unet_dir = os.path.join(a.checkpoint, "unet")
    variant = "ema" if glob.glob(os.path.join(unet_dir, "*.ema.*")) else None
    unet = ppdiffusers.UNet2DConditionModel.from_pretrained(unet_dir, variant=variant)
    pipe = ppdiffusers.StableDiffusionPipeline.from_pretrained(a.kit, unet=unet, safety_checker=None)
    size = RunState.read(a.checkpoint).resolution if os.path.isfile(os.path.join(a.checkpoint, STATE_FILE)) else None
    size = size or unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    original, failed = pipe.scheduler.config, []
    for name in CLASSES:
        pipe.scheduler = getattr(ppdiffusers, name).from_config(original)  # what a user of the stock pipeline writes
        with tempfile.TemporaryDirectory() as out:
            res = run_shapes_benchmark(pipe, [a.guidance_scale], list(range(a.num_seeds)), a.num_inference_steps, size,
                                       size, out, batch_size=36)
        s = res["guidance"][f"{a.guidance_scale:g}"]["scores"]
        print(f"{name:34s} colour {s['colour']:.1%}  shape {s['shape']:.1%}  all {s['all']:.1%}  "
              f"(clip_sample {pipe.scheduler.config.get('clip_sample', '-')}, {s['n']} images)", flush=True)
        if s["colour"] < a.min_colour:
            failed.append(name)
    if failed:
        print(f"colour below {a.min_colour:.0%} with: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
