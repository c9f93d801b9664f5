"""Kernel-level helpers: compare runs, see what each holds in memory, and give memory back.

`reclaim` has to reach past the engine: IPython's output history (`Out`, `_`, `__`) and the last
traceback keep tensors alive long after a run is gone, so it clears those too when IPython is running.
"""

from __future__ import annotations

import sys
from typing import Any

from nbtune.errors import NbtuneError


def compare(*runs: Any) -> Any:
    """Runs side by side: table, config diff, curves, generations. Each is a Run, a name in nbtune.runs, a
    saved run's folder, or a row of `nbtune.history()` (a saved run loads onto the cached base only when
    answers are asked for); none: every run of this kernel."""
    from nbtune.engine.evaluation.compare import resolve_runs
    from nbtune.engine.workbench import WORKBENCH
    from nbtune.widgets.compare_view import ComparisonView

    chosen = resolve_runs(runs, WORKBENCH.runs, saved=True) if runs else list(WORKBENCH.runs.values())
    return ComparisonView(chosen, every_run=not runs)


def preview(config: Any = None, n: int = 4, **overrides: Any) -> Any:
    """The first training batch as the model will see it, before anything trains: the chat template's
    text, each token, which tokens carry loss, padding, lengths and truncation. Loads the tokenizer only
    (or takes it from a base this kernel has loaded already); `n` examples, in the Trainer's own order.

        >>> nbtune.preview({"data": "demo", "max_length": 48}, n=2)      # doctest: +SKIP
        >>> nbtune.preview("my_run.yaml").df.query("loss")                # doctest: +SKIP

    `config` and `overrides` are as for `nbtune.finetune`. Returns a `BatchPreview`: printed as text with
    the loss tokens in [[...]], highlighted in a notebook; `.examples` and `.df` (one row per token).
    """
    from nbtune.config import RunConfig
    from nbtune.data.preview import check_count, preview_batch
    from nbtune.data.splits import read_data

    n = check_count(n)  # before the config, the data and the tokenizer are read
    config = RunConfig.parse(config, **overrides)
    train, _, fmt = read_data(config)  # a data mistake is said before the tokenizer loads
    return preview_batch(config, _tokenizer_for(config), n, records=(train, fmt))


def _tokenizer_for(config: Any) -> Any:
    """The tokenizer of a base this kernel already loaded for `config.model` (its own copy of it), else
    loaded alone, without weights."""
    from nbtune.engine.bases.loading import load_tokenizer, tokenizer_view
    from nbtune.engine.workbench import WORKBENCH

    for (model, _quantization, _dtype, trusted), base in WORKBENCH.bases.items():
        if model == config.model and trusted == config.trust_remote_code:
            return tokenizer_view(base.tokenizer)  # preparing it must not change the cached base's
    return load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)


def history(root: Any = "runs") -> Any:
    """Every run saved under `root`, from any kernel, newest first: name, method, status, when, steps, losses,
    task metric, adapter size, and the checkpoint an interrupted run resumes from. A table (HTML in a
    notebook); `.df` is a DataFrame; `nbtune.history()["name"]` goes into `nbtune.compare`."""
    from nbtune.engine.records.history import history as saved_runs

    return saved_runs(root)


def combine(runs: list[Any], weights: list[float], *, how: str = "linear", name: str | None = None) -> Any:
    """A new run (in nbtune.runs) whose LoRA adapter is a weighted combination of LoRA runs' adapters:
    `how` is 'linear', 'ties' or 'svd' (peft's add_weighted_adapter)."""
    from nbtune.engine.evaluation.adapters import combine as combine_adapters
    from nbtune.engine.evaluation.compare import resolve_runs
    from nbtune.engine.workbench import WORKBENCH

    combined = combine_adapters(resolve_runs(runs, WORKBENCH.runs), weights, how=how, name=name)
    WORKBENCH.runs[combined.name] = combined
    return combined


def load_run(path: Any, *, base: Any = None) -> Any:
    """A saved run back into this kernel's nbtune.runs, its adapter on the cached base (loaded once), or
    on the model it trained on when that was passed in memory: rebuilt when it was a saved run merged
    (`run.merge()`), else refused with how to pass it as `base=(model, tokenizer)`."""
    from nbtune.engine.records.reopen import load
    from nbtune.engine.workbench import WORKBENCH

    run = load(path, base=base, view_for=WORKBENCH.view_for)
    WORKBENCH.runs[run.name] = run
    return run


def picker(run: Any = None, *, model: str | None = None) -> Any:
    """The method picker: a form from the registry, live estimates, the equivalent cell, and Train.
    Pre-filled from `run` (a Run or a name in nbtune.runs) when given."""
    from nbtune.engine.evaluation.compare import resolve_runs
    from nbtune.engine.workbench import WORKBENCH
    from nbtune.widgets.picker import Picker

    chosen = resolve_runs([run], WORKBENCH.runs)[0] if run is not None else None
    if model is None and chosen is None:
        model = _notebook_default("model")  # what a `%%finetune` cell without `model:` would train
    return Picker(chosen, model=model)


def _notebook_default(key: str) -> Any:
    """`key` from the `%%finetune` defaults layers (`%config Finetune.defaults` over `[tool.nbtune]`)."""
    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    magics = shell.magics_manager.registry.get("Finetune") if shell is not None else None
    if magics is None:
        return None
    from nbtune.config import overlay

    return overlay(*magics.default_layers().values()).get(key)


def ledger() -> list[dict[str, Any]]:
    """What each run and each cached base holds, in MB (weights it owns, adapter, gradients), then the
    kernel's own (kind "process"): freed memory the allocator still kept (given back as the ledger is read),
    resident memory in all, and everything else in it."""
    from nbtune.engine.workbench import WORKBENCH

    rows = []
    for key, base in WORKBENCH.bases.items():
        rows.append({"holder": f"base {key[0]} ({key[1]}, {key[2]})", "kind": "cached base",
                     "mb": round(_bytes(base.model.parameters()) / 2**20, 1)})
    for name, run in WORKBENCH.runs.items():
        if run.model is None:
            kind = {"pending": "loading", "running": "loading", "failed": "failed (no model)"}.get(run.status,
                                                                                                  "released")
            rows.append({"holder": name, "kind": kind, "mb": 0.0})
            continue
        shares = run.method.keeps_base(run.config.options)
        own = [p for p in run.model.parameters() if p.requires_grad] if shares else list(run.model.parameters())
        grads = [p.grad for p in run.model.parameters() if p.grad is not None]
        rows.append({"holder": name, "kind": "adapter on the shared base" if shares else "own copy of the weights",
                     "mb": round((_bytes(own) + _bytes(grads)) / 2**20, 1)})
    return rows + _process_rows(rows)


def _process_rows(held: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rest of the kernel's resident memory. First what the C allocator kept freed for reuse is given back
    (a background run's thread keeps an arena of its own, and RSS would only grow) and shown, then RSS and
    everything else in it (Python, torch, tokenizers, data). On a GPU the weights are not in RSS, so the rest
    is not split out there."""
    from nbtune.engine.compute.memory import give_back_to_os, rss_mb

    returned = give_back_to_os()
    rss = rss_mb()
    rows = [{"holder": "freed memory the allocator had kept, given back now", "kind": "process",
             "mb": round(returned, 1)},
            {"holder": "resident memory of this kernel (RSS)", "kind": "process", "mb": round(rss, 1)}]
    if not _weights_on_an_accelerator():
        rows.append({"holder": "everything else (Python, torch, tokenizers, data)", "kind": "process",
                     "mb": round(max(rss - sum(row["mb"] for row in held), 0.0), 1)})
    return rows


def _weights_on_an_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.memory_allocated() > 0


def reclaim(target: Any = "all") -> dict[str, float]:
    """Free the memory a run (or every run and cached base: 'all') holds; returns RSS before/after in MB."""
    from nbtune.data import tokenize
    from nbtune.engine.compute.memory import give_back_to_os, rss_mb
    from nbtune.engine.workbench import WORKBENCH

    before = rss_mb()
    if target == "all":
        chosen = list(WORKBENCH.runs.values())
    else:
        from nbtune.engine.evaluation.compare import resolve_runs

        chosen = resolve_runs([target], WORKBENCH.runs)
    for run in chosen:  # all checked before anything is freed: a refusal leaves every run as it was
        if run.training_in_background:
            raise NbtuneError(f"run {run.name!r} is still training; stop it before reclaiming its memory.")
    if target == "all":
        WORKBENCH.bases.clear()
        tokenize.clear_cache()
    for run in chosen:  # a stopped run's checkpoint is on disk: it stays, and resume() builds the model again
        run.release_model()
    _forget_notebook_references()
    give_back_to_os()
    after = rss_mb()
    return {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1), "freed_mb": round(before - after, 1)}


def _forget_notebook_references() -> None:
    # Only if IPython is already running: importing it here would defeat `import nbtune` being light.
    # A failed cell's traceback keeps every frame alive, and with them the model a frame held.
    sys.last_type = sys.last_value = sys.last_traceback = None
    if hasattr(sys, "last_exc"):
        sys.last_exc = None
    ipython_module = sys.modules.get("IPython")
    shell = ipython_module.get_ipython() if ipython_module is not None else None
    if shell is not None:
        shell.displayhook.flush()  # empties Out, _, __, ___ which may pin a Run and its model
        shell.last_execution_result = None  # its error_in_exec holds the traceback too
        for formatter in (getattr(shell, "InteractiveTB", None), getattr(shell, "SyntaxTB", None)):
            if getattr(formatter, "tb", None) is not None:
                formatter.tb = None  # IPython's traceback printer keeps the last traceback it printed


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
