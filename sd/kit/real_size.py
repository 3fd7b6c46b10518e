"""A real-size Stable Diffusion v1 folder with seeded random weights, built in seconds without a download.

    python -m sd.kit --preset sd-v1 --output_dir ./sd-v1-random [--seed 0]

writes the ``from_pretrained`` layout of ``CompVis/stable-diffusion-v1-4`` with every config field of its published
files: ``vae/`` (AutoencoderKL, 83 653 863 parameters), ``text_encoder/`` (CLIP ViT-L/14's text tower,
123 060 480), ``tokenizer/`` (CLIP's BPE, 49 408 tokens), ``unet/`` (the repository's ``unet_config.json``,
859 520 964), ``scheduler/`` (SD v1's PNDM settings) and ``model_index.json`` (no safety checker or feature
extractor, as the tiny kit). It is for measuring memory, speed and the code paths at SD v1's real sizes where the
published weights cannot be downloaded; what it generates is noise.

The weights are not Paddle's initialisation (that takes ~1.5 min and ~7 GB for the UNet alone on 2 cores): each model
is built lazily (``paddle.LazyGuard``, no memory) for its parameter names and shapes, and each tensor is drawn with
numpy from (seed, tensor name) and streamed into the safetensors file that ppdiffusers / paddlenlp's
``save_pretrained`` would write (same file names, header ``format`` and tensor layout), one tensor in memory at a time:

* Linear and Conv2D weights and biases: U(-1/√fan_in, 1/√fan_in), PyTorch's default initialisation of these layers,
  i.e. what an untrained diffusers / transformers model holds;
* GroupNorm / LayerNorm: weight 1, bias 0;
* token and position embeddings: N(0, 0.02²) (CLIP's ``initializer_range``).

``kit_report.json`` records the preset, the seed, the parameter counts, where the tokenizer came from and the build
time. Without open_clip installed (``pip install --no-deps -r requirements-kit.txt``) the tokenizer falls back to
the tiny kit's BPE learned from the demo captions, which the log and the report say.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from typing import Callable, Dict, List, Tuple

import numpy as np

from sd.components import read_json
from sd.components.schedulers import make_scheduler
from sd.data import demo_data
from sd.kit.tokenizer import BOS, EOS, clip_merges, find_clip_bpe, learn_bpe, save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
UNET_CONFIG = os.path.join(ROOT, "unet_config.json")  # SD v1's UNet, field for field v1-4's unet/config.json

# CompVis/stable-diffusion-v1-4's vae/config.json (scaling_factor: the class default its file leaves implicit)
SD_V1_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                 up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                 act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# its text_encoder/config.json (openai/clip-vit-large-patch14's text tower); the special ids 0/1/2 are the file's own
# (older transformers defaults): with eos_token_id 2 the libraries pool at the highest id (<|endoftext|>, 49407)
SD_V1_TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                          num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                          hidden_act="quick_gelu", layer_norm_eps=1e-05, attention_dropout=0.0, dropout=0.0,
                          initializer_range=0.02, initializer_factor=1.0, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1)
_ADDED = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)  # its AddedToken fields
# its tokenizer/tokenizer_config.json and special_tokens_map.json, without the build-time name_or_path and
# special_tokens_map_file
SD_V1_TOKENIZER = {"add_prefix_space": False, "bos_token": {"__type": "AddedToken", "content": BOS, **_ADDED},
                   "do_lower_case": True, "eos_token": {"__type": "AddedToken", "content": EOS, **_ADDED},
                   "errors": "replace", "model_max_length": 77, "pad_token": EOS, "tokenizer_class": "CLIPTokenizer",
                   "unk_token": {"__type": "AddedToken", "content": EOS, **_ADDED}}
SD_V1_SPECIAL_TOKENS = {"bos_token": {"content": BOS, **_ADDED}, "eos_token": {"content": EOS, **_ADDED},
                        "pad_token": EOS, "unk_token": {"content": EOS, **_ADDED}}

Layout = List[Tuple[str, Tuple[int, ...], str, int]]  # (state-dict name, shape, rule, fan_in)


def parameter_layout(model) -> Layout:
    """Every parameter of ``model`` (built under ``paddle.LazyGuard``) as (name, shape, rule, fan_in).

    rule: ``"fan_in"`` (Linear / Conv2D weight and bias), ``"one"``/``"zero"`` (norm weight / bias) or
    ``"embedding"``. Paddle's Linear weight is (in, out), its Conv2D weight (out, in / groups, kh, kw).
    """
    from paddle import nn

    layout = []
    for prefix, layer in model.named_sublayers(include_self=True):
        own = dict(layer.named_parameters(include_sublayers=False))
        if not own:
            continue
        if isinstance(layer, (nn.GroupNorm, nn.LayerNorm)):
            rules, fan_in = {"weight": "one", "bias": "zero"}, 0
        elif isinstance(layer, nn.Embedding):
            rules, fan_in = {"weight": "embedding"}, 0
        elif isinstance(layer, nn.Linear):
            rules, fan_in = {"weight": "fan_in", "bias": "fan_in"}, int(own["weight"].shape[0])
        elif isinstance(layer, nn.Conv2D):
            rules, fan_in = {"weight": "fan_in", "bias": "fan_in"}, int(np.prod(own["weight"].shape[1:]))
        else:
            raise TypeError(f"no initialisation rule for {type(layer).__name__} ({prefix})")
        for name, p in own.items():
            layout.append((f"{prefix}.{name}" if prefix else name, tuple(int(d) for d in p.shape), rules[name], fan_in))
    names = {n for n, *_ in layout}
    if names != set(model.state_dict()):
        raise AssertionError(f"parameters and state dict differ: {sorted(names ^ set(model.state_dict()))[:5]}")
    return layout


def random_tensor(seed: int, component: str, name: str, shape: Tuple[int, ...], rule: str, fan_in: int,
                  initializer_range: float = 0.02) -> np.ndarray:
    """One tensor of the kit (float32), a function of (seed, component, name) alone."""
    if rule == "one":
        return np.ones(shape, np.float32)
    if rule == "zero":
        return np.zeros(shape, np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(f"{component}/{name}".encode())])
    if rule == "embedding":
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= initializer_range
        return x
    bound = 1.0 / np.sqrt(fan_in)  # PyTorch's kaiming_uniform_(a=√5) bound for weights, and its bias bound
    x = rng.random(shape, dtype=np.float32)
    x *= np.float32(2 * bound)
    x -= np.float32(bound)
    return x


def write_safetensors(path: str, layout: Layout, make: Callable[..., np.ndarray], metadata: Dict[str, str]) -> None:
    """Write a safetensors file (float32 tensors in name order) one tensor at a time: ``make(name, shape, rule,
    fan_in)`` gives each. The format: 8-byte little-endian header length, the JSON header (padded with spaces to
    8 bytes), then the tensors' bytes back to back."""
    header: Dict = {"__metadata__": metadata}
    offset = 0
    ordered = sorted(layout)
    for name, shape, *_ in ordered:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, rule, fan_in in ordered:
            x = make(name, shape, rule, fan_in)
            if x.dtype != np.float32 or x.shape != shape:
                raise AssertionError(f"{name}: made {x.dtype} {x.shape}, expected float32 {shape}")
            f.write(np.ascontiguousarray(x).data)


def write_tokenizer(folder: str, log=print) -> Tuple[str, int]:
    """CLIP's tokenizer (open_clip's BPE file) in ``folder``, with SD v1-4's tokenizer configs; without open_clip,
    the BPE learned from the demo captions. Returns (where it came from, vocabulary size)."""
    bpe = find_clip_bpe()
    if bpe:
        merges, source = clip_merges(bpe), f"CLIP's BPE ({bpe})"
    else:
        merges = learn_bpe([p[3] for p in demo_data.all_prompts()])
        source = ("the demo captions' learned BPE (open_clip not installed: "
                  "pip install --no-deps -r requirements-kit.txt)")
        log(f"kit: open_clip's CLIP BPE file not found; the tokenizer is {source}, NOT SD v1's")
    size = save_tokenizer(folder, merges, SD_V1_TOKENIZER["model_max_length"])
    for name, content in (("tokenizer_config.json", SD_V1_TOKENIZER),
                          ("special_tokens_map.json", SD_V1_SPECIAL_TOKENS)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return source, size


def _count(layout: Layout) -> int:
    return sum(int(np.prod(shape)) for _, shape, *_ in layout)


def build_real_size_kit(output_dir: str, seed: int = 0, log=print) -> Dict:
    """Build the ``sd-v1`` kit into ``output_dir`` (beside it, then moved into place); returns its report.

    Args:
        output_dir: the kit folder; an existing kit there is replaced, any other non-empty folder is refused.
        seed: fixes every weight (numpy's generator seeded with (seed, tensor name)); same seed, same bytes.
    """
    import paddle
    import ppdiffusers
    from paddlenlp.transformers.model_utils import no_init_weights
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel

    from sd.kit.build import _update_json

    output_dir = os.path.normpath(output_dir)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and \
            not os.path.isfile(os.path.join(output_dir, "kit_report.json")):
        raise ValueError(f"{output_dir} is not empty and holds no kit (no kit_report.json); "
                         "choose another --output_dir")
    start = time.time()
    work = output_dir + ".partial"
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    tokenizer_source, vocab_size = write_tokenizer(os.path.join(work, "tokenizer"), log)

    with paddle.LazyGuard(), no_init_weights():  # names and shapes only: no parameter is allocated
        vae = AutoencoderKL(**SD_V1_VAE)
        unet = UNet2DConditionModel.from_config(read_json(UNET_CONFIG))
        text_config = CLIPTextConfig(**SD_V1_TEXT_ENCODER)
        text_encoder = CLIPTextModel(text_config)
    counts = {}
    for part, model, weights, fmt in (("vae", vae, "diffusion_paddle_model.safetensors", "pd"),
                                      ("unet", unet, "diffusion_paddle_model.safetensors", "pd"),
                                      ("text_encoder", text_encoder, "model.safetensors", "np")):
        folder = os.path.join(work, part)
        os.makedirs(folder, exist_ok=True)
        layout = parameter_layout(model)
        counts[f"{part}_parameters"] = _count(layout)
        write_safetensors(os.path.join(folder, weights), layout,
                          lambda *t, part=part: random_tensor(seed, part, *t), {"format": fmt})
        log(f"kit: {part}: {counts[f'{part}_parameters']:,} parameters written")
    vae.save_config(os.path.join(work, "vae"))
    unet.save_config(os.path.join(work, "unet"))
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(os.path.join(work, "text_encoder"))
    _update_json(os.path.join(work, "text_encoder", "config.json"), {"dropout": 0.0, "torch_dtype": "float32"})
    make_scheduler("pndm").save_pretrained(os.path.join(work, "scheduler"))
    # as the tiny kit: what SD v1 leaves to each scheduler class's default stays unstated
    _update_json(os.path.join(work, "scheduler", "scheduler_config.json"), {},
                 drop=("timestep_spacing", "prediction_type"))
    model_index = {"_class_name": "StableDiffusionPipeline", "_ppdiffusers_version": ppdiffusers.__version__,
                   "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
                   "safety_checker": [None, None], "scheduler": ["ppdiffusers", "PNDMScheduler"],
                   "text_encoder": ["ppdiffusers.transformers", "CLIPTextModel"],
                   "tokenizer": ["ppdiffusers.transformers", "CLIPTokenizer"],
                   "unet": ["ppdiffusers", "UNet2DConditionModel"], "vae": ["ppdiffusers", "AutoencoderKL"]}
    with open(os.path.join(work, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(model_index, f, indent=2)
    report = {"preset": "sd-v1", "seed": seed, "weights": "random (see sd/kit/real_size.py): not a trained model",
              "tokenizer": tokenizer_source, "vocab_size": vocab_size, **counts,
              "disk_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(work) for f in fs),
              "build_seconds": round(time.time() - start, 1), "paddle": paddle.__version__}
    with open(os.path.join(work, "kit_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(work, output_dir)
    log(f"kit: built {output_dir} (SD v1 sizes, random weights) in {report['build_seconds']:.0f} s, "
        f"{report['disk_bytes'] / 1e9:.2f} GB")
    return report
