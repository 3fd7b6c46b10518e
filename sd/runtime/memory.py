"""Memory of a training run, planned before it starts: per device and for the host, in bytes, by named term.

SD v1 pretraining: the UNet trained with AdamW, the VAE and CLIP text encoder frozen (``--train_text_encoder``
adds the text encoder's weights, gradients and moments, not its activations). Two kinds of term:

* **exact**, from the parameter counts (UNet and VAE counted from modules built under ``paddle.LazyGuard``,
  which allocates nothing; the CLIP text encoder from its config): weights, gradients, AdamW moments, the EMA
  copy, the frozen encoders, what a checkpoint save copies, the checkpoint's size on disk;
* **fitted**, the UNet's activations of one forward + backward: ``a·B·A + q·B·A² + c`` bytes for batch B
  and latent area A = (R/f)² (f = the VAE's downsampling factor, 8 for SD). ``q`` is the self-attention
  probabilities (heads × N² per layer) the eager ("math") attention keeps; memory-efficient attention
  (Paddle's flash / xformers kernels, used by ppdiffusers on a GPU) keeps none, so q = 0 there.
  The coefficients come from :data:`CALIBRATION` (measured peaks, ``benchmarks/bench_memory.py``) when the
  run's (UNet, device, precision, attention, recompute) is in it, else from :func:`unet_activation_elements`,
  an analytic first estimate (flagged ``calibrated=False`` in the plan).

Precision (what is assumed, following paddlenlp's Trainer and ``paddle.amp.decorate``):

* ``fp32``: weights, gradients, moments fp32 (4 + 4 + 8 bytes per trained parameter), activations fp32.
* ``bf16-O1`` / ``fp16-O1`` (autocast): parameters stay fp32 (so gradients and moments too); white-list ops
  (conv, matmul) compute in 16 bit, and each forward casts every trained weight to 16 bit and keeps the cast
  for the backward (+2 bytes per trained parameter during the step). Activations counted at 2 bytes.
* ``bf16-O2`` / ``fp16-O2``: ``paddle.amp.decorate(level="O2")`` casts every parameter of the model (the
  frozen VAE and text encoder too; LayerNorm's are kept fp32, counted as 16 bit here: < 0.1 %) to 16 bit;
  the Trainer then builds AdamW with ``multi_precision=True``: fp32 master weights and fp32 moments in the
  optimizer, gradients in the parameters' dtype (``--amp_master_grad`` off): 2 + 2 + 4 + 8 bytes per trained
  parameter. The EMA copy clones the state dict, so it is 16 bit too. Activations counted at 2 bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Tuple

GiB = 2 ** 30
PRECISIONS = ("fp32", "bf16-O1", "bf16-O2", "fp16-O1", "fp16-O2")
PREFETCH = 2  # batches per loader worker in flight (paddle.io.DataLoader's prefetch_factor default)
SKIP_ENV = "SD_SKIP_MEMORY_CHECK"  # =1 skips the pre-flight memory check (when its estimate is wrong)

# Published SD v1 component configs (CompVis/stable-diffusion-v1-x: vae/, text_encoder/ = CLIP ViT-L/14's text tower).
SD_V1_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
             "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
             "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512}
SD_V1_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "max_position_embeddings": 77}

# Host: the training process besides its model (Python, Paddle, paddlenlp, ppdiffusers). Measured on the test kit
# (Paddle 3.3.1 CPU build, Zen 4 VM, 2026-12-05, benchmarks/bench_memory.py): peak RSS 0.605-0.612 GiB at batch 1-4,
# 32-64 px, where the model and activations are < 20 MiB. A CUDA build maps its libraries on top (not measured).
HOST_BASELINE = int(0.6 * GiB)
# Host, per loader worker: a forked process touching its copy-on-write pages (decoder, Python objects). Test kit,
# 64 px: the tree's peak PSS rose 0.354 → 0.399 GiB from 0 to 2 workers (≈ 23 MiB each); PLACEHOLDER of 64 MiB
# until measured with real images (bench_memory.py --workers 0 and --workers 4 at 256 px).
WORKER_BASELINE = 64 * 2 ** 20
# A checkpoint save writes the UNet, its EMA and AdamW's moments tensor by tensor (sd/runtime/tensor_files.py): it
# holds one tensor's host copy at a time, at most SD v1's largest (an up block's 3×3 conv, 2560 → 1280 channels:
# 29.5 M values, 118 MB in fp32).
STREAMED_SAVE = 128 * 2 ** 20
# Bytes of one undecoded record a slot's shuffle buffer holds (a base64 JPEG of a LAION image, ~60 KB). Assumed.
RECORD_BYTES = 80_000
# A GPU card: what the CUDA context, cuDNN/cuBLAS workspaces and allocator fragmentation take (assumed, not
# measurable here): 1 GiB + 5 % of the card.
CUDA_RESERVE_FIXED, CUDA_RESERVE_FRACTION = 1 * GiB, 0.05


class Fit(NamedTuple):
    """Activations of one UNet forward + backward: ``a·B·A + q·B·A² + c`` bytes, A = latent area."""
    a: float  # bytes per sample per latent pixel
    q: float  # bytes per sample per latent pixel² (attention probabilities; 0 with memory-efficient attention)
    c: float  # bytes, independent of the batch (allocator caches, workspaces)
    source: str  # the measurements it comes from


# Measured activation coefficients, keyed by (UNet parameters, device, precision, attention, recompute).
# A key absent here uses the analytic estimate (unet_activation_elements). To fill in for the default SD v1 UNet
# (859,520,964 parameters), run on a quiet machine (see benchmarks/bench_memory.py for the exact commands) and
# paste the rows it prints:
#   (859520964, "cpu", "fp32", "math", False/True)                          — CPU, measured peak RSS
#   (859520964, "gpu", "bf16-O1"/"bf16-O2"/"fp32", "flash", False/True)     — GPU, paddle max_memory_allocated
CALIBRATION: Dict[Tuple[int, str, str, str, bool], Fit] = {
    # AMD EPYC Zen 4, 2026-12-05: peak RSS of the training process, 256 px, the real-size random kit, 0 workers;
    # a and c fitted on B = 1, 2 (q stays the analytic attention term: one resolution measured)
    (859520964, "cpu", "fp32", "math", False): Fit(
        a=524956, q=234.633, c=8.13979e08, source="peaks B=1 R=256: 15.666 GiB; B=2 R=256: 16.396 GiB"),
    (859520964, "cpu", "fp32", "math", True): Fit(
        a=229948, q=96, c=7.06115e08, source="peaks B=1 R=256: 15.149 GiB; B=2 R=256: 15.462 GiB"),
}


# ------------------------------------------------------------------------------------------------------------
# Configs and parameter counts
# ------------------------------------------------------------------------------------------------------------
def read_config(path: str) -> dict:
    """A component's ``config.json``: ``path`` is the file or its folder."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such config; give a component folder holding config.json or the file")
    with open(file) as f:
        return json.load(f)


def count_module_parameters(kind: str, config: dict) -> int:
    """Parameters of the UNet (``kind="unet"``) or VAE (``"vae"``) that ``config`` builds, counted from the module
    built under ``paddle.LazyGuard`` (no weights are allocated: < 1 s and a few MB even for SD's 860 M)."""
    import numpy as np
    import paddle
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[kind]
    with paddle.LazyGuard():
        module = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    if kind == "vae":  # the training step runs the encoder only, but all of the VAE is loaded
        encoder = sum(int(np.prod(p.shape)) for p in module.encoder.parameters())
        encoder += sum(int(np.prod(p.shape)) for p in module.quant_conv.parameters())
        return sum(int(np.prod(p.shape)) for p in module.parameters()), encoder
    return sum(int(np.prod(p.shape)) for p in module.parameters())


def count_text_encoder_parameters(config: dict) -> int:
    """CLIP text transformer (paddlenlp ``CLIPTextModel``, no projection): token + position embeddings, per layer
    two LayerNorms, q/k/v/out projections with bias, a two-layer MLP with bias; a final LayerNorm."""
    d, i = config["hidden_size"], config["intermediate_size"]
    layer = 2 * 2 * d + 4 * (d * d + d) + (d * i + i) + (i * d + d)
    embeddings = (config["vocab_size"] + config["max_position_embeddings"]) * d
    return embeddings + config["num_hidden_layers"] * layer + 2 * d


@dataclass
class Architecture:
    """The three components' configs and parameter counts."""
    unet: dict
    vae: dict
    text: dict
    unet_params: int
    vae_params: int
    vae_encoder_params: int
    text_params: int

    @classmethod
    def from_configs(cls, unet: dict, vae: dict = SD_V1_VAE, text: dict = SD_V1_TEXT) -> "Architecture":
        vae_params, encoder_params = count_module_parameters("vae", vae)
        return cls(unet, vae, text, count_module_parameters("unet", unet), vae_params, encoder_params,
                   count_text_encoder_parameters(text))

    @classmethod
    def from_paths(cls, unet: str, vae: Optional[str] = None, text_encoder: Optional[str] = None) -> "Architecture":
        """Config files or folders; the VAE and text encoder default to SD v1's."""
        return cls.from_configs(read_config(unet), read_config(vae) if vae else SD_V1_VAE,
                                read_config(text_encoder) if text_encoder else SD_V1_TEXT)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


# ------------------------------------------------------------------------------------------------------------
# Activations: analytic first estimate
# ------------------------------------------------------------------------------------------------------------
# Elements the eager autograd keeps for the backward, per sample, at a level of C channels and N = h·w positions
# (what each op's gradient reads: its input for conv/linear/norm/SiLU/GELU/matmul/softmax's output; adds,
# reshapes, the constant scale and nearest upsampling keep nothing):
#   ResnetBlock2D(Cin → Cout): GroupNorm, SiLU and conv inputs on both halves: 3·Cin·N + 3·Cout·N
#   BasicTransformerBlock(C, H heads, context L): 3 LayerNorm inputs 3CN; self-attention: the normed input, q, k,
#     v, the output projection's input 5CN + probabilities H·N²; cross-attention: normed input, q, output
#     projection input 3CN + H·N·L; GEGLU feed-forward: normed input CN, value and gate 8CN, GELU(gate) 4CN,
#     product 4CN: 28·C·N + H·N² + H·N·L in all
#   Transformer2DModel: GroupNorm and proj_in inputs, proj_out input 3CN, plus its blocks
#   down/upsampling conv: its input
# With --recompute (ppdiffusers' gradient checkpointing: each resnet of a block, and each BasicTransformerBlock
# inside Transformer2DModel, through paddle's recompute) a checkpointed layer keeps only its input, and the
# backward re-runs one layer at a time: + the largest layer's full set once.
# The backward's working set (a gradient and the softmax's input gradient next to the kept tensors): + twice the
# largest single kept tensor.
def _heads(config: dict, level: int) -> int:
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    return heads[level] if isinstance(heads, (list, tuple)) else heads


def _check_block_types(config: dict) -> None:
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    unknown = (set(config["down_block_types"]) | set(config["up_block_types"])) - known
    if unknown or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"the memory model knows SD v1's UNet blocks ({', '.join(sorted(known))}), not "
                         f"{', '.join(sorted(unknown)) or config.get('mid_block_type')}")


def unet_activation_elements(config: dict, area: int, context_len: int, recompute: bool,
                             attention: str = "math") -> Tuple[float, float]:
    """(linear, quadratic) elements the UNet keeps for its backward, per sample, at latent area ``area``
    (= h·w of the (B, 4, h, w) latents): linear ∝ area, quadratic = the attention probabilities ∝ area²
    (0 when ``attention != "math"``). See the table above for the terms."""
    _check_block_types(config)
    ch, layers = list(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, int) else max(depth)
    kept = [0.0, 0.0]  # (linear, quadratic) elements kept for the backward
    largest_layer, largest_tensor = (0.0, 0.0), (0.0, 0.0)  # as (linear, quadratic) pairs

    def bigger(x, y):
        return x if sum(x) >= sum(y) else y

    def resnet(cin, cout, n):
        nonlocal largest_layer, largest_tensor
        full = 3 * (cin + cout) * n
        kept[0] += cin * n if recompute else full
        largest_layer = bigger(largest_layer, (full, 0.0))
        largest_tensor = bigger(largest_tensor, (max(cin, cout) * n, 0.0))

    def transformer(c, n, level):
        nonlocal largest_layer, largest_tensor
        heads = _heads(config, level)
        probs = heads * n * n if attention == "math" else 0.0
        block = 28 * c * n + heads * n * context_len
        kept[0] += 3 * c * n + depth * (c * n if recompute else block)
        kept[1] += 0.0 if recompute else depth * probs
        largest_layer = bigger(largest_layer, (block, probs))
        largest_tensor = bigger(bigger(largest_tensor, (0.0, probs)), (4 * c * n, 0.0))

    n0 = area
    kept[0] += config.get("in_channels", 4) * n0  # conv_in's input
    skips, c_prev = [ch[0]], ch[0]
    for level, kind in enumerate(config["down_block_types"]):
        n = n0 / 4 ** level
        for _ in range(layers):
            resnet(c_prev, ch[level], n)
            if kind.startswith("CrossAttn"):
                transformer(ch[level], n, level)
            c_prev = ch[level]
            skips.append(c_prev)
        if level < len(ch) - 1:
            kept[0] += c_prev * n  # downsampling conv's input
            skips.append(c_prev)
    n = n0 / 4 ** (len(ch) - 1)
    resnet(ch[-1], ch[-1], n)
    transformer(ch[-1], n, len(ch) - 1)
    resnet(ch[-1], ch[-1], n)
    for i, kind in enumerate(config["up_block_types"]):
        level = len(ch) - 1 - i
        n = n0 / 4 ** level
        for _ in range(layers + 1):
            resnet(c_prev + skips.pop(), ch[level], n)
            if kind.startswith("CrossAttn"):
                transformer(ch[level], n, level)
            c_prev = ch[level]
        if level > 0:
            kept[0] += c_prev * n * 4  # upsampling conv's input (after the 2× nearest upsampling)
    kept[0] += 3 * ch[0] * n0 + 2 * config.get("out_channels", 4) * n0  # GroupNorm, SiLU, conv_out inputs; loss
    if recompute:  # the layer re-run in the backward
        kept = [kept[0] + largest_layer[0], kept[1] + largest_layer[1]]
    return kept[0] + 2 * largest_tensor[0], kept[1] + 2 * largest_tensor[1]


def activation_fit(arch: Architecture, device: str, precision: str, attention: str, recompute: bool, area: int,
                   context_len: int = 77) -> Tuple[Fit, bool]:
    """The (a, q, c) of the run and whether they were measured (True) or analytic (False, exact at ``area``:
    which layer is the largest may change with the area)."""
    key = (arch.unet_params, device, precision, attention, recompute)
    if key in CALIBRATION:
        return CALIBRATION[key], True
    lin, quad = unet_activation_elements(arch.unet, area, context_len, recompute, attention)
    b = _act_bytes(precision)
    return Fit(a=b * lin / area, q=b * quad / area ** 2, c=0.0, source="analytic placeholder"), False


def encoders_forward_bytes(arch: Architecture, batch: int, resolution: int, context_len: int, precision: str,
                           attention: str) -> int:
    """Peak of the frozen encoders' forward (no gradient: a tensor lives until its consumer ran). VAE encoder:
    at full resolution P = R² the block input kept for the residual, the GroupNorm/SiLU/conv temporaries and
    the CPU's expanded conv bias, ≈ 4·C0·P, next to the pixels 3·P; in the mid block's single-head attention at
    the latent area A, scores and probabilities 2·A² (math attention). Text encoder: ≈ L·(4D + I) + H·L²."""
    b = _act_bytes(precision)
    pixels = resolution * resolution
    area = (resolution // arch.latent_factor) ** 2
    ch = arch.vae["block_out_channels"]
    attn = 2 * area * area if attention == "math" else 0
    vae = 3 * pixels + max(4 * ch[0] * pixels, attn + 4 * ch[-1] * area)
    t = arch.text
    text = context_len * (4 * t["hidden_size"] + t["intermediate_size"]) + t["num_attention_heads"] * context_len ** 2
    return int(batch * b * max(vae, text))


# ------------------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------------------
@dataclass
class MemoryConfig:
    """What the estimate depends on besides the architecture (the flags of the training command)."""
    batch: int = 1  # --per_device_train_batch_size
    resolution: int = 512  # --resolution
    precision: str = "fp32"  # fp32 | bf16-O1 | bf16-O2 | fp16-O1 | fp16-O2 (--bf16/--fp16, --fp16_opt_level)
    recompute: bool = False  # --recompute
    ema: bool = False  # --use_ema
    device: str = "cpu"  # cpu (everything on the host) | gpu
    attention: Optional[str] = None  # math (eager softmax) | flash (memory-efficient); default: math on cpu
    num_workers: int = 0  # --dataloader_num_workers
    loaders: int = 1  # --gradient_accumulation_steps (one loader per micro-batch)
    processes: int = 1  # ranks of this job on this machine (their host memory adds up)
    context_len: int = 77  # --model_max_length
    shuffle_buffer: int = 64  # --shuffle_buffer
    precomputed_latents: bool = False  # no VAE / text encoder forward in the step (they are loaded all the same)
    train_text_encoder: bool = False
    save_copy: Optional[int] = None  # bytes a checkpoint save holds beside the model; None: STREAMED_SAVE

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, got {self.device!r}")
        if self.attention is None:
            self.attention = "flash" if self.device == "gpu" else "math"
        if self.batch < 1 or self.resolution < 8:
            raise ValueError(f"batch must be ≥ 1 and resolution ≥ 8, got {self.batch}, {self.resolution}")


@dataclass
class MemoryPlan:
    """Bytes by named term. ``device`` holds the step's terms on the device (on a CPU run, the host's model
    and step); ``save`` what a checkpoint save adds on the device; ``host`` the host's own terms (on a CPU run,
    the process baseline, loader and save copies on top of ``device``)."""
    config: MemoryConfig
    device_terms: Dict[str, int] = field(default_factory=dict)
    device_save_terms: Dict[str, int] = field(default_factory=dict)
    host_terms: Dict[str, int] = field(default_factory=dict)
    host_save_terms: Dict[str, int] = field(default_factory=dict)
    disk: int = 0  # one checkpoint on disk
    calibrated: bool = False  # activations from measured coefficients (else the analytic estimate)

    @property
    def device_step(self) -> int:
        """Device peak during a step: the static terms + the larger of the UNet's and the encoders' activations
        (the encoders run first, their memory is reused for the UNet's)."""
        d = dict(self.device_terms)
        transient = max(d.pop("activations", 0), d.pop("encoders forward", 0))
        return sum(d.values()) + transient

    @property
    def device_save(self) -> int:
        terms = self.device_terms
        static = self.device_step - max(terms.get("activations", 0), terms.get("encoders forward", 0))
        return static + sum(self.device_save_terms.values())

    @property
    def device_peak(self) -> int:
        return max(self.device_step, self.device_save)

    @property
    def host_step(self) -> int:
        return sum(self.host_terms.values()) + (self.device_step if self.config.device == "cpu" else 0)

    @property
    def host_save(self) -> int:
        return sum(self.host_terms.values()) + sum(self.host_save_terms.values()) + (
            self.device_save if self.config.device == "cpu" else 0)

    @property
    def host_peak(self) -> int:
        return max(self.host_step, self.host_save)

    def table(self) -> str:
        """The terms, one per line (GiB)."""
        rows = [(f"device: {k}", v) for k, v in self.device_terms.items()]
        rows += [(f"save (device): {k}", v) for k, v in self.device_save_terms.items()]
        rows += [(f"host: {k}", v) for k, v in self.host_terms.items()]
        rows += [(f"save (host): {k}", v) for k, v in self.host_save_terms.items()]
        rows += [("device peak of a step", self.device_step), ("device peak of a save", self.device_save),
                 ("host peak of a step", self.host_step), ("host peak of a save", self.host_save),
                 ("checkpoint on disk", self.disk)]
        return "\n".join(f"{name:<40} {value / GiB:9.3f} GiB" for name, value in rows)


def checkpoint_bytes(trained_params: int, ema: bool, precision: str = "fp32") -> int:
    """One checkpoint on disk: the trained weights (in their dtype), the EMA copy, the optimizer's two moments
    (+ its fp32 master weights under O2)."""
    w = 2 if _o2(precision) else 4
    return trained_params * (w * (1 + ema) + 8 + (4 if _o2(precision) else 0))


def estimate(arch: Architecture, config: MemoryConfig) -> MemoryPlan:
    """The memory plan of one training step and one checkpoint save of ``config`` on ``arch``."""
    c = config
    o2, low = _o2(c.precision), _low(c.precision)
    trained = arch.unet_params + (arch.text_params if c.train_text_encoder else 0)
    w = 2 if o2 else 4  # bytes of a parameter (and of its gradient: --amp_master_grad off)
    plan = MemoryPlan(config=c, disk=checkpoint_bytes(trained, c.ema, c.precision))
    d = plan.device_terms
    d["trained weights"] = w * trained
    d["gradients"] = w * trained
    d["AdamW moments"] = 8 * trained
    if o2:
        d["fp32 master weights"] = 4 * trained
    if c.ema:
        d["EMA copy"] = w * arch.unet_params
    if low and not o2:
        d["16-bit weight casts (O1)"] = 2 * trained
    frozen = arch.vae_params + (0 if c.train_text_encoder else arch.text_params)
    d["frozen VAE + text encoder"] = (2 if o2 else 4) * frozen
    area = (c.resolution // arch.latent_factor) ** 2
    fit, plan.calibrated = activation_fit(arch, c.device, c.precision, c.attention, c.recompute, area, c.context_len)
    d["activations"] = int(c.batch * (fit.a * area + fit.q * area * area) + fit.c)
    if not c.precomputed_latents:
        d["encoders forward"] = encoders_forward_bytes(arch, c.batch, c.resolution, c.context_len, c.precision,
                                                       c.attention)
    # Host: the process, the loader, and what the save copies (one tensor at a time: sd/runtime/tensor_files.py).
    h = plan.host_terms
    h["process baseline"] = HOST_BASELINE
    loaders = c.loaders
    if c.num_workers:
        workers = min(c.num_workers, c.batch) * loaders
        h["loader workers"] = workers * WORKER_BASELINE
        h["batches in flight (shm)"] = PREFETCH * c.batch * 3 * c.resolution ** 2 * 4 * loaders
    if not c.precomputed_latents:
        h["shuffle buffers"] = c.batch * loaders * c.shuffle_buffer * RECORD_BYTES
    copies = STREAMED_SAVE if c.save_copy is None else c.save_copy
    plan.host_save_terms["save copies"] = copies
    if c.processes > 1:  # every rank of this machine holds its own
        for k in list(h):
            h[k] *= c.processes
        plan.host_save_terms["save copies"] = copies  # rank 0 alone saves
    return plan


def card_budget(total: int) -> int:
    """What a training step may use of a card of ``total`` bytes (see CUDA_RESERVE_FIXED/_FRACTION)."""
    return int(total - CUDA_RESERVE_FIXED - CUDA_RESERVE_FRACTION * total)


def largest_batch(arch: Architecture, config: MemoryConfig, budget: int, where: str = "device",
                  limit: int = 4096) -> int:
    """The largest per-device batch whose peak (step and save) on ``where`` (device | host) fits ``budget``
    bytes; 0 when not even batch 1 does. The peaks grow with the batch, so a binary search finds it."""
    from dataclasses import replace

    def fits(b):
        plan = estimate(arch, replace(config, batch=b))
        return (plan.device_peak if where == "device" else plan.host_peak) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _low(precision: str) -> bool:
    return precision != "fp32"


def _o2(precision: str) -> bool:
    return precision.endswith("O2")


# ------------------------------------------------------------------------------------------------------------
# From the training command
# ------------------------------------------------------------------------------------------------------------
def precision_of(training_args) -> str:
    """fp32 | bf16-O1 | ... from paddlenlp's --bf16 / --fp16 and --fp16_opt_level."""
    if getattr(training_args, "bf16", False) or getattr(training_args, "fp16", False):
        kind = "bf16" if training_args.bf16 else "fp16"
        return f"{kind}-{getattr(training_args, 'fp16_opt_level', 'O1')}"
    return "fp32"


def config_from_args(model_args, data_args, training_args, device: str, processes: int = 1) -> MemoryConfig:
    """The MemoryConfig of a training command's (resolved) arguments."""
    attention = "flash" if device == "gpu" or model_args.enable_xformers_memory_efficient_attention else "math"
    return MemoryConfig(batch=training_args.per_device_train_batch_size, resolution=data_args.resolution,
                        precision=precision_of(training_args), recompute=bool(training_args.recompute),
                        ema=bool(model_args.use_ema), device=device, attention=attention,
                        num_workers=training_args.dataloader_num_workers,
                        loaders=training_args.gradient_accumulation_steps, processes=processes,
                        context_len=model_args.model_max_length, shuffle_buffer=data_args.shuffle_buffer,
                        precomputed_latents=data_args.precomputed_latents,
                        train_text_encoder=model_args.train_text_encoder)


def architecture_of(model_args) -> Architecture:
    """The run's components' configs (local files only; FileNotFoundError for a hub name)."""
    paths = model_args.component_paths()
    for name in ("unet", "vae", "text_encoder"):
        if not paths[name]:
            raise FileNotFoundError(f"no {name} given")
    return Architecture.from_paths(paths["unet"], paths["vae"], paths["text_encoder"])
