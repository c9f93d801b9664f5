"""Hostile input is refused by default (issue 8, item 7; issue 19, item 1): files and configs from someone
else cannot overwrite or delete the user's files, save through a symlink, run code, or unpickle objects.
`output_dir` itself may be any folder (tests/test_output_dir.py); `NBTUNE_WORKSPACE` confines it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import nbtune
from nbtune.config import RunConfig
from nbtune.engine.bases.loading import load_base
from nbtune.safety import check_safetensors_header


@pytest.fixture
def workspace(tmp_path_factory, monkeypatch):
    """An admin's NBTUNE_WORKSPACE: the working folder plus one other folder, which it returns."""
    allowed = tmp_path_factory.mktemp("allowed")
    monkeypatch.setenv("NBTUNE_WORKSPACE", str(allowed))
    return allowed


@pytest.mark.parametrize("output_dir", ["../outside", "a/../../outside", "/etc/nbtune-run", "~/nbtune-run"])
def test_output_dirs_outside_the_workspace_are_refused_when_nbtune_workspace_is_set(workspace, output_dir):
    with pytest.raises(nbtune.ConfigError, match="NBTUNE_WORKSPACE") as info:
        RunConfig.parse({"output_dir": output_dir})
    assert info.value.field == "output_dir" and "\n" not in str(info.value)


@pytest.mark.parametrize("output_dir", ["../outside", "/etc/nbtune-run", "~/nbtune-run"])
def test_without_nbtune_workspace_the_same_output_dirs_are_the_users_choice(output_dir):
    assert RunConfig.parse({"output_dir": output_dir}).output_dir == output_dir


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/b/c", "a/", "/b", "a\\b", "x/../y", ".hidden", ".", "..", "",
                                  "x" * 101])
def test_run_names_that_would_leave_their_folder_are_refused(name):
    with pytest.raises(nbtune.ConfigError, match="`name`") as info:
        RunConfig.parse({"name": name})
    assert info.value.field == "name"


def test_a_run_name_is_one_folder_under_runs():
    assert RunConfig.parse({"name": "my.run-2_b"}).resolved_output_dir == Path("runs", "my.run-2_b")


def test_a_sweep_trial_name_is_one_folder_inside_its_sweeps():
    # A trial's saved config must parse again, so `<sweep>/<trial>` is a name; nothing deeper is.
    assert RunConfig.parse({"name": "dates/3"}).resolved_output_dir == Path("runs", "dates", "3")


def test_a_symlink_out_of_the_workspace_is_refused(workspace, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere")
    Path("link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(nbtune.ConfigError, match="outside the workspace"):
        RunConfig.parse({"output_dir": "link/run"})


def test_the_workspace_is_the_working_folder_and_the_folders_listed(workspace, tmp_path_factory):
    assert RunConfig.parse({"output_dir": "runs/x"}).output_dir == "runs/x"
    assert RunConfig.parse({"output_dir": str(workspace / "run")}).output_dir == str(workspace / "run")
    with pytest.raises(nbtune.ConfigError, match="outside the workspace"):
        RunConfig.parse({"output_dir": str(tmp_path_factory.mktemp("other") / "run")})


@pytest.mark.parametrize("text", [
    "method: !!python/object/apply:os.system ['echo pwned']",
    "data: !!python/name:os.system",
    "lr: !!python/object/new:float [1]",
])
def test_yaml_tags_that_build_objects_are_refused(text):
    with pytest.raises(nbtune.ConfigError, match="not valid YAML"):
        RunConfig.parse(text)


def test_remote_code_is_not_run_without_trust_remote_code(tiny_model_dir, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_model", auto_map={"AutoConfig": "evil.EvilConfig",
                                                     "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n")
    with pytest.raises(nbtune.NbtuneError, match="trust_remote_code"):
        load_base(str(folder))
    assert not marker.exists()


def test_pickle_only_weights_are_refused(tiny_model_dir, tmp_path):
    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = {}
    for path in folder.glob("*.safetensors"):
        from safetensors.torch import load_file

        weights.update(load_file(path))
        path.unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(nbtune.NbtuneError, match="pickle"):
        load_base(str(folder))


def test_a_pickled_adapter_is_refused(tiny_model_dir, demo_rows, tmp_path):
    import torch
    from safetensors.torch import load_file

    run = nbtune.finetune(model=str(tiny_model_dir), data=demo_rows, steps=1, batch_size=4, metric="none",
                          output_dir="saved")
    adapter = run.saved_to / "adapter_model.safetensors"
    torch.save(load_file(adapter), run.saved_to / "adapter_model.bin")
    adapter.unlink()
    with pytest.raises(nbtune.NbtuneError, match="pickle"):
        nbtune.load(run.saved_to)


def safetensors_file(path: Path, header_length: int, header: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", header_length) + header + b"\0" * 16)
    return path


@pytest.mark.parametrize(("length", "header", "match"), [
    (2**40, b"{}", "header"),  # claims a terabyte
    (200 * 2**20, b"{}", "header"),  # beyond the file
    (8, b"not json", "no valid safetensors header"),
    (2, b"[]", "no valid safetensors header"),
])
def test_hostile_safetensors_headers_are_refused_before_parsing(tmp_path, length, header, match):
    path = safetensors_file(tmp_path / "model.safetensors", length, header)
    with pytest.raises(nbtune.NbtuneError, match=match):
        check_safetensors_header(path)


def test_a_model_folder_with_a_hostile_header_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "bad-header"
    shutil.copytree(tiny_model_dir, folder)
    target = next(folder.glob("*.safetensors"))
    safetensors_file(target, 2**40, b"{}")
    with pytest.raises(nbtune.NbtuneError, match="header"):
        load_base(str(folder))


def test_checkpoints_load_without_unpickling():
    # The Trainer's resume loads optimizer/scheduler/RNG states with torch.load(weights_only=True): pinned
    # here, so an upgrade that drops it fails this test instead of silently unpickling.
    import inspect

    from transformers import Trainer

    for name in ("_load_optimizer_and_scheduler", "_load_rng_state"):
        source = inspect.getsource(getattr(Trainer, name))
        assert "torch.load(" in source and "weights_only=False" not in source
        assert source.count("weights_only=True") >= 1, name
