"""Interoperability with other checkpoint formats (HuggingFace)."""
