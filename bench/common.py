"""Shared bits of the benchmarks: machine description, package versions, writing results."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # nbtune from a checkout on PYTHONPATH (the GPU machine), not installed
            return "checkout" if name == "nbtune" else "missing"

    return {name: installed(name) for name in ("torch", "transformers", "peft", "nbtune", *names)}


def write_result(name: str, result: dict[str, Any]) -> Path:
    result = {"bench": name, "cpu": cpu_name(), "cores": os.cpu_count(), **result}
    # NBTUNE_BENCH_RESULTS: somewhere else (the smoke tests run the scripts without touching the results here)
    out = Path(os.environ.get("NBTUNE_BENCH_RESULTS") or Path(__file__).parent / "results") / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- helpers for the subprocess benchmarks
RESULT_MARK = "BENCH-RESULT "  # the child's result line; everything else a child prints is ignored


def vmhwm_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB: exact, unlike a sampling thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def report(result: dict[str, Any]) -> None:
    """Child side: hand one JSON result to the parent (see `run_child`)."""
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], *, nbtune_from: str | None = None) -> dict[str, Any]:
    """Run `python <script> <args>` in a fresh process (its own peak RSS, its own oneDNN kernel cache) and
    return the dict it `report`ed; its stderr is shown if it fails. `nbtune_from`: a checkout whose nbtune
    the child imports instead of this one (an A/B of two versions)."""
    import os
    import subprocess
    import sys

    env = None
    if nbtune_from is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([nbtune_from, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def median_min(values: list[float], digits: int = 3) -> dict[str, float]:
    import statistics

    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits)}


def encode(tokenizer: Any, row: dict[str, str]) -> dict[str, list[int]]:
    """A row as a user's script tokenises it: chat template, loss only on the answer's tokens."""
    prompt = [{"role": "user", "content": row["prompt"]}]
    full = [*prompt, {"role": "assistant", "content": row["completion"]}]
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(tokenizer.apply_chat_template(full, tokenize=False), add_special_tokens=False)["input_ids"]
    masked = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * masked + ids[masked:]}


class StepMeter:
    """Tokens and wall time per optimizer step, measured the same way whoever runs the training loop.

    A forward pre-hook on the model counts, for each training forward, the real tokens (attention_mask
    sum) and the padded ones (input_ids numel); `step_end` is called once per optimizer step (from a
    Trainer `on_log` or an nbtune `on_step`, the same point of the loop) and closes a step record.
    Assumes one forward per step (grad_accum 1).
    """

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.steps: list[dict[str, float]] = []
        self._mark = self._clock()
        self._real = self._padded = 0
        self._hook: Any = None

    def attach(self, model: Any) -> None:
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self.restart_clock()

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def restart_clock(self) -> None:
        """Start the next step's time now (after work between steps that must not count, e.g. a matmul)."""
        self._mark = self._clock()

    def _count(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return  # generation and evaluation forwards are not training throughput
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self._padded += int(ids.numel())
        self._real += int(mask.sum()) if mask is not None else int(ids.numel())

    def step_end(self, loss: float | None) -> None:
        now = self._clock()
        self.steps.append({"seconds": now - self._mark, "tokens": self._real, "padded_tokens": self._padded,
                           "loss": float("nan") if loss is None else float(loss)})
        self._mark, self._real, self._padded = now, 0, 0

    def steady(self, skip: int) -> dict[str, float]:
        """Throughput over the steps after the first `skip` (those pay for oneDNN kernel creation)."""
        import statistics

        kept = self.steps[skip:]
        if not kept:
            raise RuntimeError(f"only {len(self.steps)} steps were measured; need more than {skip}")
        seconds = sum(s["seconds"] for s in kept)
        return {"steps_measured": len(kept), "seconds": seconds,
                "tokens_per_second": sum(s["tokens"] for s in kept) / seconds,
                "padded_tokens_per_second": sum(s["padded_tokens"] for s in kept) / seconds,
                "padding_share": 1 - sum(s["tokens"] for s in kept) / sum(s["padded_tokens"] for s in kept),
                "median_step_seconds": statistics.median(s["seconds"] for s in kept)}


class MeterObserver:
    """nbtune observer that feeds a `StepMeter`: attached when the run starts, one record per step."""

    def __init__(self, meter: StepMeter) -> None:
        self.meter = meter

    def on_run_start(self, run: Any) -> None:
        self.meter.attach(run.model)

    def on_step(self, run: Any, record: dict[str, Any]) -> None:
        self.meter.step_end(record.get("loss"))
