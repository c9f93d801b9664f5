"""The bridge from transformers' Trainer to a `Run`: history records, events, and the Stop request.

The Trainer owns the loop; this callback only reads its state after each step and log, appends one
history record per optimizer step (loss, lr, grad norm, tokens/s, memory) and forwards events to the
run's observers. A stop request (a Stop button, `run.stop()`) ends training after the current step.
What the run's objective logs of its own (a preference run's rewards and margins) is mapped to the run's
names by its spec (`ObjectiveSpec.log_values`): into each step's record, and from each evaluation into
`run.metrics`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from nbtune.engine.compute.memory import cuda_mb
from nbtune.objectives.registry import get_objective

if TYPE_CHECKING:
    from nbtune.engine.compute.memory import PeakSampler
    from nbtune.engine.records.run import Run

# The Trainer's names -> the record's, for every run; each objective declares its own (`log_keys`)
_LOG_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm"}


class RunCallback(TrainerCallback):
    def __init__(self, run: Run, sampler: PeakSampler) -> None:
        self.run = run
        self.sampler = sampler
        self._started = 0.0
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self.run.history and state.global_step:  # resumed in a new process: the checkpoint's log
            self.run.history.extend(_records_from_log(state.log_history, self.run.config.objective))
        # On resume, elapsed time goes on from where the run stopped.
        done = self.run.history[-1]["elapsed_seconds"] if self.run.history else 0.0
        self._last_time = time.perf_counter()
        self._started = self._last_time - done
        self._last_tokens = state.num_input_tokens_seen
        self.run.total_steps = state.max_steps  # the Trainer's own count wins over our estimate

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen - self._last_tokens
        seconds = max(now - self._last_time, 1e-9)
        record = {
            "step": state.global_step,
            "epoch": state.epoch,
            "tokens": tokens,
            "tokens_per_second": tokens / seconds,
            "step_seconds": seconds,
            "elapsed_seconds": now - self._started,
            "rss_mb": self.sampler.observe(),
            **cuda_mb(),
            **self.run.context.step_metrics,
        }
        self.run.history.append(record)
        self._last_time, self._last_tokens = now, state.num_input_tokens_seen
        if self.run.stop_requested:
            control.should_training_stop = True

    def leave_out(self, seconds: float) -> None:
        """Time spent between steps on something else (sampling answers, engine/evaluation/samples.py): not counted in
        the next step's seconds and tokens/s; `elapsed_seconds` still includes it."""
        self._last_time += seconds

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        logs = dict(logs or {})
        self.run.emit("on_log", logs)
        history = self.run.history
        if "loss" not in logs or not history or history[-1]["step"] != state.global_step:
            return
        record = history[-1]
        record.update({ours: logs[theirs] for theirs, ours in _LOG_KEYS.items() if theirs in logs})
        record.update(get_objective(self.run.config.objective).log_values(logs))
        self.run.emit("on_step", record)
        if self.run.stop_requested:  # an observer may have asked during this very step's event
            control.should_training_stop = True

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        metrics = {"step": state.global_step, **(metrics or {})}
        # The objective's held-out numbers (a preference run's reward accuracy and margin, ...) next to eval_loss
        values = get_objective(self.run.config.objective).log_values(metrics, prefix="eval_")
        self.run.metrics.update({key: round(float(value), 4) for key, value in values.items()})
        self.run.eval_history.append(metrics)
        self.run.emit("on_eval", metrics)


def _records_from_log(log_history: list[dict[str, Any]], objective: str) -> list[dict[str, Any]]:
    """History records rebuilt from a checkpoint's `trainer_state.json` (loss, lr, grad norm per step; the
    timings and memory of those steps died with the process that ran them)."""
    records = []
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            record = {"step": entry["step"], "epoch": entry.get("epoch"), "tokens": 0, "tokens_per_second": 0.0,
                      "step_seconds": 0.0, "elapsed_seconds": 0.0, "restored": True}
            record.update({ours: entry[theirs] for theirs, ours in _LOG_KEYS.items() if theirs in entry})
            record.update(get_objective(objective).log_values(entry))
            records.append(record)
    return records


class NEFTuneCallback(TrainerCallback):
    """NEFTune (Jain et al. 2023): uniform noise on the input embeddings, in training mode only.

    Written here rather than using TrainingArguments(neftune_noise_alpha): transformers finds the
    embeddings through a `.model` attribute that GPT-2 style models and peft's prompt methods lack;
    `get_input_embeddings()` works for all. The noise scale is transformers' and the paper's:
    alpha / sqrt(sequence length x hidden size).
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        remove_neftune(model)
        alpha = self.alpha

        def add_noise(module: Any, inputs: Any, output: Any) -> Any:
            if not module.training:
                return output
            scale = alpha / (output.size(1) * output.size(2)) ** 0.5
            return output + torch.zeros_like(output).uniform_(-scale, scale)

        model._nbtune_neftune = model.get_input_embeddings().register_forward_hook(add_noise)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        remove_neftune(model)


def remove_neftune(model: Any) -> None:
    """Take the NEFTune hook off `model`, if there is one (also after an interrupt)."""
    handle = getattr(model, "_nbtune_neftune", None)
    if handle is not None:
        handle.remove()
        model._nbtune_neftune = None


# The share of a run's last steps that `final_loss` averages: enough steps to smooth one batch's noise, few
# enough to describe the model the run ends with.
FINAL_SHARE = 0.1


def loss_summary(history: list[dict[str, Any]]) -> dict[str, float | None]:
    """One meaning per name, over the steps the history logged (one record per optimizer step):
    `train_loss` the mean over the run (the Trainer's and TensorBoard's `train_loss`, here over every step
    of a resumed run too; skipped non-finite steps left out), `final_loss` the mean of its last 10% of
    steps (at least one: what a sweep ranks on), `last_loss` the last step's alone, `first_loss` the first's."""
    losses = [r["loss"] for r in history if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    if not losses:
        return dict.fromkeys(("first_loss", "train_loss", "final_loss", "last_loss"))
    tail = losses[-max(1, round(len(losses) * FINAL_SHARE)):]
    return {"first_loss": losses[0], "train_loss": sum(losses) / len(losses),
            "final_loss": sum(tail) / len(tail), "last_loss": losses[-1]}
