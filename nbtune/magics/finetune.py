"""The `%%finetune` cell magic, `%finetune_runs`, and their `%config Finetune.*` options.

Thin by design: parse the line and the cell (`parse.py`), build one config, hand it to the kernel's
workbench, show the panel. Defaults come, weakest first, from `[tool.nbtune]` in pyproject.toml,
then `%config Finetune.defaults`, then the cell's YAML, then the line's flags.
"""

from __future__ import annotations

from typing import Any

from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Dict

from nbtune.config import RunConfig, overlay, without_other_methods_options
from nbtune.errors import ConfigError, NbtuneError, RunFailed
from nbtune.magics.parse import line_values, parse_cell, project_defaults, with_values


@magics_class
class Finetune(Magics):
    """Fine-tuning from notebook cells; options settable with `%config Finetune.<option> = ...`."""

    panel = Bool(True, help="Show the live panel (off: a text progress bar).").tag(config=True)
    background = Bool(False, help="Train on a worker thread and return at once; the panel's Stop button "
                      "then works. Off: the cell blocks until the run ends (interrupt the kernel to stop).",
                      ).tag(config=True)
    log_scale = Bool(False, help="Plot the loss on a log scale.").tag(config=True)
    defaults = Dict(help="Config keys applied to every %%finetune cell before its own, e.g. {'model': ...}.",
                    ).tag(config=True)

    @magic_arguments()
    @argument("name", nargs="?", help="Run name; re-running a cell with the same name replaces that run.")
    @argument("--model", help="Base model: a local folder or hub id (default SmolLM2-135M-Instruct).")
    @argument("--method", help="Fine-tuning method (see nbtune.methods()).")
    @argument("--steps", type=int, help="Optimizer steps.")
    @argument("--data", help="Training data: 'demo' or a file path.")
    @argument("--processes", type=int, help="Train in N processes (accelerate DDP; sets num_processes).")
    @argument("--dry-run", action="store_true", help="Check the config and data, train nothing.")
    @argument("--preview", action="store_true", help="Show the first training batch as the model sees it "
              "(template, tokens, loss, padding, truncation); loads only the tokenizer, trains nothing. "
              "nbtune.preview(config, n=...) shows more.")
    @argument("--resume", action="store_true", help="Continue the stopped run of this name where it stopped; "
              "with a cell body, continue it from its newest verified checkpoint (checkpoint_steps), e.g. "
              "after a kernel restart.")
    @argument("--background", action="store_true", help="Train on a worker thread (Stop button works).")
    @argument("--no-panel", action="store_true", help="Text progress instead of the live panel.")
    @line_cell_magic
    def finetune(self, line: str, cell: str | None = None) -> Any:
        """Fine-tune with the YAML config in the cell body; returns the `Run` (also in nbtune.runs[name]).

        Example::

            %%finetune first_lora
            method: lora
            r: 8
            data: demo            # or a file path, or {{ my_dataframe }}
            steps: 60

        As a line magic it takes its config from the flags alone: `%finetune first_lora --resume`.
        """
        # A cell whose run did not happen, failed or was interrupted ends in error, so that "Run All" stops
        # there: nbtune's errors and RunInterrupted show as one line (nbtune.magics), anything else is
        # wrapped in a one-line RunFailed whose cause %tb prints and %debug opens.
        from nbtune.engine.experiments.groups import kind_of  # the engine: loaded when a cell runs, not at %load_ext

        line, values = line_values(line, self.shell.user_ns)  # `--data {{ frame }}`
        args = parse_argstring(self.finetune, line)
        try:
            for key, value in vars(args).items():
                setattr(args, key, with_values(value, values))
            config = self._config(args, cell)
            if args.preview:
                return self._preview(config)
            if args.dry_run:
                return self._dry_run(config)
            background, panel = args.background or self.background, self.panel and not args.no_panel
            kind = kind_of(config)  # what the cell trains is the engine's to say; the magic chooses how to show it
            if kind == "sweep":  # a hyperparameter search (run again: it continues its study)
                return self._sweep(config, panel=panel, background=background)
            if args.resume and (cell or "").strip():  # e.g. after a kernel restart: from its checkpoints
                return self._train(config, background=background, panel=panel, resume_from="latest")
            if args.resume:
                return self._resume(args.name, background=background, panel=panel)
            if kind == "cross-validation":  # `cv: k`: the folds train one after another in this cell
                return self._cross_validate(config, panel=panel, background=args.background)
            return self._train(config, background=background, panel=panel)
        except NbtuneError:
            raise
        except Exception as exc:  # a crash inside training: the run is marked failed, the kernel lives
            what = f"run {args.name!r}" if args.name else "the run"
            raise RunFailed(f"{what} failed: {type(exc).__name__}: {exc} (%tb shows where, %debug opens it)"
                            ) from exc

    @line_magic
    def finetune_ui(self, line: str) -> Any:
        """The method picker (a run's name pre-fills it): `%finetune_ui [NAME]`."""
        from nbtune.api import picker

        return picker(line.strip() or None)

    @magic_arguments()
    @argument("--all", dest="saved", nargs="?", const="runs", default=None, metavar="FOLDER",
              help="every run saved under FOLDER (default: runs), from any kernel, not only this kernel's")
    @line_magic
    def finetune_runs(self, line: str) -> Any:
        """The runs of this kernel, with status and key metrics; `--all [FOLDER]`: every saved run."""
        args = parse_argstring(self.finetune_runs, line)
        if args.saved is not None:
            from nbtune.api import history

            return history(args.saved)
        from nbtune.engine.workbench import WORKBENCH

        return WORKBENCH.runs

    # ----------------------------------------------------------------- helpers
    def default_layers(self) -> dict[str, dict[str, Any]]:
        """Where defaults come from, lowest first: `[tool.nbtune]`, then `%config Finetune.defaults`."""
        return {"[tool.nbtune] in pyproject.toml": project_defaults(),
                "%config Finetune.defaults": dict(self.defaults)}

    def _config(self, args: Any, cell: str) -> dict[str, Any]:
        """The cell's config over `%config Finetune.defaults` over `[tool.nbtune]`, with the flags on top."""
        layers = self.default_layers()
        defaults = overlay(*layers.values())
        flags = {"name": args.name, "model": args.model, "method": args.method, "steps": args.steps,
                 "data": args.data, "num_processes": args.processes}
        explicit = overlay(parse_cell(cell or "", self.shell.user_ns),
                           {k: v for k, v in flags.items() if v is not None})
        config = without_other_methods_options(overlay(defaults, explicit), defaults)
        _name_the_layer_of_a_bad_key(config, explicit, layers)
        return config

    def _dry_run(self, config: dict[str, Any]) -> Any:
        from nbtune.engine.training.pipeline import start_run
        from nbtune.engine.training.session import session_of

        run = start_run(config)
        train, evaluation, fmt = session_of(run).data
        held_out = f", {len(evaluation)} for evaluation" if evaluation is not None else ""
        print(f"{run.name}: {run.method.name} on {run.config.model}; {len(train)} training examples ({fmt})"
              f"{held_out}; config OK.")
        return run.config

    def _preview(self, config: dict[str, Any]) -> Any:
        """The first 4 examples of the first batch (a BatchPreview: highlighted in the notebook)."""
        from nbtune.api import preview

        return preview(config)

    def _train(self, config: dict[str, Any], *, background: bool, panel: bool, resume_from: str | None = None) -> Any:
        from nbtune.engine.workbench import WORKBENCH

        observers, show = self._watchers(background, panel)
        return WORKBENCH.finetune(config, observers=observers, background=background, on_ready=show,
                                  resume_from=resume_from)

    def _cross_validate(self, config: dict[str, Any], *, panel: bool, background: bool) -> Any:
        """k fold runs, each shown as it trains (its own panel, or a text bar), under the bar over the folds;
        returns the `CrossValidation`. Only an explicit `--background` is refused (with its fix):
        `%config Finetune.background` is a default for single runs."""
        from nbtune.engine.workbench import WORKBENCH

        def watch(run: Any) -> None:  # each fold, once its config and data passed, before it trains
            observers, show = self._watchers(False, panel)
            run.observe(*observers)
            if show is not None:
                show(run)

        return WORKBENCH.finetune(config, on_ready=watch, background=background)

    def _sweep(self, config: dict[str, Any], *, panel: bool, background: bool) -> Any:
        """The sweep's live panel (trials table, best so far, the metric by parameter, the running trial's loss;
        Stop for a background sweep) shown once the block passed its checks; without one, a bar per trial."""
        from nbtune.engine.training.events import ProgressObserver
        from nbtune.engine.workbench import WORKBENCH

        view = _sweep_panel(background, self.log_scale) if panel else None
        if view is None and background and _in_a_notebook():
            # bars drawn from the sweep's thread would land under whichever cell runs then: the Sweep this
            # cell returns shows itself as a line kept current in this cell instead (widgets/sweep_panel.py)
            return WORKBENCH.finetune(config, background=True)
        if view is None:
            return WORKBENCH.finetune(config, observers=[ProgressObserver()], background=background)
        return WORKBENCH.finetune(config, observers=[view], background=background, on_ready=lambda sweep: view.show())

    def _resume(self, name: str | None, *, background: bool, panel: bool) -> Any:
        from nbtune.engine.workbench import WORKBENCH

        if not name:
            raise NbtuneError("--resume needs the run's name: %%finetune NAME --resume")
        observers, show = self._watchers(background, panel)
        return WORKBENCH.resume(name, observers=observers, background=background, on_ready=show)

    def _watchers(self, background: bool, panel: bool) -> tuple[list[Any], Any]:
        from nbtune.engine.training.events import ProgressObserver

        view = _live_panel(background, self.log_scale) if panel else None
        if view is not None:
            return [view], lambda run: view.show()
        if background and _in_a_notebook():  # a bar drawn from the thread would land under a later cell
            from nbtune.magics.display import ProgressLine

            line = ProgressLine()
            return [line], lambda run: line.show()
        return [ProgressObserver()], None


def _in_a_notebook() -> bool:
    """A kernel with a frontend (ipykernel), not a terminal or a plain shell."""
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _live_panel(background: bool, log_scale: bool) -> Any:
    """The widget panel when a frontend can show widgets; None in a terminal or plain shell."""
    try:
        if not _in_a_notebook():
            return None
        from nbtune.widgets.panel import LivePanel
    except ImportError:  # no ipywidgets: the text progress bar it is
        return None
    return LivePanel(interactive_stop=background, log_scale=log_scale)


def _sweep_panel(background: bool, log_scale: bool) -> Any:
    """The sweep panel when a frontend can show widgets; None in a terminal or plain shell."""
    try:
        if not _in_a_notebook():
            return None
        from nbtune.widgets.sweep_panel import SweepPanel
    except ImportError:
        return None
    return SweepPanel(interactive_stop=background, log_scale=log_scale)


def _name_the_layer_of_a_bad_key(config: dict[str, Any], explicit: dict[str, Any],
                                 layers: dict[str, dict[str, Any]]) -> None:
    """A wrong key that came from a defaults layer, not from the cell: say where it is set."""
    try:
        RunConfig.parse(config)
    except ConfigError as exc:
        key = exc.field
        if key is None or key in explicit:
            return  # the cell's own mistake (or none to place): the run reports it as usual
        where = [name for name, layer in layers.items() if key in layer]
        if where:
            raise ConfigError(f"{exc} (`{key}` is set in {where[-1]})", field=key) from None
    except NbtuneError:
        return  # not a key's mistake: the run reports it as usual

