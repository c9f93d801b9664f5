"""The kernel's workbench: base models loaded once, and every run by name.

A notebook re-runs cells. Training a second run, or the same cell again, must neither reload the base
(seconds, and hundreds of MB) nor stack a new adapter on top of an old one (plain peft's known pain).
So the workbench keeps one pristine base per (model, quantization, dtype) and gives every run its own
*view* of it: a copy of the module tree whose frozen weight tensors are the base's own, shared, not
copied. An adapter method injects its layers into the view; the base never sees them, re-running a
name simply drops the old view, and k adapters cost the base once plus k adapters. Methods that train
base weights in place (full, freeze, bitfit, PiSSA's init) get a real copy, at their real memory cost.

    >>> bench = Workbench()                                 # doctest: +SKIP
    >>> bench.finetune({"name": "a", "steps": 20})          # doctest: +SKIP
    >>> bench.runs                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbtune.config import RunConfig
from nbtune.engine.models import Base, load_base
from nbtune.engine.result import Run
from nbtune.errors import NbtuneError
from nbtune.methods import get_method


class Runs(dict):
    """Runs by name, printable as a table (status and key metrics)."""

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for name, run in self.items():
            m = run.metrics
            rows.append({"name": name, "method": run.method.name, "status": run.status,
                         "steps": f"{run.history[-1]['step'] if run.history else 0}/{run.total_steps}",
                         "train_loss": m.get("train_loss"), "eval_loss": m.get("eval_loss"),
                         "exact_match": m.get("exact_match"), "trainable_%": m.get("trainable_percent")})
        return rows

    def __repr__(self) -> str:
        rows = self.table()
        if not rows:
            return "no runs yet"
        header = list(rows[0])
        lines = ["  ".join(f"{h:<14}" for h in header)]
        for row in rows:
            lines.append("  ".join(f"{_fmt(row[h]):<14}" for h in header))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self.table()
        if not rows:
            return "<i>no runs yet</i>"
        head = "".join(f"<th>{h}</th>" for h in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Workbench:
    """Bases by (model, quantization, dtype) and runs by name, for one kernel."""

    def __init__(self) -> None:
        self.bases: dict[tuple[str, str, str, bool], Base] = {}
        self.runs = Runs()
        self._threads: dict[str, threading.Thread] = {}

    def base(self, config: RunConfig) -> Base:
        """The cached pristine base for this config, loaded on first use."""
        key = (config.model, str(config.quantization), config.dtype, config.trust_remote_code)
        if key not in self.bases:
            self.bases[key] = load_base(config.model, quantization=str(config.quantization), dtype=config.dtype,
                                        trust_remote_code=config.trust_remote_code)
        return self.bases[key]

    def view_for(self, config: RunConfig) -> Base:
        """A model for one run: a weight-sharing view of the cached base, or a real copy if weights train."""
        base = self.base(config)
        method = get_method(config.method)
        # k-bit preparation casts the unquantized weights to fp32 in place: only harmless if they already are.
        casts = config.quantization != "none" and config.dtype != "float32"
        shares = method.shares_base(config.options) and not casts
        model = shared_view(base.model) if shares else copy.deepcopy(base.model)
        return Base(model=model, tokenizer=tokenizer_view(base.tokenizer), name=base.name,
                    quantization=base.quantization)

    def finetune(self, config: RunConfig | dict[str, Any] | str | None = None, *, base: Any = None,
                 observers: Any = (), progress: bool = False, background: bool = False,
                 on_ready: Callable[[Run], None] | None = None, resume_from: str | Path | None = None,
                 **overrides: Any) -> Run:
        """Train a run on a view of the cached base (or on `base`, a (model, tokenizer) the caller loaded);
        a run of the same name is replaced, never stacked. See `nbtune.finetune` for the arguments.

        `on_ready(run)` is called once the config and data passed their checks, before any weight moves
        (the notebook shows its panel then, so a typo never leaves an empty panel behind).
        """
        from nbtune.engine.run import start_run

        self._refuse_while_training()
        run = start_run(config, observers=observers, progress=progress, **overrides)  # checks config and data
        old = self.runs.get(run.name)
        self.runs[run.name] = run
        if on_ready is not None:
            on_ready(run)
        if not background:
            return self._train(run, old, base, resume_from)
        thread = threading.Thread(target=self._quietly, args=(lambda: self._train(run, old, base, resume_from),),
                                  daemon=True, name=f"nbtune-{run.name}")
        self._threads[run.name] = run._thread = thread
        thread.start()
        return run

    def _train(self, run: Run, old: Run | None, base: Any = None, resume_from: str | Path | None = None) -> Run:
        """Train `run`. The earlier run of its name is let go once the new one has trained a step; until
        then (a mistake found while loading, an interrupt) it stays, as if the new run never happened."""
        from nbtune.engine.run import train_run

        if base is None:
            run._base_factory = lambda: self.view_for(run.config)  # a resume after reclaim builds it again
        try:
            view = base if base is not None else self.view_for(run.config)
            return train_run(run, base=view, resume_from=resume_from)
        except BaseException as exc:
            if run.status in ("pending", "running"):  # failed outside train_run (loading the base): say so on the run
                run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
                run.emit("on_error", exc)
            raise
        finally:
            self._settle(run, old)

    def _settle(self, run: Run, old: Run | None) -> None:
        if run.history:
            if old is not None and old is not run:
                old.model = None  # the previous view, and its adapter, can go
        elif self.runs.get(run.name) is run:  # nothing trained: the kernel's runs are as they were
            if old is not None:
                self.runs[run.name] = old
            else:
                del self.runs[run.name]

    def resume(self, name: str, *, observers: list[Any] | None = None, background: bool = False,
               on_ready: Callable[[Run], None] | None = None) -> Run:
        """Continue the stopped run `name` where it stopped, watched by `observers` (this cell's panel)."""
        self._refuse_while_training()
        if name not in self.runs:
            raise NbtuneError(f"there is no run {name!r} to resume; runs: {', '.join(self.runs) or 'none'}.")
        run = self.runs[name]
        from nbtune.engine.run import not_resumable

        refusal = not_resumable(run)
        if refusal:
            raise NbtuneError(refusal)
        if observers is not None:
            run._observers.observers = list(observers)
        if on_ready is not None:
            on_ready(run)
        if not background:
            return run.resume()
        from nbtune.engine.run import resume_run

        run._stop.clear()  # here, not in the thread: a Stop pressed as soon as this returns must hold
        thread = threading.Thread(target=self._quietly, args=(lambda: resume_run(run, stop_cleared=True),),
                                  daemon=True, name=f"nbtune-{name}")
        self._threads[name] = run._thread = thread
        thread.start()
        return run

    @staticmethod
    def _quietly(work: Callable[[], Any]) -> None:
        try:
            work()
        except BaseException:  # the run records status and error; a thread has nobody to raise to
            pass

    def _refuse_while_training(self) -> None:
        busy = [n for n, t in self._threads.items() if t.is_alive()]
        if busy:
            raise NbtuneError(f"run {busy[0]!r} is still training in the background; stop it "
                              f"(nbtune.runs[{busy[0]!r}].stop()) or wait for it (.wait()) first.")

    def forget(self, name: str) -> None:
        """Drop a run and its model from the kernel."""
        run = self.runs.pop(name)
        run.model = None


def shared_view(model: Any) -> Any:
    """A copy of `model`'s module tree that shares every parameter and buffer tensor with it (no weight copy).

    Hand-written because neither transformers nor peft offers "same weights, separate modules": peft's
    multi-adapter API keeps all adapters in one model, which cannot mix tuner types.
    """
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def tokenizer_view(tokenizer: Any) -> Any:
    """A copy of `tokenizer` whose settings (pad token, chat template, padding side) are its own, sharing the
    compiled vocabulary and merges (the `tokenizers` backend): a full deep copy rebuilds that backend, 0.13 s
    of every run's start for SmolLM2's 49k vocabulary (bench/warm_start.py), and no run changes it: nbtune
    never adds tokens, and padding and truncation are set on the backend afresh by every call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return copy.deepcopy(tokenizer, {id(backend): backend} if backend is not None else None)


WORKBENCH = Workbench()  # the kernel's one workbench; `nbtune.runs` is its runs


def finetune(config: RunConfig | dict[str, Any] | str | None = None, *, base: Any = None, observers: Any = (),
             progress: bool = False, background: bool = False, resume_from: str | Path | None = None,
             **overrides: Any) -> Run:
    """Fine-tune a model as `config` says (a RunConfig, dict, YAML text or file; keyword overrides win).

    The run joins `nbtune.runs` (replacing one of the same name) and trains on a view of the base this
    process has cached, as a `%%finetune` cell does; `base`, an already loaded (model, tokenizer), is
    trained instead (PEFT methods add their adapter to it in place). `observers` receive the run's events;
    `progress=True` adds a tqdm bar; `background=True` trains on a thread and returns at once.
    `resume_from="latest"` (or a checkpoint folder) continues a run whose process died, from the newest
    verified checkpoint `checkpoint_steps` left in `<output_dir>-checkpoints`.
    Returns the `Run`, finished or stopped. A failed run raises; an interrupt (Ctrl-C, the kernel's ■)
    keeps the stopped run in `nbtune.runs` and raises `RunInterrupted`, a KeyboardInterrupt.
    """
    return WORKBENCH.finetune(config, base=base, observers=observers, progress=progress, background=background,
                              resume_from=resume_from, **overrides)
