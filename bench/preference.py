"""Benchmark: DPO with LoRA in nbtune (the reference is the base with the adapter switched off: one model in
memory) vs TRL's `DPOTrainer` written by hand the usual way (a LoRA policy and a second, frozen copy of the
model as `ref_model`), on SmolLM2 and the shipped preference pairs; and the demo's before/after numbers.

    python bench/preference.py [--steps 12] [--batch-size 4] [--demo-steps 20] [--checkpointing off,on]
                               [--model FOLDER]

Each side trains in a fresh process (its own peak RSS, VmHWM; on a GPU its peak CUDA memory allocated, in
`peak_mb`, which the ratio then compares) on the same pairs (`data: demo_pairs`), the same
LoRA (r 8 on the attention and MLP projections), batch, learning rate, precision and length limit. Reported:
peak RSS, median seconds per step after the first two, tokens/s (non-padding tokens of the chosen and rejected
sequences), and their ratios (target: nbtune's peak <= 0.7x the hand-written one at equal tokens/s or better).
`--demo-steps` then trains SFT on the demo pairs' chosen answers and DPO on top of it (against the SFT model),
and reports the held-out reward accuracy and margin and the task's exact match on the 64 held-out prompts of the
base, the SFT run and the SFT + DPO run. `--checkpointing off,on`: the pair with and without gradient
checkpointing on both sides (activations shrink, so the reference model's share of the peak grows).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import report, run_child, versions, vmhwm_mb, write_result

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_mb() -> float:
    """The memory the ratio compares: peak CUDA memory allocated on a GPU, else this process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(vmhwm_mb(), 1)


def nbtune_side(steps: int, batch_size: int, checkpointing: bool, cpu_fp32_sums: bool = True,
                model: str | None = None) -> None:
    import nbtune

    if not cpu_fp32_sums:  # nbtune's CPU numerics policy off, to see what it costs (engine/compute/precision.py)
        from nbtune.engine.compute import device

        plain = device.with_changes(device.current(), fp32_sums=False, fp32_attention_backward=False)
        device.current = lambda: plain

    more = {"model": model} if model else {}
    run = nbtune.finetune(name="bench-dpo", data="demo_pairs", objective="dpo", method="lora", steps=steps,
                          batch_size=batch_size, lr=5e-5, metric="none", save=False, target_modules=TARGETS,
                          gradient_checkpointing=checkpointing, **LORA, **more)
    records = run.history[2:] or run.history
    report({"peak_rss_mb": round(vmhwm_mb(), 1), "peak_mb": peak_mb(),
            "step_s": round(statistics.median(r["step_seconds"] for r in records), 3),
            "tokens_per_s": round(statistics.median(r["tokens_per_second"] for r in records), 1),
            "precision": run.config.precision, "steps": len(run.history)})


def trl_side(steps: int, batch_size: int, checkpointing: bool, model: str | None = None) -> None:
    """TRL's documented recipe: policy with a peft LoRA, a separately loaded frozen reference model."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from nbtune.config import DEFAULT_MODEL
    from nbtune.data.demo import demo_pair_splits
    from nbtune.engine.bases.loading import resolve_model
    from nbtune.engine.compute import device

    path = model or resolve_model(DEFAULT_MODEL)  # the converted SmolLM2 folder nbtune reads too (nothing loaded)
    policy_choices = device.current()  # the dtype and precision nbtune picks for a LoRA run on this machine
    precision, dtype = policy_choices.precision, policy_choices.frozen_dtype
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    policy = get_peft_model(policy, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                               target_modules=TARGETS, task_type="CAUSAL_LM"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in demo_pair_splits()[0]]
    times: list[tuple[float, int]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.tokens = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter() - self.started, state.num_input_tokens_seen - self.tokens))

    args = DPOConfig(output_dir="/tmp/nbtune-bench-trl-dpo", per_device_train_batch_size=batch_size,
                     max_steps=steps, learning_rate=5e-5, logging_steps=1, report_to="none",
                     save_strategy="no", max_length=512,
                     bf16=precision == "bf16", fp16=precision == "fp16", gradient_checkpointing=checkpointing,
                     use_cpu=not torch.cuda.is_available(),
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=42)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()])
    trainer.train()
    kept = times[2:] or times
    report({"peak_rss_mb": round(vmhwm_mb(), 1), "peak_mb": peak_mb(),
            "step_s": round(statistics.median(t for t, _ in kept), 3),
            "tokens_per_s": round(statistics.median(n / t for t, n in kept), 1), "precision": precision,
            "steps": len(times)})


def demo_side(steps: int) -> None:
    """The usual pipeline on the demo pairs: SFT on the chosen answers, then DPO against the SFT model (its
    merged copy is the new base; the reference is that base, adapter off)."""
    import nbtune

    sft = nbtune.finetune(name="demo-sft", data="demo_pairs", steps=steps, batch_size=8, lr=1e-3,
                          metric="exact_match", save=False)
    dpo = nbtune.finetune(name="demo-sft-dpo", data="demo_pairs", objective="dpo", base=(sft.merge(), sft.tokenizer),
                          steps=steps, batch_size=8, lr=1e-4, metric="exact_match", save=False)
    report({"steps": steps, "exact_match_base": sft.metrics["base_exact_match"],
            "exact_match_sft": sft.metrics["exact_match"], "exact_match_sft_merged": dpo.metrics["base_exact_match"],
            "exact_match_sft_dpo": dpo.metrics["exact_match"], "eval_reward_accuracy": dpo.metrics["reward_accuracy"],
            "eval_reward_margin": dpo.metrics["reward_margin"], "dpo_train_seconds": dpo.metrics["train_seconds"]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--demo-steps", type=int, default=20)
    parser.add_argument("--checkpointing", default="off,on", help="gradient checkpointing on both sides: off, on")
    parser.add_argument("--no-fp32-sums", action="store_true", help="nbtune side only, its CPU fp32 sums off")
    parser.add_argument("--model", help="a model folder instead of the default SmolLM2 (the demo needs SmolLM2)")
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        import warnings

        warnings.simplefilter("ignore")
        on = args.checkpointing == "on"
        sides = {"nbtune": lambda: nbtune_side(args.steps, args.batch_size, on, not args.no_fp32_sums, args.model),
                 "trl": lambda: trl_side(args.steps, args.batch_size, on, args.model),
                 "demo": lambda: demo_side(args.demo_steps)}
        sides[args.child]()
        return
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--demo-steps", str(args.demo_steps),
              *(["--model", args.model] if args.model else [])]
    if args.no_fp32_sums:
        print(run_child(__file__, ["--child", "nbtune", *common, "--no-fp32-sums", "--checkpointing", "off"]))
        return
    pairs = []
    for checkpointing in args.checkpointing.split(","):
        flags = [*common, "--checkpointing", checkpointing]
        ours = run_child(__file__, ["--child", "nbtune", *flags])
        print(f"checkpointing {checkpointing}, nbtune (adapter off as reference): {ours}", flush=True)
        theirs = run_child(__file__, ["--child", "trl", *flags])
        print(f"checkpointing {checkpointing}, TRL by hand (second model as reference): {theirs}", flush=True)
        pair = {"gradient_checkpointing": checkpointing, "nbtune": ours, "trl_by_hand": theirs,
                "peak_rss_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
                "peak_ratio": round(ours["peak_mb"] / theirs["peak_mb"], 3),
                "tokens_per_s_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3)}
        print(f"checkpointing {checkpointing}: peak {ours['peak_mb']} vs {theirs['peak_mb']} MB (ratio "
              f"{pair['peak_ratio']}); tokens/s {ours['tokens_per_s']} vs {theirs['tokens_per_s']} (ratio "
              f"{pair['tokens_per_s_ratio']})", flush=True)
        pairs.append(pair)
    demo = run_child(__file__, ["--child", "demo", *common]) if args.demo_steps else None
    print(f"demo: {demo}", flush=True)
    import torch

    name = "preference_gpu" if torch.cuda.is_available() else "preference"
    write_result(name, {"steps": args.steps, "batch_size": args.batch_size, "model": args.model or "SmolLM2-135M",
                        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                        "pairs": pairs, "demo": demo, "versions": versions("trl")})


if __name__ == "__main__":
    main()
