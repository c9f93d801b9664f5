"""Divergence guard: a NaN or inf gradient never reaches the weights.

The Trainer clips gradients and steps the optimizer whatever they hold; one NaN there turns every
trainable weight into NaN, and the adapter learned so far is gone. This callback wraps the optimizer's
`step` so that a step whose gradients are not all finite is not taken. Then, by `on_nonfinite`:
`stop` ends the run after that step with the weights of the last good one (the run is marked failed,
its message says which step and what to change), `skip` drops that batch and goes on, up to
`MAX_SKIPPED_IN_A_ROW` bad steps in a row. (GradScaler does the same for fp16, for inf only.)
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import TrainerCallback

MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteGuard(TrainerCallback):
    def __init__(self, policy: str = "stop") -> None:
        self.policy = policy
        self.message: str | None = None  # set when the run must end as failed
        self.skipped: list[int] = []  # steps whose update was dropped
        self._bad_step: int | None = None
        self._in_a_row = 0
        self._restore: tuple[Any, Any] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if optimizer is None or model is None:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        original = optimizer.step

        # wraps: keeps the mark torch's LR scheduler put on the step it counts, which it checks for (without
        # it every run warned that optimizer.step() "has been overridden").
        @functools.wraps(original)
        def guarded_step(*step_args: Any, **step_kwargs: Any) -> Any:
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not _all_finite(grads):
                self._bad_step = state.global_step + 1
                optimizer.zero_grad(set_to_none=True)
                return None
            return original(*step_args, **step_kwargs)

        optimizer.step = guarded_step
        self._restore = (optimizer, original)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._bad_step is None:
            self._in_a_row = 0
            return
        step, self._bad_step = self._bad_step, None
        self.skipped.append(step)
        self._in_a_row += 1
        if self.policy == "skip" and self._in_a_row < MAX_SKIPPED_IN_A_ROW:
            return
        why = (f"{self._in_a_row} steps in a row had non-finite gradients (up to step {step})"
               if self.policy == "skip" else f"the loss or gradients became NaN/inf at step {step}")
        self.message = (f"training diverged: {why}; the weights are those of step {step - self._in_a_row}, "
                        "the last good one. Lower `lr`, keep `max_grad_norm` > 0, or use precision: fp32; "
                        "`on_nonfinite: skip` drops bad batches instead.")
        control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.release()

    def release(self) -> None:
        """Give the optimizer its own `step` back (also after an interrupt, which skips on_train_end)."""
        if self._restore is not None:
            optimizer, original = self._restore
            optimizer.step = original
            self._restore = None


def _all_finite(grads: list[torch.Tensor]) -> bool:
    norms = torch._foreach_norm(grads)  # one fused pass; a NaN or inf anywhere makes its norm non-finite
    return bool(torch.isfinite(torch.stack(norms)).all())


__all__ = ["MAX_SKIPPED_IN_A_ROW", "NonFiniteGuard"]
