"""Samples/s of 1 process vs N data-parallel CPU processes (gloo), same per-process batch, interleaved rounds.

    python -m benchmarks.bench_scaling --nproc 2 --batch_size 4 --rounds 2      # from the repository root

Each round runs ``benchmarks/run_benchmark.py`` once alone and once under
``python -m paddle.distributed.launch --nproc_per_node N``, with the repository on PYTHONPATH; the medians
over rounds are printed as a markdown table. On a 2-core machine N = 2 processes share the cores with each
other (and with anything else running), so the figure bounds, rather than measures, data-parallel scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "run_benchmark.py")


def one(nproc: int, args, extra) -> dict:
    out = tempfile.mktemp(suffix=".json")
    cmd = [SCRIPT, "--kit", args.kit, "--batch_size", str(args.batch_size), "--num_workers", str(args.num_workers),
           "--resolution", str(args.resolution), "--steps", str(args.steps), "--warmup", str(args.warmup), "--json",
           out,
           *extra]
    if nproc > 1:
        cmd = ["-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc),
               "--log_dir", tempfile.mkdtemp(prefix="bench-launch-")] + cmd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode != 0 or not os.path.isfile(out):
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)[0]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", default="reference")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    a, extra = p.parse_known_args(argv)
    runs = {1: [], a.nproc: []}
    for _ in range(a.rounds):
        for n in runs:
            runs[n].append(one(n, a, extra))
    print("| processes | batch / process | global batch | samples/s (median of rounds) | step ms | rounds |")
    print("|---|---|---|---|---|---|")
    base = statistics.median(r["samples_per_s"] for r in runs[1])
    for n, rs in runs.items():
        sps = statistics.median(r["samples_per_s"] for r in rs)
        each = ", ".join(f"{r['samples_per_s']:.1f}" for r in rs)
        print(f"| {n} | {a.batch_size} | {a.batch_size * n} | {sps:.1f} ({sps / base:.2f}×) | "
              f"{1000 * statistics.median(r['step_s'] for r in rs):.0f} | "
              f"{each} |")


if __name__ == "__main__":
    main()
