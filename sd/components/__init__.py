"""Which VAE, text encoder, tokenizer, noise schedule and UNet belong together, and how each is loaded.

The one module that turns names into models, for training (``sd/model.py``), ``eval.py``,
``sd.tools.export``, ``sd.tools.precompute_latents`` and the trainer's image logging:

* **a training run**: ``ModelArguments.component_paths()`` (each part's own flag, else
  ``<pretrained>/<part>``); the UNet may be a config ``.json`` (random init);
* **a checkpoint** (``<output_dir>/checkpoint-N``): its ``sd_state.json`` records the folders it was
  trained with; a whole-pipeline checkpoint (``model_index.json``) holds every part itself;
* **a pretrained folder** in Paddle layout (ppdiffusers / paddlenlp ``save_pretrained``, the kit of
  ``sd/kit/build.py``) or in the diffusers / transformers layout (PyTorch weights, converted on load by
  ppdiffusers itself, ``from_diffusers=True``);
* **a hub name** (``CompVis/stable-diffusion-v1-4``, ``CompVis/stable-diffusion-v1-4/vae``): loaded by
  the libraries' own ``from_pretrained`` download code and cache, from ppdiffusers' download server
  (``PPNLP_ENDPOINT``) or, with ``from_hf_hub``, the Hugging Face Hub (``HF_ENDPOINT``). Each
  component's config is fetched first, so an unreachable name stops the run with one line
  (``ComponentError``) before anything heavy is built; a name already in the cache is loaded from it
  without a request. Local folders never touch the network.

It also holds the latent factor, the checkpoint state file's name and (through
``sd/runtime/checkpoints.py``) the newest-complete-checkpoint rule. SD v1's noise schedule, its sampler
settings and the one scheduler factory are in ``schedulers.py``; the one place that builds a
``StableDiffusionPipeline`` is ``pipeline.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from typing import Dict, Optional, Tuple

from sd.components import pipeline, schedulers
from sd.runtime.checkpoints import STATE_FILE, newest_model_folder
from sd.runtime.run_state import RunState

PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # what goes with a UNet
DEFAULT_OUTPUT = "./laion400m_pretrain_output_trainer"  # train.sh's OUTPUT_DIR
DEFAULT_KIT = "./tiny-sd"  # train.sh's KIT_DIR, used when a UNet folder records nothing else
KIT_HINT = "python -m sd.kit --output_dir ./tiny-sd"
_HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(/[\w.-]+)*")


class ComponentError(ValueError):
    """A user mistake about which weights to use (a missing folder, an unreachable name); one line."""


# ---------------------------------------------------------------------------------------------
# Names, folders, layouts
# ---------------------------------------------------------------------------------------------
def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def is_hub_name(name: str) -> bool:
    """``org/name[/subfolder]`` that is not a path here (a local path wins, as in ``from_pretrained``)."""
    return not os.path.exists(name) and not name.startswith((".", "/", "~")) and bool(_HUB_NAME.fullmatch(name))


def split_hub_name(name: str) -> Tuple[str, str]:
    """``CompVis/stable-diffusion-v1-4/vae`` → (``CompVis/stable-diffusion-v1-4``, ``vae``)."""
    parts = name.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def latent_factor(vae_config) -> int:
    """Spatial downsampling of an AutoencoderKL: 2 ** (number of blocks - 1)."""
    channels = vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    return 2 ** (len(channels) - 1)


def safetensors_format(path: str) -> Optional[str]:
    """The ``format`` entry of a safetensors header's ``__metadata__`` (8-byte length, then JSON)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return (header.get("__metadata__") or {}).get("format")


def saved_by_pytorch(folder: str) -> bool:
    """True when ``folder`` holds PyTorch weights (the diffusers / transformers layout:
    ``diffusion_pytorch_model*.safetensors|.bin``, ``pytorch_model*.bin``, or a ``*.safetensors``
    whose header says ``format: pt``) that ppdiffusers must convert on load (``from_diffusers=True``).

    Paddle weights (``diffusion_paddle_model*``, ``*.pdparams``, safetensors tagged ``pd``/``np``)
    win over ``.bin`` files, so a folder paddlenlp has already converted loads its Paddle copy.
    A file (e.g. a UNet config.json for random init) or a hub name is not a folder: False.
    """
    if not os.path.isdir(folder):
        return False
    names = os.listdir(folder)
    paddle_files = [n for n in names if n.startswith("diffusion_paddle_model") or n.endswith(".pdparams")]
    torch_bins = [n for n in names if n.endswith(".bin") and n.startswith(("diffusion_pytorch_model", "pytorch_model"))]
    torch_safetensors = [n for n in names
                         if n.endswith(".safetensors") and safetensors_format(os.path.join(folder, n)) == "pt"]
    return bool(torch_safetensors) or (bool(torch_bins) and not paddle_files)


def from_pretrained_kwargs(path: str) -> dict:
    """``{"from_diffusers": True}`` for a folder of PyTorch weights (ppdiffusers' own conversion on
    load: transposed linear weights, renamed keys), else ``{}``.

    Raises ``ComponentError`` for PyTorch ``.bin`` weights without a safetensors copy: the pickle readers
    of ppdiffusers 0.29 and paddlenlp 2.8.1 use ``np.cfloat``, which numpy 2 removed.
    """
    if not saved_by_pytorch(path):
        return {}
    if not any(n.endswith(".safetensors") for n in os.listdir(path)):
        raise ComponentError(f"{path} holds PyTorch .bin weights only, which ppdiffusers 0.29 / paddlenlp 2.8.1 cannot "
                             "read under numpy 2; re-save it as safetensors with PyTorch (diffusers' save_pretrained "
                             "writes safetensors by default), e.g. "
                             "StableDiffusionPipeline.from_pretrained(SRC).save_pretrained(DST)")
    return {"from_diffusers": True}


# ---------------------------------------------------------------------------------------------
# Hub names: the libraries' own download code and caches
# ---------------------------------------------------------------------------------------------
def _first_line(text: str, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def download_reason(exc: BaseException) -> str:
    """The library's reason for a failed download, from the root of its exception chain (ppdiffusers
    re-raises connection errors as "no file named ..."), in one line."""
    import requests

    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        response = getattr(e, "response", None)
        if isinstance(e, requests.HTTPError) and response is not None:
            status = response.status_code
            hint = {401: "unauthorised: private or gated, log in with `huggingface-cli login`",
                    403: "forbidden: gated, accept its licence on the hub and log in",
                    404: "not found"}.get(status, response.reason)
            return f"HTTP {status} ({hint}) for {response.url}"
    for e in reversed(chain):
        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            text = str(e)
            host = re.search(r"host='([^']+)'", text)
            cause = re.search(r"(Name or service not known|Temporary failure in name resolution|No address associated "
                              r"with hostname|Connection refused|timed out|Network is unreachable)", text)
            return (f"no connection to {host.group(1) if host else 'the server'}"
                    f" ({cause.group(1) if cause else type(e).__name__})")
    return _first_line(chain[-1]) if chain else "unknown"


# The libraries' endpoints and caches, as they define them at import (read here without importing
# paddle, so that a name that cannot be fetched fails in seconds; tests/test_hub.py compares them).
def endpoint(from_hf_hub: bool) -> str:
    if from_hf_hub:
        from huggingface_hub import constants

        return constants.ENDPOINT  # HF_ENDPOINT
    return os.environ.get("PPNLP_ENDPOINT", "https://bj.bcebos.com/paddlenlp")  # ppdiffusers' and paddlenlp's server


def server(from_hf_hub: bool) -> str:
    """Where a hub name is fetched from."""
    return (f"the Hugging Face Hub ({endpoint(True)})" if from_hf_hub
            else f"ppdiffusers' download server ({endpoint(False)})")


def cache_dirs(from_hf_hub: bool) -> Tuple[str, str]:
    """(ppdiffusers' cache for UNet / VAE / scheduler, paddlenlp's for text encoder / tokenizer)."""
    nlp_home = os.environ.get("PPNLP_HOME", os.path.join(os.path.expanduser("~"), ".paddlenlp"))
    nlp_models = os.path.join(nlp_home, "models")
    if from_hf_hub:
        from huggingface_hub import constants

        return os.path.abspath(constants.HF_HUB_CACHE), os.environ.get("HUGGINGFACE_HUB_CACHE", nlp_models)
    home = os.environ.get("PPNLP_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "paddlenlp"))
    return os.path.join(os.path.abspath(os.path.expanduser(home)), "ppdiffusers"), nlp_models


def _cached_file(repo: str, subfolder: str, filename: str, from_hf_hub: bool, cache_dir: str) -> Optional[str]:
    """The cached copy of one hub file, looked up without any request."""
    rel = "/".join(p for p in (subfolder, filename) if p)
    if from_hf_hub:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, rel, cache_dir=cache_dir)
        return found if isinstance(found, str) else None
    path = os.path.join(cache_dir, repo, *rel.split("/"))  # both libraries' server cache: <cache>/<repo>/<file>
    return path if os.path.isfile(path) else None


class HubSource:
    """One component given by hub name: its repo, subfolder, server, and the files it was checked by."""

    def __init__(self, name: str, what: str, kind: str, from_hf_hub: bool):
        self.name, self.what, self.kind, self.from_hf_hub = name, what, kind, from_hf_hub
        # the Hugging Face Hub knows repos org/name only (subfolders inside them); ppdiffusers' server takes
        # the whole name as a path, as PaddleMIX passes it (paddlenlp 2.8.1 also fails to create the cache
        # folder of a subfolder there)
        self.repo, self.subfolder = split_hub_name(name) if from_hf_hub else (name, "")
        diffusers_cache, nlp_cache = cache_dirs(from_hf_hub)
        self.cache_dir = nlp_cache if kind in ("text_encoder", "tokenizer") else diffusers_cache
        self.layout: dict = {}
        self.folder: Optional[str] = None  # the cached copy, once complete

    def fail(self, exc: BaseException) -> ComponentError:
        return ComponentError(
            f"cannot download the {self.what} '{self.name}' from {server(self.from_hf_hub)}: {download_reason(exc)}. "
            f"Pass a local folder instead, or run this once on a connected machine and copy its cache "
            f"({self.cache_dir}) here, or build the offline kit with `{KIT_HINT}`")

    def preflight(self, filename: str) -> None:
        """Is ``filename`` there? One request (HEAD, 10 s timeout) before anything heavy is imported."""
        if self.cached(filename):
            return
        try:
            if self.from_hf_hub:
                from huggingface_hub import get_hf_file_metadata, hf_hub_url

                get_hf_file_metadata(hf_hub_url(self.repo, filename, subfolder=self.subfolder or None), timeout=10)
            else:
                import requests

                url = "/".join([endpoint(False), "models", "community", self.repo,
                                *([self.subfolder] if self.subfolder else []), filename])
                requests.head(url, timeout=10, allow_redirects=True).raise_for_status()
        except (OSError, ValueError) as e:  # requests' and huggingface_hub's errors are OSErrors
            raise self.fail(e) from None

    def cached(self, filename: str) -> Optional[str]:
        return _cached_file(self.repo, self.subfolder, filename, self.from_hf_hub, self.cache_dir)

    def fetch(self, filename: str) -> str:
        """One file through the library's own download code (or its cache, without a request)."""
        found = self.cached(filename)
        if found:
            return found
        from paddlenlp.utils.download import resolve_file_path

        try:
            path = resolve_file_path(self.repo, [filename], subfolder=self.subfolder or None, cache_dir=self.cache_dir,
                                     from_hf_hub=self.from_hf_hub, from_bos=not self.from_hf_hub)
        except (OSError, ValueError) as e:  # requests' errors are OSErrors; huggingface_hub's too
            raise self.fail(e) from None
        if not path:
            raise self.fail(FileNotFoundError(f"{filename} not found"))
        return path

    def exists(self, filename: str) -> bool:
        if self.cached(filename):
            return True
        from paddlenlp.utils.download import bos_aistudio_hf_file_exist

        try:
            return bool(bos_aistudio_hf_file_exist(self.repo, filename, subfolder=self.subfolder or None,
                                                   from_hf_hub=self.from_hf_hub, from_bos=not self.from_hf_hub))
        except (OSError, ValueError) as e:
            raise self.fail(e) from None

    def kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments for the name: server, subfolder, weights layout."""
        kw = {"from_hf_hub": self.from_hf_hub, **self.layout}
        if self.subfolder:
            kw["subfolder"] = self.subfolder
        return kw


CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}


def probe_hub(name: str, what: str, kind: str, from_hf_hub: bool) -> HubSource:
    """Check a hub name before anything heavy: fetch its config (fails fast, in one line) and find its
    weights' layout. When the cache already holds every file the component needs, ``folder`` is that
    cached folder and it loads from there without a request; else ``from_pretrained`` downloads it."""
    src = HubSource(name, what, kind, from_hf_hub)
    src.preflight(CONFIG_FILES[kind])
    src.config_file = src.fetch(CONFIG_FILES[kind])
    needs = []
    if kind in ("unet", "vae"):
        paddle_name, torch_name = "diffusion_paddle_model.safetensors", "diffusion_pytorch_model.safetensors"
        if src.cached(paddle_name) or src.cached(torch_name):
            needs = [paddle_name if src.cached(paddle_name) else torch_name]
        elif not src.exists(paddle_name) and src.exists(torch_name):
            src.layout = {"from_diffusers": True}
        needs = needs or [None]  # not in the cache yet: from_pretrained downloads it
    elif kind == "text_encoder":
        # paddlenlp takes every model.safetensors from the Hugging Face Hub for a PyTorch one and transposes
        # its Linear weights (square q/k/v projections then load wrong without an error): fetch it and read
        # its header, as for a local folder (saved_by_pytorch).
        if src.cached("model.safetensors") or src.exists("model.safetensors"):
            src.fetch("model.safetensors")
            needs = ["model.safetensors"]
        else:
            needs = [None]
    elif kind == "tokenizer":
        for f in ("vocab.json", "merges.txt"):  # what CLIPTokenizer needs besides its config
            src.fetch(f)
    if all(f and src.cached(f) for f in needs):
        src.folder = os.path.dirname(src.config_file)
    return src


def locate(name_or_path: str, what: str, kind: str, from_hf_hub: bool = False, flag: str = ""):
    """A local path (returned as is) or a checked ``HubSource``; ``ComponentError`` otherwise."""
    if os.path.exists(name_or_path):
        return name_or_path
    if is_hub_name(name_or_path):
        return probe_hub(name_or_path, what, kind, from_hf_hub)
    raise ComponentError(f"{flag + ' ' if flag else ''}{what} {name_or_path} does not exist: pass a local folder "
                         f"(e.g. the offline kit's, built by `{KIT_HINT}`) or a hub name such as "
                         "CompVis/stable-diffusion-v1-4")


def _args(source, local_kwargs=True) -> Tuple[str, dict]:
    if isinstance(source, HubSource):
        if source.folder is None:
            return source.repo, source.kwargs()
        source = source.folder
    return source, (from_pretrained_kwargs(source) if local_kwargs else {})


# ---------------------------------------------------------------------------------------------
# Loaders (a source is a local path or a HubSource from ``locate``)
# ---------------------------------------------------------------------------------------------
def _loading(source, fn):
    try:
        return fn()
    except (OSError, ValueError) as e:
        if isinstance(source, HubSource) and not isinstance(e, ComponentError):
            raise source.fail(e) from None
        raise


def load_vae(source):
    from ppdiffusers import AutoencoderKL

    path, kw = _args(source)
    return _loading(source, lambda: AutoencoderKL.from_pretrained(path, **kw))


def load_text_encoder(source):
    from ppdiffusers.transformers import CLIPTextModel

    path, kw = _args(source)
    return _loading(source, lambda: CLIPTextModel.from_pretrained(path, **kw))


def load_tokenizer(source):
    from ppdiffusers.transformers import AutoTokenizer

    path, kw = _args(source, local_kwargs=False)
    return _loading(source, lambda: AutoTokenizer.from_pretrained(path, **kw))


def load_unet(source, variant: Optional[str] = None):
    from ppdiffusers import UNet2DConditionModel

    path, kw = _args(source)
    return _loading(source, lambda: UNet2DConditionModel.from_pretrained(path, variant=variant, **kw))


def init_unet_from_config(config_file: str):
    """A randomly initialised UNet2DConditionModel with zero-initialised output layers.

    Zeroing conv_out, every resnet's second conv and every transformer's proj_out makes each
    residual branch start as the identity and the first prediction zero (as in LDM/SD).
    """
    from paddle import nn
    from ppdiffusers import UNet2DConditionModel
    from ppdiffusers.models.resnet import ResnetBlock2D
    from ppdiffusers.models.transformer_2d import Transformer2DModel

    unet = UNet2DConditionModel.from_config(read_json(config_file))
    zero = nn.initializer.Constant(0.0)
    targets = [unet.conv_out]
    for layer in unet.sublayers():
        if isinstance(layer, ResnetBlock2D):
            targets.append(layer.conv2)
        elif isinstance(layer, Transformer2DModel):
            targets.append(layer.proj_out)
    for t in targets:
        for p in t.parameters():
            zero(p)
    return unet


def load_noise_scheduler(source, prediction_type: str):
    """The training schedule: a DDPM scheduler with the settings of a scheduler folder/name, else SD v1's."""
    from ppdiffusers import DDPMScheduler

    if source is None:
        return schedulers.make_scheduler("ddpm", prediction_type=prediction_type)
    path, kw = _args(source, local_kwargs=False)
    config = _loading(source, lambda: DDPMScheduler.load_config(path, **kw))
    return schedulers.make_scheduler("ddpm", config, prediction_type=prediction_type)


def config_of(source) -> Optional[dict]:
    """A component's config dict, read locally (hub sources: the file ``locate`` fetched)."""
    if isinstance(source, HubSource):
        return read_json(source.config_file)
    name = "scheduler_config.json" if os.path.basename(os.path.normpath(source)) == "scheduler" else "config.json"
    f = source if os.path.isfile(source) else os.path.join(source, name)
    return read_json(f) if os.path.isfile(f) else None


# ---------------------------------------------------------------------------------------------
# A training run
# ---------------------------------------------------------------------------------------------
def training_sources(model_args) -> Dict[str, object]:
    """Every component of a training run, located (hub names checked) before anything is built."""
    paths = model_args.component_paths()
    hub = bool(getattr(model_args, "from_hf_hub", False))
    flags = {"vae": "vae_name_or_path", "text_encoder": "text_encoder_name_or_path", "tokenizer": "tokenizer_name",
             "unet": "unet_name_or_path"}
    what = {"vae": "VAE", "text_encoder": "text encoder", "tokenizer": "tokenizer", "unet": "UNet"}
    sources = {}
    for kind in ("tokenizer", "vae", "text_encoder", "unet"):
        if not paths[kind]:
            raise ComponentError(f"no {what[kind]} given: pass --{flags[kind]} or --pretrained_model_name_or_path")
        sources[kind] = locate(paths[kind], what[kind], kind, hub, flag="--" + flags[kind])
    scheduler = paths["scheduler"]
    if scheduler and (os.path.isdir(scheduler) or is_hub_name(scheduler)):
        sources["scheduler"] = locate(scheduler, "scheduler", "scheduler", hub)
    else:
        sources["scheduler"] = None  # SD v1's schedule
    return sources


def source_name(source) -> Optional[str]:
    """What to record in a checkpoint's sd_state.json for a source: the path, or the hub name."""
    return source.name if isinstance(source, HubSource) else source


# ---------------------------------------------------------------------------------------------
# Sampling: which weights go with a UNet, a checkpoint or a pretrained folder
# ---------------------------------------------------------------------------------------------
def find_unet(unet: Optional[str], pretrained: Optional[str], from_hf_hub: bool = False):
    """The UNet folder (or hub source); None when it comes with ``pretrained``."""
    if unet is None:
        if pretrained is not None:
            return None
        if not os.path.isdir(DEFAULT_OUTPUT):
            raise ComponentError(f"no {DEFAULT_OUTPUT} here: train a model with `sh train.sh`, "
                                 "or pass --unet_model_name_or_path / --pretrained_model_name_or_path")
        return os.path.join(_newest(DEFAULT_OUTPUT), "unet")
    if is_hub_name(unet):
        return locate(unet, "UNet", "unet", from_hf_hub)
    if not os.path.isdir(unet):
        raise ComponentError(f"--unet_model_name_or_path {unet} is not a folder; pass a checkpoint's unet/ folder, "
                             f"e.g. {DEFAULT_OUTPUT}/checkpoint-1000/unet")
    if os.path.isfile(os.path.join(unet, "config.json")):
        return unet
    if os.path.isfile(os.path.join(unet, "unet", "config.json")) or glob.glob(os.path.join(unet, "checkpoint-*")):
        return os.path.join(_newest(unet), "unet")  # a checkpoint or output folder: its (newest) UNet
    raise ComponentError(f"{unet} is not a UNet folder (no config.json) nor a checkpoint (no unet/config.json); "
                         f"pass a checkpoint's unet/ folder, e.g. {DEFAULT_OUTPUT}/checkpoint-1000/unet")


def _newest(folder: str) -> str:
    found = newest_model_folder(folder)
    if found is None:
        raise ComponentError(f"no checkpoint under {folder}: train one with `sh train.sh`, "
                             "or pass --unet_model_name_or_path / --pretrained_model_name_or_path")
    return found


def resolve_for_sampling(unet: Optional[str] = None, pretrained: Optional[str] = None,
                         text_encoder: Optional[str] = None, variant: str = "auto", height: Optional[int] = None,
                         width: Optional[int] = None, from_hf_hub: bool = False) -> Dict:
    """Decide every component, the UNet variant, the prediction type and the image size, and check the
    configs against each other before any weight is loaded.

    Args:
        unet: a UNet folder, a checkpoint or output folder (its newest UNet), a hub name, or None (the
            newest checkpoint of ``sh train.sh``, or ``<pretrained>/unet``).
        pretrained: a pipeline folder or hub name supplying the VAE, text encoder, tokenizer, scheduler.
        text_encoder: a trained text encoder replacing the others'.
        variant: ``auto`` (EMA weights when the UNet folder has them), ``ema``, ``none``, or a name.
    Returns:
        {vae, text_encoder, tokenizer, scheduler, unet: source (path or HubSource), checkpoint,
        prediction_type, scheduler_config, is_kit, variant, height, width}.
    """
    unet = find_unet(unet, pretrained, from_hf_hub)
    if pretrained is not None and is_hub_name(pretrained):
        paths = {k: locate(f"{pretrained}/{k}", f"{k.replace('_', ' ')} of --pretrained_model_name_or_path", k,
                           from_hf_hub)
                 for k in PARTS}
        unet = unet or locate(f"{pretrained}/unet", "UNet of --pretrained_model_name_or_path", "unet", from_hf_hub)
        ckpt, state = None, None
    else:
        if pretrained is not None:
            if not os.path.isdir(pretrained):
                raise ComponentError(f"--pretrained_model_name_or_path {pretrained} is not a folder")
            if not os.path.isdir(os.path.join(pretrained, "vae")):
                hint = (" (it is a training checkpoint: pass it as --unet_model_name_or_path)"
                        if os.path.isfile(os.path.join(pretrained, STATE_FILE)) else "")
                raise ComponentError(f"{pretrained} has no vae/ folder{hint}; pass a Stable Diffusion folder with "
                                     f"vae/ text_encoder/ tokenizer/ scheduler/, e.g. {DEFAULT_KIT}")
            unet = unet or os.path.join(pretrained, "unet")
        if isinstance(unet, str) and not os.path.isfile(os.path.join(unet, "config.json")):
            raise ComponentError(f"{unet} is not a UNet folder (no config.json); pass --unet_model_name_or_path")
        # the checkpoint (or pipeline folder) the UNet belongs to
        ckpt = os.path.dirname(os.path.abspath(unet)) if isinstance(unet, str) else None
        state = _run_state(ckpt)
        paths = _parts_for(pretrained, ckpt, state, unet, from_hf_hub)
    if text_encoder:
        paths["text_encoder"] = locate(text_encoder, "text encoder", "text_encoder", from_hf_hub,
                                       flag="--text_encoder_model_name_or_path")
    elif ckpt and os.path.isfile(os.path.join(ckpt, "text_encoder", "config.json")):
        paths["text_encoder"] = os.path.join(ckpt, "text_encoder")  # trained with --train_text_encoder
    for k in ("vae", "text_encoder", "tokenizer"):
        if isinstance(paths[k], str) and not os.path.isdir(paths[k]):
            also = " or --text_encoder_model_name_or_path" if k == "text_encoder" else ""
            raise ComponentError(f"{k} folder {paths[k]} does not exist; pass --pretrained_model_name_or_path{also}")
    variant = _variant(unet, variant)
    configs = {"unet": config_of(unet), "text_encoder": config_of(paths["text_encoder"]),
               "vae": config_of(paths["vae"])}
    if (configs["unet"] is not None
            and configs["unet"].get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel"):
        raise ComponentError(f"{source_name(unet)} holds a {configs['unet']['_class_name']}, "
                             "not a UNet2DConditionModel")
    size = state.resolution if state else None
    if size is None and ckpt and os.path.isfile(os.path.join(ckpt, "run_config.json")):
        size = read_json(os.path.join(ckpt, "run_config.json")).get("data", {}).get("resolution")
    if height is None or width is None:
        if size is None and configs["unet"] and configs["vae"]:
            size = configs["unet"]["sample_size"] * latent_factor(configs["vae"])
        height, width = height or size, width or size
    check_configs(configs, height, width)
    recorded_vae = state.model_paths.get("vae") if state else None
    return {**paths, "unet": unet, "checkpoint": ckpt, "prediction_type": state.prediction_type if state else None,
            "scheduler_config": config_of(paths["scheduler"]) if paths["scheduler"] is not None else None,
            "variant": variant, "height": height, "width": width,
            "is_kit": any(isinstance(v, str)
                          and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(v)), "kit_report.json"))
                          for v in (paths["vae"], recorded_vae))}  # → demo prompts


def _run_state(ckpt: Optional[str]) -> Optional[RunState]:
    """The state file of the checkpoint ``ckpt`` (None for a pipeline folder, which has none)."""
    if not (ckpt and os.path.isfile(os.path.join(ckpt, STATE_FILE))):
        return None
    try:
        return RunState.read(ckpt)
    except ValueError as e:
        raise ComponentError(str(e)) from None


def _parts_for(pretrained, ckpt, state: Optional[RunState], unet, from_hf_hub) -> Dict:
    if pretrained is not None:
        return {k: os.path.join(pretrained, k) for k in PARTS}
    if ckpt and os.path.isfile(os.path.join(ckpt, "model_index.json")):  # a whole-pipeline checkpoint
        return {k: os.path.join(ckpt, k) for k in PARTS}
    if state and state.model_paths:
        run_config = os.path.join(ckpt, "run_config.json")  # names from the server the run used
        if os.path.isfile(run_config):
            from_hf_hub = from_hf_hub or bool(read_json(run_config).get("model", {}).get("from_hf_hub"))
        paths = {}
        for k in PARTS:
            recorded = state.model_paths.get(k) or ""
            if is_hub_name(recorded):
                paths[k] = locate(recorded, k.replace("_", " "), k, from_hf_hub)
            elif os.path.isdir(recorded):
                paths[k] = recorded
            else:
                raise ComponentError(f"the {k} this checkpoint was trained with ({recorded}) is missing: "
                                     f"rebuild the kit with `{KIT_HINT}` or pass --pretrained_model_name_or_path")
        return paths
    if os.path.isdir(os.path.join(DEFAULT_KIT, "vae")):
        return {k: os.path.join(DEFAULT_KIT, k) for k in PARTS}
    raise ComponentError(f"nothing records which VAE and text encoder go with {unet}: pass "
                         f"--pretrained_model_name_or_path (e.g. {DEFAULT_KIT}, built by `{KIT_HINT}`)")


def _variant(unet, variant: str) -> Optional[str]:
    if not isinstance(unet, str):  # a hub UNet: what was asked for ("auto": the plain weights)
        return None if variant in ("auto", "none") else variant
    if variant == "auto":  # the EMA weights sample better when training kept them
        return "ema" if glob.glob(os.path.join(unet, "*.ema.*")) else None
    if variant == "none":
        return None
    if not glob.glob(os.path.join(unet, f"*.{variant}.*")):
        raise ComponentError(f"{unet} has no '{variant}' weights (EMA weights exist only when trained with "
                             "--use_ema True); drop --variant")
    return variant


def check_configs(configs: Dict[str, Optional[dict]], height: Optional[int], width: Optional[int]) -> None:
    """Cross-checks of the UNet, text encoder and VAE configs (any may be None = not known yet)."""
    unet, te, vae = configs.get("unet"), configs.get("text_encoder"), configs.get("vae")
    if unet and te and unet.get("cross_attention_dim") != te.get("hidden_size"):
        raise ComponentError(f"the UNet's cross_attention_dim {unet.get('cross_attention_dim')} does not match "
                             f"the text encoder's hidden_size {te.get('hidden_size')}: use the text encoder the UNet "
                             "was trained with (--pretrained_model_name_or_path / --text_encoder_model_name_or_path)")
    if unet and vae and unet.get("in_channels") != vae.get("latent_channels"):
        raise ComponentError(f"the UNet's in_channels {unet.get('in_channels')} does not match the VAE's "
                             f"latent_channels {vae.get('latent_channels')}: use the VAE the UNet was trained with "
                             "(--pretrained_model_name_or_path)")
    if vae and height is not None and width is not None:
        f = latent_factor(vae)
        if height % f or width % f or height < f or width < f:
            raise ComponentError(f"--height {height} and --width {width} must be positive multiples of {f}, "
                                 "the VAE's downsampling factor")


def load_for_sampling(models: Dict, scheduler: str = "ddim"):
    """Load what ``resolve_for_sampling`` chose and wrap it in a pipeline (``sd/components/pipeline.py``)
    with the sampler ``scheduler`` (a key of ``schedulers.SCHEDULERS``) on the UNet's noise schedule.
    Sets ``models["height"]``/``["width"]`` when only the loaded configs tell them."""
    sched = dict(models["scheduler_config"] or schedulers.SD_SCHEDULER_CONFIG)  # none: SD v1's
    if "clip_sample" not in sched:
        from paddlenlp.utils.log import logger

        logger.warning(f"the scheduler config of {source_name(models['scheduler'])} does not state clip_sample (SD v1: "
                       f"false), so samplers built from it clip latents to [-1, 1]: add \"clip_sample\": false to its "
                       f"scheduler_config.json or rebuild the kit with `{KIT_HINT}`")
    if models["prediction_type"]:  # what the UNet was trained to predict
        sched["prediction_type"] = models["prediction_type"]
    vae = load_vae(models["vae"])
    text_encoder = load_text_encoder(models["text_encoder"])
    unet = load_unet(models["unet"], models["variant"])
    if models["height"] is None or models["width"] is None:
        size = unet.config.sample_size * latent_factor(vae.config)
        models["height"], models["width"] = models["height"] or size, models["width"] or size
    check_configs({"unet": dict(unet.config), "text_encoder": text_encoder.config.to_dict(), "vae": dict(vae.config)},
                  models["height"], models["width"])
    return pipeline.build_pipeline(vae, text_encoder, load_tokenizer(models["tokenizer"]), unet,
                                   schedulers.make_scheduler(scheduler, sched))


def load_pipeline(pretrained_model_name_or_path: str, unet=None, text_encoder=None, variant: Optional[str] = None,
                  scheduler: str = "ddim", scheduler_config: Optional[dict] = None):
    """Load a local pipeline folder (``model_index.json`` layout) with ppdiffusers' own loader;
    ``unet``/``text_encoder`` (a folder or a loaded module) replace its own. ``variant`` (e.g. ``"ema"``)
    selects the UNet weights file; the sampler ``scheduler`` is built on the folder's scheduler settings,
    ``scheduler_config`` overriding them."""
    kwargs = {}
    if unet is not None:
        kwargs["unet"] = load_unet(unet, variant) if isinstance(unet, str) else unet
    elif variant:
        kwargs["unet"] = load_unet(os.path.join(pretrained_model_name_or_path, "unet"), variant)
    if text_encoder is not None:
        kwargs["text_encoder"] = load_text_encoder(text_encoder) if isinstance(text_encoder, str) else text_encoder
    # a diffusers-layout pipeline folder (PyTorch weights): ppdiffusers converts every component on load
    if any(from_pretrained_kwargs(os.path.join(pretrained_model_name_or_path, c))
           for c in ("unet", "vae", "text_encoder")):
        kwargs["from_diffusers"] = True
    pipe = pipeline.pipeline_from_folder(pretrained_model_name_or_path, **kwargs)
    pipe.scheduler = schedulers.make_scheduler(scheduler, {**dict(pipe.scheduler.config), **(scheduler_config or {})})
    return pipe
