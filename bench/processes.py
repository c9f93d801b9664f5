"""Benchmark: one run in 1 process vs the same run in 2 processes (accelerate DDP from the kernel, the
`%%finetune --processes 2` path), same global batch, on SmolLM2 with the demo task.

    python bench/processes.py [--pairs 3] [--steps 10]

Paired in one kernel (1, 2, 1, 2, ...) after a warm-up run: tokens/s of each (counted over all
processes), their ratio, the launch overhead (wall time of the call minus the training time), and the
largest per-step loss difference between the two (fp32, no dropout, so they can agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import cpu_name, versions, write_result


def one(bench, processes: int, steps: int) -> dict[str, float]:
    config = {"name": f"p{processes}", "data": "demo", "steps": steps, "batch_size": 8 // processes,
              "num_processes": processes, "metric": "none", "save": False, "precision": "fp32", "dropout": 0.0}
    started = time.perf_counter()
    run = bench.finetune(config)
    wall = time.perf_counter() - started
    return {"tokens_per_second": run.metrics["tokens_per_second"], "wall_s": round(wall, 2),
            "train_s": run.metrics["train_seconds"], "losses": [r["loss"] for r in run.history]}


def main() -> None:
    import warnings

    from nbtune.engine.workbench import Workbench

    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    bench = Workbench()
    one(bench, 1, 2)  # loads and caches the base, tokenises the data
    pairs = []
    for _ in range(args.pairs):
        a, b = one(bench, 1, args.steps), one(bench, 2, args.steps)
        pairs.append({"one": a, "two": b, "tokens_per_second_ratio": b["tokens_per_second"] / a["tokens_per_second"],
                      "max_loss_difference": max(abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True))})
        print(f"1 process {a['tokens_per_second']:.0f} tok/s ({a['wall_s']} s), 2 processes "
              f"{b['tokens_per_second']:.0f} tok/s ({b['wall_s']} s, of which training {b['train_s']} s); "
              f"ratio {pairs[-1]['tokens_per_second_ratio']:.3f}, max loss difference "
              f"{pairs[-1]['max_loss_difference']:.2e}")
    ratios = [p["tokens_per_second_ratio"] for p in pairs]
    result = {"pairs": pairs, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
              "max_loss_difference": max(p["max_loss_difference"] for p in pairs), "cpu": cpu_name(),
              "versions": versions()}
    print(f"2 processes / 1 process tokens/s: median {result['ratio_median']:.3f}, min {result['ratio_min']:.3f}")
    write_result("processes", result)


if __name__ == "__main__":
    main()
