"""What a method can do is asked of its spec with the run's options (issue 18), and the answers are true.

1. every registered method, under every choice of its options, answers the five capabilities consistently;
2. the answers match what the method does to a tiny model: the modules `prepare` adds, the base tensors
   it leaves alone, the files `save` writes, and whether `merged` gives a plain model;
3. moe answers like a LoRA adapter with `moe_train: lora` and like an in-place method otherwise, and a
   moe LoRA run merges and exports a plain transformers model;
4. the engine's advice and estimates come from the declarations, not from method names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import logits_of, tiny_gpt2, tiny_llama, tiny_mixtral

import nbtune
from nbtune.config import RunConfig
from nbtune.errors import MethodError, NbtuneError
from nbtune.methods import MethodContext, MethodSpec, all_methods, get_method, register_method
from nbtune.methods.registry import SAVE_FORMATS

ADDS_MODULES_FORMATS = {"peft", "bottleneck"}  # applied onto a base
IN_PLACE_FORMATS = {"transformers", "trained_tensors"}  # the model's own weights
MARKER = {"peft": "adapter_config.json", "transformers": "config.json", "bottleneck": "bottleneck_config.json",
          "trained_tensors": "trained_tensors.json"}  # a file every folder of the format has
MORE = [  # option sets that the choices alone do not reach
    ("prompt", {"init": "text", "init_text": "Convert the date"}),
    ("peft", {"peft_type": "lora", "peft_args": {"r": 4, "init_lora_weights": "pissa"}}),
    ("peft", {"peft_type": "prompt_tuning", "peft_args": {"num_virtual_tokens": 4}}),
    ("peft", {"peft_type": "loha", "peft_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}),
]


def _variants() -> list[tuple[str, dict[str, Any]]]:
    """(method, options) for each method's defaults and each choice of each option with choices, as a user
    would write them; combinations the method refuses (pissa on qlora's 4-bit base) are left out."""
    cases = []
    for spec in all_methods():
        cases.append((spec.name, {}))
        cases += [(spec.name, {p.name: choice}) for p in spec.params for choice in (p.choices or ())
                  if choice != p.default]
    cases += MORE
    return [(name, given) for name, given in cases if _accepted(name, given)]


def _accepted(name: str, given: dict[str, Any]) -> bool:
    try:
        RunConfig.parse({"method": name, **given})
    except NbtuneError:
        return False
    return True


CASES = _variants()


def _id(case: tuple[str, dict[str, Any]]) -> str:
    name, given = case
    return "-".join([name, *(f"{k}={v}" for k, v in given.items() if k != "peft_args")])


def _options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    return RunConfig.parse({"method": name, **given}).options  # validated, defaults filled in


# ---------------------------------------------------------------- 1. consistent answers
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_every_method_answers_the_five_capabilities_consistently(case):
    spec, options = get_method(case[0]), _options(*case)
    answers = (spec.keeps_base(options), spec.adds_modules(options), spec.can_merge(options),
               spec.can_resume(options))
    assert all(isinstance(a, bool) for a in answers)
    keeps, adds, merges, _ = answers
    fmt = spec.save_format(options)
    assert fmt in SAVE_FORMATS
    assert not keeps or adds  # a base that changed in place is not kept
    assert adds or not merges  # nothing added, nothing to merge
    assert (fmt in ADDS_MODULES_FORMATS) == adds and (fmt in IN_PLACE_FORMATS) == (not adds)
    assert not merges or fmt == "peft"  # only peft's modules fold into weights
    if merges:
        spec.check_mergeable(options)
    else:
        with pytest.raises(MethodError, match="merge"):
            spec.check_mergeable(options)


def test_moe_answers_like_lora_with_lora_and_like_an_in_place_method_otherwise():
    moe = get_method("moe")
    lora = _options("moe", {"moe_train": "lora"})
    assert moe.adds_modules(lora) and moe.can_merge(lora) and moe.keeps_base(lora)
    assert moe.save_format(lora) == "peft" and moe.can_resume(lora)
    for mode in ("experts", "router"):
        options = _options("moe", {"moe_train": mode})
        assert not moe.adds_modules(options) and not moe.can_merge(options) and not moe.keeps_base(options)
        assert moe.save_format(options) == "trained_tensors"
        with pytest.raises(MethodError, match="nothing to merge"):
            moe.check_mergeable(options)


@pytest.mark.parametrize("name", ["lora", "dora", "loraplus"])
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_a_base_rewriting_init_does_not_keep_the_base_but_still_merges(name, init):
    spec, options = get_method(name), _options(name, {"init": init})
    assert not spec.keeps_base(options) and spec.adds_modules(options) and spec.can_merge(options)
    assert spec.keeps_base(_options(name, {}))


def test_a_save_format_nbtune_does_not_know_is_refused_at_registration():
    spec = MethodSpec(name="zz_zip", summary="x", params=(), prepare=lambda model, ctx: model, saves_as="zip")
    with pytest.raises(MethodError, match="saves_as"):
        register_method(spec)


# ---------------------------------------------------------------- 2. the answers are what the method does
def _base_name(name: str) -> str:
    """A parameter's name in the plain base model (peft wraps names in base_model.model / base_layer)."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def _tiny_model(name: str, tokenizer: Any) -> Any:
    build = {"moe": tiny_mixtral, "bitfit": tiny_gpt2}.get(name, tiny_llama)  # experts; biases
    return build(tokenizer)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_the_answers_match_what_prepare_save_and_merge_do(case, chat_tokenizer, tmp_path):
    name, given = case
    spec, config = get_method(name), RunConfig.parse({"method": name, **given})
    options = config.options
    model = _tiny_model(name, chat_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = MethodContext(options=options, config=config, workdir=tmp_path, tokenizer=chat_tokenizer, total_steps=10)
    prepared = spec.prepare(model, ctx)

    params = {_base_name(n): p for n, p in prepared.named_parameters()}
    added = [n for n, p in params.items() if n not in before and p.requires_grad]
    base_trains = [n for n, p in params.items() if n in before and p.requires_grad]
    base_changed = [n for n, p in params.items() if n in before and not torch.equal(p, before[n])]
    assert spec.adds_modules(options) == bool(added)
    assert spec.keeps_base(options) == (not base_trains and not base_changed)

    folder = tmp_path / "saved"
    folder.mkdir()
    spec.save(prepared, folder, ctx) if spec.save else prepared.save_pretrained(str(folder))
    written = {MARKER[fmt] for fmt in SAVE_FORMATS} & {p.name for p in folder.iterdir()}
    assert written == {MARKER[spec.save_format(options)]}

    if spec.can_merge(options):
        merged = spec.merged(prepared, options)
        assert not hasattr(merged, "peft_config")
        assert {_base_name(n) for n, _ in merged.named_parameters()} <= set(before)
    else:
        with pytest.raises(MethodError, match="merge"):
            spec.merged(prepared, options)


# ---------------------------------------------------------------- 3. a moe LoRA run exports a plain model
def test_a_moe_run_with_moe_train_lora_merges_and_exports_a_plain_model(chat_tokenizer, demo_rows, tmp_path):
    from transformers import AutoModelForCausalLM

    run = nbtune.finetune(data=demo_rows, base=(tiny_mixtral(chat_tokenizer), chat_tokenizer), method="moe",
                          moe_train="lora", steps=2, batch_size=4, lr=3e-2, metric="none", save=False,
                          precision="fp32")
    exported = AutoModelForCausalLM.from_pretrained(str(run.merge_and_export(tmp_path / "out")))
    assert not hasattr(exported, "peft_config")
    assert not [n for n, _ in exported.named_parameters() if "lora" in n or "base_layer" in n]
    inputs = chat_tokenizer("Convert this date to ISO format: 9 Nov 1989", return_tensors="pt")
    run.model.eval()
    trained = logits_of(run.model, inputs)
    torch.testing.assert_close(logits_of(exported, inputs), trained, atol=1e-4, rtol=0)
    with run.base_disabled():
        base = logits_of(run.model, inputs)
    assert (trained - base).abs().max() > 1e-3  # the export carries what the run learned, not the base


# ---------------------------------------------------------------- 4. the engine asks the declarations
def test_out_of_memory_advice_comes_from_the_method_declarations():
    from nbtune.engine.compute.preflight import advice

    few = [m.name for m in all_methods() if m.few_parameters]
    assert few, "some method should declare few_parameters, or the advice loses its lighter methods"
    for name in ("lora", "dora", "ia3", "full", "bitfit"):
        text = advice(RunConfig.parse({"method": name}))
        spec = get_method(name)
        assert ("`quantization: 4bit`" in text) == ("4bit" in spec.quantization)
        lighter = [m for m in few if m != name]
        assert f"a lighter method ({', '.join(lighter)})" in text
    assert "quantization" not in advice(RunConfig.parse({"method": "lora", "quantization": "4bit"}))


@pytest.mark.parametrize("given", [{"method": "lora", "init": "pissa"}, {"method": "lora", "init": "olora"},
                                   {"method": "prompt", "init": "text", "init_text": "Convert the date"}],
                         ids=["lora-pissa", "lora-olora", "prompt-text"])
def test_an_estimate_of_an_init_that_needs_real_weights_counts_what_its_default_counts(tiny_model_dir, given):
    from nbtune.engine.compute.estimate import estimate

    model = {"model": str(tiny_model_dir), "steps": 4}
    counts = estimate(RunConfig.parse({**model, **given}))
    default = estimate(RunConfig.parse({**model, "method": given["method"]}))
    assert counts["trainable_params"] == default["trainable_params"] > 0


def test_the_engine_modules_that_advise_and_estimate_name_no_method():
    import nbtune.engine.compute.estimate as estimate_module
    import nbtune.engine.compute.preflight as preflight_module

    names = {m.name for m in all_methods()}
    for module in (estimate_module, preflight_module):
        text = Path(module.__file__).read_text()
        quoted = {n for n in names if f'"{n}"' in text or f"'{n}'" in text or f"method: {n}" in text}
        assert not quoted, f"{module.__name__} names methods {sorted(quoted)}; ask the registry instead"


@pytest.mark.parametrize(("method", "expected"), [("lora", "peft"), ("full", "transformers")])
def test_run_json_says_what_the_folder_holds(chat_tokenizer, demo_rows, tmp_path, method, expected):
    import json

    run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), method=method, steps=1,
                          batch_size=4, metric="none", save=False)
    saved = json.loads((run.save(tmp_path / "run") / "run.json").read_text())
    assert saved["save_format"] == expected == run.method.save_format(run.config.options)
