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
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "nbtune", *names)}


def write_result(name: str, result: dict[str, Any]) -> Path:
    result = {"bench": name, "cpu": cpu_name(), "cores": os.cpu_count(), **result}
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out
