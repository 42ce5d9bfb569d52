"""LoRA: zero-init, frozen base, merge, parameter and checkpoint sizes."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_trainer, train
from research import lora
from research.models import LoraConfig
from research.models.llama import Config, Model
from research.training import checkpoint as ckpt_lib
from research.training import init

BASE = Config(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.mark.parametrize('scan', [False, True])
def test_zero_init_then_merge_equals_adapters(scan):
  cfg = dataclasses.replace(BASE, scan_layers=scan)
  adapters_cfg = LoraConfig(rank=4, alpha=8.0, targets=lora.TARGET_PRESETS['all_linear'], rslora=scan)
  model = Model(cfg, lora=adapters_cfg)
  tok = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, 97)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), tok))['params']
  adapters, base = lora.split(params)
  base_model = Model(cfg)
  # B = 0: the adapted model starts exactly as the base model.
  np.testing.assert_array_equal(np.asarray(model.apply({'params': params}, tok)[0]),
                                np.asarray(base_model.apply({'params': base}, tok)[0]))
  # Random B: merged weights reproduce the adapter path.
  adapters = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(2), x.shape) * 0.3, adapters)
  full = lora.combine(base, adapters)
  merged = lora.merge(full, adapters_cfg)
  got = np.asarray(base_model.apply({'params': merged}, tok)[0])
  want = np.asarray(model.apply({'params': full}, tok)[0])
  assert np.abs(want - np.asarray(base_model.apply({'params': base}, tok)[0])).max() > 1e-2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The frozen reference of a LoRA run (DPO's): the base model exactly, with no copy of it.
  reference = lora.reference_params(adapters, base)
  np.testing.assert_array_equal(np.asarray(model.apply({'params': reference}, tok)[0]),
                                np.asarray(base_model.apply({'params': base}, tok)[0]))
  assert all(a is b for a, b in zip(jax.tree.leaves(lora.split(reference)[1]), jax.tree.leaves(base)))


def _dir_bytes(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def test_lora_training_keeps_base_frozen_and_checkpoints_small(test_config, tmp_path):
  from configs import pretrain as pretrain_cfg
  tiny = pretrain_cfg.get_config('size=tiny').model
  model_over = {f'model__{k}': tiny[k] for k in ('vocab_size', 'd_model', 'n_layers', 'n_heads',
                                                 'n_kv_heads', 'd_ff', 'tie_embeddings')}
  devices = jax.devices()[:1]
  src = str(tmp_path / 'full')
  train(test_config(steps=2, checkpoint_every=2, **model_over), src, devices=devices)
  run = str(tmp_path / 'lora')
  from configs import sft as sft_cfg
  preset = sft_cfg.get_config('size=tiny,mode=lora').lora  # the preset of the LoRA experiment
  cfg = test_config(steps=6, checkpoint_every=6, log_every=1, init_from=src, lora__rank=preset.rank,
                    lora__targets=preset.targets, lora__alpha=preset.alpha, optimizer__lr=1e-2,
                    **model_over)
  train(cfg, run, devices=devices)

  t = make_trainer(cfg, devices=devices)
  state, frozen, _ = init.setup_state(t, ckpt_lib.Checkpointer(run))
  frozen = frozen['base']
  n_train = sum(x.size for x in jax.tree.leaves(state.params))
  n_all = n_train + sum(x.size for x in jax.tree.leaves(frozen))
  assert n_train / n_all < 0.05, n_train / n_all
  # The base is bit-identical to the source run's parameters; the adapters moved.
  src_params, _ = ckpt_lib.restore_params(src, t.layout.base)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(src_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  b_leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
              if 'lora_b' in jax.tree_util.keystr(p)]
  assert b_leaves and max(float(jnp.abs(x).max()) for x in b_leaves) > 0
  # Merged weights give the adapter model's logits.
  full = lora.combine(frozen, state.params)
  merged = lora.merge(full, t.model.lora)
  base_model = Model(t.model.cfg)
  tok = jnp.arange(24)[None] % 300
  np.testing.assert_allclose(np.asarray(base_model.apply({'params': merged}, tok)[0]),
                             np.asarray(t.model.apply({'params': full}, tok)[0]), rtol=1e-5, atol=1e-5)
  # The adapter checkpoint holds no copy of the base.
  lora_ckpt = _dir_bytes(os.path.join(run, 'checkpoints', '6'))
  full_ckpt = _dir_bytes(os.path.join(src, 'checkpoints', '2'))
  assert lora_ckpt < 0.1 * full_ckpt, (lora_ckpt, full_ckpt)


def test_targets_that_match_nothing_are_a_user_error(test_config):
  from research.errors import UserError
  with pytest.raises(UserError, match='matches no parameter'):
    make_trainer(test_config(lora__rank=4, lora__targets='nothing/here'))
  with pytest.raises(UserError, match='config.lora'):
    make_trainer(test_config(lora__rank=-1))
  with pytest.raises(UserError, match='regex'):
    make_trainer(test_config(lora__rank=4, lora__targets='attn/(q'))


def test_lora_run_exports_merged_weights(test_config, tmp_path):
  import transformers  # test oracle
  import torch
  from research import export
  from research.interop import hf
  run = str(tmp_path / 'lora')
  cfg = test_config(steps=3, lora__rank=4, lora__targets='all_linear', optimizer__lr=3e-2)
  train(cfg, run, devices=jax.devices()[:1])
  out = export.export(run, str(tmp_path / 'out'))
  t = make_trainer(cfg, devices=jax.devices()[:1])
  state, frozen, _ = init.setup_state(t, ckpt_lib.Checkpointer(run))
  tok = jnp.arange(16)[None] % 200
  want = np.asarray(t.model.apply({'params': lora.combine(frozen['base'], state.params)}, tok)[0])
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
  with torch.no_grad():
    got = reloaded(torch.tensor(np.asarray(tok))).logits.numpy()
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
  model, params = hf.load_pretrained(out)
  assert 'lora_a' not in str(jax.tree_util.tree_structure(params))
