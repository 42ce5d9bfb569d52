"""Pretraining: next-token prediction on packed documents."""

from __future__ import annotations

from research import evaluation, losses, models
from research.data import chat, pipeline
from research.training.stage import Stage

BATCH_AXES = {k: ('batch', 'length') for k in ('inputs', 'targets', 'segment_ids', 'positions')}


def loss(model, params, batch, frozen, rng):
  """Mean next-token cross-entropy over non-padding tokens (rng: dropout, None in eval)."""
  del frozen
  logps_BT = models.target_log_probs(model, params, batch, rng)  # chunked with config.model.logits_chunk
  ce, n_tokens = losses.masked_mean_nll(logps_BT, batch['segment_ids'] > 0)
  return ce, n_tokens, {}


def stage(config) -> Stage:
  """Pretraining on config.data: shuffled packed rows; eval loss and perplexity on
  the fixed validation rows; plain-text samples."""
  d = config.data

  def train_source(tokenizer):
    src = pipeline.open_source(d, d.train_split)
    return pipeline.stream_source(lambda s, n, rows: pipeline.packed_dataset(
        src, tokenizer, seq_len=config.seq_len, batch_size=rows, seed=config.seed, text_key=d.text_key,
        add_bos=d.add_bos, add_eos=d.add_eos, shuffle_window=d.shuffle_window, stream=(s, n)),
        d.streams, config.batch_size)

  def eval_batches(tokenizer):
    return pipeline.eval_batches(d, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size,
                                 max_batches=config.eval_batches)

  return Stage(name='pretrain', loss=loss, batch_axes=BATCH_AXES, train_source=train_source,
               eval_batches=eval_batches, evaluators=(evaluation.perplexity,), prompt_format=chat.PLAIN)
