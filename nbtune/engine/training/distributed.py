"""One run in several processes, on accelerate: the same config from one process to many.

- In a notebook (or `nbtune run` without a launcher), `num_processes: N` starts N processes with
  `accelerate.notebook_launcher` (DDP: gloo on CPU, NCCL on GPUs). They are forks of the kernel, so they
  start from the base model the kernel already holds, without loading it again. Rank 0 relays its events
  (each step's record) to the kernel, where the live panel draws them; the finished run comes back into
  `nbtune.runs` like any other, its adapter loaded onto the kernel's base.
- Under `accelerate launch` or `torchrun`, every process runs the ordinary pipeline: the Trainer shards
  the data, only rank 0 writes the result, checkpoints carry every rank's RNG state.

What nbtune adds to accelerate here (no maintained library does it): the event relay from rank 0 to the
kernel, a Stop that all ranks obey at the same step, and bringing the result back into the kernel.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from nbtune.engine.training.events import NullObserver
from nbtune.errors import NbtuneError

if TYPE_CHECKING:
    from collections.abc import Callable

    from nbtune.engine.bases.loading import Base
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.session import TrainingSession

# Events rank 0 forwards to the kernel. The end of the run is announced by the kernel itself, once the
# result is loaded there (a panel's end snapshot may offer the model).
_RELAYED = ("on_run_start", "on_step", "on_log", "on_eval")


def world_size() -> int:
    """Processes in this run (1 unless started by a launcher: torchrun, accelerate, notebook_launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes results, evaluates with generation and prints (rank 0)."""
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several a launcher started (then nbtune launches nothing itself)."""
    return world_size() > 1


# ---------------------------------------------------------------- the kernel side
def launch(run: Run, session: TrainingSession, base: Base, *, train: Callable[[], Any]) -> bool:
    """Train `run` in `run.config.num_processes` processes and bring the result back into this process;
    True when the kernel was interrupted (the run is then home, stopped).

    Each process calls `train()`, the ordinary pipeline (engine/training/pipeline.py), on its fork of `run`, `session`
    and `base`, the pristine model the processes train on (each a copy-on-write fork of it); the trained
    adapter is loaded onto it here afterwards.
    """
    _refuse_unforkable()
    context = multiprocessing.get_context("fork")  # the processes inherit the loaded base: nothing to pickle
    channel, stop = context.Queue(), context.Event()
    failure: list[BaseException] = []

    def start() -> None:
        try:
            _notebook_launch(run.config.num_processes, (run, session, train, channel, stop))
        except BaseException as exc:  # a failed rank: its own message came through the channel
            failure.append(exc)
        finally:
            channel.put(("launcher-done", None, None))

    # In a thread, so that a kernel interrupt reaches this (main) thread's relay loop, which turns it
    # into a Stop every rank obeys, instead of torch elastic's handler killing the processes mid-step.
    launcher = threading.Thread(target=start, name=f"nbtune-launch-{run.name}", daemon=True)
    launcher.start()
    outcome, error, interrupted = _relay(run, channel, stop)
    launcher.join()
    if outcome is None:
        message = error or (f"{type(failure[0]).__name__}: {failure[0]}" if failure else "no result came back")
        raise NbtuneError(f"run {run.name!r} failed in its {run.config.num_processes} processes: {message}")
    _take_home(run, session, base, outcome)
    return interrupted


def _relay(run: Run, channel: Any, stop: Any) -> tuple[dict[str, Any] | None, str | None, bool]:
    """Pass rank 0's events to `run`'s observers until the launcher returns; forward Stop requests.
    Returns (rank 0's outcome, an error, whether the kernel was interrupted).

    A kernel interrupt asks every rank to stop after its step; a second one kills the processes (a rank
    stuck outside the training loop would otherwise never see the first)."""
    outcome, error, pids, interrupts = None, None, [], 0
    while True:
        try:
            if run.stop_requested:
                stop.set()
            try:
                kind, payload, state = channel.get(timeout=0.1)
            except queue.Empty:
                continue
            if kind == "launcher-done":
                return outcome, error, interrupts > 0
            if kind == "event":
                _apply(run, state)
                name, args = payload
                run.emit(name, *args)
            elif kind == "pid":
                pids.append(payload)
            elif kind == "done":
                outcome = payload
            elif kind == "failed":
                error = error or payload
        except KeyboardInterrupt:
            interrupts += 1
            run.stop()
            if interrupts > 1:
                error = "interrupted twice: the processes were ended without saving"
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def _apply(run: Run, state: dict[str, Any]) -> None:
    run.total_steps = state["total_steps"]
    run.metrics.update(state["metrics"])
    run.eval_history[:] = state["eval_history"]
    run.samples.extend(state.get("samples") or [])
    if state.get("record") is not None:
        run.history.append(state["record"])


def _take_home(run: Run, session: TrainingSession, base: Base, outcome: dict[str, Any]) -> None:
    """The run as rank 0 left it, with its trained adapter loaded onto `base` in this process."""
    from nbtune.data import prepare_tokenizer
    from nbtune.engine.records.run import History, set_status

    set_status(run, outcome["status"], outcome["error"])
    run.metrics = {**outcome["metrics"], "processes": run.config.num_processes}
    run.history = History(outcome["history"])
    run.eval_history = list(outcome["eval_history"])
    run.samples, run.prediction_rows = list(outcome["samples"]), list(outcome["prediction_rows"])
    run.total_steps = outcome["total_steps"]
    run.eval_pairs = outcome["eval_pairs"]
    run.provenance = outcome["provenance"]
    session.checkpoint = outcome["checkpoint"]
    run.saved_to = Path(outcome["saved_to"]) if outcome["saved_to"] else None
    run.tokenizer = prepare_tokenizer(base.tokenizer)
    run.context.tokenizer = run.tokenizer
    run.model = run.method.load_trained(_copy_to_load_onto(run, base), Path(outcome["model_dir"]))
    if session.rebuild_base is None:  # `base` stayed pristine: a resume relaunches on it
        session.rebuild_base = lambda: base
    if run.status != "stopped":
        session.data = None
    run.emit("on_run_end")


def _copy_to_load_onto(run: Run, base: Base) -> Any:
    """`base`'s module tree sharing its weights (adapters only add modules), or a full copy for methods
    that load trained base weights into it: either way `base` itself stays pristine for a relaunch."""
    import copy

    from nbtune.engine.bases.loading import shared_view

    return shared_view(base.model) if run.method.keeps_base(run.config.options) else copy.deepcopy(base.model)


def _notebook_launch(processes: int, args: tuple[Any, ...]) -> None:
    from accelerate import notebook_launcher
    from accelerate.state import AcceleratorState

    # accelerate refuses to launch once an Accelerator exists in this process; the earlier runs' Trainers
    # made one, and nothing of it is in use between runs (each Trainer makes its own).
    AcceleratorState._reset_state(reset_partial_state=True)
    # It prints "Launching training on N CUDAs" even on CPU; the panel and the run say what ran where.
    with _quiet_launcher(), _bitsandbytes_hidden(), contextlib.redirect_stdout(_LauncherSilenced(sys.stdout)):
        notebook_launcher(_process_main, args=args, num_processes=processes, use_port=str(_free_port()))


class _LauncherSilenced:
    """sys.stdout while the launcher runs: drops what this (launcher) thread and the forked ranks print, and
    passes on what other threads print, such as a user's observer in the kernel's relay loop (redirecting
    sys.stdout is process-wide). The ranks must not write into the kernel's output stream: it is the
    kernel's socket, forked."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._thread, self._pid = stream, threading.get_ident(), os.getpid()

    def _dropped(self) -> bool:
        return os.getpid() != self._pid or threading.get_ident() == self._thread

    def write(self, text: str) -> int:
        return len(text) if self._dropped() else self._stream.write(text)

    def flush(self) -> None:
        if not self._dropped():
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _refuse_unforkable() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise NbtuneError("`num_processes` > 1 forks this kernel, which cannot happen once CUDA is in use here "
                          "(a run on the GPU already trained in this kernel). Restart the kernel and start with "
                          "the multi-process run, or run `nbtune export` and `accelerate launch` the script.",
                          field="num_processes")


@contextlib.contextmanager
def _bitsandbytes_hidden() -> Any:
    """notebook_launcher refuses to fork once `bitsandbytes` is imported, because on a GPU machine the import
    may initialise CUDA. peft imports it whenever it is installed; `_refuse_unforkable` checks the real
    condition (CUDA initialised in this process), so the name check is skipped for the launch."""
    module = sys.modules.pop("bitsandbytes", None)
    if module is not None:
        _HIDDEN["bitsandbytes"] = module  # the forked processes put it back first thing (_process_main)
    try:
        yield
    finally:
        if module is not None:
            sys.modules["bitsandbytes"] = module


_HIDDEN: dict[str, Any] = {}


@contextlib.contextmanager
def _quiet_launcher() -> Any:
    """torch elastic logs that it cannot install signal handlers from a thread (by design here) and a
    failed rank's whole traceback; the rank's one-line message reaches the cell through the channel."""
    import logging

    logger = logging.getLogger("torch.distributed.elastic")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- each launched process
def _process_main(run: Run, session: TrainingSession, train: Callable[[], Any], channel: Any, stop: Any) -> None:
    """What each forked process runs: the ordinary pipeline (`train`), with rank 0 reporting to the kernel."""
    sys.modules.update(_HIDDEN)  # forked while bitsandbytes was hidden from the launcher's check
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel turns an interrupt into a Stop (see launch)
    channel.put(("pid", os.getpid(), None))
    _share_cores()
    shared = run.context.workdir
    session.shared_dir = shared  # Trainer checkpoints: one folder all ranks write into
    if not is_main_process():  # method scratch files (PiSSA's initial adapter) must not collide
        run.context = replace(run.context, workdir=shared / f"rank-{rank()}")
        run.context.workdir.mkdir(exist_ok=True)
    run.observe(_Forward(channel) if is_main_process() else NullObserver(), replace=True)
    session.shared_stop = stop
    try:
        train()
        if is_main_process():
            channel.put(("done", _outcome(run, session, shared), None))
    except BaseException as exc:
        channel.put(("failed", f"rank {rank()}: {type(exc).__name__}: {exc}", None))
        raise


def _share_cores() -> None:
    """Each of N processes on one machine gets its share of the cores (torch would use all in each)."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    share = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(share)
    os.environ["OMP_NUM_THREADS"] = str(share)  # said, so accelerate does not set (and warn about) its own


def _outcome(run: Run, session: TrainingSession, shared: Path) -> dict[str, Any]:
    folder = run.saved_to
    if folder is None:  # `save: false`, a stopped run: the kernel still needs the weights
        folder = run.save(shared / "result")
        run.saved_to = None
    return {"status": run.status, "error": run.error, "metrics": run.metrics, "history": list(run.history),
            "eval_history": run.eval_history, "total_steps": run.total_steps, "eval_pairs": run.eval_pairs,
            "checkpoint": session.checkpoint, "model_dir": str(folder), "provenance": run.provenance,
            "saved_to": str(run.saved_to) if run.saved_to else None, "samples": run.samples,
            "prediction_rows": run.prediction_rows}


class _Forward(NullObserver):
    """Rank 0's observer: each event, with the state the kernel's copy of the run needs, into the channel."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel

    def _send(self, name: str, run: Run, *args: Any, record: dict[str, Any] | None = None,
              samples: list[dict[str, Any]] | None = None) -> None:
        state = {"total_steps": run.total_steps, "metrics": dict(run.metrics), "record": record,
                 "eval_history": list(run.eval_history), "samples": samples}
        self.channel.put(("event", (name, args), state))

    def on_run_start(self, run: Run) -> None:
        self._send("on_run_start", run)

    def on_step(self, run: Run, record: dict[str, Any]) -> None:
        self._send("on_step", run, record, record=record)

    def on_log(self, run: Run, logs: dict[str, Any]) -> None:
        self._send("on_log", run, logs)

    def on_eval(self, run: Run, metrics: dict[str, Any]) -> None:
        self._send("on_eval", run, metrics)

    def on_samples(self, run: Run, step: int, records: list[dict[str, Any]]) -> None:
        self._send("on_samples", run, step, records, samples=records)  # the kernel's run keeps them too


class StopTogether(TrainerCallback):
    """Ends training on every rank at the same step: a rank that stopped alone would leave the others
    waiting in the next gradient all-reduce for ever. Each step, the ranks agree (all-reduce of a flag)
    whether anyone was asked to stop: the run itself, or the kernel through `shared_stop`."""

    def __init__(self, run: Run, shared_stop: Any = None) -> None:
        self.run, self.shared_stop = run, shared_stop

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch
        import torch.distributed as dist

        asked = self.run.stop_requested or (self.shared_stop is not None and self.shared_stop.is_set())
        flag = torch.tensor([1.0 if asked else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            self.run.stop()
            control.should_training_stop = True


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["StopTogether", "barrier", "is_main_process", "launch", "launched", "rank", "world_size"]
