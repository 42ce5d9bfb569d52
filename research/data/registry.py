"""The one table from dataset names to their builders, and opening a split.

    src = open_split('sft_tasks', 'validation')     # random access: len(src), src[i]

* 'stdlib': the embedded default corpus, this Python's standard-library source
  files (about 30 MB, present wherever Python is). Needs no download.
* 'files': local .txt files (one document each) and .jsonl files (one document
  per row, text in `text_key`), from comma-separated globs in `files`.
* 'sft_tasks', 'sft_code', 'pref_tasks', 'pref_code', 'pref_tasks_ranked': the
  embedded SFT and preference data (sft_sources.py, pref_sources.py).
* any other name: a TFDS dataset the user has prepared as array_record,
  e.g. `tfds build c4/en --file_format=array_record`.

Project builders are prepared on first use (process 0 first, the others after
a barrier) into the TFDS data dir. To add a data source, write a builder
(a `sources.JsonRows` subclass for structured rows) and `register` it here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, Callable

import tensorflow_datasets as tfds

from research.data import pref_sources, sft_sources, sources
from research.errors import UserError

# name -> factory(data_dir, files, text_key) -> a TFDS builder writing array_record.
Factory = Callable[[str, str, str], Any]


def _embedded(cls) -> Factory:
  return lambda data_dir, files, text_key: cls(data_dir=data_dir, file_format='array_record')


BUILDERS: dict[str, Factory] = {
    'stdlib': _embedded(sources.Stdlib),
    'files': lambda data_dir, files, text_key: sources.LocalText(
        paths=sources.expand_globs(files), text_key=text_key, data_dir=data_dir, file_format='array_record'),
    'sft_tasks': _embedded(sft_sources.SftTasks),
    'sft_code': _embedded(sft_sources.SftCode),
    'pref_tasks': _embedded(pref_sources.PrefTasks),
    'pref_code': _embedded(pref_sources.PrefCode),
    'pref_tasks_ranked': _embedded(pref_sources.PrefTasksRanked),
}


def register(name: str, factory: Factory) -> None:
  """Makes `name` a dataset name: factory(data_dir, files, text_key) -> TFDS builder."""
  BUILDERS[name] = factory


def project_builder(name: str, data_dir: str, files: str = '', text_key: str = 'text'):
  """The TFDS builder of a project dataset, or None for a user-prepared TFDS name."""
  factory = BUILDERS.get(name)
  return None if factory is None else factory(sources.resolve_data_dir(data_dir), files, text_key)


@contextlib.contextmanager
def _exclusive(builder):
  """Holds an flock on <dataset version dir>.lock: runs started side by side (a
  sweep, the pipeline's parallel stages) share the data dir, and TFDS fails when
  two of them prepare the same dataset at once (the second rename of its
  incomplete.* dir finds the first one's result)."""
  path = os.fspath(builder.data_dir) + '.lock'
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
    yield


def _prepare_once(builder) -> None:
  if builder.is_prepared():
    return
  with _exclusive(builder):
    if not builder.is_prepared():  # another run may have finished it while we waited
      builder.download_and_prepare()


def prepare(builder) -> None:
  """Prepares a project builder once: process 0 first, then any host without it;
  runs on one machine that share the data dir take turns (`_exclusive`)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    _prepare_once(builder)
  sources.sync_processes('data_prepared')
  _prepare_once(builder)  # hosts that do not share process 0's disk


def open_split(name: str, split: str, *, data_dir: str = '', files: str = '',
               text_key: str = 'text') -> Any:
  """A random-access source (len, [i]) of dict examples for one split."""
  builder = project_builder(name, data_dir, files, text_key)
  if builder is not None:
    was_prepared = builder.is_prepared()
    prepare(builder)  # every process: it holds a barrier
    if not was_prepared:
      # A builder made before the data existed keeps the empty split info it read
      # then (the other processes' case, after process 0 prepared): read it again.
      builder = project_builder(name, data_dir, files, text_key)
    if split not in builder.info.splits:
      raise UserError(f'data split {split!r} not in {name}; have {sorted(builder.info.splits)}')
    return builder.as_data_source(split=split)
  try:
    return tfds.data_source(name, split=split, data_dir=sources.resolve_data_dir(data_dir), download=False)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types here
    raise UserError(
        f'data.name={name!r} (split {split!r}) is not a prepared TFDS dataset in '
        f'{sources.resolve_data_dir(data_dir)}: {str(e).splitlines()[0][:200]}. Use data.name=stdlib '
        "(embedded), data.name=files with data.files=..., or prepare it with "
        f"`tfds build {name} --file_format=array_record`.") from None
