"""Supervised fine-tuning data: rows -> chat-rendered, loss-masked token arrays.

Rows (JSONL files, TFDS datasets or the embedded defaults) may be
{"prompt", "response"}, Alpaca {"instruction", "input", "output"} or
{"messages": [...]}; they are rendered with the chat template (chat.py) and
the loss covers the tokens chosen by the mask mode (assistant replies by
default). Examples are packed several per row with segment ids, or padded one
per row. A batch holds int32 [batch, seq_len] arrays:

    inputs, targets, loss_mask, segment_ids (0 = padding), positions
"""

from __future__ import annotations

import json

import grain
import numpy as np

from research.data import chat, pipeline, sources
from research.data.tokenizer import Tokenizer
from research.errors import UserError

_SCAN_LIMIT = 200_000  # rows checked for malformed examples at start-up
BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


def example_fields(example) -> dict:
  """A stored row's fields (an embedded row's JSON decoded, bytes as text)."""
  if 'json' in example:
    return json.loads(example['json'])
  return {k: v.decode('utf-8', 'replace') if isinstance(v, bytes) else v for k, v in example.items()}


def example_messages(example, text_key: str = '') -> list[dict] | None:
  """Messages of a stored row: embedded rows hold JSON in 'json', raw JSONL
  lines sit in 'text', TFDS datasets give fields directly. None if malformed."""
  if 'json' in example:
    return chat.to_messages(example['json'])
  if text_key and text_key in example:
    return chat.to_messages(example[text_key])
  if 'text' in example and len(example) <= 2:
    return chat.to_messages(example['text'])
  return chat.to_messages(example_fields(example))


def check_rows(source, name: str, text_key: str, parse=None,
               expected: str = '"messages" (ending with an assistant turn), "prompt"/"response", '
                               'or "instruction"/"output"') -> None:
  """Counts malformed rows (parse(row, text_key) is None); reports them, and
  fails only if every row is bad."""
  parse = parse or example_messages
  n = min(len(source), _SCAN_LIMIT)
  bad = sum(parse(row, text_key) is None for row in sources.first_rows(source, n))
  if n and bad == n:
    raise UserError(f'dataset {name!r}: all {n} rows are malformed; rows need {expected}.')
  if bad:
    print(f'warning: dataset {name!r}: skipped {bad} malformed of the first {n} rows', flush=True)


def render_example(messages: list[dict], tokenizer: Tokenizer, seq_len: int,
                   mask: str = 'assistant') -> dict[str, np.ndarray]:
  """Messages -> {'inputs', 'targets', 'loss_mask'}, at most seq_len long."""
  ids, weights = chat.render(messages, tokenizer, mask=mask)
  ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
  return {'inputs': ids[:-1], 'targets': ids[1:], 'loss_mask': weights[1:]}


class _Render(grain.transforms.Map):
  """Row -> render_example(...), or None if malformed."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, mask: str, text_key: str):
    self.tokenizer, self.seq_len, self.mask, self.text_key = tokenizer, seq_len, mask, text_key

  def map(self, example):
    messages = example_messages(example, self.text_key)
    if messages is None:
      return None
    return render_example(messages, self.tokenizer, self.seq_len, self.mask)


def pad_example(example: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One example padded to seq_len, with segment_ids (1, 0 = padding) and positions."""
  n = len(example['inputs'])
  out = {k: np.pad(v, (0, seq_len - n)) for k, v in example.items()}
  out['segment_ids'] = (np.arange(seq_len) < n).astype(np.int32)
  out['positions'] = np.where(out['segment_ids'] > 0, np.arange(seq_len), 0).astype(np.int32)
  return out


def sft_dataset(sources_list, weights, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                mask: str = 'assistant', packing: bool = True, text_key: str = '',
                shuffle: bool = True, num_epochs: int | None = None,
                stream: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """Batches of rendered examples, packed (segment ids) or padded one per row;
  `stream` = (s, n): only stream s of n (pipeline.take_stream)."""
  ds = pipeline.mixed_source(sources_list, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  ds = pipeline.take_stream(ds, *stream)
  ds = ds.map(_Render(tokenizer, seq_len, mask, text_key)).filter(lambda x: x is not None)
  it = pipeline.to_iter(ds)
  if packing:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={'inputs': seq_len, 'targets': seq_len, 'loss_mask': seq_len},
        num_packing_bins=max(8, batch_size), seed=seed, shuffle_bins=shuffle)
    it = it.map(pipeline.rename_packed)
  else:
    it = it.map(lambda x: pad_example(x, seq_len))
  return it.batch(batch_size, drop_remainder=True)


def train_dataset(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int, mask: str,
                  packing: bool, stream: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """The shuffled, mixed, repeating stream of training batches of config.data."""
  names, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.train_split)
  for n, src in zip(names, srcs):
    check_rows(src, n, data_cfg.text_key)
  return sft_dataset(srcs, weights, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                     mask=mask, packing=packing, text_key=data_cfg.text_key, stream=stream)


def eval_batches(data_cfg, tokenizer, *, seq_len: int, batch_size: int, mask: str, packing: bool,
                 max_batches: int) -> list[dict[str, np.ndarray]]:
  """Held-out batches of config.data's validation splits, in storage order."""
  _, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.eval_split)
  ds = sft_dataset(srcs, weights, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0, mask=mask,
                   packing=packing, text_key=data_cfg.text_key, shuffle=False, num_epochs=1)
  return pipeline.take_batches(ds, max_batches)


def check_families(srcs, names, families: tuple[str, ...]) -> None:
  """UserError unless some of the first rows of the datasets `srcs` has a
  'family' field in `families` (else a filtered stream would never yield)."""
  def row_families():
    for src in srcs:
      for row in sources.first_rows(src, min(len(src), _SCAN_LIMIT)):
        yield example_fields(row).get('family')
  if not any(f in families for f in row_families()):  # stops at the first match
    have = sorted({str(f) for f in row_families()})
    raise UserError(f'no rows of the task families {list(families)} in {", ".join(names)} (their rows have '
                    f'"family" {have[:10]}); set the prompt families to some of those, or () for all rows.')


class _Prompt(grain.transforms.Map):
  """Row -> {'ids': the chat prompt's token ids, 'messages': the prompt, 'row':
  the row's fields}, or None if malformed, the prompt is longer than max_len, or
  `families` is given and the row's 'family' field is not one of them."""

  def __init__(self, tokenizer: Tokenizer, max_len: int, text_key: str, families: tuple[str, ...] = ()):
    self.tokenizer, self.max_len, self.text_key, self.families = tokenizer, max_len, text_key, families

  def map(self, example):
    messages = example_messages(example, self.text_key)
    if messages is None:
      return None
    row = example_fields(example)
    if self.families and row.get('family') not in self.families:
      return None  # before tokenizing: most rows may be filtered out
    ids = chat.prompt_ids(messages, self.tokenizer)
    if len(ids) > self.max_len:
      return None
    return {'ids': ids, 'messages': messages[:-1], 'row': row}


def prompt_stream(data_cfg, tokenizer, *, max_len: int, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, families: tuple[str, ...] = ()) -> grain.IterDataset:
  """Prompts (the conversation before its last reply) of config.data's train
  split, one at a time, shuffled and repeating: for online RL, where the
  replies are sampled. Prompts longer than max_len tokens are skipped, and so
  are rows whose 'family' field is not in `families` when that is given."""
  names, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.train_split)
  for n, src in zip(names, srcs):
    check_rows(src, n, data_cfg.text_key)
  if families:
    check_families(srcs, names, tuple(families))
  ds = pipeline.mixed_source(srcs, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  ds = ds.map(_Prompt(tokenizer, max_len, data_cfg.text_key, tuple(families)))
  return pipeline.to_iter(ds.filter(lambda x: x is not None))
