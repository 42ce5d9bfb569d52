"""Rewards for scoring replies: a learned reward model (a finished reward run),
and the reward functions of online RL (rule-based, learned, or your own).

    rm = load_reward_model('runs/reward')
    rewards = rm.score([[{'role': 'user', 'content': 'What is 2 + 3?'},
                         {'role': 'assistant', 'content': '5'}]])     # float32 [N]

A reward model is the decoder with a `score` head ([D, 1], model.head='score')
read at the reply's last token (research/data/pairs.py: render_scored), as
HF's *ForSequenceClassification models read the last non-padding token.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research import models
from research.data import pairs
from research.data.tokenizer import Tokenizer
from research.errors import UserError


def scores(model, params, tokens_BT, positions_BT, segment_ids_BT, score_index_B, rng=None):
  """Rewards [B]: the score head's output at position score_index_B of each row."""
  out_BT = models.forward(model, params, tokens_BT, positions_BT, segment_ids_BT, rng)[..., 0]
  # A one-hot sum rather than a gather: the same value, and its gradient is a
  # plain product (no scatter) in the backward pass.
  return jnp.sum(out_BT * jax.nn.one_hot(score_index_B, out_BT.shape[1], dtype=out_BT.dtype), axis=-1)


class RewardModel:
  """A trained reward model: scores conversations ending with an assistant reply."""

  def __init__(self, model, params, tokenizer: Tokenizer, seq_len: int):
    self.model, self.params, self.tokenizer, self.seq_len = model, params, tokenizer, seq_len

  @functools.cached_property
  def _scores(self):
    return jax.jit(functools.partial(scores, self.model))

  def score(self, conversations: list[list[dict]], batch_size: int = 64) -> np.ndarray:
    """Rewards (float32 [N]) of conversations that end with an assistant reply."""
    rows = []
    for messages in conversations:
      arrays = pairs.render_scored(messages, self.tokenizer, self.seq_len)
      if arrays is None:
        raise ValueError(f'conversation has no assistant reply within {self.seq_len} tokens: '
                         f'{messages!r:.200}')
      rows.append(arrays)
    out = []
    for i in range(0, len(rows), batch_size):
      chunk = rows[i:i + batch_size]
      chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
      b = {k: np.stack([r[k] for r in chunk]) for k in pairs.SCORED_KEYS}
      r = self._scores(self.params, b['inputs'], b['positions'], b['segment_ids'], b['score_index'])
      out.append(np.asarray(r))
    return np.concatenate(out)[:len(rows)].astype(np.float32)  # drop the padding rows


def load_reward_model(workdir: str) -> RewardModel:
  """The latest checkpoint of a reward run (config.json, tokenizer, parameters)."""
  from research.training.init import load_params  # pylint: disable=import-outside-toplevel
  run = load_params(workdir)
  if run.model.cfg.head != 'score':
    raise UserError(f"{workdir} is not a reward model (model.head={run.model.cfg.head!r}, not 'score').")
  return RewardModel(run.model, run.params, run.tokenizer, run.config.seq_len)


# ---- Reward functions for online RL ------------------------------------------
#
# A reward function takes the samples of one batch and returns one float per
# sample, or None where it abstains (a row it cannot judge):
#
#     def my_reward(samples: Sequence[Sample]) -> list[float | None]: ...
#
# Configs name them as built-ins ('exact_match', 'reward_model:runs/reward') or
# as 'package.module:function'; several combine with weights (combine()).


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled reply, as reward functions see it."""

  prompt: list            # the conversation it answers: [{'role', 'content'}, ...]
  completion: str         # the reply's text (stop token removed)
  completion_ids: tuple   # the reply's token ids (stop token included when produced)
  row: dict               # the dataset row (fields such as 'answer' and 'family')
  truncated: bool         # the reply hit the length limit without a stop token


def exact_match(samples: Sequence[Sample]) -> list[float | None]:
  """1 when the reply equals row['answer'] (both stripped), else 0; abstains without an answer."""
  return [None if 'answer' not in s.row else float(s.completion.strip() == str(s.row['answer']).strip())
          for s in samples]


def _position_credit(got: list[str], want: list[str]) -> float:
  """Share of positions right, over the longer of the two lists."""
  if not got or not want:
    return 0.0
  return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def partial_credit(samples: Sequence[Sample]) -> list[float | None]:
  """Per-family partial credit on the embedded tasks: 'add' 1 - |error| / 10
  (floored at 0); 'reverse' and 'sort' the share of items in the right
  position; exact answers 1; abstains on other families."""
  out = []
  for s in samples:
    family, answer, got = s.row.get('family'), str(s.row.get('answer', '')).strip(), s.completion.strip()
    if family == 'add':
      out.append(max(0.0, 1.0 - abs(int(got) - int(answer)) / 10) if re.fullmatch(r'\d+', got) else 0.0)
    elif family in ('reverse', 'sort'):
      out.append(_position_credit(got.split(), answer.split()))
    else:
      out.append(None)
  return out


_FORMATS = {'add': r'\d+', 'reverse': r'[a-z]( [a-z])*', 'sort': r'\d+( \d+)*'}


def answer_format(samples: Sequence[Sample]) -> list[float | None]:
  """1 when the reply has its task family's answer format (a number; letters or
  numbers separated by single spaces) and stopped by itself, else 0; abstains
  on other families."""
  out = []
  for s in samples:
    pattern = _FORMATS.get(s.row.get('family'))
    out.append(None if pattern is None else
               float(not s.truncated and re.fullmatch(pattern, s.completion.strip()) is not None))
  return out


def overlong_penalty(max_tokens: int, buffer: int):
  """DAPO's soft overlong punishment (Yu et al., 2025), counted in tokens: 0 up
  to max_tokens - buffer, then falling linearly to -1 at max_tokens (and -1 for a
  truncated reply)."""
  def reward(samples: Sequence[Sample]) -> list[float | None]:
    out = []
    for s in samples:
      n = len(s.completion_ids)
      out.append(-1.0 if s.truncated or n >= max_tokens else min(0.0, (max_tokens - buffer - n) / buffer))
    return out
  return reward


@functools.lru_cache(maxsize=None)
def shared_reward_model(workdir: str) -> RewardModel:
  """load_reward_model, once per workdir and process: a reward function and an
  evaluator of one run share the model."""
  return load_reward_model(workdir)


def learned_reward(workdir: str):
  """The score of a trained reward run for prompt + reply; abstains on an empty
  reply (the model reads its score at a reply token, and there is none)."""
  rm = shared_reward_model(workdir)

  def reward(samples: Sequence[Sample]) -> list[float | None]:
    scored = [i for i, s in enumerate(samples) if s.completion.strip()]
    convos = [list(samples[i].prompt) + [{'role': 'assistant', 'content': samples[i].completion}] for i in scored]
    out: list[float | None] = [None] * len(samples)
    for i, r in zip(scored, rm.score(convos) if convos else []):
      out[i] = float(r)
    return out
  return reward


BUILTINS = ('exact_match', 'partial_credit', 'format', 'overlong', 'reward_model')


def resolve(spec: str, *, max_tokens: int = 0, overlong_buffer: int = 0):
  """The reward function named by `spec`: a built-in ('exact_match',
  'partial_credit', 'format', 'overlong', 'reward_model:<workdir>') or
  'package.module:function'."""
  name, _, arg = spec.partition(':')
  if name == 'exact_match':
    return exact_match
  if name == 'partial_credit':
    return partial_credit
  if name == 'format':
    return answer_format
  if name == 'overlong':
    if not 0 < overlong_buffer < max_tokens:
      raise UserError(f'reward overlong: needs 0 < overlong_buffer ({overlong_buffer}) < max_new_tokens '
                      f'({max_tokens}).')
    return overlong_penalty(max_tokens, overlong_buffer)
  if name == 'reward_model':
    if not arg:
      raise UserError("reward 'reward_model' needs a run: 'reward_model:<workdir of a reward run>'.")
    return learned_reward(arg)
  if not arg:
    raise UserError(f'reward {spec!r} is neither a built-in {BUILTINS} nor package.module:function.')
  try:
    fn = getattr(importlib.import_module(name), arg)
  except (ImportError, AttributeError) as e:
    raise UserError(f'reward {spec!r} cannot be imported ({e}).') from None
  if not callable(fn):
    raise UserError(f'reward {spec!r} is not a function.')
  return fn


def check_contract(fn, spec: str, samples: Sequence[Sample]) -> None:
  """Calls `fn` on `samples` once and raises a one-line UserError unless it
  returns one float or None per sample."""
  try:
    out = list(fn(samples))
  except Exception as e:  # pylint: disable=broad-except  # any failure of user code is reported in one line
    raise UserError(f'reward {spec!r} failed on {len(samples)} sample(s) at start-up: '
                    f'{type(e).__name__}: {str(e)[:200]}. A reward takes a list of '
                    'research.rewards.Sample and returns one float or None per sample.') from None
  bad = [v for v in out if v is not None and not isinstance(v, (int, float, np.floating, np.integer))]
  if len(out) != len(samples) or bad:
    raise UserError(f'reward {spec!r} returned {len(out)} values for {len(samples)} samples'
                    f'{f" (e.g. {bad[0]!r})" if bad else ""}; it must return one float or None per sample.')


def combine(values: dict[str, list], weights: dict[str, float]) -> np.ndarray:
  """The weighted sum per sample of several rewards' values (float32 [N]); a
  reward that abstains (None) on a sample adds nothing to it."""
  n = len(next(iter(values.values())))
  total = np.zeros(n, np.float32)
  for name, vals in values.items():
    total += weights[name] * np.asarray([0.0 if v is None else float(v) for v in vals], np.float32)
  return total
