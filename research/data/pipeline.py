"""grain pipelines: tokenize, pack into fixed-length rows, shuffle, batch.

A packed row holds several documents back to back:
  inputs, targets      int32 [T]  (targets = inputs shifted by one, per document)
  segment_ids          int32 [T]  (1, 2, ... per document; 0 = padding)
  positions            int32 [T]  (position within the document, for RoPE)

Every process builds the same global batch stream and keeps its own rows, so
the stream (and the checkpointed iterator state) is identical for any number
of processes: a run may resume on a different host count. Tokenizing the
whole stream on every host is cheap next to a train step of any model that
needs several hosts.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import grain
import numpy as np

from research.data import registry, sources
from research.data import tokenizer as tokenizer_lib
from research.data.tokenizer import Tokenizer, train_tokenizer
from research.errors import UserError


def default_tokenizer_path(data_cfg, vocab_size: int) -> str:
  """Where the tokenizer trained for a corpus is cached."""
  slug = data_cfg.name if data_cfg.name != 'files' else 'files-' + registry.project_builder(
      'files', data_cfg.data_dir, data_cfg.files, data_cfg.text_key).builder_config.name
  slug = slug.replace('/', '_').replace(':', '_')
  return os.path.join(sources.resolve_data_dir(data_cfg.data_dir), 'tokenizers', f'{slug}-v{vocab_size}.model')


def _train_and_save_tokenizer(srcs, data_cfg, vocab_size: int, path: str) -> None:
  """Trains a tokenizer on the sources `srcs` (opened by every process: opening
  prepares the data behind a barrier, so it must not happen here, where one
  process runs)"""
  texts = itertools.chain.from_iterable(sources.iter_texts(src, data_cfg.text_key) for src in srcs)
  tok = train_tokenizer(texts, vocab_size)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  tok.save(tmp)
  os.replace(tmp, path)  # atomic: a killed run never leaves half a tokenizer


def to_iter(ds: grain.MapDataset) -> grain.IterDataset:
  """`ds.to_iter_dataset()`, mapped in the thread that asks for the next batch.

  grain's default (16 threads, 500 elements ahead) costs more than the work on
  short rows: its prefetch bookkeeping visits every buffered future per element,
  under the GIL. Measured on the embedded SFT mixture (16 x 256 packed rows of
  ~40-token examples): 17.5 batches/s with the default, 39 without threads; the
  loop already overlaps this work with the device, which runs the previous step
  asynchronously. The order (and so resume) does not depend on the choice.
  """
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def get_tokenizer(data_cfg, vocab_size: int) -> Tokenizer:
  """Loads data.tokenizer, or trains (once, cached) one on the training split."""
  if data_cfg.tokenizer:
    return tokenizer_lib.load_tokenizer(data_cfg.tokenizer)
  import jax  # pylint: disable=import-outside-toplevel
  path = default_tokenizer_path(data_cfg, vocab_size)
  # Every process opens the data (preparing it has its own barrier); a mixture
  # ('a+b') trains on all of its datasets.
  srcs = [open_named(data_cfg, name, data_cfg.train_split) for name in dataset_names(data_cfg)]
  if jax.process_index() == 0 and not os.path.exists(path):
    _train_and_save_tokenizer(srcs, data_cfg, vocab_size, path)
  sources.sync_processes('tokenizer_ready')
  if not os.path.exists(path):  # hosts that do not share process 0's disk
    _train_and_save_tokenizer(srcs, data_cfg, vocab_size, path)
  return Tokenizer.load(path)


def open_source(data_cfg, split: str):
  """The random-access source for `split` of the configured dataset."""
  return registry.open_split(data_cfg.name, split, data_dir=data_cfg.data_dir, files=data_cfg.files,
                            text_key=data_cfg.text_key)


def dataset_names(data_cfg) -> list[str]:
  """The datasets of a mixture: data.name='a+b' -> ['a', 'b']."""
  return [n for n in data_cfg.name.split('+') if n]


def mix_weights(data_cfg, n: int) -> list[float]:
  """Sampling weights of the `n` mixed datasets (data.mix_weights, default equal)."""
  w = [float(x) for x in data_cfg.mix_weights] if data_cfg.mix_weights else [1.0] * n
  if len(w) != n:
    raise UserError(f'config.data.mix_weights has {len(w)} entries for {n} datasets in '
                    f'data.name={data_cfg.name!r}.')
  return w


def open_named(data_cfg, name: str, split: str):
  """The random-access source for `split` of one dataset of the mixture."""
  return registry.open_split(name, split, data_dir=data_cfg.data_dir, files=data_cfg.files,
                            text_key=data_cfg.text_key)


def open_mixture(data_cfg, split: str) -> tuple[list[str], list[Any], list[float]]:
  """(names, sources, weights) of the configured mixture's `split`."""
  names = dataset_names(data_cfg)
  return names, [open_named(data_cfg, n, split) for n in names], mix_weights(data_cfg, len(names))


class _Tokenize(grain.transforms.Map):
  """Example -> {'inputs', 'targets'}: the document's tokens shifted by one."""

  def __init__(self, tokenizer: Tokenizer, text_key: str, add_bos: bool, add_eos: bool):
    self.tokenizer, self.text_key, self.add_bos, self.add_eos = tokenizer, text_key, add_bos, add_eos

  def map(self, example):
    text = sources.example_text(example, self.text_key)
    ids = np.asarray(self.tokenizer.encode(text, self.add_bos, self.add_eos), np.int32)
    if len(ids) < 2:  # nothing to predict; keep the stream aligned with a padding pair
      ids = np.asarray([self.tokenizer.pad_id] * 2, np.int32)
    return {'inputs': ids[:-1], 'targets': ids[1:]}


def rename_packed(row: dict) -> dict:
  """A packed row with grain's per-feature segment ids and positions renamed to the
  batch's `segment_ids` / `positions` (all features share the inputs' packing)."""
  out = {k: v for k, v in row.items() if not k.endswith(('_segment_ids', '_positions'))}
  out['segment_ids'], out['positions'] = row['inputs_segment_ids'], row['inputs_positions']
  return out


def packed_dataset(source, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   text_key: str = 'text', add_bos: bool = True, add_eos: bool = True,
                   shuffle: bool = True, num_epochs: int | None = None, stream: tuple[int, int] = (0, 1),
                   shuffle_window: int = 1024) -> grain.IterDataset:
  """Global batches of packed rows: dicts of int32 [batch_size, seq_len].

  Documents are shuffled globally each epoch; packed rows are shuffled again in
  windows of `shuffle_window` rows, so one long document (a 100k-token file)
  spreads over many batches instead of filling several in a row.
  """
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)  # reshuffled each epoch by repeat()
  ds = take_stream(ds.repeat(num_epochs), *stream).map(_Tokenize(tokenizer, text_key, add_bos, add_eos))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      to_iter(ds), length_struct={'inputs': seq_len, 'targets': seq_len})
  ds = ds.map(rename_packed)
  if shuffle and shuffle_window > 1:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
  return ds.batch(batch_size, drop_remainder=True)


class GrainSource:
  """A batch source over a grain dataset of global numpy batches.

  The loop asks every batch source `next(policy)`; an offline source ignores
  the policy (an online-RL source samples from it). The grain iterator's state
  is checkpointed with the train state, so a resumed run continues the stream
  exactly.
  """

  def __init__(self, dataset):
    self._it = iter(dataset)

  def next(self, policy=None) -> dict[str, np.ndarray]:
    """The next global batch."""
    del policy
    return next(self._it)

  def get_state(self) -> dict:
    """The iterator state (JSON-serialisable), for checkpoints."""
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    """Continues from a state that get_state returned."""
    self._it.set_state(state)


def take_stream(ds: grain.MapDataset, stream: int, streams: int) -> grain.MapDataset:
  """Stream `stream` of `streams`: every streams-th element of the (shuffled,
  repeated) element order, starting at `stream`. The streams partition it."""
  return ds if streams == 1 else ds[stream::streams]


def local_streams(streams: int, batch_size: int) -> range:
  """The streams (data.streams) whose rows this process feeds: a contiguous run,
  so that their rows are this process's rows of the global batch."""
  import jax  # pylint: disable=import-outside-toplevel
  count = jax.process_count()
  if streams < 1 or batch_size % streams:
    raise UserError(f'data.streams={streams} must be at least 1 and divide batch_size={batch_size}.')
  if streams % count:
    raise UserError(f'data.streams={streams} does not divide over {count} processes; make it a multiple '
                    'of the process count (each process builds the rows of its own streams).')
  per = streams // count
  return range(jax.process_index() * per, (jax.process_index() + 1) * per)


class StreamSource:
  """Per-host input: the global batch is `streams` independent streams of
  batch_size / streams rows each, stream s holding rows [s * rows, (s + 1) * rows).
  This process builds (reads, tokenizes, packs) only its own streams and returns
  its rows; the global batch depends on the seed and data.streams alone, so a
  run can move to any process count that divides data.streams, and resume
  exactly (the checkpoint holds every stream's iterator state).

  `make(stream, streams, rows)` returns a grain dataset of [rows, ...] batches.
  """

  local_rows = True  # next() gives this process's rows, not the global batch

  def __init__(self, make, streams: int, batch_size: int):
    self.streams = streams
    self._its = {s: iter(make(s, streams, batch_size // streams)) for s in local_streams(streams, batch_size)}
    self.rows_built = 0  # rows this process has built (a counter for tests and logs)

  def next(self, policy=None) -> dict[str, np.ndarray]:
    """This process's rows of the next global batch."""
    del policy
    parts = [next(it) for it in self._its.values()]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    self.rows_built += len(next(iter(batch.values())))
    return batch

  def get_state(self) -> dict:
    """Every stream's iterator state, gathered from all processes, and the rows
    each process has built (a record; restoring ignores it)."""
    parts = sources.allgather_json({'states': {str(s): it.get_state() for s, it in self._its.items()},
                                    'rows_built': self.rows_built})
    states = {k: v for part in parts for k, v in part['states'].items()}
    return {'streams': self.streams, 'states': states, 'rows_built': [part['rows_built'] for part in parts]}

  def set_state(self, state: dict) -> None:
    """Continues from a state that get_state returned (any process count)."""
    if state.get('streams') != self.streams:
      raise UserError(f'the checkpoint\'s data state has {state.get("streams", 1)} streams but '
                      f'data.streams={self.streams}; the data order would change. Keep data.streams.')
    for s, it in self._its.items():
      it.set_state(state['states'][str(s)])


def stream_source(make, streams: int, batch_size: int):
  """The batch source of a stage's training data: `make(stream, streams, rows)`
  builds one stream. data.streams=1: one stream that every process builds whole
  (GrainSource; the trainer keeps each process's rows); more: StreamSource."""
  if streams == 1:
    return GrainSource(make(0, 1, batch_size))
  return StreamSource(make, streams, batch_size)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that this process feeds to its devices."""
  if batch_size % process_count:
    raise UserError(f'batch_size={batch_size} does not divide over {process_count} processes; '
                    'make it a multiple of the process count.')
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def local_rows(batch: dict[str, np.ndarray], rows: slice) -> dict[str, np.ndarray]:
  """This process's slice of a global numpy batch."""
  return {k: v[rows] for k, v in batch.items()}


def take_batches(ds, n: int) -> list[dict[str, Any]]:
  """The first `n` batches of `ds` (a fixed evaluation set); an error if there are none."""
  out = []
  for batch in ds:
    out.append(batch)
    if len(out) >= n:
      break
  if not out:
    raise UserError('the validation split holds less than one batch; lower batch_size or seq_len, or '
                    'add data (data.files holds out 2% of its documents or rows, at least one).')
  return out


def mixed_source(sources_list, weights, *, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None) -> grain.MapDataset:
  """Each source shuffled (reshuffled every epoch) and repeated, then mixed by `weights`."""
  parts = []
  for src in sources_list:
    ds = grain.MapDataset.source(src)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    parts.append(ds.repeat(num_epochs))
  return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def eval_batches(data_cfg, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                 max_batches: int, scan_factor: int = 8) -> list[dict[str, Any]]:
  """The fixed validation batches.

  Packs the split in storage order (at most `scan_factor` times the rows
  needed) and takes rows evenly spaced through it, so a few long documents
  cannot make up the whole evaluation set.
  """
  src = open_source(data_cfg, data_cfg.eval_split)
  ds = packed_dataset(src, tokenizer, seq_len=seq_len, batch_size=1, seed=0,
                      text_key=data_cfg.text_key, add_bos=data_cfg.add_bos,
                      add_eos=data_cfg.add_eos, shuffle=False, num_epochs=1)
  needed = max_batches * batch_size
  rows = []
  for row in ds:
    rows.append({k: v[0] for k, v in row.items()})
    if len(rows) >= scan_factor * needed:
      break
  if len(rows) < batch_size:
    raise UserError(f'the {data_cfg.eval_split!r} split holds less than one batch '
                    f'({batch_size} x {seq_len} tokens); lower batch_size or seq_len, or add data.')
  n_batches = min(max_batches, len(rows) // batch_size)
  picked = np.linspace(0, len(rows) - 1, n_batches * batch_size).round().astype(int)
  return [{k: np.stack([rows[i][k] for i in picked[b * batch_size:(b + 1) * batch_size]])
           for k in rows[0]} for b in range(n_batches)]
