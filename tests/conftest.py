"""Shared fixtures: tiny random models and a tiny tokenizer, built in memory in milliseconds.

The tokenizer is a byte-level BPE trained on the demo task's text with ChatML markers, so the tiny
models see the same prompt shapes as SmolLM2 without any file from a hub.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never wait on a network probe
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# datasets caches what it reads from files; keep the tests' throwaway files out of the user's cache.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="nbtune-tests-datasets-"))

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_tokenizer(chat: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from nbtune.data.demo import demo_splits

    train, test = demo_splits()
    corpus = [r["prompt"] + " " + r["completion"] for r in train + test]
    corpus += ["user assistant system Hello world. What is the answer? Instruction: Response:"] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>" if chat else "<|endoftext|>",
                                   bos_token="<|im_start|>" if chat else "<|endoftext|>")
    if chat:
        fast.chat_template = CHATML
        fast.pad_token = "<|im_end|>"
    return fast


@pytest.fixture(scope="session")
def _chat_tokenizer():
    return _train_tokenizer(chat=True)


@pytest.fixture(scope="session")
def _plain_tokenizer():
    return _train_tokenizer(chat=False)


@pytest.fixture
def chat_tokenizer(_chat_tokenizer):
    """A ChatML tokenizer (a fresh copy: runs may set its chat template or pad token)."""
    import copy

    return copy.deepcopy(_chat_tokenizer)


@pytest.fixture
def plain_tokenizer(_plain_tokenizer):
    """A tokenizer with no chat template and no pad token, like GPT-2's."""
    import copy

    return copy.deepcopy(_plain_tokenizer)


def tiny_llama(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2,  # sharper logits: learns in 10 steps
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


def tiny_gpt2(tokenizer, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                        initializer_range=0.2,  # 0.02 makes logits too flat for a tiny model to learn fast
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return GPT2LMHeadModel(config)


def tiny_mixtral(tokenizer):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.2,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return MixtralForCausalLM(config)


@pytest.fixture
def llama_base(chat_tokenizer):
    """(tiny random Llama, ChatML tokenizer), ready for `nbtune.finetune(..., base=...)`."""
    return tiny_llama(chat_tokenizer), chat_tokenizer


@pytest.fixture
def gpt2_base(plain_tokenizer):
    """(tiny random GPT-2, tokenizer without chat template)."""
    return tiny_gpt2(plain_tokenizer), plain_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _chat_tokenizer) -> Path:
    """A tiny Llama saved as a normal model folder, for `model: <path>` and quantized loading."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(_chat_tokenizer).save_pretrained(path)
    _chat_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def demo_rows():
    """32 demo-task rows as a list of dicts (prompt/completion)."""
    from nbtune.data.demo import demo_splits

    return demo_splits()[0][:32]


@pytest.fixture(autouse=True)
def _no_stray_underscore():
    # Python's default display hook (a doctest, code run in "single" mode) leaves `builtins._` behind, and
    # IPython then never sets `_` in a shell's namespace: a later `r = _` test would fail for another's sake.
    import builtins

    had = hasattr(builtins, "_")
    yield
    if not had and hasattr(builtins, "_"):
        del builtins._


@pytest.fixture(autouse=True)
def _fresh_workbench(monkeypatch):
    # Every run joins the process's runs (nbtune.runs): each test starts with none, and its runs and
    # cached bases go when it ends; unless a fixture of a wider scope set up a workbench for its tests.
    import nbtune.engine.workbench as wb

    if wb.WORKBENCH is _PROCESS_WORKBENCH:
        monkeypatch.setattr(wb, "WORKBENCH", wb.Workbench())


def _process_workbench():
    import nbtune.engine.workbench as wb

    return wb.WORKBENCH


_PROCESS_WORKBENCH = _process_workbench()


@pytest.fixture(autouse=True)
def _in_tmp_cwd(tmp_path, monkeypatch):
    # Runs save to runs/<name> by default: keep every test's files inside its own tmp dir. An
    # NBTUNE_WORKSPACE in the environment would confine output_dir; tests that want that set it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NBTUNE_WORKSPACE", raising=False)


def training_device() -> Any:
    """Where runs train in this process, as the device policy says (cuda on a GPU machine, else cpu): tests
    that compare a run's model with a model of their own compute both there."""
    import torch

    from nbtune.engine.compute import device

    return torch.device(device.current().device.type)


def logits_of(model: Any, inputs: dict[str, Any]) -> Any:
    """`model`'s logits for `inputs`, computed on the training device (the model is moved there if it is
    not, as the Trainer moves a run's model), returned as fp32 on the CPU for comparing."""
    import torch

    where = training_device()
    model.to(where)
    with torch.no_grad():
        return model(**{k: v.to(where) for k, v in inputs.items()}).logits.float().cpu()


def memory_in_use_mb() -> float:
    """What the device policy counts (engine/compute/device.py): CUDA memory allocated on a GPU, else this
    process's RSS, after a garbage collection."""
    import gc

    import torch

    from nbtune.engine.compute import device
    from nbtune.engine.compute.memory import rss_mb

    gc.collect()
    if device.current().memory == "cuda":
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


class InterruptAt:
    """An observer that interrupts training at `step`, as Ctrl-C or the kernel's ■ would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step(self, run: Any, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            raise KeyboardInterrupt


def finetune_interrupted(*args: Any, **kwargs: Any) -> Any:
    """`nbtune.finetune(...)` for a run an interrupt stops: it raises RunInterrupted (a KeyboardInterrupt,
    which pytest would take for the user's Ctrl-C); the stopped run that keeps what it learned comes with it."""
    import nbtune
    from nbtune.errors import RunInterrupted

    with pytest.raises(RunInterrupted) as info:
        nbtune.finetune(*args, **kwargs)
    assert nbtune.runs[info.value.run.name] is info.value.run
    return info.value.run


@contextlib.contextmanager
def nbtune_shell(model: Path | str, **user_ns: Any) -> Iterator[Any]:
    """A real InteractiveShell with nbtune loaded, a fresh workbench, `model` as the cells' default model
    and `user_ns` in the namespace; unloaded and reset afterwards."""
    from IPython.core.interactiveshell import InteractiveShell

    from nbtune.engine.workbench import Workbench

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nbtune.engine.workbench.WORKBENCH", Workbench())
        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "nbtune")
        shell.user_ns.update(user_ns)
        shell.run_line_magic("config", f"Finetune.defaults = {{'model': {str(model)!r}}}")
        try:
            yield shell
        finally:
            shell.run_line_magic("unload_ext", "nbtune")
            shell.run_line_magic("config", "Finetune.defaults = {}")


@pytest.fixture
def loads(monkeypatch):
    """How often a base's weights were loaded (the workbench's load_base, counted)."""
    import nbtune.engine.workbench as wb

    calls = []
    real = wb.load_base

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(wb, "load_base", counted)
    return calls


@pytest.fixture
def no_loading(monkeypatch):
    """Any load of a base's weights fails the test: for mistakes that must be reported before one."""
    import nbtune.engine.workbench as wb

    def refuse(*args, **kwargs):
        raise AssertionError("a base was loaded before the mistake was reported")

    monkeypatch.setattr(wb, "load_base", refuse)
