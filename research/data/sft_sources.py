"""Embedded supervised fine-tuning data, offline, as TFDS datasets of JSON rows.

* 'sft_tasks': generated tasks with exact answers, in three families
  (`add`: two-digit addition, `reverse`: reversing 3-6 letters, `sort`: sorting
  3-5 numbers below 100). A row is {"messages": [...], "family": ..., "answer": ...}. The
  held-out split is fixed by a hash of the question, so no question is in both.
* 'sft_code': instruction-to-code pairs mined with `ast` from the Python
  standard library: the prompt gives a function's signature and docstring, the
  response is its source. Split by source file, like the pretraining corpus.

Local .jsonl rows (data.name='files', text_key='') are stored raw and parsed
(malformed ones counted) by research/data/sft.py. registry.py names the builders.
"""

from __future__ import annotations

import ast
import hashlib
import random
import textwrap

import tensorflow_datasets as tfds

from research.data import sources

TASK_FAMILIES = ('add', 'reverse', 'sort')
_LETTERS = 'abcdefghijklmnopqrstuvwxyz'


def make_task(family: str, rng: random.Random) -> tuple[str, str]:
  """(question, exact answer) for one generated task."""
  if family == 'add':
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f'What is {a} + {b}?', str(a + b)
  if family == 'reverse':
    letters = [rng.choice(_LETTERS) for _ in range(rng.randint(3, 6))]
    return f'Reverse the letters: {" ".join(letters)}', ' '.join(reversed(letters))
  if family == 'sort':
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    return f'Sort ascending: {" ".join(map(str, nums))}', ' '.join(map(str, sorted(nums)))
  raise ValueError(f'unknown task family {family!r}')


def _held_out(question: str) -> bool:
  return int(hashlib.md5(question.encode()).hexdigest(), 16) % 40 == 0


def task_rows(split: str, per_family: int, seed: int = 1234):
  """Yields (key, row) for `split`: `per_family` distinct tasks of each family."""
  for family in TASK_FAMILIES:
    rng = random.Random(f'{seed}-{family}')
    seen = set()
    while len(seen) < per_family:
      q, a = make_task(family, rng)
      if q in seen or _held_out(q) != (split == 'validation'):
        continue
      seen.add(q)
      row = {'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}],
             'family': family, 'answer': a}
      yield f'{family}-{len(seen)}', row


class SftTasks(sources.JsonRows):
  """Generated tasks with exact answers (add, reverse, sort)."""

  VERSION = tfds.core.Version('1.1.0')
  TRAIN_PER_FAMILY = 8000  # two-digit additions have only ~9750 training questions
  VALIDATION_PER_FAMILY = 100

  def rows(self, split):
    n = self.TRAIN_PER_FAMILY if split == 'train' else self.VALIDATION_PER_FAMILY
    return task_rows(split, n)


def code_pairs(path: str, rel: str, max_chars: int = 1200):
  """Yields (key, row) for each documented function of one source file."""
  with open(path, encoding='utf-8', errors='replace') as f:
    source = f.read()
  tree = sources.parse_python(source)
  if tree is None:
    return
  lines = source.splitlines(keepends=True)
  for node in ast.walk(tree):
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node)
    # Whole lines from `def` to the end (ast.get_source_segment rescans the file each call).
    body = ''.join(lines[node.lineno - 1:node.end_lineno])
    if not doc or not body or len(body) > max_chars or len(doc) < 10:
      continue
    body = textwrap.dedent(body).rstrip() + '\n'
    signature = body.split(':\n', 1)[0].splitlines()[-1] if ':\n' in body else body.splitlines()[0]
    if not signature.lstrip().startswith(('def ', 'async def ')):
      continue
    prompt = f'Write the Python function `{signature.strip()}`:\n\n{doc}'
    row = {'messages': [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': body}],
           'family': 'code', 'answer': ''}
    yield f'{rel}:{node.lineno}', row


class SftCode(sources.JsonRows):
  """Signature + docstring -> function source, from the standard library."""

  BUILDER_CONFIGS = sources.Stdlib.BUILDER_CONFIGS

  def rows(self, split):
    for rel, path in sources.stdlib_files():
      if sources.is_validation(rel) == (split == 'validation'):
        yield from code_pairs(path, rel)

