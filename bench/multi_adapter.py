"""Benchmark: peak RSS of one run vs four runs of four methods in one kernel (one shared base).

    python bench/multi_adapter.py [--repeats 2]

Each measurement is a fresh process (peak RSS never goes down within one): A trains one LoRA run,
B trains LoRA, IA3, prefix tuning and Houlsby adapters one after another through the workbench and
keeps all four. A and B alternate; the ratio is B's peak over A's, per pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import versions, write_result

METHODS = [("lora", {}), ("ia3", {}), ("prefix", {"num_virtual_tokens": 8}), ("houlsby", {})]

CHILD = """
import json, resource, sys, warnings
warnings.simplefilter("ignore")
from nbtune.engine.workbench import Workbench
bench = Workbench()
for i, (method, options) in enumerate(json.loads(sys.argv[1])):
    bench.finetune({"name": f"run{i}", "method": method, "data": "demo", "steps": 3, "batch_size": 4,
                    "metric": "none", "save": False, **options})
alive = sum(run.model is not None for run in bench.runs.values())
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "runs_alive": alive}))
"""


def measure(methods: list) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(methods)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    pairs = []
    for _ in range(args.repeats):
        one, four = measure(METHODS[:1]), measure(METHODS)
        pairs.append({"one_mb": round(one["peak_mb"]), "four_mb": round(four["peak_mb"]),
                      "ratio": round(four["peak_mb"] / one["peak_mb"], 3), "runs_alive": four["runs_alive"]})
        print(pairs[-1], flush=True)
    ratios = [p["ratio"] for p in pairs]
    print(f"four runs / one run peak RSS: median {statistics.median(ratios)}, max {max(ratios)}")
    write_result("multi_adapter", {"pairs": pairs, "median_ratio": statistics.median(ratios),
                                   "max_ratio": max(ratios), "methods": [m for m, _ in METHODS],
                                   "versions": versions()})


if __name__ == "__main__":
    main()
