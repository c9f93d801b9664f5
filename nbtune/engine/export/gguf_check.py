"""Checking a written GGUF file by loading it back with transformers' GGUF reader (the way nbtune loads its
own default model) and comparing it with the merged model it was written from: the tokenizer, the logits on
a few prompts, and greedy answers.

Tolerances are on the largest logit difference, relative to the spread (standard deviation) of the merged
model's logits, so they mean about the same on a tiny random model and a real one. Measured: SmolLM2-135M
f16 0.006 of the spread, bf16 0.04, q8_0 0.18; tiny random Llamas (3 seeds) up to 0.014, 0.12, 0.40. The
limits leave room above those; a wrong tensor layout (q/k rows not in llama.cpp's rope order, say) moves the
logits by several times their spread.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbtune.engine.evaluation.generation import _device
from nbtune.errors import NbtuneError

TOLERANCE = {"f16": 0.05, "bf16": 0.3, "q8_0": 0.8}  # max |logit difference| / std(logits)
FALLBACK_PROMPTS = ("What is the capital of France?", "Write one sentence about the sea.",
                    "Convert to ISO 8601: 4 July 1976")
FALLBACK_ANSWER_TOKENS = 24


@dataclass
class GgufCheck:
    """What loading the file back showed. `ok` when the tokenizer agrees, the logits are within tolerance,
    and every greedy answer agrees (or parts at a near-tie: the top two tokens closer than the measured
    difference)."""

    quant: str
    tolerance: float
    max_logit_diff: float = 0.0
    mean_logit_diff: float = 0.0
    logit_spread: float = 0.0
    same_tokens: bool = True
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def relative_diff(self) -> float:
        return self.max_logit_diff / self.logit_spread if self.logit_spread else 0.0

    @property
    def answers_agree(self) -> bool:
        return all(a["agree"] for a in self.answers)

    @property
    def ok(self) -> bool:
        return self.same_tokens and self.relative_diff <= self.tolerance and self.answers_agree

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative_diff": self.relative_diff, "ok": self.ok}

    def summary(self) -> str:
        agreed = sum(a["agree"] for a in self.answers)
        return (f"{self.quant}: max |logit difference| {self.max_logit_diff:.4g} = {self.relative_diff:.4f} of "
                f"the logits' spread (tolerance {self.tolerance}); mean {self.mean_logit_diff:.3g}; "
                f"greedy answers agree on {agreed} of {len(self.answers)} prompts; "
                f"tokenizer {'identical' if self.same_tokens else 'DIFFERS'}")


def check_gguf(path: Path, merged: Any, tokenizer: Any, quant: str, prompts: list[Any],
               max_new_tokens: int) -> GgufCheck:
    """Load `path` back and compare it with `merged` (fp32, on whatever device it is) on `prompts`."""
    import torch

    from nbtune.engine.evaluation.generation import eval_mode

    reloaded, reloaded_tokenizer = load_gguf(path)
    check = GgufCheck(quant=quant, tolerance=TOLERANCE[quant])
    texts = [_prompt_text(tokenizer, p) for p in prompts]
    with torch.no_grad(), eval_mode(merged):
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            theirs = reloaded_tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            check.same_tokens &= bool(torch.equal(ids, theirs))
            ours = merged(ids.to(_device(merged))).logits[0].float().cpu()  # a merged model may sit on a GPU
            _compare_logits(check, ours, reloaded(ids).logits[0])
            check.answers.append(_compare_answers(merged, reloaded, tokenizer, ids, max_new_tokens, check))
    del reloaded
    return check


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(model in fp32, tokenizer) read from a GGUF file by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbtune.engine.training.quiet import no_hf_progress_bars

    path = Path(path)
    try:
        with no_hf_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # the file nbtune just wrote does not read back: say so, with the reader's words
        raise NbtuneError(f"the GGUF file written does not load back with transformers: "
                          f"{type(exc).__name__}: {exc}", field="format") from exc
    model.eval()
    return model, tokenizer


def _compare_logits(check: GgufCheck, ours: Any, theirs: Any) -> None:
    diff = (ours - theirs).abs()
    check.max_logit_diff = max(check.max_logit_diff, float(diff.max()))
    n = len(check.answers)  # prompts compared so far: a running mean over prompts
    check.mean_logit_diff = (check.mean_logit_diff * n + float(diff.mean())) / (n + 1)
    check.logit_spread = max(check.logit_spread, float(ours.std()))


def _compare_answers(merged: Any, reloaded: Any, tokenizer: Any, ids: Any, max_new_tokens: int,
                     check: GgufCheck) -> dict[str, Any]:
    """Greedy answers of both; where they part, whether the merged model's top two tokens were closer than
    the measured logit difference there (a near-tie the quantisation may tip either way)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
    on = ids.to(_device(merged))
    ours = merged.generate(on, attention_mask=torch.ones_like(on), **options)[0, ids.shape[1]:].cpu()
    theirs = reloaded.generate(ids, attention_mask=torch.ones_like(ids), **options)[0, ids.shape[1]:]
    record = {"prompt": tokenizer.decode(ids[0]), "answer": tokenizer.decode(ours, skip_special_tokens=True),
              "gguf_answer": tokenizer.decode(theirs, skip_special_tokens=True), "agree": True, "near_tie": None}
    length = min(len(ours), len(theirs))
    parted = next((i for i in range(length) if ours[i] != theirs[i]), None)
    if parted is None and len(ours) == len(theirs):
        return record
    parted = length if parted is None else parted
    prefix = torch.cat([ids[0], ours[:parted]]).unsqueeze(0)
    logits = merged(prefix.to(_device(merged))).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    gap = float(top[0] - top[1])
    record["near_tie"] = {"token": parted, "top_two_gap": gap}
    record["agree"] = gap <= 2 * check.max_logit_diff
    return record


def _prompt_text(tokenizer: Any, prompt: Any) -> str:
    """The prompt framed by the chat template, or its plain text for a tokenizer without one."""
    from nbtune.engine.evaluation.generation import as_messages

    messages = as_messages(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)
