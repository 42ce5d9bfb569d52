"""Every config file loads, and preset shapes match the published models."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from research.models import ModelConfig, Transformer, count_params

ROOT = os.path.dirname(os.path.dirname(__file__))
CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                      if os.path.basename(p) not in ('__init__.py', 'base.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _n_params(model_cfg):
  model = Transformer(ModelConfig.from_dict(model_cfg))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  return count_params(shapes)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_file_loads_and_builds(path):
  config = _load(path).get_config()
  for key in ('stage', 'seed', 'steps', 'batch_size', 'seq_len', 'log_every', 'eval_every',
              'checkpoint_every', 'init_from', 'model', 'optimizer', 'mesh', 'data', 'lora'):
    assert key in config, key
  assert _n_params(config.model) > 0


@pytest.mark.parametrize('size,billions', [('7b', 6.74), ('8b', 8.03)])
def test_large_preset_parameter_counts(size, billions):
  from configs import pretrain
  n = _n_params(pretrain.get_config(f'size={size}').model)
  assert round(n / 1e9, 2) == billions


def test_unknown_config_argument_is_rejected():
  from configs import pretrain
  with pytest.raises(ValueError, match='sizee'):
    pretrain.get_config('sizee=tiny')
