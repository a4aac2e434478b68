"""The benchmarks run (CPU-sized) and print one JSON line with both paths."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_env


@pytest.mark.parametrize("script,extra", [("train.py", ["--iters", "2", "--warmup", "1", "--batch", "2"]),
                                          ("infer.py", ["--images", "2", "--warmup", "1"])])
def test_bench_prints_one_json_line(tmp_path, script, extra):
    env = {**run_env(tmp_path), "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["parity"]["images_per_s"] > 0 and out["fast"]["images_per_s"] > 0 and out["speedup"] > 0
