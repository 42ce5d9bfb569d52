"""Reward stage: the score head against HF's sequence classifier, the loss
against numpy, init from a language model, training and loading for RL."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import full_forward, init_params, make_trainer, reference_reward, train
from research import rewards
from research.data import chat, pairs, pref_sources
from research.errors import UserError
from research.models.llama import Config, Model
from research.stages import reward
from research.training import checkpoint as ckpt_lib
from research.training import init
from research.training.metrics import read_metrics


def test_score_head_matches_transformers_sequence_classifier(tmp_path):
  import torch  # test oracle
  import transformers
  from research.interop import hf
  cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                 num_labels=1, pad_token_id=0)
  torch.manual_seed(0)
  theirs = transformers.LlamaForSequenceClassification(cfg).eval()
  with torch.no_grad():
    for p in theirs.parameters():
      p.copy_(0.1 * torch.randn_like(p))
  theirs.save_pretrained(str(tmp_path / 'hf'), safe_serialization=True)
  model, params = hf.load_pretrained(str(tmp_path / 'hf'))
  assert model.cfg.head == 'score' and params['score']['kernel'].shape == (64, 1)

  # Right-padded rows of different lengths; HF reads the last non-padding token.
  rng = np.random.RandomState(0)
  lengths = [5, 12, 9]
  tokens = np.zeros((3, 12), np.int32)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.randint(1, 512, n)
  with torch.no_grad():
    want = theirs(torch.tensor(tokens)).logits[:, 0].numpy()
  seg = (tokens > 0).astype(np.int32)
  pos = np.where(seg > 0, np.arange(12), 0)
  got = np.asarray(rewards.scores(model, params, tokens, pos, seg, np.array(lengths) - 1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  hf.save_pretrained(str(tmp_path / 'out'), model, params)  # and back: transformers loads ours
  again = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / 'out'))
  with torch.no_grad():
    np.testing.assert_allclose(again(torch.tensor(tokens)).logits[:, 0].numpy(), want, rtol=1e-6)


def _pair_batch(tok, n=4, seq_len=48):
  rows = [{'json': json.dumps(r)} for _, r in pref_sources.task_pairs('train', n)]
  ds = pairs.pair_dataset([rows], [1.0], pairs.RenderPair(tok, seq_len, render=pairs.render_scored),
                          batch_size=n, seed=0, shuffle=False, num_epochs=1)
  return rows, next(iter(ds))


def test_loss_matches_numpy_on_unpadded_forwards(tok):
  rows, batch = _pair_batch(tok)
  assert batch['chosen_score_index'].shape == (4,) and batch['chosen_inputs'].shape == (4, 48)
  model = Model(Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, head='score'))
  params = init_params(model, seed=1)
  sides = [pairs.pair_messages(r) for r in rows[:4]]  # the first batch
  rc = np.array([reference_reward(model, params, tok, c) for c, _ in sides])
  rr = np.array([reference_reward(model, params, tok, r) for _, r in sides])
  margin, coef = 0.3, 0.05
  diff = rc - rr - margin
  want = np.mean(np.log1p(np.exp(-diff))) + coef * np.mean((rc + rr) ** 2)

  from configs import reward as reward_cfg
  c = reward_cfg.get_config().reward
  c.margin, c.center_coef = margin, coef
  loss, weight, metrics = reward.make_loss(c)(model, params, {k: jnp.asarray(v) for k, v in batch.items()},
                                              {}, None)
  assert float(weight) == 4
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics['accuracy']) == np.mean(rc > rr)
  np.testing.assert_allclose(float(metrics['rewards/chosen']), rc.mean(), rtol=1e-5, atol=1e-6)


def _reward_config(test_config, **kw):
  from configs import reward as reward_cfg
  c = test_config(**kw)
  r = reward_cfg.get_config()
  with c.unlocked():
    c.stage, c.reward = 'reward', r.reward
    c.reward.pairs_per_row = 1  # one pair per row (the tiny preset packs; tests/test_ranked.py tests that)
    c.model.head = 'score'
    c.data.name, c.data.text_key, c.data.mix_weights = 'pref_tasks', '', ()
  return c


# One worker runs the module (make test's --dist loadgroup): its training fixture is built once.
pytestmark = pytest.mark.xdist_group('test_reward')


@pytest.fixture(scope='module')
def lm_run(tmp_path_factory, corpus_dir, data_dir):
  """A two-step language-model run to start reward models from."""
  from conftest import make_test_config
  run = str(tmp_path_factory.mktemp('lm'))
  train(make_test_config(corpus_dir, data_dir, steps=2, checkpoint_every=2), run, devices=jax.devices()[:1])
  return run


def test_backbone_comes_from_the_language_model_and_its_head_is_new(lm_run, test_config):
  devices = jax.devices()[:1]
  lm_state, _, _ = init.setup_state(make_trainer(test_config(), devices), ckpt_lib.Checkpointer(lm_run))
  t = make_trainer(_reward_config(test_config, init_from=lm_run), devices)
  state, frozen, _ = init.setup_state(t, None)
  assert frozen == {}
  assert 'lm_head' in lm_state.params and 'lm_head' not in state.params
  assert state.params['score']['kernel'].shape == (t.config.model.d_model, 1)
  for name in lm_state.params:  # bit for bit
    if name != 'lm_head':
      for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(lm_state.params[name])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_model_that_does_not_fit_the_checkpoint_is_an_error(lm_run, test_config):
  t = make_trainer(_reward_config(test_config, init_from=lm_run, model__n_layers=3), jax.devices()[:1])
  with pytest.raises(UserError, match='do not fit'):
    init.setup_state(t, None)
  with pytest.raises(UserError, match='not a reward model'):
    rewards.load_reward_model(lm_run)
  lm_head = _reward_config(test_config)
  lm_head.model.head = 'lm'
  with pytest.raises(UserError, match="head='score'"):
    make_trainer(lm_head)


def test_lora_reward_model_trains_the_head_in_full(lm_run, test_config):
  t = make_trainer(_reward_config(test_config, init_from=lm_run, lora__rank=4), jax.devices()[:1])
  state, frozen, _ = init.setup_state(t, None)
  assert 'score' in state.params and 'score' not in frozen['base']
  assert {'lora_a', 'lora_b'} == set(state.params['layers_0']['attn']['q'])


def test_training_lowers_the_loss_and_logs_exact_eval_accuracy(lm_run, test_config, tmp_path, tok):
  cfg = _reward_config(test_config, steps=12, log_every=1, eval_every=12, checkpoint_every=12,
                       seq_len=48, init_from=lm_run, optimizer__lr=1e-2, eval_batches=1)
  run = str(tmp_path / 'rm')
  train(cfg, run, devices=jax.devices()[:1])
  rows = read_metrics(run)
  train_rows = [r for r in rows if 'train/accuracy' in r]
  assert len(train_rows) == 12
  assert np.mean([r['train/loss'] for r in train_rows[-4:]]) < np.mean([r['train/loss'] for r in train_rows[:4]])
  evals = [r for r in rows if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [0, 12] and 'eval/perplexity' not in evals[-1]

  # eval/accuracy is the share of the held-out batch's pairs the trained model ranks
  # right, recomputed pair by pair with unpadded forwards of the loaded run.
  rm = rewards.load_reward_model(run)
  tokenizer = rm.tokenizer
  stage = reward.stage(init.resolve_config(cfg))
  batch = stage.eval_batches(tokenizer)[0]
  got = []
  for i in range(cfg.batch_size):
    side = {s: batch[f'{s}_inputs'][i][:batch[f'{s}_score_index'][i] + 1] for s in pairs.SIDES}
    r = {s: float(full_forward(rm.model, rm.params, [ids])[0, -1, 0]) for s, ids in side.items()}
    got.append(1.0 if r['chosen'] > r['rejected'] else 0.5 if r['chosen'] == r['rejected'] else 0.0)
  assert evals[-1]['eval/accuracy'] == pytest.approx(np.mean(got), abs=1e-6)


def test_loaded_for_rl_scores_match_unpadded_forwards(lm_run, test_config, tmp_path):
  run = str(tmp_path / 'rm')
  train(_reward_config(test_config, steps=2, checkpoint_every=2, seq_len=48, init_from=lm_run), run,
        devices=jax.devices()[:1])
  rm = rewards.load_reward_model(run)
  sides = [pairs.pair_messages({'json': json.dumps(r)}) for _, r in pref_sources.task_pairs('validation', 3)]
  convos = [c for pair in sides for c in pair]
  got = rm.score(convos, batch_size=4)
  want = [reference_reward(rm.model, rm.params, rm.tokenizer, m) for m in convos]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  # The evaluator online RL logs: exact match and the reward model's mean score
  # of one set of greedy replies, against replies scored here by unpadded forwards.
  from research import evaluation, sampling
  lm = init.load_params(lm_run)
  data_cfg = init.resolve_config(test_config()).data
  rows = evaluation.task_rows(data_cfg, examples=6)
  got = evaluation.GreedyTaskEval(data_cfg, examples=6, max_new_tokens=6, reward_models=(run,))(
      sampling.Policy(lm.model, lm.params), lm.tokenizer, {})
  replies = evaluation.greedy_replies(lm.model, lm.params, lm.tokenizer, rows, max_new_tokens=6)
  scores = [reference_reward(rm.model, rm.params, rm.tokenizer,
                              chat.history(r['messages']) + [{'role': 'assistant', 'content': text}])
            for r, text in zip(rows, replies)]
  assert got['reward_model/score'] == pytest.approx(np.mean(scores), rel=1e-5, abs=1e-6)
  assert got['exact_match'] == np.mean([text.strip() == r['answer'].strip() for text, r in zip(replies, rows)])
