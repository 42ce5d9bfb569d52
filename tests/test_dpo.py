"""DPO stage: pair rendering, reference handling, memory with LoRA."""

import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params, make_trainer, train
from research.data import pairs, pref_sources
from research.models.llama import Config, Model
from research.stages import dpo
from research.training import init


def test_pair_formats():
  s = pairs.pair_messages({'json': json.dumps({'prompt': 'Q', 'chosen': 'A', 'rejected': 'B'})})
  assert s[0][-1] == {'role': 'assistant', 'content': 'A'} and s[1][-1]['content'] == 'B'
  convo = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'Q'}]
  m = pairs.pair_messages({'json': json.dumps({'prompt': convo, 'chosen': [{'role': 'assistant', 'content': 'A'}],
                                             'rejected': 'B'})})
  assert m[0][:2] == convo and m[1][-1]['content'] == 'B'
  assert pairs.pair_messages({'json': '{"prompt": "Q", "chosen": "A"}'}) is None
  assert pairs.pair_messages({'json': 'nope'}) is None


def test_wrong_answers_are_wrong_and_close():
  kinds = set()
  for _, row in pref_sources.task_pairs('train', 300):
    w, a, kind = row['rejected'], row['chosen'], row['kind']
    kinds.add((row['family'], kind))
    assert w != a
    if kind == 'near':
      assert abs(int(w) - int(a)) in (1, 10)
    elif kind == 'carry':  # forgetting the carry loses exactly ten
      x, y = (int(v) for v in row['prompt'][8:-1].split(' + '))
      assert x % 10 + y % 10 >= 10 and int(w) == int(a) - 10
    elif kind == 'transposed':
      assert sorted(w) == sorted(a) and w[0] != '0'
    elif kind == 'unreversed':
      assert w == row['prompt'].split(': ', 1)[1]
    else:
      assert kind == 'swapped' and sorted(w.split()) == sorted(a.split())
  assert kinds == {('add', 'near'), ('add', 'carry'), ('add', 'transposed'), ('reverse', 'unreversed'),
                   ('reverse', 'swapped'), ('sort', 'swapped')}


def test_code_bugs_change_one_line():
  import difflib
  import keyword
  seen = set()
  for _, row in itertools.islice(pref_sources.code_pairs(True), 60):
    chosen, rejected, kind = row['chosen'].splitlines(), row['rejected'].splitlines(), row['kind']
    seen.add(kind)
    removed = [l[1:] for l in difflib.ndiff(chosen, rejected) if l.startswith('- ')]
    added = [l[1:] for l in difflib.ndiff(chosen, rejected) if l.startswith('+ ')]
    assert len(removed) == 1, (kind, removed)
    if kind == 'deleted_line':
      assert not added and removed[0].strip() and not removed[0].strip().startswith(('#', '"', "'"))
    else:
      assert len(added) == 1 and len(added[0]) == len(removed[0])
      names = lambda s: set(re.findall(r'[A-Za-z_]\w*', s)) - set(keyword.kwlist)
      new_names = names(added[0]) - names(row['chosen'])
      if kind == 'misspelled_name':  # a name used nowhere in the real function
        assert len(new_names) == 1, new_names
      else:
        assert kind == 'swapped_operator' and not new_names
  assert seen == {'deleted_line', 'misspelled_name', 'swapped_operator'}


def _pair_batch(tok, n=4, seq_len=48):
  rows = [{'json': json.dumps(r)} for _, r in pref_sources.task_pairs('train', n)]
  ds = pairs.pair_dataset([rows], [1.0], pairs.RenderPair(tok, seq_len), batch_size=n, seed=0,
                          shuffle=False, num_epochs=1)
  return next(iter(ds))


def test_stage_loss_is_ln2_at_the_reference_and_masks_prompts(tok):
  batch = {k: jnp.asarray(v) for k, v in _pair_batch(tok).items()}
  # Only the reply tokens (and <|end|>) are scored.
  mask, targets = np.asarray(batch['chosen_loss_mask'][0]), np.asarray(batch['chosen_targets'][0])
  assert targets[mask > 0][-1] == tok.special_id('<|end|>')
  model = Model(Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
  params = init_params(model)
  from configs import dpo as dpo_cfg
  cfg = dpo_cfg.get_config()
  cfg.dpo.rpo_alpha = 0.0  # pure DPO
  loss, weight, metrics = dpo.make_loss(cfg.dpo)(model, params, batch, {'reference': params}, None)
  assert abs(float(loss) - np.log(2)) < 1e-6 and float(weight) == 4
  assert float(metrics['rewards/chosen']) == 0.0 and float(metrics['rewards/margins']) == 0.0


def _dpo_config(test_config, loss_type='sigmoid', **kw):
  from configs import dpo as dpo_cfg
  c = test_config(**kw)
  d = dpo_cfg.get_config()
  with c.unlocked():
    c.stage, c.dpo, c.task_eval = 'dpo', d.dpo, d.task_eval
    c.task_eval.exact_match = False
    c.dpo.rpo_alpha = 0.0  # pure DPO: loss ln 2 at the reference
    c.dpo.loss_type = loss_type
    c.dpo.pairs_per_row = 1  # one pair per row (the tiny preset packs; tests/test_ranked.py tests that)
    c.data.name, c.data.text_key, c.data.mix_weights = 'pref_tasks', '', ()
  return c


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_frozen_trees_full_lora_and_reference_free(test_config):
  """Full DPO holds one reference copy; LoRA DPO one base and no copy; SimPO and
  ORPO no reference at all."""
  devices = jax.devices()[:1]
  t = make_trainer(_dpo_config(test_config), devices=devices)
  state, frozen, _ = init.setup_state(t, None)
  base_bytes = _bytes(state.params)
  assert sorted(frozen) == ['reference'] and _bytes(frozen['reference']) == base_bytes
  for a, b in zip(jax.tree.leaves(frozen['reference']), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()  # a copy: the step donates state

  t = make_trainer(_dpo_config(test_config, lora__rank=4), devices=devices)
  state, frozen, _ = init.setup_state(t, None)
  assert sorted(frozen) == ['base'] and _bytes(frozen['base']) == base_bytes
  assert _bytes(state.params) < 0.1 * base_bytes  # adapters only

  for loss_type in ('simpo', 'orpo'):
    t = make_trainer(_dpo_config(test_config, loss_type=loss_type), devices=devices)
    state, frozen, _ = init.setup_state(t, None)
    assert frozen == {} and t.stage.frozen == () and t.frozen_shardings == {}


def test_unknown_loss_type_is_a_user_error(test_config):
  from research.errors import UserError
  with pytest.raises(UserError, match='loss_type'):
    make_trainer(_dpo_config(test_config, loss_type='kto'))


def test_dpo_training_moves_rewards_and_keeps_reference(test_config, tmp_path):
  c = _dpo_config(test_config, steps=8, log_every=1, seq_len=48, optimizer__lr=3e-3, eval_every=8)
  from research.training.metrics import read_metrics
  train(c, tmp_path / 'run', devices=jax.devices()[:1])
  rows = [r for r in read_metrics(str(tmp_path / 'run')) if 'train/rewards/margins' in r]
  assert rows[0]['train/loss'] == pytest.approx(np.log(2), abs=1e-6)  # step 1: policy = reference
  late = rows[-3:]
  assert np.mean([r['train/rewards/margins'] for r in late]) > 0
  assert np.mean([r['train/loss'] for r in late]) < np.log(2)


def test_pairs_that_differ_only_beyond_seq_len_are_skipped(tok):
  long_pair = {'prompt': 'Q', 'chosen': 'a ' * 40 + 'x', 'rejected': 'a ' * 40 + 'y'}
  short_pair = {'prompt': 'Q', 'chosen': 'x', 'rejected': 'y'}
  rows = [{'json': json.dumps(long_pair)}, {'json': json.dumps(short_pair)}]
  for side in (pairs.render_side, pairs.render_scored):
    ds = pairs.pair_dataset([rows], [1.0], pairs.RenderPair(tok, 16, render=side), batch_size=1, seed=0,
                            shuffle=False, num_epochs=1)
    assert len(list(ds)) == 1  # the short pair only
