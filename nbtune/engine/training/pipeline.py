"""The whole fine-tuning pipeline, top to bottom: config -> data -> base model -> method -> Trainer -> run.

    >>> import nbtune
    >>> run = nbtune.finetune(method="lora", r=8, steps=60)      # doctest: +SKIP
    >>> run.metrics["exact_match"], run.saved_to                  # doctest: +SKIP

Everything expensive happens after everything checkable has been checked: a typo in the config or a
missing data file fails in milliseconds, before a single weight is read. The `Run` is the record the user
keeps; what exists only while it trains lives in its `TrainingSession`, created and dropped here. The
run's objective (its `ObjectiveSpec`, nbtune/objectives) tokenises and builds the Trainer.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from nbtune.config import RunConfig
from nbtune.data import prepare_tokenizer, prompts_and_answers
from nbtune.data.splits import read_data
from nbtune.engine.bases.loading import Base, as_base, check_callers_base, load_base, norms_in_fp32
from nbtune.engine.compute.memory import PeakSampler, count_parameters, cuda_peak
from nbtune.engine.compute.precision import training_speedups
from nbtune.engine.compute.preflight import check_fits, is_allocator_failure, out_of_memory
from nbtune.engine.evaluation.samples import check_sample_prompts
from nbtune.engine.evaluation.scoring import check_metrics_on_data, score_finished_run
from nbtune.engine.records import provenance
from nbtune.engine.records.run import Run, fail, failure_recorded, set_status
from nbtune.engine.records.saving import check_run_folder
from nbtune.engine.training.callbacks import loss_summary, remove_neftune
from nbtune.engine.training.checkpoints import resume_checkpoint
from nbtune.engine.training.distributed import is_main_process
from nbtune.engine.training.events import NullObserver, ProgressObserver
from nbtune.engine.training.guards import NonFiniteGuard
from nbtune.engine.training.session import (
    TrainingSession,
    in_background,
    interrupted_error,
    not_resumable,
    session_of,
)
from nbtune.engine.training.trainer import (
    collect_run_garbage,
    expected_steps,
    older_objects_frozen,
    release_from_trainer,
)
from nbtune.errors import NbtuneError, NbtuneWarning, RunInterrupted
from nbtune.methods import MethodContext, get_method
from nbtune.objectives.registry import get_objective


def start_run(config: RunConfig | dict[str, Any] | str | None = None, *, observers: Iterable[Any] = (),
              progress: bool = False, **overrides: Any) -> Run:
    """A pending `Run`: config checked, data read (cheap: where most mistakes are caught)."""
    config = RunConfig.parse(config, **overrides)
    if config.save:  # a folder it may not save into is said now, not after the whole run has trained
        check_run_folder(config.resolved_output_dir, config.name)
    method = get_method(config.method)
    data = read_data(config)
    check_metrics_on_data(config, *data[1:])  # metric functions and `sample_every`'s prompts, checked
    check_sample_prompts(config, *data[1:])  # before any weights load
    if not isinstance(observers, Iterable):
        observers = [observers]  # one observer given alone
    watchers = list(observers) + ([ProgressObserver()] if progress else []) or [NullObserver()]
    workdir = Path(tempfile.mkdtemp(prefix=f"nbtune-{config.name.replace('/', '-')}-"))  # no folder: `sweep/3`
    ctx = MethodContext(options=config.options, config=config, workdir=workdir,
                        quantized=config.quantization != "none")
    run = Run(config, method, ctx, observers=watchers)
    run._session = TrainingSession(run, data, continue_run=lambda: resume_run(run))
    weakref.finalize(run, shutil.rmtree, workdir, True)  # PiSSA's initial adapter etc. live until the run dies
    return run


def train_run(run: Run, *, base: Base | tuple[Any, Any] | None = None, resume_from: str | Path | None = None,
              rebuild_base: Callable[[], Base] | None = None) -> Run:
    """Load (or take) the base, prepare the method, train with the Trainer, evaluate and save `run`.

    `rebuild_base()` gives a pristine base again, for a resume after `nbtune.reclaim` let the model go.
    An interrupt (Ctrl-C, the kernel's ■) keeps what the run learned (stopped, resumable) and is then
    raised again as `RunInterrupted`: a loop of runs, a script, or a notebook's queued cells stop too.
    """
    from nbtune.engine.training import distributed

    session = session_of(run)
    session.rebuild_base = rebuild_base or session.rebuild_base
    with failure_recorded(run):
        checkpoint = (resume_checkpoint(run, resume_from, session.scratch) if resume_from is not None
                      else None)  # before any load
    set_status(run, "running")
    if run.config.num_processes > 1 and not distributed.launched():
        return _launch(run, base, checkpoint)
    interrupted, peak_mb = _guarded(run, lambda memory: _train(run, session, base, memory, checkpoint))
    session.data = None  # the records are tokenised by now
    run.metrics["peak_rss_mb"] = round(peak_mb, 1)
    run.metrics.update(cuda_peak())
    return _finish_or_interrupted(run, interrupted)


def _guarded(run: Run, train: Callable[[PeakSampler], bool]) -> tuple[bool, float]:
    """`train(memory)`, its failure recorded on the run: (interrupted, peak MB)."""
    try:
        with PeakSampler() as memory:
            interrupted = train(memory)
    except KeyboardInterrupt as exc:
        if not run.history:  # while loading, tokenising or in the first step: nothing learned, nothing kept
            fail(run, exc, "interrupted before its first step")
            raise RunInterrupted(f"run {run.name!r} was interrupted before its first step: nothing trained, and "
                                 "nothing of it was kept or saved.", run) from None
        # after training, in the loss evaluation or a Stop's checkpoint: what it learned stays
        set_status(run, "finished" if run.history[-1]["step"] >= run.total_steps else "stopped")
        interrupted = True
    except BaseException as exc:
        fail(run, exc)
        raise
    return interrupted, memory.peak_mb


def _finish_or_interrupted(run: Run, interrupted: bool) -> Run:
    try:
        _finish(run)
    except KeyboardInterrupt:  # during the final evaluation or save: the training itself is complete
        run.emit("on_run_end")
        interrupted = True
    if run.status != "stopped":  # finished or failed: nothing left to continue
        run._session = None
    if interrupted:
        raise interrupted_error(run)
    return run


def _launch(run: Run, base: Base | tuple[Any, Any] | None, checkpoint: str | None) -> Run:
    """Train in `num_processes` processes (engine/training/distributed.py) on `base`, or on the run's own base."""
    from nbtune.engine.training import distributed

    session = session_of(run)
    with failure_recorded(run):
        base = as_base(base)
        if base is None:
            c = run.config
            base = load_base(c.model, quantization=c.quantization, dtype=c.dtype, trust_remote_code=c.trust_remote_code)
        interrupted = distributed.launch(run, session, base,
                                         train=lambda: train_run(run, base=base, resume_from=checkpoint))
    if run.status != "stopped":
        run._session = None
    if interrupted:  # the run is home, stopped: now the interrupt goes on to stop what was queued after it
        raise interrupted_error(run)
    return run


def _train(run: Run, session: TrainingSession, base: Any, memory: PeakSampler,
           checkpoint: str | None = None) -> bool:
    import transformers

    config = run.config
    train_records, eval_records, fmt = session.data
    # 2. The base model: the caller's, or loaded (from cache, hub or the shipped GGUF).
    started = time.perf_counter()
    base = as_base(base)
    if base is not None:
        run.context.quantized = check_callers_base(base.model, run.name, run.config)
        norms_in_fp32(base.model)  # as load_base does for a bf16 base (fp32 norms are left as they are)
    else:
        base = load_base(config.model, quantization=config.quantization, dtype=config.dtype,
                         trust_remote_code=config.trust_remote_code)
    tokenizer = prepare_tokenizer(base.tokenizer)
    run.context.tokenizer = tokenizer
    run.base_name = base.name
    run.metrics["load_seconds"] = round(time.perf_counter() - started, 2)
    run.provenance = provenance.of_run(run, base, session.data)  # what repeating it takes, for run.json

    # 3. Tokenise as the objective wants it (supervised fine-tuning: chat template, answer-only labels,
    # lengths for grouping batches of similar length).
    objective = get_objective(config.objective)
    train_set, eval_set = objective.tokenize(train_records, eval_records, fmt, tokenizer, config)
    run.eval_pairs = prompts_and_answers(eval_records, fmt) if eval_records is not None and fmt != "text" else []

    # 4. The method turns the base into something trainable (seeded: adapter init draws random numbers).
    run.total_steps = run.context.total_steps = expected_steps(config, len(train_set))
    transformers.set_seed(config.seed)
    model = run.method.prepare(base.model, run.context)
    base.model._nbtune_trained_by = run.name  # see check_callers_base
    run.model, run.tokenizer = model, tokenizer
    run.metrics.update(count_parameters(model))

    # 5. Will it fit? Refused here with numbers and advice, not killed by the OS half-way.
    estimate = check_fits(model, config, longest=max(train_set["length"], default=1))
    run.metrics["memory_need_mb"] = round(estimate["total_mb"])
    if estimate.get("checkpointing_chosen"):  # a config does not change: the run trains with one that says so
        run.config = run.context.config = config.with_changes(gradient_checkpointing=True, derived=True)
        warnings.warn(f"run {run.name!r} fits in memory only with gradient checkpointing, which is now on "
                      "(slower steps); set `gradient_checkpointing: false` to refuse that.", NbtuneWarning,
                      stacklevel=5)

    # 6. The loop is the objective's Trainer; RunCallback records history and relays events.
    session.datasets = (train_set, eval_set)
    return _fit(run, session, memory, resume_from=checkpoint)


def _fit(run: Run, session: TrainingSession, memory: PeakSampler, resume_from: str | None = None) -> bool:
    """Run the Trainer (from a checkpoint when resuming); a stopped run keeps a checkpoint to resume from.
    True when an interrupt stopped it."""
    train_set, eval_set = session.datasets
    session.guard = NonFiniteGuard(run.config.on_nonfinite)
    trainer = get_objective(run.config.objective).trainer(run, train_set, eval_set, memory, guard=session.guard,
                                                          scratch=session.scratch, shared_stop=session.shared_stop)
    session.datasets = (trainer.train_dataset, trainer.eval_dataset)  # as prepared: TRL's hold reference log-probs
    try:
        return _train_and_evaluate(run, session, trainer, eval_set, resume_from)
    finally:
        release_from_trainer(trainer)
        session.guard = None


def _train_and_evaluate(run: Run, session: TrainingSession, trainer: Any, eval_set: Any,
                        resume_from: str | None) -> bool:
    """Train, then evaluate the loss; True when the interrupt stopped training (the run is then stopped,
    with a checkpoint to resume from, as a Stop would leave it)."""
    run.emit("on_run_start")
    started = time.perf_counter()
    ran_out = interrupted = False
    guard = session.guard
    try:
        with training_speedups(run.model), older_objects_frozen():
            trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:  # the kernel's interrupt: stop here, keeping everything learned so far
        if not run.history:  # nothing learned yet: not a stopped run to keep or save (_guarded says so)
            raise
        run.stop()
        interrupted = True
    except Exception as exc:
        if not is_allocator_failure(exc):
            raise
        ran_out = True  # raised below, outside this block: the failed step's tensors must not stay referenced
    finally:
        remove_neftune(run.model)  # an interrupt skips the Trainer's own clean-up
        guard.release()
        run.model.eval()  # the Trainer leaves dropout on; `run.model(...)` should answer the same twice
    run.metrics["train_seconds"] = round(time.perf_counter() - started + run.metrics.get("train_seconds", 0), 2)
    if ran_out:
        raise out_of_memory(run.config, trainer.state.global_step)
    if guard.skipped:
        run.metrics["skipped_steps"] = list(guard.skipped)
    if guard.message:  # diverged: the weights are the last good step's; no evaluation of NaN weights
        set_status(run, "failed", guard.message)
        session.checkpoint = session.datasets = None
        warnings.warn(f"run {run.name!r}: {run.error}", NbtuneWarning, stacklevel=4)
        return interrupted
    if run.stop_requested and trainer.state.global_step < trainer.state.max_steps:
        session.checkpoint = _resumable_checkpoint(trainer, run)
        set_status(run, "stopped")
        return interrupted
    run._stop.clear()  # a Stop that came with the last step changes nothing: the run is complete
    session.checkpoint, session.datasets = None, None
    if eval_set is not None:
        with training_speedups(run.model, dropout=False, attention=False):  # the training numerics
            run.metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    set_status(run, "finished")
    return interrupted


def _resumable_checkpoint(trainer: Any, run: Run) -> str | None:
    """Save the Trainer's own checkpoint (weights, optimizer, scheduler, RNG, data position) for resume()."""
    if not run.method.can_resume(run.config.options):
        return None
    trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's format, so its resume is exact
    folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    return str(folder) if folder.is_dir() else None


def resume_run(run: Run, *, stop_cleared: bool = False) -> Run:
    """Continue a stopped run from its checkpoint to its planned end (see `Run.resume`). A run whose model
    was reclaimed is built again on a fresh view of its base; the checkpoint then restores its weights.
    `stop_cleared`: the caller already cleared an earlier Stop (a background resume does so before its
    thread starts, so that a Stop pressed right after it is not lost)."""
    from nbtune.engine.training import distributed

    thread = run._thread
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        raise NbtuneError(f"run {run.name!r} is still finishing in the background; wait for it (.wait()).")
    refusal = not_resumable(run)
    if refusal:
        raise NbtuneError(refusal)
    session = session_of(run)
    if not stop_cleared:
        run._stop.clear()
    if run.config.num_processes > 1 and not distributed.launched():  # the processes start afresh: relaunch
        set_status(run, "running")
        base = session.rebuild_base() if session.rebuild_base is not None else None
        return _launch(run, base, resume_checkpoint(run, session.checkpoint, session.scratch))
    if run.model is None:  # reclaimed: the model is built again, the checkpoint brings back its state
        session.data = read_data(run.config)
        return train_run(run, base=session.rebuild_base(), resume_from=session.checkpoint)
    set_status(run, "running")
    interrupted, peak_mb = _guarded(run, lambda memory: _fit(run, session, memory, resume_from=resume_checkpoint(
        run, session.checkpoint, session.scratch)))
    run.metrics["peak_rss_mb"] = max(run.metrics.get("peak_rss_mb", 0.0), round(peak_mb, 1))
    return _finish_or_interrupted(run, interrupted)


def resume_in_background(run: Run) -> threading.Thread:
    """`resume_run` on a thread; the earlier Stop is cleared first: a Stop pressed as this returns must hold."""
    run._stop.clear()
    return in_background(run, lambda: resume_run(run, stop_cleared=True))


def _finish(run: Run) -> None:
    tokens, train_seconds = sum(r["tokens"] for r in run.history), run.metrics.get("train_seconds") or 0.0
    run.metrics.update({"steps": run.history[-1]["step"] if run.history else 0, **loss_summary(run.history),
                        "tokens": tokens,  # and tokens/s None when uncounted:
                        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds and tokens else None})
    if not is_main_process():  # the other ranks of a multi-process run: rank 0 evaluates and writes
        run.emit("on_run_end")
        return
    score_finished_run(run)  # the config's task metrics, tuned and base (engine/evaluation/scoring.py)
    if run.config.save:
        try:
            run.metrics["saved_to"] = str(run.save())
        except (OSError, NbtuneError) as exc:  # the trained model is still in memory: keep the run
            run.error = f"saving to {run.config.resolved_output_dir} failed: {exc}"
            warnings.warn(f"run {run.name!r}: {run.error}; call run.save(path) to try elsewhere.", NbtuneWarning,
                          stacklevel=3)
    run.emit("on_run_end")
    collect_run_garbage()  # after the panel shows the end; the next run's start then need not
