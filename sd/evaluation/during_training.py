"""Scores during training: FID (or FD-CLIP), CLIP score and, on demo captions, the shapes score, every
``--eval_steps`` steps, logged to VisualDL beside the loss.

    sh train.sh --eval_steps 500 --eval_captions ./data/demo_raw/demo.jsonl --eval_num_images 72 \\
        --eval_reference ./data/demo_raw/images

``--eval_steps`` is paddlenlp's own TrainingArguments field ("run an evaluation every X steps"): with
``--evaluation_strategy`` left at "no" paddlenlp runs no evaluation of its own, and this callback uses
the field. The scores are those of ``eval.py --evaluate coco`` (``sd/evaluation/coco.py``), on the first
``--eval_num_images`` captions, one guidance scale, DDIM; the UNet's EMA weights when training keeps
them (what eval.py samples by default). Every rank generates its share (image ``i`` on rank
``i mod R``, from seed ``i``: the images do not depend on the number of ranks) into
``<output_dir>/eval/step-N/``; after a barrier rank 0 scores, logs ``eval/<score>`` scalars and
appends to ``<output_dir>/eval/scores.jsonl``. Generation uses no global random state, so training
continues exactly as without it.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from paddlenlp.trainer import TrainerCallback
from paddlenlp.utils.log import logger


class ScoreCallback(TrainerCallback):
    """Every ``args.eval_steps`` steps: generate, score, log (see the module docstring)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._scorers = None  # (feature extractor or None, CLIP), loaded at the first evaluation

    def on_step_end(self, args, state, control, **kwargs):
        if args.eval_captions and state.global_step % args.eval_steps == 0:
            self.evaluate(state.global_step)

    def _load(self, args):
        from sd.evaluation import metrics

        m = self.trainer.sd_model
        clip_path = args.eval_clip_model or os.path.join(os.path.dirname(os.path.normpath(m.paths["text_encoder"])),
                                                         "clip")
        if not os.path.isdir(clip_path) and args.eval_clip_model is None:
            raise ValueError(f"no CLIP model for the in-training scores at {clip_path}: pass --eval_clip_model")
        clip = metrics.load_clip(clip_path)
        extractor = None
        if args.eval_reference:
            kind = "inception" if args.eval_inception_weights else "clip"
            extractor = metrics.FeatureExtractor(kind, args.eval_inception_weights, clip_path)
            if kind == "clip":
                extractor.clip = clip  # one CLIP in memory
        return extractor, clip

    def evaluate(self, step: int) -> Optional[dict]:
        import paddle
        import paddle.distributed as dist

        from sd.evaluation import coco, metrics, sampling

        args, m = self.trainer.args, self.trainer.sd_model
        rank, world = max(0, dist.get_rank()), max(1, dist.get_world_size())
        prompts = coco.read_prompts(args.eval_captions)[: args.eval_num_images]
        folder = os.path.join(args.output_dir, "eval", f"step-{step:07d}")
        os.makedirs(folder, exist_ok=True)
        mine = [i for i in range(len(prompts)) if i % world == rank]
        size = self.trainer.resolution
        with sampling.pipeline_with_ema(m) as pipe:
            for k in range(0, len(mine), 16):
                chunk = mine[k : k + 16]
                images = sampling.generate(pipe, [prompts[i] for i in chunk], guidance_scale=args.eval_guidance_scale,
                                           num_inference_steps=args.eval_num_inference_steps, height=size, width=size,
                                           seeds=chunk)
                for i, image in zip(chunk, images):
                    image.save(coco.image_path(folder, i))
        if world > 1:
            dist.barrier()
        if rank != 0:
            return None
        if self._scorers is None:
            self._scorers = self._load(args)
        extractor, clip = self._scorers
        files = [coco.image_path(folder, i) for i in range(len(prompts))]
        with paddle.no_grad():
            cs = metrics.clip_score_of(clip, files, prompts)
            scores = {"clip_score": cs["clip_score"], "clip_score_torchmetrics": cs["clip_score_torchmetrics"]}
            if extractor is not None:
                ref = coco.reference_stats(args.eval_reference, extractor, os.path.join(args.output_dir, "eval"))
                name = "fid" if extractor.kind == "inception" else "fd_clip"
                scores[name] = metrics.frechet_distance(*metrics.statistics(extractor(files)), *ref)
        shapes = coco.shapes_accuracy(files, prompts)
        if shapes is not None:
            scores.update({f"shapes_{k}": v for k, v in shapes.items() if k != "n"})
        self.trainer.log_scalars({f"eval/{name}": value for name, value in scores.items()}, step)
        with open(os.path.join(args.output_dir, "eval", "scores.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "images": len(files), **scores}) + "\n")
        logger.info(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores
