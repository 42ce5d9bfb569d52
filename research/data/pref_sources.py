"""Embedded preference pairs, offline: {"prompt", "chosen", "rejected"} JSON rows.

Each row also names its `family` and the `kind` of error in the rejected reply,
so results can be broken down (experiments/preference_breakdown.py).

* 'pref_tasks': the SFT task families; chosen = the exact answer, rejected = a
  plausible wrong one:
    add      'near' (off by 1 or 10), 'carry' (the units' carry dropped: 47 + 38
             -> 75) or 'transposed' (two digits swapped: 85 -> 58), drawn evenly
             from those that apply;
    reverse  'unreversed' (the letters as given) or 'swapped' (two neighbours);
    sort     'swapped' (two neighbours out of order).
  Questions keep the SFT held-out split, so validation pairs are unseen in SFT
  and preference training.
* 'pref_code': stdlib functions; chosen = the real source, rejected = a bug of
  one of three kinds, a third each: 'deleted_line' (one statement removed),
  'misspelled_name' (one use of a name misspelled: a NameError) or
  'swapped_operator' (one of < > <= >= == != + - flipped). Only functions
  whose prompt and source fit MAX_CODE_PAIR_CHARS. Split by source file.
* 'pref_tasks_ranked': the same task questions as ranked rows {"prompt",
  "ranked": [exact answer, wrong answers from least to most wrong]}, for
  training on every pair of a ranking (InstructGPT's K-wise comparisons). Up
  to RANKED_WRONG wrong answers, each with a different answer_error (for add
  the absolute numeric error, for reverse and sort the number of wrong
  positions), drawn from plausible slips; `errors` lists each reply's.
  Held out like 'pref_tasks'.
"""

from __future__ import annotations

import ast
import io
import random
import tokenize

import tensorflow_datasets as tfds

from research.data import sft_sources, sources

CODE_KINDS = ('deleted_line', 'misspelled_name', 'swapped_operator')
# Short functions only: prompt and reply fit the tiny preset's 128-token context
# (about 3.5 characters a token), so the bug is never cut off.
MAX_CODE_PAIR_CHARS = 400
_FLIPPED = {'<': '>', '>': '<', '<=': '>=', '>=': '<=', '==': '!=', '!=': '==', '+': '-', '-': '+'}


def _near(value: int, rng: random.Random) -> str:
  return str(value + rng.choice([d for d in (-10, -1, 1, 10) if value + d >= 0]))


def wrong_add(a: int, b: int, rng: random.Random) -> tuple[str, str]:
  """(a wrong sum, its kind), the kind drawn from those that apply to a + b."""
  value = a + b
  options = {'near': _near(value, rng)}
  if a % 10 + b % 10 >= 10:
    options['carry'] = f'{a // 10 + b // 10}{value % 10}'  # the units' carry never reaches the tens
  digits = list(str(value))
  spots = [i for i in range(len(digits) - 1) if digits[i] != digits[i + 1] and (i or digits[1] != '0')]
  if spots:
    i = rng.choice(spots)
    digits[i], digits[i + 1] = digits[i + 1], digits[i]
    options['transposed'] = ''.join(digits)
  kind = rng.choice(sorted(options))
  return options[kind], kind


def _swap_neighbours(items: list[str], rng: random.Random) -> str | None:
  spots = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
  if not spots:
    return None
  i = rng.choice(spots)
  items = list(items)
  items[i], items[i + 1] = items[i + 1], items[i]
  return ' '.join(items)


def wrong_answer(family: str, question: str, answer: str, rng: random.Random) -> tuple[str, str]:
  """(a plausible but wrong answer to a generated task, the kind of error)."""
  if family == 'add':
    a, b = (int(x) for x in question[len('What is '):-1].split(' + '))
    return wrong_add(a, b, rng)
  items = answer.split()
  if family == 'reverse' and rng.random() < 0.5:
    original = question.split(': ', 1)[1]
    if original != answer:
      return original, 'unreversed'
  swapped = _swap_neighbours(items, rng)
  if swapped is not None:
    return swapped, 'swapped'
  return ' '.join(items + items[-1:]), 'repeated'  # all equal: a wrong length instead


def task_pairs(split: str, per_family: int, seed: int = 99):
  """Yields (key, row) preference pairs from the generated tasks."""
  rng = random.Random(seed)
  for key, row in sft_sources.task_rows(split, per_family):
    question = row['messages'][0]['content']
    rejected, kind = wrong_answer(row['family'], question, row['answer'], rng)
    yield key, {'prompt': question, 'chosen': row['answer'], 'rejected': rejected,
                'family': row['family'], 'kind': kind}


RANKED_WRONG = 3  # wrong answers per ranked row (fewer where fewer degrees of wrongness exist)


def answer_error(family: str, answer: str, reply: str) -> int:
  """How wrong `reply` is against the exact `answer`: for add the absolute
  numeric error; for reverse and sort the number of wrong positions (items
  compared position by position, each missing or extra item one more)."""
  if family == 'add':
    return abs(int(reply) - int(answer))
  want, got = answer.split(), reply.split()
  return sum(w != g for w, g in zip(want, got)) + abs(len(want) - len(got))


def _two_swaps(items: list[str]) -> list[list[str]]:
  """Every copy of `items` with two disjoint pairs of neighbours swapped."""
  out = []
  for i in range(len(items) - 1):
    for j in range(i + 2, len(items) - 1):
      x = list(items)
      x[i], x[i + 1], x[j], x[j + 1] = x[i + 1], x[i], x[j + 1], x[j]
      out.append(x)
  return out


def wrong_answers(family: str, question: str, answer: str) -> list[str]:
  """Plausible wrong answers to a generated task (deduplicated, in a fixed
  order): for add, slips of 1, 2, 10, 11, 20 or 100, the carry dropped and two
  digits transposed; for reverse and sort, the question's own order, one or two
  neighbour swaps, one item changed or dropped, a rotation (and for sort the
  descending order)."""
  if family == 'add':
    a, b = (int(x) for x in question[len('What is '):-1].split(' + '))
    value = a + b
    out = [str(value + d) for d in (-100, -20, -11, -10, -2, -1, 1, 2, 10, 11, 20, 100) if value + d >= 0]
    if a % 10 + b % 10 >= 10:
      out.append(f'{a // 10 + b // 10}{value % 10}')  # the units' carry never reaches the tens
    digits = str(value)
    for i in range(len(digits) - 1):
      swapped = digits[:i] + digits[i + 1] + digits[i] + digits[i + 2:]
      if swapped[0] != '0':
        out.append(swapped)
  else:
    items = answer.split()
    given = question.split(': ', 1)[1].split()
    candidates = [given, items[::-1], items[1:] + items[:1], items[:-1], items[1:]]
    for i in range(len(items) - 1):
      candidates.append(items[:i] + [items[i + 1], items[i]] + items[i + 2:])
    candidates += _two_swaps(items)
    for i, item in enumerate(items):  # one item slipped: the next letter, or the number plus one
      slip = (chr((ord(item) - ord('a') + 1) % 26 + ord('a')) if family == 'reverse'
              else str((int(item) + 1) % 100))
      candidates.append(items[:i] + [slip] + items[i + 1:])
    out = [' '.join(c) for c in candidates if c]
  return [w for w in dict.fromkeys(out) if w != answer]


def ranked_answers(family: str, question: str, answer: str, rng: random.Random) -> tuple[list[str], list[int]]:
  """([exact answer, wrong answers from least to most wrong], their
  answer_error): up to RANKED_WRONG wrong answers with distinct errors, so the
  order is strict, drawn at random among the degrees of wrongness there are."""
  by_error: dict[int, list[str]] = {}
  for w in wrong_answers(family, question, answer):
    by_error.setdefault(answer_error(family, answer, w), []).append(w)
  errors = sorted(rng.sample(sorted(by_error), min(RANKED_WRONG, len(by_error))))
  return [answer] + [rng.choice(by_error[e]) for e in errors], [0] + errors


def ranked_task_rows(split: str, per_family: int, seed: int = 123):
  """Yields (key, row) ranked rows from the generated tasks (same questions and
  held-out split as task_pairs)."""
  rng = random.Random(seed)
  for key, row in sft_sources.task_rows(split, per_family):
    question = row['messages'][0]['content']
    ranked, errors = ranked_answers(row['family'], question, row['answer'], rng)
    yield key, {'prompt': question, 'ranked': ranked, 'family': row['family'], 'errors': errors}


def _delete_line(body: str, rng: random.Random) -> str | None:
  """Without one single-line statement of the body (not a docstring or comment)."""
  tree = sources.parse_python(body)
  if tree is None:
    return None
  docstring = lambda n: isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
  rows = sorted({n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt) and n.lineno > 1
                 and n.lineno == n.end_lineno and not docstring(n)})
  if not rows:
    return None
  i = rng.choice(rows) - 1
  lines = body.splitlines(keepends=True)
  return ''.join(lines[:i] + lines[i + 1:])


def _misspell_name(body: str, rng: random.Random) -> str | None:
  """One load of a local name (argument or assigned), with two inner letters swapped."""
  tree = sources.parse_python(body)
  if tree is None:
    return None
  names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
  names |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments)
            for a in n.posonlyargs + n.args + n.kwonlyargs}
  uses = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
          and len(n.id) >= 4 and n.lineno > 1]
  rng.shuffle(uses)
  lines = body.splitlines(keepends=True)
  for node in uses:
    chars = list(node.id)
    i = rng.randrange(1, len(chars) - 2)
    chars[i], chars[i + 1] = chars[i + 1], chars[i]
    typo = ''.join(chars)
    if typo in names:
      continue
    line = lines[node.lineno - 1]
    lines[node.lineno - 1] = line[:node.col_offset] + typo + line[node.end_col_offset:]
    return ''.join(lines)
  return None


def _flip_operator(body: str, rng: random.Random) -> str | None:
  try:
    ops = [t for t in tokenize.generate_tokens(io.StringIO(body).readline)
           if t.type == tokenize.OP and t.string in _FLIPPED and t.start[0] > 1]
  except (tokenize.TokenError, SyntaxError):
    return None
  if not ops:
    return None
  tok = rng.choice(ops)
  lines = body.splitlines(keepends=True)
  row, col = tok.start
  line = lines[row - 1]
  lines[row - 1] = line[:col] + _FLIPPED[tok.string] + line[col + len(tok.string):]
  return ''.join(lines)


_CORRUPT = {'deleted_line': _delete_line, 'misspelled_name': _misspell_name,
            'swapped_operator': _flip_operator}


def corrupt_code(body: str, rng: random.Random) -> tuple[str, str] | None:
  """(a buggy copy of `body`, the kind of bug), or None if no kind applies."""
  first = rng.choice(CODE_KINDS)
  for kind in (first,) + tuple(k for k in CODE_KINDS if k != first):
    out = _CORRUPT[kind](body, rng)
    if out is not None and out.strip() != body.strip():
      return out, kind
  return None


def code_pairs(split_validation: bool, seed: int = 7):
  """Yields (key, row): a real stdlib function vs a buggy copy."""
  rng = random.Random(seed)
  for rel, path in sources.stdlib_files():
    if sources.is_validation(rel) != split_validation:
      continue
    for key, row in sft_sources.code_pairs(path, rel):
      body = row['messages'][1]['content']
      prompt = row['messages'][0]['content']
      if len(prompt) + len(body) > MAX_CODE_PAIR_CHARS:
        continue
      bug = corrupt_code(body, rng)
      if bug is None:
        continue
      yield key, {'prompt': prompt, 'chosen': body, 'rejected': bug[0],
                  'family': 'code', 'kind': bug[1]}


class PrefTasks(sources.JsonRows):
  """Correct vs plausible wrong answers to the generated tasks."""

  VERSION = tfds.core.Version('1.1.0')

  def rows(self, split):
    return task_pairs(split, 4000 if split == 'train' else 100)


class PrefCode(sources.JsonRows):
  """Real stdlib functions vs buggy copies."""

  VERSION = tfds.core.Version('1.2.0')
  BUILDER_CONFIGS = sources.Stdlib.BUILDER_CONFIGS

  def rows(self, split):
    return code_pairs(split == 'validation')


class PrefTasksRanked(sources.JsonRows):
  """The generated tasks' answers ranked: exact first, then wrong ones from least to most wrong."""

  VERSION = tfds.core.Version('1.0.0')

  def rows(self, split):
    return ranked_task_rows(split, 4000 if split == 'train' else 100)
