"""The command line, in-process through `nbtune.cli.main` and once as a real `python -m nbtune` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbtune import ConfigError
from nbtune.cli import main, parse_overrides

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nbtune: error: "), err
    return lines[0]


# ---------------------------------------------------------------- methods


def test_methods_lists_all(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("lora", "qlora", "full", "freeze"):
        assert f"{name}: " in out
    assert "LoRA rank" in out  # the options' help is shown, not just names
    assert "trainable_layers" in out


def test_methods_one(capsys):
    assert main(["methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lora: ")
    assert "r (int, default 8" in out
    assert "alpha" in out
    assert "freeze:" not in out


def test_methods_unknown(capsys):
    assert main(["methods", "lroa"]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "Did you mean `lora`?" in line
    assert captured.out == ""


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


# ---------------------------------------------------------------- run: mistakes fail fast, in one line


def test_run_missing_config(capsys):
    assert main(["run", "missing.yaml"]) == 2
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert "missing.yaml" in line
    assert captured.out == ""


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.txt", None, "does not exist"),
    ("okcfg", "method: lora\nrr: 8\n", "`rr`"),  # read as a file whatever its name
    ("OK.YAML", "method: lora\nrr: 8\n", "`rr`"),
    ("bin.yaml", b"\xff\xfe\x00m", "not UTF-8"),
    ("dir.yaml", "folder", "is a folder"),
])
def test_run_reads_the_config_file_it_is_given(capsys, name, content, message):
    if content == "folder":
        Path(name).mkdir()
    elif isinstance(content, bytes):
        Path(name).write_bytes(content)
    elif content is not None:
        Path(name).write_text(content, encoding="utf-8")
    assert main(["run", name]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("flags", [["--machines", "0"], ["--machines", "-1"], ["--processes", "0"]])
def test_export_refuses_zero_or_negative_counts(capsys, flags):
    Path("ok.yaml").write_text("method: lora\n", encoding="utf-8")
    with pytest.raises(SystemExit) as caught:
        main(["export", "ok.yaml", *flags])
    assert caught.value.code == 2 and "must be 1 or more" in capsys.readouterr().err


def test_run_config_with_typo(capsys):
    Path("cfg.yaml").write_text("method: lora\nrr: 8\nsteps: 3\n", encoding="utf-8")
    assert main(["run", "cfg.yaml"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "`rr`" in line
    assert "Did you mean `r`?" in line


def test_run_bad_override(capsys):
    Path("cfg.yaml").write_text("steps: 3\n", encoding="utf-8")
    assert main(["run", "cfg.yaml", "--set", "batch_size=0"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "`batch_size`" in line


def test_run_malformed_override(capsys):
    Path("cfg.yaml").write_text("steps: 3\n", encoding="utf-8")
    assert main(["run", "cfg.yaml", "--set", "novalue"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "novalue" in line


def test_run_missing_data_file(capsys):
    Path("cfg.yaml").write_text("data: nowhere.jsonl\nsteps: 1\n", encoding="utf-8")
    assert main(["run", "cfg.yaml"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nowhere.jsonl" in line


# ---------------------------------------------------------------- parse_overrides


@pytest.mark.parametrize(("pair", "key", "value"), [
    ("r=16", "r", 16),
    ("lr=0.0001", "lr", 1e-4),
    ("target_modules=[q_proj, v_proj]", "target_modules", ["q_proj", "v_proj"]),
    ("name=abc", "name", "abc"),
    ("rslora=true", "rslora", True),
    ("output_dir=", "output_dir", None),
    ("data=a=b.jsonl", "data", "a=b.jsonl"),
    (" steps =3", "steps", 3),
    ("name=[unclosed", "name", "[unclosed"),
], ids=["int", "float", "list", "str", "bool", "empty", "equals-in-value", "spaces", "bad-yaml-stays-text"])
def test_parse_overrides(pair, key, value):
    assert parse_overrides([pair]) == {key: value}


def test_parse_overrides_exponent():
    assert parse_overrides(["lr=1e-4"]) == {"lr": 1e-4}


def test_parse_overrides_several_last_wins():
    assert parse_overrides(["r=4", "alpha=8", "r=16"]) == {"r": 16, "alpha": 8}


@pytest.mark.parametrize("pair", ["novalue", "=3", "  =x"], ids=["no-equals", "no-key", "blank-key"])
def test_parse_overrides_rejects(pair):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([pair])


# ---------------------------------------------------------------- a real run on a tiny model


def test_run_end_to_end(tiny_model_dir, demo_rows, capsys):
    Path("train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo_rows[:16]), encoding="utf-8")
    Path("cfg.yaml").write_text(
        f"model: {json.dumps(str(tiny_model_dir))}\n"
        "data: train.jsonl\n"
        "steps: 3\n"
        "batch_size: 4\n"
        "output_dir: out\n"
        "name: cli-e2e\n",
        encoding="utf-8",
    )
    code = main(["run", "cfg.yaml", "--json", "--set", "r=4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["name"] == "cli-e2e"
    assert result["status"] == "finished"
    assert result["steps"] == 3
    assert result["trainable_params"] > 0
    assert result["trainable_params"] < result["total_params"]  # LoRA: the base stays frozen
    assert Path(result["saved_to"]).resolve() == Path("out").resolve()
    adapter = json.loads(Path("out/adapter_config.json").read_text(encoding="utf-8"))
    assert adapter["r"] == 4
    assert any(Path("out").glob("adapter_model.*"))


def test_export_model_writes_a_checked_gguf_of_a_saved_run(tiny_model_dir, demo_rows, capsys):
    Path("train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in demo_rows[:16]), encoding="utf-8")
    Path("cfg.yaml").write_text(f"model: {json.dumps(str(tiny_model_dir))}\ndata: train.jsonl\nsteps: 2\n"
                                "batch_size: 4\noutput_dir: runs/dates\nname: dates\nmetric: none\n",
                                encoding="utf-8")
    assert main(["run", "cfg.yaml"]) == 0
    capsys.readouterr()
    assert main(["export-model", "runs/dates", "--gguf", "q8_0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["quant"] == "q8_0" and result["same_tokens"]
    assert Path(result["path"]) == Path("runs/dates-gguf-q8_0/dates-q8_0.gguf") and Path(result["path"]).is_file()
    assert Path("runs/dates-gguf-q8_0/Modelfile").is_file()
    assert main(["export-model", "runs/dates"]) == 0  # safetensors: the merged model
    assert (Path("runs/dates-merged") / "config.json").is_file()
    assert main(["export-model", "runs/dates", "--gguf", "q4"]) == 2
    assert "unknown GGUF quantisation 'q4'" in capsys.readouterr().err


# ---------------------------------------------------------------- a real process


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "nbtune", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_module_entry_point():
    listed = _run_module("methods")
    assert listed.returncode == 0, listed.stderr
    assert "qlora: " in listed.stdout

    failed = _run_module("run", "nope.yaml")
    assert failed.returncode == 2
    line = _one_error_line(failed.stderr)
    assert "nope.yaml" in line
    assert "Traceback" not in failed.stderr
    assert failed.stdout == ""
