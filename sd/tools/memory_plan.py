"""Per-device memory of SD v1 pretraining, planned from the configs (sd/runtime/memory.py), and the largest batch
that fits common cards.

    python -m sd.tools.memory_plan                       # the default unet_config.json, SD v1 VAE + CLIP
    python -m sd.tools.memory_plan --markdown --device cpu --resolutions 256
    python -m sd.tools.memory_plan --pretrained_model_name_or_path ./tiny-sd --unet ./tiny-sd/unet/config.json

The step's peak is printed for every batch × precision × recompute × EMA; a card "fits" a batch when the peak
of its step and of a checkpoint save stays within the card minus the CUDA reserve (1 GiB + 5 % of the card:
context, cuDNN/cuBLAS workspaces, allocator fragmentation; an assumption). Figures marked * use the analytic
activation estimate (no measured coefficients for that case yet).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import List, Sequence

from sd.runtime import memory

CARDS_GB = (24, 32, 40, 80)  # marketed sizes: GB as GiB (an 80 GB A100 reports 79.2 GiB; within the reserve)
BATCHES = (1, 2, 4, 8, 16, 32, 64)
PRECISIONS = ("fp32", "bf16-O1", "bf16-O2")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--unet", default="unet_config.json", help="UNet config .json or folder (default: %(default)s)")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="folder with vae/ and text_encoder/ configs (default: SD v1's published configs)")
    p.add_argument("--device", default="gpu", choices=("gpu", "cpu"),
                   help="gpu: flash attention, the CUDA reserve; cpu: eager attention, host memory (default: gpu)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], help="pixels (default: 256 512)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=memory.PRECISIONS)
    p.add_argument("--cards", type=float, nargs="+", default=list(CARDS_GB), help="card sizes in GB (as GiB)")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    return p


def _table(header: Sequence[str], rows: List[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    base = args.pretrained_model_name_or_path
    arch = memory.Architecture.from_paths(args.unet, base and os.path.join(base, "vae"),
                                          base and os.path.join(base, "text_encoder"))
    print(f"UNet {arch.unet_params:,} parameters (trained), VAE {arch.vae_params:,} and text encoder "
          f"{arch.text_params:,} (frozen); device {args.device}; GiB per device\n")
    combos = list(itertools.product(args.precisions, (False, True), (False, True)))
    header = ["precision", "recompute", "EMA"] + [f"B={b}" for b in args.batches]
    for r in args.resolutions:
        rows = []
        for precision, recompute, ema in combos:
            row = [precision, "on" if recompute else "off", "on" if ema else "off"]
            for b in args.batches:
                plan = memory.estimate(arch, memory.MemoryConfig(batch=b, resolution=r, precision=precision,
                                                                 recompute=recompute, ema=ema, device=args.device))
                row.append(f"{plan.device_peak / memory.GiB:.1f}" + ("" if plan.calibrated else "*"))
            rows.append(row)
        print(f"Peak per device (step or save), {r} px:\n" + _table(header, rows, args.markdown) + "\n")
    header = ["px", "precision", "recompute", "EMA"] + [f"{c:g} GB" for c in args.cards]
    rows = []
    for r in args.resolutions:
        for precision, recompute, ema in combos:
            config = memory.MemoryConfig(resolution=r, precision=precision, recompute=recompute, ema=ema,
                                         device=args.device)
            row = [str(r), precision, "on" if recompute else "off", "on" if ema else "off"]
            row += [str(memory.largest_batch(arch, config, memory.card_budget(int(c * memory.GiB))))
                    for c in args.cards]
            rows.append(row)
    reserve = f"{memory.CUDA_RESERVE_FIXED / memory.GiB:g} GiB + {memory.CUDA_RESERVE_FRACTION:.0%} of the card"
    print(f"Largest batch per device that fits (reserve: {reserve}; 0 = not even 1):\n"
          + _table(header, rows, args.markdown))
    print("\n* activations from the analytic estimate (no measured coefficients in sd/runtime/memory.py CALIBRATION)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
