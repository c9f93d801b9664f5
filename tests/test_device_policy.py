"""The device policy (engine/compute/device.py), driven on this CPU machine for every kind of device people train
on: what each choice is, and that the config, the Trainer's arguments, the model loading and the
speed-ups read it rather than deciding again."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import nbtune
from nbtune.config import RunConfig
from nbtune.engine.compute import device
from nbtune.engine.compute.device import Device, policy_for

CPU = Device("cpu", bf16=False)
CPU_BF16 = Device("cpu", bf16=True)  # AVX512-BF16 / AMX
H100 = Device("cuda", name="H100", bf16=True, fp16=True, capability=(9, 0), memory_mb=81_559)
A100_FLASH = Device("cuda", name="A100", bf16=True, fp16=True, capability=(8, 0), flash_attention=True, liger=True)
T4 = Device("cuda", name="Tesla T4", fp16=True, capability=(7, 5), memory_mb=15_095)
K80 = Device("cuda", name="Tesla K80", capability=(3, 7))
MPS = Device("mps", name="Apple mps")

# device -> (precision, quantized precision, frozen dtype, 4-bit compute dtype, attention, fp32 sums,
#            fast dropout, fp32 attention backward, pad multiple, memory, checkpointing when quantized)
TABLE = {
    CPU: ("fp32", "fp32", "float32", "float32", "sdpa", False, True, False, None, "rss", False),
    CPU_BF16: ("bf16", "fp32", "bfloat16", "float32", "sdpa", True, True, True, None, "rss", False),
    H100: ("bf16", "bf16", "bfloat16", "bfloat16", "sdpa", False, False, False, 8, "cuda", True),
    A100_FLASH: ("bf16", "bf16", "bfloat16", "bfloat16", "flash_attention_2", False, False, False, 8, "cuda", True),
    T4: ("fp16", "fp16", "float16", "float16", "sdpa", False, False, False, 8, "cuda", True),
    K80: ("fp32", "fp32", "float32", "float32", "sdpa", False, False, False, 8, "cuda", True),
    MPS: ("fp32", "fp32", "float32", "float32", "sdpa", False, False, False, None, "rss", False),
}


@pytest.mark.parametrize("hardware", list(TABLE), ids=[d.name or d.type + ("-bf16" if d.bf16 else "")
                                                       for d in TABLE])
def test_the_policy_of_each_device(hardware):
    p = policy_for(hardware)
    assert (p.precision, p.quantized_precision, p.frozen_dtype, p.quantized_compute_dtype, p.attention,
            p.fp32_sums, p.fast_dropout, p.fp32_attention_backward, p.pad_to_multiple_of, p.memory,
            p.gradient_checkpointing_when_quantized) == TABLE[hardware]
    assert not p.liger_kernels  # measured slower on an H200 (see policy_for); benchmarks switch it on


@pytest.fixture
def on(monkeypatch):
    """Make this process believe it runs on `hardware` (the policy only: no tensor moves)."""
    def use(hardware: Device) -> device.DevicePolicy:
        policy = policy_for(hardware)
        monkeypatch.setattr(device, "current", lambda: policy)
        return policy

    return use


@pytest.mark.parametrize(("hardware", "settings", "expected"), [
    (H100, {"method": "lora"}, ("bf16", "bfloat16", False)),
    (H100, {"method": "qlora"}, ("bf16", "bfloat16", True)),  # 4-bit compute in bf16, activations recomputed
    (H100, {"method": "qlora", "gradient_checkpointing": False}, ("bf16", "bfloat16", False)),
    (H100, {"method": "full"}, ("bf16", "float32", False)),  # trained weights stay fp32 masters
    (T4, {"method": "lora"}, ("fp16", "float16", False)),
    (T4, {"method": "qlora"}, ("fp16", "float16", True)),
    (CPU_BF16, {"method": "qlora"}, ("fp32", "float32", False)),  # bitsandbytes' CPU kernels: fp32
    (CPU, {"method": "lora"}, ("fp32", "float32", False)),
    (MPS, {"method": "lora"}, ("fp32", "float32", False)),
])
def test_a_config_derives_its_precision_dtype_and_checkpointing_from_the_policy(on, hardware, settings, expected):
    on(hardware)
    config = RunConfig.parse(settings)
    assert (config.precision, config.dtype, config.gradient_checkpointing) == expected
    assert "gradient_checkpointing" in config.derived or "gradient_checkpointing" in settings


@pytest.mark.parametrize(("hardware", "precision", "match"), [
    (T4, "bf16", "has no bf16; use `precision: fp16`"),
    (CPU_BF16, "fp16", "fp16 mixed precision needs a CUDA GPU"),
    (MPS, "fp16", "needs a CUDA GPU"),
])
def test_a_precision_the_device_cannot_compute_in_is_refused_by_name(on, hardware, precision, match):
    on(hardware)
    with pytest.raises(nbtune.ConfigError, match=match) as info:
        RunConfig.parse({"precision": precision})
    assert info.value.field == "precision"


@pytest.mark.parametrize(("hardware", "flags"), [
    (H100, {"bf16": True, "fp16": False}),
    (T4, {"bf16": False, "fp16": True}),  # the Trainer's fp16 brings its loss scaling
    (CPU, {"bf16": False, "fp16": False}),
])
def test_the_trainers_mixed_precision_flags_come_from_the_policy(on, hardware, flags):
    policy = on(hardware)
    config = RunConfig.parse({"method": "lora"})
    assert policy.trainer_precision(config.precision) == flags


def test_the_trainer_a_run_builds_reads_the_policy(on, llama_base, demo_rows, monkeypatch):
    """On this CPU, with the CPU's policy changed to pad to 16: the collator pads to 16, and the
    TrainingArguments say CPU and the run's precision."""
    import dataclasses

    import nbtune.engine.training.trainer as trainer_module

    policy = dataclasses.replace(policy_for(CPU), pad_to_multiple_of=16)
    monkeypatch.setattr(device, "current", lambda: policy)
    seen = {}
    make = trainer_module.make_trainer

    def spy(*args, **kwargs):
        trainer = make(*args, **kwargs)
        seen["args"], seen["collator"] = trainer.args, trainer.data_collator
        return trainer

    monkeypatch.setattr("nbtune.engine.training.trainer.make_trainer", spy)  # the objective builds it from there
    run = nbtune.finetune(data=demo_rows, base=llama_base, steps=1, batch_size=4, metric="none", save=False)
    assert run.status == "finished"
    assert seen["args"].use_cpu and not seen["args"].bf16 and not seen["args"].fp16
    batch = seen["collator"]([{k: v for k, v in row.items()} for row in
                              [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3],
                                "length": 3}]])
    assert batch["input_ids"].shape[1] == 16


def test_cpu_speed_ups_follow_the_policy_and_a_gpu_policy_applies_none(on, chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    from nbtune.engine.compute.precision import FP32_ATTENTION, FastDropout, training_speedups

    model = get_peft_model(tiny_llama(chat_tokenizer).to(torch.bfloat16),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    on(CPU_BF16)
    with training_speedups(model):
        assert any(isinstance(m, FastDropout) for m in model.modules())
        assert model.config._attn_implementation == FP32_ATTENTION
        assert any(m._forward_hooks for m in model.modules())
    on(H100)  # the same model (still on this CPU) under a GPU's policy: none of the CPU fixes
    with training_speedups(model):
        assert not any(isinstance(m, FastDropout) for m in model.modules())
        assert model.config._attn_implementation == "sdpa"
        assert not any(m._forward_hooks for m in model.modules())


def test_models_load_onto_the_policys_device_with_its_attention(on, tiny_model_dir, monkeypatch):
    """What load_base asks transformers for, per policy (the load itself is intercepted: no GPU here)."""
    import nbtune.engine.bases.loading as models

    calls = []

    class Loaded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"_name_or_path": ""})()
            self.moved = None

        def to(self, where):
            self.moved = where
            return self

    def from_pretrained(path, **kwargs):
        calls.append(kwargs)
        return Loaded()

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", from_pretrained)
    on(A100_FLASH)
    gpu = models.load_base(str(tiny_model_dir), dtype="bfloat16")
    assert calls[-1]["attn_implementation"] == "flash_attention_2" and gpu.model.moved == "cuda"
    on(CPU)
    cpu = models.load_base(str(tiny_model_dir))
    assert "attn_implementation" not in calls[-1] and cpu.model.moved is None


def test_memory_readings_count_the_gpu_on_a_gpu(on, monkeypatch):
    from nbtune.engine.compute import preflight

    on(H100)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * 2**30, 80 * 2**30))
    assert preflight.device_available_mb() == 40 * 1024
    on(CPU)
    assert preflight.device_available_mb() == pytest.approx(preflight.available_mb(), rel=0.2)


def test_a_run_that_fits_only_with_checkpointing_gets_it(on, llama_base, demo_rows, monkeypatch):
    from nbtune.engine.compute import preflight

    on(CPU)
    # The estimate as preflight makes it, made small enough to fit only with checkpointing: 100 MB
    # without, 10 MB with, 50 MB available.
    def need(model, config, longest, gradient_checkpointing=None):
        on = config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        mb = 10.0 if on else 100.0
        return {"trainable_and_grads_mb": 0.0, "optimizer_mb": 0.0, "activations_mb": mb, "total_mb": mb}

    monkeypatch.setattr(preflight, "training_need_mb", need)
    monkeypatch.setattr(preflight, "device_available_mb", lambda: 50.0)
    with pytest.warns(nbtune.errors.NbtuneWarning, match="only with gradient checkpointing"):
        run = nbtune.finetune(data=demo_rows, base=llama_base, steps=1, batch_size=4, metric="none", save=False)
    assert run.config.gradient_checkpointing and run.status == "finished"
    assert run.config.derived["gradient_checkpointing"] is True  # nbtune's choice, not the user's
    with pytest.raises(preflight.OutOfMemory):  # set by the user: not changed behind their back
        nbtune.finetune(data=demo_rows, base=(tiny_llama(llama_base[1]), llama_base[1]), steps=1, batch_size=4,
                        metric="none", save=False, gradient_checkpointing=False)


def test_detect_describes_this_machine():
    found = device.detect()
    assert found.type == ("cuda" if torch.cuda.is_available() else found.type)
    assert device.current() == policy_for(found) or device.current().device == found
