"""Other libraries' names for nbtune's config keys, so that a config copied from a Trainer, peft or TRL
script is answered with nbtune's key (`learning_rate` -> `lr`), not a did-you-mean to a look-alike.

    >>> foreign_name("max_steps").key
    'steps'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- other libraries' names for nbtune's keys
# A config copied from a Trainer, peft or TRL script spells settings their way, and the nbtune key spelt
# most like `max_steps` is `eval_steps`: these names are looked up before any did-you-mean.


@dataclass(frozen=True)
class ForeignName:
    """What nbtune calls a setting that another library names differently."""

    whose: str  # whose name it is, for the message: "the Trainer's name"
    key: str | None = None  # nbtune's key; None where there is no key-for-key equivalent
    values: Mapping[Any, Any] = field(default_factory=dict)  # their value -> nbtune's (None: the default)
    advice: str = ""  # what to do instead where `key` is None
    # Options a method must also have for `key` to mean the same there (prompt tuning's `init` is not
    # LoRA's).
    family: tuple[str, ...] = ()

    def value(self, theirs: Any) -> Any:
        """nbtune's value for their value; one the map does not name is kept (`init_lora_weights: pissa`)."""
        return self.values.get(theirs, theirs) if isinstance(theirs, (bool, int, float, str)) else theirs


_TRAINER, _PEFT, _TRL, _HF, _ELSE = ("the Trainer's name", "peft's LoraConfig name", "TRL's SFTConfig name",
                                     "transformers' name", "a name other tools use")
_FOREIGN: dict[str, ForeignName] = {}
for _key, _whose, _names in (
    ("lr", _TRAINER, "learning_rate"), ("lr", _ELSE, "lr_rate base_lr"),
    ("steps", _TRAINER, "max_steps"), ("steps", _ELSE, "num_steps train_steps total_steps training_steps max_iters"),
    ("epochs", _TRAINER, "num_train_epochs"), ("epochs", _ELSE, "num_epochs n_epochs epoch"),
    ("batch_size", _TRAINER, "per_device_train_batch_size train_batch_size per_gpu_train_batch_size"),
    ("batch_size", _ELSE, "micro_batch_size batchsize bs"),
    ("grad_accum", _TRAINER, "gradient_accumulation_steps"),
    ("grad_accum", _ELSE, "gradient_accumulation accumulation_steps grad_accum_steps"),
    ("lr_scheduler", _TRAINER, "lr_scheduler_type"), ("lr_scheduler", _ELSE, "scheduler lr_schedule"),
    ("warmup_steps", _ELSE, "num_warmup_steps warmup"),
    ("max_length", _TRL, "max_seq_length"), ("max_length", _HF, "model_max_length"),
    ("max_length", _ELSE, "max_seq_len seq_len seq_length sequence_len max_len max_sequence_length cutoff_len"),
    ("model", _TRAINER, "model_name_or_path"), ("model", _ELSE, "model_name model_id base_model"),
    ("data", _TRAINER, "train_file train_dataset"),
    ("data", _ELSE, "dataset dataset_name dataset_path data_path train_data data_files"),
    ("eval_data", _TRAINER, "validation_file eval_dataset"), ("eval_data", _ELSE, "eval_file val_data valid_file"),
    ("eval_split", _ELSE, "val_size val_set_size validation_split test_size"),
    ("name", _TRAINER, "run_name"), ("checkpoint_steps", _TRAINER, "save_steps"),
    ("keep_checkpoints", _TRAINER, "save_total_limit"), ("neftune_alpha", _TRAINER, "neftune_noise_alpha"),
    ("dtype", _HF, "torch_dtype"), ("num_processes", _ELSE, "nproc_per_node num_gpus n_gpus world_size"),
    ("train_on_prompt", _ELSE, "train_on_inputs"),
    ("r", _ELSE, "lora_r lora_rank rank"), ("alpha", _PEFT, "lora_alpha"), ("dropout", _PEFT, "lora_dropout"),
    ("target_modules", _ELSE, "lora_target_modules lora_target"), ("rslora", _PEFT, "use_rslora"),
):
    _FOREIGN.update(dict.fromkeys(_names.split(), ForeignName(_whose, _key)))
_FOREIGN.update({
    "bf16": ForeignName(_TRAINER, "precision", {True: "bf16", False: "fp32"}),
    "load_in_4bit": ForeignName(_HF, "quantization", {True: "4bit", False: "none"}),
    "load_in_8bit": ForeignName(_HF, "quantization", {True: "8bit", False: "none"}),
    "use_dora": ForeignName(_PEFT, "method", {True: "dora", False: None}),
    "init_lora_weights": ForeignName(_PEFT, "init", {True: "default"}, family=("r", "rslora")),
    "completion_only_loss": ForeignName(_TRL, "train_on_prompt", {True: False, False: True}),
    "assistant_only_loss": ForeignName(_TRL, "train_on_prompt", {True: False, False: True}),
    "warmup_ratio": ForeignName(_TRAINER, advice="nbtune has no warmup ratio; set `warmup_steps` (steps of "
                                "linear warmup)"),
    "fp16": ForeignName(_TRAINER, advice="nbtune has no fp16 autocast; set `precision: bf16` or `fp32` "
                        "(and `dtype: float16` for float16 base weights)"),
    "eval_strategy": ForeignName(_TRAINER, advice="nbtune evaluates every `eval_steps` steps (0: only at the "
                                 "end); set `eval_steps`"),
    "save_strategy": ForeignName(_TRAINER, advice="nbtune checkpoints every `checkpoint_steps` steps (0: only "
                                 "when a run is stopped); set `checkpoint_steps`"),
    "per_device_eval_batch_size": ForeignName(_TRAINER, advice="nbtune evaluates with `batch_size`; drop it"),
    "dataset_text_field": ForeignName(_TRL, advice="nbtune trains plain text from a column named `text`; "
                                      "rename the column"),
    "resume_from_checkpoint": ForeignName(_TRAINER, advice="continue a stopped run with `run.resume()` or "
                                          "`%finetune NAME --resume`"),
    "task_type": ForeignName(_PEFT, advice="nbtune always tunes a causal LM; drop it"),
})
_FOREIGN["evaluation_strategy"] = _FOREIGN["eval_strategy"]


def foreign_name(name: str) -> ForeignName | None:
    """nbtune's equivalent of a setting named `name` by transformers, peft, TRL or other trainers, if any."""
    return _FOREIGN.get(name.lower())


def foreign_names() -> list[str]:
    """Every name `foreign_name` knows."""
    return list(_FOREIGN)
