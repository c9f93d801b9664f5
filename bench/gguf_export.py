"""Benchmark: GGUF export of the demo adapter on SmolLM2-135M-Instruct, per quantisation: file size, time to
write and verify, the logit differences the export's own check measured, and the demo's exact match read
from the re-loaded GGUF model next to the merged model's (same 64 held-out rows, greedy).

    python bench/gguf_export.py [--steps 40] [--rows 64] [--quants f16 bf16 q8_0]

Every export goes to a fresh folder under a temporary directory; the re-loaded model is transformers' GGUF
reader (de-quantised to fp32), as `run.export` itself checks it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import versions, write_result


def exact_match_of(model, tokenizer, run, rows: int) -> float:
    from nbtune.engine.evaluation.scoring import score_model

    return score_model(run, model, tokenizer, samples=rows)["exact_match"]  # metric none: exact match


def main() -> None:
    import warnings

    import nbtune
    from nbtune.engine.export.merging import merged_for_export

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--quants", nargs="+", default=["f16", "bf16", "q8_0"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    run = nbtune.finetune(name="dates", data="demo", steps=args.steps, batch_size=4, lr=2e-3, metric="none",
                          save=False)
    merged = merged_for_export(run).float()
    result = {"steps": args.steps, "rows": args.rows, "merged_exact_match": exact_match_of(merged, run.tokenizer,
                                                                                          run, args.rows),
              "adapter_exact_match": exact_match_of(run.model, run.tokenizer, run, args.rows), "exports": {}}
    print(f"adapter exact match {result['adapter_exact_match']:.4f}, merged fp32 {result['merged_exact_match']:.4f}")
    with tempfile.TemporaryDirectory(prefix="nbtune-bench-gguf-") as folder:
        for quant in args.quants:
            started = time.perf_counter()
            out = run.export(Path(folder) / quant, format="gguf", quant=quant)
            seconds = time.perf_counter() - started
            em = out.evaluate(args.rows)["exact_match"]  # the model read back from the file answers
            result["exports"][quant] = {"size_mb": round(out.size_bytes / 1e6, 1), "export_seconds": round(seconds, 1),
                                        "exact_match": em, **out.check.to_dict()}
            print(f"{quant}: {out.size_bytes / 1e6:.1f} MB in {seconds:.1f} s; exact match from the GGUF {em:.4f}; "
                  f"{out.check.summary()}")
    result["versions"] = versions("gguf")
    write_result("gguf_export", result)


if __name__ == "__main__":
    main()
