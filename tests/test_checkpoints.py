"""Periodic checkpoints are atomic and verified; resume never starts from a damaged one; kill -9 then
resume continues exactly (issue 8, items 1 and 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nbtune
from nbtune.engine.training.checkpoints import MANIFEST, latest_good, verify

SETTINGS = {"steps": 6, "batch_size": 4, "lr": 1e-2, "metric": "none", "seed": 7, "precision": "fp32",
            "checkpoint_steps": 2}


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, tiny_model_dir):
    """One run that left checkpoints at steps 4 and 6 (keep_checkpoints: 2), and its output folder."""
    from nbtune.data.demo import demo_splits

    out = tmp_path_factory.mktemp("ckpt") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out.parent)  # the workspace: module fixtures run before conftest's per-test one
        run = nbtune.finetune(model=str(tiny_model_dir), data=demo_splits()[0][:32], output_dir=str(out),
                              **SETTINGS)
    return run, out.with_name("run-checkpoints")


def test_periodic_checkpoints_are_complete_verified_and_pruned(checkpointed):
    run, root = checkpointed
    assert run.status == "finished"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-6"]  # no staging left behind
    for folder in root.iterdir():
        manifest = json.loads((folder / MANIFEST).read_text())
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= set(manifest["files"])
        assert manifest["run"] == run.name and verify(folder) is None
        saved = json.loads((folder / "run.json").read_text())  # nbtune's own record, checksummed too
        assert "run.json" in manifest["files"] and saved["name"] == run.name
        assert saved["history"][-1]["step"] == int(folder.name.split("-")[1])
    assert latest_good(root).name == "checkpoint-6"


def damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


def test_every_damaged_file_makes_resume_fall_back_to_the_previous_checkpoint(checkpointed, tmp_path):
    _, root = checkpointed
    names = [*sorted(json.loads((root / "checkpoint-6" / MANIFEST).read_text())["files"]), MANIFEST]
    scenarios = silent = 0
    for name in names:
        for how in ("flip", "truncate", "delete"):
            copy = tmp_path / f"{name}-{how}"
            shutil.copytree(root, copy)
            damage(copy / "checkpoint-6" / name, how)
            with pytest.warns(UserWarning, match="skipping checkpoint-6"):
                picked = latest_good(copy)
            scenarios += 1
            silent += picked is None or picked.name != "checkpoint-4"
            shutil.rmtree(copy)
    assert scenarios >= 30 and silent == 0


def test_a_damaged_checkpoint_given_by_path_falls_back_and_says_so(checkpointed, tmp_path, tiny_model_dir):
    from nbtune.engine.training.checkpoints import resume_checkpoint
    from nbtune.engine.training.pipeline import start_run

    _, root = checkpointed
    copy = tmp_path / "checkpoints"
    shutil.copytree(root, copy)
    damage(copy / "checkpoint-6" / "optimizer.pt", "flip")
    run = start_run({"model": str(tiny_model_dir), "data": "demo", **SETTINGS})
    with pytest.warns(UserWarning, match="optimizer.pt does not match its checksum; resuming from checkpoint-4"):
        assert resume_checkpoint(run, copy / "checkpoint-6") == str(copy / "checkpoint-4")


def test_latest_without_checkpoints_is_one_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(nbtune.NbtuneError, match="no complete checkpoint"):
        nbtune.finetune(model=str(tiny_model_dir), data="demo", output_dir=str(tmp_path / "none"),
                        resume_from="latest", **SETTINGS)


@pytest.mark.parametrize(("change", "field"), [({"r": 4}, "r"), ({"method": "dora"}, "method"),
                                               ({"batch_size": 8}, "batch_size"),
                                               ({"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "model")])
def test_a_run_whose_settings_cannot_continue_a_checkpoint_is_refused_by_name(checkpointed, tiny_model_dir,
                                                                               change, field):
    from nbtune.engine.training.checkpoints import resume_checkpoint
    from nbtune.engine.training.pipeline import start_run

    _, root = checkpointed
    run = start_run({"model": str(tiny_model_dir), "data": "demo", **SETTINGS, **change})
    with pytest.raises(nbtune.NbtuneError) as caught:
        resume_checkpoint(run, root / "checkpoint-4")
    assert caught.value.field == field and "cannot resume from checkpoint-4" in str(caught.value)


def test_settings_the_checkpoint_restores_are_named_and_the_same_global_batch_resumes(checkpointed, tiny_model_dir):
    from nbtune.engine.training.checkpoints import resume_checkpoint
    from nbtune.engine.training.pipeline import start_run

    _, root = checkpointed
    same_rows = start_run({"model": str(tiny_model_dir), "data": "demo", **SETTINGS, "batch_size": 2,
                           "grad_accum": 2, "steps": 10})  # 2 x 2 = 4 rows per step, and more steps: fine
    assert resume_checkpoint(same_rows, root / "checkpoint-4") == str(root / "checkpoint-4")
    other_lr = start_run({"model": str(tiny_model_dir), "data": "demo", **SETTINGS, "lr": 1e-4, "seed": 8})
    with pytest.warns(UserWarning) as caught:
        resume_checkpoint(other_lr, root / "checkpoint-4")
    said = " ".join(str(w.message) for w in caught)
    assert "`lr` comes back from the checkpoint (0.01)" in said and "`seed` changed (7 -> 8)" in said


def test_a_checkpoints_run_json_is_the_run_record_and_an_older_one_is_still_checked(checkpointed, tiny_model_dir,
                                                                                     tmp_path):
    from nbtune.engine.records import run_folder
    from nbtune.engine.training.checkpoints import check_compatible
    from nbtune.engine.training.pipeline import start_run

    run, root = checkpointed
    record = run_folder.read_record(root / "checkpoint-4")  # written through run_folder, sealed by the manifest
    assert record["schema"] == run_folder.SCHEMA and record["id"] == run.id and record["total_steps"] == 6
    assert record["status"] == "running" and record["history"][-1]["step"] == 4
    older = shutil.copytree(root, tmp_path / "older")  # as the releases before schema 2 wrote its run.json
    file = older / "checkpoint-4" / "run.json"
    saved = {k: v for k, v in json.loads(file.read_text()).items()
             if k not in ("schema", "total_steps", "base_name", "saved_to")}
    saved["config"].update(beta=None, loss_type=None, precompute_ref=False)
    file.write_text(json.dumps(saved))
    other = start_run({"model": str(tiny_model_dir), "data": "demo", **SETTINGS, "method": "dora"})
    with pytest.raises(nbtune.NbtuneError, match="made with `method: lora`"):  # (its checksum no longer matches)
        check_compatible(older / "checkpoint-4", other.config)


# ------------------------------------------------------------------ real processes, really killed
def write_config(folder: Path, model: Path, name: str, steps: int) -> Path:
    config = {"name": name, "model": str(model), "data": "demo", **SETTINGS, "steps": steps,
              "output_dir": str(folder / name)}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def nbtune_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nbtune", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"process ended before {path} appeared: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def history(folder: Path) -> list[dict]:
    return json.loads((folder / "run.json").read_text())["history"]


def test_kill_9_then_resume_is_exact(tiny_model_dir, tmp_path):
    steps = 10
    whole = nbtune_cli("run", str(write_config(tmp_path, tiny_model_dir, "whole", steps)), "--json")
    assert whole.wait(300) == 0, whole.stderr.read()[-2000:]

    config = write_config(tmp_path, tiny_model_dir, "killed", steps)
    victim = nbtune_cli("run", str(config), "--json")
    wait_for(tmp_path / "killed-checkpoints" / "checkpoint-4", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(60)
    assert not (tmp_path / "killed" / "run.json").exists()  # it really died before finishing

    resumed = nbtune_cli("run", str(config), "--json", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert json.loads(out[out.index("{"):])["status"] == "finished"

    expected, got = history(tmp_path / "whole"), history(tmp_path / "killed")
    start = next(r["step"] for r in got if not r.get("restored"))
    assert start >= 5 and [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bit-exact, restored part included
    a = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KILL_INSIDE_SAVE = textwrap.dedent("""
    import os, signal, sys
    import nbtune.engine.training.checkpoints as checkpoints
    original = checkpoints.publish
    def publish(folder, root, *, extra):
        if extra["step"] == 4:  # the second save: its files are written, the rename has not happened
            os.kill(os.getpid(), signal.SIGKILL)
        return original(folder, root, extra=extra)
    checkpoints.publish = publish
    from nbtune.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_as_the_resume_point(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "cut", 6)
    process = subprocess.run([sys.executable, "-c", KILL_INSIDE_SAVE, "run", str(config)], capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL
    root = tmp_path / "cut-checkpoints"
    assert (root / ".staging" / "checkpoint-4").is_dir()  # the half-made save is there ...
    assert latest_good(root).name == "checkpoint-2"  # ... and never chosen
    resumed = nbtune_cli("run", str(config), "--json", "--resume")
    _out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert [r["step"] for r in history(tmp_path / "cut")] == list(range(1, 7))


def test_a_cell_resumes_a_crashed_run_from_its_checkpoints(tiny_model_dir, demo_rows, monkeypatch, capsys):
    # In a kernel: the run died mid-way (here a crash at step 5); the same cell with --resume continues
    # from the newest verified checkpoint and ends where an uninterrupted run ends.
    from conftest import nbtune_shell

    from nbtune.engine.training.callbacks import RunCallback

    body = ("data: {{ rows }}\nsteps: 8\nbatch_size: 4\nlr: 0.01\nmetric: none\nprecision: fp32\n"
            "checkpoint_steps: 2\nseed: 7\n")
    with nbtune_shell(tiny_model_dir, rows=demo_rows) as ip:
        whole = ip.run_cell_magic("finetune", "whole --no-panel", body)
        original = RunCallback.on_step_end

        def crash_at_five(self, args, state, control, **kwargs):
            original(self, args, state, control, **kwargs)
            if state.global_step == 5:
                raise RuntimeError("kernel died")

        monkeypatch.setattr(RunCallback, "on_step_end", crash_at_five)
        assert not ip.run_cell("%%finetune crashed --no-panel\n" + body).success
        monkeypatch.setattr(RunCallback, "on_step_end", original)
        resumed = ip.run_cell_magic("finetune", "crashed --resume --no-panel", body)
        assert resumed.status == "finished", capsys.readouterr().err
        assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
        assert [r.get("restored", False) for r in resumed.history] == [True] * 4 + [False] * 4
