"""A fixed tiny run must reproduce its stored losses and weights exactly (a refactor may not change them).

An asset ``tests/assets/golden_run.<kind>.json`` holds the first 20 logged losses and digests of the final
UNet and EMA weights of one deterministic CPU run (the test kit, the 72-image demo list, seed 5, one loader
worker), and a fingerprint of those weights: the sum and L2 norm of each tensor. It is only valid for the CPU
stack pinned in requirements.txt; the exact fields only for one kind of CPU: ``<kind>`` is the vendor and the
widest vector instruction set (``AuthenticAMD-avx2``, ``AuthenticAMD-avx512``), because the kernels Paddle and
MKL pick by them round differently (sd/cpu.py).

On a kind with an asset the run must match it bit for bit. On any other kind it is held to every stored asset
within tolerances that the stored kinds bound. The AuthenticAMD-avx2 and -avx512 assets log the same loss
at 8 of the 20 steps and agree in the first 5 of the 8 logged decimals at every step; they differ by at most
1.8e-7 (0.67652625 against 0.67652607 at step 17, relative 2.7e-7). So a loss may differ by ``LOSS_TOLERANCE``
= 1e-6 (about 5× that). For scale: MKL's generic kernels instead of its AVX2 ones on this AMD Zen 4
(``MKL_DEBUG_CPU_TYPE=`` empty) move the losses by up to 6.2e-5, so such a run fails here. Where an asset has a
fingerprint, a tensor's L2 norm may differ by ``WEIGHT_TOLERANCE`` = 1e-5 × max(norm, 1) and its sum by that
× sqrt(size) (the floor of 1 because zero-initialised biases, still of norm < 1e-4 after 20 steps, change by a
large share of it); that MKL run moved them by up to 5.8e-5 on that scale, the tensors of norm >= 1 by up to
4.4e-5 of their norm and the total norm by 5.7e-7.
``SD_GOLDEN_CPU_KIND`` overrides the kind read from /proc/cpuinfo (to check the tolerant path on a kind that
has an asset). After a change that is *meant* to alter the numbers, regenerate the asset of every kind you can
run on that stack and commit them with the reason (an asset left stale fails on its kind):

    python -m tests.integration.test_golden --regenerate      # writes this machine's kind
"""

import copy
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
from safetensors.numpy import load_file

from tests.helpers.common import ASSETS, ROOT, train_command

STEPS = 20
LOSS_TOLERANCE = 1e-6  # absolute, per logged loss, on a kind without an asset (see above)
WEIGHT_TOLERANCE = 1e-5  # relative to max(norm, 1), per tensor norm and sum, on a kind without an asset (see above)
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


def weights_fingerprint(path: str) -> dict:
    """{tensor name: [size, sum, L2 norm]} of a safetensors file (sums in float64): what a run on another kind
    of CPU can be held to within a tolerance."""
    fingerprint = {}
    for name, tensor in sorted(load_file(path).items()):
        values = tensor.astype(np.float64).ravel()
        fingerprint[name] = [int(values.size), float(values.sum()), float(np.linalg.norm(values))]
    return fingerprint


def golden_run(kit: str, file_list: str, output_dir: str) -> dict:
    """Train the fixed configuration and return what the asset stores."""
    r = subprocess.run(train_command(kit, file_list, output_dir, *EXTRA), capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    losses = [line.split(" - loss: ")[1].split(",")[0] for line in log.splitlines() if " - loss: " in line]
    unet = os.path.join(output_dir, f"checkpoint-{STEPS}", "unet")
    files = {"unet": os.path.join(unet, "diffusion_paddle_model.safetensors"),
             "ema": os.path.join(unet, "diffusion_paddle_model.ema.safetensors")}
    result = {"losses": losses, **{key: weights_digest(path) for key, path in files.items()}}
    result.update({f"{key}_fingerprint": weights_fingerprint(path) for key, path in files.items()})
    return result


def cpu_kind(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Vendor and widest vector instruction set of this CPU: what the stored numbers depend on
    (``SD_GOLDEN_CPU_KIND`` overrides it)."""
    from sd.cpu import cpu_description, widest_vector_isa

    if os.environ.get("SD_GOLDEN_CPU_KIND"):
        return os.environ["SD_GOLDEN_CPU_KIND"]
    try:
        with open(cpuinfo) as f:
            vendor, flags = cpu_description(f.read())
    except OSError:
        return "unknown"
    return f"{vendor or 'unknown'}-{widest_vector_isa(flags)}"


def asset_path() -> str:
    return os.path.join(ASSETS, f"golden_run.{cpu_kind()}.json")


def stored_assets() -> dict:
    """{kind: asset} of every golden run stored in tests/assets."""
    return {f[len("golden_run."):-len(".json")]: json.load(open(os.path.join(ASSETS, f)))
            for f in sorted(os.listdir(ASSETS)) if f.startswith("golden_run.") and f.endswith(".json")}


def golden_losses() -> list:
    """This kind's stored losses, else another kind's (they agree to ~1e-6: for tolerance checks)."""
    path = asset_path()
    if not os.path.isfile(path):
        path = os.path.join(ASSETS, sorted(f for f in os.listdir(ASSETS) if f.startswith("golden_run."))[0])
    return json.load(open(path))["losses"]


def differences_beyond_tolerance(got: dict, expected: dict) -> list:
    """What of a run lies outside the tolerances (``LOSS_TOLERANCE``, ``WEIGHT_TOLERANCE``) around an asset
    of another kind of CPU, one line each; empty: within them. Fingerprints count where the asset has them."""
    problems = []
    if len(got["losses"]) != len(expected["losses"]):
        return [f"{len(got['losses'])} losses logged, {len(expected['losses'])} stored"]
    for step, (a, b) in enumerate(zip(got["losses"], expected["losses"]), start=1):
        if abs(float(a) - float(b)) > LOSS_TOLERANCE:
            problems.append(f"loss at step {step}: {a}, stored {b} (tolerance {LOSS_TOLERANCE:g})")
    for key in ("unet_fingerprint", "ema_fingerprint"):
        if key not in expected or key not in got:
            continue
        if got[key].keys() != expected[key].keys():
            problems.append(f"{key}: other tensor names than stored")
            continue
        for name, (size, got_sum, got_norm) in got[key].items():
            _, want_sum, want_norm = expected[key][name]
            scale = max(want_norm, 1.0)
            if abs(got_norm - want_norm) > WEIGHT_TOLERANCE * scale:
                problems.append(f"{key} {name}: norm {got_norm!r}, stored {want_norm!r}")
            if abs(got_sum - want_sum) > WEIGHT_TOLERANCE * size ** 0.5 * scale:  # |sum| <= sqrt(size) * norm
                problems.append(f"{key} {name}: sum {got_sum!r}, stored {want_sum!r}")
    return problems


def test_golden_run(tiny_kit, demo_file_list, tmp_path):
    got = golden_run(tiny_kit, demo_file_list, str(tmp_path / "run"))
    assert len(got["losses"]) == STEPS
    if os.path.isfile(asset_path()):
        expected = json.load(open(asset_path()))
        assert got["losses"] == expected["losses"], "losses changed; see this file's docstring"
        assert got["unet"] == expected["unet"], "final UNet weights changed"
        assert got["ema"] == expected["ema"], "final EMA weights changed"
        for key in ("unet_fingerprint", "ema_fingerprint"):  # assets written before fingerprints lack them
            if key in expected:
                assert got[key] == expected[key], f"{key} changed"
        return
    assets = stored_assets()
    assert assets, f"no golden run stored in {ASSETS}"
    problems = {kind: differences_beyond_tolerance(got, asset) for kind, asset in assets.items()}
    problems = {kind: lines for kind, lines in problems.items() if lines}
    assert not problems, (f"no golden run stored for this kind of CPU ({cpu_kind()}), and this run lies outside the "
                          f"tolerances around stored kinds: {json.dumps(problems, indent=1)[:3000]}")


def test_stored_kinds_lie_within_the_tolerances_of_each_other():
    """The tolerances cover the spread of the kinds measured: each stored asset is within them of every other."""
    assets = stored_assets()
    assert len(assets) >= 2, sorted(assets)
    for kind, asset in assets.items():
        for other, expected in assets.items():
            assert differences_beyond_tolerance(asset, expected) == [], (kind, other)


def test_a_moved_loss_or_weight_lies_outside_the_tolerances():
    asset = json.load(open(os.path.join(ASSETS, "golden_run.AuthenticAMD-avx512.json")))
    assert "unet_fingerprint" in asset and "ema_fingerprint" in asset
    moved = copy.deepcopy(asset)
    moved["losses"][7] = f"{float(asset['losses'][7]) + 0.5 * LOSS_TOLERANCE:.8f}"
    assert differences_beyond_tolerance(moved, asset) == []
    moved["losses"][7] = f"{float(asset['losses'][7]) + 2 * LOSS_TOLERANCE:.8f}"
    assert differences_beyond_tolerance(moved, asset) == [
        f"loss at step 8: {moved['losses'][7]}, stored {asset['losses'][7]} (tolerance {LOSS_TOLERANCE:g})"]
    for key in ("unet_fingerprint", "ema_fingerprint"):
        moved = copy.deepcopy(asset)
        name = "conv_in.weight"
        size, total, norm = asset[key][name]
        moved[key][name] = [size, total, norm + 2 * WEIGHT_TOLERANCE * max(norm, 1.0)]
        assert differences_beyond_tolerance(moved, asset) == [f"{key} {name}: norm {moved[key][name][2]!r}, "
                                                              f"stored {norm!r}"]
        moved[key][name] = [size, total + 2 * WEIGHT_TOLERANCE * size ** 0.5 * max(norm, 1.0), norm]
        assert len(differences_beyond_tolerance(moved, asset)) == 1


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
    text = json.dumps(result, indent=1)
    # a fingerprint's [size, sum, norm] on one line (lists of numbers only: the losses are strings)
    text = re.sub(r'\[\s+([^\["\]]*?)\s+\]', lambda m: "[" + ",".join(x.strip() for x in m.group(1).split(",")) + "]",
                  text)
    with open(asset_path(), "w") as f:
        f.write(text + "\n")
    print(f"wrote {asset_path()}: {len(result['losses'])} losses, last {result['losses'][-1]}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit(__doc__)
    _regenerate()
