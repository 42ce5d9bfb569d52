"""Model definitions."""
from research.models.llama import ModelConfig, Transformer, count_params, init_cache

__all__ = ['ModelConfig', 'Transformer', 'count_params', 'init_cache']
