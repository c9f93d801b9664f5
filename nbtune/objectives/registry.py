"""What a run trains for: its objective, the one step where the pipeline picks how examples become tensors
and which Trainer learns from them.

Supervised fine-tuning (`sft`, the default): chat-templated examples, labels on the answers only,
transformers' Trainer with nbtune's answer-only loss. Preference objectives (dpo, orpo, simpo, kto) are
objectives/preference.py's, on TRL's trainers; `engine/training/pipeline.py` is the same for all.
The objective gets the run, the data and the training session's pieces, and returns a Trainer:

    >>> objective_for(RunConfig.parse({})).name                    # doctest: +SKIP
    'sft'
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from nbtune.config.objective import PREFERENCE
from nbtune.objectives.preference import PreferenceTuning

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run
    from nbtune.engine.training.guards import NonFiniteGuard


class Objective(Protocol):
    """How a run turns its records into training sets, and the Trainer that learns from them."""

    name: str

    def tokenize(self, train_records: Any, eval_records: Any, fmt: str, tokenizer: Any,
                 config: RunConfig) -> tuple[Any, Any]:
        """(train set, eval set or None): `datasets.Dataset`s with a `length` column for batching."""
        ...

    def trainer(self, run: Run, train_set: Any, eval_set: Any, memory: PeakSampler, *, guard: NonFiniteGuard,
                scratch: Path, shared_stop: Any = None) -> Any:
        """A ready transformers `Trainer` for `run.model`, reporting into `run` (see engine/training/callbacks.py)."""
        ...


class SupervisedFineTuning:
    """Learn to write the answers: chat template, loss on the answer tokens only (or on everything with
    `train_on_prompt`), batches of similar length."""

    name = "sft"

    def tokenize(self, train_records: Any, eval_records: Any, fmt: str, tokenizer: Any,
                 config: RunConfig) -> tuple[Any, Any]:
        from nbtune.data import tokenize_dataset
        from nbtune.data.splits import data_key

        settings = dict(tokenizer=tokenizer, fmt=fmt, max_length=config.max_length,
                        train_on_prompt=config.train_on_prompt, cache_key=data_key(config))
        train_set = tokenize_dataset(train_records, field="data", **settings)
        eval_set = tokenize_dataset(eval_records, field="eval_data", **settings) if eval_records is not None else None
        return train_set, eval_set

    def trainer(self, run: Run, train_set: Any, eval_set: Any, memory: PeakSampler, *, guard: NonFiniteGuard,
                scratch: Path, shared_stop: Any = None) -> Any:
        from nbtune.engine.training.trainer import make_trainer

        return make_trainer(run, train_set, eval_set, memory, guard=guard, scratch=scratch, shared_stop=shared_stop)


OBJECTIVES: dict[str, Objective] = {"sft": SupervisedFineTuning(),
                                    **{name: PreferenceTuning(name) for name in PREFERENCE}}


def objective_for(config: RunConfig) -> Objective:
    """The objective `config` trains for (`objective:`; preference objectives in objectives/preference.py)."""
    return OBJECTIVES[getattr(config, "objective", "sft")]
