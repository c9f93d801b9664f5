"""`output_dir` is wherever the user says (issue 19, item 1): absolute, `~`, an existing empty folder;
never over a folder of the user's own files, never through a symlink, and nothing written outside it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

import nbtune
from nbtune.config import RunConfig
from nbtune.engine.records.saving import atomic_directory
from nbtune.errors import NbtuneWarning

FAST = {"steps": 1, "batch_size": 4, "metric": "none"}
SAVED = {"adapter_config.json", "adapter_model.safetensors", "run.json"}


@pytest.fixture(scope="module")
def trained(_chat_tokenizer, tmp_path_factory):
    """One unsaved LoRA run for the module, in a workbench of its own: `run.save` is the code under test."""
    import copy

    from conftest import tiny_llama

    from nbtune.data.demo import demo_splits
    from nbtune.engine.workbench import Workbench

    tokenizer = copy.deepcopy(_chat_tokenizer)
    bench = Workbench()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("nbtune.engine.workbench.WORKBENCH", bench)
        patch.chdir(tmp_path_factory.mktemp("output-dir-run"))
        yield bench.finetune(data=demo_splits()[0][:16], base=(tiny_llama(tokenizer), tokenizer), save=False,
                             **FAST)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under `root` (symlinks not followed) with a file's bytes, a link's target, or 'dir'."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = (f"-> {os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                    else path.read_bytes())
    return out


def holds_a_save(folder: Path) -> bool:
    return {p.name for p in folder.iterdir()} >= SAVED


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- anywhere the user says


def test_a_run_saves_to_an_absolute_output_dir_outside_the_working_folder(llama_base, demo_rows,
                                                                          tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    target = elsewhere / "runs" / "x"
    run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir=str(target), **FAST)
    assert run.saved_to == target and holds_a_save(target)
    assert [p.name for p in elsewhere.iterdir()] == ["runs"] and [p.name for p in target.parent.iterdir()] == ["x"]
    assert not Path("runs").exists()  # nothing under the working folder


def test_a_run_saves_under_home_given_with_a_tilde(llama_base, demo_rows, tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir="~/scratch/runs/x", **FAST)
    assert run.config.output_dir == "~/scratch/runs/x"  # kept as written: run.json says what the user said
    assert run.saved_to == home / "scratch" / "runs" / "x"
    assert holds_a_save(run.saved_to)
    assert set(snapshot(home)) == {"scratch", "scratch/runs", "scratch/runs/x"} | {f"scratch/runs/x/{p.name}"
                                                                                 for p in run.saved_to.iterdir()}


@pytest.mark.parametrize("output_dir", ["/data/runs/x", "~/scratch/runs/x", "../sibling/run", "runs/a/b/c"])
def test_any_folder_path_is_a_valid_output_dir(output_dir):
    assert RunConfig.parse({"output_dir": output_dir}).output_dir == output_dir


@pytest.mark.parametrize("output_dir", [".", "..", "/", "runs/.."])
def test_an_output_dir_that_names_no_folder_is_refused_when_parsed(output_dir):
    with pytest.raises(nbtune.ConfigError, match="names no folder") as info:
        RunConfig.parse({"output_dir": output_dir})
    assert info.value.field == "output_dir" and "e.g. 'runs/my-run'" in one_line(info)


# ---------------------------------------------------------------- an existing empty folder


def test_a_run_saves_into_an_existing_empty_mkdtemp_folder(trained, tmp_path_factory):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.mktemp("scratch")))
    before = folder.stat()
    assert trained.save(folder) == folder
    assert holds_a_save(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary folder left inside
    after = folder.stat()  # the same folder (a mount point, a link's target stay what they were), 0700 kept
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nothing beside it
    trained.save(folder)  # now a saved run: the next save replaces it
    assert holds_a_save(folder)


def test_a_run_given_an_empty_folder_as_output_dir_saves_into_it(llama_base, demo_rows, tmp_path_factory):
    folder = Path(tempfile.mkdtemp(dir=tmp_path_factory.mktemp("scratch")))
    run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir=str(folder), **FAST)
    assert run.error is None and run.saved_to == folder and holds_a_save(folder)


def test_a_failing_save_into_an_empty_folder_leaves_it_empty(trained, tmp_path, monkeypatch):
    folder = tmp_path / "empty"
    folder.mkdir()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trained.tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        trained.save(folder)
    assert list(folder.iterdir()) == []


def test_a_save_into_an_empty_folder_moves_the_marker_last_and_takes_back_a_half_move(tmp_path, monkeypatch):
    # A folder holding run.json holds a complete save: run.json arrives last, and a move that fails
    # half-way takes back what it moved.
    folder = tmp_path / "empty"
    folder.mkdir()
    arrived = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "run.json":
            assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == {"a.txt", "b.txt"}
            raise OSError("gone")
        arrived.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="gone"), atomic_directory(folder, replaceable="run.json") as tmp:
        for name in ("run.json", "a.txt", "b.txt"):
            (tmp / name).write_text(name)
    assert sorted(arrived) == ["a.txt", "b.txt"] and list(folder.iterdir()) == []


def test_a_folder_that_gets_files_while_saving_into_it_is_left_alone(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    with pytest.raises(nbtune.NbtuneError, match="got other files") as info, \
            atomic_directory(folder, replaceable="run.json") as tmp:
        (tmp / "run.json").write_text("{}")
        (folder / "run.json").write_text("the user's")  # someone else, meanwhile
    assert info.value.field == "output_dir"
    assert snapshot(folder) == {"run.json": b"the user's"}


# ---------------------------------------------------------------- never over the user's files


def test_a_folder_of_the_users_files_is_refused_and_left_byte_identical(trained, tmp_path_factory):
    mine = tmp_path_factory.mktemp("mine")
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "data").mkdir()
    (mine / "data" / "train.jsonl").write_bytes(b'{"prompt": "a"}\n')
    before = snapshot(mine.parent)
    with pytest.raises(nbtune.NbtuneError, match="did not write") as info:
        trained.save(mine)
    message = one_line(info)
    assert info.value.field == "output_dir" and str(mine) in message and "new or empty folder" in message
    assert snapshot(mine.parent) == before


def test_an_output_dir_of_the_users_files_is_refused_before_anything_loads(demo_rows, tmp_path_factory,
                                                                            no_loading):
    """Said when the cell starts, as every config mistake is, not in a warning after the whole run."""
    mine = tmp_path_factory.mktemp("mine")
    (mine / "notes.txt").write_text("my notes\n")
    before = snapshot(mine.parent)
    with pytest.raises(nbtune.NbtuneError, match="already holds files nbtune did not write") as info:
        nbtune.finetune(name="mine", data=demo_rows, output_dir=str(mine), **FAST)
    assert info.value.field == "output_dir" and "new or empty folder" in one_line(info)
    assert "mine" not in nbtune.runs and snapshot(mine.parent) == before


def test_a_run_named_like_a_sweeps_folder_is_refused_before_anything_loads(demo_rows, no_loading):
    sweep = Path("runs/dates")
    (sweep / "0").mkdir(parents=True)
    (sweep / "study.db").write_bytes(b"SQLite format 3\x00")
    (sweep / "0" / "run.json").write_text('{"name": "dates/0", "status": "finished", "config": {}}')
    before = snapshot(sweep)
    with pytest.raises(nbtune.NbtuneError, match=r"holds sweep 'dates' \(its study and trials\), which saving "
                                                 r"run 'dates' there would replace; give the run another name"):
        nbtune.finetune(name="dates", data=demo_rows, **FAST)
    assert snapshot(sweep) == before and "dates" not in nbtune.runs


def test_a_run_whose_folder_gets_the_users_files_while_it_trains_keeps_them_and_says_where_to_save(
        llama_base, demo_rows, tmp_path_factory):
    """Checked again when saving: files that arrived during training are kept, the run too (a warning)."""
    mine = tmp_path_factory.mktemp("mine")

    class Intruder:
        def on_step(self, run, record):
            (mine / "notes.txt").write_text("my notes\n")

    with pytest.warns(NbtuneWarning, match="did not write"):
        run = nbtune.finetune(data=demo_rows, base=llama_base, output_dir=str(mine), observers=[Intruder()], **FAST)
    assert run.model is not None and [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_file_is_never_a_run_folder(trained, tmp_path):
    (tmp_path / "model").write_text("a file")
    with pytest.raises(nbtune.NbtuneError, match="is a file") as info:
        trained.save(tmp_path / "model")
    assert info.value.field == "output_dir" and (tmp_path / "model").read_text() == "a file"


# ---------------------------------------------------------------- symlinks


def test_a_symlink_in_place_of_the_run_folder_is_not_followed(trained, tmp_path, tmp_path_factory):
    for contents in ({}, {"run.json": b"{}", "adapter_model.safetensors": b"precious"}):
        elsewhere = tmp_path_factory.mktemp("elsewhere")
        for name, data in contents.items():
            (elsewhere / name).write_bytes(data)
        link = tmp_path / f"link{len(contents)}"
        link.symlink_to(elsewhere, target_is_directory=True)
        with pytest.raises(nbtune.NbtuneError, match="symlink") as info:
            trained.save(link)
        assert info.value.field == "output_dir" and str(elsewhere) in one_line(info)
        assert snapshot(elsewhere) == contents and link.is_symlink()


def test_a_run_json_that_is_a_symlink_does_not_make_a_folder_nbtune_s(trained, tmp_path, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "run.json").write_text("{}")
    folder = tmp_path / "posing"
    folder.mkdir()
    (folder / "run.json").symlink_to(elsewhere / "run.json")
    (folder / "thesis.tex").write_text("years of work")
    with pytest.raises(nbtune.NbtuneError, match="did not write"):
        trained.save(folder)
    assert (folder / "thesis.tex").read_text() == "years of work"


def test_replacing_a_saved_run_whose_files_link_elsewhere_never_writes_through_them(trained, tmp_path,
                                                                                     tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        (elsewhere / name).write_bytes(b"the user's " + name.encode())
    (elsewhere / "sub").mkdir()
    (elsewhere / "sub" / "keep.txt").write_text("keep")
    before = snapshot(elsewhere)
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / "run.json").write_text("{}")  # looks like a saved run, so nbtune may replace it
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "sub"):
        (folder / name).symlink_to(elsewhere / name)
    trained.save(folder)
    assert snapshot(elsewhere) == before  # neither written through nor deleted through
    assert not any(p.is_symlink() for p in folder.iterdir()) and holds_a_save(folder)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hostile")]  # the old folder is gone
