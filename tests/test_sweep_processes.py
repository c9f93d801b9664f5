"""One sweep, two processes: `nbtune sweep` started twice on the same config shares the study in its SQLite
file and runs the planned trials together, each trial once (what several machines do with a shared database,
docs/scaling.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRIALS = 6


def test_two_processes_run_one_studys_trials_together(tmp_path, tiny_model_dir, demo_rows):
    import optuna

    with (tmp_path / "train.jsonl").open("w", encoding="utf-8") as f:
        for row in demo_rows:
            f.write(json.dumps(row) + "\n")
    config = {"name": "shared", "model": str(tiny_model_dir), "data": "train.jsonl", "eval_split": 0.25,
              "steps": 2, "batch_size": 4, "metric": "none", "precision": "fp32",
              "sweep": {"lr": {"log_uniform": [1e-4, 1e-2]}, "trials": TRIALS, "sampler": "random",
                        "optimize": {"eval_loss": "min"}}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "nbtune", "sweep", "sweep.yaml", "--json"]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    mine = [set(json.loads(out)["ran_here"]) for out, _ in outputs]  # records: the whole study
    assert mine[0] and mine[1], mine  # both processes ran trials
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(range(TRIALS))  # each trial once, all of them
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'shared' / 'study.db'}")
    # Both may ask for the last place at once: the later one yields it, told FAIL with `surplus` (by design,
    # engine/experiments/sweep_study.py), which a loaded machine made happen here once. Nothing else may fail.
    shown = [(t.number, t.state.name, t.user_attrs) for t in study.trials]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == TRIALS and all(t.user_attrs.get("surplus") for t in study.trials if t not in done), shown
    assert all((tmp_path / "runs" / "shared" / str(n) / "run.json").is_file() for n in range(TRIALS))
