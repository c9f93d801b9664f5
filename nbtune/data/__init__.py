"""Rows in: loading from files, frames and datasets (`loading.py`, read first), formats detected and turned
into chat messages (`formats.py`), the chat template and answer-only labels (`tokenize.py`), held-out splits
and folds (`splits.py`), preference rows (`preference.py`), the shipped demo task (`demo.py`), and a batch
shown token by token (`preview.py`: the data classes and their text; each objective builds its own).

May import: datasets, transformers' tokenizers, nbtune.config, nbtune.errors. Never the engine.
"""

from nbtune.data.formats import detect_format, to_messages
from nbtune.data.loading import load_records
from nbtune.data.tokenize import prepare_tokenizer, prompts_and_answers, tokenize_dataset

__all__ = ["detect_format", "load_records", "prepare_tokenizer", "prompts_and_answers", "to_messages",
           "tokenize_dataset"]
