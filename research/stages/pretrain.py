"""Pretraining: next-token prediction on packed documents."""

from __future__ import annotations

from research import losses
from research.data import pipeline


def train_dataset(config, tokenizer):
  """Shuffled, repeating stream of packed global batches."""
  d = config.data
  src = pipeline.open_source(d, d.train_split)
  return pipeline.packed_dataset(src, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size,
                                 seed=config.seed, text_key=d.text_key, add_bos=d.add_bos,
                                 add_eos=d.add_eos, shuffle_window=d.shuffle_window)


def eval_batches(config, tokenizer):
  """The fixed validation batches."""
  return pipeline.eval_batches(config.data, tokenizer, seq_len=config.seq_len,
                               batch_size=config.batch_size, max_batches=config.eval_batches)


def loss(model, params, batch, rng):
  """Mean next-token cross-entropy over non-padding tokens (rng: dropout, None in eval)."""
  logits_BTV, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                              batch['segment_ids'], rngs={} if rng is None else {'dropout': rng})
  ce, n_tokens = losses.cross_entropy(logits_BTV, batch['targets'], batch['segment_ids'] > 0)
  return ce, n_tokens, {}
