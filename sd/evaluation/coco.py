"""The COCO evaluation of PaddleMIX (``generate_images.py`` then ``compute_fid_clip_score.py``) as one run.

    python eval.py --evaluate coco --captions coco30k.tsv --num_images 30000 --guidance_scale 3 4 5 6 7 8 \\
        --reference coco_256_30k.npz --inception_weights pt_inception-2015-12-05-6726825d.pth \\
        --clip_model_name_or_path openai/clip-vit-base-patch32 --unet_model_name_or_path CKPT/unet --device gpu

For each guidance scale the first ``--num_images`` captions are generated (the sampler of eval.py:
DDIM, 50 steps by default, as PaddleMIX; image ``i`` from seed ``--seed + i``, so an image does not
depend on its batch, rank or run) into ``OUTPUT_DIR/mscoco.en_g{g}/{i:05d}_000.png`` (PaddleMIX's
layout). Images already on disk are not generated again, so an interrupted run resumes. Under
``paddle.distributed.launch`` rank ``r`` of ``R`` generates the images ``i ≡ r (mod R)``; rank 0 then
waits for every image and scores. Scores per guidance scale: FID against ``--reference`` (a folder of
images, whose statistics are cached in the output folder, or a ``.npz`` of mu/sigma; FD-CLIP with
``--fid_features clip``), the CLIP score (PaddleMIX's ``logit_scale.exp() · cos``, and torchmetrics'
``100 · max(cos, 0)``), and, when every caption is a demo caption, the demo shapes score. Written:
``coco_eval.json``, ``coco_eval.md`` and ``fid_vs_clip.png`` (the FID-vs-CLIP curve over guidance).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from sd.evaluation import metrics

RESULTS_JSON, RESULTS_MD, CURVE_PNG = "coco_eval.json", "coco_eval.md", "fid_vs_clip.png"


def add_arguments(p) -> None:
    """The flags of ``eval.py --evaluate coco`` (the model, sampler and size flags are eval.py's own)."""
    g = p.add_argument_group("--evaluate coco (FID and CLIP score over a caption set)")
    g.add_argument("--captions", default=None,
                   help="captions to generate: PaddleMIX's coco30k.tsv/.csv (column caption_en), a jsonl with "
                        "'caption' (e.g. data/demo_raw/demo.jsonl), or one caption per line")
    g.add_argument("--num_images", type=int, default=None,
                   help="images per guidance scale: the first N captions (default all)")
    g.add_argument("--reference", default=None,
                   help="reference images for FID: a folder of images, or a .npz with mu and sigma (e.g. PaddleMIX's "
                        "coco_256_30k.npz)")
    g.add_argument("--fid_features", choices=["inception", "clip"], default="inception",
                   help="inception: FID; clip: the Fréchet distance of CLIP image embeddings (FD-CLIP), when no "
                        "Inception weights exist")
    g.add_argument("--inception_weights", default=None,
                   help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth, a .safetensors copy, or PaddleMIX's "
                        ".pdparams")
    g.add_argument("--clip_model_name_or_path", default=None,
                   help="CLIP for the CLIP score (and FD-CLIP): a folder (paddlenlp or Hugging Face layout) or a name "
                        "such as openai/clip-vit-base-patch32 (offline: the kit's ./tiny-sd/clip)")


def read_prompts(path: str) -> List[str]:
    """Captions in order from a caption file (see ``add_arguments``)."""
    if not os.path.isfile(path):
        raise metrics.MetricsError(f"--captions {path} does not exist")
    if not path.endswith(".jsonl"):
        return metrics.read_caption_list(path)
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    caption = json.loads(line)["caption"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise metrics.MetricsError(f"{path}:{n}: not a JSON object with a 'caption' ({e})") from None
                prompts.append(caption[0] if isinstance(caption, list) else caption)
    if not prompts:
        raise metrics.MetricsError(f"{path} holds no captions")
    return prompts


def rank_and_world() -> tuple:
    """(rank, number of ranks) under ``paddle.distributed.launch`` (else (0, 1))."""
    return int(os.environ.get("PADDLE_TRAINER_ID", 0)), int(os.environ.get("PADDLE_TRAINERS_NUM", 1))


def image_path(folder: str, i: int) -> str:
    return os.path.join(folder, f"{i:05d}_000.png")  # PaddleMIX's generate_images.py names


def guidance_folder(output_dir: str, g: float) -> str:
    return os.path.join(output_dir, f"mscoco.en_g{g:g}")


def generate_missing(pipe, prompts: Sequence[str], guidance_scales: Sequence[float], args, rank: int = 0,
                     world: int = 1) -> int:
    """Generate this rank's share of the images not yet on disk; returns how many were generated.
    Each PNG is written under a temporary name and renamed, so a visible image is complete."""
    from tqdm import tqdm

    from sd.evaluation.sampling import generate

    jobs = [(g, i) for g in guidance_scales for i in range(len(prompts)) if i % world == rank
            and not os.path.isfile(image_path(guidance_folder(args.output_dir, g), i))]
    bar = tqdm(total=len(jobs), desc=f"generating (rank {rank}/{world})", unit="image")
    for g in guidance_scales:
        folder = guidance_folder(args.output_dir, g)
        os.makedirs(folder, exist_ok=True)
        mine = [i for gg, i in jobs if gg == g]
        for k in range(0, len(mine), args.batch_size):
            chunk = mine[k : k + args.batch_size]
            images = generate(pipe, [prompts[i] for i in chunk], guidance_scale=g, seeds=[args.seed + i for i in chunk],
                              num_inference_steps=args.num_inference_steps, height=args.height, width=args.width,
                              negative_prompt=args.negative_prompt)
            for i, image in zip(chunk, images):
                tmp = image_path(folder, i) + f".rank{rank}.tmp"
                image.save(tmp, format="PNG")
                os.replace(tmp, image_path(folder, i))
            bar.update(len(chunk))
    bar.close()
    return len(jobs)


def wait_for_images(output_dir: str, guidance_scales: Sequence[float], n: int, timeout: float) -> None:
    """Block until all ``n`` images of every guidance scale exist (the other ranks' shares)."""
    from tqdm import tqdm

    total = n * len(guidance_scales)

    def count():
        return sum(os.path.isfile(image_path(guidance_folder(output_dir, g),
                                             i)) for g in guidance_scales for i in range(n))

    done, start = count(), time.time()
    with tqdm(total=total, initial=done, desc="waiting for the other ranks", unit="image",
              disable=done == total) as bar:
        while done < total:
            if time.time() - start > timeout:
                raise metrics.MetricsError(f"{total - done} images are still missing in {output_dir} after "
                                           f"{timeout:.0f} s: "
                                           "did another rank fail? Run the same command again to resume")
            time.sleep(2)
            new = count()
            bar.update(new - done)
            done = new


def reference_stats(reference: str, extractor: "metrics.FeatureExtractor", output_dir: str):
    """(mu, sigma) of the reference: read from a ``.npz``, or computed from a folder once and cached in
    ``output_dir`` under a name that depends on the folder's file list and the feature network."""
    if reference.endswith(".npz"):
        return metrics.read_stats(reference)
    files = metrics.list_images(reference)
    key = hashlib.sha1(json.dumps([extractor.kind, extractor.source,
                                   [(f, os.path.getsize(f)) for f in files]]).encode())
    cache = os.path.join(output_dir, f"reference_{extractor.kind}_{key.hexdigest()[:12]}.npz")
    if os.path.isfile(cache):
        return metrics.read_stats(cache)
    mu, sigma = metrics.statistics(extractor(files))
    np.savez(cache, mu=mu, sigma=sigma)
    return mu, sigma


def shapes_accuracy(files: Sequence[str], prompts: Sequence[str]) -> Optional[Dict[str, float]]:
    """The demo shapes score (colour / shape / background / all three) when every prompt is a demo
    caption, else None."""
    from PIL import Image

    from sd.data import demo_data
    from sd.evaluation.shapes import score

    labels = {p[3]: p[:3] for p in demo_data.all_prompts()}
    if not all(p in labels for p in prompts):
        return None
    readings = []
    for f in files:
        with Image.open(f) as im:
            readings.append(demo_data.check(im.convert("RGB")))
    return score([labels[p] for p in prompts], readings)


def score_all(args, prompts: Sequence[str]) -> Dict:
    """Score every guidance folder; returns the results (also written as json, md and the curve)."""
    extractor = metrics.FeatureExtractor(args.fid_features, args.inception_weights, args.clip_model_name_or_path,
                                         batch_size=50)
    clip = extractor.clip if args.fid_features == "clip" else metrics.load_clip(args.clip_model_name_or_path)
    ref = reference_stats(args.reference, extractor, args.output_dir)
    fd_name = "FID" if args.fid_features == "inception" else "FD-CLIP"
    rows = []
    for g in args.guidance_scale:
        files = [image_path(guidance_folder(args.output_dir, g), i) for i in range(len(prompts))]
        fd = metrics.frechet_distance(*metrics.statistics(extractor(files)), *ref)
        cs = metrics.clip_score_of(clip, files, prompts)
        row = {"guidance_scale": g, fd_name: fd, "clip_score": cs["clip_score"],
               "clip_score_torchmetrics": cs["clip_score_torchmetrics"], "n": len(files)}
        shapes = shapes_accuracy(files, prompts)
        if shapes is not None:
            row["shapes"] = {k: v for k, v in shapes.items() if k != "n"}
        rows.append(row)
        print(f"guidance {g:g}: {fd_name} {fd:.4f}, CLIP score {cs['clip_score']:.4f}")
    results = {"fd_name": fd_name, "reference": args.reference, "captions": args.captions,
               "unet": getattr(args, "unet_path", None),
               "inception_weights": args.inception_weights if args.fid_features == "inception" else None,
               "clip_model": args.clip_model_name_or_path, "scheduler": args.scheduler,
               "num_inference_steps": args.num_inference_steps, "height": args.height, "width": args.width,
               "seed": args.seed, "rows": rows}
    with open(os.path.join(args.output_dir, RESULTS_JSON), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, RESULTS_MD), "w", encoding="utf-8") as f:
        f.write(format_table(results))
    plot_curve(results, os.path.join(args.output_dir, CURVE_PNG))
    return results


def format_table(results: Dict) -> str:
    """Markdown: one row per guidance scale."""
    fd = results["fd_name"]
    shapes = any("shapes" in r for r in results["rows"])
    head = (f"| guidance | {fd} ↓ | CLIP score ↑ | CLIP score (torchmetrics) | images |"
            + (" shapes: all three |" if shapes else ""))
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results["rows"]:
        lines.append(f"| {r['guidance_scale']:g} | {r[fd]:.3f} | {r['clip_score']:.3f} | "
                     f"{r['clip_score_torchmetrics']:.3f} | "
                     f"{r['n']} |" + (f" {r['shapes']['all']:.1%} |" if "shapes" in r else ""))
    return "\n".join(lines) + "\n"


def plot_curve(results: Dict, path: str) -> None:
    """The FID-vs-CLIP-score curve over the guidance scales (PaddleMIX's figure), each point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd = results["fd_name"]
    xs = [r["clip_score"] for r in results["rows"]]
    ys = [r[fd] for r in results["rows"]]
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(results["rows"], xs, ys):
        ax.annotate(f"g {r['guidance_scale']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP score (logit_scale.exp() · cos)")
    ax.set_ylabel(fd)
    ax.set_title(f"{fd} vs CLIP score, {results['rows'][0]['n']} images per guidance scale", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_args(args, parser) -> None:
    """Flag checks before any model loads (``parser.error``: one line and exit status 2)."""
    try:
        _check(args)
    except metrics.MetricsError as e:
        parser.error(str(e))


def _check(args) -> None:
    if not args.captions:
        raise metrics.MetricsError("--evaluate coco needs --captions FILE (PaddleMIX's coco30k.tsv, or "
                                   "data/demo_raw/demo.jsonl)")
    if not args.reference:
        raise metrics.MetricsError("--evaluate coco needs --reference DIR_or_stats.npz (the real images FID compares "
                                   "with)")
    if not os.path.exists(args.reference):
        raise metrics.MetricsError(f"--reference {args.reference} does not exist")
    if not args.clip_model_name_or_path:
        raise metrics.MetricsError("--evaluate coco needs --clip_model_name_or_path (openai/clip-vit-base-patch32, "
                                   "or offline the kit's ./tiny-sd/clip)")
    if args.num_images is not None and args.num_images < 2:
        raise metrics.MetricsError("--num_images must be at least 2 (a covariance needs two images)")
    available = len(read_prompts(args.captions))
    if args.num_images is not None and args.num_images > available:
        raise metrics.MetricsError(f"--num_images {args.num_images}: {args.captions} has only {available} captions")


def run_coco(pipe, args, unet: Optional[str] = None, timeout: float = 24 * 3600) -> int:
    """Generate (this rank's share, resuming), then on rank 0 wait for the rest and score. Returns the
    exit status: 0, or 2 after printing a user mistake (missing captions, weights, ...) as one line."""
    import sys

    args.unet_path = unet
    try:
        return _run(pipe, args, timeout)
    except metrics.MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(pipe, args, timeout: float) -> int:
    rank, world = rank_and_world()
    prompts = read_prompts(args.captions)
    if args.num_images is not None:
        if args.num_images > len(prompts):
            raise metrics.MetricsError(f"--num_images {args.num_images}: {args.captions} has only {len(prompts)} "
                                       "captions")
        prompts = prompts[: args.num_images]
    made = generate_missing(pipe, prompts, args.guidance_scale, args, rank, world)
    print(f"rank {rank}: {made} images generated, the others were already on disk")
    if rank != 0:
        return 0
    wait_for_images(args.output_dir, args.guidance_scale, len(prompts), timeout)
    results = score_all(args, prompts)
    print(format_table(results))
    print(f"written: {os.path.join(args.output_dir, RESULTS_JSON)}, {RESULTS_MD}, {CURVE_PNG}")
    return 0
