"""Tokenizer, data sources (TFDS builders) and grain pipelines."""
