"""The bad-input catalogue (issue 8, item 6): malformed cells and configs, each one clear line naming the
field, within a second, with no traceback, and every earlier run intact. Run through the real magic in a
real InteractiveShell, the way a notebook user meets them."""

from __future__ import annotations

import time

import pytest
from conftest import nbtune_shell

BASE = "data: {{ rows }}\nsteps: 2\nbatch_size: 4\nmetric: none\nsave: false\n"

CATALOGUE = [
    # syntax
    ("method: [lora", "not valid YAML"),
    ("- a\n- b", "key: value"),
    ("method: lora\n  r: 4", "not valid YAML"),
    ("\tmethod: lora", "not valid YAML"),
    ("steps: 3: 4", "not valid YAML"),
    # types
    ("steps: ten", "steps"),
    ("lr: fast", "lr"),
    ("batch_size: 4.5", "batch_size"),
    ("r: [8]", "`r`"),
    ("save: maybe", "save"),
    ("max_length: 1.5", "max_length"),
    ("eval_split: abc", "eval_split"),
    ("target_modules: 5", "target_modules"),
    ("dropout: high", "dropout"),
    ("train_on_prompt: 3", "train_on_prompt"),
    # ranges
    ("steps: 0", "steps"),
    ("lr: -1e-4", "lr"),
    ("lr: 5", "lr"),
    ("batch_size: 0", "batch_size"),
    ("grad_accum: 0", "grad_accum"),
    ("r: 0", "`r`"),
    ("dropout: 1.5", "dropout"),
    ("eval_split: 0.9", "eval_split"),
    ("max_length: 4", "max_length"),
    ("warmup_steps: -3", "warmup_steps"),
    ("weight_decay: 2", "weight_decay"),
    ("epochs: 0", "epochs"),
    ("keep_checkpoints: 0", "keep_checkpoints"),
    ("neftune_alpha: -5", "neftune_alpha"),
    ("seed: -1", "seed"),
    # unknown keys and methods
    ("rr: 4", "Did you mean `r`?"),
    ("method: lorax", "lora"),
    ("method: ''", "method"),
    ("precision: fp8", "precision"),
    ("format: xml", "format"),
    ("lr_scheduler: wavy", "lr_scheduler"),
    ("quantization: 2bit", "quantization"),
    ("on_nonfinite: ignore", "on_nonfinite"),
    # missing, empty or wrong data
    ("data: missing.jsonl", "missing.jsonl"),
    ("data: ''", "`data`"),
    ("data: {{ empty }}", "data"),
    ("data: {{ wrong_columns }}", "data"),
    ("data: {{ not_rows }}", "data"),
    ("data: {{ missing_variable }}", "no variable 'missing_variable'"),
    # conflicting options
    ("steps: 3\nepochs: 1", "either `steps` or `epochs`"),
    ("method: full\nquantization: 4bit", "quantization"),
    ("eval_split: 0.1\neval_data: {{ rows }}", "eval_split"),
    ("metric: exact_match", "metric"),
    ("eval_steps: 2", "eval_steps"),
    # absurd sizes
    ("max_length: 100000000", "max_length"),
    ("batch_size: 100000", "batch_size"),
    # hostile
    ("output_dir: .", "output_dir"),  # names no folder (any other folder, outside the notebook's too, is fine)
    ("output_dir: /", "output_dir"),
    ("eval_data: missing.csv", "missing.csv"),
    ("data: {{ __import__('os').system('echo hi') }}", "plain variable name"),
    ("data: !!python/object/apply:os.system ['echo hi']", "not valid YAML"),
]


def cell_for(body: str) -> str:
    """The bad lines plus the base settings they do not themselves set (a YAML key given twice would
    silently take the last value)."""
    if body.startswith("- "):
        return body  # a YAML list: what the message is about
    given = {line.split(":", 1)[0].strip() for line in body.splitlines() if ":" in line}
    return body + "\n" + "".join(line + "\n" for line in BASE.splitlines() if line.split(":")[0] not in given)


@pytest.fixture(scope="module")
def shell(tiny_model_dir, tmp_path_factory):
    from nbtune.data.demo import demo_splits

    with pytest.MonkeyPatch.context() as patch, nbtune_shell(
            tiny_model_dir, rows=demo_splits()[0][:16], empty=[], wrong_columns=[{"question": "a", "reply": "b"}],
            not_rows=42) as ip:
        patch.chdir(tmp_path_factory.mktemp("bad-inputs"))
        kept = ip.run_cell_magic("finetune", "kept --no-panel", BASE)
        yield ip, kept


def test_the_catalogue_is_big_enough():
    assert len(CATALOGUE) >= 40


@pytest.mark.parametrize(("body", "names"), CATALOGUE, ids=[c[0][:40] for c in CATALOGUE])
def test_each_bad_input_is_one_clear_line_within_a_second(shell, capsys, body, names):
    import nbtune.engine.workbench as wb

    ip, kept = shell
    wb.WORKBENCH.runs.pop("broken", None)  # a case that wrongly trained must not fail the ones after it
    capsys.readouterr()
    started = time.perf_counter()
    result = ip.run_cell("%%finetune broken --no-panel\n" + cell_for(body))
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err.strip()
    assert not result.success and elapsed < 1.0, elapsed  # the cell fails: "Run all" stops there
    assert names in err, err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert wb.WORKBENCH.runs["kept"] is kept and kept.status == "finished" and "broken" not in wb.WORKBENCH.runs
