"""Benchmark: seconds from the start of a `%%finetune` run to its first optimizer step, cold (first run in
a kernel: the base is loaded) and warm (the workbench's cached base), on SmolLM2 with the demo task.

    python bench/warm_start.py [--repeats 3] [--batch-size 8]

Reported per run: `setup_s` (call -> training starts: config, data, tokenising, base view, Trainer),
`first_step_s` (call -> first optimizer step done, which includes that step's own compute) and
`next_step_s` (how long the second step took: one step's compute at this batch size, all rows of the demo
task being 64-69 tokens long), so that `first_step_s - next_step_s` is the wait that is not the step.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import versions, write_result


class Clock:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.setup = self.first_step = self.next_step = None

    def on_run_start(self, run):
        self.setup = time.perf_counter() - self.started

    def on_step(self, run, record):
        now = time.perf_counter() - self.started
        if self.first_step is None:
            self.first_step = now
        elif self.next_step is None:
            self.next_step = now - self.first_step
            run.stop()  # two steps are all this measures


def one_run(bench, name: str, batch_size: int) -> dict[str, float]:
    clock = Clock()
    bench.finetune({"name": name, "data": "demo", "steps": 50, "batch_size": batch_size, "metric": "none",
                    "save": False}, observers=[clock])
    return {"setup_s": round(clock.setup, 2), "first_step_s": round(clock.first_step, 2),
            "next_step_s": round(clock.next_step, 2)}


def main() -> None:
    import warnings

    from nbtune.engine.bases.loading import resolve_model
    from nbtune.engine.workbench import Workbench

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    resolve_model("default")  # the one-off GGUF conversion is not a kernel's cold start
    bench = Workbench()
    cold = one_run(bench, "cold", args.batch_size)
    warm = [one_run(bench, f"warm-{i}", args.batch_size) for i in range(args.repeats)]
    result = {"cold": cold, "warm": warm, "batch_size": args.batch_size,
              "warm_setup_median_s": statistics.median(w["setup_s"] for w in warm),
              "warm_first_step_median_s": statistics.median(w["first_step_s"] for w in warm),
              "warm_next_step_median_s": statistics.median(w["next_step_s"] for w in warm),
              "versions": versions()}
    for label, r in [("cold", cold)] + [(f"warm {i}", w) for i, w in enumerate(warm)]:
        print(f"{label}: setup {r['setup_s']} s, first step done {r['first_step_s']} s, "
              f"next step took {r['next_step_s']} s")
    write_result("warm_start" if args.batch_size == 8 else f"warm_start_b{args.batch_size}", result)


if __name__ == "__main__":
    main()
