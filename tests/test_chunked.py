"""Chunked cross-entropy and log-probs (config.model.logits_chunk > 0) against the
plain path (whole logits): values and parameter gradients within 1e-6 in float32."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import init_params
from configs import base, dpo as dpo_config, grpo as grpo_config
from research import losses, models, rl
from research.errors import UserError
from research.models import LoraConfig, llama, qwen3
from research.stages import dpo, grpo, pretrain
from research.training import sharding

TOL = dict(rtol=1e-6, atol=1e-6)
SHAPE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
B, T, CHUNK = 2, 13, 4  # 13 = 3 whole chunks of 4 and a remainder of 1


def _close(got, want):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL), got, want)


def _perturbed(params, seed=1):
  """Random offsets on every leaf (LoRA's B starts at 0), so every parameter matters."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _pair(cfg, lora=None):
  """(plain model, chunked model, shared parameters): logits_chunk changes no parameter."""
  module = {'llama': llama, 'qwen3': qwen3}[cfg.family]
  plain = module.Model(dataclasses.replace(cfg, logits_chunk=0), lora=lora)
  chunked = module.Model(dataclasses.replace(cfg, logits_chunk=CHUNK), lora=lora)
  return plain, chunked, _perturbed(init_params(plain))


def _packed_batch(seed=0, vocab=96):
  """Row 0: two documents and two padding positions; row 1: one document."""
  r = np.random.RandomState(seed)
  seg = np.array([[1] * 5 + [2] * 6 + [0] * 2, [1] * T], np.int32)
  pos = np.array([list(range(5)) + list(range(6)) + [0, 0], list(range(T))], np.int32)
  return {'inputs': jnp.asarray(r.randint(0, vocab, (B, T)), jnp.int32),
          'targets': jnp.asarray(r.randint(0, vocab, (B, T)), jnp.int32),
          'positions': jnp.asarray(pos), 'segment_ids': jnp.asarray(seg)}


@pytest.mark.parametrize('chunk', [4, 5, 12, 20])
def test_chunked_log_probs_equal_plain(chunk):
  """A linear head on T = 12: chunks that divide it, that leave a remainder, and one longer than it."""
  r = np.random.RandomState(0)
  h_BTD, w_DV = jnp.asarray(r.randn(3, 12, 8), jnp.float32), jnp.asarray(r.randn(8, 11), jnp.float32)
  targets_BT, weights_BT = jnp.asarray(r.randint(0, 11, (3, 12))), jnp.asarray(r.randn(3, 12), jnp.float32)
  plain = lambda h, w: (losses.token_log_probs(h @ w, targets_BT), losses.token_entropy(h @ w))
  chunked = lambda h, w: losses.chunked_token_log_probs(lambda f: f @ w, h, targets_BT, chunk, with_entropy=True)
  _close(chunked(h_BTD, w_DV), plain(h_BTD, w_DV))
  _close(losses.chunked_token_log_probs(lambda f: f @ w_DV, h_BTD, targets_BT, chunk), plain(h_BTD, w_DV)[0])
  grads = lambda f: jax.grad(lambda h, w: jnp.sum(f(h, w)[0] * weights_BT), argnums=(0, 1))(h_BTD, w_DV)
  _close(grads(chunked), grads(plain))


def test_chunked_grad_holds_one_chunk_of_logits():
  """XLA's temporaries for the gradient: the plain path holds [B, T, V] float32
  logits (and their softmax); chunks of 32 of 512 positions hold a sixteenth."""
  r = np.random.RandomState(0)
  h_BTD, w_DV = jnp.asarray(r.randn(2, 512, 16), jnp.float32), jnp.asarray(r.randn(16, 4096), jnp.float32)
  targets_BT = jnp.asarray(r.randint(0, 4096, (2, 512)))
  plain = lambda h, w: jnp.sum(losses.token_log_probs(h @ w, targets_BT))
  chunked = lambda h, w: jnp.sum(losses.chunked_token_log_probs(lambda f: f @ w, h, targets_BT, 32))
  temp = lambda f: jax.jit(jax.grad(f, argnums=(0, 1))).lower(h_BTD, w_DV).compile().memory_analysis().temp_size_in_bytes
  logits_bytes = 2 * 512 * 4096 * 4
  assert temp(plain) >= logits_bytes
  assert temp(chunked) < logits_bytes / 4


def test_bad_chunk_sizes_are_errors():
  with pytest.raises(ValueError, match='chunk_size'):
    losses.chunked_token_log_probs(lambda f: f, jnp.zeros((1, 4, 3)), jnp.zeros((1, 4), jnp.int32), 0)
  with pytest.raises(UserError, match='logits_chunk'):
    llama.Config(**SHAPE, logits_chunk=-1).validate()


# (family, tied embeddings, LoRA targets incl. the head, LoRA dropout)
MODEL_CASES = [('llama', False, None, 0.0), ('llama', True, None, 0.0),
               ('llama', False, r'.*(attn/(q|v)|lm_head)/kernel', 0.1), ('qwen3', True, None, 0.0)]


@pytest.mark.parametrize('family,tied,lora_targets,dropout', MODEL_CASES)
def test_model_log_probs_and_grads_equal_plain(family, tied, lora_targets, dropout):
  """Packed segments and padding, a length the chunk does not divide; the masked
  cross-entropy and its gradient w.r.t. every parameter (with LoRA on lm_head:
  its adapters, under dropout with the same rng)."""
  module = {'llama': llama, 'qwen3': qwen3}[family]
  cfg = module.Config(**SHAPE, tie_embeddings=tied)
  lora = LoraConfig(rank=4, alpha=8.0, dropout=dropout, targets=lora_targets) if lora_targets else None
  plain, chunked, params = _pair(cfg, lora)
  if lora:
    assert 'lora_b' in params['lm_head']
  batch, rng = _packed_batch(), jax.random.PRNGKey(3) if dropout else None
  mask_BT = batch['segment_ids'] > 0

  def run(model):  # (log-probs, (cross-entropy, its gradient))
    logps = lambda p: models.target_log_probs(model, p, batch, rng)
    ce = lambda p: losses.masked_mean_nll(logps(p), mask_BT)[0]
    return jax.jit(lambda p: (logps(p), jax.value_and_grad(ce)(p)))(params)

  _close(run(chunked), run(plain))


def test_rl_log_probs_entropy_and_values_equal_plain():
  """The RL path: temperature, a per-row vocabulary limit, the entropy metric and a shared critic."""
  plain, chunked, params = _pair(llama.Config(**SHAPE, value_head='shared'))
  batch = {**_packed_batch(), 'vocab_limit': jnp.asarray([90, 96], jnp.int32)}

  def run(model):
    def objective(p):
      logps, entropy, values = rl.token_logps(model, p, batch, 0.7, with_entropy=True, with_values=True)
      mask_BT = batch['segment_ids'] > 0  # means, as the losses take them (sums scale the rounding too)
      return losses.masked_mean_nll(logps, mask_BT)[0] + jnp.mean(values), (logps, entropy, values)
    return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)

  _close(run(chunked), run(plain))


def test_pretrain_dpo_and_grpo_losses_equal_plain():
  """Three real stage losses, switch on vs off: loss, weight, metrics and gradients."""
  plain, chunked, params = _pair(llama.Config(**SHAPE))
  reference = _perturbed(params, seed=7)
  def run(loss, model, batch, frozen):  # ((loss, weight, metrics), gradient)
    return jax.jit(lambda p: (loss(model, p, batch, frozen, None),
                              jax.grad(lambda q: loss(model, q, batch, frozen, None)[0])(p)))(params)
  results = lambda loss, batch, frozen: [run(loss, m, batch, frozen) for m in (chunked, plain)]

  _close(*results(pretrain.loss, _packed_batch(), {}))

  one, two = _packed_batch(0), _packed_batch(1)
  pair_batch = {f'{side}_{k}': b[k] for side, b in (('chosen', one), ('rejected', two)) for k in b}
  for side in ('chosen', 'rejected'):
    pair_batch[f'{side}_loss_mask'] = (jnp.arange(T) >= 3).astype(jnp.int32)[None].repeat(B, 0)
  d = dpo_config.get_config().dpo
  d.pairs_per_row = 1
  _close(*results(dpo.make_loss(d), pair_batch, {'reference': reference}))

  g = grpo_config.get_config().grpo
  g.beta = 0.05  # the KL to the reference goes through the chunked path too
  r = np.random.RandomState(2)
  rl_batch = {**_packed_batch(), 'loss_mask': (_packed_batch()['segment_ids'] > 0).astype(jnp.int32),
              'old_logps': jnp.asarray(-5 + r.randn(B, T), jnp.float32),
              'advantages': jnp.asarray(r.randn(B), jnp.float32), 'vocab_limit': jnp.asarray([90, 96], jnp.int32)}
  _close(*results(grpo.make_loss(g), rl_batch, {'reference': reference}))


def test_sharded_chunked_equals_plain():
  """Under a data x fsdp x tensor mesh with the default rules (vocab over tensor),
  jitted: the logical constraints inside the chunk loop keep the values."""
  plain, chunked, params = _pair(llama.Config(**SHAPE))
  batch = {k: jnp.concatenate([v, v[::-1]]) for k, v in _packed_batch().items()}  # 4 rows
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
  rules = sharding.rules_from_config(base.DEFAULT_RULES)

  def ce(model):
    fn = lambda p: losses.masked_mean_nll(models.target_log_probs(model, p, batch), batch['segment_ids'] > 0)[0]
    with sharding.MeshContext(mesh, rules):
      return jax.jit(jax.value_and_grad(fn))(params)

  _close(ce(chunked), ce(plain))
