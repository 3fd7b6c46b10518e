"""benchmarks/bench_dataset.py --per_core: one loader worker's rates, local and over loopback HTTP, and the
workers per GPU they imply."""

import math
import re
import subprocess
import sys

from tests.helpers.common import ROOT


def test_per_core_reports_both_sources_and_workers_that_follow_from_the_rate(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_dataset", "--per_core", "64", "--num_images", "5",
                        "--rounds", "1", "--size", "160", "120", "--content", "detailed", "--needed", "64=20000",
                        "--headroom", "1.5", "--data_dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert re.search(r"^machine: .+; \d{4}-\d\d-\d\d \d\d:\d\d; load average \(1 min\) [\d.]+$", out, re.M), out
    assert "sizes 80×56, 96×72, 120×88, 136×104, 160×120" in out and "quality 90" in out
    rows = re.findall(r"^\| 64 \| (local|HTTP \(loopback\)) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", out,
                      re.M)
    assert [row[0] for row in rows] == ["local", "HTTP (loopback)"], out
    for _, wall, per_cpu, needed, workers in rows:
        wall, per_cpu, workers = float(wall), float(per_cpu), int(workers)
        assert wall > 0 and per_cpu > 0 and float(needed) == 20000
        # the printed rate is rounded to 0.1: the workers lie between what its two ends give
        assert math.ceil(20000 * 1.5 / (per_cpu + 0.05)) <= workers <= math.ceil(20000 * 1.5 / (per_cpu - 0.05)), out
    assert "workers per GPU = ceil(needed × 1.5 / samples per CPU-s)" in out
