"""Embedded preference pairs, offline: {"prompt", "chosen", "rejected"} JSON rows.

* 'pref_tasks': the SFT task families; chosen = the exact answer, rejected = a
  plausible wrong one (an addition off by 1 or 10, the letters not reversed or
  with two swapped, a list with two neighbours swapped). Questions keep the SFT
  held-out split, so validation pairs are unseen in SFT and DPO training.
* 'pref_code': stdlib functions; chosen = the real source, rejected = the same
  function with one body line deleted. Split by source file.
"""

from __future__ import annotations

import random

from research.data import sft_sources, sources


def wrong_answer(family: str, question: str, answer: str, rng: random.Random) -> str:
  """A plausible but wrong answer to a generated task."""
  if family == 'add':
    value = int(answer)
    deltas = [d for d in (-10, -1, 1, 10) if value + d >= 0]
    return str(value + rng.choice(deltas))
  items = answer.split()
  if family == 'reverse':
    original = question.split(': ', 1)[1].split()
    if original != items:
      return ' '.join(original)
  for _ in range(20):  # swap two neighbours that differ
    i = rng.randrange(len(items) - 1)
    if items[i] != items[i + 1]:
      items[i], items[i + 1] = items[i + 1], items[i]
      return ' '.join(items)
  return ' '.join(items + items[-1:])  # all equal: a wrong length instead


def task_pairs(split: str, per_family: int, seed: int = 99):
  """Yields (key, row) preference pairs from the generated tasks."""
  rng = random.Random(seed)
  for key, row in sft_sources.task_rows(split, per_family):
    question = row['messages'][0]['content']
    yield key, {'prompt': question, 'chosen': row['answer'], 'family': row['family'],
                'rejected': wrong_answer(row['family'], question, row['answer'], rng)}


def code_pairs(split_validation: bool, seed: int = 7):
  """Yields (key, row): real function vs the same function missing one body line."""
  rng = random.Random(seed)
  for rel, path in sources.stdlib_files():
    if sources.is_validation(rel) != split_validation:
      continue
    for key, row in sft_sources.code_pairs(path, rel):
      body = row['messages'][1]['content']
      lines = body.splitlines(keepends=True)
      if len(lines) < 4:
        continue
      i = rng.randrange(1, len(lines))
      rejected = ''.join(lines[:i] + lines[i + 1:])
      if rejected.strip() == body.strip():
        continue
      yield key, {'prompt': row['messages'][0]['content'], 'chosen': body, 'rejected': rejected,
                  'family': 'code'}


class PrefTasks(sources.JsonRows):
  """Correct vs plausible wrong answers to the generated tasks."""

  def rows(self, split):
    return task_pairs(split, 4000 if split == 'train' else 100)


class PrefCode(sources.JsonRows):
  """Real stdlib functions vs corrupted copies."""

  BUILDER_CONFIGS = sources.Stdlib.BUILDER_CONFIGS

  def rows(self, split):
    return code_pairs(split == 'validation')


BUILDERS = {'pref_tasks': PrefTasks, 'pref_code': PrefCode}
