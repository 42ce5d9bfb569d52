"""Preference pairs: {"prompt", "chosen", "rejected"} rows -> one array set per side.

`prompt`, `chosen` and `rejected` are strings or message lists (rendered with
the chat template). A batch holds every array of a side renderer twice, as
`chosen_<key>` and `rejected_<key>`. Two side renderers:

* `render_side` (DPO and relatives): the SFT arrays, padded, with the loss mask
  on the final assistant reply only: inputs, targets, loss_mask, segment_ids,
  positions, int32 [seq_len] each.
* `render_scored` (reward models): inputs, segment_ids, positions [seq_len] and
  score_index, the position of the reply's last token, where the reward is read.

Pairs whose sides render identically (they differ only beyond seq_len) are
dropped: there is nothing to prefer.
"""

from __future__ import annotations

import json
from typing import Callable

import grain
import jax.numpy as jnp
import numpy as np

from research.data import chat, pipeline, sft
from research.data.tokenizer import Tokenizer

SIDES = ('chosen', 'rejected')
SCORED_KEYS = ('inputs', 'segment_ids', 'positions', 'score_index')


def side_keys(keys) -> tuple[str, ...]:
  """Batch keys of a pair batch whose sides hold arrays `keys`."""
  return tuple(f'{side}_{k}' for side in SIDES for k in keys)


def pair_messages(example, text_key: str = ''):
  """(chosen messages, rejected messages) of a stored row, or None if malformed."""
  try:
    raw = example.get('json', example.get(text_key or 'text'))
    row = json.loads(raw) if raw is not None else {
        k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}
    prompt = row['prompt']
    prompt = json.loads(prompt) if isinstance(prompt, str) and prompt.startswith('[{') else prompt
    history = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)
    out = []
    for side in SIDES:
      reply = row[side]
      msgs = history + ([{'role': 'assistant', 'content': reply}] if isinstance(reply, str) else list(reply))
      msgs = chat.to_messages({'messages': msgs})
      if msgs is None:
        return None
      out.append(msgs)
  except (ValueError, KeyError, TypeError, AttributeError):
    return None
  return tuple(out)


def render_side(messages: list[dict], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """One side of a pair for DPO: the SFT arrays, padded, with the loss on the last reply."""
  return sft.pad_example(sft.render_example(messages, tokenizer, seq_len, mask='completion'), seq_len)


def render_scored(messages: list[dict], tokenizer: Tokenizer, seq_len: int) -> dict | None:
  """One conversation for a reward model -> inputs, segment_ids, positions [seq_len]
  and score_index (the reply's last token, where the reward is read).

  The reply's closing <|end|> is not fed: the hidden state of the last reply
  token is the one SFT trained to predict whether the reply ends there, so it
  already carries a judgement of the whole reply, while <|end|>'s own state was
  never trained (SFT has no target after it); experiments/results/preference.md
  has the numbers. Longer conversations are cut at seq_len; None if no reply
  token is left.
  """
  ids, weights = chat.render(messages, tokenizer, mask='completion')
  if len(ids) and ids[-1] == tokenizer.special_id('<|end|>'):
    ids, weights = ids[:-1], weights[:-1]
  ids, weights = ids[:seq_len], weights[:seq_len]
  scored = np.flatnonzero(np.asarray(weights) > 0)
  if not len(scored):
    return None
  n, T = len(ids), seq_len
  inside = np.arange(T) < n
  return {'inputs': np.pad(np.asarray(ids, np.int32), (0, T - n)),
          'segment_ids': inside.astype(np.int32),
          'positions': np.where(inside, np.arange(T), 0).astype(np.int32),
          'score_index': np.int32(scored[-1])}


SideRenderer = Callable[[list, Tokenizer, int], 'dict | None']


class RenderPair(grain.transforms.Map):
  """Row -> chosen_* and rejected_* arrays, each side from render(messages,
  tokenizer, seq_len); None if the row is malformed, a side renders to None, or
  both sides are the same within seq_len (nothing to prefer)."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, text_key: str = '',
               render: SideRenderer = render_side):
    self.tokenizer, self.seq_len, self.text_key, self.render = tokenizer, seq_len, text_key, render

  def map(self, example):
    pair = pair_messages(example, self.text_key)
    if pair is None:
      return None
    chosen, rejected = (self.render(m, self.tokenizer, self.seq_len) for m in pair)
    if chosen is None or rejected is None or all(np.array_equal(chosen[k], rejected[k]) for k in chosen):
      return None
    return {f'{side}_{k}': v for side, arrays in zip(SIDES, (chosen, rejected)) for k, v in arrays.items()}


def pair_dataset(sources_list, weights, render: RenderPair, *, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of preference pairs, one pair per row on each side."""
  ds = pipeline.mixed_source(sources_list, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  ds = ds.map(render).filter(lambda x: x is not None)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def train_dataset(data_cfg, render: RenderPair, *, batch_size: int, seed: int) -> grain.IterDataset:
  """The shuffled, mixed, repeating stream of pair batches of config.data."""
  names, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.train_split)
  for name, src in zip(names, srcs):
    sft.check_rows(src, name, data_cfg.text_key, parse=pair_messages,
                   expected='"prompt", "chosen" and "rejected"')
  return pair_dataset(srcs, weights, render, batch_size=batch_size, seed=seed)


def eval_batches(data_cfg, render: RenderPair, *, batch_size: int, max_batches: int) -> list[dict]:
  """Held-out pair batches of config.data, in storage order."""
  _, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.eval_split)
  ds = pair_dataset(srcs, weights, render, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1)
  return pipeline.take_batches(ds, max_batches)


def stack_sides(batch: dict, key: str):
  """[2B, ...]: the chosen rows of batch[`chosen_<key>`], then the rejected rows,
  so both sides go through the model in one forward pass."""
  return jnp.concatenate([batch[f'chosen_{key}'], batch[f'rejected_{key}']], axis=0)
