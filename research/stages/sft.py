"""Supervised fine-tuning and instruction tuning on chat-formatted examples.

Data (research/data/sft.py): {"prompt", "response"}, Alpaca or {"messages"}
rows rendered with the chat template; the loss covers the tokens chosen by
`config.sft.loss_mask` (assistant replies by default), with examples packed
(`config.sft.packing=True`) or padded one per row. Evaluation logs the
held-out response loss and perplexity, and exact match of greedy answers on
the held-out generated tasks (`eval/exact_match`, and per family) when
`config.task_eval.exact_match`.
"""

from __future__ import annotations

from research import evaluation, losses, models
from research.data import chat, pipeline
from research.data import sft as sft_data
from research.training.stage import Stage

BATCH_AXES = {k: ('batch', 'length') for k in sft_data.BATCH_KEYS}


def loss(model, params, batch, frozen, rng):
  """Cross-entropy on the masked (by default: assistant) target tokens."""
  del frozen
  logps_BT = models.target_log_probs(model, params, batch, rng)  # chunked with config.model.logits_chunk
  mask_BT = (batch['loss_mask'] > 0) & (batch['segment_ids'] > 0)
  ce, n = losses.masked_mean_nll(logps_BT, mask_BT)
  return ce, n, {}


def stage(config) -> Stage:
  """SFT on config.data with config.sft's loss mask and packing."""
  d, s = config.data, config.sft
  shape = dict(seq_len=config.seq_len, batch_size=config.batch_size, mask=s.loss_mask, packing=s.packing)
  return Stage(
      name='sft', loss=loss, batch_axes=BATCH_AXES,
      train_source=lambda tok: pipeline.stream_source(
          lambda s, n, rows: sft_data.train_dataset(d, tok, seed=config.seed, stream=(s, n),
                                                    **dict(shape, batch_size=rows)),
          d.streams, config.batch_size),
      eval_batches=lambda tok: sft_data.eval_batches(d, tok, max_batches=config.eval_batches, **shape),
      evaluators=(evaluation.perplexity,) + evaluation.task_evaluators(d, config.task_eval), prompt_format=chat.CHAT)
