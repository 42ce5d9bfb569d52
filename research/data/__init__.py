"""Tokenizer, data sources (TFDS builders, one registry of names), grain
pipelines, and the renderers from rows to arrays: chat template, SFT
examples, preference pairs."""
