"""The engine end to end on tiny random models: training, history, events, stop, seeds, generation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import finetune_interrupted

import nbtune
from nbtune.engine.training.events import NullObserver

FAST = {"steps": 6, "batch_size": 4, "lr": 1e-2, "metric": "none", "output_dir": "out"}


class Recorder(NullObserver):
    def __init__(self, stop_at: int | None = None, raise_at: int | None = None, fail: bool = False):
        self.events: list[str] = []
        self.records: list[dict] = []
        self.stop_at, self.raise_at, self.fail = stop_at, raise_at, fail

    def on_run_start(self, run):
        self.events.append("start")

    def on_step(self, run, record):
        self.events.append("step")
        self.records.append(dict(record))
        if self.fail:
            raise ValueError("broken display")
        if record["step"] == self.stop_at:
            run.stop()
        if record["step"] == self.raise_at:
            raise KeyboardInterrupt

    def on_log(self, run, logs):
        self.events.append("log")

    def on_eval(self, run, metrics):
        self.events.append("eval")

    def on_run_end(self, run):
        self.events.append("end")


def test_lora_learns_and_records_every_step(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, **{**FAST, "steps": 10})
    assert run.status == "finished"
    assert [r["step"] for r in run.history] == list(range(1, 11))
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_second", "rss_mb", "elapsed_seconds"):
        assert key in run.history[-1], key
    losses = [r["loss"] for r in run.history]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert run.metrics["trainable_params"] == trainable > 0
    assert 0 < run.metrics["trainable_percent"] < 100
    for key in ("total_params", "train_seconds", "tokens_per_second", "peak_rss_mb", "train_loss", "steps"):
        assert run.metrics[key], key
    assert list(run.history.df.columns[:2]) == ["step", "epoch"]
    assert "lora" in repr(run) and "finished" in repr(run)


def test_loss_names_have_one_meaning_each(llama_base, demo_rows):
    """`train_loss` is the mean over the run, as the Trainer (and TensorBoard) report it; the last step's
    loss is `last_loss`, the mean of the last 10% of steps `final_loss`."""
    run = nbtune.finetune(data=demo_rows, base=llama_base, **{**FAST, "steps": 10})
    losses = [r["loss"] for r in run.history]
    m = run.metrics
    assert m["train_loss"] == pytest.approx(sum(losses) / len(losses))
    assert m["last_loss"] == losses[-1] and m["first_loss"] == losses[0]
    assert m["final_loss"] == pytest.approx(losses[-1])  # 10% of 10 steps: the last one
    assert m["train_loss"] != pytest.approx(m["last_loss"])  # a learning run: the two differ
    assert "train_loss_mean" not in m


def test_final_loss_smooths_over_the_last_tenth_of_the_steps():
    from nbtune.engine.training.callbacks import loss_summary

    history = [{"step": i, "loss": float(i)} for i in range(1, 41)] + [{"step": 41, "loss": float("nan")}]
    summary = loss_summary(history)
    assert summary["final_loss"] == pytest.approx((37 + 38 + 39 + 40) / 4)  # 4 of 40 finite steps
    assert summary["train_loss"] == pytest.approx(20.5) and summary["last_loss"] == 40.0
    assert loss_summary([])["train_loss"] is None


def test_events_arrive_in_order(llama_base, demo_rows):
    recorder = Recorder()
    run = nbtune.finetune(data=demo_rows, base=llama_base, eval_split=0.25, eval_steps=3, observers=[recorder],
                          **FAST)
    assert recorder.events[0] == "start" and recorder.events[-1] == "end"
    assert recorder.events.count("step") == 6
    assert recorder.events.count("eval") == 3  # steps 3 and 6, then the final evaluation
    assert all("loss" in r for r in recorder.records)
    assert [e["step"] for e in run.eval_history] == [3, 6, 6]
    assert run.metrics["eval_loss"] == pytest.approx(run.eval_history[-1]["eval_loss"])


def test_stop_request_ends_after_the_current_step_and_keeps_the_adapter(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, observers=[Recorder(stop_at=3)], **FAST)
    assert run.status == "stopped"
    assert len(run.history) == 3
    assert (run.saved_to / "adapter_model.safetensors").is_file()
    assert json.loads((run.saved_to / "run.json").read_text())["status"] == "stopped"


def test_keyboard_interrupt_marks_the_run_stopped_and_keeps_it(llama_base, demo_rows):
    run = finetune_interrupted(data=demo_rows, base=llama_base, observers=[Recorder(raise_at=2)], **FAST)
    assert run.status == "stopped"
    assert run.model is not None
    assert isinstance(run.generate("hello", max_new_tokens=2), str)


def test_a_failing_observer_warns_but_training_goes_on(llama_base, demo_rows):
    with pytest.warns(UserWarning, match="broken display"):
        run = nbtune.finetune(data=demo_rows, base=llama_base, observers=[Recorder(fail=True)], **FAST)
    assert run.status == "finished" and len(run.history) == 6


def test_same_seed_gives_the_same_loss_curve(chat_tokenizer, demo_rows):
    from conftest import tiny_llama

    curves = []
    for _ in range(2):
        run = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), seed=7, **FAST)
        curves.append([r["loss"] for r in run.history])
    assert curves[0] == curves[1]
    other = nbtune.finetune(data=demo_rows, base=(tiny_llama(chat_tokenizer), chat_tokenizer), seed=8, **FAST)
    assert [r["loss"] for r in other.history] != curves[0]


def test_generate_takes_a_string_messages_or_a_list(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, **FAST)
    mode = run.model.training
    one = run.generate("Convert this date to ISO format (YYYY-MM-DD): 1 May 2000", max_new_tokens=3)
    chat = run.generate([{"role": "user", "content": "hello"}], max_new_tokens=3)
    many = run.generate(["a", "b", "c"], max_new_tokens=3)
    assert isinstance(one, str) and isinstance(chat, str)
    assert isinstance(many, list) and len(many) == 3
    assert run.model.training == mode  # generate switches to eval mode and back
    assert run.generate(["a", "b", "c"], max_new_tokens=3) == many  # greedy is deterministic


def test_evaluate_scores_exact_match_with_and_without_the_adapter(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, eval_data=demo_rows[:8], base=llama_base, **FAST)
    scored = run.evaluate()
    base = run.evaluate(use_adapter=False)
    assert scored["samples"] == 8 and 0.0 <= scored["exact_match"] <= 1.0
    assert 0.0 <= base["base_exact_match"] <= 1.0


def test_metric_auto_scores_the_demo_task(llama_base):
    run = nbtune.finetune(data="demo", base=llama_base, metric="auto", metric_samples=4,
                          **{k: v for k, v in FAST.items() if k != "metric"})
    assert run.metrics["samples"] == 4 and "exact_match" in run.metrics
    assert "eval_loss" in run.metrics  # the demo's held-out split is the default eval data


def test_gpt2_without_chat_template_trains_with_the_fallback_template(gpt2_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=gpt2_base, **FAST)
    assert run.status == "finished"
    assert "Assistant:" in run.tokenizer.chat_template
    assert run.tokenizer.pad_token is not None
    saved = json.loads((run.saved_to / "tokenizer_config.json").read_text())
    assert "Assistant:" in saved.get("chat_template", "") or (run.saved_to / "chat_template.jinja").is_file()


def test_errors_in_config_or_data_come_before_any_model_is_loaded():
    # The model does not exist either: a DataError (not a ModelError) proves the order.
    with pytest.raises(nbtune.DataError, match=r"missing\.jsonl"):
        nbtune.finetune(model="./no/such/model", data="missing.jsonl")
    with pytest.raises(nbtune.ConfigError, match="Did you mean `r`"):
        nbtune.finetune(model="./no/such/model", rr=4)


def test_target_modules_matching_nothing_lists_the_real_names(llama_base, demo_rows):
    with pytest.raises(nbtune.MethodError, match="q_proj") as info:
        nbtune.finetune(data=demo_rows, base=llama_base, target_modules=["query"], **FAST)
    assert info.value.field == "target_modules"


def test_a_failed_run_raises_and_reports_to_observers(llama_base, demo_rows):
    class Seen(NullObserver):
        error = None

        def on_error(self, run, error):
            Seen.error = (run.status, error)

    with pytest.raises(nbtune.MethodError):
        nbtune.finetune(data=demo_rows, base=llama_base, target_modules=["nothing"], observers=[Seen()], **FAST)
    assert Seen.error[0] == "failed"


def test_history_records_memory_and_throughput(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows, base=llama_base, **FAST)
    assert all(r["rss_mb"] > 50 for r in run.history)
    assert all(r["tokens"] > 0 and r["tokens_per_second"] > 0 for r in run.history)
    assert run.metrics["peak_rss_mb"] >= max(r["rss_mb"] for r in run.history) - 1
    assert run.metrics["tokens"] == sum(r["tokens"] for r in run.history)


def test_epochs_set_the_number_of_steps(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows[:16], base=llama_base, epochs=2, batch_size=4, grad_accum=2, lr=1e-2,
                          metric="none", output_dir="out")
    assert run.total_steps == 4 and len(run.history) == 4
    assert torch.isfinite(torch.tensor(run.metrics["train_loss"]))


def test_a_base_already_trained_by_a_run_is_refused(llama_base, demo_rows):
    nbtune.finetune(data=demo_rows, base=llama_base, **FAST)
    with pytest.raises(nbtune.NbtuneError, match="Load a fresh base"):
        nbtune.finetune(data=demo_rows, base=llama_base, **FAST)


def test_a_quantization_the_callers_base_does_not_have_is_refused(llama_base, demo_rows):
    with pytest.raises(nbtune.ConfigError, match="not quantized"):
        nbtune.finetune(data=demo_rows, base=llama_base, method="qlora", **FAST)


def test_the_step_count_rounds_up_a_last_partial_accumulation(llama_base, demo_rows):
    run = nbtune.finetune(data=demo_rows[:10], base=llama_base, epochs=1, batch_size=4, grad_accum=2, lr=1e-2,
                          metric="none", save=False)
    assert len(run.history) == run.total_steps == 2
    assert run.context.total_steps == 2  # what AdaLoRA would schedule on


@pytest.mark.parametrize(("settings", "match"), [
    ({"data": "demo", "eval_split": 0.1}, "eval_split"),
    ({"eval_split": 0.01}, "holds out 0"),
    ({"metric": "exact_match"}, "metric"),
    ({"eval_steps": 2}, "eval_steps"),
])
def test_settings_that_would_be_silently_ignored_are_refused(llama_base, demo_rows, settings, match):
    settings = {"data": demo_rows, **settings}
    with pytest.raises(nbtune.NbtuneError, match=match):
        nbtune.finetune(base=llama_base, **{**FAST, **settings})


def test_edits_to_a_parsed_config_are_honoured(llama_base, demo_rows):
    config = nbtune.RunConfig.parse({"data": demo_rows, "metric": "none", "save": False, "batch_size": 4})
    config = config.with_changes(steps=2, lr=5e-3)  # a parsed config is frozen: an edit is another config
    run = nbtune.finetune(config, base=llama_base)
    assert len(run.history) == 2 and run.history[0]["lr"] == pytest.approx(5e-3)
    assert run.name == config.name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_stopped_run_resumes_exactly_where_it_stopped(chat_tokenizer, demo_rows, precision):
    from conftest import tiny_llama

    settings = {"data": demo_rows, "steps": 8, "batch_size": 4, "lr": 1e-2, "metric": "none", "save": False,
                "precision": precision}
    whole = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), **settings)
    part = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), observers=[Recorder(stop_at=3)],
                           **settings)
    assert part.status == "stopped" and len(part.history) == 3
    part.resume()
    assert part.status == "finished"
    assert [r["loss"] for r in part.history] == [r["loss"] for r in whole.history]
    for (name, a), b in zip(part.model.named_parameters(), whole.model.parameters(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(nbtune.NbtuneError, match="only a stopped run"):
        part.resume()


def test_a_run_stopped_in_a_later_epoch_resumes_on_the_same_rows(chat_tokenizer, demo_rows):
    """32 rows at batch 8: 4 steps an epoch; stopped at step 6, in the second epoch. The epoch's order must
    not depend on what drew random numbers before the resume (it did: the losses parted at step 7)."""
    from conftest import tiny_llama

    settings = {"data": demo_rows, "steps": 10, "batch_size": 8, "lr": 1e-2, "metric": "none", "save": False,
                "precision": "fp32"}  # LoRA's default dropout on: the RNG is used in every step
    whole = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), **settings)
    part = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), observers=[Recorder(stop_at=6)],
                           **settings)
    assert part.status == "stopped" and len(part.history) == 6
    part.resume()
    assert [r["loss"] for r in part.history] == [r["loss"] for r in whole.history]


def test_evaluating_during_training_does_not_change_what_it_trains_on(chat_tokenizer, demo_rows):
    from conftest import tiny_llama

    settings = {"data": demo_rows, "eval_split": 0.25, "steps": 8, "batch_size": 8, "lr": 1e-2, "metric": "none",
                "save": False, "precision": "fp32"}
    quiet = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), **settings)
    watched = nbtune.finetune(base=(tiny_llama(chat_tokenizer), chat_tokenizer), eval_steps=2, **settings)
    assert len(watched.eval_history) == 5  # steps 2, 4, 6, 8 and the final one
    assert [r["loss"] for r in watched.history] == [r["loss"] for r in quiet.history]


def test_an_interrupted_run_can_resume_too(llama_base, demo_rows):
    run = finetune_interrupted(data=demo_rows, base=llama_base, observers=[Recorder(raise_at=2)], steps=5,
                               batch_size=4, lr=1e-2, metric="none", save=False)
    assert run.status == "stopped" and len(run.history) == 2
    assert run.resume().status == "finished" and len(run.history) == 5


def test_training_leaves_older_objects_out_of_collections_and_collects_them_after(llama_base, demo_rows):
    import gc
    import weakref

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # only the cycle collector can free it
    gone = weakref.ref(garbage)
    del garbage
    frozen_during: list[int] = []

    class Watch(NullObserver):
        def on_step(self, run, record):
            frozen_during.append(gc.get_freeze_count())

    frozen_before = gc.get_freeze_count()  # another library may keep objects frozen; none of ours may stay
    gc.disable()  # no automatic collection may free the cycle before the run's own
    try:
        nbtune.finetune(data=demo_rows, base=llama_base, observers=[Watch()], **{**FAST, "steps": 2})
    finally:
        gc.enable()
    assert min(frozen_during) > 1000  # the heap as it was before training: skipped by accelerate's collect
    assert gc.get_freeze_count() == frozen_before  # and back to normal afterwards
    assert gone() is None  # the run's end collected what was garbage before it


def test_one_observer_alone_and_a_wrong_prompt_are_understood(llama_base, demo_rows):
    steps = []

    class Count(NullObserver):
        def on_step(self, run, record):
            steps.append(record["step"])

    run = nbtune.finetune(data=demo_rows, base=llama_base, observers=Count(), **{**FAST, "steps": 2})
    assert steps == [1, 2]
    with pytest.raises(nbtune.NbtuneError, match="a prompt is a string or a list of chat messages"):
        run.generate(42)
    with pytest.raises(nbtune.NbtuneError, match="a prompt is a string"):
        run.generate([["not", "messages"]])
