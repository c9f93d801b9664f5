"""Benchmark: achieved training FLOP/s of an nbtune run vs this machine's measured matmul FLOP/s.

    python bench/roofline.py [--chunks 3] [--chunk-steps 10] [--batch-size 8] [--tokens 512] [--reps 5]

Roofline: torch.matmul GFLOP/s (median of --reps timed calls after a warm-up call, torch's default
threads) in fp32 and bf16, for (a) the GEMMs of one SmolLM2 training step at --tokens rows: each linear
layer's forward (T x in)@(in x out) and its input-gradient (T x out)@(out x in), weighted by how often
a step runs them (the "model-shaped" peak: their total FLOPs over their total time), and (b) a 2048^3
square GEMM, the best case.

Achieved: one nbtune run (LoRA by default) on the demo rows; its steps are timed in chunks of
--chunk-steps after 2 warm-up steps, and a roofline round is measured before the first chunk and after
every chunk (inside the run, the step clock paused), so each chunk is compared with the mean of the two
rounds around it: the machine's speed drifts. FLOPs per step = (4 x all params + 2 x trainable params)
x padded tokens: forward 2N, backward input-gradients 2N for every layer, weight gradients 2N only for
the trainable ones (so full fine-tuning gives the usual 6N). Padded tokens (input_ids numel), since
padding costs compute; params counted once each, so the tied embedding counts once, as the LM head
(a lookup costs no FLOPs). Attention score/value products and the LoRA GEMMs' own shapes are not in
the roofline (about 2% of the FLOPs at ~70-token rows).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

from common import StepMeter, median_min, versions, write_result

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
WARMUP_STEPS = 2
SQUARE = 2048


def step_gemms(config: Any) -> dict[tuple[int, int], int]:
    """(in, out) of every weight GEMM in one training step -> how many times it runs (rows = tokens)."""
    h, i, v, layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    kv = config.num_key_value_heads * getattr(config, "head_dim", h // config.num_attention_heads)
    forward = {(h, h): 2 * layers, (h, kv): 2 * layers, (h, i): 2 * layers, (i, h): layers, (h, v): 1}
    counts: dict[tuple[int, int], int] = {}
    for (k, n), count in forward.items():  # forward x@W, then the input gradient dY@W^T: (out, in)
        counts[(k, n)] = counts.get((k, n), 0) + count
        counts[(n, k)] = counts.get((n, k), 0) + count
    return counts


def gflops(m: int, k: int, n: int, dtype: Any, reps: int) -> float:
    """Median GFLOP/s of torch.matmul((m x k), (k x n)) over at least `reps` calls after warm-up calls."""
    import torch

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.matmul(a, b)  # warm-up: oneDNN builds its kernel for this shape
    started = time.perf_counter()
    torch.matmul(a, b)
    once = time.perf_counter() - started
    times = []
    for _ in range(max(reps, min(100, int(0.05 / once)))):  # small GEMMs: enough calls for a steady median
        started = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - started)
    return 2 * m * k * n / statistics.median(times) / 1e9


def roofline_round(gemms: dict[tuple[int, int], int], tokens: int, reps: int) -> dict[str, Any]:
    """One measurement of every shape in fp32 and bf16, and the model-shaped and square peaks."""
    import torch

    out: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        shapes = {f"{tokens}x{k}x{n}": gflops(tokens, k, n, dtype, reps) for k, n in gemms}
        flops = {f"{tokens}x{k}x{n}": 2 * tokens * k * n * count for (k, n), count in gemms.items()}
        seconds = sum(flops[s] / (shapes[s] * 1e9) for s in shapes)  # a step's GEMMs at these speeds
        out[name] = {"model_gflops": sum(flops.values()) / seconds / 1e9,
                     "square_gflops": gflops(SQUARE, SQUARE, SQUARE, dtype, reps), "shapes": shapes}
    return out


class Interleaver:
    """nbtune observer: times steps with a StepMeter and measures a roofline round at each chunk boundary."""

    def __init__(self, gemms: dict[tuple[int, int], int], tokens: int, reps: int, chunk: int) -> None:
        self.gemms, self.tokens, self.reps, self.chunk = gemms, tokens, reps, chunk
        self.meter = StepMeter()
        self.rounds: list[dict[str, Any]] = []
        self.params: dict[str, int] = {}

    def on_run_start(self, run: Any) -> None:
        unique = list(run.model.parameters())  # parameters() yields a tied tensor once
        self.params = {"all": sum(p.numel() for p in unique),
                       "trainable": sum(p.numel() for p in unique if p.requires_grad)}
        self.meter.attach(run.model)

    def on_step(self, run: Any, record: dict[str, Any]) -> None:
        self.meter.step_end(record.get("loss"))
        step = record["step"]
        if step >= WARMUP_STEPS and (step - WARMUP_STEPS) % self.chunk == 0:
            self.rounds.append(roofline_round(self.gemms, self.tokens, self.reps))
            print(f"step {step}: fp32 model-shaped {self.rounds[-1]['fp32']['model_gflops']:.1f} GFLOP/s, "
                  f"square {self.rounds[-1]['fp32']['square_gflops']:.1f}", flush=True)
            self.meter.restart_clock()  # the matmuls are not training time


def main() -> None:
    import torch
    from transformers import AutoConfig

    import nbtune
    from nbtune.data.demo import demo_splits
    from nbtune.engine.bases.loading import resolve_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--chunk-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="GEMM rows (batch x sequence) of the roofline")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--method", default="lora")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="default: nbtune's default on this machine")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    gemms = step_gemms(AutoConfig.from_pretrained(resolve_model(MODEL)))
    probe = Interleaver(gemms, args.tokens, args.reps, args.chunk_steps)
    steps = WARMUP_STEPS + args.chunks * args.chunk_steps
    precision = {"precision": args.precision} if args.precision else {}
    run = nbtune.finetune({"model": MODEL, "method": args.method, "data": demo_splits()[0], "steps": steps,
                           "batch_size": args.batch_size, "metric": "none", "save": False, **precision},
                          observers=[probe])
    used = run.config.precision  # the roofline is that of the precision the GEMMs ran in
    if len(probe.rounds) != args.chunks + 1 or len(probe.meter.steps) != steps:
        raise RuntimeError(f"{len(probe.rounds)} roofline rounds and {len(probe.meter.steps)} steps measured; "
                           f"expected {args.chunks + 1} and {steps} (an observer error is only a warning)")
    flops_per_token = 4 * probe.params["all"] + 2 * probe.params["trainable"]
    chunks = []
    for c in range(args.chunks):
        steps_in = probe.meter.steps[WARMUP_STEPS + c * args.chunk_steps:WARMUP_STEPS + (c + 1) * args.chunk_steps]
        seconds = sum(s["seconds"] for s in steps_in)
        padded = sum(s["padded_tokens"] for s in steps_in)
        achieved = flops_per_token * padded / seconds / 1e9
        around = probe.rounds[c:c + 2]  # the rounds just before and just after this chunk
        model_peak = statistics.fmean(r[used]["model_gflops"] for r in around)
        square_peak = statistics.fmean(r[used]["square_gflops"] for r in around)
        fp32_peak = statistics.fmean(r["fp32"]["model_gflops"] for r in around)
        chunks.append({"chunk": c + 1, "steps": len(steps_in), "padded_tokens_per_second": padded / seconds,
                       "tokens_per_second": sum(s["tokens"] for s in steps_in) / seconds,
                       "achieved_gflops": achieved, "model_peak_gflops": model_peak,
                       "square_peak_gflops": square_peak, "of_model_peak": achieved / model_peak,
                       "of_square_peak": achieved / square_peak, "of_fp32_model_peak": achieved / fp32_peak})

    measured = probe.meter.steps[WARMUP_STEPS:]
    mean_padded = statistics.fmean(s["padded_tokens"] for s in measured)
    print(f"\n{probe.params['all']:,} params ({probe.params['trainable']:,} trainable), "
          f"{flops_per_token / 1e6:.1f} MFLOP per padded token; {torch.get_num_threads()} threads; "
          f"{mean_padded:.0f} padded tokens per step (roofline GEMMs: {args.tokens} rows)")
    print(f"\nprecision of the run: {used} (base weights {run.config.dtype})")
    print(f"\n| chunk | padded tok/s | achieved GFLOP/s | {used} model-shaped peak | of it | {used} square peak "
          "| of it | of the fp32 model-shaped peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in chunks:
        print(f"| {c['chunk']} | {c['padded_tokens_per_second']:.0f} | {c['achieved_gflops']:.1f} | "
              f"{c['model_peak_gflops']:.1f} | {100 * c['of_model_peak']:.1f}% | {c['square_peak_gflops']:.1f} | "
              f"{100 * c['of_square_peak']:.1f}% | {100 * c['of_fp32_model_peak']:.1f}% |")
    print(f"\nGEMM speeds, median of {len(probe.rounds)} rounds (last two rows: median of each round's figure):\n")
    print("| GEMM (rows x in x out) | per step | fp32 GFLOP/s | bf16 GFLOP/s |")
    print("|---|---:|---:|---:|")
    shape_rows = {}
    for (k, n), count in gemms.items():
        key = f"{args.tokens}x{k}x{n}"
        shape_rows[key] = {d: statistics.median(r[d]["shapes"][key] for r in probe.rounds) for d in ("fp32", "bf16")}
        print(f"| {key} | {count} | {shape_rows[key]['fp32']:.1f} | {shape_rows[key]['bf16']:.1f} |")
    for label, field in (("model-shaped (weighted)", "model_gflops"), (f"square {SQUARE}^3", "square_gflops")):
        fp32, bf16 = (statistics.median(r[d][field] for r in probe.rounds) for d in ("fp32", "bf16"))
        print(f"| {label} | - | {fp32:.1f} | {bf16:.1f} |")
    of_model = median_min([c["of_model_peak"] for c in chunks])
    of_square = median_min([c["of_square_peak"] for c in chunks])
    of_fp32 = median_min([c["of_fp32_model_peak"] for c in chunks])
    print(f"\nachieved / {used} model-shaped peak: median {of_model['median']:.3f}, min {of_model['min']:.3f}; "
          f"achieved / {used} square peak: median {of_square['median']:.3f}, min {of_square['min']:.3f}; "
          f"achieved / fp32 model-shaped peak: median {of_fp32['median']:.3f}")
    settings = {**vars(args), "warmup_steps": WARMUP_STEPS, "threads": torch.get_num_threads(),
                "flops_per_padded_token": flops_per_token, "params": probe.params,
                "mean_padded_tokens_per_step": mean_padded, "precision": used, "dtype": run.config.dtype}
    write_result("roofline", {"settings": settings,
                              "chunks": chunks, "rounds": probe.rounds, "shapes_median": shape_rows,
                              "of_model_peak": of_model, "of_square_peak": of_square, "of_fp32_model_peak": of_fp32,
                              "versions": versions()})


if __name__ == "__main__":
    main()
