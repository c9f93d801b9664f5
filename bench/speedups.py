"""Benchmark: what each of nbtune's speed choices is worth, one switched on after another (an ablation).

    python bench/speedups.py [--rounds 2] [--steps 12] [--batch-size 8]

The nbtune LoRA job of `throughput.py` (SmolLM2, r 8 on all linear layers, dropout 0.05, the demo rows),
each variant in its own fresh process, the variants in turn, `--rounds` times; tokens/s over steps 3..N
and the process's peak RSS, each as a ratio to the plain fp32 variant of the same round:

  fp32                 precision fp32, fp32 base, torch's dropout and attention, batches padded to x8
  fp32+dropout         ... with FastDropout for peft's LoRA dropout
  bf16-autocast        Trainer bf16 autocast, fp32 base, no CPU fixes
  bf16-base            ... and the frozen base stored in bf16
  bf16-base+dropout    ... and FastDropout
  bf16-base+dropout+attention  ... and fp32 attention backward under autocast
  all+pad8             ... and fp32 sums after frozen layers (a precision fix, see bench/precision.py)
  default              ... without padding to a multiple of 8: nbtune's default on this CPU
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from common import MeterObserver, StepMeter, median_min, report, run_child, versions, vmhwm_mb, write_result

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WARMUP_STEPS = 2
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32", "dtype": "float32", "dropout": False, "attention": False, "fp32_sums": False,
             "pad": 8},
    "fp32+dropout": {"precision": "fp32", "dtype": "float32", "dropout": True, "attention": False,
                     "fp32_sums": False, "pad": 8},
    "bf16-autocast": {"precision": "bf16", "dtype": "float32", "dropout": False, "attention": False,
                      "fp32_sums": False, "pad": 8},
    "bf16-base": {"precision": "bf16", "dtype": "bfloat16", "dropout": False, "attention": False,
                  "fp32_sums": False, "pad": 8},
    "bf16-base+dropout": {"precision": "bf16", "dtype": "bfloat16", "dropout": True, "attention": False,
                          "fp32_sums": False, "pad": 8},
    "bf16-base+dropout+attention": {"precision": "bf16", "dtype": "bfloat16", "dropout": True, "attention": True,
                                    "fp32_sums": False, "pad": 8},
    "all+pad8": {"precision": None, "dtype": None, "dropout": True, "attention": True, "fp32_sums": True,
                 "pad": 8},
    "default": {"precision": None, "dtype": None, "dropout": True, "attention": True, "fp32_sums": True,
                "pad": None},
}


def child(variant: str, steps: int, batch_size: int) -> None:
    import nbtune
    from nbtune.data.demo import demo_splits
    from nbtune.engine.compute import device

    warnings.simplefilter("ignore")
    spec = VARIANTS[variant]
    policy = device.with_changes(device.policy_for(device.detect()), fast_dropout=spec["dropout"],
                                 fp32_attention_backward=spec["attention"], fp32_sums=spec["fp32_sums"],
                                 pad_to_multiple_of=spec["pad"])
    device.current = lambda: policy  # this process's device policy, one speed-up changed
    meter = StepMeter()

    settings = {k: spec[k] for k in ("precision", "dtype") if spec[k] is not None}
    run = nbtune.finetune({"model": MODEL, "method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                           "target_modules": "all-linear", "data": demo_splits()[0], "steps": steps,
                           "batch_size": batch_size, "lr": 1e-3, "seed": 42, "metric": "none", "save": False,
                           **settings}, observers=[MeterObserver(meter)])
    report({"variant": variant, "precision": run.config.precision, "dtype": run.config.dtype,
            **meter.steady(WARMUP_STEPS), "peak_rss_mb": vmhwm_mb(), "last_loss": meter.steps[-1]["loss"]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    job = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    if args.child:
        return child(args.child, args.steps, args.batch_size)
    rounds = []
    for i in range(args.rounds):
        results = {}
        for name in VARIANTS:
            results[name] = run_child(sys.argv[0], ["--child", name, *job])
            print(f"round {i + 1} {name}: {results[name]['tokens_per_second']:.0f} tok/s, "
                  f"peak {results[name]['peak_rss_mb']:.0f} MB", flush=True)
        rounds.append(results)
    summary = {}
    print("\n| variant | tokens/s (round 1) | vs fp32 (median, min) | peak RSS MB (round 1) | vs fp32 (median, min) |")
    print("|---|---:|---:|---:|---:|")
    for name in VARIANTS:
        speed = median_min([r[name]["tokens_per_second"] / r["fp32"]["tokens_per_second"] for r in rounds])
        memory = median_min([r[name]["peak_rss_mb"] / r["fp32"]["peak_rss_mb"] for r in rounds])
        summary[name] = {"tokens_per_second_ratio": speed, "peak_rss_ratio": memory}
        first = rounds[0][name]
        print(f"| {name} | {first['tokens_per_second']:.0f} | {speed['median']} ({speed['min']}) | "
              f"{first['peak_rss_mb']:.0f} | {memory['median']} ({memory['min']}) |")
    write_result("speedups", {"settings": {"steps": args.steps, "batch_size": args.batch_size},
                              "variants": VARIANTS, "rounds": rounds, "summary": summary,
                              "versions": versions()})


if __name__ == "__main__":
    main()
