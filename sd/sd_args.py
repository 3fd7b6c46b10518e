"""Command-line arguments: three dataclasses parsed by paddlenlp's ``PdArgumentParser``.

The dataclass fields are the single source of truth (flag names, defaults, help). PaddleMIX's
``FLAG_*`` environment switches are resolved in ``resolve_switches`` with the precedence
**command line > environment > default**; the effective values and their sources are logged.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from paddlenlp.trainer import TrainingArguments

from sd.runtime.checkpoints import STATE_FILE

# switch field → legacy environment variable (PaddleMIX's train.sh exports these)
ENV_SWITCHES = {
    "use_ema": "FLAG_USE_EMA",
    "recompute": "FLAG_RECOMPUTE",
    "enable_xformers_memory_efficient_attention": "FLAG_XFORMERS",
    "fused_linear": "FLAG_FUSED_LINEAR",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


@dataclass
class ModelArguments:
    pretrained_model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "SD folder or hub name (e.g. CompVis/stable-diffusion-v1-4) holding vae/, "
                                        "text_encoder/, tokenizer/, unet/, scheduler/; the four *_name_or_path flags "
                                        "below take precedence over it"})
    from_hf_hub: bool = field(
        default=False, metadata={"help": "hub names (anything not a local folder) come from the Hugging Face Hub "
                                         "(HF_ENDPOINT) instead of ppdiffusers' download server (PPNLP_ENDPOINT)"})
    vae_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "pretrained VAE folder or hub name (frozen)"})
    text_encoder_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "pretrained CLIPTextModel folder or hub name"})
    unet_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "UNet folder to start from, or a UNet config .json to initialise randomly"})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "tokenizer folder or hub name"})
    model_max_length: int = field(default=77, metadata={"help": "tokens per caption (padded/truncated)"})
    prediction_type: str = field(default="epsilon", metadata={"help": "what the UNet predicts: epsilon | v_prediction"})
    num_inference_steps: int = field(default=50, metadata={"help": "DDIM steps for the logged samples"})
    train_text_encoder: bool = field(default=False, metadata={"help": "train the text encoder too"})
    unet_learning_rate: Optional[float] = field(default=None, metadata={"help": "UNet LR (default: --learning_rate)"})
    text_encoder_learning_rate: Optional[float] = field(
        default=None, metadata={"help": "text encoder LR when --train_text_encoder (default: --learning_rate)"})
    noise_offset: float = field(
        default=0.0, metadata={"help": "scale of per-channel offset noise (0 = off; ~0.05-0.1)"})
    snr_gamma: Optional[float] = field(
        default=None, metadata={"help": "Min-SNR-γ loss weighting (5.0 recommended); off if unset"})
    input_perturbation: float = field(
        default=0.0, metadata={"help": "input perturbation scale (0.1 recommended; 0 = off)"})
    image_logging_steps: int = field(
        default=1000, metadata={"help": "log reconstructions and samples every N steps (rounded to a multiple of "
                                        "--logging_steps; 0 = never)"})
    first_image_logging_step: int = field(
        default=0, metadata={"help": "also log images once at this optimizer step (0 = not): an early look at the "
                                     "samples, before the first multiple of --image_logging_steps"})
    use_ema: bool = field(default=False, metadata={"help": "keep an EMA of the UNet (env FLAG_USE_EMA)"})
    ema_decay: float = field(default=0.9999, metadata={"help": "EMA decay per optimizer step"})
    ema_init_from: Optional[str] = field(
        default=None, metadata={"help": "a checkpoint folder (checkpoint-N) of a run with EMA: its EMA weights "
                                        "(unet/*.ema.*) and EMA update count start this run's EMA (e.g. a 512 px run "
                                        "warm-started with --unet_name_or_path checkpoint-N/unet); needs --use_ema. "
                                        "Unset: the EMA starts from the UNet as loaded, with a fresh warm-up"})
    enable_xformers_memory_efficient_attention: bool = field(
        default=False, metadata={"help": "memory-efficient attention (GPU only; env FLAG_XFORMERS)"})
    fused_linear: bool = field(
        default=False, metadata={"help": "fused linear layers (GPU only; env FLAG_FUSED_LINEAR)"})
    frozen_inference: bool = field(
        default=False, metadata={"help": "CPU: run the frozen VAE encoder and text encoder through Paddle Inference "
                                         "(fused kernels, ≈ 2.5× faster each); their outputs then differ from eager by "
                                         "float rounding (≈ 1e-6 relative)"})
    only_save_updated_model: bool = field(
        default=True, metadata={"help": "checkpoints hold only trained modules (unet, EMA unet, text encoder)"})

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"--prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"--snr_gamma must be > 0, got {self.snr_gamma}")
        if self.noise_offset < 0 or self.input_perturbation < 0:
            raise ValueError("--noise_offset and --input_perturbation must be ≥ 0")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.model_max_length < 2:
            raise ValueError("--model_max_length must be ≥ 2")
        for name in ("unet_learning_rate", "text_encoder_learning_rate"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.ema_init_from is not None and not (
                glob.glob(os.path.join(self.ema_init_from, "unet", "*.ema.*"))
                and os.path.isfile(os.path.join(self.ema_init_from, STATE_FILE))):
            raise ValueError(f"--ema_init_from {self.ema_init_from}: not a complete checkpoint with EMA weights (it "
                             f"needs unet/*.ema.safetensors and {STATE_FILE}); give a checkpoint-N folder of a run "
                             "trained with the EMA on (FLAG_USE_EMA=1)")
        if self.num_inference_steps < 1 or self.image_logging_steps < 0 or self.first_image_logging_step < 0:
            raise ValueError("--num_inference_steps must be ≥ 1, --image_logging_steps and --first_image_logging_step "
                             "≥ 0 (0 = never)")

    def component_paths(self) -> Dict[str, Optional[str]]:
        """Where each component comes from: its own flag, else ``<pretrained>/<component>``."""
        base = self.pretrained_model_name_or_path

        def pick(own, sub):
            return own if own else (os.path.join(base, sub) if base else None)

        return {"vae": pick(self.vae_name_or_path, "vae"),
                "text_encoder": pick(self.text_encoder_name_or_path, "text_encoder"),
                "tokenizer": pick(self.tokenizer_name, "tokenizer"), "unet": pick(self.unet_name_or_path, "unet"),
                "scheduler": os.path.join(base, "scheduler") if base else None}


@dataclass
class DataArguments:
    file_list: str = field(
        default="./data/filelist/train.filelist.list", metadata={"help": "the *.filelist.list to train on"})
    resolution: int = field(default=512, metadata={"help": "training image side in pixels"})
    line_format: str = field(default="laion400m", metadata={"help": "part-file line format: laion400m | laion_aes"})
    interpolation: str = field(
        default="lanczos", metadata={"help": "resize filter: lanczos (Lanczos-3, fast) | lanczos_exact "
                                             "(Pillow's) | bicubic | bilinear | box | nearest"})
    center_crop: bool = field(default=False, metadata={"help": "centre crop instead of random crop"})
    drop_caption_prob: float = field(default=0.1, metadata={"help": "probability of an empty caption (for guidance)"})
    allow_upscale: bool = field(
        default=False, metadata={"help": "upscale images smaller than --resolution instead of skipping"})
    max_bad_fraction: Optional[float] = field(
        default=None, metadata={"help": "stop if more than this fraction of records is bad"})
    shuffle_buffer: int = field(
        default=64, metadata={"help": "undecoded records each sample slot of the global batch holds to shuffle within "
                                      "part files (1 = file order); a rank holds per-device batch × accumulation × "
                                      "this many"})
    precomputed_latents: bool = field(
        default=False, metadata={"help": "--file_list holds latents and text hidden states written by "
                                         "`python -m sd.tools.precompute_latents` (no VAE/text encoder per step; "
                                         "fixed crop)"})
    # img2dataset shards (.tar / .parquet) listed in a .filelist: where the caption is, and metadata filters
    caption_key: Optional[str] = field(
        default=None, metadata={"help": "img2dataset shards: caption from this field of the .json (parquet: this "
                                        "column) instead of the .txt (parquet: the caption column)"})
    min_original_size: int = field(
        default=0, metadata={"help": "img2dataset shards: keep samples whose original_width and original_height "
                                     "are both at least this many pixels (0: all)"})
    where: Optional[List[str]] = field(
        default=None, metadata={"help": "img2dataset shards: thresholds on numeric metadata, e.g. "
                                        "--where 'pwatermark < 0.5' 'aesthetic >= 5' (a sample must pass all)"})

    def __post_init__(self):
        from sd.data.img2dataset import Where

        for text in self.where or ():
            Where.parse(text)  # a malformed threshold fails here, before anything loads
        if self.resolution < 8:
            raise ValueError(f"--resolution must be ≥ 8, got {self.resolution}")
        if self.line_format not in ("laion400m", "laion_aes"):
            raise ValueError(f"--line_format must be laion400m or laion_aes, got {self.line_format!r}")


@dataclass
class ScoreArguments:
    """The in-training scores (a base of SDTrainingArguments; ``--eval_steps`` is paddlenlp's own field)."""

    eval_captions: Optional[str] = field(
        default=None, metadata={"help": "score generated images every --eval_steps on these captions (a jsonl with "
                                        "'caption', PaddleMIX's coco30k.tsv, or one per line); off if unset"})
    eval_num_images: int = field(default=72, metadata={"help": "images generated (split over ranks) per evaluation"})
    eval_guidance_scale: float = field(default=5.0, metadata={"help": "guidance scale of the scored images"})
    eval_num_inference_steps: int = field(default=25, metadata={"help": "DDIM steps of the scored images"})
    eval_reference: Optional[str] = field(
        default=None, metadata={"help": "reference images (folder) or statistics (.npz) for FID / FD-CLIP; "
                                        "without it only the CLIP (and shapes) scores"})
    eval_clip_model: Optional[str] = field(
        default=None, metadata={"help": "CLIP model for the CLIP score and FD-CLIP (default: the kit's clip/ beside "
                                        "the text encoder)"})
    eval_inception_weights: Optional[str] = field(
        default=None, metadata={"help": "FID Inception weights (.pth/.safetensors/.pdparams): FID instead of FD-CLIP"})

    def __post_init__(self):
        super().__post_init__()
        if self.eval_captions is None:
            return
        if not self.eval_steps or self.eval_steps < 1:
            raise ValueError("--eval_captions needs --eval_steps K (score every K steps)")
        if str(self.evaluation_strategy).split(".")[-1].lower() != "no":
            raise ValueError("--eval_steps with --eval_captions scores generated images; leave "
                             "--evaluation_strategy at 'no' (there is no evaluation dataset)")
        if not os.path.isfile(self.eval_captions):
            raise ValueError(f"--eval_captions {self.eval_captions} does not exist")
        if self.eval_num_images < 2 or self.eval_num_inference_steps < 1:
            raise ValueError("--eval_num_images must be ≥ 2 and --eval_num_inference_steps ≥ 1")
        if self.eval_reference is not None and not os.path.exists(self.eval_reference):
            raise ValueError(f"--eval_reference {self.eval_reference} does not exist")


@dataclass
class SDTrainingArguments(ScoreArguments, TrainingArguments):  # ScoreArguments: --eval_captions ...
    output_dir: str = field(default="./laion400m_pretrain_output_trainer", metadata={"help": "checkpoints and logs"})
    logging_steps: int = field(default=50, metadata={"help": "log every N steps"})
    lr_scheduler_type: str = field(
        default="constant", metadata={"help": "learning-rate schedule (constant, linear, cosine, ...)"})
    max_nonfinite_steps: int = field(
        default=5, metadata={"help": "stop after this many consecutive updates with a non-finite loss or gradient "
                                     "(each one is skipped, not applied)"})
    cpu_threads: int = field(
        default=0, metadata={"help": "threads of Paddle's CPU kernels in each training process (0: Paddle's own "
                                     "choice, one); train.sh's RECIPE=sd-v1 without a GPU gives the cores per process"})

    def __post_init__(self):
        super().__post_init__()
        if self.cpu_threads < 0:
            raise ValueError(f"--cpu_threads must be ≥ 0, got {self.cpu_threads}")


def resolve_switches(args_objects, argv, environ=os.environ) -> Dict[str, Tuple[bool, str]]:
    """Set each ``FLAG_*`` switch: command line > environment > default (False).

    ``args_objects`` are the parsed dataclasses (``recompute`` lives in the Trainer's arguments);
    a switch counts as given on the command line when ``--name`` appears in ``argv``.
    Returns ``{field: (value, source)}`` with source ``cli``, ``env FLAG_X`` or ``default``.
    """
    resolved = {}
    for name, env in ENV_SWITCHES.items():
        owner = next(o for o in args_objects if hasattr(o, name))
        if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv):
            resolved[name] = (bool(getattr(owner, name)), "cli")
        elif env in environ:
            raw = environ[env].strip().lower()
            if raw not in _TRUE | _FALSE:
                raise ValueError(f"environment variable {env}={environ[env]!r} is not a boolean (use 0 or 1)")
            resolved[name] = (raw in _TRUE, f"env {env}")
        else:
            resolved[name] = (False, "default")
        setattr(owner, name, resolved[name][0])
    return resolved


def finalize(model_args: ModelArguments, data_args: DataArguments, training_args: SDTrainingArguments, log,
             argv=None) -> None:
    """Cross-argument rules and device fallbacks; everything changed is logged.

    ``log(message, changed=True)`` receives each message; ``changed`` is False for plain information.
    """
    import sys

    argv = sys.argv[1:] if argv is None else argv
    for name, (value, source) in resolve_switches((model_args, training_args), argv).items():
        log(f"switch {name} = {value} ({source})", changed=False)
    if model_args.ema_init_from and not model_args.use_ema:
        raise ValueError(f"--ema_init_from {model_args.ema_init_from} starts the EMA, which is off: add --use_ema True "
                         "(or FLAG_USE_EMA=1)")
    if model_args.image_logging_steps > 0:
        step = training_args.logging_steps
        rounded = max(step, round(model_args.image_logging_steps / step) * step)
        if rounded != model_args.image_logging_steps:
            log(f"image_logging_steps {model_args.image_logging_steps} rounded to {rounded}, "
                "a multiple of logging_steps")
            model_args.image_logging_steps = rounded
    import paddle

    if data_args.precomputed_latents:
        if model_args.train_text_encoder:
            raise ValueError("--precomputed_latents stores the text encoder's outputs, so it cannot be trained: "
                             "drop --train_text_encoder or train on images")
        log("--precomputed_latents: crop, --interpolation and --center_crop were fixed when the latents were "
            "written (sd.tools.precompute_latents); --resolution must match them", changed=False)
    on_gpu = paddle.is_compiled_with_cuda() and "gpu" in paddle.device.get_device()
    if on_gpu and model_args.frozen_inference:  # its predictors run on the CPU
        log("--frozen_inference is a CPU path (Paddle Inference on the CPU); switched off on the GPU")
        model_args.frozen_inference = False
    if not on_gpu:
        if training_args.fp16:  # the CPU build's GradScaler crashes on fp16
            log("--fp16 needs a GPU (the CPU build's GradScaler fails); training in fp32")
            training_args.fp16 = False
        if training_args.bf16:  # silently ignored by the CPU build: say so
            log("--bf16 has no effect on the CPU build of Paddle; training in fp32")
            training_args.bf16 = False
        for name in ("enable_xformers_memory_efficient_attention", "fused_linear"):
            if getattr(model_args, name):
                log(f"{name} needs a GPU; switched off on this device")
                setattr(model_args, name, False)
