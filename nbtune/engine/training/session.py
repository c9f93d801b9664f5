"""A run's training session: what exists only while it trains or may resume, and the answers that depend on
it (can it resume, what does an interrupt say, which thread trains it). The pipeline (pipeline.py) creates
and drops it; the `Run` record (records/run.py) merely holds on to it. Only these three touch a run's private
state.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.records.run import Run, pruned_refusal
from nbtune.errors import NbtuneError, RunInterrupted

if TYPE_CHECKING:
    from nbtune.engine.bases.loading import Base
    from nbtune.engine.training.guards import NonFiniteGuard


@dataclass
class TrainingSession:
    """What exists only while a run trains or may resume (as torchtune's recipe owns its training state):
    `start_run` creates it, a finished or failed run drops it, a stopped run keeps it to resume from."""

    run: Run
    data: tuple[Any, Any, str] | None  # (train records, eval records, format), until tokenised
    datasets: tuple[Any, Any] | None = None  # tokenised (train, eval), kept while the run may resume in memory
    checkpoint: str | None = None  # the Trainer checkpoint a stopped run resumes from
    guard: NonFiniteGuard | None = None  # the current Trainer's divergence guard (guards.py)
    rebuild_base: Callable[[], Base] | None = None  # a pristine base, to build the model again after a reclaim
    shared_dir: Path | None = None  # several processes: the folder all ranks write Trainer checkpoints into
    shared_stop: Any = None  # several processes: the kernel's Stop as every rank sees it
    # How to continue it: the pipeline's resume, given at creation (this module cannot import the pipeline).
    continue_run: Callable[[], Run] | None = None

    @property
    def scratch(self) -> Path:
        return self.shared_dir or self.run.context.workdir

    def resume(self) -> Run:
        return self.continue_run()

    def release(self) -> None:
        self.datasets = None  # a resume after a reclaim tokenises again


def session_of(run: Run) -> TrainingSession:
    """`run`'s training session; a run without one (finished, loaded, combined) has nothing to train."""
    if run._session is None:
        raise NbtuneError(f"run {run.name!r} is {run.status}; it has no training to start or continue.")
    return run._session


def not_resumable(run: Run) -> str | None:
    """Why `run` cannot resume (None if it can): it is not stopped, its method keeps no checkpoint, or the
    model to rebuild after a reclaim came from the caller."""
    if run.status == "pruned":
        return pruned_refusal(run.name)
    if run.status != "stopped" or run._session is None:
        return f"run {run.name!r} is {run.status}; only a stopped run of this kernel with steps left can resume."
    session = run._session
    if not run.method.can_resume(run.config.options):
        return (f"run {run.name!r} is stopped, but method {run.method.name!r} cannot resume: peft checkpoints "
                "only its inference form. Start it again with more `steps` instead.")
    if not session.checkpoint:
        return (f"run {run.name!r} is stopped, but no checkpoint of it was kept (its stop came before the "
                "Trainer could save one); start it again.")
    if run.model is None and session.rebuild_base is None:
        return (f"run {run.name!r} was reclaimed, and it trained on a model passed in memory, which nbtune "
                "cannot rebuild; continue it with nbtune.finetune(run.config, base=(model, tokenizer), "
                f"resume_from={session.checkpoint!r}).")
    return None


def interrupted_error(run: Run) -> RunInterrupted:
    """What an interrupt that stopped `run` raises: where it stopped, and how to go on."""
    if run.status == "finished":
        return RunInterrupted(f"run {run.name!r} had trained all its steps when the interrupt came; its evaluation "
                              "or save may be incomplete (run.evaluate() and run.save() do them again).", run)
    steps = f"at step {run.history[-1]['step']} of {run.total_steps}" if run.history else "before its first step"
    how = not_resumable(run) or "run.resume() (or %finetune NAME --resume) continues it"
    return RunInterrupted(f"run {run.name!r} stopped {steps} (interrupted); it keeps its adapter and history in "
                          f"nbtune.runs[{run.name!r}]; {how}.", run)


def in_background(run: Run, work: Callable[[], Any]) -> threading.Thread:
    """Start `work` (training `run`) on a daemon thread that `run.wait()` joins. The run records its status
    and error; a thread has nobody to raise to."""

    def quietly() -> None:
        with contextlib.suppress(BaseException):
            work()

    run._thread = threading.Thread(target=quietly, daemon=True, name=f"nbtune-{run.name}")
    run._thread.start()
    return run._thread
