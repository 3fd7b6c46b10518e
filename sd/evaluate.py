"""The demo prompt-adherence benchmark: generate every demo prompt, read each image, score.

Scoring is a pure function of (prompt labels, checker readings), so it can be tested on fixed images.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

from sd import demo_data
from sd.demo_data import Reading

Label = Tuple[str, str, str]  # (colour, shape, background)
FIELDS = ("colour", "shape", "background")


def score(labels: Sequence[Label], readings: Sequence[Reading]) -> Dict[str, float]:
    """Accuracy of each field, of colour+shape, and of all three, over paired labels and readings."""
    if len(labels) != len(readings) or not labels:
        raise ValueError("score needs as many readings as labels, and at least one")
    n = len(labels)
    hits = {f: 0 for f in FIELDS}
    both = every = 0
    for label, r in zip(labels, readings):
        ok = {f: getattr(r, f) == v for f, v in zip(FIELDS, label)}
        for f in FIELDS:
            hits[f] += ok[f]
        both += ok["colour"] and ok["shape"]
        every += all(ok.values())
    return {**{f: hits[f] / n for f in FIELDS}, "colour+shape": both / n, "all": every / n, "n": n}


def confusion(labels: Sequence[Label], readings: Sequence[Reading], field: str) -> Dict[str, Dict[str, int]]:
    """counts[true value][read value] for one field."""
    i = FIELDS.index(field)
    table: Dict[str, Dict[str, int]] = {}
    for label, r in zip(labels, readings):
        row = table.setdefault(label[i], {})
        row[getattr(r, field)] = row.get(getattr(r, field), 0) + 1
    return table


def format_report(results: Dict[str, dict]) -> str:
    """Markdown: one accuracy row per guidance scale, then the confusion tables of the last one."""
    lines = ["| guidance | colour | shape | background | colour+shape | all three | images |",
             "|---|---|---|---|---|---|---|"]
    for g, res in results.items():
        s = res["scores"]
        lines.append(f"| {g} | {s['colour']:.1%} | {s['shape']:.1%} | {s['background']:.1%} | "
                     f"{s['colour+shape']:.1%} | {s['all']:.1%} | {s['n']} |")
    for g, res in results.items():
        for field in ("colour", "shape"):
            vocab = demo_data.COLOURS if field == "colour" else demo_data.SHAPES
            table = res["confusion"][field]
            lines += ["", f"{field} confusion at guidance {g} (rows: prompted, columns: read)", "",
                      "| prompted | " + " | ".join(vocab) + " | none |", "|---" * (len(vocab) + 2) + "|"]
            for true in vocab:
                row = table.get(true, {})
                lines.append(f"| {true} | " + " | ".join(str(row.get(v, 0)) for v in vocab) + f" | {row.get('none', 0)} |")
    return "\n".join(lines) + "\n"


def run_shapes_benchmark(pipe, guidance_scales: Sequence[float], seeds: Sequence[int], num_inference_steps: int,
                         height: int, width: int, output_dir: str, batch_size: int = 36) -> Dict[str, dict]:
    """Generate all 36 demo prompts × ``seeds`` per guidance scale; read, score, write JSON and Markdown."""
    from tqdm import tqdm

    from sd.sampling import generate, make_grid

    prompts = demo_data.all_prompts()
    jobs = [(p, s) for s in seeds for p in prompts]
    results: Dict[str, dict] = {}
    os.makedirs(output_dir, exist_ok=True)
    for g in guidance_scales:
        images: List = []
        for i in tqdm(range(0, len(jobs), batch_size), desc=f"shapes benchmark, guidance {g}", unit="batch"):
            chunk = jobs[i : i + batch_size]
            images += generate(pipe, [p[3] for p, _ in chunk], guidance_scale=g, num_inference_steps=num_inference_steps,
                               height=height, width=width, seeds=[s for _, s in chunk])
        labels = [p[:3] for p, _ in jobs]
        readings = [demo_data.check(im) for im in images]
        results[str(g)] = {"scores": score(labels, readings),
                           "confusion": {f: confusion(labels, readings, f) for f in FIELDS}}
        make_grid(images[: len(prompts) * min(len(seeds), 4)], rows=min(len(seeds), 4) * 6, cols=6).save(
            os.path.join(output_dir, f"shapes_grid_g{g}.png"))
    with open(os.path.join(output_dir, "shapes_eval.json"), "w") as f:
        json.dump({"seeds": list(seeds), "num_inference_steps": num_inference_steps, "results": results}, f, indent=2)
    report = format_report(results)
    with open(os.path.join(output_dir, "shapes_eval.md"), "w") as f:
        f.write(report)
    return results
