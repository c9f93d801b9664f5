"""Benchmark on a GPU: nbtune LoRA / QLoRA vs the same jobs written by hand with Trainer + peft.

    python bench/gpu_throughput.py --shape 1.7b --methods lora,qlora [--pairs 2] [--steps 20] [--rows long]
    python bench/gpu_throughput.py --shape tiny --steps 4 --pairs 1          # on a CPU (CI keeps it working)

Models are random-init from SmolLM2-135M-Instruct's real config and tokenizer (no hub): `135m` is that
shape, `1.7b` SmolLM2-1.7B's (24 layers x 2048, 8192 MLP), `tiny` 2 layers x 64 for CPUs; built once and
saved (bf16 on a GPU) under $NBTUNE_CACHE/bench-models. Every job: LoRA r 8 / alpha 16 / dropout 0.05
on all linear layers, batch 8, lr 1e-3 linear decay, seed 42, loss on the answer tokens only, the same
rows; each job in a fresh process, jobs alternating (hand, nbtune, hand, nbtune, ...).

"hand" is what a user writes: `from_pretrained(dtype=bfloat16)` (QLoRA: BitsAndBytesConfig nf4 + double
quant, bf16 compute, `prepare_model_for_kbit_training`), `get_peft_model`, `TrainingArguments(bf16=True)`
(fp16 on a GPU without bf16, fp32 on a CPU without it), `DataCollatorForSeq2Seq`, the chat template.
"nbtune" is `nbtune.finetune` with its defaults; `--variants` adds nbtune jobs with one device-policy
choice changed (e.g. `fp32_sums=true`, `liger_kernels=true`, `gradient_checkpointing_when_quantized=false`),
to measure each speed-up alone.

Measured identically in each job (bench/common.py `StepMeter`): tokens/s over steps 3..N (attention-mask
tokens), CUDA peak (max_memory_allocated, model load included), final loss (mean of the last 5 steps'),
and the share of this GPU's measured bf16 matmul peak reached: FLOPs per token = 4 x parameters (forward
plus the input-gradient backward of a frozen base; the tied LM head counted once) + 6 x layers x sequence
x hidden (causal attention, forward and backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

from common import MeterObserver, StepMeter, encode, median_min, report, run_child, versions, vmhwm_mb, write_result

SHAPES = {"tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16},
          "135m": {},
          "1.7b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64}}
LR, SEED, WARMUP_STEPS, LAST_LOSSES = 1e-3, 42, 2, 5
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}


# ---------------------------------------------------------------- model and rows, shared by every job
def model_folder(shape: str) -> Path:
    """A random-init model of `shape` with SmolLM2's config and tokenizer, saved once."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from nbtune.config import DEFAULT_MODEL
    from nbtune.engine.bases.loading import cache_dir, resolve_model

    folder = cache_dir() / "bench-models" / f"smollm2-{shape}"
    if (folder / "config.json").is_file():
        return folder
    source = resolve_model(DEFAULT_MODEL)
    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    with torch.device("cuda" if gpu else "cpu"):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if gpu else torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def rows(kind: str) -> list[dict[str, str]]:
    """The demo task's training rows, or (`long`) the same rows padded out to about 512 tokens each: a
    long prompt of filler sentences and an answer of about 60 tokens."""
    from nbtune.data.demo import demo_splits

    train = demo_splits()[0]
    if kind == "demo":
        return train
    filler = "The archive lists each entry with its date, its place and the name of the clerk who wrote it. "
    return [{"prompt": filler * 18 + row["prompt"],
             "completion": (row["completion"] + " ") * 6 + "(written as year-month-day)"} for row in train]


# ---------------------------------------------------------------- the jobs
def hand_job(folder: Path, data: list[dict[str, str]], method: str, steps: int, batch_size: int,
             meter: StepMeter) -> None:
    """What a user writes without nbtune."""
    import tempfile

    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    gpu = torch.cuda.is_available()
    bf16 = torch.cuda.is_bf16_supported() if gpu else _cpu_bf16()
    dtype = torch.bfloat16 if bf16 else torch.float16 if gpu else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = datasets.Dataset.from_list(data).map(lambda row: encode(tokenizer, row),
                                                 remove_columns=["prompt", "completion"])
    if method == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quant,
                                                     device_map={"": 0} if gpu else "cpu")
        model = prepare_model_for_kbit_training(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    set_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))

    class StepEnd(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            if logs and "loss" in logs:
                meter.step_end(logs["loss"])

    with tempfile.TemporaryDirectory(prefix="bench-hand-") as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=batch_size, max_steps=steps,
                                 learning_rate=LR, lr_scheduler_type="linear", seed=SEED, logging_steps=1,
                                 save_strategy="no", report_to="none", bf16=bf16 and dtype == torch.bfloat16,
                                 fp16=dtype == torch.float16, use_cpu=not gpu)
        trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=[StepEnd()])
        meter.attach(model)
        trainer.train()


def nbtune_job(folder: Path, data: list[dict[str, str]], method: str, steps: int, batch_size: int,
               meter: StepMeter, changes: dict[str, Any]) -> dict[str, Any]:
    """The same job through nbtune's public API; `changes` alter the device policy for this process."""
    import nbtune
    from nbtune.engine.compute import device

    if changes:
        changed = device.with_changes(device.policy_for(device.detect()), **changes)
        device.current = lambda: changed
    run = nbtune.finetune({"model": str(folder), "method": method, **LORA, "data": data, "steps": steps,
                           "batch_size": batch_size, "lr": LR, "lr_scheduler": "linear", "seed": SEED,
                           "metric": "none", "save": False}, observers=[MeterObserver(meter)])
    return {"precision": run.config.precision, "dtype": run.config.dtype,
            "gradient_checkpointing": run.config.gradient_checkpointing}


def _cpu_bf16() -> bool:
    import torch

    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, n, lambda: False)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def child(job: str, shape: str, method: str, data_kind: str, steps: int, batch_size: int) -> None:
    import torch

    warnings.simplefilter("ignore")
    folder, data, meter = model_folder(shape), rows(data_kind), StepMeter()
    name, _, change_text = job.partition(":")
    extra: dict[str, Any] = {}
    if name == "hand":
        hand_job(folder, data, method, steps, batch_size, meter)
    else:
        extra = nbtune_job(folder, data, method, steps, batch_size, meter, _changes(change_text))
    meter.detach()
    if len(meter.steps) != steps:
        raise RuntimeError(f"{job}: measured {len(meter.steps)} steps, expected {steps}")
    gpu = torch.cuda.is_available()
    report({"job": job, "method": method, **meter.steady(WARMUP_STEPS), **extra,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
            "peak_rss_mb": vmhwm_mb(),
            "final_loss": statistics.fmean(s["loss"] for s in meter.steps[-LAST_LOSSES:])})


def _changes(text: str) -> dict[str, Any]:
    """`fp32_sums=true,liger_kernels=false` -> {"fp32_sums": True, "liger_kernels": False}."""
    import yaml

    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------- the parent
def matmul_peak_tflops() -> float | None:
    """This GPU's bf16 matmul throughput, measured (8192^3, 20 repeats after warm-up); None on a CPU."""
    import time

    import torch

    if not torch.cuda.is_available():
        return None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def flops_per_token(shape: str, sequence: float) -> float:
    """4 x parameters + causal attention (6 x layers x sequence x hidden), for a frozen base with LoRA."""
    import json

    config = json.loads((model_folder(shape) / "config.json").read_text())
    hidden, layers, inter, vocab = (config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size",
                                                        "vocab_size"))
    heads, kv, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config.get("head_dim")
    head_dim = head_dim or hidden // heads
    per_layer = hidden * head_dim * (2 * heads + 2 * kv) + 3 * hidden * inter
    params = layers * per_layer + vocab * hidden  # the tied LM head counted once
    return 4 * params + 6 * layers * sequence * hidden


def mean_sequence(shape: str, data_kind: str) -> float:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(shape))
    return statistics.fmean(len(encode(tokenizer, row)["input_ids"]) for row in rows(data_kind))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=tuple(SHAPES), default="135m")
    parser.add_argument("--methods", default="lora", help="lora, qlora or both: lora,qlora")
    parser.add_argument("--rows", choices=("demo", "long"), default=None, help="default: long for 1.7b")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--variants", default="", help="nbtune jobs with a policy change: 'fp32_sums=true;...'")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_kind = args.rows or ("long" if args.shape == "1.7b" else "demo")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    common = ["--shape", args.shape, "--rows", data_kind, "--steps", str(args.steps),
              "--batch-size", str(args.batch_size)]
    if args.child:
        return child(args.child, args.shape, args.method, data_kind, args.steps, args.batch_size)
    model_folder(args.shape)  # built once, before the timed jobs
    peak = matmul_peak_tflops()
    per_token = flops_per_token(args.shape, mean_sequence(args.shape, data_kind))
    jobs = ["hand", "nbtune", *(f"nbtune:{v}" for v in args.variants.split(";") if v.strip())]
    results: dict[str, Any] = {}
    for method in args.methods.split(","):
        pairs = []
        for i in range(args.pairs):
            done = {job: r for job in jobs if (r := _job(job, method, common)) is not None}
            if "hand" not in done:
                raise RuntimeError("the hand-written job failed; nothing to compare with")
            for job, r in done.items():
                r["matmul_peak_share"] = (r["tokens_per_second"] * per_token / 1e12 / peak) if peak else None
                print(f"{method} pair {i + 1} {job}: {r['tokens_per_second']:.0f} tok/s, CUDA peak "
                      f"{_mb(r['cuda_peak_mb'])}, final loss {r['final_loss']:.4f}", flush=True)
            pairs.append(done)
        results[method] = summarise(pairs, jobs)
        print_table(method, pairs, jobs)
    if "lora" in results and "qlora" in results:
        q, lo = results["qlora"]["nbtune"]["cuda_peak_mb"], results["lora"]["nbtune"]["cuda_peak_mb"]
        if q and lo:
            print(f"\nnbtune QLoRA / LoRA CUDA peak: {q / lo:.3f}")
            results["qlora_over_lora_cuda_peak"] = q / lo
    write_result(f"gpu_throughput_{args.shape}", {
        "settings": {"shape": args.shape, "rows": data_kind, "steps": args.steps, "batch_size": args.batch_size,
                     "lr": LR, "seed": SEED, "lora": LORA, "warmup_steps_excluded": WARMUP_STEPS},
        "gpu": _gpu_name(), "matmul_peak_tflops": peak, "flops_per_token": per_token, "results": results,
        "versions": versions("datasets", "bitsandbytes")})


def _job(job: str, method: str, common: list[str]) -> dict[str, Any] | None:
    """One job's result, or None (its error printed) when it failed: a variant needing a package the
    machine lacks must not cost the other jobs' numbers."""
    try:
        return run_child(sys.argv[0], ["--child", job, "--method", method, *common])
    except RuntimeError as exc:
        print(f"{method} {job} failed: {str(exc)[-1500:]}", flush=True)
        return None


def summarise(pairs: list[dict[str, Any]], jobs: list[str]) -> dict[str, Any]:
    out = {}
    for job in jobs:
        having = [p for p in pairs if job in p]
        runs = [p[job] for p in having]
        if not runs:
            continue
        entry = {"cuda_peak_mb": statistics.median(r["cuda_peak_mb"] for r in runs) if runs[0]["cuda_peak_mb"]
                 else None, "final_loss": statistics.median(r["final_loss"] for r in runs),
                 "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs)}
        if job != "hand":
            entry["tokens_per_second_ratio"] = median_min([p[job]["tokens_per_second"] /
                                                           p["hand"]["tokens_per_second"] for p in having])
            if runs[0]["cuda_peak_mb"]:
                entry["cuda_peak_ratio"] = median_min([p[job]["cuda_peak_mb"] / p["hand"]["cuda_peak_mb"]
                                                       for p in having])
        out[job] = entry
    return out


def print_table(method: str, pairs: list[dict[str, Any]], jobs: list[str]) -> None:
    print(f"\n{method}\n| pair | job | tokens/s | x hand | CUDA peak MB | x hand | final loss | matmul peak share |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for i, p in enumerate(pairs, 1):
        for job in (j for j in jobs if j in p):
            r, hand = p[job], p["hand"]
            memory = (f"{r['cuda_peak_mb'] / hand['cuda_peak_mb']:.3f}" if r["cuda_peak_mb"] else "-")
            share = f"{r['matmul_peak_share']:.3f}" if r["matmul_peak_share"] is not None else "-"
            print(f"| {i} | {job} | {r['tokens_per_second']:.0f} | "
                  f"{r['tokens_per_second'] / hand['tokens_per_second']:.3f} | {_mb(r['cuda_peak_mb'])} | {memory} | "
                  f"{r['final_loss']:.4f} | {share} |")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
