"""Stable Diffusion for training: frozen VAE + text encoder, trainable UNet, forward → loss.

``StableDiffusionModel.forward(input_ids, pixel_values, seeds)`` returns the training loss of one
batch. Every random draw for sample i (VAE posterior sample, noise, timestep, offset noise,
perturbation) comes from its own ``numpy.random.default_rng(seeds[i])``: the trainer passes the seed
of (run seed, the sample's slot, step) (sd/train_loader.py), so a sample draws the same whichever
rank or micro-batch it lands in, and a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import paddle
from paddle import nn

from sd import components, diffusion
from sd.components import init_unet_from_config
from sd.components.pipeline import build_pipeline
from sd.runtime import tensor_files
from sd.sd_args import ModelArguments

UNET_WEIGHTS = "diffusion_paddle_model.safetensors"  # ppdiffusers' file name (PADDLE_SAFETENSORS_WEIGHTS_NAME)
UNET_EMA_WEIGHTS = "diffusion_paddle_model.ema.safetensors"  # its variant "ema"


def per_sample(rngs: List[np.random.Generator], draw: Callable[[np.random.Generator], np.ndarray]) -> paddle.Tensor:
    """(B, ...) tensor of ``draw(rng)`` for each sample's generator, stacked (float32 draws stay float32)."""
    return paddle.to_tensor(np.stack([draw(rng) for rng in rngs]))


def _float32(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.dtype == paddle.float32 else x.astype("float32")  # no copy when already fp32


def _conv2d_dense_bias(self, x, *args, **kwargs):
    """``Conv2D.forward`` (and ppdiffusers' ``LoRACompatibleConv``'s, without LoRA) with the bias added
    as a same-shape tensor (see ``use_dense_conv_bias``); any other case takes the class's own forward."""
    import paddle.nn.functional as F

    if self.bias is None or self._padding_mode != "zeros" or getattr(self, "lora_layer", None) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    out = F.conv2d(x, self.weight, None, self._stride, self._padding, self._dilation, self._groups,
                   data_format=self._data_format)
    shape = [1] * len(out.shape)
    shape[1 if self._data_format == "NCHW" else -1] = -1
    return out + self.bias.reshape(shape).expand(out.shape)


def use_dense_conv_bias(layer: nn.Layer) -> int:
    """Make every ``nn.Conv2D`` in ``layer`` add its bias as an expanded (N, C, H, W) tensor.

    Paddle's CPU kernel for a broadcast add (N, C, H, W) + (1, C, 1, 1) is 4-8× slower than a
    same-shape add (measured: 6 ms vs 1.3 ms incl. the expand at 4×32×64×64), i.e. as slow as the
    convolution itself; expanding first gives bit-identical outputs and gradients of the same sums.
    CPU only (GPU kernels broadcast at full speed). Returns the number of layers changed.
    """
    import types

    changed = 0
    for sub in layer.sublayers(include_self=True):
        if isinstance(sub, nn.Conv2D) and sub.bias is not None:
            sub.forward = types.MethodType(_conv2d_dense_bias, sub)
            changed += 1
    return changed


class EMA:
    """Exponential moving average of parameters, with the usual warm-up: decay_t = min(decay, (1+t)/(10+t))."""

    def __init__(self, layer: nn.Layer, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in layer.state_dict().items()}

    @paddle.no_grad()
    def update(self, layer: nn.Layer) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in layer.state_dict().items():
            if k in self.shadow:
                self.shadow[k].scale_(d).add_(v.detach() * (1 - d))

    def copy_to(self, layer: nn.Layer) -> Dict[str, paddle.Tensor]:
        """Load the averaged weights into ``layer``; returns the weights it had (to restore)."""
        backup = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        layer.set_state_dict(self.shadow)
        return backup


class _VaeMoments(nn.Layer):
    """(B, 3, H, W) → (B, 2·C, h, w): the VAE posterior's mean and log-variance (``vae.encode`` before the
    distribution), as one layer to export."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv

    def forward(self, x):
        return self.quant_conv(self.encoder(x))


class _TextHidden(nn.Layer):
    """(B, L) token ids → (B, L, D) last hidden states of a text encoder, as one layer to export."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class StableDiffusionModel(nn.Layer):
    _static: Optional[Dict[str, object]] = None  # static-graph versions of the compute paths (see compile_static)
    _wrap: Optional[Callable[[str, Callable], Callable]] = None  # see instrument

    def __init__(self, args: ModelArguments, recompute: bool = False):
        super().__init__()
        self.args = args
        self.paths = args.component_paths()
        sources = components.training_sources(args)  # hub names checked here, before anything is built
        self.tokenizer = components.load_tokenizer(sources["tokenizer"])
        self.vae = components.load_vae(sources["vae"])
        self.text_encoder = components.load_text_encoder(sources["text_encoder"])
        # a config file: random init (pretraining)
        if isinstance(sources["unet"], str) and os.path.isfile(sources["unet"]):
            self.unet = init_unet_from_config(sources["unet"])
        else:
            self.unet = components.load_unet(sources["unet"])
        if self.unet.config.cross_attention_dim != self.text_encoder.config.hidden_size:
            raise ValueError(f"UNet cross_attention_dim {self.unet.config.cross_attention_dim} ≠ text encoder width "
                             f"{self.text_encoder.config.hidden_size}: use a UNet config that matches the text encoder")
        self.noise_scheduler = components.load_noise_scheduler(sources["scheduler"], args.prediction_type)
        alphas_cumprod = np.asarray(self.noise_scheduler.alphas_cumprod, np.float32)
        self.register_buffer("alphas_cumprod", paddle.to_tensor(alphas_cumprod), persistable=False)
        self.latent_factor = components.latent_factor(self.vae.config)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        if "gpu" not in paddle.device.get_device():  # CPU: same numbers, faster conv bias (see use_dense_conv_bias)
            use_dense_conv_bias(self.vae)
            use_dense_conv_bias(self.unet)

        self.vae.eval()
        for p in self.vae.parameters():
            p.stop_gradient = True
        self.text_encoder.train() if args.train_text_encoder else self.text_encoder.eval()
        for p in self.text_encoder.parameters():
            p.stop_gradient = not args.train_text_encoder
        if recompute:
            self.unet.enable_gradient_checkpointing()
            if args.train_text_encoder and hasattr(self.text_encoder, "gradient_checkpointing_enable"):
                self.text_encoder.gradient_checkpointing_enable()
        if args.enable_xformers_memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()
        self.ema = EMA(self.unet, args.ema_decay) if args.use_ema else None
        if self.ema is not None and args.ema_init_from:
            self.load_ema(args.ema_init_from)

    # ---------------------------------------------------------------------------------------------
    def train(self):  # the frozen parts stay in eval mode whatever the trainer asks
        if self.training and self.unet.training and not self.vae.training and \
                self.text_encoder.training == self.args.train_text_encoder:
            return self  # already so (the Trainer asks every step; walking all sublayers costs ~2 ms on CPU)
        super().train()
        self.vae.eval()
        if not self.args.train_text_encoder:
            self.text_encoder.eval()
        return self

    def encode_text(self, input_ids: paddle.Tensor) -> paddle.Tensor:
        """(B, L) token ids → (B, L, D) hidden states the UNet cross-attends to."""
        if self.args.train_text_encoder:
            return self.text_encoder(input_ids)[0]
        fast = self._compiled("text")
        if fast is not None:
            return fast(input_ids)
        with paddle.no_grad():
            return self.text_encoder(input_ids)[0]

    @paddle.no_grad()
    def encode_images(self, pixel_values: paddle.Tensor, rngs: List[np.random.Generator]) -> paddle.Tensor:
        """(B, 3, H, W) in [-1, 1] → scaled latents (B, 4, H/f, W/f), sampled from the posterior with one
        generator per sample (``rngs``, B of them)."""
        fast = self._compiled("vae")
        if fast is None:
            dist = self.vae.encode(pixel_values).latent_dist
        else:
            from ppdiffusers.models.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(fast(_float32(pixel_values)))
        return self.sample_latents(dist.mean, dist.std, rngs)

    def _compiled(self, name: str):
        """The static or inference version of compute path ``name`` (vae, text, unet), or None (eager)."""
        if self.args.frozen_inference and "frozen_inference" not in (self._static or {}):
            self.use_frozen_inference()
        return (self._static or {}).get(name)

    def use_frozen_inference(self) -> None:
        """``--frozen_inference``: run the frozen VAE encoder and (unless trained) the text encoder through
        Paddle Inference (``sd/components/inference_encoder.py``): ≈ 2.5× faster each on a CPU; their outputs differ
        from the eager ones by float rounding (≈ 1e-6 relative)."""
        from sd.components.inference_encoder import InferenceFunction

        frozen = {"frozen_inference": True, "vae": InferenceFunction(_VaeMoments(self.vae))}
        if not self.args.train_text_encoder:
            frozen["text"] = InferenceFunction(_TextHidden(self.text_encoder))
        self._static = dict(self._static or {}, **frozen)

    def _unet_prediction(self, noisy: paddle.Tensor, t: paddle.Tensor, context: paddle.Tensor) -> paddle.Tensor:
        """(B, C, h, w) noisy latents, (B,) timesteps, (B, L, D) context → (B, C, h, w) UNet output."""
        return self.unet(noisy, t, encoder_hidden_states=context, return_dict=False)[0]

    def compile_static(self) -> None:
        """``--to_static``: run the UNet (forward and backward) and the frozen VAE encoder as static graphs.

        Each is converted whole by ``paddle.jit.to_static(full_graph=True)`` on its first call (tens of
        seconds on a CPU) and re-traced if an input shape changes; the step's random draws (numpy), the
        noising and the loss stay eager, so a step draws exactly what the eager step draws. On Paddle 3.3's
        CPU build the static programs run the same kernels as eager (losses and gradients came out
        bit-equal; tests/test_speed_paths.py allows float rounding), and no faster. The modules themselves
        are untouched (EMA, checkpoints and image logging use them eagerly).
        """
        static = {"unet": paddle.jit.to_static(self._unet_prediction, full_graph=True)}
        if not self.args.frozen_inference:  # else the VAE runs through Paddle Inference (use_frozen_inference)
            static["vae"] = paddle.jit.to_static(_VaeMoments(self.vae), full_graph=True)
        self._static = dict(self._static or {}, **static)

    def instrument(self, wrap: Callable[[str, Callable], Callable]) -> None:
        """Call each compute path through ``wrap(name, fn)``, which returns a function doing what ``fn`` does
        (a timer, say): ``vae_encode`` (:meth:`encode_images`), ``text_encode`` (:meth:`encode_text`),
        ``latent_sample`` (:meth:`sample_latents`) and ``unet_forward`` (the UNet's prediction, eager or
        compiled by :meth:`compile_static`, before or after this call)."""
        self.encode_images = wrap("vae_encode", self.encode_images)
        self.encode_text = wrap("text_encode", self.encode_text)
        self.sample_latents = wrap("latent_sample", self.sample_latents)
        self._wrap = wrap

    @paddle.no_grad()
    def sample_latents(self, mean: paddle.Tensor, std: paddle.Tensor, rngs: List[np.random.Generator]) -> paddle.Tensor:
        """Posterior sample z = (μ + σ·ε) · scaling_factor, ε_i ~ N(0, I) from ``rngs[i]``; μ, σ: (B, 4, h, w), any
        float dtype."""
        mean, std = _float32(mean), _float32(std)
        eps = per_sample(rngs, lambda rng: rng.standard_normal(mean.shape[1:], dtype=np.float32))
        return (mean + std * eps) * self.scaling_factor

    def forward(self, input_ids: Optional[paddle.Tensor] = None, pixel_values: Optional[paddle.Tensor] = None,
                seeds: Sequence[int] = (), latent_mean: Optional[paddle.Tensor] = None,
                latent_std: Optional[paddle.Tensor] = None, encoder_hidden_states: Optional[paddle.Tensor] = None,
                **unused) -> paddle.Tensor:
        """One batch → scalar loss. ``seeds`` (B ints) fix every random draw, one seed per sample.

        Inputs: ``pixel_values`` (B, 3, H, W) and ``input_ids`` (B, L) (the VAE and text encoder run
        here), or precomputed ones (``sd/tools/precompute_latents.py``): ``latent_mean``/``latent_std``
        (B, 4, h, w), the VAE posterior, sampled here every step, and ``encoder_hidden_states`` (B, L, D).
        Draw order of each sample's generator (tests rely on it; the same in both modes): posterior ε
        (4,h,w), noise (4,h,w), timestep, then offset noise (4,1,1) and perturbation (4,h,w) when enabled.
        """
        a = self.args
        batch = (latent_mean if latent_mean is not None else pixel_values).shape[0]
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}: give one per sample")
        rngs = [np.random.default_rng(s) for s in seeds]
        if latent_mean is not None:
            latents = self.sample_latents(latent_mean, latent_std, rngs)
        else:
            latents = self.encode_images(pixel_values, rngs)
        shape = latents.shape[1:]  # (4, h, w)
        noise = per_sample(rngs, lambda rng: rng.standard_normal(shape, dtype=np.float32))
        t = paddle.to_tensor(np.array([rng.integers(0, len(self.alphas_cumprod)) for rng in rngs]), dtype="int64")
        if a.noise_offset:  # per-(sample, channel) constant: lets the model shift overall brightness
            noise = noise + a.noise_offset * per_sample(rngs, lambda rng: rng.standard_normal([shape[0], 1, 1],
                                                                                             dtype=np.float32))
        input_noise = noise
        if a.input_perturbation:  # Ning et al. 2023: noise the input with a perturbed ε, keep ε as the target
            input_noise = noise + a.input_perturbation * per_sample(
                rngs, lambda rng: rng.standard_normal(shape, dtype=np.float32))
        noisy = diffusion.add_noise(latents, input_noise, t, self.alphas_cumprod)
        if encoder_hidden_states is None:  # precomputed ones never meet --train_text_encoder (finalize refuses it)
            encoder_hidden_states = self.encode_text(input_ids)
        unet = self._compiled("unet")
        unet = self._unet_prediction if unet is None else unet
        if self._wrap is not None:
            unet = self._wrap("unet_forward", unet)
        pred = unet(noisy, t, _float32(encoder_hidden_states))
        target = noise if a.prediction_type == "epsilon" else diffusion.velocity(latents, noise, t, self.alphas_cumprod)
        weights = None
        if a.snr_gamma is not None:
            weights = diffusion.min_snr_weights(diffusion.snr(t, self.alphas_cumprod), a.snr_gamma, a.prediction_type)
        return diffusion.diffusion_loss(pred, target, weights)

    # ---------------------------------------------------------------------------------------------
    def trainable_groups(self):
        """[(name, parameters)] of what the optimizer updates."""
        groups = [("unet", [p for p in self.unet.parameters() if not p.stop_gradient])]
        if self.args.train_text_encoder:
            groups.append(("text_encoder", [p for p in self.text_encoder.parameters() if not p.stop_gradient]))
        return groups

    def save_trained(self, output_dir: str) -> None:
        """Write the trained modules in ``from_pretrained`` layout: unet/ (+ EMA variant), text_encoder/.

        The UNet and its EMA are written tensor by tensor (sd/runtime/tensor_files.py: the same safetensors
        files ``save_pretrained`` writes, without first copying all weights to the host), so a save at real
        size needs no second copy of the UNet in memory.
        """
        unet_dir = os.path.join(output_dir, "unet")
        os.makedirs(unet_dir, exist_ok=True)
        self.unet.save_config(unet_dir)
        weights = self.unet.state_dict()
        tensor_files.save_tensors(weights, os.path.join(unet_dir, UNET_WEIGHTS), {"format": "pd"})
        if self.ema is not None:
            averaged = {k: self.ema.shadow.get(k, v) for k, v in weights.items()}
            tensor_files.save_tensors(averaged, os.path.join(unet_dir, UNET_EMA_WEIGHTS), {"format": "pd"})
        if self.args.train_text_encoder:
            self.text_encoder.save_pretrained(os.path.join(output_dir, "text_encoder"))

    def save_pipeline(self, output_dir: str) -> None:
        """Write a whole ``StableDiffusionPipeline`` folder (model_index.json, every component, the
        training noise schedule), loadable on its own; the EMA variant of the UNet beside it."""
        pipe = build_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, self.noise_scheduler)
        pipe.save_pretrained(output_dir)
        self.save_trained(output_dir)  # the EMA variant (and the same unet/, text_encoder/ again)

    def load_ema(self, checkpoint_dir: str) -> None:
        """Start the EMA from a checkpoint's EMA weights (``unet/*.ema.*``) and its update count, so that the decay
        goes on at the checkpoint's warm-up stage (``--ema_init_from``: a warm start at another resolution)."""
        import json

        from sd.runtime.checkpoints import STATE_FILE

        ema = components.load_unet(os.path.join(checkpoint_dir, "unet"), variant="ema").state_dict()
        missing = sorted(set(self.ema.shadow) - set(ema))
        if missing:
            raise ValueError(f"--ema_init_from {checkpoint_dir}: its EMA UNet lacks {len(missing)} of this UNet's "
                             f"tensors (e.g. {missing[0]}): give a checkpoint of the same UNet config")
        self.ema.shadow = {k: ema[k].detach().clone() for k in self.ema.shadow}
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            self.ema.num_updates = int(json.load(f).get("ema_updates", 0))

    def load_trained(self, checkpoint_dir: str) -> None:
        """Inverse of ``save_trained`` (used on resume): the weights are read into the existing UNet and EMA
        tensor by tensor, so resuming at real size builds no second UNet."""
        unet_dir = os.path.join(checkpoint_dir, "unet")
        _read_into(self.unet.state_dict(), os.path.join(unet_dir, UNET_WEIGHTS))
        if self.ema is not None:
            _read_into(self.ema.shadow, os.path.join(unet_dir, UNET_EMA_WEIGHTS))
        if self.args.train_text_encoder:
            self.text_encoder.set_state_dict(
                components.load_text_encoder(os.path.join(checkpoint_dir, "text_encoder")).state_dict())


def _read_into(tensors: Dict[str, paddle.Tensor], path: str) -> None:
    """Copy every tensor of the safetensors file ``path`` into the tensor of the same name (and shape)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete (resume from an older one)")
    missing = set(tensors)
    for name, array in tensor_files.iter_tensors(path):
        if name not in tensors or tuple(tensors[name].shape) != array.shape:
            raise ValueError(f"{path}: {name} {array.shape} does not fit this model's "
                             f"{tuple(tensors[name].shape) if name in tensors else 'parameters (no such name)'}")
        tensors[name].set_value(array)
        missing.discard(name)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of this model's tensors, e.g. {sorted(missing)[0]}")
