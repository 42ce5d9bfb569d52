"""QLoRA: the NF4 / int8 block quantizer against numpy, a quantized base inside
the model, the base's memory, and a LoRA run whose evaluation and export see
the weights training saw."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_trainer, train
from research import models
from research.errors import UserError
from research.models import quant


def _numpy_blocks(w, lead):
  flat = np.asarray(w, np.float64).reshape(w.shape[:lead] + (-1,))
  n = flat.shape[-1]
  flat = np.pad(flat, [(0, 0)] * lead + [(0, -n % 64)])
  blocks = flat.reshape(flat.shape[:-1] + (-1, 64))
  return blocks, np.abs(blocks).max(-1, keepdims=True), n


def _numpy_nf4(w, lead=0):
  """Each weight -> absmax of its block of 64 times the nearest of the 16 NF4 levels."""
  blocks, absmax, n = _numpy_blocks(w, lead)
  levels = quant.NF4_LEVELS.astype(np.float64)
  nearest = levels[np.abs(blocks[..., None] / absmax[..., None] - levels).argmin(-1)]
  return (nearest * absmax).reshape(w.shape[:lead] + (-1,))[..., :n].reshape(w.shape)


def _numpy_int8(w, lead=0):
  blocks, absmax, n = _numpy_blocks(w, lead)
  return (np.round(127 * blocks / absmax) / 127 * absmax).reshape(w.shape[:lead] + (-1,))[..., :n].reshape(w.shape)


@pytest.mark.parametrize('kind,reference', [('nf4', _numpy_nf4), ('int8', _numpy_int8)])
@pytest.mark.parametrize('shape,lead', [((96, 40), 0), ((3, 32, 7, 5), 1)])  # a padded tail; stacked layers
def test_quantizer_equals_numpy(kind, reference, shape, lead):
  w = np.random.RandomState(0).standard_t(4, size=shape).astype(np.float32)  # heavy tails, as weights have
  q = quant.quantize(jnp.asarray(w), kind, lead=lead)
  got = np.asarray(quant.dequantize(q))
  np.testing.assert_allclose(got, reference(w, lead), rtol=1e-6, atol=1e-7)
  per_layer = int(np.prod(shape[lead:]))
  padded = int(np.prod(shape[:lead])) * -(-per_layer // 64) * 64
  assert 8 * (q.codes.nbytes + q.absmax.nbytes) == (4.5 if kind == 'nf4' else 8.5) * padded  # bits per weight
  assert np.abs(got - w).max() > 0  # lossy, not a pass-through


def test_levels_and_zero_blocks_round_trip_exactly():
  w = np.concatenate([quant.NF4_LEVELS * 3.0] * 4 + [np.zeros(64, np.float32)])
  np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w), 'nf4'))), w)


@pytest.mark.parametrize('scan', [False, True])
def test_model_reads_a_quantized_base_layer_by_layer(scan):
  """The model on a quantized tree (each kernel dequantized where it is used,
  inside the scan too) gives the logits of the model on the dequantized floats."""
  from research.models import llama, mixtral
  for cfg in (llama.Config(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                           scan_layers=scan, remat='full' if scan else 'none'),
              mixtral.Config(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                             n_experts=4, scan_layers=scan)):
    model = models.family(cfg.family).Model(cfg)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 12)))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)['params'])
    q = quant.quantize_tree(params, 'nf4')
    kinds = [type(x).__name__ for x in jax.tree.leaves(q, is_leaf=quant.is_quantized)]
    assert kinds.count('Quantized') == (7 if scan else 14)  # q k v o + 3 MLP (or expert) weights per layer
    got = model.apply({'params': q}, tokens)[0]
    want = model.apply({'params': quant.dequantize_tree(q)}, tokens)[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(want), np.asarray(model.apply({'params': params}, tokens)[0]), atol=1e-4)


def test_nf4_base_of_the_8b_preset_takes_under_30_percent(test_config):
  """The trainer holds the frozen base of LoRA on Llama 3 8B in NF4: layer weights
  at 4.5 bits, the embedding and output layer (1.05B of 8.03B) in float32."""
  from configs import sft
  from research.training.dry_run import per_device_bytes
  c = sft.get_config('size=8b,mode=lora')
  c.mesh.data = 1
  c.lora.quantize_base = 'nf4'
  t = make_trainer(c, devices=jax.devices()[:1])
  base = per_device_bytes(t.abstract_frozen['base'])
  assert base <= 0.30 * 4 * 8_030_261_248
  assert base >= 4 * 2 * 128256 * 4096  # the float32 embedding and lm_head are in it


def test_quantize_base_needs_lora_and_a_known_kind(test_config):
  with pytest.raises(UserError, match='rank > 0'):
    make_trainer(test_config(lora__quantize_base='nf4'))
  with pytest.raises(UserError, match='quantize_base'):
    make_trainer(test_config(lora__rank=4, lora__quantize_base='fp8'))


def test_resume_evaluate_and_export_see_the_quantized_base(test_config, tmp_path):
  """A QLoRA run's resumed frozen base is the quantized one, and load_params (the
  evaluate and export path) gives the same logits from the dequantized base."""
  from research.training import checkpoint, init, step
  c = test_config(steps=2, checkpoint_every=2, lora__rank=4, lora__quantize_base='nf4', lora__targets='all_linear')
  train(c, tmp_path / 'run', devices=jax.devices()[:1])
  t = make_trainer(c, devices=jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'))
  state, frozen, _ = init.setup_state(t, ckpt)
  ckpt.close()
  assert any(quant.is_quantized(x) for x in jax.tree.leaves(frozen['base'], is_leaf=quant.is_quantized))
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 512, (2, 16)))
  with t.mesh_context():
    trained = t.model.apply({'params': step.full_params(state.params, frozen)}, tokens)[0]
  run = init.load_params(str(tmp_path / 'run'))
  loaded = run.model.apply({'params': run.params}, tokens)[0]
  np.testing.assert_allclose(np.asarray(loaded), np.asarray(trained), rtol=1e-5, atol=1e-5)
  from research import lora
  merged_model = type(run.model)(run.model.cfg)
  merged = merged_model.apply({'params': lora.merge(run.params, run.model.lora)}, tokens)[0]
  np.testing.assert_allclose(np.asarray(merged), np.asarray(trained), rtol=1e-4, atol=1e-4)
