"""Preference data: pair rows and ranked rows -> batches of (chosen, rejected) pairs.

Two kinds of row; prompts and replies are strings or message lists (rendered
with the chat template):

* pair rows {"prompt", "chosen", "rejected"}: one pair;
* ranked rows {"prompt", "ranked": [best, ..., worst]}, K >= 2 distinct
  replies: all K(K-1)/2 pairs (better, worse), as InstructGPT trains its
  reward model (Ouyang et al., 2022). All pairs of a row go into the same
  batch, so a loss over the batch sees every comparison of the prompt together.

Each conversation is rendered by a side renderer:

* `render_side` (DPO and relatives): the SFT arrays, padded, with the loss mask
  on the final assistant reply only: inputs, targets, loss_mask, segment_ids,
  positions, int32 [seq_len] each.
* `render_scored` (reward models): inputs, segment_ids, positions [seq_len] and
  score_index, the position of the reply's last token, where the reward is read.

A batch holds every array of a side twice, as `chosen_<key>` and
`rejected_<key>`, in one of two layouts, chosen by `pairs_per_row`:

* 1: one pair per row, padded to seq_len; `batch_size` pair slots. The slots
  a batch has left when the next row's pairs do not fit are padding pairs
  (all-zero rows: segment ids 0, weight 0), and that row starts the next
  batch. Pair rows alone fill every slot: the batches are exactly grain's
  `.batch(batch_size)`, and so is the checkpointed iterator state.
* > 1 (packed): `batch_size` rows of seq_len tokens per side, each holding up
  to `pairs_per_row` pairs back to back (first fit, in stream order; the
  next row's pairs go in whole or start the next batch). Pair s of row r is
  segment s + 1 of row r on both sides (positions restart at 0 per pair, and
  attention stays inside a segment). Reward batches mark the scored token of
  each pair with `score_mask` [seq_len] instead of score_index. Most pairs
  are far shorter than seq_len, so this skips most of the padding; the number
  of pairs in a batch varies.

`pair_weights` gives each pair slot's weight (1 for a real pair, 0 for padding);
the stage losses are means over real pairs and return their number as the
trainer's weight, so gradient accumulation stays exact.

Pairs whose sides render identically (they differ only beyond seq_len) are
dropped: there is nothing to prefer (in a ranking, only that pair). Malformed
rows (for rankings also: fewer than two replies, a reply twice, a reply that
is neither a string nor a message list) are counted and reported at start-up,
and skipped; so are rows with more pairs than a batch holds.
"""

from __future__ import annotations

import itertools
import json
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np

from research.data import chat, pipeline, sft, sources
from research.data.tokenizer import Tokenizer
from research.errors import UserError

SIDES = ('chosen', 'rejected')
SCORED_KEYS = ('inputs', 'segment_ids', 'positions', 'score_index')
PACKED_SCORED_KEYS = ('inputs', 'segment_ids', 'positions', 'score_mask')
_ROW_ERRORS = (ValueError, KeyError, TypeError, AttributeError)
_SCAN_LIMIT = 200_000  # rows checked for malformed ones at start-up, as for SFT data


def side_keys(keys) -> tuple[str, ...]:
  """Batch keys of a pair batch whose sides hold arrays `keys`."""
  return tuple(f'{side}_{k}' for side in SIDES for k in keys)


def _stored_row(example, text_key: str) -> dict:
  """The row dict of a stored example: JSON in 'json' (embedded) or in
  `text_key` (raw JSONL lines), or the example's own fields (TFDS)."""
  raw = example.get('json', example.get(text_key or 'text'))
  return json.loads(raw) if raw is not None else {
      k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}


def _history(prompt) -> list:
  """The messages before the reply: a user turn for a string prompt."""
  prompt = json.loads(prompt) if isinstance(prompt, str) and prompt.startswith('[{') else prompt
  return [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)


def _conversation(history: list, reply) -> list[dict] | None:
  """history + reply (a string or assistant messages), or None if malformed."""
  msgs = history + ([{'role': 'assistant', 'content': reply}] if isinstance(reply, str) else list(reply))
  return chat.to_messages({'messages': msgs})


def _row_pair(row: dict) -> tuple[list, list] | None:
  """(chosen messages, rejected messages) of a pair row dict, or None."""
  history = _history(row['prompt'])
  out = tuple(_conversation(history, row[side]) for side in SIDES)
  return None if any(m is None for m in out) else out


def _row_ranked(row: dict) -> list[list[dict]] | None:
  """The conversations of a ranked row dict, best first, or None (see ranked_messages)."""
  ranked = row['ranked']
  if isinstance(ranked, np.ndarray):  # a TFDS sequence of text
    ranked = [r.decode() if isinstance(r, bytes) else r for r in ranked.tolist()]
  ranked = ranked.decode() if isinstance(ranked, bytes) else ranked
  ranked = json.loads(ranked) if isinstance(ranked, str) else ranked  # JSON in a text field
  if not isinstance(ranked, list) or len(ranked) < 2 or any(s in row for s in SIDES):
    return None
  if not all(isinstance(r, (str, list)) for r in ranked):  # list(a dict) would take its keys
    return None
  history = _history(row['prompt'])
  convos = [_conversation(history, reply) for reply in ranked]
  if any(c is None for c in convos):
    return None
  if len({json.dumps(c, sort_keys=True) for c in convos}) < len(convos):
    return None
  return convos


def pair_messages(example, text_key: str = ''):
  """(chosen messages, rejected messages) of a stored pair row, or None if
  malformed (or not a pair row)."""
  try:
    return _row_pair(_stored_row(example, text_key))
  except _ROW_ERRORS:
    return None


def ranked_messages(example, text_key: str = '') -> list[list[dict]] | None:
  """The K >= 2 conversations of a stored ranked row, best first, or None if
  malformed: "ranked" is not a list of at least two replies (strings or
  message lists), two replies are the same (a reply ranked above itself), or
  the row also has "chosen"/"rejected" (which order would hold?)."""
  try:
    return _row_ranked(_stored_row(example, text_key))
  except _ROW_ERRORS:
    return None


def row_pairs(example, text_key: str = '') -> list[tuple[list, list]] | None:
  """Every (better, worse) pair of messages a stored row states, or None if
  malformed: the one pair of a pair row; for a ranked row all K(K-1)/2 pairs,
  by rank in the order (0, 1), (0, 2), ..., (K-2, K-1)."""
  try:
    row = _stored_row(example, text_key)
    if 'ranked' not in row:
      pair = _row_pair(row)
      return None if pair is None else [pair]
    convos = _row_ranked(row)
  except _ROW_ERRORS:
    return None
  return None if convos is None else list(itertools.combinations(convos, 2))


def render_side(messages: list[dict], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """One side of a pair for DPO: the SFT arrays, padded, with the loss on the last reply."""
  return sft.pad_example(sft.render_example(messages, tokenizer, seq_len, mask='completion'), seq_len)


def render_scored(messages: list[dict], tokenizer: Tokenizer, seq_len: int) -> dict | None:
  """One conversation for a reward model -> inputs, segment_ids, positions [seq_len]
  and score_index (the reply's last token, where the reward is read).

  The reply's closing <|end|> (its stop token) is not fed: the hidden state of the last reply
  token is the one SFT trained to predict whether the reply ends there, so it
  already carries a judgement of the whole reply, while <|end|>'s own state was
  never trained (SFT has no target after it); experiments/results/preference.md
  has the numbers. Longer conversations are cut at seq_len; None if no reply
  token is left.
  """
  ids, weights = chat.render(messages, tokenizer, mask='completion')
  reply = np.flatnonzero((weights > 0) & ~np.isin(ids, chat.stop_tokens(tokenizer)))  # without its stop token
  ids = ids[:reply[-1] + 1][:seq_len] if len(reply) else ids[:0]
  scored = reply[reply < len(ids)]
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
  """Pair row -> chosen_* and rejected_* arrays, each side from render(messages,
  tokenizer, seq_len); None if the row is malformed, a side renders to None, or
  both sides are the same within seq_len (nothing to prefer). `group` renders
  every pair of a pair or ranked row."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, text_key: str = '',
               render: SideRenderer = render_side):
    self.tokenizer, self.seq_len, self.text_key, self.render = tokenizer, seq_len, text_key, render

  def _pair(self, chosen: dict | None, rejected: dict | None) -> dict | None:
    if chosen is None or rejected is None or all(np.array_equal(chosen[k], rejected[k]) for k in chosen):
      return None
    return {f'{side}_{k}': v for side, arrays in zip(SIDES, (chosen, rejected)) for k, v in arrays.items()}

  def map(self, example):
    pair = pair_messages(example, self.text_key)
    if pair is None:
      return None
    return self._pair(*(self.render(m, self.tokenizer, self.seq_len) for m in pair))

  def group(self, example) -> list[dict] | None:
    """Every pair of a row (one for a pair row, K(K-1)/2 for a ranked row, in
    row_pairs' order), rendered; pairs with nothing to prefer are left out.
    None if the row is malformed or no pair is left."""
    found = row_pairs(example, self.text_key)
    if found is None:
      return None
    rendered = {}  # each reply of a ranked row is rendered once, not K - 1 times

    def side(messages):
      if id(messages) not in rendered:
        rendered[id(messages)] = self.render(messages, self.tokenizer, self.seq_len)
      return rendered[id(messages)]

    out = [p for p in (self._pair(side(c), side(r)) for c, r in found) if p is not None]
    return out or None


def _length(side_arrays: dict[str, np.ndarray], side: str) -> int:
  """Tokens of one rendered side (its segment ids are 1 on them, 0 after)."""
  return int(np.count_nonzero(side_arrays[f'{side}_segment_ids']))


class _PaddedBatch:
  """One pair per row, `rows` pair slots; the slots left at the end are all-zero padding pairs."""

  def __init__(self, rows: int):
    self.rows, self.pairs = rows, []

  def add(self, group: list[dict]) -> bool:
    """Adds all of a group's pairs and returns True, or none and returns False."""
    if len(self.pairs) + len(group) > self.rows:
      return False
    self.pairs.extend(group)
    return True

  @property
  def empty(self) -> bool:
    return not self.pairs

  @property
  def full(self) -> bool:
    return len(self.pairs) == self.rows

  def arrays(self) -> dict[str, np.ndarray]:
    padding = [{k: np.zeros_like(v) for k, v in self.pairs[0].items()}] * (self.rows - len(self.pairs))
    return {k: np.stack([p[k] for p in self.pairs + padding]) for k in self.pairs[0]}


class _PackedBatch:
  """`rows` rows of seq_len tokens per side; each pair goes whole into the first
  row with room on both sides and fewer than pairs_per_row pairs (first fit).
  A group (the pairs of one row) goes in whole or not at all."""

  def __init__(self, rows: int, seq_len: int, pairs_per_row: int):
    self.rows, self.seq_len, self.pairs_per_row = rows, seq_len, pairs_per_row
    self.used = {side: np.zeros(rows, np.int64) for side in SIDES}  # tokens filled per row
    self.count = np.zeros(rows, np.int64)  # pairs per row
    self.buffers: dict[str, np.ndarray] = {}

  def add(self, group: list[dict]) -> bool:
    """Places all of a group's pairs and returns True, or none and returns False."""
    used = {side: u.copy() for side, u in self.used.items()}
    count = self.count.copy()
    places = []
    for pair in group:
      n = {side: _length(pair, side) for side in SIDES}
      room_R = count < self.pairs_per_row
      for side in SIDES:
        room_R &= used[side] + n[side] <= self.seq_len
      if not room_R.any():
        return False
      r = int(np.argmax(room_R))
      places.append((pair, r, {side: int(used[side][r]) for side in SIDES}, int(count[r]) + 1))
      for side in SIDES:
        used[side][r] += n[side]
      count[r] += 1
    for pair, r, offsets, segment in places:
      self._write(pair, r, offsets, segment)
    self.used, self.count = used, count
    return True

  def _write(self, pair: dict, r: int, offsets: dict[str, int], segment: int) -> None:
    if not self.buffers:
      keys = [k if not k.endswith('_score_index') else k.replace('_score_index', '_score_mask') for k in pair]
      self.buffers = {k: np.zeros((self.rows, self.seq_len), np.int32) for k in keys}
    for side in SIDES:
      n, start = _length(pair, side), offsets[side]
      span = slice(start, start + n)
      for k, v in pair.items():
        if not k.startswith(side + '_'):
          continue
        if k.endswith('_segment_ids'):
          self.buffers[k][r, span] = segment
        elif k.endswith('_positions'):
          self.buffers[k][r, span] = np.arange(n)
        elif k.endswith('_score_index'):
          self.buffers[k.replace('_score_index', '_score_mask')][r, start + int(v)] = 1
        else:
          self.buffers[k][r, span] = v[:n]

  @property
  def empty(self) -> bool:
    return not self.count.any()

  @property
  def full(self) -> bool:
    return bool((self.count >= self.pairs_per_row).all())

  def arrays(self) -> dict[str, np.ndarray]:
    return self.buffers


class _PairBatchIterator(grain.DatasetIterator):
  """Groups -> batches of whole groups. A group that does not fit the batch
  being filled starts the next one; it is held, and the checkpointed state is
  the parent's state before it, so a restored iterator reads it again."""

  def __init__(self, parent, new_batch: Callable[[], object], drop_remainder: bool):
    super().__init__(parent)
    self._new_batch, self._drop_remainder = new_batch, drop_remainder
    self._pending = None  # a group read from the parent but in no batch yet
    self._pending_state = None  # the parent's state before it
    self.skipped = 0  # groups too big for a whole batch

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._new_batch()
    while True:
      if self._pending is None:
        state = self._parent.get_state()
        try:
          self._pending, self._pending_state = next(self._parent), state
        except StopIteration:
          if batch.empty or self._drop_remainder:
            raise
          return batch.arrays()  # the rest is padding
      if batch.add(self._pending):
        self._pending = None
        if batch.full:
          return batch.arrays()
      elif batch.empty:  # would not fit any batch: skip it, and say so once
        if not self.skipped:
          print(f'warning: skipped a preference row whose {len(self._pending)} pairs do not fit one '
                'batch; raise batch_size (or seq_len, or pairs_per_row).', flush=True)
        self.skipped += 1
        self._pending = None
      else:
        return batch.arrays()

  def get_state(self) -> dict:
    # The parent's own state, as grain's batch() checkpoints it: runs resume across the two.
    return self._pending_state if self._pending is not None else self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)
    self._pending = self._pending_state = None


class PairBatches(grain.IterDataset):
  """Batches of whole groups (the rendered pairs of one row each), in one of
  the two layouts of the module docstring: `pairs_per_row` 1 (one padded pair
  per row, `batch_size` slots) or > 1 (packed into `batch_size` rows)."""

  def __init__(self, parent: grain.IterDataset, *, batch_size: int, seq_len: int, pairs_per_row: int = 1,
               drop_remainder: bool = True):
    super().__init__(parent)
    if pairs_per_row < 1:
      raise UserError(f'pairs_per_row={pairs_per_row} must be >= 1 (1: one pair per row, padded).')
    self._source = parent
    self.batch_size, self.seq_len, self.pairs_per_row = batch_size, seq_len, pairs_per_row
    self.drop_remainder = drop_remainder  # the unfinished batch at the end of a finite stream

  def new_batch(self):
    """An empty batch of this layout."""
    if self.pairs_per_row == 1:
      return _PaddedBatch(self.batch_size)
    return _PackedBatch(self.batch_size, self.seq_len, self.pairs_per_row)

  def __iter__(self) -> _PairBatchIterator:
    return _PairBatchIterator(self._source.__iter__(), self.new_batch, self.drop_remainder)


def max_pairs(batch_size: int, pairs_per_row: int) -> int:
  """The most pairs one batch holds (a ranked row's K(K-1)/2 must fit)."""
  return batch_size * pairs_per_row


def pair_dataset(sources_list, weights, render: RenderPair, *, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None, pairs_per_row: int = 1,
                 drop_remainder: bool = True, stream: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """Batches of preference pairs (layout: module docstring), all pairs of a row
  in one batch; at the end of a finite stream the unfinished batch is dropped,
  or with drop_remainder=False padded."""
  ds = pipeline.mixed_source(sources_list, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  ds = pipeline.take_stream(ds, *stream).map(render.group).filter(lambda x: x is not None)
  return PairBatches(pipeline.to_iter(ds), batch_size=batch_size, seq_len=render.seq_len,
                     pairs_per_row=pairs_per_row, drop_remainder=drop_remainder)


def check_rows(source, name: str, text_key: str, most_pairs: int) -> None:
  """Counts malformed rows and rows with more pairs than one batch holds (both
  are skipped in training) and reports them, as sft.check_rows does for SFT
  rows; an error only if no row is usable."""
  n = min(len(source), _SCAN_LIMIT)
  sizes = [None if p is None else len(p) for p in (row_pairs(row, text_key) for row in sources.first_rows(source, n))]
  bad = sum(s is None for s in sizes)
  big = sum(s is not None and s > most_pairs for s in sizes)
  if n and bad == n:
    raise UserError(f'dataset {name!r}: all {n} rows are malformed; rows need "prompt" with "chosen" '
                    'and "rejected", or with "ranked" (a list of two or more distinct replies, best first).')
  if n and bad + big == n:
    raise UserError(f'dataset {name!r}: every row has more than the {most_pairs} pairs one batch holds; '
                    'raise batch_size (or pairs_per_row).')
  if bad:
    print(f'warning: dataset {name!r}: skipped {bad} malformed of the first {n} rows', flush=True)
  if big:
    print(f'warning: dataset {name!r}: skipping {big} of the first {n} rows, which have more than the '
          f'{most_pairs} pairs one batch holds', flush=True)


def train_dataset(data_cfg, render: RenderPair, *, batch_size: int, seed: int,
                  pairs_per_row: int = 1, stream: tuple[int, int] = (0, 1)) -> grain.IterDataset:
  """The shuffled, mixed, repeating stream of pair batches of config.data."""
  names, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.train_split)
  for name, src in zip(names, srcs):
    check_rows(src, name, data_cfg.text_key, max_pairs(batch_size, pairs_per_row))
  return pair_dataset(srcs, weights, render, batch_size=batch_size, seed=seed, pairs_per_row=pairs_per_row,
                      stream=stream)


def eval_batches(data_cfg, render: RenderPair, *, batch_size: int, max_batches: int,
                 pairs_per_row: int = 1) -> list[dict]:
  """Held-out pair batches of config.data, in storage order."""
  _, srcs, weights = pipeline.open_mixture(data_cfg, data_cfg.eval_split)
  ds = pair_dataset(srcs, weights, render, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
                    pairs_per_row=pairs_per_row)
  return pipeline.take_batches(ds, max_batches)


# ---- What the stage losses read from a pair batch ---------------------------


def stack_sides(batch: dict, key: str):
  """[2B, ...]: the chosen rows of batch[`chosen_<key>`], then the rejected rows,
  so both sides go through the model in one forward pass."""
  return jnp.concatenate([batch[f'chosen_{key}'], batch[f'rejected_{key}']], axis=0)


def segment_sums(x_RT: jax.Array, segment_ids_RT: jax.Array, pairs_per_row: int) -> jax.Array:
  """[R, S]: x summed over the tokens of segment s + 1 of each row, s < S =
  pairs_per_row (padding, segment 0, is in none). A one-hot product rather than
  a scatter, as research.rewards.scores reads scores: its gradient is a product too."""
  one_hot_RTS = jax.nn.one_hot(segment_ids_RT - 1, pairs_per_row, dtype=x_RT.dtype)
  return jnp.sum(x_RT[..., None] * one_hot_RTS, axis=1)


def pair_weights(batch: dict, pairs_per_row: int = 1) -> jax.Array:
  """Weight of each pair slot [P], float32: 1 for a real pair, 0 for padding.
  One pair per row: P = rows, and a padding pair is an all-zero row; packed:
  P = rows * pairs_per_row in row order, and an empty slot has no segment."""
  seg_RT = batch['chosen_segment_ids']
  slot_RTS = seg_RT[..., None] == jnp.arange(1, pairs_per_row + 1, dtype=seg_RT.dtype)
  return jnp.any(slot_RTS, axis=1).astype(jnp.float32).reshape(-1)


class _BatchMeans:
  """Means over every pair of a batch without padding: the plain batch means."""

  mean = staticmethod(jnp.mean)

  @staticmethod
  def of(loss_fn, *arrays_P):
    return loss_fn(*arrays_P)


class _RealPairMeans:
  """Means over the real pairs of a batch (weight 1), padding pairs left out."""

  def __init__(self, w_P: jax.Array):
    self.w_P = w_P

  def mean(self, x_P: jax.Array) -> jax.Array:
    """sum(x * w) / sum(w); 0 if there is no weight (a micro-batch of padding only)."""
    return jnp.sum(x_P.astype(jnp.float32) * self.w_P) / jnp.maximum(jnp.sum(self.w_P), 1.0)

  def of(self, loss_fn, *arrays_P):
    """loss_fn's (loss, metrics) on each pair alone (a vmap), then their means."""
    loss_P, metrics_P = jax.vmap(lambda *xs: loss_fn(*(x[None] for x in xs)))(*arrays_P)
    return self.mean(loss_P), {k: self.mean(v) for k, v in metrics_P.items()}


def over_real_pairs(tail, w_P: jax.Array, *operands):
  """tail(means, *operands) -> a pytree of scalars (a loss and its metrics),
  with every mean over the real pairs of the batch (weight w_P):
  `means.mean(x_P)` averages a per-pair array, and `means.of(loss_fn, *xs_P)`
  gives loss_fn's (loss, metrics), where loss_fn returns batch means (as
  research.losses' pair losses do), averaged over the real pairs.

  A batch without padding (every batch of pair rows) runs the tail with the
  plain batch means, in a lax.cond branch of its own: XLA compiles it as it did
  before there were weights (inlined next to a weighted form, it hoists and
  shares constants differently, which moves the last bit), so pair-row runs are
  unchanged bit for bit. Padding pairs must hold finite values: a NaN there
  would reach the gradient as 0 * NaN.
  """
  return jax.lax.cond(jnp.all(w_P == 1.0), lambda ops: tail(_BatchMeans, *ops),
                      lambda ops: tail(_RealPairMeans(w_P), *ops), operands)
