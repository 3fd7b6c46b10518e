"""The one place that builds ppdiffusers' ``StableDiffusionPipeline``: around loaded modules (training's
image logging and scores, ``eval.py``, a saved pipeline folder, the kit, the benchmark) or from a folder.

Neither builds a safety checker or a feature extractor: the images are the models' own.
"""

from __future__ import annotations


def build_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline around in-memory modules.

    Args:
        vae, text_encoder, tokenizer, unet: loaded modules (shared with the caller, not copied).
        scheduler: a scheduler instance (``sd.components.schedulers.make_scheduler``).
    """
    from ppdiffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def pipeline_from_folder(folder: str, **components):
    """A StableDiffusionPipeline loaded from a local ``model_index.json`` folder by ppdiffusers' own loader.

    Args:
        folder: the pipeline folder.
        components: loaded modules replacing the folder's (``unet=``, ``text_encoder=``), and
            ``from_pretrained`` options (``from_diffusers=True`` for PyTorch weights).
    """
    from ppdiffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, **components)
