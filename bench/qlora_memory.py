"""Benchmark: weight memory, peak RSS and step time of LoRA on a 4-bit NF4, an 8-bit and a bf16 base vs fp32.

    python bench/qlora_memory.py [--repeats 2] [--steps 6] [--batch-size 8]

Four nbtune configs on SmolLM2-135M-Instruct with the demo train rows, the same LoRA (r 8, all linear
layers), seed and batch: `method: lora, precision: fp32` (fp32 base), `method: lora, precision: bf16`
(bf16 base and autocast: nbtune's default on CPUs with AVX512-BF16/AMX), `method: qlora, quantization:
4bit` (NF4, double quantisation, bitsandbytes; fp32 compute) and `method: qlora, quantization: 8bit`
(LLM.int8). Each job runs in its own fresh process, in the order fp32, bf16, 4bit, 8bit, fp32, ...;
ratios are taken within a round.

Per job: weight MB = bytes of every parameter and buffer of the model as training starts, counted as
stored (a 4-bit weight is its packed uint8 data plus its quantisation state: absmax, nested absmax,
code books; an 8-bit one its int8 data plus row scales), split into base and LoRA adapter; RSS when
training starts; peak RSS = VmHWM when training ends; s/step = median of nbtune's step times after the
first 2 steps (those pay for kernel set-up).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from typing import Any

from common import median_min, report, run_child, versions, vmhwm_mb, write_result

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WARMUP_STEPS = 2
VARIANTS: dict[str, dict[str, Any]] = {
    "fp32": {"method": "lora", "quantization": "none", "precision": "fp32", "dtype": "float32"},
    "bf16": {"method": "lora", "quantization": "none", "precision": "bf16", "dtype": "bfloat16"},
    "4bit": {"method": "qlora", "quantization": "4bit"},
    "8bit": {"method": "qlora", "quantization": "8bit"},
}
MB = 2**20


def _quant_tensors(param: Any) -> list[Any]:
    """The tensors a bitsandbytes weight keeps beside its data (they are neither parameters nor buffers)."""
    import torch

    found = []
    state = getattr(param, "quant_state", None)  # Params4bit
    while state is not None:
        found += [t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor)]
        state = getattr(state, "state2", None)  # double quantisation: the absmax values are quantized again
    scales = getattr(param, "SCB", None)  # Int8Params: one fp32 scale per row
    if isinstance(scales, torch.Tensor):
        found.append(scales)
    return found


def stored_mb(model: Any) -> dict[str, float]:
    """Base and adapter MiB of `model`'s parameters and buffers as stored, each tensor counted once."""
    seen: set[int] = set()
    sizes = {"base": 0, "adapter": 0}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        for t in [tensor, *_quant_tensors(tensor)]:
            if t.numel() == 0 or t.data_ptr() in seen:  # tied or shared tensors count once
                continue
            seen.add(t.data_ptr())
            sizes["adapter" if "lora_" in name else "base"] += t.numel() * t.element_size()
    return {"weight_mb": sizes["base"] / MB, "adapter_mb": sizes["adapter"] / MB}


def child(variant: str, steps: int, batch_size: int) -> None:
    import nbtune
    from nbtune.data.demo import demo_splits
    from nbtune.engine.compute.memory import rss_mb

    warnings.simplefilter("ignore")

    class AtStart:
        def __init__(self) -> None:
            self.measured: dict[str, float] = {}

        def on_run_start(self, run: Any) -> None:  # model loaded and wrapped, no step taken yet
            self.measured = {**stored_mb(run.model), "start_rss_mb": rss_mb()}

    start = AtStart()
    # data as a list (not "demo"): no held-out eval loss or generation after training.
    run = nbtune.finetune({"model": MODEL, **VARIANTS[variant], "data": demo_splits()[0], "steps": steps,
                           "batch_size": batch_size, "seed": 42, "metric": "none", "save": False},
                          observers=[start])
    peak = vmhwm_mb()
    if not start.measured or len(run.history) != steps:
        raise RuntimeError(f"{variant}: measured {start.measured}, {len(run.history)} of {steps} steps")
    seconds = [r["step_seconds"] for r in run.history[WARMUP_STEPS:]]
    report({"variant": variant, **start.measured, "peak_rss_mb": peak, "step_seconds": statistics.median(seconds),
            "final_loss": run.history[-1].get("loss")})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    if args.child:
        return child(args.child, args.steps, args.batch_size)
    rounds = []
    for i in range(args.repeats):
        jobs = {v: run_child(sys.argv[0], ["--child", v, "--steps", str(args.steps), "--batch-size",
                                           str(args.batch_size)]) for v in VARIANTS}
        for job in jobs.values():
            job["ratios"] = {k: job[k] / jobs["fp32"][k] for k in ("weight_mb", "peak_rss_mb", "step_seconds")}
        rounds.append(jobs)
        print(f"round {i + 1}: " + ", ".join(f"{v} {j['weight_mb']:.0f} MB weights, {j['peak_rss_mb']:.0f} MB peak, "
                                             f"{j['step_seconds']:.2f} s/step" for v, j in jobs.items()), flush=True)
    print("\n| round | base | weight MB | adapter MB | RSS at start MB | peak RSS MB | s/step | "
          "weights vs fp32 | peak vs fp32 | s/step vs fp32 |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, jobs in enumerate(rounds):
        for v, j in jobs.items():
            r = j["ratios"]
            print(f"| {i + 1} | {v} | {j['weight_mb']:.1f} | {j['adapter_mb']:.1f} | {j['start_rss_mb']:.0f} | "
                  f"{j['peak_rss_mb']:.0f} | {j['step_seconds']:.2f} | {r['weight_mb']:.3f} | {r['peak_rss_mb']:.3f} | "
                  f"{r['step_seconds']:.2f} |")
    summary = {v: {k: median_min([jobs[v]["ratios"][k] for jobs in rounds])
                   for k in ("weight_mb", "peak_rss_mb", "step_seconds")} for v in VARIANTS if v != "fp32"}
    print()
    for v, s in summary.items():
        print(f"{v} / fp32 over {len(rounds)} rounds (median, min): weights {s['weight_mb']['median']} "
              f"({s['weight_mb']['min']}), peak RSS {s['peak_rss_mb']['median']} ({s['peak_rss_mb']['min']}), "
              f"s/step {s['step_seconds']['median']} ({s['step_seconds']['min']})")
    write_result("qlora_memory", {"settings": {"steps": args.steps, "batch_size": args.batch_size,
                                               "warmup_steps_excluded": WARMUP_STEPS, "variants": VARIANTS},
                                  "rounds": rounds, "ratios_vs_fp32": summary, "versions": versions("bitsandbytes")})


if __name__ == "__main__":
    main()
