"""Mixture of Experts: routing and dispatch against numpy, the load-balancing
loss against transformers' Mixtral, and expert sharding against one device.
(Logits, decoding and export of Mixtral checkpoints: tests/test_hf.py.)"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import set_fields, train
from research import models
from research.models import moe
from research.training.metrics import read_metrics

torch.set_num_threads(1)


def _silu(x):
  return x / (1 + np.exp(-x))


def _numpy_moe(params, x_BTD, valid_BT, k, slots=None):
  """The layer written as loops: route each valid token to its top k experts,
  weights renormalised; with `slots`, each expert of a row takes first choices
  (by position), then second choices, ... until full. Returns (y, dropped share)."""
  router = np.asarray(params['router']['kernel'], np.float64)
  gate, up, down = (np.asarray(params[n], np.float64) for n in ('gate', 'up', 'down'))
  B, T, _ = x_BTD.shape
  x = np.asarray(x_BTD, np.float64)
  logits = x @ router
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y, assigned, kept = np.zeros_like(x), 0, 0
  for b in range(B):
    used = np.zeros(gate.shape[0], int)
    top = np.argsort(-probs[b], axis=-1, kind='stable')[:, :k]
    for rank in range(k):
      for t in range(T):
        if not valid_BT[b, t]:
          continue
        e = top[t, rank]
        assigned += 1
        if slots is not None and used[e] >= slots:
          continue
        used[e] += 1
        kept += 1
        w = probs[b, t, e] / probs[b, t, top[t]].sum()
        y[b, t] += w * ((_silu(x[b, t] @ gate[e]) * (x[b, t] @ up[e])) @ down[e])
  return y, 1 - kept / assigned


@pytest.fixture(scope='module')
def layer():
  E, K, D, F = 6, 2, 16, 24
  rng = np.random.RandomState(0)
  x = rng.randn(3, 20, D).astype(np.float32)
  valid = np.ones((3, 20), bool)
  valid[1, 14:] = False  # a padded row takes no capacity and counts in no statistic
  params = nn.meta.unbox(moe.MoE(E, K, D, F, init_std=0.3).init(jax.random.PRNGKey(0), x, valid)['params'])
  return dict(E=E, K=K, D=D, F=F, x=x, valid=valid, params=params)


def _apply(layer, capacity_factor):
  m = moe.MoE(layer['E'], layer['K'], layer['D'], layer['F'], capacity_factor)
  y, state = m.apply({'params': layer['params']}, layer['x'], layer['valid'], mutable=[moe.COLLECTION])
  return np.asarray(y), state[moe.COLLECTION]


def test_dropless_layer_equals_the_loops(layer):
  got, _ = _apply(layer, 0.0)
  want, _ = _numpy_moe(layer['params'], layer['x'], layer['valid'], layer['K'])
  v = layer['valid']
  np.testing.assert_allclose(got[v], want[v], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('capacity_factor', [0.5, 1.0])
def test_capacity_dispatch_drops_as_the_loops_do(layer, capacity_factor):
  slots = moe.capacity(capacity_factor, 20, layer['K'], layer['E'])
  got, sown = _apply(layer, capacity_factor)
  want, dropped = _numpy_moe(layer['params'], layer['x'], layer['valid'], layer['K'], slots)
  assert dropped > 0  # the case is not vacuous
  v = layer['valid']
  np.testing.assert_allclose(got[v], want[v], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(sown['dropped'][0]), dropped, rtol=1e-6)


def test_enough_capacity_equals_dropless(layer):
  full = layer['E'] / layer['K']  # C = T: no expert can overflow
  v = layer['valid']  # (padding: zero with capacity, computed anyway when dropless)
  np.testing.assert_allclose(_apply(layer, full)[0][v], _apply(layer, 0.0)[0][v], rtol=1e-5, atol=1e-6)


def _hf_mixtral(n_layers, seed=0):
  cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48, num_local_experts=4,
                                   num_experts_per_tok=2, router_aux_loss_coef=0.02, max_position_embeddings=64)
  torch.manual_seed(seed)
  m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation='eager').eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if 'norm' in name else 0.3 * torch.randn_like(p))
  return m


def _our_aux(hf_model, tmp_path, tokens, mask):
  from research.interop import hf
  hf_model.save_pretrained(str(tmp_path))
  model, params = hf.load_pretrained(str(tmp_path))

  def stage_loss(model, params, batch, frozen, rng):
    models.forward(model, params, batch['inputs'], None, batch['segment_ids'])
    return jnp.float32(1.5), jnp.float32(1), {}
  batch = {'inputs': jnp.asarray(tokens), 'segment_ids': jnp.asarray(mask, jnp.int32)}
  loss, _, metrics = models.with_router_losses(stage_loss)(model, params, batch, {}, None)
  _, _, eval_metrics = models.with_router_losses(stage_loss, train=False)(model, params, batch, {}, None)
  assert float(loss) == pytest.approx(1.5 + 0.02 * float(metrics['moe_aux_loss']), rel=1e-6)
  assert float(eval_metrics['moe_aux_loss']) == pytest.approx(float(metrics['moe_aux_loss']), rel=1e-6)
  return float(metrics['moe_aux_loss'])


def _inputs():
  tokens = np.random.RandomState(1).randint(0, 128, (2, 24))
  mask = np.ones((2, 24), np.int64)
  mask[1, 17:] = 0  # right padding: HF's attention_mask, our segment id 0
  return tokens, mask


def test_one_layer_aux_loss_equals_transformers(tmp_path):
  hf_model = _hf_mixtral(n_layers=1)
  tokens, mask = _inputs()
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_router_logits=True).aux_loss
  assert _our_aux(hf_model, tmp_path, tokens, mask) == pytest.approx(float(want), rel=1e-5)


def test_aux_loss_is_the_mean_of_each_layers_switch_loss(tmp_path):
  """Per layer E * sum_e f_e P_e (f: share of the valid tokens' top-k picks, P:
  mean probability), from transformers' router logits; then the mean over layers."""
  hf_model = _hf_mixtral(n_layers=3, seed=1)
  tokens, mask = _inputs()
  with torch.no_grad():
    logits = hf_model(torch.tensor(tokens), output_router_logits=True).router_logits
  valid = mask.reshape(-1).astype(bool)
  per_layer = []
  for layer_logits in logits:
    probs = torch.softmax(layer_logits.double(), -1).numpy()[valid]
    top = np.argsort(-probs, -1)[:, :2]
    f = np.stack([(top == e).sum() for e in range(4)]) / len(probs)
    per_layer.append(4 * np.sum(f * probs.mean(0)))
  got = _our_aux(hf_model, tmp_path, tokens, mask)
  assert got == pytest.approx(np.mean(per_layer), rel=1e-5)
  assert got != pytest.approx(per_layer[0], rel=1e-3)  # the layers differ: a real mean


def _moe_config(corpus_dir, data_dir, **overrides):
  from configs import pretrain
  c = pretrain.get_config('size=test,family=mixtral')
  c.data.name, c.data.files, c.data.data_dir = 'files', os.path.join(corpus_dir, '*.txt'), data_dir
  c.sample.prompts, c.eval_batches = (), 2
  return set_fields(c, dict(dict(steps=5, log_every=1, eval_every=5, model__n_experts=4,
                                 model__experts_per_token=2), **overrides))


@pytest.mark.parametrize('capacity_factor', [0.0, 1.0])
def test_expert_mesh_gives_the_losses_of_one_device(capacity_factor, corpus_dir, data_dir, tmp_path):
  def run(name, devices, **mesh):
    c = _moe_config(corpus_dir, data_dir, model__capacity_factor=capacity_factor,
                    **{f'mesh__{k}': v for k, v in mesh.items()})
    train(c, tmp_path / name, devices=devices)
    return read_metrics(str(tmp_path / name))
  one = run('one', jax.devices()[:1], data=1)
  sharded = run('sharded', None, data=2, expert=4)
  losses = lambda rows: {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}
  assert sorted(losses(one)) == [1, 2, 3, 4, 5]
  for step, want in losses(one).items():
    assert losses(sharded)[step] == pytest.approx(want, rel=1e-5), step
  aux = [r['train/moe_aux_loss'] for r in sharded if 'train/moe_aux_loss' in r]
  assert len(aux) == 5 and all(1.0 < a < 4.0 for a in aux)  # k=2 balanced .. E=4 collapsed
  assert any('eval/moe_aux_loss' in r for r in sharded)
  if capacity_factor:
    assert any(r.get('train/moe_dropped', 0) > 0 for r in sharded)


def test_expert_weights_split_over_the_expert_axis(corpus_dir, data_dir):
  from conftest import make_trainer
  from research.training import init
  t = make_trainer(_moe_config(corpus_dir, data_dir, mesh__data=2, mesh__expert=4))
  state, _ = init.init_state(t)
  gate = state.params['layers_0']['mlp']['gate']  # [E, D, F]
  assert gate.shape[0] == 4 and gate.addressable_shards[0].data.shape[0] == 1


def test_only_the_trained_forward_adds_its_aux_loss(tok):
  """DPO runs the policy and a frozen reference through one model: the loss gains
  router_aux_coef x the policy's balancing loss (mean over layers), never the
  reference's."""
  from configs import dpo as dpo_cfg
  from research.data import pairs
  from research.models import mixtral
  from research.stages import dpo
  from test_dpo import _pair_batch
  batch = {k: jnp.asarray(v) for k, v in _pair_batch(tok).items()}
  model = mixtral.Model(mixtral.Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                       n_experts=4, router_aux_coef=0.05))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch['chosen_inputs'])['params'])
  reference = jax.tree.map(lambda x: -2.0 * x, params)  # routes differently
  loss_fn = dpo.make_loss(dpo_cfg.get_config().dpo)
  plain, weight, _ = loss_fn(model, params, batch, {'reference': reference}, None)
  loss, weight2, metrics = models.with_router_losses(loss_fn)(model, params, batch, {'reference': reference}, None)

  def layer_aux(p):
    rows = {k: pairs.stack_sides(batch, k) for k in ('inputs', 'positions', 'segment_ids')}
    _, state = model.apply({'params': p}, rows['inputs'], rows['positions'], rows['segment_ids'], mutable=['moe'])
    return np.mean([float(state['moe'][f'layers_{i}']['mlp']['aux_loss'][0]) for i in range(2)])
  assert layer_aux(params) != pytest.approx(layer_aux(reference), rel=1e-2)
  assert float(metrics['moe_aux_loss']) == pytest.approx(layer_aux(params), rel=1e-6)
  assert float(loss) == pytest.approx(float(plain) + 0.05 * layer_aux(params), rel=1e-6)
  assert float(weight2) == float(weight)


def test_scanned_and_rematerialised_layers_sow_the_same_aux_loss():
  from research.models import mixtral
  cfg = mixtral.Config(vocab_size=128, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=48, n_experts=4)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 16)))
  params = nn.meta.unbox(mixtral.Model(cfg).init(jax.random.PRNGKey(1), tokens)['params'])
  stacked = {k: v for k, v in params.items() if not k.startswith('layers_')}
  stacked['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[f'layers_{i}'] for i in range(3)))

  def stage_loss(model, p, batch, frozen, rng):
    logits = models.forward(model, p, batch['inputs'])
    return jnp.mean(logits ** 2), jnp.float32(1), {}
  batch = {'inputs': tokens}
  want = models.with_router_losses(stage_loss)(mixtral.Model(cfg), params, batch, {}, None)
  scanned = mixtral.Model(mixtral.Config(**{**cfg.__dict__, 'scan_layers': True, 'remat': 'full'}))
  got = models.with_router_losses(stage_loss)(scanned, stacked, batch, {}, None)
  assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
  assert float(got[2]['moe_aux_loss']) == pytest.approx(float(want[2]['moe_aux_loss']), rel=1e-6)
