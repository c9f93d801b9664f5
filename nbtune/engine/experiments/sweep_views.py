"""What a `Sweep` (engine/experiments/sweep.py) shows and gives back, apart from running: its name, the metric it
optimises and its best trial, its table (`table()`, the `trials` DataFrame, its text), `to_dict`, `to_cell`, a
trial's config (`config_for`) and the trials to `compare`. Everything here reads the sweep's state; nothing
trains or tells the study. Its notebook views are nbtune/widgets/: `sweep_render.sweep_html(sweep)` (the
static snapshot once it ended) and `sweep_panel.show_sweep(sweep)` (its line, kept current while it runs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.experiments.groups import Group
from nbtune.engine.experiments.sweep_config import trial_config
from nbtune.engine.records.text import cell
from nbtune.errors import NbtuneError

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.config.sweep_space import SweepSpec
    from nbtune.engine.records.run import Run

SEPARATORS = "/\\"


class SweepViews(Group):
    """The reading half of `Sweep`: see the module docstring."""

    spec: SweepSpec
    records: list[dict[str, Any]]
    runs: dict[int, Run]
    ran_here: list[int]

    # ------------------------------------------------------------------ what the panel reads
    @property
    def optimize(self) -> str:
        """The metric the sweep optimises (`sweep: {optimize: {eval_loss: min}}`), in `direction`."""
        return self.spec.optimize

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
    def table(self) -> list[dict[str, Any]]:
        """A row per trial: number, status, each swept setting, the optimised metric (by its name), steps,
        seconds and run name."""
        return [_row(r, self.params, self.optimize) for r in self.records]

    @property
    def trials(self) -> Any:
        """`table()` as a pandas DataFrame (its columns even before the first trial)."""
        import pandas as pd

        columns = ["number", "status", *self.params, self.optimize, "steps", "seconds", "run"]
        return pd.DataFrame(self.table(), columns=columns)

    @property
    def df(self) -> Any:
        """The same DataFrame as `trials`."""
        return self.trials

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): name, optimize, direction, status, planned, best, records, ran_here."""
        return {"name": self.name, "optimize": self.optimize, "direction": self.direction, "status": self.status,
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

    def _compared(self) -> list[Run]:
        """The trials this kernel holds that trained a step, in trial order."""
        return [self.runs[n] for n in sorted(self.runs) if self.runs[n].history]

    def headline(self) -> str:
        best = self.best
        said = "no finished trial" if best is None else (
            f"best {cell(best['value'])} (trial {best['number']}: "
            + ", ".join(f"{k}={cell(v)}" for k, v in best["params"].items()) + ")")
        done = done_trials(self.records)
        return (f"sweep {self.name!r}: {done} of {self.planned} trials, {self.status} · {self.direction} "
                f"{self.optimize} · {said}")

    def _text_rows(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in row.items() if k != "run"} for row in self.table()]


def _row(record: dict[str, Any], params: list[str], metric: str) -> dict[str, Any]:
    return {"number": record["number"], "status": record["status"],
            **{p: record["params"].get(p) for p in params}, metric: record["value"], "steps": record["steps"],
            "seconds": record["seconds"], "run": record["name"]}


def done_trials(records: list[dict[str, Any]]) -> int:
    """The trials that count towards `trials`: not one a Stop or an interrupt cut short (tried again)."""
    return sum(r["status"] != "stopped" for r in records)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
