"""`report_to`: a run's losses reach the experiment trackers transformers integrates, read back here through
each tracker's own reader; bad tracker names and missing packages are one-line errors.

Both trackers tried write local files only: TensorBoard into `<output_dir>-logs`, trackio into TRACKIO_DIR.
"""

from __future__ import annotations

import json
import sys

import pytest

import nbtune
from nbtune import ConfigError, DependencyError, RunConfig

FAST = {"steps": 3, "batch_size": 4, "metric": "none", "save": False}


def _losses(run):
    return [(record["step"], pytest.approx(record["loss"], rel=1e-6)) for record in run.history]


def test_tensorboard_gets_every_steps_loss_and_the_run_config(llama_base, demo_rows, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    run = nbtune.finetune(data=demo_rows, base=llama_base, report_to="tensorboard", name="boarded",
                          output_dir=str(tmp_path / "out"), **{**FAST, "save": True})

    logs = tmp_path / "out-logs"  # beside the output folder, never inside it (a save replaces that whole)
    assert (tmp_path / "out" / "run.json").is_file()
    assert not list((tmp_path / "out").rglob("events.out.tfevents*"))
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = [(event.step, event.value) for event in events.Scalars("train/loss")]
    assert len(run.history) == 3 and logged == _losses(run)
    assert [e.step for e in events.Scalars("train/learning_rate")] == [1, 2, 3]

    def text(tag):
        return tensor_util.make_ndarray(events.Tensors(f"{tag}/text_summary")[0].tensor_proto).item().decode()

    args = json.loads(text("args"))  # transformers' own: the TrainingArguments
    assert args["run_name"] == "boarded" and args["max_steps"] == 3
    ours = json.loads(text("nbtune_config"))  # nbtune's RunConfig, indented as a markdown code block
    assert ours["method"] == "lora" and ours["data"] == "<list>" and ours["report_to"] == "tensorboard"
    assert ours["lr"] == run.config.lr


def test_trackio_gets_every_steps_loss_and_the_run_config_offline(llama_base, demo_rows, tmp_path, monkeypatch):
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    # trackio reads TRACKIO_DIR once, when imported: point every module's copy at this test's folder.
    where = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(where))
    for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "trackio"]:
        if hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", where)
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)
    monkeypatch.delenv("TRACKIO_SERVER_URL", raising=False)

    run = nbtune.finetune(data=demo_rows, base=llama_base, report_to=["trackio"], name="tracked",
                          output_dir=str(tmp_path / "out"), **FAST)

    assert list(where.glob("nbtune*")), "trackio wrote nothing into TRACKIO_DIR"
    (logged_run,) = trackio.Api().runs("nbtune")  # the project nbtune logs to; the run by its name
    assert logged_run.name == "tracked"
    assert logged_run.config["nbtune/method"] == "lora" and logged_run.config["run_name"] == "tracked"
    logs = SQLiteStorage.get_logs("nbtune", "tracked")  # what `trackio get metric` reads
    # transformers logs each step under trackio's own step counter, with the Trainer's step beside it
    logged = [(entry["train/global_step"], entry["train/loss"]) for entry in logs if "train/loss" in entry]
    assert logged == _losses(run)


def test_report_to_takes_one_name_a_list_or_none_and_writes_back_as_it_reads():
    assert RunConfig.parse({}).report_to == "none"
    assert RunConfig.parse({"report_to": "TensorBoard"}).report_to == "tensorboard"
    assert RunConfig.parse({"report_to": ["tensorboard"]}).report_to == "tensorboard"
    assert RunConfig.parse({"report_to": "tensorboard, trackio"}).report_to == ["tensorboard", "trackio"]
    assert RunConfig.parse({"report_to": []}).report_to == "none"
    config = RunConfig.parse({"name": "both", "report_to": ["trackio", "tensorboard"], "steps": 1})
    assert RunConfig.parse(config.to_text()) == config
    assert "report_to" not in RunConfig.parse({"name": "plain", "steps": 1}).to_text(omit=("defaults", "derived"))


@pytest.mark.parametrize(("value", "needles"), [
    ("tensorbord", ["`report_to`", "'tensorbord'", "Did you mean `tensorboard`?"]),
    ("comet-ml", ["Did you mean `comet_ml`?"]),
    (["tensorboard", "mlfow"], ["'mlfow'", "Did you mean `mlflow`?"]),
    (["none", "tensorboard"], ["'all' and 'none' stand alone"]),
    (3, ["`report_to` must be a name or a list of names"]),
])
def test_an_unknown_tracker_is_one_line_naming_the_field_and_the_fix(value, needles):
    with pytest.raises(ConfigError) as info:
        RunConfig.parse({"report_to": value})
    message = str(info.value)
    assert info.value.field == "report_to" and "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_a_tracker_whose_package_is_missing_is_refused_before_training(llama_base, demo_rows, monkeypatch):
    from transformers.integrations import integration_utils

    # As if neither package were installed: transformers' own checks are what nbtune asks.
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(integration_utils, "is_comet_available", lambda: False)
    with pytest.raises(DependencyError) as info:
        nbtune.finetune(data=demo_rows, base=llama_base, report_to=["tensorboard", "wandb"], name="untracked",
                        **FAST)
    message = str(info.value)
    assert info.value.field == "report_to" and "\n" not in message
    assert "`report_to: wandb`" in message and "pip install wandb" in message
    assert "untracked" not in nbtune.runs  # nothing trained: the kernel's runs are as they were

    from nbtune.engine.training.trainer import check_trackers_installed

    with pytest.raises(DependencyError, match="pip install comet-ml"):  # the package's name, not the tracker's
        check_trackers_installed("comet_ml")
