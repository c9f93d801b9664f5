"""Benchmark: what evaluation costs per eval row on SmolLM2 with the demo task: generating the tuned model's
answers, generating the base model's (once per kernel, then cached), and scoring every metric.

    python bench/eval_cost.py [--steps 40] [--rows 64] [--repeats 2]

A LoRA run trains `--steps` steps first (tuned answers are then as long as real ones: the date and an end
token; the base model rambles to the length limit, the longest reference plus 4 tokens). Then, `--repeats`
times, with the base-answer cache emptied each time: `tuned_ms_per_row` (the run's answers, batches of 16),
`base_ms_per_row` (the base's answers), `cached_base_ms_per_row` (asking for them again: the kernel's cache),
`scoring_ms_per_row` (exact_match, token_f1, rouge_l, bleu, chrf on those rows) and
`bootstrap_ms` (a 1000-resample paired bootstrap of chrf, the slowest metric to resample).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import versions, write_result

METRICS = ["exact_match", "token_f1", "rouge_l", "bleu", "chrf"]


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    out = work()
    return time.perf_counter() - started, out


def measure(run, rows: int) -> dict[str, float]:
    from nbtune.engine.evaluation import scoring as evaluation
    from nbtune.engine.evaluation.metrics import METRICS as REGISTRY
    from nbtune.engine.evaluation.metrics import aggregate_scores, paired_bootstrap, score_rows

    pairs = run.eval_pairs[:rows]
    prompts, references = [p for p, _ in pairs], [a for _, a in pairs]
    budget = evaluation.answer_budget(run.tokenizer, references)
    evaluation._BASE_ANSWERS.clear()  # the first ask of a kernel: the base generates
    tuned_s, tuned = timed(lambda: evaluation.answers(run.model, run.tokenizer, prompts, max_new_tokens=budget,
                                                      desc="tuned"))
    base_s, base = timed(lambda: evaluation.base_answers(run, prompts, max_new_tokens=budget))
    cached_s, _ = timed(lambda: evaluation.base_answers(run, prompts, max_new_tokens=budget))
    metrics = [REGISTRY[m] for m in METRICS]
    scoring_s, _ = timed(lambda: aggregate_scores(metrics, tuned, references, score_rows(metrics, tuned, references)))
    bootstrap_s, _ = timed(lambda: paired_bootstrap(REGISTRY["chrf"], tuned, base, references))
    per_row = 1000 / len(prompts)
    return {"rows": len(prompts), "max_new_tokens": budget, "tuned_ms_per_row": round(tuned_s * per_row, 1),
            "base_ms_per_row": round(base_s * per_row, 1), "cached_base_ms_per_row": round(cached_s * per_row, 3),
            "scoring_ms_per_row": round(scoring_s * per_row, 2), "bootstrap_ms": round(bootstrap_s * 1000, 1)}


def main() -> None:
    import warnings

    import nbtune

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    run = nbtune.finetune(name="eval-cost", data="demo", steps=args.steps, batch_size=4, lr=2e-3, metric="none",
                          save=False)
    repeats = [measure(run, args.rows) for _ in range(args.repeats)]
    result = {"steps": args.steps, "repeats": repeats, "versions": versions("sacrebleu", "rouge_score")}
    for key in ("tuned_ms_per_row", "base_ms_per_row", "cached_base_ms_per_row", "scoring_ms_per_row",
                "bootstrap_ms"):
        result[f"{key}_median"] = statistics.median(r[key] for r in repeats)
    for r in repeats:
        print(f"{r['rows']} rows, up to {r['max_new_tokens']} new tokens: tuned {r['tuned_ms_per_row']} ms/row, "
              f"base {r['base_ms_per_row']} ms/row (cached: {r['cached_base_ms_per_row']}), scoring "
              f"{r['scoring_ms_per_row']} ms/row, bootstrap {r['bootstrap_ms']} ms")
    write_result("eval_cost", result)


if __name__ == "__main__":
    main()
