"""Reward stage: the score head against HF's sequence classifier, the loss
against numpy, init from a language model, training and loading for RL."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.data import pref_sources
from research.data.tokenizer import train_tokenizer
from research.errors import UserError
from research.models.llama import ModelConfig, Transformer
from research.stages import dpo, pretrain, reward
from research.training import checkpoint as ckpt_lib
from research.training import trainer as trainer_lib
from research.training.metrics import read_metrics


@pytest.fixture(scope='module')
def tok(corpus_dir):
  texts = [open(os.path.join(corpus_dir, f)).read() for f in sorted(os.listdir(corpus_dir))]
  return train_tokenizer(texts, 512)


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
  last = np.zeros_like(seg)
  last[np.arange(3), np.array(lengths) - 1] = 1
  got = np.asarray(reward.scores(model, params, tokens, pos, seg, last))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

  hf.save_pretrained(str(tmp_path / 'out'), model, params)  # and back: transformers loads ours
  again = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / 'out'))
  with torch.no_grad():
    np.testing.assert_allclose(again(torch.tensor(tokens)).logits[:, 0].numpy(), want, rtol=1e-6)


def _pair_batch(tok, n=4, seq_len=48):
  rows = [{'json': json.dumps(r)} for _, r in pref_sources.task_pairs('train', n)]
  render = reward.pair_render(tok, seq_len, '')
  ds = dpo.pair_dataset([rows], [1.0], tok, seq_len=seq_len, batch_size=n, seed=0, shuffle=False,
                        num_epochs=1, render=render)
  return rows, next(iter(ds))


def test_loss_matches_numpy_on_unpadded_forwards(tok):
  rows, batch = _pair_batch(tok)
  model = Transformer(ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  d_ff=64, head='score'))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32)))['params']
  end = tok.special_id('<|end|>')

  def reference_reward(messages):
    # Independent of the pipeline's padding and score mask: render, drop the
    # closing <|end|>, forward the unpadded sequence, read the final position.
    from research.data import chat
    ids, _ = chat.render(messages, tok, mask='completion')
    assert ids[-1] == end
    out, _ = model.apply({'params': params}, jnp.asarray([ids[:-1]]))
    return float(out[0, -1, 0])

  pairs = [dpo.pair_messages(r) for r in rows[:4]]  # the first batch
  rc = np.array([reference_reward(c) for c, _ in pairs])
  rr = np.array([reference_reward(r) for _, r in pairs])
  margin, coef = 0.3, 0.05
  diff = rc - rr - margin
  want = np.mean(np.log1p(np.exp(-diff))) + coef * np.mean((rc + rr) ** 2)

  from configs import reward as reward_cfg
  c = reward_cfg.get_config()
  c.reward.margin, c.reward.center_coef = margin, coef
  loss, weight, metrics = reward.make_loss(c)(model, params, {k: jnp.asarray(v) for k, v in batch.items()},
                                              None)
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
    c.model.head = 'score'
    c.data.name, c.data.text_key, c.data.mix_weights = 'pref_tasks', '', ()
  return c


def test_reward_run_from_a_language_model_trains_and_loads_for_rl(test_config, tmp_path, tok):
  devices = jax.devices()[:1]
  lm_run = str(tmp_path / 'lm')
  trainer_lib.train(test_config(steps=2, checkpoint_every=2), lm_run, devices=devices)
  lm = trainer_lib.Trainer(test_config(), lm_run, pretrain, devices=devices)
  lm_state, _, _, _ = lm.setup_state(ckpt_lib.Checkpointer(lm_run))

  # The backbone is the language model's, bit for bit; its output layer is dropped.
  cfg = _reward_config(test_config, steps=12, log_every=1, eval_every=12, checkpoint_every=12,
                       seq_len=48, init_from=lm_run, optimizer__lr=1e-2)
  t = trainer_lib.Trainer(cfg, str(tmp_path / 'rm0'), reward, devices=devices)
  state, _, _, _ = t.setup_state(None)
  assert 'lm_head' in lm_state.params and 'lm_head' not in state.params
  assert state.params['score']['kernel'].shape == (cfg.model.d_model, 1)
  for name in lm_state.params:
    if name != 'lm_head':
      for a, b in zip(jax.tree.leaves(state.params[name]), jax.tree.leaves(lm_state.params[name])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A model that does not fit the checkpoint is still an error, head or not.
  bad = _reward_config(test_config, init_from=lm_run, model__n_layers=3)
  with pytest.raises(UserError, match='do not fit'):
    trainer_lib.Trainer(bad, str(tmp_path / 'bad'), reward, devices=devices).setup_state(None)

  # With LoRA the new head trains in full next to the adapters.
  lora_t = trainer_lib.Trainer(_reward_config(test_config, init_from=lm_run, lora__rank=4),
                               str(tmp_path / 'rl'), reward, devices=devices)
  lora_state, frozen, _, _ = lora_t.setup_state(None)
  assert 'score' in lora_state.params and 'score' not in frozen

  run = str(tmp_path / 'rm')
  trainer_lib.train(cfg, run, devices=devices)
  rows = read_metrics(run)
  train_rows = [r for r in rows if 'train/accuracy' in r]
  assert len(train_rows) == 12
  assert np.mean([r['train/loss'] for r in train_rows[-4:]]) < np.mean([r['train/loss'] for r in train_rows[:4]])
  evals = [r for r in rows if 'eval/accuracy' in r]
  assert [r['step'] for r in evals] == [0, 12] and 0 <= evals[-1]['eval/accuracy'] <= 1

  # Loaded for RL: scoring conversations equals an unpadded forward of the trained model.
  rm = reward.load_reward_model(run)
  pairs = [dpo.pair_messages({'json': json.dumps(r)}) for _, r in pref_sources.task_pairs('validation', 3)]
  convos = [c for pair in pairs for c in pair]
  got = rm.score(convos, batch_size=4)
  from research.data import chat
  for messages, value in zip(convos, got):
    ids, _ = chat.render(messages, rm.tokenizer, mask='completion')
    out, _ = rm.model.apply({'params': rm.params}, jnp.asarray([ids[:-1]]))  # without <|end|>
    np.testing.assert_allclose(value, float(out[0, -1, 0]), rtol=1e-5, atol=1e-6)
