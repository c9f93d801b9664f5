"""The run record and its folder.

    run.py         `Run`: one run's state (config, status, history, metrics, the model it holds)
    run_folder.py  a run folder's run.json, its one owner: the schema (versioned in the file), writing, reading,
                   checking and upgrading older files; `Run.to_dict` / `Run.from_dict` are its wrappers
    saving.py      atomic folder writes that never overwrite what nbtune did not write
    reopen.py      `nbtune.load`: a saved run back on its base model
    history.py     `nbtune.history()`: the runs saved under a folder; saved runs as records for compare
    provenance.py  what repeating a run takes, recorded in run.json

No module here opens a run.json but run_folder.py, which imports only down (nbtune.config, nbtune.methods,
records/saving.py, evaluation/predictions.py and metrics.py), never records/run.py, the training pipeline, the
api or the widgets.
"""
