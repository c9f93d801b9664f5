"""Taking a run's model out of nbtune: `run.export(path)` writes the merged model as safetensors (any
transformers code loads it), `run.export(path, format="gguf", quant="q8_0")` as one GGUF file for
llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it, checked by loading it back.

    >>> out = run.export("exports/dates", format="gguf", quant="q8_0")      # doctest: +SKIP
    >>> out                                                                 # doctest: +SKIP
    exports/dates/dates-q8_0.gguf (145.1 MB), checked by loading it back with transformers:
      q8_0: max |logit difference| 1.3 = 0.18 of the logits' spread (tolerance 0.5); ...

Both formats take one merge path (`merging.merged_for_export`) and never change the run or the cached
base. Files are written into a temporary folder beside the target and moved into place only when complete
(and, for GGUF, verified); a folder that holds files nbtune did not write is refused.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.records.saving import atomic_directory, check_target
from nbtune.errors import NbtuneError

if TYPE_CHECKING:
    from nbtune.engine.export.gguf_check import GgufCheck
    from nbtune.engine.records.run import Run

FORMATS = ("safetensors", "gguf")
DEFAULT_QUANT = "f16"
REPORT = "gguf_export.json"  # written last: a folder holding it holds a complete, verified export
MODELFILE = "Modelfile"
_SPARE_BYTES = 16 * 2**20  # headroom over the estimate (the writer's alignment padding, the small files)


@dataclass
class GgufExport:
    """A written and verified GGUF export: the file, its Modelfile, what loading it back showed."""

    path: Path
    modelfile: Path
    size_bytes: int
    check: GgufCheck
    run: Run = field(repr=False)

    def evaluate(self, samples: int | None = None) -> dict[str, Any]:
        """The run's task metrics (exact match by default) for the answers of the model read back from the
        file, on the run's first `samples` eval rows: compare with `run.metrics`."""
        from nbtune.engine.evaluation.scoring import score_model
        from nbtune.engine.export.gguf_check import load_gguf

        model, tokenizer = load_gguf(self.path)
        return score_model(self.run, model, tokenizer, samples=samples, desc=f"{self.path.name}: answering")

    def __repr__(self) -> str:
        lines = [f"{self.path} ({self.size_bytes / 1e6:.1f} MB), checked by loading it back with transformers:",
                 f"  {self.check.summary()}"]
        for answer in self.check.answers:
            mark = "=" if answer["answer"] == answer["gguf_answer"] else ("~" if answer["agree"] else "!")
            lines.append(f"  {mark} {answer['answer']!r} | gguf: {answer['gguf_answer']!r}")
        lines.append(f"  Ollama: ollama create NAME -f {self.modelfile}")
        return "\n".join(lines)


def export_run(run: Run, path: str | Path, *, format: str = "safetensors", quant: str | None = None) -> Any:
    """`run.export`: see the module docstring."""
    if format not in FORMATS:
        raise NbtuneError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}.",
                          field="format")
    if format == "safetensors":
        if quant is not None:
            raise NbtuneError("`quant` is for format='gguf'; safetensors keeps the model's own precision.",
                              field="quant")
        return export_safetensors(run, path)
    return export_gguf(run, path, DEFAULT_QUANT if quant is None else quant)  # "" is no quant: refused


def export_safetensors(run: Run, path: str | Path) -> Path:
    """The merged model (weights, tokenizer) as a transformers folder at `path`."""
    from nbtune.engine.export.merging import merged_for_export
    from nbtune.engine.training.quiet import no_hf_progress_bars

    run.require_model()
    target = Path(path).expanduser()
    refuse_saved_run(target, path)
    check_target(target, replaceable="config.json", field="path")  # before a merge that may take a while
    model = merged_for_export(run)
    with atomic_directory(target, replaceable="config.json", field="path") as tmp, no_hf_progress_bars():
        model.save_pretrained(str(tmp))
        run.tokenizer.save_pretrained(str(tmp))
    return Path(path)


def export_gguf(run: Run, path: str | Path, quant: str) -> GgufExport:
    """The merged model and tokenizer as one GGUF file in the folder `path`, loaded back and compared."""
    from nbtune.engine.export.gguf_check import check_gguf
    from nbtune.engine.export.gguf_file import check_architecture, check_quant, embedding_rows, file_bytes, write_gguf
    from nbtune.engine.export.gguf_vocab import check_tokenizer, gguf_vocab, vocab_bytes
    from nbtune.engine.export.merging import merged_for_export
    from nbtune.engine.export.modelfile import modelfile
    from nbtune.engine.training.progress import progress_bar  # no widget left in a saved notebook

    check_quant(quant)
    run.require_model()
    check_architecture(_plain_config(run.model))
    check_tokenizer(run.tokenizer)
    _check_mergeable(run)
    target = Path(path).expanduser()
    refuse_saved_run(target, path)
    check_target(target, replaceable=REPORT, field="path")
    file_name = f"{run.name.replace('/', '-')}-{quant}.gguf"
    with progress_bar(total=4, desc=f"{run.name}: GGUF {quant}", unit="stage") as bar:
        bar.set_postfix_str("merging")
        merged = _fp32(merged_for_export(run))
        bar.update()
        needed = file_bytes(merged, quant) + vocab_bytes(run.tokenizer) + _SPARE_BYTES
        check_disk_space(target, needed)
        with atomic_directory(target, replaceable=REPORT, field="path") as tmp, \
                tempfile.TemporaryDirectory(prefix="nbtune-gguf-vocab-") as scratch:  # files SpecialVocab reads
            bar.set_postfix_str("writing")
            vocab = gguf_vocab(run.tokenizer, embedding_rows(merged), Path(scratch))
            write_gguf(tmp / file_name, merged, vocab, quant, name=run.name, base_name=run.base_name)
            bar.update()
            bar.set_postfix_str("loading back")
            prompts, budget = verification_prompts(run)
            check = check_gguf(tmp / file_name, merged, run.tokenizer, quant, prompts, budget)
            bar.update(2)
            if not check.ok:
                raise NbtuneError(f"the GGUF file did not match the merged model, so nothing was written: "
                                  f"{check.summary()}. {_parted(check)}", field="quant")
            text = modelfile(file_name, run.tokenizer, getattr(merged, "generation_config", None),
                             merged.config.max_position_embeddings)
            (tmp / MODELFILE).write_text(text, encoding="utf-8")
            size = (tmp / file_name).stat().st_size
            report = {"run": run.name, "base": run.base_name, "file": file_name, "quant": quant,
                      "size_bytes": size, "check": check.to_dict()}
            (tmp / REPORT).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return GgufExport(path=target / file_name, modelfile=target / MODELFILE, size_bytes=size, check=check, run=run)


def refuse_saved_run(target: Path, path: str | Path) -> None:
    """A saved run's folder is never an export's: its run.json and adapter would be replaced."""
    if (target / "run.json").exists():
        raise NbtuneError(f"{str(path)!r} exists and is a saved run; export the merged model to a new or empty "
                          "folder (nbtune only replaces an earlier export).", field="path")


def check_disk_space(target: Path, needed: int) -> None:
    """Refuse before writing when the disk `target` would be on has less free space than `needed` bytes."""
    existing = next(p for p in (target, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise NbtuneError(f"not enough disk space for the export in {str(existing)!r}: it needs about "
                          f"{needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free; free some space or export "
                          "to another disk.", field="path")


def verification_prompts(run: Run) -> tuple[list[Any], int]:
    """A few prompts to compare answers on: the run's first eval prompts, its sample prompts, or general
    ones; and how many tokens to answer with."""
    from nbtune.engine.evaluation.scoring import answer_budget
    from nbtune.engine.export.gguf_check import FALLBACK_ANSWER_TOKENS, FALLBACK_PROMPTS

    pairs = list(run.eval_pairs or [])[:3]
    prompts = list(run.config.sample_prompts or []) or [p for p, _ in pairs] or list(FALLBACK_PROMPTS)
    return prompts, (answer_budget(run.tokenizer, [a for _, a in pairs]) if pairs else FALLBACK_ANSWER_TOKENS)


def _check_mergeable(run: Run) -> None:
    if run.method.adds_modules(run.config.options) and not run.method.can_merge(run.config.options):
        raise NbtuneError(f"method {run.method.name!r} cannot be merged into the base weights (it adds "
                          f"computation, not a weight delta), and a GGUF file holds one plain model; methods "
                          f"that export: {', '.join(exportable_methods())}.", field="method")


def exportable_methods() -> list[str]:
    """Methods whose runs (with default options) become one plain model: merged, or trained in place."""
    from nbtune.methods.registry import all_methods

    return [m.name for m in all_methods()
            if not m.adds_modules(m.default_options()) or m.can_merge(m.default_options())]


def _plain_config(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.config


def _fp32(model: Any) -> Any:
    """The merged model in fp32 for writing and comparing (a bf16 full fine-tune is copied, not changed)."""
    import copy

    import torch

    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


def _parted(check: GgufCheck) -> str:
    parted = [a for a in check.answers if not a["agree"]]
    if not parted:
        return ""
    first = parted[0]
    return f"First answer that differs: {first['answer']!r} vs {first['gguf_answer']!r}."

