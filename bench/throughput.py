"""Benchmark: nbtune LoRA vs the same job written by hand with transformers' Trainer + peft, on SmolLM2.

    python bench/throughput.py [--pairs 2] [--steps 30] [--batch-size 8] [--no-metric]
    python bench/throughput.py --against /tmp/before   # this checkout's nbtune vs another commit's, paired

Both jobs: SmolLM2-135M-Instruct (hand: fp32, as from_pretrained and the Trainer default to; nbtune: its
defaults, bf16 autocast and a bf16 base on CPUs with AVX512-BF16/AMX), LoRA r=8 alpha=16 dropout=0.05 on
all linear layers, the demo train rows rendered with the chat template and the loss on the answer tokens
only, lr 1e-3 with the Trainer's default linear decay (nbtune is told `lr_scheduler: linear` to match),
seed 42, same batch size and steps. The hand job is a user's plain script: random sampler,
`DataCollatorForSeq2Seq(padding=True)`, Trainer defaults otherwise. nbtune adds its own choices (length-
grouped batches, padding to a multiple of 8, its default precision, fast LoRA dropout; see
`bench/speedups.py` for what each is worth). Each job runs in its own fresh process, in the order hand,
nbtune, hand, nbtune ...

Measured in each job, identically (bench/common.py `StepMeter`): tokens/s = attention_mask tokens of steps
3..N over their wall time (steps 1-2 pay for oneDNN kernel creation); peak RSS = the process's VmHWM when
training ends (model load included, generation not); final loss = mean logged loss of the last 5 steps;
held-out loss = cross-entropy per answer token on the 64 held-out demo rows; exact match on the same rows,
greedy, 16 new tokens. Both by one helper applied to both models, as trained (nbtune's in its default
precision: bf16 autocast and a bf16 base on CPUs with AVX512-BF16/AMX).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from typing import Any

from common import MeterObserver, StepMeter, encode, median_min, report, run_child, versions, vmhwm_mb, write_result

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LR, SEED = 1e-3, 42
WARMUP_STEPS = 2  # left out of tokens/s
LAST_LOSSES = 5  # final train loss = mean of the logged losses of the last 5 steps
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}


def hand_job(rows: list[dict[str, str]], steps: int, batch_size: int, meter: StepMeter) -> tuple[Any, Any]:
    """What a user writes without nbtune: tokenizer, chat template, masked labels, peft, Trainer."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    resolve_model = engine_part("bases.loading", "models").resolve_model

    path = resolve_model(MODEL)  # the same local safetensors folder nbtune loads
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train = datasets.Dataset.from_list(rows).map(lambda row: encode(tokenizer, row),
                                                 remove_columns=["prompt", "completion"])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    set_seed(SEED)  # as nbtune does right before adding the adapter: same LoRA initialisation
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))

    class StepEnd(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:  # once per step (logging_steps=1); the final summary has no "loss"
                meter.step_end(logs["loss"])

    with tempfile.TemporaryDirectory(prefix="bench-hand-") as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=LR, seed=SEED, logging_steps=1, save_strategy="no",
                                 report_to="none")
        trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[StepEnd()])
        meter.attach(model)
        trainer.train()
    return model, tokenizer


def nbtune_job(rows: list[dict[str, str]], steps: int, batch_size: int, meter: StepMeter) -> tuple[Any, Any]:
    """The same job through nbtune's public API; an observer feeds the same meter."""
    import nbtune

    # data as a list (not "demo"): no held-out eval loss after training, which the hand job has not either.
    run = nbtune.finetune({"model": MODEL, "method": "lora", **LORA, "data": rows, "steps": steps,
                           "batch_size": batch_size, "lr": LR, "lr_scheduler": "linear", "seed": SEED,
                           "metric": "none", "save": False}, observers=[MeterObserver(meter)])
    return run.model, run.tokenizer


def exact_match(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Share of held-out rows whose greedy answer (16 new tokens) equals the reference: nbtune's own
    generation helper (chat template, left-padded batches), applied the same way to both jobs' models."""
    generation = engine_part("evaluation.generation", "generation")
    share_equal, generate_texts = generation.exact_match, generation.generate_texts

    answers = generate_texts(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=16)
    return share_equal(answers, [r["completion"] for r in rows])


def heldout_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean cross-entropy per answer token on held-out rows, one row at a time (no padding), the model
    as trained and in eval mode: one definition for both jobs, unlike their differently batched train losses."""
    import torch

    inference_precision = engine_part("compute.precision", "precision").inference_precision

    model.eval()
    total = count = 0.0
    with torch.no_grad(), inference_precision(model):  # what nbtune evaluates with; no-op for fp32 models
        for row in rows:
            enc = encode(tokenizer, row)
            labels = torch.tensor([enc["labels"]])
            logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / count


def child(variant: str, steps: int, batch_size: int, metric: bool) -> None:
    from nbtune.data.demo import demo_splits

    warnings.simplefilter("ignore")
    train, test = demo_splits()
    meter = StepMeter()
    model, tokenizer = (hand_job if variant == "hand" else nbtune_job)(train, steps, batch_size, meter)
    peak = vmhwm_mb()  # before generation: this is the training job's peak
    meter.detach()
    if len(meter.steps) != steps:
        raise RuntimeError(f"{variant}: measured {len(meter.steps)} steps, expected {steps}")
    losses = [s["loss"] for s in meter.steps[-LAST_LOSSES:]]
    report({"variant": variant, **meter.steady(WARMUP_STEPS), "peak_rss_mb": peak,
            "final_loss": statistics.fmean(losses), "first_loss": meter.steps[0]["loss"],
            "heldout_loss": heldout_loss(model, tokenizer, test), "dtype": str(next(model.parameters()).dtype),
            "exact_match": exact_match(model, tokenizer, test) if metric else None})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-metric", action="store_true", help="skip the exact-match generation")
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="instead of the hand job, pair this checkout's nbtune with the nbtune in CHECKOUT (a "
                             "git worktree of another commit): did a change slow training down?")
    parser.add_argument("--child", choices=("hand", "nbtune"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    if args.child:
        return child(args.child, args.steps, args.batch_size, not args.no_metric)
    job = ["--steps", str(args.steps), "--batch-size", str(args.batch_size)] + (["--no-metric"] * args.no_metric)
    if args.against:
        return against(args.against, job, args.pairs)
    pairs = []
    for i in range(args.pairs):
        hand = run_child(sys.argv[0], ["--child", "hand", *job])
        ours = run_child(sys.argv[0], ["--child", "nbtune", *job])
        pairs.append({"pair": i + 1, "hand": hand, "nbtune": ours,
                      "tokens_per_second_ratio": ours["tokens_per_second"] / hand["tokens_per_second"],
                      "peak_rss_ratio": ours["peak_rss_mb"] / hand["peak_rss_mb"]})
        print(f"pair {i + 1}: tok/s hand {hand['tokens_per_second']:.0f}, nbtune {ours['tokens_per_second']:.0f}; "
              f"peak RSS hand {hand['peak_rss_mb']:.0f} MB, nbtune {ours['peak_rss_mb']:.0f} MB", flush=True)

    def em(r: dict[str, Any]) -> str:
        return "-" if r["exact_match"] is None else f"{r['exact_match']:.3f}"

    print("\n| pair | job | tokens/s | padding % | s/step (median) | peak RSS MB | final train loss | "
          "held-out loss | exact match |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for p in pairs:
        for name in ("hand", "nbtune"):
            r = p[name]
            print(f"| {p['pair']} | {name} | {r['tokens_per_second']:.0f} | {100 * r['padding_share']:.1f} | "
                  f"{r['median_step_seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['final_loss']:.4f} | "
                  f"{r['heldout_loss']:.4f} | {em(r)} |")
    speed = median_min([p["tokens_per_second_ratio"] for p in pairs])
    memory = median_min([p["peak_rss_ratio"] for p in pairs])
    print(f"\nnbtune / hand, per pair: tokens/s {[round(p['tokens_per_second_ratio'], 3) for p in pairs]} "
          f"(median {speed['median']}, min {speed['min']}); peak RSS {[round(p['peak_rss_ratio'], 3) for p in pairs]} "
          f"(median {memory['median']}, min {memory['min']})")
    write_result("throughput", {"settings": {"steps": args.steps, "batch_size": args.batch_size, "lr": LR,
                                             "seed": SEED, "lora": LORA, "warmup_steps_excluded": WARMUP_STEPS,
                                             "metric": not args.no_metric},
                                "pairs": pairs, "tokens_per_second_ratio": speed, "peak_rss_ratio": memory,
                                "versions": versions("datasets")})


def engine_part(now: str, before: str) -> Any:
    """An engine module by its path today (`nbtune.engine.<now>`) or before the engine was split into rooms
    (`nbtune.engine.<before>`): `--against` runs this script on an older checkout's nbtune."""
    import importlib

    try:
        return importlib.import_module(f"nbtune.engine.{now}")
    except ModuleNotFoundError:
        return importlib.import_module(f"nbtune.engine.{before}")


def against(checkout: str, job: list[str], pairs: int) -> None:
    """Pairs of (nbtune from `checkout`, nbtune from here), alternating, each in a fresh process."""
    rows = []
    for i in range(pairs):
        before = run_child(sys.argv[0], ["--child", "nbtune", *job], nbtune_from=checkout)
        after = run_child(sys.argv[0], ["--child", "nbtune", *job])
        rows.append({"pair": i + 1, "before": before, "after": after,
                     "tokens_per_second_ratio": after["tokens_per_second"] / before["tokens_per_second"],
                     "peak_rss_ratio": after["peak_rss_mb"] / before["peak_rss_mb"]})
        print(f"pair {i + 1}: tok/s {checkout} {before['tokens_per_second']:.0f}, "
              f"here {after['tokens_per_second']:.0f}; "
              f"peak RSS {before['peak_rss_mb']:.0f} / {after['peak_rss_mb']:.0f} MB; final loss "
              f"{before['final_loss']:.4f} / {after['final_loss']:.4f}", flush=True)
    speed = median_min([r["tokens_per_second_ratio"] for r in rows])
    memory = median_min([r["peak_rss_ratio"] for r in rows])
    print(f"\nhere / {checkout}, per pair: tokens/s {[round(r['tokens_per_second_ratio'], 3) for r in rows]} "
          f"(median {speed['median']}); peak RSS {[round(r['peak_rss_ratio'], 3) for r in rows]} "
          f"(median {memory['median']})")
    write_result("throughput_against", {"against": checkout, "pairs": rows, "tokens_per_second_ratio": speed,
                                        "peak_rss_ratio": memory})


if __name__ == "__main__":
    main()
