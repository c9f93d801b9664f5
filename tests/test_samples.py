"""Sample answers while training (`sample_every`): recorded, shown in the panel and its snapshot, saved,
refused without prompts, and invisible to training itself."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import nbtune
from nbtune.config import RunConfig
from nbtune.engine.evaluation.samples import (
    UNKNOWN_LENGTH,
    answer_budget,
    check_sample_prompts,
    sample_prompts_for,
    training_untouched,
)
from nbtune.engine.training.events import NullObserver, ProgressObserver, sample_line
from nbtune.errors import ConfigError
from nbtune.widgets import render

TINY = dict(steps=4, batch_size=4, metric="none", save=False)


class Rounds(NullObserver):
    """Keeps each on_samples event."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, list[dict]]] = []

    def on_samples(self, run, step, records):
        self.rounds.append((step, records))


def _losses(run):
    return [(r["loss"], r["grad_norm"]) for r in run.history]


def _time_left_out(run):
    """Seconds of the run's wall time not counted in any step's time (RunCallback.leave_out)."""
    return run.history[-1]["elapsed_seconds"] - sum(r["step_seconds"] for r in run.history)


# ---------------------------------------------------------------- a real run
def test_a_run_answers_the_first_three_eval_prompts_every_n_steps_and_the_panel_shows_them(llama_base, demo_rows):
    from nbtune.widgets.panel import LivePanel

    rounds, panel = Rounds(), LivePanel(interactive_stop=False, min_interval=0.0)
    run = nbtune.finetune(data=demo_rows, eval_split=0.25, base=llama_base, sample_every=2, observers=[rounds, panel],
                          **TINY)
    eval_prompts = [messages[-1]["content"] for messages, _ in run.eval_pairs[:3]]
    assert [r["step"] for r in run.samples] == [2, 2, 2, 4, 4, 4]
    assert [r["prompt"] for r in run.samples] == eval_prompts * 2  # one user turn is kept as its text
    assert all(isinstance(r["answer"], str) for r in run.samples)
    assert [step for step, _ in rounds.rounds] == [2, 4] and rounds.rounds[1][1] == run.samples[3:]
    latest = run.samples[-1]["answer"]
    assert "nbtune-samples" in panel.samples.value and render._text(latest, 160) in panel.samples.value
    snapshot = panel.snapshot()
    assert "answers by step" in snapshot and render._text(latest, 160) in snapshot


def test_sample_prompts_are_answered_at_every_nth_and_the_last_step_and_saved_with_the_run(llama_base, demo_rows,
                                                                                          tmp_path):
    prompts = ["What is 2+2?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    run = nbtune.finetune(data=demo_rows, base=llama_base, sample_every=3, sample_prompts=prompts,
                          **{**TINY, "save": True, "output_dir": str(tmp_path / "out")})
    assert [r["step"] for r in run.samples] == [3, 3, 4, 4]  # 4 is the last step
    assert [r["prompt"] for r in run.samples[:2]] == prompts  # chat messages beyond one user turn stay messages
    loaded = nbtune.load(run.saved_to, base=(tiny_llama(llama_base[1]), llama_base[1]))
    assert loaded.samples == run.samples
    assert "answers by step" in render.snapshot_html(loaded, {})


# ---------------------------------------------------------------- training is untouched
def test_sampling_does_not_change_training(llama_base, demo_rows):
    settings = dict(data=demo_rows, eval_split=0.25, precision="fp32", seed=3, **TINY)
    plain = nbtune.finetune(base=llama_base, name="plain", **settings)
    sampled = nbtune.finetune(base=(tiny_llama(llama_base[1]), llama_base[1]), name="sampled", sample_every=1,
                              **settings)
    assert len(sampled.samples) == 4 * 3
    assert _losses(sampled) == _losses(plain)  # bit-identical, not approximately equal
    assert _time_left_out(plain) == pytest.approx(0, abs=1e-6) and _time_left_out(sampled) > 0  # not step time


def test_neftune_and_gradient_checkpointing_do_not_break_sampling_nor_change_training(llama_base, demo_rows):
    settings = dict(data=demo_rows, eval_split=0.25, precision="fp32", neftune_alpha=5.0,
                    gradient_checkpointing=True, dropout=0.1, **TINY)
    plain = nbtune.finetune(base=llama_base, name="plain", **settings)
    sampled = nbtune.finetune(base=(tiny_llama(llama_base[1]), llama_base[1]), name="sampled", sample_every=2,
                              **settings)
    assert [r["step"] for r in sampled.samples] == [2, 2, 2, 4, 4, 4]
    assert _losses(sampled) == _losses(plain)


def test_training_untouched_restores_module_modes_and_random_state(llama_base):
    model = llama_base[0]
    model.train()
    model.model.layers[0].eval()  # a module a method keeps in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    state = torch.random.get_rng_state()
    with training_untouched(model):
        model.eval()
        torch.rand(100)  # a draw generation might make
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(torch.random.get_rng_state(), state)


# ---------------------------------------------------------------- prompts and answer length
def test_sample_every_without_prompts_is_refused_before_the_run_exists(llama_base, demo_rows):
    with pytest.raises(ConfigError, match="sample_every") as info:
        nbtune.finetune(data=demo_rows, base=llama_base, sample_every=2, name="no-prompts", **TINY)
    assert info.value.field == "sample_every" and "\n" not in str(info.value)
    assert "no-prompts" not in nbtune.runs  # refused in start_run, before any weights


def test_check_sample_prompts():
    from datasets import Dataset

    answered = Dataset.from_list([{"prompt": "a", "completion": "b"}])
    plain_text = Dataset.from_list([{"text": "a b"}])
    off = RunConfig.parse(data="demo")
    asked = RunConfig.parse(data="demo", sample_every=5)
    given = RunConfig.parse(data="demo", sample_every=5, sample_prompts="Hi")
    check_sample_prompts(off, None, "prompt_completion")
    check_sample_prompts(given, None, "text")
    check_sample_prompts(asked, answered, "prompt_completion")
    with pytest.raises(ConfigError, match="no eval data") as info:
        check_sample_prompts(asked, None, "prompt_completion")
    assert info.value.field == "sample_every"
    with pytest.raises(ConfigError, match="eval rows have no answers"):
        check_sample_prompts(asked, plain_text, "text")


def test_prompts_and_answer_length(chat_tokenizer):
    pairs = [([{"role": "user", "content": f"q{i}"}], "x " * i) for i in range(1, 6)]
    config = RunConfig.parse(data="demo", sample_every=5)
    assert sample_prompts_for(config, pairs) == [p for p, _ in pairs[:3]]
    assert sample_prompts_for(RunConfig.parse(data="demo", sample_prompts="Hi"), pairs) == ["Hi"]
    longest = len(chat_tokenizer("x " * 5, add_special_tokens=False)["input_ids"])
    assert answer_budget(chat_tokenizer, pairs, scored=64) == longest + 4
    assert answer_budget(chat_tokenizer, [], scored=64) == UNKNOWN_LENGTH


# ---------------------------------------------------------------- views
def _records(step, answers, prompts=("p1", [{"role": "user", "content": "p2"}])):
    return [{"step": step, "prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]


def test_the_panel_shows_the_latest_answers_and_the_ones_before():
    from nbtune.widgets.panel import LivePanel

    class FakeRun:
        name, total_steps, history, eval_history, model, samples, status = "r", 10, [], [], None, [], "running"
        metrics, error = {}, None
        method = nbtune.methods("lora")

    run, panel = FakeRun(), LivePanel(interactive_stop=False)
    panel.on_run_start(run)
    assert panel.samples.value == ""
    for step, answers in ((2, ["old", "<b>same</b>"]), (4, ["new", "<b>same</b>"])):
        records = _records(step, answers)
        run.samples.extend(records)
        panel.on_samples(run, step, records)
    shown = panel.samples.value
    assert "new" in shown and "step 2:</span> old" in shown and "p2" in shown
    assert "<b>same</b>" not in shown and "&lt;b&gt;same&lt;/b&gt;" in shown  # escaped
    snapshot = render.snapshot_html(run, {})
    assert "steps 2-4: &lt;b&gt;same" in snapshot and "step 2: old" in snapshot and "step 4: new" in snapshot
    assert "<script" not in snapshot


def test_a_panel_keeps_answers_a_run_does_not_hold():
    from nbtune.widgets.panel import LivePanel

    class ForwardedRun:  # the kernel's copy of a run trained in other processes
        samples: list = []

    panel = LivePanel(interactive_stop=False)
    panel.on_samples(ForwardedRun(), 2, _records(2, ["a", "b"]))
    panel.on_samples(ForwardedRun(), 4, _records(4, ["c", "d"]))
    assert "step 2:</span> a" in panel.samples.value


def test_long_text_is_cut_with_the_whole_in_a_tooltip():
    table = render.samples_table([{"step": 1, "prompt": "p", "answer": "y" * 500 + "'"}])
    assert "y" * 500 not in table.split("title=")[0] and "…" in table and "&#x27;" in table


def test_the_progress_bar_prints_each_answer_on_a_line(capsys):
    ProgressObserver().on_samples(None, 2, _records(2, ["a\nb", "c"]))
    out = capsys.readouterr()
    assert "step 2 · p1 -> a b" in out.out + out.err and "step 2 · p2 -> c" in out.out + out.err
    assert sample_line({"step": 1, "prompt": "q" * 100, "answer": "a"}, width=10) == "step 1 · qqqqqqqqq… -> a"
