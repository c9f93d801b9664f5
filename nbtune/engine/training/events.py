"""What a run tells the world while it trains: a small observer Protocol and two observers.

The engine calls every observer at run start, after each optimizer step, on each Trainer log, on each
evaluation, on each round of sample answers (`sample_every`, engine/evaluation/samples.py), at the end and on
error. `NullObserver` is the headless default; `ProgressObserver` draws a tqdm bar (the CLI uses it) and
prints the sample answers; the notebook panel is just another observer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nbtune.engine.records.run import Run


@runtime_checkable
class RunObserver(Protocol):
    """Receives a run's events. Implement the ones you need; subclass `NullObserver` for the rest."""

    def on_run_start(self, run: Run) -> None: ...
    def on_step(self, run: Run, record: dict[str, Any]) -> None: ...
    def on_log(self, run: Run, logs: dict[str, Any]) -> None: ...
    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None: ...
    def on_samples(self, run: Run, step: int, records: list[dict[str, Any]]) -> None: ...
    def on_run_end(self, run: Run) -> None: ...
    def on_error(self, run: Run, error: BaseException) -> None: ...


class NullObserver:
    """Does nothing: the default when nobody watches."""

    def on_run_start(self, run: Run) -> None:
        pass

    def on_step(self, run: Run, record: dict[str, Any]) -> None:
        pass

    def on_log(self, run: Run, logs: dict[str, Any]) -> None:
        pass

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        pass

    def on_samples(self, run: Run, step: int, records: list[dict[str, Any]]) -> None:
        pass

    def on_run_end(self, run: Run) -> None:
        pass

    def on_error(self, run: Run, error: BaseException) -> None:
        pass


class ProgressObserver(NullObserver):
    """A progress bar with loss and throughput (engine/training/progress.py: a text line, in a notebook one updated in
    place, never a widget a saved notebook cannot show again)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def on_run_start(self, run: Run) -> None:
        from nbtune.engine.training.progress import progress_bar

        self._bar = progress_bar(total=run.total_steps, desc=run.name, unit="step", leave=True)

    def on_step(self, run: Run, record: dict[str, Any]) -> None:
        if self._bar is None:
            return
        self._bar.update(record["step"] - self._bar.n)
        self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                              tok_s=f"{record.get('tokens_per_second', 0):.0f}", refresh=False)
        if record["step"] >= run.total_steps:
            self._close()  # training is over; the final evaluation and save should not count as step time

    def on_samples(self, run: Run, step: int, records: list[dict[str, Any]]) -> None:
        # The CLI has no panel: with `sample_every` set, these lines are where its user sees the answers.
        from tqdm import tqdm

        for record in records:
            tqdm.write(sample_line(record))

    def on_run_end(self, run: Run) -> None:
        self._close()

    def on_error(self, run: Run, error: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def sample_line(record: dict[str, Any], width: int = 60) -> str:
    """'step 20 · Convert to ISO 8601: 4 July 1976 -> 1976-07-04', prompt and answer cut to `width`."""
    return f"step {record['step']} · {_cut(prompt_text(record['prompt']), width)} -> {_cut(record['answer'], width)}"


def prompt_text(prompt: Any) -> str:
    """A sample's prompt as text: itself, or the last of its chat messages (what was asked)."""
    if isinstance(prompt, str):
        return prompt
    return str(prompt[-1].get("content", "")) if prompt else ""


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())  # one line
    return text if len(text) <= width else text[: width - 1] + "…"


class Broadcast:
    """Sends each event to several observers; one observer failing never stops the run."""

    def __init__(self, observers: list[Any]) -> None:
        self.observers = observers

    def emit(self, event: str, run: Run, *args: Any) -> None:
        import warnings

        from nbtune.errors import NbtuneWarning

        for observer in list(self.observers):  # one may detach itself (magics/display.py) meanwhile
            handler = getattr(observer, event, None)
            if handler is None:
                continue
            try:
                handler(run, *args)
            except Exception as exc:  # a broken display must not kill hours of training
                warnings.warn(f"observer {type(observer).__name__}.{event} failed: {exc!r}", NbtuneWarning,
                              stacklevel=2)
