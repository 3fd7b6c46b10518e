"""What the tests share besides fixtures: the repository's paths, the environment of the programs they start, the
training command, weight comparison."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
HELPERS = os.path.join(ROOT, "tests", "helpers")  # the helper programs the tests start
ASSETS = os.path.join(ROOT, "tests", "assets")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def env_with_root(env=None, **extra) -> dict:
    """``env`` (default: this process's environment) with the repository first on PYTHONPATH, plus ``extra``.

    The environment of every subprocess that runs a program from tests/helpers, benchmarks/ or ``python -c``
    code and imports ``sd``: nothing edits ``sys.path`` itself, and a program started by file (directly or by
    ``paddle.distributed.launch``, which takes no ``-m``) has its own folder on it, not the repository's.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def train_command(tiny_kit, file_list, output_dir, *extra, entry="train_txt2img_laion400m_trainer.py"):
    """The training command the tests run: the test kit at 32 px, batch 4, a log line per step, seed 5."""
    return [sys.executable, os.path.join(ROOT, entry), "--do_train",
            "--output_dir", str(output_dir), "--pretrained_model_name_or_path", tiny_kit,
            "--unet_name_or_path", os.path.join(tiny_kit, "unet", "config.json"), "--file_list", file_list,
            "--resolution", "32", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--model_max_length", "16", "--num_inference_steps", "2", "--logging_steps", "1", "--seed", "5", *extra]


WEIGHT_FILES = ("unet/diffusion_paddle_model.safetensors", "unet/diffusion_paddle_model.ema.safetensors")


def weight_difference(a_dir, b_dir):
    """(largest |a - b|, ||a - b|| / ||a||) over the UNet and EMA weights of two checkpoints, each the worse of
    the two."""
    import numpy as np
    from safetensors.numpy import load_file

    largest, relative = 0.0, 0.0
    for name in WEIGHT_FILES:
        a, b = load_file(os.path.join(a_dir, name)), load_file(os.path.join(b_dir, name))
        assert a.keys() == b.keys(), name
        x, y = (np.concatenate([t[k].ravel().astype(np.float64) for k in sorted(a)]) for t in (a, b))
        largest = max(largest, float(np.abs(x - y).max()))
        relative = max(relative, float(np.linalg.norm(x - y) / np.linalg.norm(x)))
    return largest, relative
