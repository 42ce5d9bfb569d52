"""Experiment configs: one `get_config(arg)` file per stage (see base.py)."""
