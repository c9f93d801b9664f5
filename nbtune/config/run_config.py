"""`RunConfig`: everything a fine-tuning run needs, every key typed, defaulted and documented.

A config comes as a `RunConfig`, a dict, YAML text or a YAML file path; method hyperparameters and the
objective's keys sit at the top level beside the run settings (`r: 8` and `beta: 0.1` next to `steps: 60`) and
are checked against the method's and the objective's own `Param`s (objective_keys.py). Every mistake becomes
one `ConfigError` that names the key and the fix. `to_text` writes a config back as the YAML `parse` reads
(nbtune/config/text.py): the picker's cell, `run.to_yaml()`, launch files.

    >>> cfg = RunConfig.parse({"method": "lora", "r": 16, "steps": 30})
    >>> cfg.options["r"], cfg.steps
    (16, 30)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbtune.config.evaluation import check_evaluation_keys, check_metric_spec, metric_text
from nbtune.config.objective_keys import check_objective_keys, take_objective_keys
from nbtune.config.params import FrozenDict, Param, declare_run_settings
from nbtune.config.sweep_space import check_sweep_spec
from nbtune.config.text import config_text
from nbtune.config.trackers import check_trackers
from nbtune.config.unknown_keys import unknown_key
from nbtune.config.yaml_source import load_yaml as load_yaml  # re-exported: its old home
from nbtune.config.yaml_source import read_yaml
from nbtune.errors import ConfigError, NbtuneError
from nbtune.safety import check_output_dir

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
RUN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"  # also a folder name under runs/
# A sweep's trials are `<sweep>/<trial>`: one level of folder under runs/<sweep>/, beside the sweep's study.
RUN_PATH = rf"{RUN_NAME}(/{RUN_NAME})?"


def _p(default: Any, kind: str, help: str, **limits: Any) -> Any:
    """A dataclass field whose metadata carries the `Param` that checks and documents it."""
    return field(default=default, metadata={"param": (kind, help, limits)})


@dataclass(frozen=True)
class RunConfig:
    """A fine-tuning run. Method hyperparameters live in `options` (see `nbtune.methods()`), the objective's
    keys in `objective_options` (nbtune/objectives)."""

    name: str | None = _p(None, "str", "Run name; also the default output folder. Default: <method>-<time>.")
    model: str = _p(DEFAULT_MODEL, "str", "Local model folder or hub id. Default: SmolLM2-135M-Instruct, offline.")
    method: str = _p("lora", "str", "Fine-tuning method; see nbtune.methods().")
    data: Any = _p("demo", "any", "Training data: 'demo', a .jsonl/.json/.csv/.parquet file, a list of dicts, "
                   "a DataFrame, a datasets.Dataset, or a hub dataset name.")
    eval_data: Any = _p(None, "any", "Evaluation data, same forms as `data`. Default: the demo task's held-out "
                        "split for data 'demo', else `eval_split` of `data`, else none.")
    eval_split: float = _p(0.0, "float", "Fraction of `data` held out for evaluation when `eval_data` is unset.",
                           min=0.0, max=0.5, max_exclusive=True)
    format: str = _p("auto", "str", "Data format; 'auto' detects it from the columns (preference: prompt, "
                     "chosen, rejected; unpaired: prompt, completion, label).",
                     choices=("auto", "alpaca", "chat", "prompt_completion", "text", "preference", "unpaired"))
    objective: str = _p("sft", "str", "What the run learns from, a registered objective: sft (the answers), or "
                        "preferences with TRL's trainers: dpo, orpo, simpo (pairs), kto (pairs or labelled single "
                        "answers); its keys (beta, loss_type, ...) beside the run settings. See nbtune/objectives.")
    steps: int | None = _p(None, "int", "Optimizer steps to train for (exclusive with `epochs`).", min=1)
    epochs: float | None = _p(None, "float", "Passes over the data (default 1 when `steps` is unset).",
                              min=0.0, min_exclusive=True)
    batch_size: int = _p(8, "int", "Examples per forward pass.", min=1, max=4096)
    grad_accum: int = _p(1, "int", "Forward passes per optimizer step (effective batch = batch_size x this).",
                         min=1, max=4096)
    lr: float | None = _p(None, "float", "Peak learning rate. Default: the method's (2e-4 for LoRA, 2e-5 full).",
                          min=0.0, min_exclusive=True, max=1.0)
    lr_scheduler: str = _p("cosine", "str", "Learning-rate schedule after warmup.",
                           choices=("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = _p(0, "int", "Steps of linear warmup.", min=0)
    weight_decay: float = _p(0.0, "float", "AdamW weight decay.", min=0.0, max=1.0)
    max_grad_norm: float = _p(1.0, "float", "Gradient clipping norm (0 turns clipping off).", min=0.0)
    max_length: int = _p(512, "int", "Longest sequence in tokens; longer examples are truncated.",
                         min=8, max=1_048_576)
    train_on_prompt: bool = _p(False, "bool", "Also compute the loss on prompt tokens (default: answers only).")
    seed: int = _p(42, "int", "Random seed for initialisation, shuffling and dropout.", min=0)
    precision: str | None = _p(None, "str", "Compute precision: bf16 or fp16 autocast (fp16 with loss scaling) "
                               "with fp32 trainable weights, or fp32. Default: bf16 where the hardware runs it "
                               "natively (AVX512-BF16/AMX CPUs, GPUs from Ampere on), fp16 on older GPUs (T4), "
                               "else fp32; see nbtune/engine/compute/device.py.", choices=("bf16", "fp16", "fp32"))
    dtype: str | None = _p(None, "str", "Weight dtype of the base model. Default: bfloat16 when `precision` is "
                           "bf16 and the method keeps the base frozen, else float32.",
                           choices=("float32", "bfloat16", "float16"))
    quantization: str | None = _p(None, "str", "Base weights in 4-bit NF4 or 8-bit (bitsandbytes); default: "
                                  "the method's (none, 4bit for qlora).", choices=("none", "4bit", "8bit"))
    memory_check: bool = _p(True, "bool", "Refuse a run whose estimated memory need exceeds what is available "
                            "(with what to change); false: try anyway.")
    trust_remote_code: bool = _p(False, "bool", "Run Python code that ships with the model (its own modelling "
                                 "files). Only for models you trust; never needed for the default model.")
    gradient_checkpointing: bool | None = _p(None, "bool", "Recompute activations in backward: less memory, slower "
                                             "steps. Default: on for a quantized base on a GPU (memory is what "
                                             "QLoRA is for) and when the run fits in memory only with it, else off.")
    num_processes: int = _p(1, "int", "Processes to train in (accelerate DDP; the global batch is batch_size x "
                            "grad_accum x this). From a notebook nbtune launches them; under `accelerate launch` "
                            "or `torchrun` the launcher's count is used.", min=1, max=4096)
    logits_on_labels_only: bool = _p(True, "bool", "Run the LM head and loss only where labels are (same loss, "
                                     "less time and memory); false: the model's own full-logits loss.")
    neftune_alpha: float | None = _p(None, "float", "NEFTune: uniform noise of this scale on the input "
                                     "embeddings while training (5 is the paper's default); works with every "
                                     "method.", min=0.0, min_exclusive=True)
    eval_steps: int = _p(0, "int", "Evaluate the loss every N steps (0: only at the end).", min=0)
    on_nonfinite: str = _p("stop", "str", "When a loss or gradient turns NaN/inf: `stop` keeps the last good "
                           "weights and ends the run; `skip` drops that batch and goes on.",
                           choices=("stop", "skip"))
    checkpoint_steps: int = _p(0, "int", "Save a verified, resumable checkpoint every N steps into "
                               "<output_dir>-checkpoints (0: only when a run is stopped).", min=0)
    keep_checkpoints: int = _p(2, "int", "How many of the newest periodic checkpoints to keep.", min=1, max=1000)
    metric: Any = _p("auto", "any", "Task metrics of generated answers on the eval rows, one name or a list: "
                     "exact_match, token_f1, rouge_l, bleu, chrf (sacrebleu), eval_loss, perplexity, a "
                     "'module:function' path or a Python function (prediction, reference) -> float. 'auto': "
                     "exact_match for the demo task, else none; 'none': no generation at the end.")
    metric_samples: int = _p(64, "int", "Eval examples the task metrics generate answers for (the predictions "
                             "table's rows).", min=1)
    sample_every: int = _p(0, "int", "Every N steps, answer `sample_prompts` and show the answers in the live "
                           "panel (0: never).", min=0)
    sample_prompts: Any = _p(None, "any", "Fixed prompts (text or chat messages) answered every `sample_every` "
                             "steps. Default: the first 3 eval prompts.")
    cv: int = _p(0, "int", "Cross-validation: train k runs, each holding out one of k folds of `data` for "
                 "evaluation, on the one cached base; reports each fold and mean +- std (0: off).", min=0)
    cv_fold: int | None = _p(None, "int", "Which fold (1..cv) this run holds out; unset: every fold, one run "
                             "each.", min=1)
    sweep: Any = _p(None, "any", "Hyperparameter search: settings and method options mapped to lists or "
                    "distributions, plus trials, objective, sampler, pruner; trials run on the one cached base "
                    "(see nbtune/config/sweep_space.py).")
    output_dir: str | None = _p(None, "str", "Where the final adapter or weights are saved: any folder (relative, "
                                "absolute or ~), new or empty; an earlier save there is replaced, other files are "
                                "never touched. Default: runs/<name>.")
    save: bool = _p(True, "bool", "Save the result to `output_dir` when training ends.")
    report_to: str | list[str] = _p("none", "names", "Experiment trackers the Trainer logs to, one name or a list, "
                                    "as transformers names them (tensorboard, trackio, mlflow, wandb, comet_ml, "
                                    "...; 'all': every one installed). TensorBoard writes to <output_dir>-logs.")
    options: dict[str, Any] = field(default_factory=dict, metadata={"param": None})
    objective_options: dict[str, Any] = field(default_factory=dict, metadata={"param": None})
    # Settings filled in from other settings (epochs, lr, quantization) with the value they got: a
    # re-parse drops those still at that value, so `parse(cfg, steps=5)` does not trip over an `epochs: 1`
    # that `cfg` derived itself, while a value the user set or edited since is kept.
    derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, metadata={"param": None})
    # The `sweep:` block parsed (config/sweep_space.SweepSpec): checked once, here, and read by the sweep.
    sweep_space: Any = field(default=None, repr=False, compare=False, metadata={"param": None})

    # ---------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, source: RunConfig | Mapping[str, Any] | str | Path | None = None, **overrides: Any) -> RunConfig:
        """Build a validated config from a RunConfig, dict, YAML text or YAML file, then apply `overrides`.

        A parsed config is frozen: given one without overrides, `parse` returns it as it is (it was checked
        when it was made); `config.with_changes(...)` makes another, checked again."""
        if isinstance(source, RunConfig) and not overrides:
            return source
        if isinstance(source, RunConfig):
            raw = source.to_dict()
            for key, value in source.derived.items():
                if raw.get(key) == value:
                    del raw[key]
        elif source is None:
            raw = {}
        elif isinstance(source, Mapping):
            raw = dict(source)
        elif isinstance(source, (str, Path)):
            raw = read_yaml(source)
        else:
            raise ConfigError(f"config must be a RunConfig, dict or YAML text, got {type(source).__name__}.")
        return _build(overlay(raw, overrides))

    def with_changes(self, *, derived: bool = False, **changes: Any) -> RunConfig:
        """This config with `changes` (any key a config takes, a method option too), checked as a whole again.
        `derived=True` records the changed values as filled in by nbtune (a preflight's choice), not set by the
        user: `to_text()` leaves them out and a re-parse may choose again."""
        changed = RunConfig.parse(self, **changes)
        if derived:
            _set(changed, derived=FrozenDict({**changed.derived, **changes}))
        return changed

    def to_dict(self) -> dict[str, Any]:
        """Flat dict (the objective's keys after `objective`, method options at the end), the shape `parse` accepts."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name not in _NESTED and f.name != "sweep_space":
                out[f.name] = getattr(self, f.name)
            if f.name == "objective":
                out.update(self.objective_options)
        out.update(self.options)
        return out

    def to_text(self, omit: str | Iterable[str] = ("derived",)) -> str:
        """YAML that `parse` reads back into an equal config (data in memory as its rows). `omit` leaves out
        "derived" values (the default), "defaults" (`method` stays) and keys by name; see nbtune/config/text.py."""
        return config_text(self, omit)

    def to_json_dict(self) -> dict[str, Any]:
        """Like `to_dict` plus `derived`, with in-memory data (lists, DataFrames) replaced by a description."""
        out = {**self.to_dict(), "derived": dict(self.derived)}
        for key in ("data", "eval_data"):
            if out[key] is not None and not isinstance(out[key], (str, int, float, bool)):
                out[key] = f"<{type(out[key]).__name__}>"
        out["metric"] = metric_text(out["metric"])
        return out

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser() if self.output_dir else Path("runs") / str(self.name)


_EXCLUSIVE = {"steps": "epochs", "epochs": "steps"}
_NESTED = ("options", "objective_options", "derived")  # kept apart in a RunConfig, flat in its dict and YAML


def overlay(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The layers' keys, each layer over the ones before it. A length set in a higher layer replaces the
    other kind of length from lower ones: a cell's `epochs: 2` over a project default `steps: 100` means
    2 epochs, not a conflict."""
    out: dict[str, Any] = {}
    for higher in layers:
        for key in higher:
            partner = _EXCLUSIVE.get(key)
            if partner is not None and partner not in higher and higher[key] is not None:
                out.pop(partner, None)
        out.update(higher)
    return out


def without_other_methods_options(config: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`config` less the keys that only `defaults` set and that are options of some other method than the
    chosen one: a project default `r: 16` is for LoRA runs, not an error in an IA3 cell."""
    from nbtune.methods import get_method
    from nbtune.methods.registry import all_methods

    try:
        method = get_method(config.get("method", RunConfig.method))
    except NbtuneError:
        return config  # an unknown method: the config check names it
    foreign = {name for m in all_methods() for name in m.option_names()} - set(method.option_names())
    return {k: v for k, v in config.items() if not (k in foreign and k in defaults and defaults[k] == v)}


def common_params() -> dict[str, Param]:
    """The run settings (not method options) as `Param`s, in declaration order."""
    params = {}
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("param") is None:
            continue
        kind, help_text, limits = f.metadata["param"]
        nullable = f.default is None
        params[f.name] = Param(f.name, kind, f.default, help_text, nullable=nullable, **limits)
    return params


def common_param_names() -> tuple[str, ...]:
    return (*common_params(), *_NESTED)


def _build(raw: dict[str, Any]) -> RunConfig:
    from nbtune.methods import get_method

    raw = dict(raw)
    derived_before = raw.pop("derived", None) or {}  # as run.json stores it
    for key, value in derived_before.items():
        if raw.get(key) == value:
            del raw[key]
    nested = raw.pop("options", None) or {}
    if not isinstance(nested, Mapping):
        raise ConfigError("`options` must be a mapping of method options.", field="options")
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}.")
    common = common_params()
    values = {name: param.check(raw.pop(name, param.default)) for name, param in common.items()}
    method = get_method(values["method"])
    values["method"] = method.name  # as registered, whatever the case it was written in
    objective, objective_raw = take_objective_keys(values, raw, method)  # the rest are the method's
    option_raw = {**nested, **raw}
    unknown = [k for k in option_raw if k not in method.option_names()]
    if unknown:
        raise unknown_key(unknown[0], option_raw[unknown[0]], method,
                           {**common, **{p.name: p for p in objective.params}})
    # Built, then filled in and checked while it is still being made (`_set`); frozen from then on.
    config = RunConfig(**values)
    _check_cross_fields(config, method)
    check_objective_keys(config, objective, objective_raw)
    _set(config, options=method.check_options(option_raw, config))
    objective.check_method(method, config.options)  # after the method's options: PiSSA is an `init` of lora
    _derive_precision(config, method)
    if config.sweep is not None:  # the search space, parsed once: the sweep reads it from here
        _set(config, sweep_space=check_sweep_spec(config.sweep, config))
    _set(config, options=FrozenDict(config.options), objective_options=FrozenDict(config.objective_options),
         derived=FrozenDict(config.derived))
    return config


def _set(config: RunConfig, **values: Any) -> None:
    """Fill in a config that is still being made (frozen dataclasses take values only through __init__)."""
    for key, value in values.items():
        object.__setattr__(config, key, value)


_NAMES_GIVEN: set[str] = set()


def _derive(config: RunConfig, **values: Any) -> None:
    """Fill in settings the user left unset, remembering that nbtune chose them (`derived`)."""
    _set(config, **values)
    config.derived.update(values)


def _fresh_name(method: str) -> str:
    # Two runs started in the same second must not share a name (and so an output folder).
    stem = f"{method}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    name, n = stem, 1
    while name in _NAMES_GIVEN:
        n += 1
        name = f"{stem}-{n}"
    _NAMES_GIVEN.add(name)
    return name


def _derive_precision(config: RunConfig, method: Any) -> None:
    from nbtune.engine.compute.precision import default_dtype, default_precision

    if config.precision is None:
        _derive(config, precision=default_precision(str(config.quantization)))
    if config.dtype is None:
        frozen = method.keeps_base(config.options)  # an adapter that leaves the base weights as they are
        _derive(config, dtype=default_dtype(config.precision, frozen, str(config.quantization)))
    from nbtune.engine.compute import device

    if config.gradient_checkpointing is None:
        quantized = str(config.quantization) != "none"
        _derive(config, gradient_checkpointing=quantized and device.current().gradient_checkpointing_when_quantized)
    refusal = device.current().refuse_precision(config.precision)
    if refusal:
        raise ConfigError(f"`precision: {config.precision}`: {refusal}", field="precision")


def _check_cross_fields(config: RunConfig, method: Any) -> None:
    if config.steps is not None and config.epochs is not None:
        raise ConfigError("set either `steps` or `epochs`, not both.", field="steps")
    if config.epochs is None and config.steps is None:
        _derive(config, epochs=1.0)
    if config.quantization is None:
        _derive(config, quantization=method.default_quantization)
    if config.quantization not in method.quantization:
        allowed = ", ".join(method.quantization)
        raise ConfigError(
            f"`quantization: {config.quantization}` does not work with method {method.name!r} "
            f"(it allows: {allowed}). Use `method: qlora` or `lora` for a quantized base.",
            field="quantization",
        )
    if config.lr is None:
        _derive(config, lr=method.default_lr)
    if config.name is None:
        _set(config, name=_fresh_name(method.name))
    if not re.fullmatch(RUN_PATH, config.name):
        raise ConfigError(
            f"`name` {config.name!r} must be 1-100 letters, digits, '_', '.' or '-' (it names a folder), or "
            "two such names joined by '/' (a sweep's trial: `<sweep>/<trial>`).",
            field="name",
        )
    check_output_dir(config.resolved_output_dir)
    _set(config, report_to=check_trackers(config.report_to), metric=check_metric_spec(config.metric))
    check_evaluation_keys(config)
    if isinstance(config.data, str) and not config.data.strip():
        raise ConfigError("`data` is empty; give 'demo', a file path or a dataset.", field="data")


declare_run_settings(common_params(), (*_NESTED, "sweep_space"))  # for the registries and sweep blocks (params.py)
