"""The benchmark scripts still run against the current engine (tiny settings; the numbers are not checked
here, only that each script completes and writes its JSON). Results go to a temporary folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = [
    ("methods", ["--only", "ia3", "--steps", "2", "--repeats", "1"]),
    ("warm_start", ["--repeats", "1", "--batch-size", "1"]),
    ("processes", ["--pairs", "1", "--steps", "2"]),
    ("scaling_table", ["--gpus", "2"]),
    ("gpu_throughput", ["--shape", "tiny", "--steps", "3", "--pairs", "1", "--methods", "qlora",
                        "--variants", "fp32_sums=false"]),
    ("eval_cost", ["--steps", "1", "--rows", "4", "--repeats", "1"]),
    ("throughput", ["--against", str(REPO), "--pairs", "1", "--steps", "3", "--no-metric"]),  # A/B of two checkouts
]


@pytest.mark.parametrize(("script", "args"), SCRIPTS, ids=[s for s, _ in SCRIPTS])
def test_bench_script_runs_and_writes_its_result(tmp_path, script, args):
    env = {**os.environ, "NBTUNE_BENCH_RESULTS": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list(tmp_path.glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["bench"] == written[0].stem
