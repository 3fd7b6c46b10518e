"""Training throughput through the real trainer path: samples/s, where each step's time goes, FLOPs.

    python -m sd.tools.benchmark --kit reference --resolution 64 --batch_size 4 --num_workers 1
                                                                              # the PaddleMIX example's config
    python -m sd.tools.benchmark --kit ./tiny-sd --resolution 64 --batch_size 16 --num_workers 2
    python -m sd.tools.benchmark --kit ./tiny-sd --table                       # batch 4/16 × workers 0/1/2
    python -m sd.tools.benchmark --kit reference --latents ./latents/filelist/train.filelist.list   # precomputed mode
    python -m sd.tools.benchmark --flops_only --unet_config ./unet_config.json --resolution 256      # SD v1 arithmetic
    python -m sd.tools.benchmark --versus ../shared/reference/paddlemix_stable_diffusion         # side by side, A B A B
    python -m sd.tools.benchmark --kit ./sd-v1-random --unet_config unet_config.json --image_size 256 --resolution 256 \
        --batch_size 1 --num_workers 0 --steps 5 --warmup 1 --save_steps 4 --use_ema true --recompute true  # SD v1

Method: the model, datasets and ``StableDiffusionTrainer`` are built by ``sd.build.build_run``, which
``train_txt2img_laion400m_trainer.py`` builds its run with, and the trainer runs ``warmup + steps``
optimizer steps. A callback stamps each step's phases (data wait, forward+backward, optimizer);
the frozen encoders and the UNet, the update's finite check, AdamW and EMA, and each checkpoint save are timed
around their calls (``StableDiffusionModel.instrument``, ``StableDiffusionTrainer.instrument``). The first
``warmup`` steps are dropped and each figure is the **median** over the remaining steps (robust to the other processes
sharing this machine); samples/s = batch × world size / median step interval. Figures of two separate
runs are not comparable on a shared machine: ``--versus`` (``sd/tools/benchmark_versus.py``) measures this
trainer against PaddleMIX's example interleaved in one run. On a GPU every stamp
is preceded by a device synchronisation, and achieved TFLOP/s and MFU are printed (MFU against
``--peak_tflops``, or a known peak for the detected card).

``--kit reference`` builds (once, in ``--cache_dir``) the components of the PaddleMIX example's
benchmark config with random weights in the real formats: UNet (32, 64), layers_per_block 1,
attention_head_dim 8, cross_attention_dim 32; VAE (32, 32, 64, 64), layers_per_block 1, 4 latent
channels; CLIP text encoder width 32, intermediate 37, 2 layers, 4 heads, 77 tokens; demo images
of 64×64 px packed into part files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from sd.cpu import cpuinfo_fields, widest_vector_isa

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "sd-benchmark")
# Dense peak TFLOP/s (bf16/fp16 tensor cores) of cards the MFU is usually quoted against.
KNOWN_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H800": 989.0, "A800": 312.0, "V100": 125.0, "A10": 125.0,
                     "3090": 71.0, "4090": 165.0, "L40": 181.0}

# The PaddleMIX example's benchmark config, with random weights.
REFERENCE_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                      down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=8,
                      cross_attention_dim=32, norm_num_groups=32)
REFERENCE_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                     latent_channels=4, norm_num_groups=32, sample_size=64)
REFERENCE_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77)


# ---------------------------------------------------------------------------------------------
# Inputs: the reference kit and demo data
# ---------------------------------------------------------------------------------------------
def build_reference_kit(output_dir: str, seed: int = 0) -> str:
    """Write the reference config's components (random weights) in ``from_pretrained`` layout; returns the folder."""
    import paddle
    from paddlenlp.transformers import CLIPTokenizer
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    from sd.components.pipeline import build_pipeline
    from sd.components.schedulers import make_scheduler
    from sd.data import demo_data
    from sd.kit.tokenizer import learn_bpe, save_tokenizer

    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        return output_dir
    paddle.seed(seed)
    work = output_dir + ".partial"
    tok_dir = os.path.join(work, "tokenizer")
    save_tokenizer(tok_dir, learn_bpe(p[3] for p in demo_data.all_prompts()), model_max_length=77)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok.get_vocab()), projection_dim=32,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, **REFERENCE_TEXT))
    vae = AutoencoderKL(**REFERENCE_VAE)
    unet = UNet2DConditionModel(**REFERENCE_UNET)
    build_pipeline(vae, text, tok, unet, make_scheduler("pndm")).save_pretrained(work)
    os.replace(work, output_dir)
    return output_dir


def build_kit_architecture(output_dir: str, seed: int = 0) -> str:
    """The default kit's architecture (``python -m sd.kit``) with 1 training step per part: the same
    speed as ./tiny-sd (weights do not change the arithmetic), built in seconds."""
    from dataclasses import replace

    from sd.kit.build import KitConfig, build_kit

    if not os.path.isfile(os.path.join(output_dir, "model_index.json")):
        build_kit(output_dir, replace(KitConfig(), clip_steps=1, vae_steps=1, eval_images=36), seed=seed,
                  log=lambda *a: None)
    return output_dir


def build_demo_data(folder: str, num_images: int = 512, size: int = 64, per_part: int = 128) -> str:
    """Demo shapes images packed by create_pretraining_data.py (once); returns the ``.filelist.list``."""
    from sd.data.demo_data import write_demo_jsonl

    file_list = os.path.join(folder, "data", "filelist", "bench.filelist.list")
    if os.path.isfile(file_list):
        return file_list
    jsonl = write_demo_jsonl(os.path.join(folder, "raw"), num_images=num_images, size=size, seed=0)
    subprocess.run([sys.executable, os.path.join(ROOT, "create_pretraining_data.py"), "--input_path", jsonl,
                    "--output_path", os.path.join(folder, "data"), "--output_name", "bench",
                    "--per_part_file_num", str(per_part), "--num_workers", "1", "--overwrite"],
                   check=True, capture_output=True)
    return file_list


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def count_forward_flops(layer, *inputs, **kwargs) -> int:
    """FLOPs of one forward of ``layer`` (2 × multiply-adds) by hooks on convolutions, linear layers
    and attention (QKᵀ and attention × V, which run as functional matmuls); norms, activations and
    softmax (O(elements), a few % at most) are left out, as in the usual 6·N·D-style model FLOPs."""
    import paddle
    from paddle import nn
    from ppdiffusers.models.attention_processor import Attention

    total = [0]

    def conv_hook(m, inp, out):
        k = int(np.prod(m.weight.shape[1:]))  # (in/groups)·kh·kw
        total[0] += 2 * int(np.prod(out.shape)) * k

    def linear_hook(m, inp, out):
        total[0] += 2 * int(np.prod(out.shape)) * int(m.weight.shape[0])

    def attn_hook(m, args, kwargs_, out=None):
        q = args[0]
        ctx = kwargs_.get("encoder_hidden_states") if kwargs_ else None
        if ctx is None and len(args) > 1:
            ctx = args[1]
        n = int(np.prod(q.shape[1:-1])) if len(q.shape) == 3 else int(np.prod(q.shape[2:]))
        m_len = n if ctx is None else int(ctx.shape[1])
        inner = m.inner_dim if hasattr(m, "inner_dim") else m.heads * m.to_q.weight.shape[1] // m.heads
        total[0] += 2 * 2 * int(q.shape[0]) * n * m_len * int(inner)  # QKᵀ and (softmax)·V

    handles = []
    for sub in layer.sublayers(include_self=True):
        if isinstance(sub, nn.Conv2D):
            handles.append(sub.register_forward_post_hook(conv_hook))
        elif isinstance(sub, nn.Linear):
            handles.append(sub.register_forward_post_hook(linear_hook))
    attn = [s for s in layer.sublayers(include_self=True) if isinstance(s, Attention)]
    originals = {}
    for a in attn:  # the forward hooks do not see keyword arguments: wrap forward on the instance
        originals[id(a)] = a.forward

        def wrapped(*args, _a=a, **kw):
            attn_hook(_a, args, kw)
            return originals[id(_a)](*args, **kw)

        a.forward = wrapped
    try:
        with paddle.no_grad():
            layer(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for a in attn:
            del a.forward
    return total[0]


def unet_train_flops(unet_config: dict, resolution: int, latent_factor: int, text_len: int = 77,
                     batch: int = 1) -> Dict[str, float]:
    """UNet FLOPs per training image: forward counted on the real layer (batch 1), training = 3 × forward
    (backward ≈ 2 × forward: gradients w.r.t. activations and weights). Builds the UNet under
    ``paddle.LazyGuard`` is not possible (a forward needs weights), so this allocates the model."""
    import paddle
    from ppdiffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(unet_config)
    h = resolution // latent_factor
    x = paddle.zeros([batch, unet.config.in_channels, h, h])
    ctx = paddle.zeros([batch, text_len, unet.config.cross_attention_dim])
    fwd = count_forward_flops(unet, x, paddle.to_tensor([10] * batch), encoder_hidden_states=ctx) / batch
    params = sum(int(np.prod(p.shape)) for p in unet.parameters())
    return {"unet_forward_flops": fwd, "unet_train_flops": 3 * fwd, "unet_parameters": params}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _sync():
    import paddle

    if paddle.is_compiled_with_cuda() and "gpu" in paddle.device.get_device():
        paddle.device.synchronize()


class _Clock:
    """Accumulates seconds per name for the current step (reset at each step start), and keeps every call's."""

    def __init__(self):
        self.now: Dict[str, float] = {}
        self.calls: Dict[str, List[float]] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync()
            seconds = time.perf_counter() - start
            self.now[name] = self.now.get(name, 0.0) + seconds
            self.calls.setdefault(name, []).append(seconds)
            return out

        return timed


def _make_step_timer(trainer, clock: _Clock):
    from paddlenlp.trainer import TrainerCallback

    class StepTimer(TrainerCallback):
        """Stamps each optimizer step: data wait (the trainer's timed loader), forward+backward, optimizer."""

        def __init__(self):
            self.steps: List[Dict[str, float]] = []
            self._reader_seconds = 0.0
            self._last_end: Optional[float] = None
            self._last_cpu = 0.0
            self._cur: Dict[str, float] = {}

        def on_load_data_end(self, args, state, control, **kw):
            reader = trainer.streams  # the micro-batch streams time their own waits
            self._cur = {"data": reader.seconds - self._reader_seconds}
            self._reader_seconds = reader.seconds
            clock.now = {}

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self._cur["t_begin"] = time.perf_counter()

        def on_optimizer_begin(self, args, state, control, **kw):
            _sync()
            self._cur["t_opt"] = time.perf_counter()

        def on_optimizer_end(self, args, state, control, **kw):
            _sync()
            self._cur["t_opt_end"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            now = time.perf_counter()
            c = self._cur
            step = {"data": c["data"], "forward_backward": c["t_opt"] - c["t_begin"],
                    "optimizer": c["t_opt_end"] - c["t_opt"], **clock.now}
            cpu = time.process_time()  # this process's CPU seconds (all its threads; loader workers not included)
            if self._last_end is not None:
                step["interval"], step["cpu"] = now - self._last_end, cpu - self._last_cpu
            self._last_end, self._last_cpu = now, cpu
            self.steps.append(step)

    return StepTimer()


def _children() -> Dict[str, float]:
    """Live child processes of this one → their peak RSS (VmHWM) in MB."""
    me, out = str(os.getpid()), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] != me:
                    continue
            with open(f"/proc/{pid}/status") as f:
                out[pid] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
        except (OSError, StopIteration, IndexError):
            continue  # the process ended meanwhile
    return out


def peak_memory_mb(exclude=()) -> Dict[str, float]:
    """Peak RSS of this process and (summed) of its live children not in ``exclude`` (the loader
    workers of this run), in MB; on a GPU also the peak allocated device memory."""
    import paddle

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "workers_peak_rss_mb": sum(v for k, v in _children().items() if k not in exclude)}
    if paddle.is_compiled_with_cuda() and "gpu" in paddle.device.get_device():
        out["gpu_peak_allocated_mb"] = paddle.device.cuda.max_memory_allocated() / 2**20
    return out


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
def run(kit: str, file_list: str, resolution: int = 64, batch_size: int = 4, num_workers: int = 1,
        steps: int = 30, warmup: int = 5, latents: bool = False, model_max_length: int = 77, seed: int = 0,
        logging_steps: int = 10, extra_args: Optional[dict] = None, peak_tflops: Optional[float] = None,
        flops: bool = True, save_steps: int = 0) -> dict:
    """Train ``warmup + steps`` steps through ``StableDiffusionTrainer``; returns the figures (see module doc).

    Args:
        kit: a pretrained folder (vae/, text_encoder/, tokenizer/, unet/, scheduler/); its unet/config.json
            is initialised randomly as in pretraining.
        file_list: the ``*.filelist.list`` (images, or latent records with ``latents=True``).
        extra_args: more ``ModelArguments``/``DataArguments``/``SDTrainingArguments`` fields by name.
        save_steps: write a checkpoint every this many steps (0: none) and time it.
    """
    import paddle

    from sd.build import build_run
    from sd.log import logger
    from sd.sd_args import DataArguments, ModelArguments, SDTrainingArguments, finalize

    if warmup < 1 or steps < 1:
        raise ValueError(f"need warmup ≥ 1 (the first step has no interval before it) and steps ≥ 1, "
                         f"got {warmup}, {steps}")
    extra = dict(extra_args or {})
    extra.setdefault("max_grad_norm", -1.0)  # PaddleMIX's command: no gradient clipping
    pick = lambda cls: {k: extra.pop(k) for k in list(extra) if k in cls.__dataclass_fields__}  # noqa: E731
    out_dir = tempfile.mkdtemp(prefix="sd-bench-run-")
    model_args = ModelArguments(pretrained_model_name_or_path=kit,
                                unet_name_or_path=os.path.join(kit, "unet", "config.json"),
                                model_max_length=model_max_length, image_logging_steps=0, **pick(ModelArguments))
    data_args = DataArguments(file_list=file_list, resolution=resolution,
                              **({"precomputed_latents": True} if latents else {}), **pick(DataArguments))
    training_args = SDTrainingArguments(output_dir=out_dir, do_train=True, max_steps=warmup + steps,
                                        per_device_train_batch_size=batch_size, dataloader_num_workers=num_workers,
                                        logging_steps=logging_steps, report_to=["none"],
                                        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                                        disable_tqdm=True, seed=seed, learning_rate=1e-4, **pick(SDTrainingArguments))
    if extra:
        raise ValueError(f"unknown arguments {sorted(extra)}")
    finalize(model_args, data_args, training_args, lambda msg, changed=True: logger.info(msg),
             argv=[f"--{k}" for k in (extra_args or {})])  # switches given here count as command-line flags
    built = build_run(model_args, data_args, training_args)  # what the training script trains
    model, trainer = built.model, built.trainer
    clock = _Clock()
    model.instrument(clock.wrap)
    trainer.instrument(clock.wrap)
    trainer.compute_loss = clock.wrap("compute_loss", trainer.compute_loss)
    timer = _make_step_timer(trainer, clock)
    trainer.add_callback(timer)
    before = set(_children())
    start = time.perf_counter()
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # its checkpoints (--save_steps): 13 GB each at SD v1's size
    wall = time.perf_counter() - start
    memory = peak_memory_mb(exclude=before)

    measured = timer.steps[warmup:]
    if not measured:
        raise ValueError(f"no step after the {warmup} warm-up steps; raise --steps")
    med = lambda k: statistics.median(s.get(k, 0.0) for s in measured)  # noqa: E731
    for s in measured:
        s["backward"] = s["forward_backward"] - s.get("compute_loss", 0.0)
        s["unet_fwd_bwd"] = s.get("unet_forward", 0.0) + s["backward"]
    world = training_args.world_size
    interval = med("interval")
    result = {"kit": kit, "resolution": resolution, "batch_size": batch_size, "num_workers": num_workers,
              "world_size": world, "latents": latents, "steps": len(measured), "warmup": warmup,
              "samples_per_s": batch_size * world / interval,
              "samples_per_s_mean": batch_size * world * len(measured) / sum(s["interval"] for s in measured),
              "step_s": interval, "cpu_s": med("cpu"), "samples_per_cpu_s": batch_size / med("cpu"),
              "data_s": med("data"), "forward_backward_s": med("forward_backward"),
              "optimizer_s": med("optimizer"), "vae_encode_s": med("vae_encode"), "text_encode_s": med("text_encode"),
              "latent_sample_s": med("latent_sample"), "unet_forward_s": med("unet_forward"),
              "backward_s": med("backward"),
              "unet_fwd_bwd_s": med("unet_fwd_bwd"), "finite_check_s": med("finite_check"), "adamw_s": med("adamw"),
              "ema_update_s": med("ema_update"), "saves": len(clock.calls.get("save", [])),
              "save_s": statistics.median(clock.calls.get("save", [0.0])), "wall_s": wall, **memory}
    for k in ("data", "forward_backward", "optimizer", "vae_encode", "text_encode", "unet_fwd_bwd"):
        result[f"{k}_share"] = result[f"{k}_s"] / interval
    if flops:
        result.update(model_flops(model, resolution, batch_size, model_max_length, latents))
        on_gpu = paddle.is_compiled_with_cuda() and "gpu" in paddle.device.get_device()
        # CPU: per main-process CPU second (robust to other jobs on the machine) against one core's peak
        result["gflops_per_cpu_s"] = result["model_flops_per_step"] / result["cpu_s"] / 1e9
        peak = cpu_peak_gflops()
        if peak and not on_gpu:
            result["cpu_core_peak_gflops"] = peak["gflops"]
            result["cpu_peak_source"] = (f"{peak['isa']} {peak['lanes']} lanes × 2 FMA units × 2 FLOP × "
                                         f"{peak['ghz']:.2f} GHz")
        if on_gpu:
            achieved = result["model_flops_per_step"] / interval / 1e12
            peak = peak_tflops or _known_peak()
            result["achieved_tflops"] = achieved
            result["mfu"] = achieved / peak if peak else None
    return result


def model_flops(model, resolution: int, batch_size: int, text_len: int, latents: bool) -> Dict[str, float]:
    """Per-step model FLOPs: 3 × UNet forward (+ VAE encoder and text encoder forwards unless precomputed)."""
    import paddle

    h = resolution // model.latent_factor
    unet = count_forward_flops(model.unet, paddle.zeros([1, model.unet.config.in_channels, h, h]),
                               paddle.to_tensor([10]),
                               encoder_hidden_states=paddle.zeros([1, text_len, model.unet.config.cross_attention_dim]))
    vae = count_forward_flops(model.vae.encoder, paddle.zeros([1, 3, resolution, resolution]))
    vae += count_forward_flops(model.vae.quant_conv, paddle.zeros([1, 2 * model.vae.config.latent_channels, h, h]))
    text = count_forward_flops(model.text_encoder, paddle.zeros([1, text_len], dtype="int64"))
    per_image = 3 * unet + (0 if latents else vae + text)
    return {"unet_forward_flops_per_image": unet, "vae_encode_flops_per_image": vae,
            "text_encode_flops_per_image": text, "model_flops_per_step": per_image * batch_size}


def cpu_peak_gflops(cpuinfo: str = "/proc/cpuinfo") -> Optional[dict]:
    """One core's FP32 peak from ``/proc/cpuinfo``: SIMD lanes per FMA unit (AVX-512: 16, AVX2: 8 floats) × 2 FLOP
    per fused multiply-add × 2 FMA units per core (Intel since Haswell, AMD since Zen 2; 1 unit on some
    AVX-512 parts, so this is an upper bound) × the clock ``cpu MHz`` reports (no turbo headroom). AMD's Zen 4
    (family 25) runs AVX-512 on its two 256-bit units: 8 lanes each, as with AVX2."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None
    fields = cpuinfo_fields(text)
    flags = fields.get("flags", [""])[0].split()
    mhz = [float(v) for v in fields.get("cpu MHz", [])]
    if not mhz or "fma" not in flags:
        return None
    isa, lanes = {"avx512": ("AVX-512", 16), "avx2": ("AVX2", 8), "sse": ("SSE", 4)}[widest_vector_isa(flags)]
    family = fields.get("cpu family", ["0"])[0]
    if (isa == "AVX-512" and fields.get("vendor_id", [""])[0] == "AuthenticAMD" and family.isdigit()
            and int(family) < 26):
        lanes, isa = 8, "AVX-512 on 256-bit units (Zen 4)"
    ghz = max(mhz) / 1000
    return {"gflops": lanes * 2 * 2 * ghz, "lanes": lanes, "ghz": ghz, "isa": isa}


def _known_peak() -> Optional[float]:
    import paddle

    name = paddle.device.cuda.get_device_name()
    for key, peak in KNOWN_PEAK_TFLOPS.items():
        if key in name:
            return peak
    print(f"MFU: unknown peak for {name}; pass --peak_tflops")
    return None


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def format_row(r: dict) -> str:
    ms = lambda k: f"{1000 * r[k]:.1f}"  # noqa: E731
    pct = lambda k: f"{100 * r[k]:.0f} %"  # noqa: E731
    mem = f"{r['peak_rss_mb']:.0f}" + (f" + {r['workers_peak_rss_mb']:.0f}" if r["workers_peak_rss_mb"] else "")
    flops = f"{r['model_flops_per_step'] / 1e9:.2f}" if "model_flops_per_step" in r else "–"
    return (f"| {r['batch_size']} | {r['num_workers']} | {'latents' if r['latents'] else 'images'} | "
            f"**{r['samples_per_s']:.1f}** | {r['samples_per_cpu_s']:.1f} | {ms('step_s')} | {ms('cpu_s')} | "
            f"{ms('data_s')} | {ms('forward_backward_s')} | "
            f"{ms('optimizer_s')} | {pct('vae_encode_share')} | {pct('text_encode_share')} | "
            f"{pct('unet_fwd_bwd_share')} | "
            f"{mem} | {flops} |")


TABLE_HEADER = ("| batch | workers | inputs | samples/s | samples per CPU-s | step ms | CPU ms | data wait ms | "
                "fwd+bwd ms | optimizer ms | "
                "VAE enc | text enc | UNet fwd+bwd | peak RSS MB (main + workers) | model GFLOP/step |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def describe(r: dict) -> str:
    lines = [f"samples/s {r['samples_per_s']:.2f}, {r['samples_per_cpu_s']:.1f} per main-process CPU second "
             f"(median step {1000 * r['step_s']:.1f} ms over {r['steps']} steps after "
             f"{r['warmup']} warm-up; mean {r['samples_per_s_mean']:.2f}/s), "
             f"batch {r['batch_size']} × {r['world_size']} "
             f"rank(s), {r['num_workers']} loader worker(s), {'precomputed latents' if r['latents'] else 'images'}",
             f"step: main-process CPU {1000 * r['cpu_s']:.1f} ms | data wait {1000 * r['data_s']:.1f} ms | "
             f"forward+backward {1000 * r['forward_backward_s']:.1f} ms | "
             f"optimizer {1000 * r['optimizer_s']:.1f} ms (finite check {1000 * r['finite_check_s']:.1f} ms, "
             f"AdamW {1000 * r['adamw_s']:.1f} ms, EMA {1000 * r['ema_update_s']:.1f} ms)"
             + (f" | save {r['save_s']:.1f} s (median of {r['saves']})" if r["saves"] else ""),
             f"components: VAE encode {100 * r['vae_encode_share']:.1f} % | "
             f"text encode {100 * r['text_encode_share']:.1f} % | "
             f"UNet forward+backward {100 * r['unet_fwd_bwd_share']:.1f} % "
             f"(forward {1000 * r['unet_forward_s']:.1f} ms, "
             f"backward {1000 * r['backward_s']:.1f} ms)",
             f"peak memory: RSS {r['peak_rss_mb']:.0f} MB (main) + {r['workers_peak_rss_mb']:.0f} MB (loader workers)"
             + (f", GPU {r['gpu_peak_allocated_mb']:.0f} MB" if "gpu_peak_allocated_mb" in r else "")]
    if "model_flops_per_step" in r:
        line = (f"model FLOPs/step {r['model_flops_per_step'] / 1e9:.3f} GFLOP "
                f"(UNet fwd {r['unet_forward_flops_per_image'] / 1e9:.3f}"
                f" ×3, VAE enc {r['vae_encode_flops_per_image'] / 1e9:.3f}, "
                f"text {r['text_encode_flops_per_image'] / 1e9:.4f} "
                f"GFLOP per image)")
        if "achieved_tflops" in r:
            line += (f"; achieved {r['achieved_tflops']:.1f} TFLOP/s, MFU "
                     + (f"{100 * r['mfu']:.1f} %" if r["mfu"] else "n/a"))
        else:
            line += f"; {r['gflops_per_cpu_s']:.1f} GFLOP per main-process CPU second"
            if "cpu_core_peak_gflops" in r:
                line += (f" = {100 * r['gflops_per_cpu_s'] / r['cpu_core_peak_gflops']:.0f} % of one core's FP32 peak "
                         f"{r['cpu_core_peak_gflops']:.0f} GFLOP/s ({r['cpu_peak_source']})")
        lines.append(line)
    return "\n".join(lines)


def resolve_inputs(a) -> tuple:
    """(kit folder, image file list) from the CLI: builds the reference kit and/or demo data when asked."""
    if a.kit == "reference":
        kit = build_reference_kit(os.path.join(a.cache_dir, "reference-kit"))
    elif a.kit == "tiny":
        kit = build_kit_architecture(os.path.join(a.cache_dir, "tiny-kit-architecture"))
    else:
        kit = a.kit
    file_list = a.file_list or build_demo_data(os.path.join(a.cache_dir, f"demo{a.image_size}"), size=a.image_size)
    return kit, file_list


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", default="reference",
                   help="'reference' (the PaddleMIX example's benchmark config, random weights), 'tiny' (the default "
                        "kit's architecture, barely trained: its speed) or a kit folder")
    p.add_argument("--file_list", default=None, help="*.filelist.list of images (default: 512 demo images, built once)")
    p.add_argument("--latents", default=None,
                   help="*.filelist.list of precomputed latents (sd.tools.precompute_latents): "
                        "benchmark the precomputed mode")
    p.add_argument("--image_size", type=int, default=64, help="side of the demo images built when no --file_list")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="measured steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--model_max_length", type=int, default=77)
    p.add_argument("--logging_steps", type=int, default=10, help="PaddleMIX's value")
    p.add_argument("--save_steps", type=int, default=0, help="write (and time) a checkpoint every N steps (0: none)")
    p.add_argument("--table", action="store_true", help="batch 4 and 16 × loader workers 0, 1, 2, as a markdown table")
    p.add_argument("--peak_tflops", type=float, default=None, help="device peak for the MFU (GPU)")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE, help="where the reference kit and demo data are built once")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--flops_only", action="store_true", help="print the UNet FLOPs of --unet_config at --resolution")
    p.add_argument("--unet_config", default=os.path.join(ROOT, "unet_config.json"))
    p.add_argument("--latent_factor", type=int, default=8)
    p.add_argument("--versus", default=None, metavar="PATH",
                   help="PaddleMIX's examples/stable_diffusion folder: run its trainer and ours interleaved (A B A B) "
                        "on the same config, components and data, and print the ratio (sd/tools/benchmark_versus.py)")
    p.add_argument("--rounds", type=int, default=3, help="--versus: A B rounds")
    p.add_argument("--versus_steps", type=int, default=60, help="--versus: training steps per run")
    p.add_argument("--versus_warmup_logs", type=int, default=1, help="--versus: logging intervals dropped per run")
    p.add_argument("--ours_args", action="append", default=None,
                   help="--versus: extra flags for our trainer, one string; repeat for several variants, each run in "
                        "every round (\"\" = the default command; default: only the default command)")
    p.add_argument("--example_args", default="", help="--versus: extra flags for the example only, one string")
    p.add_argument("--example_env", action="append", default=[], metavar="NAME=VALUE ...",
                   help="--versus: one more example run per round with these environment variables (e.g. "
                        "MKL_DEBUG_CPU_TYPE=5: the example on the kernels sd/cpu.py chooses for ours); repeatable")
    a, rest = p.parse_known_args(argv)
    extra = {}
    for i in range(0, len(rest), 2):  # more trainer/model/data arguments: --name value
        if not rest[i].startswith("--") or i + 1 >= len(rest):
            p.error(f"unexpected argument {rest[i]!r}")
        extra[rest[i][2:]] = (json.loads(rest[i + 1]) if rest[i + 1][:1] in "0123456789[{-"
                              or rest[i + 1] in ("true", "false") else rest[i + 1])

    if a.flops_only:
        with open(a.unet_config) as f:
            cfg = json.load(f)
        r = unet_train_flops(cfg, a.resolution, a.latent_factor)
        print(f"{a.unet_config} at {a.resolution} px (latent {a.resolution // a.latent_factor}²): "
              f"{r['unet_parameters'] / 1e6:.0f} M parameters, forward {r['unet_forward_flops'] / 1e12:.3f} TFLOP, "
              f"training (3 × forward) {r['unet_train_flops'] / 1e12:.3f} TFLOP per image")
        return
    if a.versus:
        return _main_versus(a, rest)
    kit, file_list = resolve_inputs(a)
    configs = [(b, w) for b in (4, 16) for w in (0, 1, 2)] if a.table else [(a.batch_size, a.num_workers)]
    results = []
    for b, w in configs:
        r = run(kit, a.latents or file_list, a.resolution, b, w, a.steps, a.warmup, latents=a.latents is not None,
                model_max_length=a.model_max_length, logging_steps=a.logging_steps, extra_args=extra,
                peak_tflops=a.peak_tflops, save_steps=a.save_steps)
        results.append(r)
        print(describe(r), flush=True)
    if int(os.environ.get("PADDLE_TRAINER_ID", "0")) == 0:
        print(TABLE_HEADER)
        for r in results:
            print(format_row(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


def _main_versus(a, rest) -> None:
    import shlex

    from sd.tools import benchmark_versus

    if rest:
        raise SystemExit(f"--versus: unexpected arguments {rest}; "
                         "flags for one side go in --ours_args / --example_args")
    try:
        benchmark_versus.check_example_folder(a.versus)
        example_envs = [benchmark_versus.parse_env(e) for e in a.example_env]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    kit, file_list = resolve_inputs(a)
    result = benchmark_versus.versus(a.versus, kit, file_list, rounds=a.rounds, steps=a.versus_steps,
                                     logging_steps=a.logging_steps, warmup_logs=a.versus_warmup_logs,
                                     batch_size=a.batch_size, resolution=a.resolution, num_workers=a.num_workers,
                                     model_max_length=a.model_max_length,
                                     ours_variants=[shlex.split(v) for v in (a.ours_args or [""])],
                                     example_args=shlex.split(a.example_args),
                                     example_envs=example_envs)
    print(benchmark_versus.describe_versus(result), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
