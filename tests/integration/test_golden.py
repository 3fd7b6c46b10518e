"""A fixed tiny run must reproduce its stored losses and weights exactly (a refactor may not change them).

An asset ``tests/assets/golden_run.<kind>.json`` holds the first 20 logged losses and digests of the final
UNet and EMA weights of one deterministic CPU run (the test kit, the 72-image demo list, seed 5, one loader
worker). It is only valid for the CPU stack pinned in requirements.txt and for one kind of CPU: ``<kind>`` is
the vendor and the widest vector instruction set (``AuthenticAMD-avx2``, ``AuthenticAMD-avx512``), because
the kernels Paddle and MKL pick by them round differently (sd/cpu.py). On a kind with no asset the test
skips and says so. After a change that is *meant* to alter the numbers, regenerate the asset of every kind
you can run on that stack and commit them with the reason (an asset left stale fails on its kind):

    python -m tests.integration.test_golden --regenerate      # writes this machine's kind
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers.common import ASSETS, ROOT, train_command

STEPS = 20
EXTRA = ("--max_steps", str(STEPS), "--save_steps", str(STEPS), "--use_ema", "True", "--report_to", "none",
         "--image_logging_steps", "0", "--dataloader_num_workers", "1")


def weights_digest(path: str) -> str:
    """sha256 over the tensors of a safetensors file, in key order (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    tensors = load_file(path)
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def golden_run(kit: str, file_list: str, output_dir: str) -> dict:
    """Train the fixed configuration and return what the asset stores."""
    r = subprocess.run(train_command(kit, file_list, output_dir, *EXTRA), capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    losses = [line.split(" - loss: ")[1].split(",")[0] for line in log.splitlines() if " - loss: " in line]
    unet = os.path.join(output_dir, f"checkpoint-{STEPS}", "unet")
    return {"losses": losses,
            "unet": weights_digest(os.path.join(unet, "diffusion_paddle_model.safetensors")),
            "ema": weights_digest(os.path.join(unet, "diffusion_paddle_model.ema.safetensors"))}


def cpu_kind(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Vendor and widest vector instruction set of this CPU: what the stored numbers depend on."""
    from sd.cpu import cpu_description, widest_vector_isa

    try:
        with open(cpuinfo) as f:
            vendor, flags = cpu_description(f.read())
    except OSError:
        return "unknown"
    return f"{vendor or 'unknown'}-{widest_vector_isa(flags)}"


def asset_path() -> str:
    return os.path.join(ASSETS, f"golden_run.{cpu_kind()}.json")


def golden_losses() -> list:
    """This kind's stored losses, else another kind's (they agree to ~1e-6: for tolerance checks)."""
    path = asset_path()
    if not os.path.isfile(path):
        path = os.path.join(ASSETS, sorted(f for f in os.listdir(ASSETS) if f.startswith("golden_run."))[0])
    return json.load(open(path))["losses"]


def test_golden_run(tiny_kit, demo_file_list, tmp_path):
    if not os.path.isfile(asset_path()):
        pytest.skip(f"no golden run stored for this kind of CPU ({cpu_kind()}): `python tests/integration/test_golden.py "
                    f"--regenerate` writes {os.path.relpath(asset_path(), ROOT)}")
    expected = json.load(open(asset_path()))
    got = golden_run(tiny_kit, demo_file_list, str(tmp_path / "run"))
    assert len(got["losses"]) == STEPS
    assert got["losses"] == expected["losses"], "losses changed; see this file's docstring"
    assert got["unet"] == expected["unet"], "final UNet weights changed"
    assert got["ema"] == expected["ema"], "final EMA weights changed"


def _regenerate() -> None:
    """Build the test kit and demo list with the session fixtures' own code, run, and write the asset."""
    import tempfile
    from pathlib import Path

    from tests import conftest

    class _Folders:  # the one method of pytest's tmp_path_factory that the fixtures use
        def __init__(self, root):
            self.root = Path(root)

        def mktemp(self, name):
            folder = self.root / name
            folder.mkdir()
            return folder

    with tempfile.TemporaryDirectory() as tmp:
        folders = _Folders(tmp)
        kit = conftest.tiny_kit.__wrapped__(folders)
        file_list = conftest.demo_file_list.__wrapped__(folders)
        result = golden_run(kit, file_list, os.path.join(tmp, "run"))
    with open(asset_path(), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {asset_path()}: {len(result['losses'])} losses, last {result['losses'][-1]}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    _regenerate()
