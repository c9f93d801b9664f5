"""Data: loading (`datasets`), format detection, chat templating and answer-only tokenisation."""

from nbtune.data.formats import detect_format, to_messages
from nbtune.data.loading import load_records
from nbtune.data.tokenize import prepare_tokenizer, prompts_and_answers, tokenize_dataset

__all__ = ["detect_format", "load_records", "prepare_tokenizer", "prompts_and_answers", "to_messages",
           "tokenize_dataset"]
