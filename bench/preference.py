"""Benchmark: DPO with LoRA in nbtune (the reference is the base with the adapter switched off: one model in
memory) vs TRL's `DPOTrainer` written by hand the usual way (a LoRA policy and a second, frozen copy of the
model as `ref_model`), on SmolLM2 and the shipped preference pairs; and the demo's before/after numbers.

    python bench/preference.py [--steps 12] [--batch-size 4] [--demo-steps 40]

Each side trains in a fresh process (its own peak RSS, VmHWM) on the same pairs (`data: demo_pairs`), the same
LoRA (r 8 on the attention and MLP projections), batch, learning rate, precision and length limit. Reported:
peak RSS, median seconds per step after the first two, tokens/s (non-padding tokens of the chosen and rejected
sequences), and their ratios (target: nbtune's peak <= 0.7x the hand-written one at equal tokens/s or better).
`--demo-steps` then trains `objective: dpo` on the demo pairs and reports the held-out reward accuracy and
margin, and the task's exact match of the base and of the tuned model on the 64 held-out prompts.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import report, run_child, versions, vmhwm_mb, write_result

LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nbtune_side(steps: int, batch_size: int) -> None:
    import nbtune

    run = nbtune.finetune(name="bench-dpo", data="demo_pairs", objective="dpo", method="lora", steps=steps,
                          batch_size=batch_size, lr=5e-5, metric="none", save=False, target_modules=TARGETS,
                          **LORA)
    records = run.history[2:] or run.history
    report({"peak_rss_mb": round(vmhwm_mb(), 1),
            "step_s": round(statistics.median(r["step_seconds"] for r in records), 3),
            "tokens_per_s": round(statistics.median(r["tokens_per_second"] for r in records), 1),
            "precision": run.config.precision, "steps": len(run.history)})


def trl_side(steps: int, batch_size: int) -> None:
    """TRL's documented recipe: policy with a peft LoRA, a separately loaded frozen reference model."""
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from nbtune.config import DEFAULT_MODEL
    from nbtune.data.demo import demo_pair_splits
    from nbtune.engine import device
    from nbtune.engine.models import load_base

    path = load_base(DEFAULT_MODEL).path  # the converted SmolLM2 folder nbtune reads too
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
                     bf16=precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=True,
                     include_num_input_tokens_seen="non_padding", disable_tqdm=True, seed=42)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()])
    trainer.train()
    kept = times[2:] or times
    report({"peak_rss_mb": round(vmhwm_mb(), 1), "step_s": round(statistics.median(t for t, _ in kept), 3),
            "tokens_per_s": round(statistics.median(n / t for t, n in kept), 1), "precision": precision,
            "steps": len(times)})


def demo_side(steps: int) -> None:
    import nbtune

    run = nbtune.finetune(name="demo-dpo", data="demo_pairs", objective="dpo", method="lora", steps=steps,
                          batch_size=8, lr=1e-3, metric="exact_match", save=False)
    report({"steps": steps, "eval_reward_accuracy": run.metrics["reward_accuracy"],
            "eval_reward_margin": run.metrics["reward_margin"], "eval_loss": round(run.metrics["eval_loss"], 4),
            "exact_match_tuned": run.metrics["exact_match"], "exact_match_base": run.metrics["base_exact_match"],
            "train_seconds": run.metrics["train_seconds"]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--demo-steps", type=int, default=40)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        import warnings

        warnings.simplefilter("ignore")
        sides = {"nbtune": lambda: nbtune_side(args.steps, args.batch_size),
                 "trl": lambda: trl_side(args.steps, args.batch_size), "demo": lambda: demo_side(args.demo_steps)}
        sides[args.child]()
        return
    common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--demo-steps", str(args.demo_steps)]
    ours = run_child(__file__, ["--child", "nbtune", *common])
    print(f"nbtune (adapter off as reference): {ours}", flush=True)
    theirs = run_child(__file__, ["--child", "trl", *common])
    print(f"TRL by hand (second model as reference): {theirs}", flush=True)
    demo = run_child(__file__, ["--child", "demo", *common]) if args.demo_steps else None
    print(f"demo: {demo}", flush=True)
    result = {"steps": args.steps, "batch_size": args.batch_size, "nbtune": ours, "trl_by_hand": theirs,
              "peak_rss_ratio": round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3),
              "tokens_per_s_ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
              "demo": demo, "versions": versions("trl")}
    print(f"peak RSS {ours['peak_rss_mb']} vs {theirs['peak_rss_mb']} MB (ratio {result['peak_rss_ratio']}); "
          f"tokens/s {ours['tokens_per_s']} vs {theirs['tokens_per_s']} (ratio {result['tokens_per_s_ratio']})")
    write_result("preference", result)


if __name__ == "__main__":
    main()
