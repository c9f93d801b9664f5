"""The files that take a notebook's run to many GPUs or machines: an accelerate config and the command.

    nbtune export experiment.yaml --processes 8 --machines 2 --main-ip 10.0.0.1 -o launch/

writes `launch/experiment.yaml` (the run's config), `launch/accelerate_config.yaml` and `launch/launch.sh`
(`accelerate launch --config_file ... -m nbtune run ...`). The config file is accelerate's own format
(what `accelerate config` writes), so everything accelerate documents about it applies. `--cpu` writes a
`torchrun` command instead (CPU processes over gloo).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from nbtune.config import RunConfig
from nbtune.errors import ConfigError

STRATEGIES = ("ddp", "fsdp", "deepspeed")


def accelerate_config(*, processes: int, machines: int = 1, machine_rank: int = 0, main_ip: str | None = None,
                      main_port: int = 29500, precision: str = "bf16", strategy: str = "ddp",
                      cpu: bool = False) -> dict[str, Any]:
    """An accelerate launch config: `processes` in all (over `machines`), DDP, FSDP or DeepSpeed ZeRO.

    FSDP shards weights, gradients and optimizer state over the GPUs (a base that fits in none of them
    alone); `use_orig_params` lets frozen and trainable weights (LoRA) share a shard. DeepSpeed ZeRO-2
    shards gradients and optimizer state. `cpu=True` gives a gloo config that runs on CPU cores.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.", field="strategy")
    if processes < machines or processes % machines:
        raise ConfigError(f"{processes} processes cannot be split evenly over {machines} machines; give a "
                          "multiple of the machine count (processes counts all machines).", field="processes")
    if machines > 1 and not main_ip:
        raise ConfigError("several machines need the address of machine 0: give --main-ip.", field="main_ip")
    if cpu and strategy != "ddp":
        raise ConfigError(f"{strategy} needs GPUs; on CPU use ddp.", field="strategy")
    distributed = {"ddp": "MULTI_CPU" if cpu else "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}[strategy]
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed if processes > 1 or strategy != "ddp" else "NO",
        "mixed_precision": precision if precision in ("bf16", "fp16") else "no",
        "use_cpu": cpu,
        "debug": False,
        "num_processes": processes,
        "num_machines": machines,
        "machine_rank": machine_rank,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
    }
    if not cpu:
        config["gpu_ids"] = "all"
    if machines > 1:
        config.update(main_process_ip=main_ip, main_process_port=main_port)
    if strategy == "fsdp":
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # rank 0 saves a whole adapter, as DDP does
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_activation_checkpointing": False,
        }
    elif strategy == "deepspeed":
        config["deepspeed_config"] = {"zero_stage": 2, "offload_optimizer_device": "none",
                                      "offload_param_device": "none", "zero3_init_flag": False}
    return config


def launch_command(config_file: str, accelerate_file: str) -> str:
    """The command every machine runs (with its own `--machine_rank` when there are several)."""
    return (f"accelerate launch --config_file {shlex.quote(accelerate_file)} -m nbtune run "
            f"{shlex.quote(config_file)}")


def torchrun_command(config_file: str, *, processes: int, machines: int = 1, main_ip: str | None = None,
                     main_port: int = 29500) -> str:
    """CPU processes: `accelerate launch` starts those only through mpirun, torchrun needs nothing more."""
    nodes = (f" --nnodes {machines} --node-rank ${{MACHINE_RANK:-0}} --master-addr {main_ip} "
             f"--master-port {main_port}" if machines > 1 else "")
    return f"torchrun --nproc-per-node {processes // machines}{nodes} -m nbtune run {config_file}"


def write_launch_files(config: RunConfig, folder: str | Path, **options: Any) -> dict[str, Path]:
    """Write the run's config, an accelerate config (GPUs) and `launch.sh` into `folder`; returns their
    paths. The script is run from the folder the run's relative paths (data, output_dir) start from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options.setdefault("precision", config.precision or "bf16")
    options.setdefault("processes", max(config.num_processes, 1))
    accel = accelerate_config(**options)  # checks the options for the CPU variant too
    run_file = folder / f"{flat_name(config.name)}.yaml"
    run_file.write_text(config.to_text(), encoding="utf-8")
    written = {"config": run_file}
    machines = accel["num_machines"]
    if options.get("cpu"):
        command = torchrun_command('"$HERE"/' + run_file.name, processes=accel["num_processes"], machines=machines,
                                   main_ip=options.get("main_ip"), main_port=options.get("main_port", 29500))
    else:
        accel_file = folder / "accelerate_config.yaml"
        accel_file.write_text(yaml.safe_dump(accel, sort_keys=False), encoding="utf-8")
        written["accelerate_config"] = accel_file
        command = launch_command("$HERE/" + run_file.name, "$HERE/" + accel_file.name).replace("'", '"')
        if machines > 1:
            command = command.replace(" -m nbtune", " --machine_rank ${MACHINE_RANK:-0} -m nbtune", 1)
    note = f"# On each of the {machines} machines, with MACHINE_RANK=0..{machines - 1} set:\n" if machines > 1 else ""
    script = folder / "launch.sh"
    here = 'HERE="$(cd "$(dirname "$0")" && pwd)"'
    count = accel["num_processes"]
    script.write_text(f"#!/usr/bin/env bash\n# nbtune run {config.name!r} in {count} process{'es' * (count != 1)} "
                      f"({accel['distributed_type']}).\nset -euo pipefail\n{here}\n{note}{command}\n",
                      encoding="utf-8")
    script.chmod(0o755)
    written["script"] = script
    return written


def rerun_script(name: str, config: RunConfig) -> str:
    """A shell script that trains run `name` (`config`) again outside the notebook (`Run.export_script`): its
    in-memory data as JSONL files, its config, and `nbtune run` (or `accelerate launch` for several processes,
    DDP on this machine's kind of device)."""
    import torch

    config_file = f"{flat_name(name)}.yaml"
    config, data_files = _data_as_files(flat_name(name), config)
    script = f"#!/usr/bin/env bash\n# Re-run nbtune run {name!r} outside the notebook.\nset -euo pipefail\n"
    for file, lines in data_files.items():  # JSON lines never read as the bare JSONL marker
        script += f"cat > {file} <<'JSONL'\n{lines}JSONL\n"
    script += f"cat > {config_file} <<'YAML'\n{config.to_text()}YAML\n"
    if config.num_processes <= 1:
        return script + f"nbtune run {config_file}\n"
    accel = accelerate_config(processes=config.num_processes, precision=config.precision or "fp32",
                              cpu=not torch.cuda.is_available())
    return script + (f"cat > accelerate_config.yaml <<'YAML'\n{yaml.safe_dump(accel, sort_keys=False)}YAML\n"
                     f"{launch_command(config_file, 'accelerate_config.yaml')}\n")


def flat_name(name: str) -> str:
    """A run name as one file name: a sweep trial's `<sweep>/<trial>` becomes `<sweep>-<trial>`, so that its
    config and data files lie beside the launch script (the run still saves to `runs/<sweep>/<trial>`)."""
    return name.replace("/", "-")


def _data_as_files(name: str, config: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """`config` with in-memory `data` / `eval_data` (a DataFrame, a list) pointed at JSONL files, and those
    files' text, so that an exported script trains on the same rows."""
    import json

    from nbtune.data.loading import load_records

    changes, files = {}, {}
    for key in ("data", "eval_data"):
        value = getattr(config, key)
        if value is None or isinstance(value, (str, Path)):
            continue
        file = f"{name}.{key}.jsonl"
        rows = load_records(value, field=key).to_list()
        files[file] = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
        changes[key] = file
    return (config.with_changes(**changes) if changes else config), files


__all__ = ["STRATEGIES", "accelerate_config", "flat_name", "launch_command", "rerun_script", "torchrun_command",
           "write_launch_files"]
