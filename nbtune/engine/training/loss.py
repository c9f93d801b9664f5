"""The training loss computed where the labels are, and nowhere else.

A causal LM's head turns every position's hidden state into a row of vocabulary logits (49,152 for
SmolLM2) and its loss then ignores every position whose label is -100: the prompt, the chat template, the
padding. On instruction data that is most of the sequence (the demo task: about 11 answer tokens of about
70), so most of the head's matmul, most of the logits' memory and most of the cross-entropy work are
thrown away. Here a forward pre-hook on the output head hands it only the hidden states of the positions
that have a label, and the cross-entropy runs on those rows: the same loss and the same gradients, for
a fraction of the head's time and memory.

Hand-written because no maintained library does this on a CPU for any Hugging Face causal LM behind
peft: transformers' `logits_to_keep` keeps one set of positions for the whole batch (ours differ per
row), and fused linear cross-entropy kernels (Liger) are GPU-only and model-specific.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

IGNORE = -100


class AnswerOnlyLossTrainer(Trainer):
    """`Trainer` whose loss evaluates the LM head only at labelled positions (see the module docstring).

    Falls back to the model's own loss where the trick does not apply: no labels, no output head, or a
    model whose head output does not come back as (1, rows, vocab).
    """

    def __init__(self, *args: Any, labels_only: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.labels_only = labels_only

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        head = _output_head(model) if self.labels_only else None
        if head is None or inputs.get("labels") is None:
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule for the model's loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        targets = labels[:, 1:]  # position p predicts token p + 1
        keep = targets != IGNORE
        handle = head.register_forward_pre_hook(_keep_positions(labels.shape[1], keep))
        try:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        finally:
            handle.remove()
        logits = outputs.logits
        if logits.dim() != 3 or logits.shape[:2] != (1, int(keep.sum())):
            self.labels_only = False  # this model reshapes its head output: use its own loss from now on
            return self.compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = F.cross_entropy(logits[0].float(), targets[keep], reduction="sum")
        loss = self._normalise(loss, int(keep.sum()), num_items_in_batch)
        loss = loss + self._router_aux_loss(model, outputs)
        return (loss, outputs) if return_outputs else loss

    def _normalise(self, loss: torch.Tensor, local_items: int, num_items_in_batch: Any) -> torch.Tensor:
        """Mean over the label tokens of the whole accumulated batch (the Trainer counts them across
        micro-batches and processes), as transformers' own causal-LM loss does with `num_items_in_batch`."""
        if num_items_in_batch is None:
            self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by accumulation
            return loss / max(local_items, 1)
        self.loss_is_scaled_for_ga = True
        total = num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        loss = loss / total
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            loss = loss * self.accelerator.num_processes  # gradients are averaged over processes afterwards
        return loss

    def _router_aux_loss(self, model: Any, outputs: Any) -> torch.Tensor | float:
        """Mixture-of-experts models add their load-balancing loss only when they get labels: add it here."""
        aux = getattr(outputs, "aux_loss", None)
        if aux is None:
            return 0.0
        coefficient = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)
        if self.loss_is_scaled_for_ga:
            coefficient = coefficient / max(self.current_gradient_accumulation_steps, 1)
        return coefficient * aux


def _output_head(model: Any) -> torch.nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return head if isinstance(head, torch.nn.Module) else None


def _keep_positions(length: int, keep: torch.Tensor) -> Any:
    """A pre-hook giving the head (1, labelled rows, hidden) instead of (batch, positions, hidden)."""

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        # Prompt tuning and P-tuning put virtual tokens in front of the sequence; skip past them.
        offset = hidden.shape[1] - length
        picked = hidden[:, offset:offset + keep.shape[1]][keep]
        return (picked.unsqueeze(0), *args[1:])

    return hook
