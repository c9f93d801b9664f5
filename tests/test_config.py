"""RunConfig parsing, defaults and validation messages; the methods registry and catalog."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import nbtune
from nbtune import ConfigError, MethodError, NbtuneError, RunConfig
from nbtune.config.params import Param
from nbtune.methods import MethodSpec, get_method, register_method
from nbtune.methods import registry as registry_module

# ---------------------------------------------------------------- parsing from every source


def test_parse_from_dict():
    cfg = RunConfig.parse({"method": "lora", "r": 16, "steps": 30, "batch_size": 4})
    assert isinstance(cfg, RunConfig)
    assert cfg.method == "lora"
    assert cfg.steps == 30
    assert cfg.batch_size == 4
    assert cfg.options["r"] == 16
    assert cfg.epochs is None  # steps given: epochs stays unset


def test_parse_from_yaml_text():
    cfg = RunConfig.parse("method: lora\nr: 4\nalpha: 8\nsteps: 7\ntarget_modules: [q_proj, v_proj]\n")
    assert cfg.steps == 7
    assert cfg.options["r"] == 4
    assert cfg.options["alpha"] == 8.0
    assert isinstance(cfg.options["alpha"], float)
    assert cfg.options["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_parse_from_yaml_file(tmp_path, as_path, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text("method: full\nsteps: 5\nname: my-run\n", encoding="utf-8")
    cfg = RunConfig.parse(path if as_path else str(path))
    assert cfg.method == "full"
    assert cfg.steps == 5
    assert cfg.name == "my-run"
    assert cfg.options == {}


def test_parse_missing_yaml_file_names_it():
    with pytest.raises(ConfigError, match=r"missing\.yaml") as info:
        RunConfig.parse("missing.yaml")
    assert "does not exist" in str(info.value)


def test_parse_from_runconfig_keeps_values():
    first = RunConfig.parse({"name": "keep", "r": 32, "steps": 9, "lr": 1e-3})
    again = RunConfig.parse(first)
    assert again is first  # a parsed config is frozen and was checked when it was made: not parsed again
    changed = RunConfig.parse(first, steps=10)
    assert changed is not first and changed.steps == 10 and changed.options["r"] == 32 and first.steps == 9


def test_a_parsed_config_is_frozen_and_changes_only_through_with_changes():
    import dataclasses

    config = RunConfig.parse({"name": "frozen", "r": 8, "steps": 9, "sweep": {"r": [4, 8]}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    with pytest.raises(TypeError, match=r"with_changes\(key=value\)"):
        config.options["r"] = 16
    with pytest.raises(TypeError):
        config.derived.clear()
    changed = config.with_changes(r=16, steps=3)
    assert (changed.options["r"], changed.steps, config.options["r"], config.steps) == (16, 3, 8, 9)
    with pytest.raises(ConfigError, match="`r`"):
        config.with_changes(r=-1)  # checked again, as a whole
    chosen = config.with_changes(gradient_checkpointing=True, derived=True)
    assert chosen.derived["gradient_checkpointing"] is True and "gradient_checkpointing" not in chosen.to_text()
    # the sweep block is parsed once, with the config, and carried: nothing checks it again
    assert config.sweep_space.trials == 2 and [d.name for d in config.sweep_space.dimensions] == ["r"]
    assert RunConfig.parse(config.to_text()).sweep_space == config.sweep_space


def test_parse_none_and_empty_yaml_give_defaults():
    assert RunConfig.parse(None).options == RunConfig.parse("").options == RunConfig.parse({}).options


def test_keyword_overrides_win_over_the_source():
    cfg = RunConfig.parse({"r": 8, "steps": 10}, r=64, batch_size=2)
    assert cfg.options["r"] == 64
    assert cfg.batch_size == 2
    assert cfg.steps == 10


def test_keyword_overrides_win_over_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("r: 8\nsteps: 10\n", encoding="utf-8")
    cfg = RunConfig.parse(path, steps=2, r=4)
    assert (cfg.steps, cfg.options["r"]) == (2, 4)


def test_nested_options_mapping_is_accepted_and_top_level_wins():
    cfg = RunConfig.parse({"options": {"r": 4, "alpha": 2}, "alpha": 3})
    assert cfg.options["r"] == 4
    assert cfg.options["alpha"] == 3.0


def test_override_steps_on_a_parsed_config():
    cfg = RunConfig.parse({"name": "base"})
    assert RunConfig.parse(cfg, steps=5).steps == 5


def test_override_method_on_a_parsed_config():
    cfg = RunConfig.parse({"name": "base", "steps": 3})
    assert RunConfig.parse(cfg, method="qlora").quantization == "4bit"


def test_yaml_exponent_learning_rate():
    assert RunConfig.parse("lr: 1e-4\n").lr == pytest.approx(1e-4)


# ---------------------------------------------------------------- defaults


def test_epochs_default_to_one_without_steps():
    cfg = RunConfig.parse({})
    assert cfg.epochs == 1.0
    assert cfg.steps is None


@pytest.mark.parametrize(
    ("method", "lr", "quantization"),
    [("lora", 2e-4, "none"), ("qlora", 2e-4, "4bit"), ("full", 2e-5, "none"), ("freeze", 5e-5, "none")],
    ids=["lora", "qlora", "full", "freeze"],
)
def test_method_defaults(method, lr, quantization):
    cfg = RunConfig.parse({"method": method})
    assert cfg.lr == pytest.approx(lr)
    assert cfg.quantization == quantization


def test_explicit_lr_and_quantization_are_kept():
    cfg = RunConfig.parse({"method": "qlora", "lr": 1e-3, "quantization": "8bit"})
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.quantization == "8bit"


def test_lora_options_defaults():
    cfg = RunConfig.parse({})
    assert cfg.options == {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear",
                           "rslora": False, "init": "default"}


def test_full_has_no_options():
    assert RunConfig.parse({"method": "full"}).options == {}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_name_is_generated_and_folder_safe(method):
    cfg = RunConfig.parse({"method": method})
    assert re.fullmatch(rf"{method}-\d{{8}}-\d{{6}}(-\d+)?", cfg.name)
    assert Path(cfg.name).name == cfg.name  # one path component
    assert cfg.resolved_output_dir == Path("runs") / cfg.name


def test_output_dir_wins_over_name():
    cfg = RunConfig.parse({"name": "x", "output_dir": "somewhere/else"})
    assert cfg.resolved_output_dir == Path("somewhere/else")


def test_int_valued_float_is_accepted_for_int_keys():
    cfg = RunConfig.parse({"steps": 4.0, "r": 2.0})
    assert cfg.steps == 4 and isinstance(cfg.steps, int)
    assert cfg.options["r"] == 2 and isinstance(cfg.options["r"], int)


# ---------------------------------------------------------------- to_dict round trip


def test_method_options_at_top_level_land_in_options():
    cfg = RunConfig.parse({"r": 12, "rslora": True, "init": "gaussian", "steps": 3})
    assert cfg.options["r"] == 12
    assert cfg.options["rslora"] is True
    assert cfg.options["init"] == "gaussian"
    assert not hasattr(cfg, "r")


def test_to_dict_is_flat_and_round_trips():
    cfg = RunConfig.parse({"name": "rt", "method": "lora", "r": 4, "alpha": 8, "steps": 3, "lr": 5e-4,
                           "target_modules": ["q_proj"], "data": "train.jsonl", "seed": 7})
    flat = cfg.to_dict()
    assert "options" not in flat
    assert flat["r"] == 4
    assert flat["target_modules"] == ["q_proj"]
    assert flat["steps"] == 3
    again = RunConfig.parse(flat)
    assert again == cfg
    assert again.to_dict() == flat


def test_to_dict_round_trips_with_defaults_filled():
    cfg = RunConfig.parse({"method": "freeze", "trainable_layers": 1})
    again = RunConfig.parse(cfg.to_dict())
    assert again == cfg
    assert again.options == {"trainable_layers": 1, "trainable_modules": []}


def test_to_json_dict_describes_in_memory_data():
    cfg = RunConfig.parse({"name": "j", "data": [{"prompt": "a", "completion": "b"}]})
    assert cfg.to_json_dict()["data"] == "<list>"
    assert cfg.to_dict()["data"] == [{"prompt": "a", "completion": "b"}]


# ---------------------------------------------------------------- bad input: one line, names the key

ANY = object()  # the code sets no `field` for this error


BAD = [
    # (id, source, error class, substrings the message must hold, exc.field)
    ("unknown-option-typo", {"rr": 8}, ConfigError, ["`rr`", "Did you mean `r`?"], "rr"),
    ("unknown-setting-typo", {"bach_size": 4}, ConfigError, ["`bach_size`", "Did you mean `batch_size`?"],
     "bach_size"),
    ("unknown-nested-option", {"options": {"alpah": 2}}, ConfigError, ["`alpah`", "Did you mean `alpha`?"],
     "alpah"),
    ("lora-option-on-full", {"method": "full", "r": 8}, ConfigError, ["`r`", "'full'"], "r"),
    ("r-string", {"r": "eight"}, ConfigError, ["`r`", "integer", "'eight'"], "r"),
    ("r-bool", {"r": True}, ConfigError, ["`r`", "integer", "bool"], "r"),
    ("lr-string", {"lr": "fast"}, ConfigError, ["`lr`", "number", "'fast'"], "lr"),
    ("steps-fraction", {"steps": 1.5}, ConfigError, ["`steps`", "integer"], "steps"),
    ("target-modules-int", {"target_modules": 3}, ConfigError, ["`target_modules`"], "target_modules"),
    ("target-modules-mixed-list", {"target_modules": ["q_proj", 3]}, ConfigError, ["`target_modules`"],
     "target_modules"),
    ("rslora-string", {"rslora": "yes please"}, ConfigError, ["`rslora`", "true or false"], "rslora"),
    ("r-0", {"r": 0}, ConfigError, ["`r`", "range"], "r"),
    ("alpha-0", {"alpha": 0}, ConfigError, ["`alpha`", "range"], "alpha"),
    ("alpha-negative", {"alpha": -1}, ConfigError, ["`alpha`", "range"], "alpha"),
    ("lr-0", {"lr": 0}, ConfigError, ["`lr`", "range"], "lr"),
    ("lr-negative", {"lr": -1}, ConfigError, ["`lr`", "range"], "lr"),
    ("lr-above-1", {"lr": 2}, ConfigError, ["`lr`", "range"], "lr"),
    ("batch-size-0", {"batch_size": 0}, ConfigError, ["`batch_size`", "range"], "batch_size"),
    ("dropout-negative", {"dropout": -0.1}, ConfigError, ["`dropout`", "range"], "dropout"),
    ("dropout-1", {"dropout": 1.0}, ConfigError, ["`dropout`", "range"], "dropout"),
    ("steps-0", {"steps": 0}, ConfigError, ["`steps`", "range"], "steps"),
    ("epochs-0", {"epochs": 0}, ConfigError, ["`epochs`", "range"], "epochs"),
    ("grad-accum-0", {"grad_accum": 0}, ConfigError, ["`grad_accum`", "range"], "grad_accum"),
    ("max-length-2", {"max_length": 2}, ConfigError, ["`max_length`", "range"], "max_length"),
    ("eval-split-half", {"eval_split": 0.5}, ConfigError, ["`eval_split`", "range"], "eval_split"),
    ("trainable-layers-negative", {"method": "freeze", "trainable_layers": -1}, ConfigError,
     ["`trainable_layers`", "range"], "trainable_layers"),
    ("unknown-method", {"method": "lroa"}, MethodError, ["`method`", "'lroa'", "Did you mean `lora`?"], "method"),
    ("method-null", {"method": None}, ConfigError, ["`method`"], "method"),
    ("steps-and-epochs", {"steps": 10, "epochs": 2}, ConfigError, ["`steps`", "`epochs`"], "steps"),
    ("4bit-with-full", {"method": "full", "quantization": "4bit"}, ConfigError, ["quantization", "'full'"],
     "quantization"),
    ("none-with-qlora", {"method": "qlora", "quantization": "none"}, ConfigError, ["quantization", "'qlora'"],
     "quantization"),
    ("format-xml", {"format": "xml"}, ConfigError, ["`format`", "'xml'"], "format"),
    ("scheduler-typo", {"lr_scheduler": "cosin"}, ConfigError, ["`lr_scheduler`", "Did you mean `cosine`?"],
     "lr_scheduler"),
    ("init-typo", {"init": "pisa"}, ConfigError, ["`init`", "Did you mean `pissa`?"], "init"),
    ("name-dotdot", {"name": "../x"}, ConfigError, ["`name`", "'../x'"], "name"),
    ("name-slash", {"name": "a/b/c"}, ConfigError, ["`name`", "'a/b/c'"], "name"),
    ("name-empty", {"name": ""}, ConfigError, ["`name`"], "name"),
    ("name-blank", {"name": "   "}, ConfigError, ["`name`"], "name"),
    ("name-dot-first", {"name": ".hidden"}, ConfigError, ["`name`"], "name"),
    ("name-too-long", {"name": "a" * 101}, ConfigError, ["`name`"], "name"),
    ("name-int", {"name": 5}, ConfigError, ["`name`", "string"], "name"),
    ("yaml-syntax", "r: 8\nsteps: 3\n  bad: : x\n", ConfigError, ["not valid YAML", "line 3"], ANY),
    ("yaml-unclosed", "r: 8\nlr: [0.1\n", ConfigError, ["not valid YAML", "line 3"], ANY),
    ("yaml-list", "- r\n- 8\n", ConfigError, ["list"], ANY),
    ("yaml-scalar", "just some words", ConfigError, ["str"], ANY),
    ("pissa-on-4bit", {"init": "pissa", "quantization": "4bit"}, MethodError, ["`init: pissa`", "4bit"], "init"),
    ("olora-on-qlora", {"method": "qlora", "init": "olora"}, MethodError, ["`init: olora`"], "init"),
    ("freeze-nothing", {"method": "freeze", "trainable_layers": 0}, MethodError,
     ["`trainable_layers: 0`", "trainable_modules"], "trainable_layers"),
    ("data-empty", {"data": ""}, ConfigError, ["`data`"], "data"),
    ("data-blank", {"data": "  "}, ConfigError, ["`data`"], "data"),
    ("data-null", {"data": None}, ConfigError, ["`data`"], "data"),
    ("options-not-mapping", {"options": 3}, ConfigError, ["`options`"], "options"),
    ("non-string-key", {1: 2}, ConfigError, ["keys must be strings"], ANY),
    ("not-a-config", 42, ConfigError, ["int"], ANY),
]


@pytest.mark.parametrize(("source", "error", "needles", "field"), [case[1:] for case in BAD],
                         ids=[case[0] for case in BAD])
def test_bad_config_raises_one_line_error_naming_the_key(source, error, needles, field):
    with pytest.raises(error) as info:
        RunConfig.parse(source)
    exc = info.value
    message = str(exc)
    assert isinstance(exc, NbtuneError)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    if field is not ANY:
        assert exc.field == field


def test_config_errors_are_value_errors():
    # Callers that catch ValueError (e.g. notebook widgets) still see config mistakes.
    with pytest.raises(ValueError, match="`r`"):
        RunConfig.parse({"r": 0})


def test_keyword_override_is_validated_too():
    with pytest.raises(ConfigError, match="Did you mean `steps`") as info:
        RunConfig.parse({}, stesp=3)
    assert info.value.field == "stesp"


def test_python_tag_is_refused_and_never_constructed():
    text = 'x: !!python/object/apply:os.mkdir ["constructed"]\n'
    with pytest.raises(ConfigError, match="python/object") as info:
        RunConfig.parse(text)
    assert "\n" not in str(info.value)
    assert not Path("constructed").exists()


def test_python_object_tag_in_file_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object:collections.OrderedDict {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.parse(path)


def test_yaml_error_in_file_gives_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: lora\nr: 8\nsteps: [3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line \d+") as info:
        RunConfig.parse(str(path))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the methods registry


@pytest.fixture
def clean_registry():
    """Snapshot the registry (builtins loaded) and restore it after the test."""
    registry_module.all_methods()
    saved = dict(registry_module._REGISTRY)
    yield registry_module._REGISTRY
    registry_module._REGISTRY.clear()
    registry_module._REGISTRY.update(saved)


def _identity(model, ctx):
    return model


def _spec(name="zz_test", params=(), summary="A test method."):
    return MethodSpec(name=name, summary=summary, params=params, prepare=_identity)


@pytest.mark.parametrize("name", ["Bad", "1abc", "has-dash", "", "_x", "sp ace"],
                         ids=["upper", "digit-first", "dash", "empty", "underscore-first", "space"])
def test_register_refuses_bad_names(clean_registry, name):
    with pytest.raises(MethodError, match="method name"):
        register_method(_spec(name=name))
    assert name not in clean_registry


def test_register_refuses_duplicate(clean_registry):
    original = clean_registry["lora"]
    with pytest.raises(MethodError, match="already registered"):
        register_method(_spec(name="lora"))
    assert clean_registry["lora"] is original


@pytest.mark.parametrize("clash", ["lr", "steps", "name", "options"])
def test_register_refuses_option_clashing_with_run_setting(clean_registry, clash):
    spec = _spec(params=(Param(clash, "float", 1.0, "clashes"),))
    with pytest.raises(MethodError, match=clash):
        register_method(spec)
    assert "zz_test" not in clean_registry


def test_register_refuses_repeated_option(clean_registry):
    spec = _spec(params=(Param("k", "int", 1, "k"), Param("k", "int", 2, "k again")))
    with pytest.raises(MethodError, match="repeat"):
        register_method(spec)


def test_register_refuses_default_failing_its_own_check(clean_registry):
    spec = _spec(params=(Param("k", "int", 0, "k", min=1),))
    with pytest.raises(ConfigError, match="`k`"):
        register_method(spec)
    assert "zz_test" not in clean_registry


def test_register_refuses_non_callable_prepare(clean_registry):
    spec = MethodSpec(name="zz_test", summary="x", params=(), prepare="nope")
    with pytest.raises(MethodError, match="prepare"):
        register_method(spec)


def test_register_and_replace(clean_registry):
    first = register_method(_spec(params=(Param("k", "int", 3, "A knob.", min=1),)))
    assert get_method("zz_test") is first
    cfg = RunConfig.parse({"method": "zz_test", "k": 5})
    assert cfg.options == {"k": 5}
    with pytest.raises(MethodError, match="already registered"):
        register_method(_spec(summary="second"))
    second = register_method(_spec(summary="second"), replace=True)
    assert get_method("zz_test") is second
    assert get_method("zz_test").summary == "second"
    assert "zz_test" in nbtune.methods().names()


def test_registry_fixture_restored():
    # Runs after test_register_and_replace in file order: the test method must be gone.
    with pytest.raises(MethodError):
        get_method("zz_test")


# ---------------------------------------------------------------- nbtune.methods()


def test_methods_lists_builtins():
    catalog = nbtune.methods()
    assert {"lora", "qlora", "full", "freeze"} <= set(catalog.names())
    assert all(isinstance(spec, MethodSpec) for spec in catalog)


def test_methods_repr_shows_every_option_help():
    catalog = nbtune.methods()
    text = repr(catalog)
    for spec in catalog:
        assert f"{spec.name}: {spec.summary}" in text
        for param in spec.params:
            assert param.help in text, f"{spec.name}.{param.name}"
            assert param.describe() in text


def test_methods_markdown_lists_options():
    markdown = nbtune.methods()._repr_markdown_()
    assert "| `lora` |" in markdown
    assert "`r` (8)" in markdown


def test_methods_by_name():
    lora = nbtune.methods("lora")
    assert lora.name == "lora"
    assert lora.param("r").default == 8
    assert nbtune.methods("qlora").default_quantization == "4bit"
    with pytest.raises(KeyError):
        lora.param("nope")


def test_methods_unknown_name():
    with pytest.raises(MethodError, match="Did you mean `full`") as info:
        nbtune.methods("fulll")
    assert info.value.field == "method"


def test_one_module_name_is_that_module_and_expressions_stay_strings():
    assert nbtune.RunConfig.parse({"target_modules": "q_proj"}).options["target_modules"] == ["q_proj"]
    assert nbtune.RunConfig.parse({"target_modules": "all-linear"}).options["target_modules"] == "all-linear"
    assert nbtune.RunConfig.parse({"target_modules": r".*\.q_proj"}).options["target_modules"] == r".*\.q_proj"


def test_lora_on_one_module_named_alone(tiny_model_dir, demo_rows):
    run = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, target_modules="q_proj", steps=1, batch_size=2,
                          metric="none", save=False)
    names = [name for name, _ in run.model.named_parameters() if ".lora_" in name]
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in names}
    assert run.status == "finished" and adapted == {"q_proj"}


def test_method_names_as_papers_write_them():
    assert RunConfig.parse({"method": "LoRA"}).method == "lora"
    assert RunConfig.parse({"method": "QLoRA"}).method == "qlora"


def test_ranges_print_whole_numbers_whole():
    with pytest.raises(ConfigError, match=r"\[8, 1048576\]"):
        RunConfig.parse({"max_length": 10**9})


def test_one_method_prints_as_its_options():
    spec = nbtune.methods("lora")
    assert repr(spec).startswith("lora: ") and "r (int, default 8 [1, 4096])" in repr(spec)
    assert "| `r` | `8` |" in spec._repr_markdown_()


def test_names_separated_by_commas_are_a_list():
    assert RunConfig.parse({"target_modules": "q_proj, v_proj"}).options["target_modules"] == ["q_proj", "v_proj"]


def test_init_text_without_init_text_is_named():
    with pytest.raises(MethodError, match="add `init: text`"):
        RunConfig.parse({"method": "prompt", "init_text": "What is the answer?"})


# ---------------------------------------------------------------- other libraries' names point to nbtune's

# (key, value, method, what the message must say, what it must not say)
FOREIGN = [
    ("learning_rate", 2e-4, "lora", ["nbtune calls it `lr`", "the Trainer's name", "`lr: 0.0002`"], ["Did you mean"]),
    ("max_steps", 100, "lora", ["nbtune calls it `steps`", "`steps: 100`"], ["eval_steps"]),
    ("num_train_epochs", 3, "lora", ["nbtune calls it `epochs`", "`epochs: 3`"], []),
    ("gradient_accumulation_steps", 4, "lora", ["`grad_accum: 4`"], []),
    ("per_device_train_batch_size", 4, "ia3", ["`batch_size: 4`"], []),
    ("train_batch_size", 4, "lora", ["`batch_size: 4`"], []),
    ("micro_batch_size", 2, "lora", ["`batch_size: 2`"], []),
    ("lora_r", 16, "lora", ["nbtune calls it `r`", "`r: 16`"], ["rslora"]),
    ("lora_alpha", 32, "lora", ["`alpha: 32`"], []),
    ("lora_dropout", 0.1, "lora", ["`dropout: 0.1`"], []),
    ("max_seq_length", 256, "lora", ["`max_length: 256`", "TRL"], []),
    ("max_seq_len", 256, "lora", ["`max_length: 256`"], []),
    ("cutoff_len", 256, "lora", ["`max_length: 256`"], []),
    ("lr_scheduler_type", "linear", "lora", ["`lr_scheduler: linear`"], []),
    ("warmup_ratio", 0.1, "lora", ["`warmup_steps`", "no warmup ratio"], ["Did you mean"]),
    ("model_name_or_path", "gpt2", "lora", ["`model: gpt2`"], []),
    ("dataset", "rows.jsonl", "lora", ["`data: rows.jsonl`"], []),
    ("train_file", "rows.jsonl", "lora", ["`data: rows.jsonl`"], []),
    ("bf16", True, "lora", ["`precision: bf16`"], []),
    ("fp16", True, "lora", ["`precision: bf16`", "`fp32`", "`dtype: float16`"], ["Did you mean"]),
    ("eval_strategy", "steps", "lora", ["`eval_steps`"], ["Did you mean"]),
    ("evaluation_strategy", "steps", "lora", ["`eval_steps`"], ["Did you mean"]),
    ("save_steps", 50, "lora", ["`checkpoint_steps: 50`"], ["eval_steps"]),
    ("save_total_limit", 3, "lora", ["`keep_checkpoints: 3`"], []),
    ("neftune_noise_alpha", 5, "lora", ["`neftune_alpha: 5`"], []),
    ("use_rslora", True, "lora", ["`rslora: true`"], []),
    ("init_lora_weights", "pissa", "lora", ["`init: pissa`"], []),
    ("use_dora", True, "lora", ["`method: dora`"], []),
    ("load_in_4bit", True, "lora", ["`quantization: 4bit`"], []),
    ("load_in_8bit", True, "lora", ["`quantization: 8bit`"], []),
    ("run_name", "mine", "lora", ["`name: mine`"], []),
    ("torch_dtype", "bfloat16", "lora", ["`dtype: bfloat16`"], []),
    ("completion_only_loss", True, "lora", ["`train_on_prompt: false`"], []),
    ("Learning_Rate", 1e-3, "lora", ["`lr: 0.001`"], []),
    # nbtune's key exists only for other methods: say which, never suggest it as if it fitted
    ("lora_r", 16, "ia3", ["nbtune calls it `r`", "not of ia3", "`method: lora`", "ia3's options"], ["`r: 16`"]),
    ("init_lora_weights", True, "prompt", ["not of prompt", "`method: lora`"], ["`init: default`"]),
    # another method's option: a method mix-up, not a typo
    ("r", 8, "ia3", ["`r` is an option of", "lora", "qlora", "dora", "not of ia3", "`method: lora`",
                     "ia3's options: target_modules, feedforward_modules"], ["Did you mean", "`lr`"]),
    ("num_virtual_tokens", 8, "lora", ["an option of", "prompt", "not of lora", "`method: prefix`"], ["Did you mean"]),
    ("r", 8, "peft", ["`peft_args: {r: 8}`"], ["Did you mean"]),
    # real typos keep their did-you-mean
    ("stpes", 3, "lora", ["Did you mean `steps`?"], []),
    ("rr", 8, "ia3", ["`rr`"], ["`lr`"]),
]


@pytest.mark.parametrize(("key", "value", "method", "needles", "forbidden"), FOREIGN,
                         ids=[f"{k}-{m}" for k, _, m, _, _ in FOREIGN])
def test_other_libraries_names_point_to_nbtunes_key(key, value, method, needles, forbidden):
    with pytest.raises(ConfigError) as info:
        RunConfig.parse({"method": method, key: value})
    message = str(info.value)
    assert info.value.field == key and "\n" not in message and f"`{key}`" in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    for bad in forbidden:
        assert bad not in message, f"{bad!r} in {message!r}"


def test_the_suggested_fix_parses():
    # What a message tells the user to write must itself be a valid config.
    checked = 0
    for key, value, method, _, _ in FOREIGN:
        written = re.search(r"(?:write|writes it) `(\w+): ([^`]+)`", str(_error({"method": method, key: value})))
        if written:
            RunConfig.parse({"method": method, **nbtune.config.load_yaml(f"{written[1]}: {written[2]}")})
            checked += 1
    assert checked >= 25


def _error(source):
    with pytest.raises(ConfigError) as info:
        RunConfig.parse(source)
    return info.value


def test_foreign_names_never_shadow_nbtune_keys_and_point_to_real_ones():
    from nbtune.config import common_params
    from nbtune.config.foreign_names import foreign_name, foreign_names
    from nbtune.methods.registry import all_methods

    keys = set(common_params()) | {name for m in all_methods() for name in m.option_names()}
    assert not keys & set(foreign_names())
    for name in foreign_names():
        target = foreign_name(name).key
        assert target is None or target in keys, (name, target)
