"""ORPO in two CPU processes counts the tokens of both ranks, as an sft run does (its batches have no
input_ids for the Trainer to count; objectives/trl_pairs.py's _PairTokens counts them and sums the ranks)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import nbtune
from nbtune.data.demo import demo_pair_splits

# the same global batch of 4 pairs, in one process or two
RUN = {"objective": "orpo", "steps": 2, "lr": 1e-2, "metric": "none", "precision": "fp32", "dropout": 0.0,
       "eval_split": 0.25, "max_length": 96, "save": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU multi-process test (gloo); see test_distributed.py")
def test_orpo_in_two_processes_counts_the_tokens_of_both(chat_tokenizer):
    pairs = demo_pair_splits()[0][:16]
    one = nbtune.finetune(data=pairs, base=(tiny_llama(chat_tokenizer), chat_tokenizer), batch_size=4, **RUN)
    two = nbtune.finetune(data=pairs, base=(tiny_llama(chat_tokenizer), chat_tokenizer), batch_size=2,
                          num_processes=2, **RUN)
    assert two.status == "finished" and two.metrics["processes"] == 2
    assert [r["tokens"] for r in two.history] == [r["tokens"] for r in one.history] and one.metrics["tokens"] > 0
    assert two.metrics["tokens_per_second"] > 0
