"""Benchmark: every registered method on SmolLM2-135M-Instruct against LoRA, paired in one process.

    python bench/methods.py [--steps 4] [--repeats 2] [--only lora,dora]

For each method: trainable parameters, size of what it saves, and seconds per optimizer step
relative to LoRA (runs alternate LoRA, method, LoRA, method ...; the first step of each run is left
out, it pays for kernel set-up). Prints a markdown table and writes bench/results/methods.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

from common import versions, write_result

SETTINGS = {"steps": 4, "batch_size": 4, "metric": "none", "lr_scheduler": "constant", "seed": 0}
OPTIONS: dict[str, dict[str, Any]] = {  # what a method needs beyond its defaults to run on SmolLM2
    "peft": {"peft_type": "vera", "peft_args": {"r": 64, "target_modules": ["q_proj", "v_proj"]}},
    "adalora": {"init_r": 12, "target_r": 8},
}
SKIP = {"bitfit": "SmolLM2 has no bias terms", "moe": "needs a mixture-of-experts model"}


def _step_seconds(run: Any) -> float:
    return statistics.median(r["step_seconds"] for r in run.history[1:])


def measure(method: str, rows: list[dict[str, Any]], steps: int, repeats: int, out: Path) -> dict[str, Any]:
    import nbtune
    from nbtune.engine.evaluation.compare import adapter_mb

    ratios, run = [], None
    for i in range(repeats):
        lora = nbtune.finetune(data=rows, method="lora", save=False, **{**SETTINGS, "steps": steps})
        run = nbtune.finetune(data=rows, method=method, output_dir=str(out / f"{method}-{i}"),
                              **{**SETTINGS, "steps": steps}, **OPTIONS.get(method, {}))
        ratios.append(_step_seconds(run) / _step_seconds(lora))
    return {
        "method": method,
        "trainable_params": run.metrics["trainable_params"],
        "trainable_percent": run.metrics["trainable_percent"],
        "saved_mb": adapter_mb(run),
        "step_vs_lora_median": round(statistics.median(ratios), 2),
        "step_vs_lora_min": round(min(ratios), 2),
        "step_seconds": round(_step_seconds(run), 2),
        "peak_rss_mb": run.metrics["peak_rss_mb"],
    }


def main() -> None:
    import nbtune
    from nbtune.data.demo import demo_splits

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated methods")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    rows = demo_splits()[0][:64]
    names = [m for m in nbtune.methods().names() if m not in SKIP]
    if args.only:
        names = [m for m in names if m in args.only.split(",")]
    table = []
    with tempfile.TemporaryDirectory(prefix="nbtune-bench-methods-") as tmp:
        # Saves go to a scratch folder, which nbtune only writes into when it is named a workspace.
        os.environ["NBTUNE_WORKSPACE"] = os.pathsep.join(filter(None, [os.environ.get("NBTUNE_WORKSPACE"), tmp]))
        for method in names:
            table.append(measure(method, rows, args.steps, args.repeats, Path(tmp)))
            row = table[-1]
            print(f"{method}: {row['trainable_params']} params, {row['saved_mb']} MB, "
                  f"{row['step_vs_lora_median']}x LoRA step", flush=True)
    print("\n| method | trainable params | % | saved MB | s/step vs LoRA (median, min) | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | {r['saved_mb']} | "
              f"{r['step_vs_lora_median']} ({r['step_vs_lora_min']}) | {r['peak_rss_mb']:.0f} |")
    for method, why in SKIP.items():
        print(f"| {method} | - | - | - | skipped: {why} | - |")
    write_result("methods", {"settings": {**SETTINGS, "steps": args.steps, "repeats": args.repeats},
                             "rows": table, "skipped": SKIP, "versions": versions("bitsandbytes")})


if __name__ == "__main__":
    main()
