"""SD v1's noise schedule and sampler settings, and the one factory of ppdiffusers schedulers.

Every scheduler of the repository comes from :func:`make_scheduler`: the training schedule
(``sd/model.py`` through ``components.load_noise_scheduler``), the samplers of image logging,
in-training scores and ``eval.py``, the exported pipeline's, and the kit's ``scheduler/`` folder.
"""

from __future__ import annotations

import inspect
from typing import Optional

# SD v1's training noise schedule ...
SD_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# ... and its sampler settings, field for field CompVis/stable-diffusion-v1-4's scheduler_config.json:
# latents are not in [-1, 1] (no clipping), the final step uses alpha_0 rather than 1, timesteps are
# offset by one, PNDM runs as PLMS; timestep spacing and prediction type are each class's default.
SD_SCHEDULER_CONFIG = dict(**SD_NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1, clip_sample=False,
                           skip_prk_steps=True, trained_betas=None)
# sampler name → ppdiffusers class (all exist in ppdiffusers 0.29): the choices of --scheduler
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
}
# the training schedule (the forward process: alphas_cumprod, add_noise), not a sampler choice
TRAINING_SCHEDULERS = {"ddpm": "DDPMScheduler"}
FORCED = {"dpm-solver++": {"algorithm_type": "dpmsolver++"}}  # what the name promises, whatever the config says


def make_scheduler(name: str, config: Optional[dict] = None, **overrides):
    """A scheduler of kind ``name`` with SD v1's settings, or those of ``config``.

    Args:
        name: a key of ``SCHEDULERS`` (a sampler) or ``"ddpm"`` (the training schedule).
        config: settings to build from instead of ``SD_SCHEDULER_CONFIG`` (e.g. a folder's
            ``scheduler_config.json``, or the training schedule's config for a sampler); its private
            ``_`` keys are ignored.
        overrides: settings that win over the config (e.g. ``prediction_type``); ``FORCED`` wins over both.
    Returns:
        the scheduler; settings its class does not take do not reach it but are written to its config
        (as ``from_config`` keeps them): SD v1's own ``scheduler_config.json`` states ``clip_sample: false``
        for its PNDM scheduler, so a sampler built from that config samples as SD v1 instead of taking its
        class's defaults (DDIM would clip latents to [-1, 1]).
    Raises:
        ValueError: for an unknown ``name``.
    """
    import ppdiffusers

    classes = {**SCHEDULERS, **TRAINING_SCHEDULERS}
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(ppdiffusers, classes[name])
    given = SD_SCHEDULER_CONFIG if config is None else {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = {**given, **overrides, **FORCED.get(name, {})}
    accepted = set(inspect.signature(cls.__init__).parameters)
    scheduler = cls(**{k: v for k, v in cfg.items() if k in accepted})
    scheduler.register_to_config(**{k: v for k, v in cfg.items() if k not in accepted})
    return scheduler
