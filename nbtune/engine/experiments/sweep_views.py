"""What a `Sweep` (engine/experiments/sweep.py) shows and gives back, apart from running: its name, objective and best
trial, the `trials` DataFrame, `to_dict`, `to_cell`, a trial's config (`config_for`), `compare`, and its text,
HTML and notebook display. Everything here reads the sweep's state; nothing trains or tells the study.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.experiments.sweep_config import trial_config
from nbtune.engine.records.text import cell
from nbtune.errors import NbtuneError

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.config.sweep_space import SweepSpec
    from nbtune.engine.records.run import Run
    from nbtune.engine.workbench import Workbench

SEPARATORS = "/\\"


class SweepViews:
    """The reading half of `Sweep`: see the module docstring."""

    config: RunConfig
    spec: SweepSpec
    bench: Workbench
    records: list[dict[str, Any]]
    runs: dict[int, Run]
    ran_here: list[int]
    status: str
    error: str | None

    # ------------------------------------------------------------------ what the panel reads
    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def objective(self) -> str:
        return self.spec.objective

    @property
    def direction(self) -> str:
        return self.spec.direction

    @property
    def planned(self) -> int:
        return self.spec.trials

    @property
    def params(self) -> list[str]:
        return self.spec.names

    @property
    def best(self) -> dict[str, Any] | None:
        """The record of the best finished trial (Optuna's rule: pruned trials' values are intermediate)."""
        done = [r for r in self.records if r["status"] == "finished" and finite(r["value"])]
        if not done:
            return None
        pick = min if self.direction == "minimize" else max
        return pick(done, key=lambda r: r["value"])

    @property
    def best_run(self) -> Run | None:
        """The best trial's run, while this kernel holds it (None for a trial another process ran)."""
        best = self.best
        return None if best is None else self.runs.get(best["number"]) or self.bench.runs.get(best["name"])

    # ------------------------------------------------------------------ views
    @property
    def trials(self) -> Any:
        """A pandas DataFrame: number, status, each swept setting, the objective (by its metric's name), steps,
        seconds and run name, a row per trial."""
        import pandas as pd

        columns = ["number", "status", *self.params, self.objective, "steps", "seconds", "run"]
        return pd.DataFrame([_row(r, self.params, self.objective) for r in self.records], columns=columns)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): name, objective, direction, status, planned, best, records, ran_here."""
        return {"name": self.name, "objective": self.objective, "direction": self.direction, "status": self.status,
                "planned": self.planned, "best": self.best, "error": self.error, "records": list(self.records),
                "ran_here": list(self.ran_here)}

    def to_cell(self) -> str:
        """The best trial's config as a `%%finetune <sweep>-best` cell (its YAML, without `sweep`)."""
        best = self.best
        if best is None:
            raise NbtuneError(f"sweep {self.name!r} has no finished trial yet; run it (sweep.resume()) first.")
        config = self.config_for(best["params"], f"{self.name}-best", pruning=False)
        # settings at their defaults left out: the cell says what this config chose, as a person would write it
        return f"%%finetune {config.name}\n{config.to_text(omit=('derived', 'name', 'defaults'))}"

    def config_for(self, params: dict[str, Any], suffix: str, *, pruning: bool = True) -> RunConfig:
        """The sweep's config with `params` set: a trial's (suffix: its number) or the best's ("<sweep>-best")."""
        trial = suffix.isdigit()
        name = f"{self.name}/{suffix}" if trial else suffix
        folder = None
        if self.config.output_dir:
            base = str(self.config.output_dir).rstrip(SEPARATORS)
            folder = str(Path(base) / suffix) if trial else f"{base}-best"
        return trial_config(self.config, self.spec, params, name=name, output_dir=folder, pruning=pruning)

    def compare(self) -> Any:
        """The trials this kernel holds that trained a step, side by side (`nbtune.compare`), in trial order."""
        from nbtune.api import compare

        return compare(*(self.runs[n] for n in sorted(self.runs) if self.runs[n].history))

    def headline(self) -> str:
        best = self.best
        said = "no finished trial" if best is None else (
            f"best {cell(best['value'])} (trial {best['number']}: "
            + ", ".join(f"{k}={cell(v)}" for k, v in best["params"].items()) + ")")
        done = done_trials(self.records)
        return (f"sweep {self.name!r}: {done} of {self.planned} trials, {self.status} · {self.direction} "
                f"{self.objective} · {said}")

    def __repr__(self) -> str:
        columns = ["number", "status", *self.params, self.objective, "steps", "seconds"]
        lines = [columns, *([cell(_row(r, self.params, self.objective)[c]) for c in columns] for r in self.records)]
        widths = [max(len(str(x)) for x in column) for column in zip(*lines, strict=True)]
        table = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip() for line in lines]
        return "\n".join([self.headline(), *(table if self.records else [])])

    def _repr_html_(self) -> str | None:
        """The static snapshot once it ended; while a background sweep runs, its text (the live panel shows it)."""
        if self.status == "running":
            return None
        from nbtune.widgets.sweep_render import sweep_snapshot_html  # the engine never imports display code at load

        return sweep_snapshot_html(self)

    def _ipython_display_(self) -> None:
        """How IPython shows a sweep (a cell's result, `display`): its line, kept current while it runs and
        through a later resume; a line printed once stayed "0 of 4 trials, running" under a background
        sweep that had long finished."""
        from nbtune.widgets.sweep_panel import show_sweep  # display code: loaded only when IPython shows one

        show_sweep(self)


def _row(record: dict[str, Any], params: list[str], objective: str) -> dict[str, Any]:
    return {"number": record["number"], "status": record["status"],
            **{p: record["params"].get(p) for p in params}, objective: record["value"], "steps": record["steps"],
            "seconds": record["seconds"], "run": record["name"]}


def done_trials(records: list[dict[str, Any]]) -> int:
    """The trials that count towards `trials`: not one a Stop or an interrupt cut short (tried again)."""
    return sum(r["status"] != "stopped" for r in records)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
