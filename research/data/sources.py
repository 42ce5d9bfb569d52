"""Text sources and builder bases, all as TFDS datasets stored in array_record (no TensorFlow).

* 'stdlib': the embedded default, this Python's standard-library source files
  (about 30 MB, present wherever Python is). Needs no download.
* 'files': local .txt files (one document each) and .jsonl files (one document
  per row, text in `text_key`), from comma-separated globs. Empty and binary
  (not UTF-8) files and malformed rows are skipped with a warning; a corpus of
  one document is cut 90/10 into train and validation (split_documents).
* any other name: a TFDS dataset the user has prepared as array_record,
  e.g. `tfds build c4/en --file_format=array_record`.

The embedded structured datasets (SFT tasks, preference pairs) build on
`JsonRows` in sft_sources.py and pref_sources.py; registry.py maps every name
to its builder and opens splits. Splits are fixed by a hash of each document's
key, so they never change between runs or machines.
"""

from __future__ import annotations

import abc
import ast
import codecs
import glob
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from typing import Any, Iterator

import numpy as np
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


_SNIFF_BYTES = 8192  # a NUL byte in a file's first 8 KB marks it binary, as git and grep judge
_TAIL_PERCENT = 10  # the held-out tail of a corpus of one document


def _decode(data: bytes) -> str | None:
  """UTF-8 text of `data` (a leading byte-order mark dropped), or None if not UTF-8."""
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError:
    return None


def _row_text(line: str | None, text_key: str) -> str | None:
  """The document of one .jsonl line: the line itself if text_key is '', else
  its string field `text_key`; None if malformed."""
  if line is None or not text_key:
    return line
  try:
    text = json.loads(line)[text_key]
  except (ValueError, KeyError, TypeError, IndexError):
    return None
  return text if isinstance(text, str) else None


def read_local_file(path: str, text_key: str) -> tuple[str | None, list[tuple[str, str | None]]]:
  """(problem, documents) of one .txt or .jsonl file.

  problem: 'empty' (nothing but whitespace), 'binary' (a NUL byte, a .txt
  that is not UTF-8, or a .jsonl without one UTF-8 line: decoded with
  replacement characters it would feed the tokenizer garbage, and SentencePiece
  fails on its thousands of distinct characters) or None. documents: (key,
  text) pairs, text None for a malformed .jsonl row (not UTF-8, not JSON, or
  no string field `text_key`).
  text_key '' keeps each .jsonl line raw (structured rows, parsed by the stage).
  """
  with open(path, 'rb') as f:
    data = f.read()
  if not data.strip():
    return 'empty', []
  if b'\0' in data[:_SNIFF_BYTES]:
    return 'binary', []
  if path.endswith('.txt'):
    text = _decode(data)
    return ('binary', []) if text is None else (None, [(path, text)])
  docs, n_text = [], 0
  # bytes.splitlines breaks lines where text-mode reading did, so keys (and splits) keep their line numbers.
  for i, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines()):
    line = _decode(raw)
    if line is None or line.strip():  # blank lines are no rows
      n_text += line is not None
      docs.append((f'{path}:{i}', _row_text(None if line is None else line.strip(), text_key)))
  if not n_text:
    return ('binary' if docs else 'empty'), []
  return None, docs


def _some(paths: list[str]) -> str:
  """'a', 'b', 'c' and 2 more: the first few of `paths`, for one-line messages."""
  more = f' and {len(paths) - 3} more' if len(paths) > 3 else ''
  return ', '.join(repr(p) for p in paths[:3]) + more


def _files(n: int, kind: str) -> str:
  return f'{n} {kind} file{"s" if n > 1 else ""}'


def local_documents(paths: list[str], text_key: str) -> list[tuple[str, str]]:
  """The usable (key, text) documents of `paths`.

  Empty files, binary (non-UTF-8) files and malformed rows are skipped with one
  warning line per kind, naming how many and an example; a UserError naming
  them if nothing usable is left.
  """
  skipped = {'empty': [], 'binary': []}
  docs = []
  for path in paths:
    problem, file_docs = read_local_file(path, text_key)
    if problem:
      skipped[problem].append(path)
    docs.extend(file_docs)
  good = [(k, t) for k, t in docs if t is not None]
  n_bad = len(docs) - len(good)
  need = f'need UTF-8 JSON with a string field {text_key!r}' if text_key else 'need UTF-8 text'
  kinds = {'empty': 'empty', 'binary': 'binary (not UTF-8 text)'}
  if not good:
    parts = [f'{_files(len(v), kinds[k])} ({_some(v)})' for k, v in skipped.items() if v]
    if n_bad:
      parts.append(f'every row is malformed ({n_bad} row{"s" if n_bad > 1 else ""}; .jsonl rows {need})')
    raise UserError(f'no usable document in data.files: {"; ".join(parts)}.')
  for kind, files in skipped.items():
    if files:
      print(f'warning: skipped {_files(len(files), kinds[kind])} of {len(paths)} in data.files, '
            f'e.g. {files[0]!r}', file=sys.stderr)
  if n_bad:
    print(f'warning: skipped {n_bad} malformed of {len(docs)} rows in data.files ({need})', file=sys.stderr)
  return good


def _smallest_hash(keys) -> str:
  return min(keys, key=lambda k: hashlib.md5(k.encode()).hexdigest())


def split_documents(docs: list[tuple[str, str]], raw: bool) -> tuple[list, list]:
  """(train, validation) documents of a local corpus, fixed by the keys' hashes.

  A corpus of several documents holds out whole documents (2% by hash, at least
  one, never all). A corpus of ONE document has none to spare: holding it out
  left training nothing, and evaluating on the training text would report a
  memorisation score as held-out loss. So its text is cut instead, as
  nanoGPT cuts Shakespeare: training gets the first 90%, validation the rest
  (from the first line break after the 90% mark if one is near, so no line is
  split). A lone structured row (raw=True, SFT or preference data) cannot be
  cut; it is used for both splits, with a warning that the eval is not held out.
  """
  if len(docs) == 1:
    (key, text), = docs
    cut = len(text) * (100 - _TAIL_PERCENT) // 100
    newline = text.find('\n', cut)
    if 0 <= newline < len(text) - 1 and newline - cut <= len(text) // 20:
      cut = newline + 1
    if raw or not 0 < cut < len(text):
      print(f'warning: data.files holds a single {"row" if raw else "document, too short to cut"}: it is '
            'used for training and evaluation alike, so the eval loss is not held out', file=sys.stderr)
      return docs, docs
    print(f'warning: data.files holds a single document: training on its first {100 - _TAIL_PERCENT}%, '
          f'evaluating on the rest', file=sys.stderr)
    return [(key, text[:cut])], [(f'{key}#tail', text[cut:])]
  val = {k for k, _ in docs if is_validation(k)}
  if not val or len(val) == len(docs):  # small corpora: hold out one document, the same one every run
    val = {_smallest_hash(val or (k for k, _ in docs))}
  return [d for d in docs if d[0] not in val], [d for d in docs if d[0] in val]


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
    docs = local_documents(self._paths, self._text_key)
    train, val = split_documents(docs, raw=not self._text_key)
    return {'train': self._generate_examples(train), 'validation': self._generate_examples(val)}

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


def allgather_json(obj) -> list:
  """[obj of process 0, obj of process 1, ...]: a JSON-serialisable value from
  every process (just [obj] with one)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(obj).encode('utf-8'), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(len(data)))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:len(data)] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode('utf-8')) for row, n in zip(gathered, sizes)]


def example_text(example: dict, text_key: str) -> str:
  """The document text of a TFDS example (bytes or str); text_key '' = the stored row."""
  if not text_key:
    text_key = 'json' if 'json' in example else 'text'
  if text_key not in example:
    raise UserError(f'examples have no field {text_key!r} (fields: {sorted(example)}); '
                    'set --config.data.text_key.')
  text = example[text_key]
  return text.decode('utf-8', errors='replace') if isinstance(text, bytes) else str(text)


def parse_python(source: str) -> ast.Module | None:
  """The syntax tree of Python source, or None if it does not parse. The mined
  files are not ours: their invalid escape sequences ("\\(" in a plain string)
  would print a SyntaxWarning per file, so warnings are silenced here."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', (SyntaxWarning, DeprecationWarning))
    try:
      return ast.parse(source)
    except (SyntaxError, ValueError):
      return None


def first_rows(source, limit: int | None = None, block: int = 1024) -> Iterator[Any]:
  """Yields the first `limit` rows (None: all) of a random-access source in storage
  order. A TFDS source reads a block of keys in one call (`__getitems__`); one call
  per row costs 5x more, seconds at every start for the row checks."""
  n = len(source) if limit is None else min(len(source), limit)
  read_block = getattr(source, '__getitems__', None)
  for start in range(0, n, block):
    keys = range(start, min(n, start + block))
    yield from (read_block(list(keys)) if read_block else (source[i] for i in keys))


def iter_texts(source, text_key: str = 'text') -> Iterator[str]:
  """Texts of a source in storage order."""
  for example in first_rows(source):
    yield example_text(example, text_key)
