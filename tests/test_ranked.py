"""Ranked preference rows ({"prompt", "ranked": [best, ..., worst]}: every pair
of a ranking, all in one batch) and packed pair rows: the expansion, the
batching, the embedded ranked data against an independent measure of how
wrong an answer is, the reward loss against numpy, the packed losses against
the one-pair-per-row path, and short DPO and reward runs on ranked data."""

import collections
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params, reference_reward, train
from research.data import pairs, pipeline, pref_sources
from research.errors import UserError
from research.models.llama import Config, Model
from research.stages import dpo, reward
from research.training import init
from research.training.metrics import read_metrics


def _row(**fields):
  return {'json': json.dumps(fields)}


def _replies(found):
  return [(c[-1]['content'], r[-1]['content']) for c, r in found]


def test_ranked_rows_expand_to_every_pair_in_rank_order():
  for K in (3, 4):
    ranked = [f'reply {i}' for i in range(K)]
    found = pairs.row_pairs(_row(prompt='Q', ranked=ranked))
    assert len(found) == K * (K - 1) // 2  # 3 and 6
    got = _replies(found)
    assert sorted(got) == sorted((ranked[i], ranked[j]) for i in range(K) for j in range(K) if i < j)
    assert all(ranked.index(better) < ranked.index(worse) for better, worse in got)
    assert all(c[0] == {'role': 'user', 'content': 'Q'} for pair in found for c in pair)

  # Message-list prompts and replies, as in pair rows.
  convo = [{'role': 'system', 'content': 'S'}, {'role': 'user', 'content': 'Q'}]
  found = pairs.row_pairs(_row(prompt=convo, ranked=[[{'role': 'assistant', 'content': 'A'}], 'B', 'C']))
  assert _replies(found) == [('A', 'B'), ('A', 'C'), ('B', 'C')] and found[0][0][:2] == convo
  # A pair row is its one pair; a ranked row is no pair row.
  pair = _row(prompt='Q', chosen='A', rejected='B')
  assert pairs.row_pairs(pair) == [pairs.pair_messages(pair)]
  assert pairs.pair_messages(_row(prompt='Q', ranked=['A', 'B'])) is None

  malformed = [dict(prompt='Q', ranked=['A']), dict(prompt='Q', ranked=[]),
               dict(prompt='Q', ranked=['A', 'B', 'A']),  # a reply ranked above itself
               dict(prompt='Q', ranked='A B'), dict(prompt='Q', ranked=['A', 3]),
               dict(prompt='Q', ranked=['A', {'role': 'assistant', 'content': 'B'}]),
               dict(prompt='Q', ranked=['A', [{'role': 'user', 'content': 'B'}]]),  # no reply
               dict(prompt='Q', ranked=['A', 'B'], chosen='A', rejected='B'),  # which order holds?
               dict(ranked=['A', 'B'])]
  for bad in malformed:
    assert pairs.row_pairs(_row(**bad)) is None, bad


def test_malformed_and_oversized_rows_are_counted_not_fatal(capsys):
  rows = [_row(prompt='Q', ranked=['A', 'B', 'C']), _row(prompt='Q', ranked=['A']),
          _row(prompt='Q', chosen='A', rejected='B'), {'json': 'nope'},
          _row(prompt='Q', ranked=['A', 'B', 'C', 'D'])]  # 6 pairs
  pairs.check_rows(rows, 'mine', '', most_pairs=4)
  out = capsys.readouterr().out
  assert 'skipped 2 malformed of the first 5 rows' in out
  assert 'skipping 1 of the first 5 rows, which have more than the 4 pairs' in out
  with pytest.raises(UserError, match='all 2 rows are malformed'):
    pairs.check_rows(rows[1:2] + rows[3:4], 'mine', '', most_pairs=4)
  with pytest.raises(UserError, match='raise batch_size'):
    pairs.check_rows(rows[4:], 'mine', '', most_pairs=4)


def _how_wrong(question: str, reply: str) -> int:
  """Independent of pref_sources: the absolute error of a sum, or the number of
  positions where a reply differs from the reversed / sorted items."""
  if question.startswith('What is '):
    a, b = (int(x) for x in re.findall(r'\d+', question))
    return abs(int(reply) - (a + b))
  items = question.split(': ', 1)[1].split()
  want = items[::-1] if question.startswith('Reverse') else [str(x) for x in sorted(int(i) for i in items)]
  got = reply.split()
  n = max(len(want), len(got))
  return sum(x != y for x, y in zip(want + [None] * (n - len(want)), got + [None] * (n - len(got))))


def test_embedded_ranked_tasks_go_from_right_to_most_wrong():
  sizes = collections.Counter()
  for split, n in (('train', 300), ('validation', 100)):
    for _, row in pref_sources.ranked_task_rows(split, n):
      wrongness = [_how_wrong(row['prompt'], r) for r in row['ranked']]
      assert wrongness[0] == 0 and all(a < b for a, b in zip(wrongness, wrongness[1:])), row
      assert wrongness == row['errors']
      sizes[(row['family'], len(row['ranked']))] += 1
  assert {f for f, _ in sizes} == {'add', 'reverse', 'sort'}
  assert all(2 <= k <= 4 for _, k in sizes) and sum(v for (_, k), v in sizes.items() if k == 4) > 0.9 * 1200
  # The held-out split is the pair data's (and SFT's): the same questions, none in training.
  held_out = {r['prompt'] for _, r in pref_sources.ranked_task_rows('validation', 100)}
  assert held_out == {r['prompt'] for _, r in pref_sources.task_pairs('validation', 100)}
  assert not held_out & {r['prompt'] for _, r in pref_sources.ranked_task_rows('train', 4000)}
  # Deterministic.
  assert list(pref_sources.ranked_task_rows('train', 20)) == list(pref_sources.ranked_task_rows('train', 20))


def _mixed_rows():
  """Pair rows and ranked rows of 2 to 4 replies, each prompt naming its row."""
  rows = []
  for i in range(14):
    K = [2, 3, 4, 1][i % 4]
    if K == 1:
      rows.append(_row(prompt=f'Q{i}', chosen=f'good {i}', rejected=f'bad {i}'))
    else:
      rows.append(_row(prompt=f'Q{i}', ranked=[f'rank {r} of {i}' for r in range(K)]))
  return rows


def _batch_pairs(batch, tok, pairs_per_row):
  """(row number, better reply, worse reply) of each real pair of a batch, decoded."""
  out = []
  for r in range(batch['chosen_inputs'].shape[0]):
    for s in range(1, pairs_per_row + 1):
      text = {}
      for side in pairs.SIDES:
        ids = batch[f'{side}_inputs'][r][batch[f'{side}_segment_ids'][r] == s]
        text[side] = tok.decode([int(t) for t in ids])
      if text['chosen']:
        i = int(re.search(r'Q(\d+)', text['chosen']).group(1))
        assert f'Q{i}' in text['rejected']
        reply = lambda t: re.search(r'(rank \d|good|bad)', t.split(f'Q{i}')[-1]).group(1)
        out.append((i, reply(text['chosen']), reply(text['rejected'])))
  return out


@pytest.mark.parametrize('pairs_per_row', [1, 3])
def test_all_pairs_of_a_row_land_in_one_batch(tok, pairs_per_row):
  rows = _mixed_rows()
  render = pairs.RenderPair(tok, 40)
  # One pair per row: 6 slots. Packed: 4 rows of 40 tokens; two pairs of these fit a row.
  ds = pairs.pair_dataset([rows], [1.0], render, batch_size=6 if pairs_per_row == 1 else 4, seed=0,
                          shuffle=False, num_epochs=1, pairs_per_row=pairs_per_row)
  batches = list(ds)
  seen = collections.defaultdict(set)
  for b, batch in enumerate(batches):
    found = _batch_pairs(batch, tok, pairs_per_row)
    assert len(found) == float(jnp.sum(pairs.pair_weights(batch, pairs_per_row)))
    for i, better, worse in found:
      seen[i].add(b)
      if better != 'good':
        assert int(better[-1]) < int(worse[-1])  # ranked: the chosen reply ranks above
    counts = collections.Counter(i for i, _, _ in found)
    for i, n in counts.items():
      K = [2, 3, 4, 1][i % 4]
      assert n == (1 if K == 1 else K * (K - 1) // 2)  # the whole ranking
    if pairs_per_row == 1:  # padding slots are all-zero rows
      w = np.asarray(pairs.pair_weights(batch))
      assert all(not batch[k][w == 0].any() for k in batch)
  assert all(len(b) == 1 for b in seen.values())
  assert sorted(seen) == list(range(len(seen))) and len(seen) >= 10  # in order; the unfinished last batch is dropped


def test_a_ranking_too_big_for_a_batch_is_skipped_and_said(tok, capsys):
  ds = pairs.pair_dataset([_mixed_rows()], [1.0], pairs.RenderPair(tok, 40), batch_size=5, seed=0,
                          shuffle=False, num_epochs=1)
  found = {i for batch in ds for i, _, _ in _batch_pairs(batch, tok, 1)}
  assert found and not {i for i in found if i % 4 == 2}  # the rankings of 4 (6 pairs) are left out
  assert capsys.readouterr().out.count('do not fit one batch') == 1


def test_pair_rows_batch_exactly_as_grain_batch(tok):
  rows = [_row(**r) for _, r in pref_sources.task_pairs('train', 30)]
  render = pairs.RenderPair(tok, 48)
  ours = list(pairs.pair_dataset([rows], [1.0], render, batch_size=8, seed=3, num_epochs=1))
  theirs = list(pipeline.mixed_source([rows], [1.0], seed=3, num_epochs=1).map(render)
                .filter(lambda x: x is not None).to_iter_dataset().batch(8, drop_remainder=True))
  assert len(ours) == len(theirs) == 90 // 8
  for a, b in zip(ours, theirs):
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('pairs_per_row', [1, 3])
def test_iterator_state_resumes_with_a_held_row(tok, pairs_per_row):
  ds = pairs.pair_dataset([_mixed_rows()], [1.0], pairs.RenderPair(tok, 40), batch_size=4, seed=1,
                          pairs_per_row=pairs_per_row)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  again = iter(ds)
  again.set_state(json.loads(json.dumps(state)))  # as checkpoints store it
  for a in want:
    b = next(again)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _score_model():
  model = Model(Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, head='score'))
  return model, init_params(model, seed=1)


def _reward_cfg(margin, coef, pairs_per_row):
  from configs import reward as reward_cfg
  c = reward_cfg.get_config().reward
  c.margin, c.center_coef, c.pairs_per_row = margin, coef, pairs_per_row
  return c


@pytest.mark.parametrize('pairs_per_row', [1, 3])
def test_reward_loss_on_a_ranked_batch_is_bradley_terry_over_its_pairs(tok, pairs_per_row):
  ranked = [_row(**r) for _, r in pref_sources.ranked_task_rows('train', 3)][:2]
  assert [len(json.loads(r['json'])['ranked']) for r in ranked] == [4, 4]
  # One pair per row: 8 slots hold the first ranking's 6 pairs and 2 padding pairs (the
  # second ranking's 6 do not fit); packed: 2 rows x 3 pairs hold the first ranking.
  ds = pairs.pair_dataset([ranked], [1.0], pairs.RenderPair(tok, 64, render=pairs.render_scored),
                          batch_size=8 if pairs_per_row == 1 else 2, seed=0, shuffle=False, num_epochs=1,
                          pairs_per_row=pairs_per_row)
  batch = {k: jnp.asarray(v) for k, v in next(iter(ds)).items()}
  model, params = _score_model()
  expanded = pairs.row_pairs(ranked[0])
  rc = np.array([reference_reward(model, params, tok, c) for c, _ in expanded])
  rr = np.array([reference_reward(model, params, tok, r) for _, r in expanded])
  margin, coef = 0.3, 0.05
  diff = rc - rr - margin
  want = np.mean(np.log1p(np.exp(-diff))) + coef * np.mean((rc + rr) ** 2)
  loss_fn = reward.make_loss(_reward_cfg(margin, coef, pairs_per_row))
  loss, weight, metrics = jax.jit(lambda p, b: loss_fn(model, p, b, {}, None))(params, batch)
  assert float(weight) == 6
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics['accuracy']) == pytest.approx(np.mean(rc > rr), abs=1e-6)
  np.testing.assert_allclose(float(metrics['margin']), np.mean(rc - rr), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics['rewards/rejected']), rr.mean(), rtol=1e-5, atol=1e-6)


def _one_batch_each_way(tok, render, *, packed_rows, pairs_per_row):
  """The same pairs (pair rows and a ranked row) as one batch of one pair per row
  and as one packed batch."""
  rows = ([_row(**r) for _, r in pref_sources.task_pairs('train', 2)] +
          [_row(**r) for _, r in pref_sources.ranked_task_rows('validation', 1)][:1])
  n = sum(len(pairs.row_pairs(r)) for r in rows)
  make = lambda rows_, per_row: next(iter(pairs.pair_dataset(
      [rows], [1.0], pairs.RenderPair(tok, 96, render=render), batch_size=rows_, seed=0, shuffle=False,
      num_epochs=1, pairs_per_row=per_row, drop_remainder=False)))
  plain, packed = make(n, 1), make(packed_rows, pairs_per_row)
  assert float(jnp.sum(pairs.pair_weights(packed, pairs_per_row))) == n  # all of them, packed
  assert packed['chosen_inputs'].shape[0] == packed_rows < n
  return ({k: jnp.asarray(v) for k, v in plain.items()}, {k: jnp.asarray(v) for k, v in packed.items()})


def _assert_same(a, b):
  (la, wa, ma), (lb, wb, mb) = a, b
  np.testing.assert_allclose(float(la), float(lb), rtol=0, atol=1e-6)
  assert float(wa) == float(wb) and ma.keys() == mb.keys()
  for k in ma:
    np.testing.assert_allclose(float(ma[k]), float(mb[k]), rtol=1e-6, atol=1e-6, err_msg=k)


def test_packed_reward_loss_equals_one_pair_per_row(tok):
  plain, packed = _one_batch_each_way(tok, pairs.render_scored, packed_rows=5, pairs_per_row=4)
  assert 'chosen_score_mask' in packed and 'chosen_score_index' in plain
  model, params = _score_model()
  run = lambda per_row, b: jax.jit(lambda p, b: reward.make_loss(_reward_cfg(0.2, 0.05, per_row))(
      model, p, b, {}, None))(params, b)
  _assert_same(run(1, plain), run(4, packed))


def test_packed_dpo_losses_equal_one_pair_per_row(tok):
  plain, packed = _one_batch_each_way(tok, pairs.render_side, packed_rows=5, pairs_per_row=4)
  model = Model(Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
  params, reference = init_params(model, seed=1), init_params(model, seed=2)
  from configs import dpo as dpo_cfg

  def losses_and_grad(pairs_per_row, batch):
    """Each loss type's (loss, weight, metrics) and DPO's gradient, in one compiled function."""
    fns = {}
    for loss_type in ('sigmoid', 'simpo', 'orpo'):
      c = dpo_cfg.get_config().dpo
      c.loss_type, c.rpo_alpha, c.pairs_per_row = loss_type, 0.5, pairs_per_row
      fns[loss_type] = functools.partial(dpo.make_loss(c), model, frozen={'reference': reference}, rng=None)
    return jax.jit(lambda p, b: ({k: f(p, b) for k, f in fns.items()},
                                 jax.grad(lambda q: fns['sigmoid'](q, b)[0])(p)))(params, batch)

  (want, g_want), (got, g_got) = losses_and_grad(1, plain), losses_and_grad(4, packed)
  for loss_type in want:
    _assert_same(want[loss_type], got[loss_type])
  # The gradient too: packing changes where tokens sit, not what is learnt.
  for a, b in zip(jax.tree.leaves(g_want), jax.tree.leaves(g_got)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def _stage_config(test_config, stage, section=None, **kw):
  """The test preset as a DPO or reward stage on the ranked tasks; `section`
  sets fields of the stage's own section."""
  from configs import dpo as dpo_cfg
  from configs import reward as reward_cfg
  c = test_config(**kw)
  s = (dpo_cfg if stage == 'dpo' else reward_cfg).get_config()
  with c.unlocked():
    c.stage = stage
    if stage == 'dpo':
      c.dpo, c.task_eval = s.dpo, s.task_eval
      c.task_eval.exact_match = False
      c.dpo.rpo_alpha = 0.0  # pure DPO: loss ln 2 at the reference
    else:
      c.reward = s.reward
      c.model.head = 'score'
    c.data.name, c.data.text_key, c.data.mix_weights = 'pref_tasks_ranked', '', ()
  c[stage].update(section or {})
  return c


def test_dpo_runs_on_ranked_rows(test_config, tmp_path):
  # Packed: 4 rows of 64 tokens, up to 4 pairs each (a ranking of 4 is 6 pairs).
  c = _stage_config(test_config, 'dpo', steps=6, log_every=1, seq_len=64, batch_size=4, eval_every=6,
                    eval_batches=1, optimizer__lr=3e-3, section=dict(pairs_per_row=4))
  run = tmp_path / 'dpo'
  train(c, run, devices=jax.devices()[:1])
  rows = [r for r in read_metrics(str(run)) if 'train/rewards/margins' in r]
  assert rows[0]['train/loss'] == pytest.approx(np.log(2), abs=1e-6)  # step 1: policy = reference
  assert np.mean([r['train/rewards/margins'] for r in rows[-3:]]) > 0
  assert np.mean([r['train/loss'] for r in rows[-3:]]) < np.log(2)


@pytest.mark.parametrize('pairs_per_row', [1, 3])
def test_reward_runs_on_ranked_rows_and_eval_reads_only_real_pairs(test_config, tmp_path, pairs_per_row):
  from research import rewards
  # One pair per row: 8 slots fit one ranking of 4 (6 pairs) and 2 padding pairs.
  # Packed: 4 rows of 48 tokens, two of these pairs to a row.
  c = _stage_config(test_config, 'reward', steps=4, log_every=1, seq_len=48, eval_every=4, eval_batches=2,
                    checkpoint_every=4, optimizer__lr=1e-2, batch_size=8 if pairs_per_row == 1 else 4,
                    section=dict(pairs_per_row=pairs_per_row))
  run = str(tmp_path / 'rm')
  train(c, run, devices=jax.devices()[:1])
  rows = read_metrics(run)
  assert len([r for r in rows if 'train/accuracy' in r]) == 4
  assert all(np.isfinite(r['train/loss']) for r in rows if 'train/loss' in r)
  evals = [r for r in rows if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [0, 4]

  # eval/accuracy is the share of the eval batches' real pairs the trained model ranks
  # right, pair by pair with unpadded forwards of the loaded run; padding pairs count nowhere.
  rm = rewards.load_reward_model(run)
  score = lambda ids: float(rm.model.apply({'params': rm.params}, jnp.asarray([ids]))[0][0, -1, 0])
  hits = []
  for batch in reward.stage(init.resolve_config(c)).eval_batches(rm.tokenizer):
    weights = np.asarray(pairs.pair_weights(batch, pairs_per_row)).reshape(-1, pairs_per_row)
    assert 0 < weights.sum() < weights.size  # rankings leave padding (or empty slots)
    for r, s in zip(*np.nonzero(weights)):
      reward_of = {}
      for side in pairs.SIDES:
        if pairs_per_row == 1:
          ids, last = batch[f'{side}_inputs'][r], batch[f'{side}_score_index'][r]
        else:
          here = batch[f'{side}_segment_ids'][r] == s + 1
          ids, last = batch[f'{side}_inputs'][r][here], np.flatnonzero(batch[f'{side}_score_mask'][r][here])[0]
        reward_of[side] = score(ids[:last + 1])
      diff = reward_of['chosen'] - reward_of['rejected']
      hits.append(1.0 if diff > 0 else 0.5 if diff == 0 else 0.0)
  assert evals[-1]['eval/accuracy'] == pytest.approx(np.mean(hits), abs=1e-6)
