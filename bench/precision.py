"""Benchmark: does bf16 (nbtune's default on CPUs with AVX512-BF16/AMX) learn as well as fp32?

    python bench/precision.py [--seeds 42 43] [--steps 30] [--batch-size 8] [--lr 2e-4]

The LoRA job of `throughput.py` through nbtune (at LoRA's default lr 2e-4 unless --lr), for each seed:
`fp32` (precision fp32, fp32 base), `default` (bf16 autocast, bf16 base, fp32 adapter and optimizer,
fp32 sums after frozen layers) and `bf16-plain-sums` (the default without those fp32 sums: what a
plain bf16 autocast does); each run in its own process. Per run: the loss curve, held-out loss (cross-entropy per answer
token on the 64 held-out demo rows) and exact match on them, tokens/s and peak RSS. The question is
whether the fp32 -> bf16 change moves held-out loss and exact match by more than changing the seed does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

from common import MeterObserver, StepMeter, median_min, report, run_child, versions, vmhwm_mb, write_result

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WARMUP_STEPS = 2


def child(precision: str, seed: int, steps: int, batch_size: int, lr: float) -> None:
    import functools

    from throughput import exact_match, heldout_loss

    import nbtune
    import nbtune.engine.training.pipeline as engine_run
    from nbtune.data.demo import demo_splits
    from nbtune.engine.compute.precision import training_speedups

    warnings.simplefilter("ignore")
    train, test = demo_splits()
    meter = StepMeter()

    settings = {"precision": "fp32"} if precision == "fp32" else {}
    if precision == "bf16-plain-sums":  # the default minus the fp32 sums after frozen layers
        engine_run.training_speedups = functools.partial(training_speedups, fp32_sums=False)
    run = nbtune.finetune({"model": MODEL, "method": "lora", "r": 8, "alpha": 16, "dropout": 0.05,
                           "target_modules": "all-linear", "data": train, "steps": steps,
                           "batch_size": batch_size, "lr": lr, "lr_scheduler": "linear", "seed": seed,
                           "metric": "none", "save": False, **settings}, observers=[MeterObserver(meter)])
    peak = vmhwm_mb()
    meter.detach()
    report({"variant": precision, "precision": run.config.precision, "dtype": run.config.dtype, "seed": seed,
            **meter.steady(WARMUP_STEPS), "peak_rss_mb": peak, "losses": [s["loss"] for s in meter.steps],
            "heldout_loss": heldout_loss(run.model, run.tokenizer, test),
            "exact_match": exact_match(run.model, run.tokenizer, test)})


VARIANTS = ("fp32", "default", "bf16-plain-sums")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4, help="LoRA's default; small steps show rounding most")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    job = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    if args.child:
        return child(args.child, args.seed, args.steps, args.batch_size, args.lr)
    pairs = []
    for seed in args.seeds:
        runs = {v: run_child(sys.argv[0], ["--child", v, "--seed", str(seed), *job]) for v in VARIANTS}
        pairs.append({"seed": seed, **runs})
        print(f"seed {seed}: " + ", ".join(f"{v} {r['tokens_per_second']:.0f} tok/s, held-out {r['heldout_loss']:.4f}"
                                           for v, r in runs.items()), flush=True)
    print("\n| seed | variant | precision | base dtype | tokens/s | peak RSS MB | loss step 1 / 10 / last "
          "| held-out loss | exact match |")
    print("|---:|---|---|---|---:|---:|---|---:|---:|")
    for p in pairs:
        for name in VARIANTS:
            r = p[name]
            curve = " / ".join(f"{r['losses'][i]:.3f}" for i in (0, min(9, len(r["losses"]) - 1), -1))
            print(f"| {p['seed']} | {name} | {r['precision']} | {r['dtype']} | {r['tokens_per_second']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {curve} | {r['heldout_loss']:.4f} | {r['exact_match']:.3f} |")
    summary = {
        name: {"tokens_per_second_ratio": median_min([p[name]["tokens_per_second"] / p["fp32"]["tokens_per_second"]
                                                      for p in pairs]),
               "peak_rss_ratio": median_min([p[name]["peak_rss_mb"] / p["fp32"]["peak_rss_mb"] for p in pairs]),
               "heldout_loss_mean": round(statistics.fmean(p[name]["heldout_loss"] for p in pairs), 4),
               "exact_match_mean": round(statistics.fmean(p[name]["exact_match"] for p in pairs), 3)}
        for name in VARIANTS}
    spread = [p["fp32"]["heldout_loss"] for p in pairs]
    summary["fp32_heldout_loss_seed_spread"] = round(max(spread) - min(spread), 4)
    print()
    for name in VARIANTS:
        print(f"{name}: {summary[name]}")
    print(f"fp32 held-out loss spread over seeds: {summary['fp32_heldout_loss_seed_spread']}")
    write_result("precision", {"settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                                            "seeds": args.seeds},
                               "pairs": pairs, "summary": summary, "versions": versions()})


if __name__ == "__main__":
    main()
