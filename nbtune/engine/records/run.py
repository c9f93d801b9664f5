"""`Run`: one fine-tuning run's state, readable without any display code.

A run holds its config, status, per-step `history` (a list of dicts; `.df` gives a DataFrame), final
`metrics`, and the trained model. It can `generate`, `evaluate` (task metrics on held-out answers), show
its `predictions()` and
`save` a standard artefact: a PEFT adapter, or safetensors weights for full/freeze, plus `run.json`.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbtune.engine.evaluation.generation import Prompt, generate_texts
from nbtune.engine.records import run_folder
from nbtune.engine.records.run_folder import STATUSES
from nbtune.engine.records.saving import atomic_directory
from nbtune.engine.training.events import Broadcast
from nbtune.engine.training.quiet import no_hf_progress_bars
from nbtune.errors import NbtuneError, NbtuneWarning, RunInterrupted

if TYPE_CHECKING:
    from nbtune.config import RunConfig
    from nbtune.methods.registry import MethodContext, MethodSpec


def set_status(run: Run, status: str, error: str | None = None) -> None:
    """The one way a run's status changes (pipeline, launch, sweep); `error` says why a failed run failed."""
    run._status = _checked(status)
    if status == "pruned":  # its sweep stopped it for good: nothing of it is to be continued
        run._session = None
    if error is not None:
        run.error = error


def fail(run: Run, exc: BaseException, error: str | None = None) -> None:
    """Mark `run` failed (with `error`, else the exception's one line), let its training state go (nothing is
    left to continue), and tell its observers."""
    said = str(exc) if isinstance(exc, NbtuneError) else f"{type(exc).__name__}: {exc}"  # ours name the fix
    set_status(run, "failed", error or said)
    run._session = None
    run.emit("on_error", exc)


@contextlib.contextmanager
def failure_recorded(run: Run) -> Iterator[None]:
    """Inside: an exception that ends a pending or running run marks it failed, then goes on up. An interrupt
    that kept the run (`RunInterrupted`) is no failure."""
    try:
        yield
    except RunInterrupted:
        raise
    except BaseException as exc:
        if run.status in ("pending", "running"):
            fail(run, exc)
        raise


def pruned_refusal(name: str) -> str:  # why a trial its sweep pruned does not resume
    return (f"run {name!r} was pruned by its sweep; a pruned trial is not resumed (the sweep tries other settings "
            "instead): train its config again to see it to the end.")


def _checked(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"unknown run status {status!r}; one of {', '.join(STATUSES)}")
    return status


class History(list):
    """Per-step records (step, loss, lr, grad_norm, tokens/s, memory, ...); `.df` is a pandas DataFrame."""

    @property
    def df(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self))


class Run:
    """A fine-tuning run: config, status, history, metrics, and the trained model.

    A record: what it says stays true after training ends, and it is all public. What exists only while a
    run trains or may resume (data, tokenised sets, the Trainer's checkpoint, the divergence guard) lives in
    the pipeline's training session (`engine/training/pipeline.py`), which the run merely holds on to.
    """

    def __init__(self, config: RunConfig, method: MethodSpec, context: MethodContext, *,
                 observers: Iterable[Any] = (), status: str = "pending") -> None:
        self.name: str = str(config.name)
        self.id = uuid.uuid4().hex  # which run a saved folder holds: a newer run of the same name overwrites it
        self.config = config
        self.method = method
        # What the method sees: options, its scratch folder (PiSSA's initial adapter, needed to save), whether
        # the base is quantized. Saving and merging need it as long as the run lives.
        self.context = context
        self.base_name: str | None = None  # the Base it trained on ("in-memory" for a caller's model)
        self._status = _checked(status)
        self.history = History()
        self.eval_history: list[dict[str, Any]] = []
        self.metrics: dict[str, Any] = {}
        self.error: str | None = None
        self.saved_to: Path | None = None
        self.total_steps = 0
        self.model: Any = None
        self.tokenizer: Any = None
        self.eval_pairs: list[tuple[list[dict[str, str]], str]] = []
        # The answers to `sample_prompts` every `sample_every` steps: {"step", "prompt", "answer"} per answer.
        self.samples: list[dict[str, Any]] = []
        # The evaluation rows the task metrics scored: prompt, reference, tuned and base answers, per-row scores
        # (engine/evaluation/scoring.py); saved as predictions.jsonl beside run.json, so a loaded run has them too.
        self.prediction_rows: list[dict[str, Any]] = []
        # What repeating it takes: versions, device and precision, base weights' and data's SHA-256, seed, git
        # commit (engine/records/provenance.py; filled when training starts, read back from run.json by nbtune.load).
        self.provenance: dict[str, Any] = {}
        self._observers = Broadcast(list(observers))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None  # set by the pipeline when training in the background
        self._session: Any = None  # the pipeline's training session, while it trains or may resume

    # ------------------------------------------------------------ state
    @property
    def status(self) -> str:
        """pending, running, finished, stopped, pruned, failed, or combined (`nbtune.combine`); see STATUSES."""
        return self._status

    @property
    def checkpoint(self) -> str | None:
        """The Trainer checkpoint a stopped run resumes from (None when there is none to resume from)."""
        return getattr(self._session, "checkpoint", None)

    @property
    def training_in_background(self) -> bool:
        """True while a background thread trains (or resumes) this run."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------ observers and control
    def observe(self, *observers: Any, replace: bool = False) -> None:
        """Send this run's events to `observers` too (or only to them: `replace=True`); see training/events.py."""
        self._observers.observers[:] = [*([] if replace else self._observers.observers), *observers]

    def unobserve(self, observer: Any) -> None:
        """Stop sending events to `observer` (no error if it was not observing)."""
        if observer in self._observers.observers:
            self._observers.observers.remove(observer)

    @property
    def observers(self) -> tuple[Any, ...]:
        return tuple(self._observers.observers)

    def emit(self, event: str, *args: Any) -> None:
        self._observers.emit(event, self, *args)

    def stop(self) -> None:
        """Ask training to end after the current step (thread-safe: a Stop button may call it)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def resume(self) -> Run:
        """Continue a stopped run where it stopped (weights, optimizer, schedule, data order) to its end."""
        if self.status == "pruned":
            raise NbtuneError(pruned_refusal(self.name))
        if self._session is None:  # finished, failed, loaded from a folder or combined: nothing to continue
            loaded = (" (a run loaded from a folder continues with nbtune.finetune(run.config, "
                      "resume_from=CHECKPOINT_FOLDER))" if self.status == "stopped" else "")
            raise NbtuneError(f"run {self.name!r} is {self.status}; only a stopped run of this kernel with steps left "
                              f"can resume{loaded}.")
        return self._session.resume()

    def wait(self, timeout: float | None = None) -> Run:
        """Block until a background run ends (or `timeout` seconds pass); returns the run."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    def release_model(self) -> None:
        """Let the model go (what `nbtune.reclaim` does); a stopped run resumes by building it again."""
        self.model = None
        if self._session is not None:
            self._session.release()

    # ------------------------------------------------------------ using the model
    def generate(self, prompt: Prompt | Sequence[Prompt], *, max_new_tokens: int = 128,
                 **generate_kwargs: Any) -> str | list[str]:
        """Answer a prompt (string or chat messages), or a list of prompts, with the trained model."""
        self.require_model()
        single = not isinstance(prompt, (list, tuple)) or (bool(prompt) and isinstance(prompt[0], dict))
        prompts = [prompt] if single else list(prompt)
        answers = generate_texts(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 **generate_kwargs)
        return answers[0] if single else answers

    def evaluate(self, *, samples: int | None = None, use_adapter: bool = True) -> dict[str, float]:
        """Generate answers to the first `samples` eval rows (default `metric_samples`) and score them with the
        config's task metrics (exact match when it names none): {"exact_match": 0.91, "samples": 64}. The
        rows, with the base's answers beside them, become `run.predictions()`. `use_adapter=False` scores
        the base model instead: {"base_exact_match": ...}."""
        from nbtune.engine.evaluation.scoring import evaluate_run

        return evaluate_run(self, samples=samples, use_adapter=use_adapter)

    def predictions(self, *, wrong: bool = False, changed: bool = False, by: str | None = None,
                    regenerate: bool = False) -> Any:
        """The eval rows as a table, worst first: prompt, reference, base answer, tuned answer, every metric
        for both (HTML with differences highlighted in a notebook; `.df` a DataFrame). `wrong=True` keeps the
        rows still wrong, `changed=True` those tuning changed; `by` sorts by another metric. Rows the run
        scored at its end (or loaded with it) are shown as they are; otherwise, or with `regenerate=True`,
        they are generated now (and written beside the run's saved run.json)."""
        from nbtune.engine.evaluation.scoring import predictions_table

        return predictions_table(self, wrong=wrong, changed=changed, by=by, regenerate=regenerate)

    def preview(self, n: int = 4) -> Any:
        """The first training batch as this run's model sees it: chat template, tokens, which carry loss,
        padding, truncation (see `nbtune.preview`, which needs no run)."""
        from nbtune.data.preview import preview_batch
        from nbtune.engine.bases.loading import load_tokenizer

        tokenizer = self.tokenizer or load_tokenizer(self.config.model,
                                                     trust_remote_code=self.config.trust_remote_code)
        return preview_batch(self.config, tokenizer, n)

    def base_disabled(self) -> contextlib.AbstractContextManager[Any]:
        """`with run.base_disabled():` the model computes what the base model computes."""
        self.require_model()
        return self.method.disabled(self.model)

    def merge(self) -> Any:
        """A plain transformers model with the adapter folded into the weights; the run keeps its adapter.

        The merge happens on a copy: the run's model may share its base weights with other runs in the
        kernel, which merging in place would change. A 4-bit or 8-bit base cannot take the update
        without re-quantising it away: load the base unquantized and merge that instead.
        """
        import copy

        self.require_model()
        if self.context.quantized and self.method.adds_modules(self.config.options):
            raise NbtuneError(
                f"run {self.name!r} has a {self.config.quantization} base: merging would re-quantize the "
                "update away. Save the adapter, load the base unquantized (nbtune.load(path, "
                "quantization='none')), and merge that.",
                field="quantization",
            )
        from nbtune.engine.bases.loading import MERGED_FROM

        merged = self.method.merged(copy.deepcopy(self.model), self.config.options)
        merged.__dict__.pop("_nbtune_trained_by", None)  # a new model no run has trained: a base for the next
        # A run trained on it records where it came from: reopened later, it is rebuilt from this run's folder.
        setattr(merged, MERGED_FROM, {"run": self.name, "id": self.id, "method": self.method.name,
                                      "saved_to": str(self.saved_to) if self.owns_saved_folder() else None})
        return merged

    def merge_and_export(self, path: str | Path) -> Path:
        """Save a plain model with the adapter merged in (weights, tokenizer) to `path`, loadable anywhere:
        `run.export(path)`. A run on a 4-bit, 8-bit or bf16 base is merged into its base loaded afresh in
        fp32 (dequantise, then merge), since merging into the low-precision weights would round much of the
        update away."""
        from nbtune.engine.export.exporting import export_safetensors

        return export_safetensors(self, path)

    def export(self, path: str | Path, *, format: str = "safetensors", quant: str | None = None) -> Any:
        """Take the model out: the adapter merged into the base (the run and the cached base unchanged).

        `format="safetensors"` writes a transformers model folder (returns its path). `format="gguf"`
        writes one `.gguf` file for llama.cpp / Ollama / LM Studio (`quant`: "f16" (default), "bf16" or
        "q8_0"; Llama, SmolLM, Mistral and Qwen2 models) with an Ollama `Modelfile` beside it, after loading
        it back with transformers and comparing logits and greedy answers with the merged model; returns
        what that check measured. `path` is a new or empty folder, or an earlier export of the same format.
        """
        from nbtune.engine.export.exporting import export_run

        return export_run(self, path, format=format, quant=quant)

    @property
    def trained_on_a_base_in_memory(self) -> bool:
        """Whether the base it trained on was passed in memory, not loaded from `config.model` (which may
        then be another model entirely)."""
        from nbtune.engine.bases.loading import ALIASES

        return self.base_name is not None and self.base_name != ALIASES.get(self.config.model, self.config.model)

    def to_yaml(self) -> str:
        """The run's config as YAML: the same experiment for `nbtune run config.yaml`. Data given as a
        DataFrame, list or Dataset is written out as its rows (`export_script` puts them in JSONL files)."""
        return self.config.to_text()

    def export_script(self, path: str | Path | None = None) -> str:
        """A shell script that re-runs this experiment outside the notebook; written to `path` if given.
        A run of several processes is started with `accelerate launch` and an accelerate config (DDP on
        this machine's kind of device; `nbtune export` writes multi-machine, FSDP and DeepSpeed ones)."""
        from nbtune.engine.export.launch_files import rerun_script

        script = rerun_script(self.name, self.config)
        if path is not None:
            Path(path).write_text(script, encoding="utf-8")
        return script

    # ------------------------------------------------------------ saving
    def save(self, path: str | Path | None = None) -> Path:
        """Write the adapter (or weights), tokenizer and run.json to `path` atomically; returns the path."""
        self.require_model()
        target = Path(path).expanduser() if path is not None else self.config.resolved_output_dir
        replaced = run_folder.other_saved_run(target, self.id, self.config.to_json_dict())
        with atomic_directory(target, replaceable=run_folder.RECORD) as tmp, no_hf_progress_bars():
            if self.method.save is not None:
                self.method.save(self.model, tmp, self.context)
            else:
                self.model.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            run_folder.write_run(tmp, self, saved_to=target)  # run.json last: the folder's mark of a save
        self.saved_to = target
        if replaced is not None:
            warnings.warn(f"run {self.name!r} ({self.method.name}) replaced the run saved earlier in {str(target)!r} "
                          f"({replaced}); nbtune.history() no longer lists that one.", NbtuneWarning, stacklevel=2)
        return target

    def to_dict(self) -> dict[str, Any]:
        """What run.json holds (engine/records/run_folder.py says field by field): id, name, status, method,
        config, metrics, history, samples, provenance, total_steps, base name, where it is saved."""
        return run_folder.record_of(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any], *, folder: str | Path | None = None, config: RunConfig | None = None,
                  tokenizer: Any = None) -> Run:
        """The Run a record describes (`to_dict`'s, or run.json's in any schema), every field restored, without
        a model: its method from the registry, a fresh scratch folder. `folder`: the folder it was read from
        (its prediction rows come along; its config's `output_dir` is dropped: a save goes to runs/<name>).
        `config`: the record's config already parsed (e.g. with another quantization)."""
        record = run_folder.checked(record)
        config = config if config is not None else run_folder.config_of(record, reopened=folder is not None)
        method, context = run_folder.parts_of(record, config, tokenizer)
        return run_folder.restore(cls(config, method, context, status=record["status"]), record, folder)

    def __repr__(self) -> str:
        m = self.metrics
        parts = [f"Run {self.name!r}", self.method.name, self.status]
        if self.history:
            parts.append(f"step {self.history[-1]['step']}/{self.total_steps}")
        for key, fmt in (("train_loss", "loss {:.4f}"), ("eval_loss", "eval {:.4f}"),
                         ("exact_match", "exact match {:.0%}"), ("trainable_percent", "trainable {:.2f}%")):
            if m.get(key) is not None:
                parts.append(fmt.format(m[key]))
        return "<" + ", ".join(parts) + ">"

    # ------------------------------------------------------------ helpers
    def require_model(self) -> None:
        """Raise a one-line `NbtuneError` saying why, and what to do, unless the run holds its model."""
        if self.model is not None:
            return
        if self.status in ("pending", "running"):
            raise NbtuneError(f"run {self.name!r} has no model yet ({self.status}); wait for it (.wait()).")
        if self.status == "failed":
            raise NbtuneError(f"run {self.name!r} failed ({self.error}); it has no model. Fix the cell and run it "
                              "again.")
        if self.owns_saved_folder():
            raise NbtuneError(f"run {self.name!r} ({self.status}) no longer holds its model (nbtune.reclaim, or a "
                              f"newer run of the same name, released it); load it back with "
                              f"nbtune.load_run({str(self.saved_to)!r}).")
        overwritten = (f"; its folder {str(self.saved_to)!r} now holds that newer run" if self.saved_to is not None
                       else "")
        raise NbtuneError(f"run {self.name!r} ({self.status}) no longer holds its model: nbtune.reclaim or a newer "
                          f"run of the same name released it{overwritten}. Train it again from its config "
                          "(run.to_yaml() shows it; re-run its cell).")

    def owns_saved_folder(self) -> bool:
        """Whether `saved_to` still holds this run (not a newer run of the same name saved over it)."""
        # A folder saved before runs had ids holds this run as far as anyone can tell.
        return self.saved_to is not None and run_folder.holds_run(self.saved_to, self.id, unrecorded=True)

    @contextlib.contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        if enabled:
            yield
            return
        with self.method.disabled(self.model):
            yield
