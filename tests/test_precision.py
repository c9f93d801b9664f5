"""Compute precision defaults, FastDropout, and the CPU speed-ups applied while training."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import logits_of, tiny_llama

import nbtune
from nbtune.config import RunConfig
from nbtune.engine.compute.precision import FP32_ATTENTION, FastDropout, training_speedups


@pytest.fixture
def bf16_hardware(monkeypatch):
    """This process's device policy, as a CPU with (True) or without (False) native bf16."""
    from nbtune.engine.compute import device

    def set_fast(fast: bool) -> None:
        policy = device.policy_for(device.Device("cpu", bf16=fast))
        monkeypatch.setattr(device, "current", lambda: policy)

    return set_fast


@pytest.mark.parametrize(
    ("fast", "settings", "expected"),
    [
        (True, {"method": "lora"}, ("bf16", "bfloat16")),
        (True, {"method": "ia3"}, ("bf16", "bfloat16")),
        (True, {"method": "full"}, ("bf16", "float32")),  # trained weights stay fp32 masters
        (True, {"method": "lora", "init": "pissa"}, ("bf16", "float32")),  # PiSSA rewrites the base
        (True, {"method": "qlora"}, ("fp32", "float32")),  # quantized bases compute in fp32
        (False, {"method": "lora"}, ("fp32", "float32")),  # no native bf16: fp32 everywhere
        (True, {"method": "lora", "precision": "fp32"}, ("fp32", "float32")),
        (True, {"method": "lora", "dtype": "float32"}, ("bf16", "float32")),
        (False, {"method": "lora", "precision": "bf16"}, ("bf16", "bfloat16")),
    ],
)
def test_precision_and_base_dtype_follow_the_hardware_and_the_method(bf16_hardware, fast, settings, expected):
    bf16_hardware(fast)
    config = RunConfig.parse(settings)
    assert (config.precision, config.dtype) == expected
    explicit = {k for k in ("precision", "dtype") if k in settings}
    assert {k for k in ("precision", "dtype") if k in config.derived} == {"precision", "dtype"} - explicit


def test_derived_precision_is_re_derived_on_another_machine(bf16_hardware):
    bf16_hardware(True)
    saved = RunConfig.parse({"method": "lora"}).to_json_dict()  # what run.json keeps
    bf16_hardware(False)
    again = RunConfig.parse(saved)
    assert (again.precision, again.dtype) == ("fp32", "float32")


def test_an_unknown_precision_names_the_field_and_the_choices():
    with pytest.raises(nbtune.ConfigError, match=r"precision.*bf16.*fp16.*fp32"):
        RunConfig.parse({"precision": "fp8"})


# ---------------------------------------------------------------- FastDropout
def test_fast_dropout_keeps_the_right_share_and_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    out = FastDropout(0.05).train()(x)
    kept = (out != 0).float().mean().item()
    # binomial standard deviation over 1e6 elements is 2.2e-4: 5 of them
    assert abs(kept - 0.95) < 1.1e-3
    assert abs(out.mean().item() - 1.0) < 2e-3
    values = out.unique().tolist()
    assert values[0] == 0.0 and values[1:] == [pytest.approx(65536 / (65536 - round(0.05 * 65536)))]


def test_fast_dropout_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    out = FastDropout(0.3).train()(x)
    out.sum().backward()
    expected = torch.where(out != 0, out / x.detach(), torch.zeros(()))
    torch.testing.assert_close(x.grad, expected)


def test_fast_dropout_is_seeded_and_off_in_eval():
    layer = FastDropout(0.1).train()
    x = torch.randn(8, 16)
    torch.manual_seed(5)
    first = layer(x)
    torch.manual_seed(5)
    assert torch.equal(first, layer(x))
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(FastDropout(0.0).train()(x), x)


def test_fast_dropout_masks_are_independent_across_lanes():
    # one int64 gives four 16-bit uniforms: neighbouring elements must not be correlated
    torch.manual_seed(2)
    kept = (FastDropout(0.5).train()(torch.ones(400_000)) != 0).float()
    neighbours = (kept[:-1] * kept[1:]).mean().item()
    assert abs(neighbours - 0.25) < 5e-3


# ---------------------------------------------------------------- speed-ups while training
def lora_on_tiny_llama(chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(chat_tokenizer)
    config = LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@pytest.fixture
def cpu_with_bf16(bf16_hardware):
    """These speed-ups are the CPU's (engine/compute/device.py): test them under its policy on any machine."""
    bf16_hardware(True)


def test_speedups_swap_in_and_restore_dropout_and_attention(chat_tokenizer, cpu_with_bf16):
    model = lora_on_tiny_llama(chat_tokenizer)
    dropouts = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert dropouts and model.config._attn_implementation == "sdpa"
    with training_speedups(model):
        assert not [m for m in model.modules() if type(m) is torch.nn.Dropout]
        assert sum(isinstance(m, FastDropout) for m in model.modules()) == len(dropouts)
        assert model.config._attn_implementation == FP32_ATTENTION
    assert [m for m in model.modules() if type(m) is torch.nn.Dropout] == dropouts
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_fp32_attention_gives_the_fp32_gradients_under_bf16_autocast(chat_tokenizer, cpu_with_bf16):
    model = lora_on_tiny_llama(chat_tokenizer)
    model.train()
    ids = chat_tokenizer(["a short line of text", "another one"], return_tensors="pt", padding=True)

    def grads(speedups: bool, autocast: bool) -> torch.Tensor:
        model.zero_grad()
        with training_speedups(model, dropout=False, attention=speedups), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    for module in model.modules():  # compare deterministic passes: dropout off
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    exact = grads(False, False)
    fixed, plain = grads(True, True), grads(False, True)
    assert (fixed - exact).norm() <= (plain - exact).norm() * 1.5  # no worse than bf16 attention
    assert (fixed - exact).norm() < 0.1 * exact.norm()


def test_a_bf16_run_leaves_a_plain_fp32_model_behind(chat_tokenizer, demo_rows):
    model = tiny_llama(chat_tokenizer)
    untouched = copy.deepcopy(model)
    run = nbtune.finetune(data=demo_rows[:8], method="lora", base=(model, chat_tokenizer), steps=2,
                          batch_size=4, metric="none", save=False, precision="bf16")
    assert run.config.precision == "bf16" and {p.dtype for p in run.model.parameters()} == {torch.float32}
    assert "_original_forward" not in run.model.__dict__  # the Trainer's autocast wrapper is gone
    assert not any(isinstance(m, FastDropout) for m in run.model.modules())
    ids = chat_tokenizer("hello there", return_tensors="pt")
    run.model.eval()
    untouched.eval()
    with run.base_disabled():
        assert torch.equal(logits_of(run.model, ids), logits_of(untouched, ids))


def test_the_fp32_attention_keeps_causal_and_padding_masks(chat_tokenizer, cpu_with_bf16):
    # transformers builds no mask at all for an attention name without a mask function: compare exactly
    model = tiny_llama(chat_tokenizer).train()
    ids = chat_tokenizer(["a short line of text", "another one"], return_tensors="pt", padding=True)
    plain = model(**ids, labels=ids["input_ids"]).loss
    with training_speedups(model):
        assert model(**ids, labels=ids["input_ids"]).loss == plain


def test_a_small_adapter_contribution_survives_bf16_autocast(chat_tokenizer, cpu_with_bf16):
    # LoRA's B starts at zero and grows slowly: its first effects are below bf16's resolution of the base
    # layer's output, so a bf16 sum rounds them away; with fp32_sums the layer adds them in fp32.
    model = lora_on_tiny_llama(chat_tokenizer).eval()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=1e-4)
    x = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(0))

    def adapter_effect(fp32_sums: bool) -> torch.Tensor:
        with torch.no_grad(), training_speedups(model, dropout=False, attention=False, fp32_sums=fp32_sums), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            with_adapter = layer(x).float()
            with model.disable_adapter():
                return with_adapter - layer(x).float()

    with torch.no_grad():
        exact = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    kept, rounded = adapter_effect(True), adapter_effect(False)
    assert (kept - exact).norm() < 0.05 * exact.norm()  # only the bf16 matmuls' own rounding
    assert (rounded - exact).norm() > 0.5 * exact.norm()  # most of it lost in the bf16 sum


def test_inference_on_a_bf16_model_sums_in_fp32_and_leaves_fp32_models_alone(chat_tokenizer):
    from nbtune.engine.compute.precision import inference_precision

    exact = tiny_llama(chat_tokenizer).eval()
    halved = copy.deepcopy(exact).to(torch.bfloat16)
    ids = chat_tokenizer(["a short line of text"], return_tensors="pt")
    with torch.no_grad():
        reference = exact(**ids).logits
        with inference_precision(exact):
            assert torch.equal(exact(**ids).logits, reference)  # fp32: untouched
        plain = halved(**ids, output_hidden_states=True)
        with inference_precision(halved):
            careful = halved(**ids, output_hidden_states=True)
    assert plain.hidden_states[-1].dtype == torch.bfloat16 and careful.hidden_states[-1].dtype == torch.float32
    assert (careful.logits.float() - reference).norm() < (plain.logits.float() - reference).norm()


@pytest.mark.parametrize("method", ["lora", "ia3", "houlsby"])
def test_a_layernorm_model_trains_on_a_bf16_base(tmp_path, chat_tokenizer, demo_rows, method):
    """GPT-2's nn.LayerNorm refused an fp32 residual with bf16 weights on CPU ("mixed dtype")."""
    from conftest import tiny_gpt2

    folder = tmp_path / "gpt2"
    tiny_gpt2(chat_tokenizer).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    settings = {"method": method, "data": demo_rows, "steps": 2, "batch_size": 2, "metric": "none", "save": False,
                "precision": "bf16", "dtype": "bfloat16"}
    run = nbtune.finetune(model=str(folder), **settings)
    assert run.status == "finished" and isinstance(run.generate("hi", max_new_tokens=2), str)
    in_memory = tiny_gpt2(chat_tokenizer).to(torch.bfloat16)
    assert nbtune.finetune(base=(in_memory, chat_tokenizer), **settings).status == "finished"
