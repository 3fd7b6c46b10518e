"""The demo prompt-adherence benchmark: generate every demo prompt, read each image, score.

For each guidance scale: the 36 prompts of ``sd.data.demo_data.all_prompts()`` × N seeds are generated
with the shared sampler, each image is read by the deterministic checker ``sd.data.demo_data.check``,
and the readings are scored against the prompt's labels. Two reference rows frame the numbers:

* ``rendered``: the checker on freshly rendered demo images (how often the checker itself is right);
* ``vae round trip``: the same images encoded and decoded by the pipeline's VAE (the best a perfect
  UNet could score through this VAE).

Scoring (``score``, ``confusion``) is a pure function of (prompt labels, readings), so it is tested
on fixed images with hand-computed answers.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

from sd.data import demo_data
from sd.data.demo_data import Reading

Label = Tuple[str, str, str]  # (colour, shape, background)
FIELDS = ("colour", "shape", "background")
METRICS = ("colour", "shape", "background", "colour+shape", "all")


def score(labels: Sequence[Label], readings: Sequence[Reading]) -> Dict[str, float]:
    """Accuracy of each field, of colour and shape together, and of all three.

    Args:
        labels: the prompted (colour, shape, background) of each image.
        readings: what the checker read from each image, in the same order.
    Returns:
        {"colour", "shape", "background", "colour+shape", "all": fraction in [0, 1], "n": count}.
    """
    if len(labels) != len(readings) or not labels:
        raise ValueError(f"score needs as many readings as labels, and at least one (got {len(labels)}, "
                         f"{len(readings)})")
    n = len(labels)
    hits = dict.fromkeys(METRICS, 0)
    for label, r in zip(labels, readings):
        ok = {f: getattr(r, f) == v for f, v in zip(FIELDS, label)}
        for f in FIELDS:
            hits[f] += ok[f]
        hits["colour+shape"] += ok["colour"] and ok["shape"]
        hits["all"] += all(ok.values())
    return {**{m: hits[m] / n for m in METRICS}, "n": n}


def confusion(labels: Sequence[Label], readings: Sequence[Reading], field: str) -> Dict[str, Dict[str, int]]:
    """counts[prompted value][read value] for one field (read values include "none")."""
    i = FIELDS.index(field)
    table: Dict[str, Dict[str, int]] = {}
    for label, r in zip(labels, readings):
        row = table.setdefault(label[i], {})
        row[getattr(r, field)] = row.get(getattr(r, field), 0) + 1
    return table


def chance() -> Dict[str, float]:
    """Accuracy of uniform guessing over the demo vocabulary."""
    c, s, b = len(demo_data.COLOURS), len(demo_data.SHAPES), len(demo_data.BACKGROUNDS)
    return {"colour": 1 / c, "shape": 1 / s, "background": 1 / b, "colour+shape": 1 / (c * s), "all": 1 / (c * s * b)}


def evaluate_readings(labels: Sequence[Label], readings: Sequence[Reading]) -> dict:
    """Scores and the colour and shape confusion tables of one set of readings."""
    return {"scores": score(labels, readings),
            "confusion": {f: confusion(labels, readings, f) for f in ("colour", "shape")}}


def _pct(x: float) -> str:
    return f"{x:.1%}"


def format_report(results: Dict[str, dict]) -> str:
    """Markdown: one accuracy row per guidance scale (and reference rows), then per guidance scale
    the colour and shape confusion tables (rows: prompted, columns: read)."""
    lines = ["| images from | colour | shape | background | colour+shape | all three | images |",
             "|---|---|---|---|---|---|---|"]
    refs = results.get("reference", {})
    for name, res in [(f"guidance {g}", r) for g, r in results["guidance"].items()] + list(refs.items()):
        s = res["scores"]
        lines.append(f"| {name} | " + " | ".join(_pct(s[m]) for m in METRICS) + f" | {s['n']} |")
    lines.append("| chance | " + " | ".join(_pct(v) for v in chance().values()) + " | |")
    for g, res in results["guidance"].items():
        for field, vocab in (("colour", demo_data.COLOURS), ("shape", demo_data.SHAPES)):
            table = res["confusion"][field]
            lines += ["", f"{field} at guidance {g} (rows: prompted, columns: read)", "",
                      "| prompted | " + " | ".join(vocab) + " | none |", "|---" * (len(vocab) + 2) + "|"]
            for true in vocab:
                row = table.get(true, {})
                lines.append(f"| {true} | " + " | ".join(str(row.get(v, 0)) for v in (*vocab, "none")) + " |")
    return "\n".join(lines) + "\n"


def prompt_table(images, tile: int = 64):
    """The 36 demo images of one seed as a labelled table: a row per colour, a column per
    (shape, background), in ``demo_data.all_prompts()`` order (the sample grid of docs/results.md).

    Args:
        images: 36 PIL images, ``all_prompts()`` order (colour-major, then shape, then background).
        tile: side in pixels of each image in the table (nearest-neighbour upscaling).
    Returns:
        a PIL image: a header of shape/background names above a 6 × 6 ``make_grid`` with colour labels.
    """
    from PIL import Image, ImageDraw

    from sd.evaluation.sampling import make_grid

    prompts = demo_data.all_prompts()
    if len(images) != len(prompts):
        raise ValueError(f"prompt_table needs the {len(prompts)} demo images of one seed, got {len(images)}")
    cols = len(demo_data.SHAPES) * len(demo_data.BACKGROUNDS)
    body = make_grid(images, rows=len(demo_data.COLOURS), cols=cols, labels=demo_data.COLOURS, tile=tile)
    margin, header = body.width - cols * tile, 28
    table = Image.new("RGB", (body.width, body.height + header), (0, 0, 0))
    table.paste(body, (0, header))
    draw = ImageDraw.Draw(table)
    for c, (_, shape, background, _) in enumerate(prompts[:cols]):
        x = margin + c * tile + 3
        draw.text((x, 2), shape, fill=(255, 255, 255))
        draw.text((x, 14), f"on {background}", fill=(255, 255, 255))
    return table


def reference_images(vae, size: int, seeds: Sequence[int]):
    """Rendered demo images for every (seed, prompt) and their VAE reconstructions (latent mean)."""
    import paddle

    from sd.evaluation.sampling import decode_latents_to_images

    rendered = [demo_data.render(c, s, b, size, np.random.default_rng([seed, k]))
                for seed in seeds for k, (c, s, b, _) in enumerate(demo_data.all_prompts())]
    recon = []
    with paddle.no_grad():
        for i in range(0, len(rendered), 36):
            x = np.stack([np.asarray(im, dtype=np.float32) for im in rendered[i : i + 36]]) / 127.5 - 1
            x = paddle.to_tensor(x.transpose(0, 3, 1, 2))
            recon += decode_latents_to_images(vae, vae.encode(x).latent_dist.mean * vae.config.scaling_factor)
    return rendered, recon


def run_shapes_benchmark(pipe, guidance_scales: Sequence[float], seeds: Sequence[int], num_inference_steps: int,
                         height: int, width: int, output_dir: str, batch_size: int = 8,
                         scheduler: str = "ddim") -> Dict[str, dict]:
    """Generate the 36 demo prompts × ``seeds`` per guidance scale, read, score; write
    ``shapes_eval.json``, ``shapes_eval.md``, a grid per guidance scale (first 4 seeds, 6 rows per seed)
    and a labelled table of the first seed per guidance scale (``shapes_table_g{g}.png``: a row per
    colour, a column per shape and background) to ``output_dir``.

    Returns:
        {"guidance": {str(g): {"scores", "confusion"}}, "reference": {"rendered", "vae round trip"}}.
    """
    from tqdm import tqdm

    from sd.evaluation.sampling import generate, make_grid

    prompts = demo_data.all_prompts()
    jobs = [(p, s) for s in seeds for p in prompts]  # seed-major: a grid row block per seed
    labels = [p[:3] for p, _ in jobs]
    results: Dict[str, dict] = {"guidance": {}, "reference": {}}
    os.makedirs(output_dir, exist_ok=True)
    bar = tqdm(total=len(jobs) * len(guidance_scales), unit="image", desc="shapes benchmark")
    for g in guidance_scales:
        images: List = []
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            images += generate(pipe, [p[3] for p, _ in chunk], guidance_scale=g,
                               num_inference_steps=num_inference_steps,
                               height=height, width=width, seeds=[s for _, s in chunk])
            bar.update(len(chunk))
        results["guidance"][f"{g:g}"] = evaluate_readings(labels, [demo_data.check(im) for im in images])
        shown = min(len(seeds), 4)
        make_grid(images[: 36 * shown], rows=6 * shown, cols=6,
                  tile=max(64, height)).save(os.path.join(output_dir, f"shapes_grid_g{g:g}.png"))
        prompt_table(images[:36], tile=max(64, height)).save(os.path.join(output_dir, f"shapes_table_g{g:g}.png"))
    bar.close()
    if height == width:  # the demo images are square
        rendered, recon = reference_images(pipe.vae, height, seeds)
        results["reference"]["rendered"] = evaluate_readings(labels, [demo_data.check(im) for im in rendered])
        results["reference"]["vae round trip"] = evaluate_readings(labels, [demo_data.check(im) for im in recon])
    with open(os.path.join(output_dir, "shapes_eval.json"), "w") as f:
        json.dump({"seeds": list(seeds), "num_inference_steps": num_inference_steps, "scheduler": scheduler,
                   "height": height, "width": width, "chance": chance(), **results}, f, indent=2)
    with open(os.path.join(output_dir, "shapes_eval.md"), "w") as f:
        f.write(format_report(results))
    return results
