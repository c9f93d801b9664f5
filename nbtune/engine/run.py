"""The whole fine-tuning pipeline, top to bottom: config -> data -> base model -> method -> Trainer -> run.

    >>> import nbtune
    >>> run = nbtune.finetune(method="lora", r=8, steps=60)      # doctest: +SKIP
    >>> run.metrics["exact_match"], run.saved_to                  # doctest: +SKIP

Everything expensive happens after everything checkable has been checked: a typo in the config or a
missing data file fails in milliseconds, before a single weight is read.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nbtune.config import RunConfig
from nbtune.data import detect_format, load_records, prepare_tokenizer, prompts_and_answers, tokenize_dataset
from nbtune.data.loading import source_key
from nbtune.engine.callbacks import remove_neftune
from nbtune.engine.checkpoints import resume_checkpoint
from nbtune.engine.distributed import is_main_process
from nbtune.engine.events import Broadcast, NullObserver, ProgressObserver
from nbtune.engine.memory import PeakSampler
from nbtune.engine.models import Base, load_base, norms_in_fp32
from nbtune.engine.precision import training_speedups
from nbtune.engine.preflight import check_fits, is_allocator_failure, out_of_memory
from nbtune.engine.result import Run
from nbtune.engine.trainer import collect_run_garbage, make_trainer, older_objects_frozen
from nbtune.errors import ConfigError, DataError, NbtuneError
from nbtune.methods import MethodContext, get_method


def finetune(config: RunConfig | dict[str, Any] | str | None = None, *, base: Base | tuple[Any, Any] | None = None,
             observers: Iterable[Any] = (), progress: bool = False, resume_from: str | Path | None = None,
             **overrides: Any) -> Run:
    """Fine-tune a model as `config` says (a RunConfig, dict, YAML text or file; keyword overrides win).

    `base` is an already loaded (model, tokenizer) to train instead of loading `config.model`; PEFT
    methods add their adapter to it in place. `observers` receive the run's events; `progress=True`
    adds a tqdm bar. `resume_from="latest"` (or a checkpoint folder) continues a run whose process
    died, from the newest verified checkpoint `checkpoint_steps` left in `<output_dir>-checkpoints`.
    Returns the `Run`, finished or stopped; a failed run raises.
    """
    run = start_run(config, observers=observers, progress=progress, **overrides)
    return train_run(run, base=base, resume_from=resume_from)


def start_run(config: RunConfig | dict[str, Any] | str | None = None, *, observers: Iterable[Any] = (),
              progress: bool = False, **overrides: Any) -> Run:
    """A pending `Run`: config checked and data read (cheap, and where most mistakes are caught)."""
    config = RunConfig.parse(config, **overrides)
    method = get_method(config.method)
    data = read_data(config)
    if not isinstance(observers, Iterable):
        observers = [observers]  # one observer given alone
    watchers = list(observers) + ([ProgressObserver()] if progress else []) or [NullObserver()]
    workdir = Path(tempfile.mkdtemp(prefix=f"nbtune-{config.name}-"))
    ctx = MethodContext(options=config.options, config=config, workdir=workdir,
                        quantized=config.quantization != "none")
    run = Run(config, method, ctx, Broadcast(watchers))
    run._data = data
    weakref.finalize(run, shutil.rmtree, workdir, True)  # PiSSA's initial adapter etc. live until the run dies
    return run


def train_run(run: Run, *, base: Base | tuple[Any, Any] | None = None,
              resume_from: str | Path | None = None) -> Run:
    """Load (or take) the base, prepare the method, train with the Trainer, evaluate and save `run`."""
    from nbtune.engine import distributed

    train_records, eval_records, fmt = run._data
    checkpoint = resume_checkpoint(run, resume_from) if resume_from is not None else None  # before any load
    run.status = "running"
    if run.config.num_processes > 1 and not distributed.launched():
        return _launch(run, base, checkpoint)
    try:
        with PeakSampler() as memory:
            _train(run, base, train_records, eval_records, fmt, memory, checkpoint)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and run.model is not None:
            run.status = "stopped"  # Ctrl-C / kernel interrupt: keep what was learned
        else:
            run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
            run.emit("on_error", exc)
            raise
    run._data = None  # the tokenised data is not needed any more
    run.metrics["peak_rss_mb"] = round(memory.peak_mb, 1)
    _finish(run)
    return run


def _launch(run: Run, base: Base | tuple[Any, Any] | None, checkpoint: str | None) -> Run:
    """Train in `num_processes` processes (engine/distributed.py) on `base`, or on the run's own base."""
    from nbtune.engine import distributed

    base = _as_base(base)
    if base is None:
        config = run.config
        base = load_base(config.model, quantization=config.quantization, dtype=config.dtype,
                         trust_remote_code=config.trust_remote_code)
    try:
        return distributed.launch(run, base, checkpoint)
    except BaseException as exc:
        run.status, run.error = "failed", str(exc)
        run.emit("on_error", exc)
        raise


def read_data(config: RunConfig) -> tuple[Any, Any, str]:
    """(train, eval or None, format) as `datasets.Dataset`s, split and format-checked."""
    train = load_records(config.data, field="data", split="train")
    fmt = detect_format(train.column_names, config.format, field="data")
    is_demo = isinstance(config.data, str) and config.data == "demo"
    if config.eval_split > 0 and (config.eval_data is not None or is_demo):
        raise ConfigError("`eval_split` only applies when there is no `eval_data` (the demo task brings its "
                          "own held-out split); remove one of them.", field="eval_split")
    if config.eval_data is not None:
        evaluation = load_records(config.eval_data, field="eval_data", split="test")
        detect_format(evaluation.column_names, fmt, field="eval_data")
    elif is_demo:
        evaluation = load_records("demo", field="data", split="test")
    elif config.eval_split > 0:
        held_out = round(len(train) * config.eval_split)
        if held_out < 1 or held_out >= len(train):
            raise DataError(f"`eval_split: {config.eval_split}` of {len(train)} examples holds out {held_out}; "
                            "it needs at least one for each side. Give more data or `eval_data`.",
                            field="eval_split")
        parts = train.train_test_split(test_size=held_out, seed=config.seed)
        train, evaluation = parts["train"], parts["test"]
    else:
        evaluation = None
    if evaluation is None and (config.metric == "exact_match" or config.eval_steps):
        key = "metric" if config.metric == "exact_match" else "eval_steps"
        raise ConfigError(f"`{key}` needs evaluation data: set `eval_data` or `eval_split`.", field=key)
    return train, evaluation, fmt


def _train(run: Run, base: Any, train_records: Any, eval_records: Any, fmt: str, memory: PeakSampler,
           checkpoint: str | None = None) -> None:
    import transformers

    config = run.config
    # 2. The base model: the caller's, or loaded (from cache, hub or the shipped GGUF).
    started = time.perf_counter()
    base = _as_base(base)
    if base is not None:
        _check_callers_base(base.model, run)
        norms_in_fp32(base.model)  # as load_base does for a bf16 base (fp32 norms are left as they are)
    else:
        base = load_base(config.model, quantization=config.quantization, dtype=config.dtype,
                         trust_remote_code=config.trust_remote_code)
    tokenizer = prepare_tokenizer(base.tokenizer)
    run._ctx.tokenizer = tokenizer
    run._base_name = base.name
    run.metrics["load_seconds"] = round(time.perf_counter() - started, 2)

    # 3. Tokenise: chat template, answer-only labels, lengths for grouping batches of similar length.
    key = _data_key(config)
    tokenize = dict(tokenizer=tokenizer, fmt=fmt, max_length=config.max_length,
                    train_on_prompt=config.train_on_prompt, cache_key=key)
    train_set = tokenize_dataset(train_records, field="data", **tokenize)
    eval_set = tokenize_dataset(eval_records, field="eval_data", **tokenize) if eval_records is not None else None
    run.eval_pairs = prompts_and_answers(eval_records, fmt) if eval_records is not None and fmt != "text" else []

    # 4. The method turns the base into something trainable (seeded: adapter init draws random numbers).
    run.total_steps = run._ctx.total_steps = _expected_steps(config, len(train_set))
    transformers.set_seed(config.seed)
    model = run.method.prepare(base.model, run._ctx)
    base.model._nbtune_trained_by = run.name  # see _check_callers_base
    run.model, run.tokenizer = model, tokenizer
    run.metrics.update(count_parameters(model))

    # 5. Will it fit? Refused here with numbers and advice, not killed by the OS half-way.
    estimate = check_fits(model, config, longest=max(train_set["length"], default=1))
    run.metrics["memory_need_mb"] = round(estimate["total_mb"])

    # 6. The loop is transformers' Trainer; RunCallback records history and relays events.
    run._datasets = (train_set, eval_set)
    _fit(run, memory, resume_from=checkpoint)


def _fit(run: Run, memory: PeakSampler, resume_from: str | None = None) -> None:
    """Run the Trainer (from a checkpoint when resuming); a stopped run keeps a checkpoint to resume from."""
    train_set, eval_set = run._datasets
    trainer = make_trainer(run, run.model, run.tokenizer, train_set, eval_set, memory)
    try:
        _train_and_evaluate(run, trainer, eval_set, resume_from)
    finally:
        _release_from_trainer(trainer)


def _release_from_trainer(trainer: Any) -> None:
    """Mixed precision wraps the model's forward in an autocast; afterwards the run's model must compute in
    its own dtypes (generation, comparison, saving) as a freshly loaded copy would, and a later Trainer
    (resume) must wrap it again: accelerate refuses to re-prepare a model it marked as prepared."""
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    for module in {id(m): m for m in (model, trainer.model)}.values():
        module.__dict__.pop("_is_accelerate_prepared", None)


def _train_and_evaluate(run: Run, trainer: Any, eval_set: Any, resume_from: str | None) -> None:
    run.emit("on_run_start")
    started = time.perf_counter()
    ran_out = False
    try:
        with training_speedups(run.model), older_objects_frozen():
            output = trainer.train(resume_from_checkpoint=resume_from)
        run.metrics["train_loss_mean"] = output.training_loss
    except KeyboardInterrupt:  # the kernel's interrupt: stop here, keeping everything learned so far
        run.stop()
    except Exception as exc:
        if not is_allocator_failure(exc):
            raise
        ran_out = True  # raised below, outside this block: the failed step's tensors must not stay referenced
    finally:
        remove_neftune(run.model)  # an interrupt skips the Trainer's own clean-up
        run._guard.release()
        run.model.eval()  # the Trainer leaves dropout on; `run.model(...)` should answer the same twice
    run.metrics["train_seconds"] = round(time.perf_counter() - started + run.metrics.get("train_seconds", 0), 2)
    if ran_out:
        raise out_of_memory(run.config, trainer.state.global_step)
    if run._guard.skipped:
        run.metrics["skipped_steps"] = list(run._guard.skipped)
    if run._guard.message:  # diverged: the weights are the last good step's; no evaluation of NaN weights
        run.status, run.error = "failed", run._guard.message
        run._checkpoint = run._datasets = None
        warnings.warn(f"run {run.name!r}: {run.error}", stacklevel=4)
        return
    if run.stop_requested and trainer.state.global_step < trainer.state.max_steps:
        run._checkpoint = _resumable_checkpoint(trainer, run)
        run.status = "stopped"
        return
    run._stop.clear()  # a Stop that came with the last step changes nothing: the run is complete
    run._checkpoint, run._datasets = None, None
    if eval_set is not None:
        with training_speedups(run.model, dropout=False, attention=False):  # the training numerics
            run.metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    run.status = "finished"


def _resumable_checkpoint(trainer: Any, run: Run) -> str | None:
    """Save the Trainer's own checkpoint (weights, optimizer, scheduler, RNG, data position) for resume()."""
    if not run.method.resumable(run.config.options):
        return None
    trainer._save_checkpoint(trainer.model, trial=None)  # the Trainer's format, so its resume is exact
    folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    return str(folder) if folder.is_dir() else None


def not_resumable(run: Run) -> str | None:
    """Why `run` cannot resume (None if it can): it is not stopped, or its method keeps no checkpoint."""
    if run.status == "stopped" and run._checkpoint:
        return None
    if run.status == "stopped" and not run.method.resumable(run.config.options):
        return (f"run {run.name!r} is stopped, but method {run.method.name!r} cannot resume: peft checkpoints "
                "only its inference form. Start it again with more `steps` instead.")
    return f"run {run.name!r} is {run.status}; only a stopped run with steps left can resume."


def resume_run(run: Run) -> Run:
    """Continue a stopped run from its checkpoint to its planned end (see `Run.resume`)."""
    from nbtune.engine import distributed

    thread = run._thread
    if thread is not None and thread.is_alive() and thread is not threading.current_thread():
        raise NbtuneError(f"run {run.name!r} is still finishing in the background; wait for it (.wait()).")
    refusal = not_resumable(run)
    if refusal:
        raise NbtuneError(refusal)
    run._stop.clear()
    if run.config.num_processes > 1 and not distributed.launched():  # the processes start afresh: relaunch
        run.status = "running"
        base = run._base_factory() if run._base_factory is not None else None
        return _launch(run, base, resume_checkpoint(run, run._checkpoint))
    run.status = "running"
    try:
        with PeakSampler() as memory:
            _fit(run, memory, resume_from=resume_checkpoint(run, run._checkpoint))
    except BaseException as exc:
        run.status, run.error = "failed", f"{type(exc).__name__}: {exc}"
        run.emit("on_error", exc)
        raise
    run.metrics["peak_rss_mb"] = max(run.metrics.get("peak_rss_mb", 0.0), round(memory.peak_mb, 1))
    _finish(run)
    return run


def _finish(run: Run) -> None:
    config = run.config
    losses = [r["loss"] for r in run.history if "loss" in r]
    tokens = sum(r["tokens"] for r in run.history)
    train_seconds = run.metrics.get("train_seconds") or 0.0
    run.metrics.update({
        "steps": run.history[-1]["step"] if run.history else 0,
        "first_loss": losses[0] if losses else None,
        "train_loss": losses[-1] if losses else None,
        "tokens": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds else None,
    })
    if not is_main_process():  # the other ranks of a multi-process run: rank 0 evaluates and writes
        run.emit("on_run_end")
        return
    if _wants_metric(config) and run.eval_pairs and run.status == "finished":
        run.metrics.update(run.evaluate())
    if config.save:
        try:
            run.metrics["saved_to"] = str(run.save())
        except (OSError, NbtuneError) as exc:  # the trained model is still in memory: keep the run
            run.error = f"saving to {config.resolved_output_dir} failed: {exc}"
            warnings.warn(f"run {run.name!r}: {run.error}; call run.save(path) to try elsewhere.", stacklevel=3)
    run.emit("on_run_end")
    collect_run_garbage()  # after the panel shows the end; the next run's start then need not


def _wants_metric(config: RunConfig) -> bool:
    if config.metric == "auto":
        return isinstance(config.data, str) and config.data == "demo"
    return config.metric == "exact_match"


def count_parameters(model: Any) -> dict[str, Any]:
    """Trainable and total parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":
            count *= 2  # two 4-bit values per stored byte (what peft reports as well)
        total += count
        if param.requires_grad:
            trainable += count
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0}


def _expected_steps(config: RunConfig, examples: int) -> int:
    """The optimizer steps the Trainer will take (its own arithmetic: a last partial accumulation counts)."""
    if config.steps:
        return config.steps
    batches = math.ceil(examples / config.batch_size)
    per_epoch = max(batches // config.grad_accum + int(batches % config.grad_accum > 0), 1)
    return math.ceil((config.epochs or 1.0) * per_epoch)


def _data_key(config: RunConfig) -> tuple[Any, ...] | None:
    """What identifies this run's data for the tokenising cache; None when the data lives in memory."""
    train, evaluation = source_key(config.data), source_key(config.eval_data)
    if train is None or (config.eval_data is not None and evaluation is None):
        return None
    return (train, evaluation, config.eval_split, config.seed)


def _check_callers_base(model: Any, run: Run) -> None:
    """Refuse a base another run already changed, and a quantization the base does not have."""
    earlier = getattr(model, "_nbtune_trained_by", None)
    if earlier is not None or hasattr(model, "peft_config"):
        raise NbtuneError(
            f"this base model already carries run {earlier or 'another'}'s changes; training run {run.name!r} "
            "on it would overwrite them. Load a fresh base for each run.",
            field="model",
        )
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if quantized != (run.config.quantization != "none"):
        raise ConfigError(
            f"`quantization: {run.config.quantization}` but the base model passed in is "
            f"{'quantized' if quantized else 'not quantized'}; make them agree (a base is quantized when "
            "it is loaded).",
            field="quantization",
        )
    run._ctx.quantized = quantized


def _as_base(base: Any) -> Base | None:
    if base is None or isinstance(base, Base):
        return base
    model, tokenizer = base
    return Base(model=model, tokenizer=tokenizer, name=getattr(model, "name_or_path", "") or "in-memory")
