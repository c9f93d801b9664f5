"""The command line: `nbtune run config.yaml [--set key=value ...] [--json] [--resume]`, `nbtune export`,
`nbtune export-model RUN_DIR [--gguf QUANT]`, `nbtune preview config.yaml [-n N]`, `nbtune sweep config.yaml
[--json]`, `nbtune methods`, `nbtune demo`, `nbtune fetch`.

`nbtune run` works unchanged under `accelerate launch` and `torchrun` (every rank trains; rank 0 prints
and writes).

User mistakes print one line (`nbtune: error: ...`) and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from nbtune.config import load_yaml
from nbtune.errors import ConfigError, NbtuneError

DEMO_CONFIG = {"name": "demo", "method": "lora", "data": "demo", "steps": 40, "lr": 1e-3, "batch_size": 8,
               "metric": "exact_match"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except NbtuneError as exc:
        print(f"nbtune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a RunInterrupted says where the run stopped
        print(f"nbtune: {exc or 'interrupted'}", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbtune", description="Fine-tune LLMs from one YAML config: LoRA, QLoRA, DoRA, AdaLoRA, prefix and "
        "prompt tuning, IA3, bottleneck adapters, BitFit, full, freeze and more (`nbtune methods` lists them).")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a config file headless and print its metrics")
    run.add_argument("config", help="YAML file with run settings and method options")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key (value parsed as YAML: --set r=16 --set lr=1e-4); repeatable")
    run.add_argument("--json", action="store_true", help="print the metrics as JSON")
    run.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                     help="continue from the newest verified checkpoint in <output_dir>-checkpoints "
                          "(or from CHECKPOINT), e.g. after the process was killed")
    run.set_defaults(handler=_cmd_run)

    sweep = sub.add_parser("sweep", help="search the config's `sweep:` block (Optuna, every trial a run on one "
                                         "loaded base) and print the trials and the best config")
    sweep.add_argument("config", help="YAML file with run settings, method options and a `sweep:` block")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key, as for `nbtune run`")
    sweep.add_argument("--json", action="store_true", help="print the trials and the best as JSON")
    sweep.set_defaults(handler=_cmd_sweep)

    export = sub.add_parser("export", help="write an accelerate config and launch script for several "
                                           "GPUs or machines")
    export.add_argument("config", help="YAML file with run settings and method options")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, as for `nbtune run`")
    export.add_argument("--processes", type=_at_least_one, help="processes in all machines together (one per GPU); "
                                                      "default: the config's num_processes")
    export.add_argument("--machines", type=_at_least_one, default=1, help="machines (nodes)")
    export.add_argument("--main-ip", help="address of machine 0 (several machines)")
    export.add_argument("--main-port", type=int, default=29500)
    export.add_argument("--strategy", choices=("ddp", "fsdp", "deepspeed"), default="ddp",
                        help="ddp: a full copy per GPU; fsdp: weights sharded; deepspeed: ZeRO-2")
    export.add_argument("--cpu", action="store_true", help="CPU processes (gloo) instead of GPUs")
    export.add_argument("-o", "--output", default="launch", help="folder to write into")
    export.set_defaults(handler=_cmd_export)

    model = sub.add_parser("export-model", help="merge a saved run into its base and write the model out: a "
                           "safetensors folder, or one GGUF file (--gguf) with an Ollama Modelfile, checked by "
                           "loading it back")
    model.add_argument("run_dir", help="a saved run's folder (its run.json)")
    model.add_argument("--gguf", nargs="?", const="f16", metavar="QUANT",
                       help="write GGUF for llama.cpp / Ollama: f16 (default), bf16 or q8_0")
    model.add_argument("-o", "--output", help="folder to write into (default: RUN_DIR-gguf-QUANT or "
                                              "RUN_DIR-merged)")
    model.add_argument("--json", action="store_true", help="print what the GGUF check measured as JSON")
    model.set_defaults(handler=_cmd_export_model)

    preview = sub.add_parser("preview", help="print the first training batch as the model sees it (loss tokens "
                             "in [[...]]), loading only the tokenizer")
    preview.add_argument("config", help="YAML file with run settings and method options")
    preview.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a key, as for `nbtune run`")
    preview.add_argument("-n", type=int, default=4, help="examples to show (default 4)")
    preview.set_defaults(handler=_cmd_preview)

    methods = sub.add_parser("methods", help="list the methods with their options, defaults and help")
    methods.add_argument("name", nargs="?", help="one method")
    methods.set_defaults(handler=_cmd_methods)

    demo = sub.add_parser("demo", help="fine-tune the default model on the shipped date task, before/after")
    demo.add_argument("--output-dir", default="runs/demo", help="where the adapter is saved")
    demo.add_argument("--steps", type=int, default=DEMO_CONFIG["steps"], help="optimizer steps")
    demo.set_defaults(handler=_cmd_demo)

    fetch = sub.add_parser("fetch", help="make a model available offline and print its local folder "
                           "(default: SmolLM2-135M-Instruct)")
    fetch.add_argument("model", nargs="?", default="default",
                       help="a hub id, 'default' / 'smollm2', or a local folder (printed back as it is)")
    fetch.set_defaults(handler=_cmd_fetch)
    return parser


def _at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (0 processes or machines would launch nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`["r=16", "target_modules=[q_proj, v_proj]"]` -> {"r": 16, "target_modules": ["q_proj", "v_proj"]}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r} must look like key=value.")
        try:
            out[key.strip()] = load_yaml(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from nbtune.config import RunConfig
    from nbtune.engine.experiments.groups import kind_of

    config = RunConfig.parse(Path(args.config), **parse_overrides(args.overrides))  # fail fast, before imports
    kind = kind_of(config)  # one run, a cross-validation or a sweep: decided where the workbench decides it
    if kind == "sweep" and args.resume is None:  # a search: the trials, then the best
        return _report_sweep(config, as_json=args.json)
    from nbtune.engine.training.distributed import is_main_process
    from nbtune.engine.workbench import finetune

    run = finetune(config, progress=not args.json and is_main_process(), resume_from=args.resume)
    if kind == "cross-validation":  # every fold, then mean +- std
        return _report_cross_validation(run, as_json=args.json)
    if not is_main_process():  # under a launcher: rank 0 reports for all
        return 0 if run.status in ("finished", "stopped") else 1
    if args.json:
        print(json.dumps({"name": run.name, "status": run.status, **run.metrics}, indent=2, default=str))
    else:
        _print_metrics(run.name, run.status, run.metrics)
    return 0 if run.status in ("finished", "stopped") else 1


def _report_cross_validation(cv: Any, *, as_json: bool) -> int:
    """Each fold and mean +- std (`--json`: `cv.to_dict()`); status 1 when a fold failed (diverged)."""
    from nbtune.engine.training.distributed import is_main_process

    if is_main_process():  # under a launcher: rank 0 reports for all
        print(json.dumps(cv.to_dict(), indent=2, default=str) if as_json else repr(cv))
    return 1 if any(run.status == "failed" for run in cv.runs) else 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run (or continue: the study is in its folder) a sweep; several processes given the same config and a
    shared `storage:` run its trials together. Status 1 when no trial finished."""
    from nbtune.config import RunConfig
    from nbtune.engine.experiments.groups import kind_of

    config = RunConfig.parse(Path(args.config), **parse_overrides(args.overrides))  # fail fast, before imports
    if kind_of(config) != "sweep":
        raise ConfigError("`nbtune sweep` needs a `sweep:` block in the config, e.g. sweep: {r: [4, 8, 16]}; "
                          "`nbtune run` trains a single run.", field="sweep")
    return _report_sweep(config, as_json=args.json)


def _report_sweep(config: Any, *, as_json: bool) -> int:
    """Run (or continue) the sweep of a parsed config; its trials and best (`--json`: `sweep.to_dict()`)."""
    from nbtune.engine.workbench import finetune

    sweep = finetune(config)
    if as_json:
        print(json.dumps(sweep.to_dict(), indent=2, default=str))
    else:
        print(repr(sweep))
        if sweep.best is not None:
            print(f"\nthe best config:\n{sweep.to_cell()}")
    return 0 if sweep.best is not None else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from nbtune.config import RunConfig
    from nbtune.engine.export.launch_files import write_launch_files

    config = RunConfig.parse(Path(args.config), **parse_overrides(args.overrides))
    written = write_launch_files(config, args.output, processes=args.processes or config.num_processes,
                                 machines=args.machines, main_ip=args.main_ip, main_port=args.main_port,
                                 strategy=args.strategy, cpu=args.cpu)
    for path in written.values():
        print(path)
    print(f"run it with: bash {written['script']}")
    return 0


def _cmd_export_model(args: argparse.Namespace) -> int:
    from nbtune.engine.records.reopen import load

    folder = Path(args.run_dir)
    output = args.output or f"{folder}-{'gguf-' + args.gguf if args.gguf else 'merged'}"
    if args.gguf is not None:
        from nbtune.engine.export.gguf_file import check_quant

        check_quant(args.gguf)  # before the run's weights load
    run = load(folder)
    if args.gguf is None:
        print(run.export(output))
        return 0
    out = run.export(output, format="gguf", quant=args.gguf)
    print(json.dumps({"path": str(out.path), "modelfile": str(out.modelfile), "size_bytes": out.size_bytes,
                      **out.check.to_dict()}, indent=2) if args.json else out)
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from nbtune.api import preview

    print(preview(Path(args.config), args.n, **parse_overrides(args.overrides)))
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from nbtune.catalog import methods

    print(methods(args.name).describe() if args.name else methods())
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from nbtune.engine.bases.loading import resolve_model

    print(resolve_model(args.model))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from nbtune.config import RunConfig
    from nbtune.engine.workbench import finetune

    config = {**DEMO_CONFIG, "steps": args.steps, "output_dir": args.output_dir}
    RunConfig.parse(config)  # a bad --steps is refused before anything is announced
    print(f"Fine-tuning {config['method']} on the demo task (dates -> YYYY-MM-DD), {config['steps']} steps ...")
    run = finetune(config, progress=True)
    before = run.metrics["base_exact_match"]  # the base's answers to the same dates, scored at the end
    prompt = "Convert this date to ISO format (YYYY-MM-DD): the 4th of July, 1976"
    print()
    print(f"exact match on {run.metrics['samples']} held-out dates: "
          f"before {before:.0%} -> after {run.metrics['exact_match']:.0%}")
    print(f"example: {prompt!r} -> {run.generate(prompt)!r}")
    _print_metrics(run.name, run.status, run.metrics)
    return 0


def _print_metrics(name: str, status: str, metrics: dict[str, Any]) -> None:
    print(f"run {name}: {status}")
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"  {key:<20} {shown}")
