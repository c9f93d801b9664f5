"""The Trainer a run trains with: its TrainingArguments from the run's config, the collator, callbacks.

One place that maps nbtune's settings onto transformers' (`TrainingArguments`, `DataCollatorForSeq2Seq`)
so that the pipeline in `run.py` reads top to bottom.
"""

from __future__ import annotations

import gc
import json
import math
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback  # loaded already: engine/training/callbacks.py imports it too

if TYPE_CHECKING:
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.guards import NonFiniteGuard


def make_trainer(run: Run, train_set: Any, eval_set: Any, memory: PeakSampler, *, guard: NonFiniteGuard,
                 scratch: Path, shared_stop: Any = None) -> Any:
    """The Trainer for `run.model`: `guard` keeps NaN steps out of the weights, `scratch` is where a Stop's
    checkpoint goes, `shared_stop` is the kernel's Stop as every rank of a multi-process run sees it."""
    from nbtune.engine.compute import device
    from nbtune.engine.training.checkpoints import run_trainer_class

    config, model, tokenizer = run.config, run.model, run.tokenizer
    policy = device.current()
    args = training_arguments(run, policy, periodic_eval=bool(config.eval_steps and eval_set is not None),
                              scratch=scratch)
    collator = make_collator(tokenizer, policy)
    callbacks = run_callbacks(run, memory, guard, shared_stop, args.world_size)
    optimizer = run.method.make_optimizer(model, args, run.context) if run.method.make_optimizer else None
    trainer = run_trainer_class()(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                                  processing_class=tokenizer, data_collator=collator, callbacks=callbacks,
                                  optimizers=(optimizer, None), labels_only=config.logits_on_labels_only)
    return finish_trainer(trainer, run)


def run_callbacks(run: Run, memory: PeakSampler, guard: NonFiniteGuard, shared_stop: Any, world_size: int) -> list:
    """Every callback a run's Trainer carries, whatever its objective: history and events (RunCallback), the
    method's own, NEFTune, the divergence guard, sample answers, and the shared Stop of several processes."""
    from nbtune.engine.training.callbacks import NEFTuneCallback, RunCallback
    from nbtune.engine.training.distributed import StopTogether

    config = run.config
    extra = run.method.make_callbacks(run.context, run.total_steps) if run.method.make_callbacks else []
    if config.neftune_alpha:
        extra.append(NEFTuneCallback(config.neftune_alpha))
    extra.append(guard)
    recorder = RunCallback(run, memory)
    if config.sample_every:  # answers to fixed prompts every N steps, left out of the step times
        from nbtune.engine.evaluation.samples import SampleCallback

        extra.append(SampleCallback(run, config.sample_every, leave_out=recorder.leave_out))
    # Before RunCallback, so that every rank stops at the same step.
    first = [StopTogether(run, shared_stop)] if world_size > 1 else []
    return [*first, recorder, *extra]


def finish_trainer(trainer: Any, run: Run) -> Any:
    """Checkpoint settings, quiet console, trackers pointed: the same for every objective's Trainer."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    config = run.config
    trainer.keep_checkpoints = config.keep_checkpoints
    trainer.checkpoint_extra = {"run": run.name, "method": run.method.name}
    trainer.checkpoint_record = run.to_dict  # run.json as it stands at each checkpoint (records/run_folder.py)
    for noisy in (PrinterCallback, ProgressCallback):  # they print every log dict to stdout
        trainer.remove_callback(noisy)
    _point_trackers(trainer, config)
    return trainer


def make_collator(tokenizer: Any, policy: Any) -> Any:
    """What pads every training batch (and `nbtune.preview`'s, so that it shows the same): inputs with the pad
    token, labels with -100, the length rounded up to `policy.pad_to_multiple_of` (8 on a GPU)."""
    from transformers import DataCollatorForSeq2Seq

    return _WithoutLength(DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=policy.pad_to_multiple_of))


def training_arguments(run: Run, policy: Any, *, periodic_eval: bool, scratch: Path) -> Any:
    """transformers' `TrainingArguments` for `run`, on the device and precision `policy` decided."""
    from transformers import TrainingArguments

    return TrainingArguments(**training_argument_values(run, policy, periodic_eval=periodic_eval, scratch=scratch))


def training_argument_values(run: Run, policy: Any, *, periodic_eval: bool, scratch: Path) -> dict[str, Any]:
    """The `TrainingArguments` fields nbtune sets, as keywords (TRL's configs take them too)."""
    from nbtune.engine.training.checkpoints import checkpoint_root

    config = run.config
    check_trackers_installed(config.report_to)  # one line now, not a traceback from the Trainer's constructor
    return dict(
        output_dir=str(checkpoint_root(config, scratch)),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        max_steps=config.steps or -1,
        num_train_epochs=config.epochs or 1.0,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,  # one history record per optimizer step
        logging_nan_inf_filter=False,  # a NaN loss is shown as NaN, not replaced by the running mean
        eval_strategy="steps" if periodic_eval else "no",
        eval_steps=config.eval_steps or None,
        prediction_loss_only=True,  # evaluation reports the loss; logits would only be gathered and dropped
        save_strategy="steps" if config.checkpoint_steps else "no",  # the final artefact is the run's own
        save_steps=config.checkpoint_steps or None,
        report_to=config.report_to,  # transformers' integrations log these arguments, then every step's logs
        run_name=config.name,
        project="nbtune",  # trackio's project (its runs are named by run_name)
        disable_tqdm=True,  # our observers draw progress
        include_num_input_tokens_seen="non_padding",  # for honest tokens/s
        train_sampling_strategy="group_by_length",  # batches of similar length waste little padding
        remove_unused_columns=False,  # keep `length` for the sampler; the collator drops it
        activation_checkpointing=config.gradient_checkpointing and run.method.gradient_checkpointing,
        # autocast around the forward (fp16 with the Trainer's loss scaling); trainable weights stay fp32
        **policy.trainer_precision(config.precision),
        use_cpu=policy.device.type == "cpu",
        # Several processes: DDP need not search for unused parameters unless experts may go unrouted.
        ddp_find_unused_parameters=_may_skip_parameters(run.model),
    )


# A tracker's pip package where it is not the tracker's name, and transformers' check for it where that is
# not `is_<name>_available` (transformers.integrations.integration_utils).
_PIP_NAME = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "dagshub": "dagshub mlflow",
             "flyte": "flytekit flytekitplugins-deck-standard"}
_CHECK = {"azure_ml": "is_azureml_available", "comet_ml": "is_comet_available",
          "flyte": "is_flyte_deck_standard_available"}


def check_trackers_installed(report_to: str | list[str]) -> None:
    """Refuse, naming what to install, a `report_to` tracker whose package is missing; asked with
    transformers' own checks. Kubeflow is no package (transformers enables it inside a Kubeflow TrainJob)."""
    from transformers.integrations import integration_utils

    from nbtune.errors import DependencyError

    for name in [report_to] if isinstance(report_to, str) else report_to:
        if name in ("none", "all", "kubeflow"):
            continue
        check = getattr(integration_utils, _CHECK.get(name, f"is_{name}_available"), None)
        if check is not None and not check():  # None: a newer integration; the Trainer checks it itself
            pip = _PIP_NAME.get(name, name)
            raise DependencyError(f"`report_to: {name}` needs a package that is not installed: pip install {pip} "
                                  f"(or leave {name} out of report_to).", field="report_to")


def tracker_logs_dir(config: Any) -> Path:
    """Where TensorBoard writes a run's event files: beside its output folder, which the final save
    replaces whole (as `<output_dir>-checkpoints` is)."""
    out = config.resolved_output_dir
    return out.with_name(out.name + "-logs")


def _point_trackers(trainer: Any, config: Any) -> None:
    """TensorBoard's event files into `tracker_logs_dir` (unless TENSORBOARD_LOGGING_DIR says where), and
    nbtune's config to the trackers next to the Trainer's arguments that they log themselves."""
    from transformers.integrations import TensorBoardCallback

    boards = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    for board in boards:
        if board.logging_dir is None:  # the Trainer's default is inside its checkpoint folder or our scratch
            board.logging_dir = str(tracker_logs_dir(config))
    if trainer.args.report_to:
        trainer.add_callback(_ConfigToTrackers(config, boards))


class _ConfigToTrackers(TrainerCallback):
    """Logs the run's `RunConfig` (method, options, data...) once training begins, through each tracker's
    own API: TensorBoard as text `nbtune_config`, trackio as `nbtune/<key>` entries of the run's config.
    Other trackers get what transformers sends them: the TrainingArguments and the model's config."""

    def __init__(self, config: Any, boards: list[Any]) -> None:
        self.config, self.boards = config, boards

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        values = self.config.to_json_dict()  # data in memory as a description, not its rows
        text = json.dumps(values, indent=2, default=str)
        for board in self.boards:  # after the TensorBoard callback's own on_train_begin opened its writer
            if board.tb_writer is not None:
                board.tb_writer.add_text("nbtune_config", textwrap.indent(text, "    "))  # markdown: as code
        if "trackio" in args.report_to:
            import trackio

            trackio.config.update({f"nbtune/{key}": value for key, value in values.items()})


def _may_skip_parameters(model: Any) -> bool:
    config = getattr(model, "config", None)
    return any(getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def release_from_trainer(trainer: Any) -> None:
    """Mixed precision wraps the model's forward in an autocast; afterwards the run's model must compute in
    its own dtypes (generation, comparison, saving) as a freshly loaded copy would, and a later Trainer
    (resume) must wrap it again: accelerate refuses to re-prepare a model it marked as prepared."""
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    for module in {id(m): m for m in (model, trainer.model)}.values():
        module.__dict__.pop("_is_accelerate_prepared", None)
    release = getattr(trainer, "nbtune_release", None)  # an objective's own undoing (objectives/trl_pairs.py)
    if release is not None:
        release()



def expected_steps(config: Any, examples: int) -> int:
    """The optimizer steps the Trainer will take (its own arithmetic: a last partial accumulation counts)."""
    if config.steps:
        return config.steps
    batches = math.ceil(examples / config.batch_size)
    per_epoch = max(batches // config.grad_accum + int(batches % config.grad_accum > 0), 1)
    return math.ceil((config.epochs or 1.0) * per_epoch)




@contextmanager
def older_objects_frozen() -> Iterator[None]:
    """Leave the objects that exist before training out of the garbage collector's scans while it trains.

    accelerate's `free_memory()` runs a full `gc.collect()` at the start of every training loop; in a kernel
    that holds a model and transformers' half-million objects that scan takes 0.2-0.3 s, on the way to the
    first loss point (bench/warm_start.py). Frozen objects are skipped by it and by the automatic
    collections during training; the previous run's garbage is collected when that run ends
    (`collect_run_garbage`), so nothing stays pinned.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def collect_run_garbage() -> None:
    """Collect a finished run's reference cycles now, while the user reads its results, rather than at the
    start of the next run (see `older_objects_frozen`), and give what it freed back to the OS: otherwise the
    allocator keeps it (per thread that trained) and the kernel's RSS only ever grows (engine/compute/memory.py)."""
    from nbtune.engine.compute.memory import give_back_to_os

    give_back_to_os()


class _WithoutLength:
    """The Seq2Seq collator (pads labels with -100) minus the `length` column only the sampler needs."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        return self.collator([{k: v for k, v in f.items() if k != "length"} for f in features])


__all__ = [
    "check_trackers_installed",
    "collect_run_garbage",
    "expected_steps",
    "finish_trainer",
    "make_collator",
    "make_trainer",
    "older_objects_frozen",
    "release_from_trainer",
    "run_callbacks",
    "tracker_logs_dir",
    "training_argument_values",
    "training_arguments",
]
