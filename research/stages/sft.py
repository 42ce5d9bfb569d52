"""Supervised fine-tuning and instruction tuning on chat-formatted examples.

Rows (JSONL files, TFDS datasets or the embedded defaults) may be
{"prompt", "response"}, Alpaca {"instruction", "input", "output"} or
{"messages": [...]}; they are rendered with the chat template
(research/data/chat.py) and the loss covers the tokens chosen by
`config.sft.loss_mask` (assistant replies by default). Examples are packed
several per row with segment ids (`config.sft.packing=True`), or padded one
per row. Evaluation adds exact-match accuracy of greedy answers on the
held-out generated tasks (`eval/exact_match`, and per family).
"""

from __future__ import annotations

import grain
import numpy as np

from research import losses, sampling
from research.data import chat, pipeline
from research.data.tokenizer import Tokenizer
from research.errors import UserError

_SCAN_LIMIT = 200_000  # rows checked for malformed examples at start-up
BATCH_KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


def example_messages(example, text_key: str = '') -> list[dict] | None:
  """Messages of a stored row: embedded rows hold JSON in 'json', raw JSONL
  lines sit in 'text', TFDS datasets give fields directly."""
  if 'json' in example:
    return chat.to_messages(example['json'])
  if text_key and text_key in example:
    return chat.to_messages(example[text_key])
  if 'text' in example and len(example) <= 2:
    return chat.to_messages(example['text'])
  return chat.to_messages({k: v.decode('utf-8', 'replace') if isinstance(v, bytes) else v
                           for k, v in example.items()})


def check_rows(source, name: str, text_key: str, parse=None,
               expected: str = '"messages" (ending with an assistant turn), "prompt"/"response", '
                               'or "instruction"/"output"') -> None:
  """Counts malformed rows (parse(row, text_key) is None); reports them, and
  fails only if every row is bad."""
  parse = parse or example_messages
  n = min(len(source), _SCAN_LIMIT)
  bad = sum(parse(source[i], text_key) is None for i in range(n))
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


def _unpack_names(row):
  return {'inputs': row['inputs'], 'targets': row['targets'], 'loss_mask': row['loss_mask'],
          'segment_ids': row['inputs_segment_ids'], 'positions': row['inputs_positions']}


def sft_dataset(sources_list, weights, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                mask: str = 'assistant', packing: bool = True, text_key: str = '',
                shuffle: bool = True, num_epochs: int | None = None) -> grain.IterDataset:
  """Batches of rendered examples, packed (segment ids) or padded one per row."""
  ds = pipeline.mixed_source(sources_list, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  ds = ds.map(_Render(tokenizer, seq_len, mask, text_key)).filter(lambda x: x is not None)
  it = ds.to_iter_dataset()
  if packing:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={'inputs': seq_len, 'targets': seq_len, 'loss_mask': seq_len},
        num_packing_bins=max(8, batch_size), seed=seed, shuffle_bins=shuffle)
    it = it.map(_unpack_names)
  else:
    it = it.map(lambda x: pad_example(x, seq_len))
  return it.batch(batch_size, drop_remainder=True)


def train_dataset(config, tokenizer):
  """The shuffled, mixed, repeating stream of training batches."""
  d = config.data
  names, srcs, weights = pipeline.open_mixture(d, d.train_split)
  for n, src in zip(names, srcs):
    check_rows(src, n, d.text_key)
  return sft_dataset(srcs, weights, tokenizer, seq_len=config.seq_len,
                     batch_size=config.batch_size, seed=config.seed, mask=config.sft.loss_mask,
                     packing=config.sft.packing, text_key=d.text_key)


def eval_batches(config, tokenizer):
  """Held-out batches for the response loss: the validation splits, in order."""
  d = config.data
  _, srcs, weights = pipeline.open_mixture(d, d.eval_split)
  ds = sft_dataset(srcs, weights, tokenizer, seq_len=config.seq_len,
                   batch_size=config.batch_size, seed=0, mask=config.sft.loss_mask,
                   packing=config.sft.packing, text_key=d.text_key, shuffle=False, num_epochs=1)
  return pipeline.take_batches(ds, config.eval_batches)


def loss(model, params, batch, rng):
  """Cross-entropy on the masked (by default: assistant) target tokens."""
  logits_BTV, _ = model.apply({'params': params}, batch['inputs'], batch['positions'],
                              batch['segment_ids'], rngs={} if rng is None else {'dropout': rng})
  mask_BT = (batch['loss_mask'] > 0) & (batch['segment_ids'] > 0)
  ce, n = losses.cross_entropy(logits_BTV, batch['targets'], mask_BT)
  return ce, n, {}


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
  """Sample prompts go through the chat template as one user turn."""
  return chat.prompt_ids([{'role': 'user', 'content': text}], tokenizer)


def stop_tokens(tokenizer: Tokenizer):
  """Replies end at <|end|> (or eos)."""
  return chat.stop_tokens(tokenizer)


def exact_match(model, params, tokenizer: Tokenizer, rows: list[dict], *, max_new_tokens: int = 24,
                batch_size: int = 128) -> dict[str, float]:
  """Fraction of rows whose greedy reply equals row['answer'] (stripped), overall
  ('exact_match') and per family ('exact_match/<family>')."""
  prompts = [chat.prompt_ids(r['messages'], tokenizer) for r in rows]
  stops = chat.stop_tokens(tokenizer)
  correct = []
  for i in range(0, len(prompts), batch_size):
    chunk = prompts[i:i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
    outs = sampling.generate(model, params, padded, max_new_tokens=max_new_tokens,
                             stop_tokens=stops, pad_id=tokenizer.pad_id)[:len(chunk)]
    for out, row in zip(outs, rows[i:i + batch_size]):
      text = tokenizer.decode([t for t in out if t not in stops])
      correct.append(text.strip() == row['answer'].strip())
  result = {'exact_match': float(np.mean(correct))}
  for family in sorted({r['family'] for r in rows}):
    hits = [c for c, r in zip(correct, rows) if r['family'] == family]
    result[f'exact_match/{family}'] = float(np.mean(hits))
  return result


def _task_rows(config) -> list[dict]:
  import json  # pylint: disable=import-outside-toplevel
  src = pipeline.open_named(config.data, 'sft_tasks', 'validation')
  rows = [json.loads(src[i]['json']) for i in range(len(src))]
  rows.sort(key=lambda r: (r['family'], r['messages'][0]['content']))
  n = config.task_eval.examples
  return rows[:n] if n > 0 else rows


def evaluate(trainer, params, tokenizer: Tokenizer) -> dict[str, float]:
  """Exact match on the held-out generated tasks (when config.task_eval.exact_match)."""
  if not trainer.config.task_eval.exact_match:
    return {}
  if not hasattr(trainer, '_task_rows'):
    trainer._task_rows = _task_rows(trainer.config)  # pylint: disable=protected-access
  return exact_match(trainer.model, params, tokenizer, trainer._task_rows,  # pylint: disable=protected-access
                     max_new_tokens=trainer.config.task_eval.max_new_tokens)


__all__ = ['train_dataset', 'eval_batches', 'loss', 'evaluate', 'exact_match', 'sft_dataset',
           'example_messages', 'check_rows', 'render_example', 'pad_example']
