"""Benchmark: what the live panel costs a training step, paired against headless runs in one process.

    python bench/panel_overhead.py [--steps 8] [--repeats 3]

Runs alternate headless / with the panel on SmolLM2 (the demo task, batch 4). Widget messages go to a
recording comm, as a kernel would send them to the browser, to count updates per second and bytes per
second. The step time is the median of steps 2..N of each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from common import versions, write_result

SENT: list[int] = []


class CountingComm:
    """Takes the place of the kernel's comm: counts the bytes each widget update would send."""

    def __init__(self, *args, **kwargs):
        self.comm_id, self.kernel = "bench", object()

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        SENT.append(len(json.dumps(data, default=str)))

    def send(self, data=None, metadata=None, buffers=None):
        self.publish_msg("comm_msg", data)

    def open(self, *a, **k):
        pass

    def close(self, *a, **k):
        pass

    def on_msg(self, callback):
        pass

    def on_close(self, callback):
        pass


def step_seconds(run) -> float:
    return statistics.median(r["step_seconds"] for r in run.history[1:])


def main() -> None:
    import warnings

    import comm

    from nbtune.engine.workbench import Workbench
    from nbtune.widgets.panel import LivePanel

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    comm.create_comm = CountingComm
    bench = Workbench()
    config = {"data": "demo", "steps": args.steps, "batch_size": 4, "metric": "none", "save": False}
    bench.finetune({**config, "name": "warm-up", "steps": 2})
    ratios, rates, byte_rates = [], [], []
    for i in range(args.repeats):
        headless = bench.finetune({**config, "name": f"headless-{i}"})
        panel = LivePanel(interactive_stop=True)
        SENT.clear()
        started = time.perf_counter()
        with_panel = bench.finetune({**config, "name": f"panel-{i}"}, observers=[panel])
        seconds = time.perf_counter() - started
        ratios.append(step_seconds(with_panel) / step_seconds(headless))
        rates.append(panel.renders / seconds)
        byte_rates.append(sum(SENT) / seconds)
    result = {"overhead_median": round(statistics.median(ratios) - 1, 4), "overhead_min": round(min(ratios) - 1, 4),
              "redraws_per_second": round(max(rates), 2), "bytes_per_second": round(max(byte_rates)),
              "ratios": [round(r, 4) for r in ratios], "versions": versions("ipywidgets")}
    print(f"step time with panel / headless: median {statistics.median(ratios):.4f}, min {min(ratios):.4f}")
    print(f"redraws per second (max over runs): {result['redraws_per_second']}, "
          f"bytes per second to the frontend: {result['bytes_per_second']}")
    write_result("panel_overhead", result)


if __name__ == "__main__":
    main()
