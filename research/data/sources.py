"""Text sources and builder bases, all as TFDS datasets stored in array_record (no TensorFlow).

* 'stdlib': the embedded default, this Python's standard-library source files
  (about 30 MB, present wherever Python is). Needs no download.
* 'files': local .txt files (one document each) and .jsonl files (one document
  per row, text in `text_key`), from comma-separated globs.
* any other name: a TFDS dataset the user has prepared as array_record,
  e.g. `tfds build c4/en --file_format=array_record`.

The embedded structured datasets (SFT tasks, preference pairs) build on
`JsonRows` in sft_sources.py and pref_sources.py; registry.py maps every name
to its builder and opens splits. Splits are fixed by a hash of each document's
key, so they never change between runs or machines.
"""

from __future__ import annotations

import abc
import glob
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterator

import tensorflow_datasets as tfds

from research.errors import UserError

_VALIDATION_PERCENT = 2
tfds.disable_progress_bar()  # progress bars garble the training log


def is_validation(key: str) -> bool:
  """Whether a document key falls in the fixed validation split."""
  return int(hashlib.md5(key.encode()).hexdigest(), 16) % 100 < _VALIDATION_PERCENT


def _text_features():
  return tfds.features.FeaturesDict({'text': tfds.features.Text(), 'key': tfds.features.Text()})


def stdlib_files() -> list[tuple[str, str]]:
  """(relative path, absolute path) of every stdlib .py file, sorted."""
  root = sysconfig.get_paths()['stdlib']
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ('site-packages', 'dist-packages', '__pycache__'))
    for name in sorted(filenames):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        out.append((os.path.relpath(path, root), path))
  return sorted(out)


class Stdlib(tfds.core.GeneratorBasedBuilder):
  """The Python standard library's own source files, one document per file."""

  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f'py{sys.version_info.major}{sys.version_info.minor}')]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_text_features(),
                                 description='Python standard library sources.')

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(False), 'validation': self._generate_examples(True)}

  def _generate_examples(self, validation):
    for rel, path in stdlib_files():
      if is_validation(rel) == validation:
        with open(path, encoding='utf-8', errors='replace') as f:
          yield rel, {'text': f.read(), 'key': rel}


class JsonRows(tfds.core.GeneratorBasedBuilder):
  """Base of the embedded structured datasets: each row is one JSON string in
  'json', with 'train' and 'validation' splits from `rows(split)`."""

  VERSION = tfds.core.Version('1.0.0')

  @abc.abstractmethod
  def rows(self, split: str) -> Iterator[tuple[str, dict]]:
    """Yields (unique key, row dict) for `split`."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'json': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in ('train', 'validation')}

  def _generate_examples(self, split):
    for key, row in self.rows(split):
      yield key, {'json': json.dumps(row)}


def expand_globs(files: str) -> list[str]:
  paths = sorted({p for pattern in files.split(',') if pattern.strip()
                  for p in glob.glob(os.path.expanduser(pattern.strip()), recursive=True)})
  if not paths:
    raise UserError(f'data.files={files!r} matches no file; give comma-separated globs of '
                    '.txt or .jsonl files.')
  bad = [p for p in paths if not p.endswith(('.txt', '.jsonl'))]
  if bad:
    raise UserError(f'data.files matches {bad[0]!r}, which is neither .txt nor .jsonl.')
  return paths


def read_local_documents(paths: list[str], text_key: str) -> Iterator[tuple[str, str | None]]:
  """Yields (key, text) for every document; text is None for a malformed row.

  text_key '' keeps each .jsonl line raw (structured rows, parsed by the stage).
  """
  for path in paths:
    if path.endswith('.txt'):
      with open(path, encoding='utf-8', errors='replace') as f:
        yield path, f.read()
      continue
    with open(path, encoding='utf-8', errors='replace') as f:
      for i, line in enumerate(f):
        if not line.strip():
          continue
        if not text_key:
          yield f'{path}:{i}', line.strip()
          continue
        try:
          row = json.loads(line)
          text = row[text_key]
          if not isinstance(text, str):
            raise TypeError
        except (ValueError, KeyError, TypeError):
          text = None
        yield f'{path}:{i}', text


class LocalText(tfds.core.GeneratorBasedBuilder):
  """Local .txt / .jsonl files; the config name is a hash of their contents' identity."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, paths: list[str], text_key: str, **kwargs):
    self._paths, self._text_key = paths, text_key
    ident = json.dumps([text_key] + [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths])
    name = hashlib.sha1(ident.encode()).hexdigest()[:16]
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_text_features(),
                                 description=f'Local files: {self._paths}')

  def _split_generators(self, dl_manager):
    del dl_manager
    docs = list(read_local_documents(self._paths, self._text_key))
    good = [(k, t) for k, t in docs if t is not None]
    n_bad = len(docs) - len(good)
    if not good:
      raise UserError(f'no usable document in {self._paths}: every row is malformed '
                      f'(jsonl rows need a string field {self._text_key!r}).')
    if n_bad:
      print(f'warning: skipped {n_bad} malformed of {len(docs)} rows in data.files '
            f'(need a string field {self._text_key!r})', file=sys.stderr)
    val = [k for k, _ in good if is_validation(k)]
    if not val:  # small corpora: hold out the document with the smallest hash
      val = [min((k for k, _ in good), key=lambda k: hashlib.md5(k.encode()).hexdigest())]
    val = set(val)
    if len(val) == len(good) and len(good) > 1:
      val = set(list(val)[:1])
    return {
        'train': self._generate_examples([(k, t) for k, t in good if k not in val]),
        'validation': self._generate_examples([(k, t) for k, t in good if k in val]),
    }

  def _generate_examples(self, docs):
    for key, text in docs:
      yield key, {'text': text, 'key': key}


def resolve_data_dir(data_dir: str) -> str:
  """'' -> $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def sync_processes(name: str) -> None:
  """Barrier across processes (no-op with one)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def example_text(example: dict, text_key: str) -> str:
  """The document text of a TFDS example (bytes or str); text_key '' = the stored row."""
  if not text_key:
    text_key = 'json' if 'json' in example else 'text'
  if text_key not in example:
    raise UserError(f'examples have no field {text_key!r} (fields: {sorted(example)}); '
                    'set --config.data.text_key.')
  text = example[text_key]
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)


def iter_texts(source, text_key: str = 'text') -> Iterator[str]:
  """Texts of a source in storage order."""
  for i in range(len(source)):
    yield example_text(source[i], text_key)
