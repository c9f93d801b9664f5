"""Out of memory: a pre-flight refusal with numbers and advice, and a clean end when the allocator fails
mid-run (issue 8, item 5)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import nbtune
import nbtune.engine.compute.preflight as preflight
from nbtune.config import RunConfig

SETTINGS = {"steps": 3, "batch_size": 8, "metric": "none", "save": False, "precision": "fp32"}


def test_a_run_that_cannot_fit_is_refused_with_numbers_and_what_to_change(chat_tokenizer, demo_rows, monkeypatch):
    monkeypatch.setattr(preflight, "device_available_mb", lambda: 1.0)  # RAM on a CPU, GPU memory on a GPU
    base = (tiny_llama(chat_tokenizer), chat_tokenizer)
    with pytest.raises(preflight.OutOfMemory) as caught:
        nbtune.finetune(data=demo_rows, base=base, **SETTINGS)
    message = str(caught.value)
    assert "needs about" in message and "only 1 MB are available" in message
    assert "`batch_size: 4` with `grad_accum: 2`" in message and "gradient_checkpointing" in message
    assert "memory_check: false" in message and caught.value.field == "batch_size"
    run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), memory_check=False,
                          **SETTINGS)
    assert run.status == "finished" and run.metrics["memory_need_mb"] > 1


def test_the_estimate_follows_batch_precision_and_checkpointing(chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(chat_tokenizer), LoraConfig(r=4, task_type="CAUSAL_LM"))

    def need(**settings):
        return preflight.training_need_mb(model, RunConfig.parse({"precision": "fp32", **settings}), longest=64)

    base = need()
    assert need(batch_size=16)["activations_mb"] == pytest.approx(2 * base["activations_mb"])
    assert need(precision="bf16")["activations_mb"] == pytest.approx(base["activations_mb"] / 2)
    assert need(gradient_checkpointing=True)["activations_mb"] < base["activations_mb"]  # one layer at a time
    assert base["optimizer_mb"] == pytest.approx(sum(p.numel() for p in model.parameters() if p.requires_grad)
                                                 * 8 / 2**20)


def test_a_container_limit_counts_over_the_machines_free_memory(tmp_path):
    (tmp_path / "memory.max").write_text("2147483648\n")
    (tmp_path / "memory.current").write_text("1073741824\n")
    assert preflight._cgroup_limit_and_usage(tmp_path) == (2**31, 2**30)
    (tmp_path / "memory.max").write_text("max\n")
    assert preflight._cgroup_limit_and_usage(tmp_path) == (None, None)


class AllocatorFailsAt:
    def __init__(self, model, step):
        self.step, self.calls = step, 0
        model.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if module.training:
            self.calls += 1
            if self.calls == self.step:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 1099511627776 bytes. Error code 12")
        return output


def test_an_allocator_failure_mid_run_ends_it_cleanly_with_the_same_advice(chat_tokenizer, demo_rows):
    model = tiny_llama(chat_tokenizer)
    AllocatorFailsAt(model, 2)
    with pytest.raises(preflight.OutOfMemory, match=r"ran out of memory at step 2\. Try `batch_size: 4`") as caught:
        nbtune.finetune(data=demo_rows, base=(model, chat_tokenizer), **SETTINGS)
    assert caught.value.__context__ is None  # the failed step's frames (and tensors) are not kept alive
    again = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), **SETTINGS)
    assert again.status == "finished" and all(torch.isfinite(p).all() for p in again.model.parameters())


def test_processes_sharing_one_machine_each_get_their_share(chat_tokenizer, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(chat_tokenizer), LoraConfig(r=4, task_type="CAUSAL_LM"))
    # checkpointing set: nbtune would otherwise turn it on to fit (tests/test_device_policy.py)
    config = RunConfig.parse({"precision": "fp32", "gradient_checkpointing": False})
    need = preflight.training_need_mb(model, config, longest=64)["total_mb"]
    monkeypatch.setattr(preflight, "device_available_mb", lambda: need * 1.5)
    assert preflight.check_fits(model, config, longest=64)["total_mb"] == pytest.approx(need)  # one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU processes share RAM (GPUs do not)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two on this machine: 0.75 x the need each
    with pytest.raises(preflight.OutOfMemory, match="each of the 2 processes sharing this machine"):
        preflight.check_fits(model, config, longest=64)


def test_the_estimate_per_gpu_follows_checkpointing_and_the_strategy(tiny_model_dir):
    from nbtune.engine.compute.estimate import estimate, per_process_mb

    settings = {"model": str(tiny_model_dir), "method": "full", "max_length": 4096, "precision": "fp32"}
    plain = estimate(RunConfig.parse(settings))
    checkpointed = estimate(RunConfig.parse({**settings, "gradient_checkpointing": True}))
    assert checkpointed["activations_mb"] < plain["activations_mb"] / 1.8  # 2 layers: one at a time, not both

    ddp, zero2, fsdp = (per_process_mb(plain, 8, s) for s in ("ddp", "zero2", "fsdp"))
    assert ddp == per_process_mb(plain, 1, "ddp")  # DDP copies everything: no saving per GPU
    assert ddp["total_mb"] == pytest.approx(sum(plain[k] for k in ("weights_mb", "trainable_and_grads_mb",
                                                                  "optimizer_mb", "activations_mb")), abs=2)
    assert zero2["optimizer_mb"] == pytest.approx(plain["optimizer_mb"] / 8, abs=1)
    assert fsdp["trainable_and_grads_mb"] == pytest.approx(plain["trainable_and_grads_mb"] / 8, abs=1)
    assert fsdp["total_mb"] <= zero2["total_mb"] <= ddp["total_mb"]
    assert fsdp["activations_mb"] == ddp["activations_mb"]  # each GPU still computes its own batch
    with pytest.raises(ValueError, match="strategy"):
        per_process_mb(plain, 8, "pipeline")


@pytest.mark.parametrize("method", [m.name for m in nbtune.methods()])
def test_every_method_has_an_estimate_or_a_reason(tiny_model_dir, method):
    from nbtune.engine.compute.estimate import estimate

    try:
        counts = estimate(nbtune.RunConfig.parse({"model": str(tiny_model_dir), "method": method, "steps": 4}))
    except nbtune.NbtuneError as exc:  # e.g. bitfit on a model without biases: a reason the picker shows
        assert exc.field or str(exc)
        return
    assert 0 < counts["trainable_params"] <= counts["total_params"]
