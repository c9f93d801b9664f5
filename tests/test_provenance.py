"""run.json records what repeating a run takes (engine/records/provenance.py), and `nbtune.load` says when the data or
the base weights it names have changed since."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings

import pytest

import nbtune
from nbtune.data.splits import read_data
from nbtune.engine.records import provenance
from nbtune.errors import NbtuneWarning

FAST = {"steps": 2, "batch_size": 4, "metric": "none"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # The weights' digests are cached in nbtune's cache: each test starts with none (and leaves the user's alone).
    monkeypatch.setenv("NBTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """The tiny Llama in a folder of this test's own, whose weights it may change."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.fixture
def jsonl(demo_rows, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in demo_rows), encoding="utf-8")
    return path


def _trained(model_dir, jsonl, tmp_path, **more):
    return nbtune.finetune(model=str(model_dir), data=str(jsonl), output_dir=str(tmp_path / "out"), **FAST, **more)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _loaded(path):
    """nbtune.load(path) and the NbtuneWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = nbtune.load(path)
    return run, [str(w.message) for w in caught if issubclass(w.category, NbtuneWarning)]


def test_run_json_records_versions_device_model_data_seed_and_git(model_dir, jsonl, tmp_path):
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    run = _trained(model_dir, jsonl, tmp_path, seed=7)
    saved = json.loads((run.saved_to / "run.json").read_text())["provenance"]
    assert saved == json.loads(json.dumps(run.provenance))  # the run's record is what run.json holds
    for module in (nbtune, torch, transformers, peft, datasets, accelerate):
        assert saved["versions"][module.__name__] == str(module.__version__)
    assert saved["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    from nbtune.engine.compute import device

    assert saved["device"]["type"] == device.current().device.type and saved["device"]["processes"] == 1
    assert saved["precision"]["compute"] == run.config.precision in ("fp32", "bf16", "fp16")
    assert saved["precision"]["dtype"] == run.config.dtype and saved["precision"]["quantization"] == "none"
    assert saved["model"]["path"] == str(model_dir)
    assert saved["model"]["weights"] == {"model.safetensors": _sha256(model_dir / "model.safetensors")}
    reread = provenance.data_record(*read_data(run.config))
    assert saved["data"]["train"] == reread["train"] and saved["data"]["train"]["rows"] == 32
    assert saved["data"]["format"] == reread["format"] and saved["data"]["eval"] is None
    assert saved["seed"] == 7
    assert saved["git"] is None  # the test's working folder is no repository


def test_a_base_passed_in_memory_has_no_folder_and_a_fingerprint_of_its_weights(llama_base, demo_rows):
    from nbtune.engine.records.provenance import weights_sample_fingerprint

    digest = weights_sample_fingerprint(llama_base[0])
    run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir="out", **FAST)
    assert run.provenance["model"] == {"name": "in-memory", "path": None, "weights": None, "in_memory": True,
                                       "merged_from": None, "fingerprint": digest}
    assert run.provenance["data"]["train"]["rows"] == len(demo_rows)


def test_the_data_fingerprint_changes_with_one_row_and_only_then(demo_rows):
    import datasets

    def fingerprint(rows):
        return provenance.rows_fingerprint(datasets.Dataset.from_list(rows))

    assert fingerprint(demo_rows) == fingerprint([dict(row) for row in demo_rows])
    changed = [dict(row) for row in demo_rows]
    changed[17]["completion"] = changed[17]["completion"].replace("-", "/", 1)
    assert fingerprint(changed) != fingerprint(demo_rows)
    assert fingerprint(demo_rows[:-1]) != fingerprint(demo_rows)


def test_a_weights_digest_is_computed_once_and_again_when_the_file_changes(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 4096)
    assert provenance.file_sha256(weights) == _sha256(weights)
    with monkeypatch.context() as patched:
        patched.setattr(hashlib, "file_digest", lambda *a: pytest.fail("hashed an unchanged file again"))
        assert provenance.file_sha256(weights) == _sha256(weights)  # from the cache
    with weights.open("r+b") as file:  # same size; the cache must not answer for the old bytes
        file.write(b"\x01")
    assert provenance.file_sha256(weights) == _sha256(weights)


def test_git_state_names_the_commit_and_whether_tracked_files_changed(tmp_path, monkeypatch):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert provenance.git_state(tmp_path) is None  # not a repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "notebook.ipynb").write_text("{}")
    subprocess.run([*git, "add", "notebook.ipynb"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run.json").write_text("{}")  # untracked outputs leave the tree clean
    assert provenance.git_state(tmp_path) == {"root": str(tmp_path.resolve()), "commit": head, "dirty": False}
    (tmp_path / "notebook.ipynb").write_text('{"cells": []}')
    assert provenance.git_state(tmp_path)["dirty"] is True
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no git at all
    assert provenance.git_state(tmp_path) is None


def test_load_restores_the_provenance_and_is_quiet_when_nothing_changed(model_dir, jsonl, tmp_path):
    run = _trained(model_dir, jsonl, tmp_path)
    loaded, said = _loaded(run.saved_to)
    assert said == []
    assert loaded.provenance == json.loads(json.dumps(run.provenance))


def test_load_warns_when_the_data_file_changed(model_dir, jsonl, tmp_path):
    run = _trained(model_dir, jsonl, tmp_path)
    rows = jsonl.read_text().splitlines()
    rows[3] = rows[3].replace("-", "/", 1)
    jsonl.write_text("\n".join(rows) + "\n")
    _, said = _loaded(run.saved_to)
    assert len(said) == 1 and "data" in said[0] and "model" not in said[0] and "\n" not in said[0]


def test_load_warns_when_the_base_weights_changed(model_dir, jsonl, tmp_path):
    from safetensors.torch import load_file, save_file

    run = _trained(model_dir, jsonl, tmp_path)
    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    _, said = _loaded(run.saved_to)
    assert len(said) == 1 and "base model's weights" in said[0] and "model.safetensors" in said[0]
    assert "\n" not in said[0]


def test_a_run_json_from_before_provenance_still_loads_quietly(model_dir, jsonl, tmp_path):
    run = _trained(model_dir, jsonl, tmp_path)
    file = run.saved_to / "run.json"
    info = json.loads(file.read_text())
    for key in ("provenance", "schema", "total_steps", "base_name", "saved_to"):  # as releases before it wrote
        del info[key]
    file.write_text(json.dumps(info))
    jsonl.write_text(jsonl.read_text().replace("-", "/", 1))  # a change there is nothing recorded to compare with
    loaded, said = _loaded(run.saved_to)
    assert said == [] and loaded.provenance == {} and loaded.history == run.history


@pytest.mark.skipif(__import__("torch").cuda.is_available(),
                    reason="a CPU multi-process test (forks this process); tests/test_distributed.py covers GPUs")
def test_a_run_of_two_processes_brings_its_provenance_home(model_dir, jsonl, tmp_path):
    run = _trained(model_dir, jsonl, tmp_path, num_processes=2)
    saved = json.loads((run.saved_to / "run.json").read_text())["provenance"]
    assert run.provenance == saved and saved["device"]["processes"] == 2  # rank 0's record, in the kernel
    assert saved["model"]["weights"] == {"model.safetensors": _sha256(model_dir / "model.safetensors")}
    assert saved["data"]["train"]["rows"] == 32
