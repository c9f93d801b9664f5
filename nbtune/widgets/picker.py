"""`nbtune.picker()`: a form built from the methods registry, with live estimates and the equivalent cell.

Every field comes from a `Param` (never a hand-kept list), so a new method shows up with its knobs.
A field nbtune fills in from the method (lr, quantization) follows the method until the user edits it,
as `RunConfig.derived` records. The cell is `RunConfig.to_text`, less defaults and derived values.
Estimates come from a weightless (meta-device) model. "Insert cell" writes the equivalent
`%%finetune` cell below (through ipylab's JupyterLab command bridge, when installed); "Train" starts
the run in the background with the live panel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbtune.config import RunConfig, common_params
from nbtune.config.params import Param
from nbtune.errors import ConfigError, NbtuneError

COMMON = ("name", "data", "steps", "batch_size", "lr", "max_length", "quantization", "neftune_alpha")


def field_widget(param: Param, value: Any, choices: list[str] | None = None) -> Any:
    """The widget for one setting, from its kind, range and choices."""
    import ipywidgets as w

    label = {"description": param.name, "tooltip": param.help, "style": {"description_width": "130px"}}
    if param.choices:
        return w.Dropdown(options=list(param.choices), value=value if value in param.choices else param.choices[0],
                          **label)
    if param.kind == "bool":
        return w.Checkbox(value=bool(value), **label)
    if param.kind == "int":
        return w.IntText(value=int(value) if value is not None else 0, **label)
    if param.kind == "float":
        return w.FloatText(value=float(value) if value is not None else 0.0, **label)
    if param.kind == "names" and choices:
        tags = [value] if isinstance(value, str) else list(value or [])
        return w.TagsInput(value=tags, allowed_tags=[*choices, "all-linear"], allow_duplicates=False)
    return w.Text(value="" if value is None else str(value), **label)


class Picker:
    """The method picker; `nbtune.picker()` as a cell's last line shows it."""

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __init__(self, run: Any = None, *, model: str | None = None) -> None:
        import ipywidgets as w

        from nbtune.catalog import methods

        start_config = run.config if run is not None else RunConfig.parse({"steps": 40})
        start = {**start_config.to_dict(), **({} if run is not None else {"name": ""})}
        if model:
            start["model"] = model
        # Data held in memory (a DataFrame, a list of dicts) has no text to show in a field: the field shows
        # the notebook variable holding it, `{{ df }}`, and the config and the cell use that variable.
        self._held: tuple[str, Any] | None = None  # (label, rows) for data in memory that no variable names
        if not isinstance(start.get("data"), (str, Path)):
            start["data"] = _placeholder_for(start["data"]) or self._hold(start["data"])
        # A run's settings the form has no field for (metric, save, eval_data, ...) carry over as they were.
        shown = {*COMMON, "model", "method", *(run.method.option_names() if run is not None else ())}
        # What nbtune derived (lr and quantization from the method, ...) as the form shows it: a field still
        # at its derived value is left out of the config, so the method derives it afresh (see `values`).
        self._derived = dict(start_config.derived)
        self._catching_up = False  # True while the form shows newly derived values: those are no edits
        self.hidden = {k: v for k, v in start.items() if run is not None and k not in shown and k not in self._derived}
        self.model = start["model"]
        self._linear = _linear_names(self.model)
        self.method = w.Dropdown(options=[(f"{s.name} — {s.summary}", s.name) for s in methods()],
                                 value=start["method"], description="method", layout=w.Layout(width="720px"))
        params = common_params()
        self.common = {k: field_widget(params[k], start.get(k)) for k in COMMON}
        self.options: dict[str, Any] = {}
        self._kinds: dict[str, str] = {}
        self.options_box = w.VBox()
        self.estimates, self.message = w.HTML(), w.HTML()
        self.cell = w.Textarea(layout=w.Layout(width="720px", height="170px"), disabled=True)
        self.insert = w.Button(description="Insert cell", icon="plus")
        self.train = w.Button(description="Train", icon="play", button_style="primary")
        self.output = w.Output()
        self.widget = w.VBox([self.method, self.options_box, w.HTML("<b>run settings</b>"),
                              w.VBox(list(self.common.values())), self.estimates, self.message, self.cell,
                              w.HBox([self.insert, self.train]), self.output])
        self._build_options(start)
        self.method.observe(lambda change: self._build_options({}), names="value")
        for widget in self.common.values():
            widget.observe(lambda change: self.refresh(), names="value")
        self.insert.on_click(lambda _: self.insert_cell())
        self.train.on_click(lambda _: self.start_training())

    # ------------------------------------------------------------------ state
    def values(self) -> dict[str, Any]:
        """The form as a config dict (what the inserted cell says)."""
        out = {**self.hidden, "model": self.model, "method": self.method.value}
        out.update({k: self._value(w) for k, w in self.common.items()})
        for key, value in self._derived.items():  # not edited: the config derives it again, for its method
            if key in self.common and out.get(key) == value:
                del out[key]
        out["data"] = self._held[1] if self._held and out.get("data") == self._held[0] else \
            _from_placeholder(out.get("data"))
        if not out.get("neftune_alpha"):
            out.pop("neftune_alpha", None)  # 0 in the form means off
        for key, widget in self.options.items():
            value = self._value(widget)
            if self._kinds[key] == "any" and isinstance(value, str) and value.strip():
                value = _yaml_field(key, value)  # e.g. peft_args: {r: 64}
            out[key] = value
        if out.get("steps") == 0 and (self.hidden.get("epochs") or "epochs" in self._derived):
            out.pop("steps")  # a run that trained by epochs: its epochs carry over, the steps field is empty
        return {k: v for k, v in out.items() if v is not None and not (isinstance(v, str) and v == "")}

    def config(self) -> RunConfig:
        return RunConfig.parse(self.values())

    def cell_text(self, config: RunConfig | None = None) -> str:
        """The equivalent `%%finetune` cell: the method and every setting that is neither its default nor
        derived, the name on the magic's line. Data in memory is the notebook variable holding it, else its rows."""
        config = self.config() if config is None else config
        named = {}  # data in memory that a notebook variable holds: the cell names the variable
        for key in ("data", "eval_data"):
            value = getattr(config, key)
            placeholder = None if isinstance(value, (str, Path, type(None))) else _placeholder_for(value)
            if placeholder:
                named[key] = placeholder
        text = config.with_changes(**named).to_text(omit=("name", "defaults", "derived")).strip()
        for placeholder in named.values():  # `data: {{ df }}`, as one writes it, not quoted
            text = text.replace(repr(placeholder), placeholder)
        return f"%%finetune {self.common['name'].value}".rstrip() + "\n" + text

    def refresh(self) -> None:
        """Re-check the form, update the estimates and the cell text; errors show inline."""
        from nbtune.widgets.render import memory_html

        if self._catching_up:
            return
        try:
            config = self.config()
        except NbtuneError as exc:
            self.message.value = f"<span style='color:#cb181d'>{exc}</span>"
            self.cell.value, self.train.disabled, self.insert.disabled = "", True, True
            return
        self.message.value, self.train.disabled, self.insert.disabled = "", False, False
        self._show_derived(config)
        self.cell.value = self.cell_text(config)
        try:
            from nbtune.engine.compute.estimate import estimate

            e = estimate(config)
        except NbtuneError as exc:  # the method cannot work on this model (bitfit without biases, ...)
            self.message.value = f"<span style='color:#cb181d'>{exc}</span>"
            self.estimates.value, self.train.disabled = "", True
            return
        except Exception as exc:  # otherwise an estimate is a nicety: never block the form on it
            self.estimates.value = f"<i>no estimate: {exc}</i>"
            return
        self.estimates.value = (
            f"<b>{e['trainable_params']:,}</b> trainable parameters ({e['trainable_percent']:.3f}%), "
            f"adapter {e['adapter_mb']} MB, step cost {e['step_cost']}x "
            "<small>(activations assume every sequence at max_length)</small>" + memory_html({
                "weights_mb": e["weights_mb"], "trainable_mb": e["trainable_and_grads_mb"],
                "optimizer_mb": e["optimizer_mb"], "activations_mb": e["activations_mb"]}))

    # ------------------------------------------------------------------ actions
    def insert_cell(self) -> bool:
        """Write the cell below the picker's cell (JupyterLab, via ipylab); False where that is impossible."""
        try:
            from ipylab import JupyterFrontEnd
        except ImportError:
            self.message.value = "<i>install ipylab to insert cells; copy the cell text above instead</i>"
            return False
        app = JupyterFrontEnd()
        app.commands.execute("notebook:insert-cell-below")
        app.commands.execute("notebook:replace-selection", {"text": self.cell_text()})
        return True

    def start_training(self) -> Any:
        from nbtune.engine.workbench import WORKBENCH
        from nbtune.widgets.panel import LivePanel

        panel = LivePanel(interactive_stop=True)
        with self.output:
            self.output.clear_output()
            try:
                return WORKBENCH.finetune(self.values(), observers=[panel], background=True,
                                          on_ready=lambda run: panel.show())
            except NbtuneError as exc:
                self.message.value = f"<span style='color:#cb181d'>{exc}</span>"
        return None

    # ------------------------------------------------------------------ helpers
    def _hold(self, rows: Any) -> str:
        label = f"<{type(rows).__name__} of {len(rows)} rows, in memory>"
        self._held = (label, rows)
        return label

    def _build_options(self, start: dict[str, Any]) -> None:
        from nbtune.catalog import methods

        spec = methods(self.method.value)
        self.options = {p.name: field_widget(p, start.get(p.name, p.default), self._linear) for p in spec.params}
        self._kinds = {p.name: p.kind for p in spec.params}
        for widget in self.options.values():
            widget.observe(lambda change: self.refresh(), names="value")
        self.options_box.children = tuple(_labelled(name, widget) for name, widget in self.options.items())
        self.refresh()

    def _show_derived(self, config: RunConfig) -> None:
        """Fields left to nbtune show what `config` derived: the new method's lr, qlora's 4-bit base. Only
        fields `values` left out are derived, so an edited value is never overwritten."""
        self._derived = dict(config.derived)
        self._catching_up = True  # one refresh (the caller's) covers all these changes
        try:
            for key, value in config.derived.items():
                if key in self.common and self.common[key].value != value:
                    self.common[key].value = value
        finally:
            self._catching_up = False

    @staticmethod
    def _value(widget: Any) -> Any:
        value = widget.value
        if isinstance(value, (tuple, list)):
            names = list(value)
            return "all-linear" if names == ["all-linear"] else (names or None)  # peft's keyword, not a name
        return value


def _notebook_namespace() -> dict[str, Any]:
    from IPython import get_ipython

    shell = get_ipython()
    return shell.user_ns if shell is not None else {}


def _placeholder_for(value: Any) -> str | None:
    """`{{ name }}` for the notebook variable that holds `value` (None if none does)."""
    names = [n for n, v in _notebook_namespace().items() if v is value and not n.startswith("_")]
    return f"{{{{ {names[0]} }}}}" if names else None


def _from_placeholder(text: Any) -> Any:
    """The form's `data` text back as the config's value: `{{ name }}` is that notebook variable."""
    from nbtune.magics.parse import parse_cell

    if isinstance(text, str) and text.strip().startswith("{{"):
        return parse_cell(f"data: {text}", _notebook_namespace())["data"]
    return text


def _labelled(name: str, widget: Any) -> Any:
    """Widgets without a description (the module picker) get a label in front."""
    import ipywidgets as w

    if getattr(widget, "description", None):
        return widget
    return w.HBox([w.Label(name, layout=w.Layout(width="134px")), widget])


def _yaml_field(key: str, text: str) -> Any:
    import yaml

    from nbtune.config import load_yaml

    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:  # half-typed, e.g. "{r: [": explained inline like any other mistake
        raise ConfigError(f"`{key}` is not valid YAML yet: {getattr(exc, 'problem', exc)}.", field=key) from None


def _linear_names(model: str) -> list[str]:
    """The model's linear module names, from a weightless model (for the target-module pickers)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from nbtune.engine.bases.loading import resolve_model
        from nbtune.methods.common import linear_module_names

        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model(model)))
        return linear_module_names(meta)
    except Exception:  # the picker still works with free-text module names
        return []
