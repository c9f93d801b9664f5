"""Benchmark: answering prompts with four LoRA adapters and the base, in one peft mixed batch versus
switching adapters (one batch per adapter), on SmolLM2. Paired A B A B in one process.

    python bench/mixed_generation.py [--repeats 2] [--prompts 8] [--tokens 16]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

from common import versions, write_result


def main() -> None:
    from nbtune.data.demo import demo_splits
    from nbtune.engine.evaluation.adapters import lora_stack, mixed_generate
    from nbtune.engine.evaluation.generation import generate_texts
    from nbtune.engine.workbench import Workbench

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    bench = Workbench()
    runs = [bench.finetune({"name": f"lora{i}", "data": "demo", "steps": 1, "batch_size": 2, "seed": i, "r": 8,
                            "metric": "none", "save": False}) for i in range(4)]
    prompts = [row["prompt"] for row in demo_splits()[1][:args.prompts]]
    stack = lora_stack(runs)
    mixed_times, switch_times = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        mixed = mixed_generate(stack, runs[0].tokenizer, prompts, [r.name for r in runs], max_new_tokens=args.tokens)
        mixed_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        with runs[0].base_disabled():
            switched = {"base": generate_texts(runs[0].model, runs[0].tokenizer, prompts, max_new_tokens=args.tokens)}
        for r in runs:
            switched[r.name] = generate_texts(r.model, r.tokenizer, prompts, max_new_tokens=args.tokens)
        switch_times.append(time.perf_counter() - started)
    same = mixed == switched
    ratios = [m / s for m, s in zip(mixed_times, switch_times, strict=True)]
    print(f"mixed batch {statistics.median(mixed_times):.2f} s, switching {statistics.median(switch_times):.2f} s, "
          f"mixed/switching median {statistics.median(ratios):.2f}; identical answers: {same}")
    write_result("mixed_generation", {"mixed_s": mixed_times, "switching_s": switch_times,
                                      "ratio_median": statistics.median(ratios), "identical_answers": same,
                                      "prompts": args.prompts, "new_tokens": args.tokens, "adapters": 4,
                                      "versions": versions()})


if __name__ == "__main__":
    main()
