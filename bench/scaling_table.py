"""What fits where: memory per GPU for each method, model size and way of spreading the run (computed, not
measured: nbtune's own estimate on weightless models, see nbtune/engine/compute/estimate.py).

    python bench/scaling_table.py [--batch-size 4] [--max-length 1024] [--gpus 8]

Model shapes are the published configs of SmolLM2-135M / 1.7B and Llama-3.1-8B / 70B, written here as
config files so that nothing is downloaded. Prints a Markdown table (used in docs/scaling.md) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import versions, write_result

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings
    "SmolLM2-135M": (576, 30, 1536, 9, 3, 49152, True),
    "SmolLM2-1.7B": (2048, 24, 8192, 32, 32, 49152, True),
    "Llama-3.1-8B": (4096, 32, 14336, 32, 8, 128256, False),
    "Llama-3.1-70B": (8192, 80, 28672, 64, 8, 128256, False),
}
METHODS = ("full", "lora", "qlora", "prefix")


def model_folder(root: Path, name: str) -> str:
    hidden, layers, inter, heads, kv, vocab, tied = SHAPES[name]
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "intermediate_size": inter, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied,
        "max_position_embeddings": 8192}))
    return str(folder)


def main() -> None:
    from nbtune.config import RunConfig
    from nbtune.engine.compute.estimate import estimate, per_process_mb

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=4, help="per GPU")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in SHAPES:
            folder = model_folder(Path(tmp), name)
            for method in METHODS:
                config = RunConfig.parse({"model": folder, "method": method, "batch_size": args.batch_size,
                                          "max_length": args.max_length, "gradient_checkpointing": True,
                                          "precision": "bf16", "dtype": "bfloat16", "steps": 100})
                est = estimate(config)
                row = {"model": name, "method": method, "params": est["total_params"],
                       "trainable": est["trainable_params"]}
                for strategy, gpus in (("ddp", 1), ("ddp", args.gpus), ("zero2", args.gpus), ("fsdp", args.gpus)):
                    key = "one" if gpus == 1 else strategy
                    row[key] = per_process_mb(est, gpus, strategy)["total_mb"]
                rows.append(row)
    print(f"GB per GPU; batch {args.batch_size} x {args.max_length} tokens per GPU, bf16, gradient "
          f"checkpointing, AdamW; {args.gpus} GPUs for DDP / ZeRO-2 / FSDP\n")
    print(f"| model | method | trainable | 1 GPU | DDP x{args.gpus} | ZeRO-2 x{args.gpus} | FSDP x{args.gpus} |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        gb = [f"{r[k] / 1024:,.1f}" for k in ("one", "ddp", "zero2", "fsdp")]
        print(f"| {r['model']} | {r['method']} | {r['trainable']:,} | " + " | ".join(gb) + " |")
    write_result("scaling_table", {"rows": rows, "settings": vars(args), "versions": versions()})


if __name__ == "__main__":
    main()
