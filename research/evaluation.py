"""Evaluators and held-out metrics beyond the loss.

An evaluator is called by the training loop after the eval loss as
`evaluator(policy, tokenizer, metrics) -> {name: value}` (logged as
eval/<name>); `metrics` holds what evaluation has computed so far (eval/loss,
...). Evaluators load their own data, once.

* `perplexity`: exp(eval/loss), for stages whose loss is a token cross-entropy.
* `GreedyTaskEval`: greedy answers to the held-out generated tasks (sft_tasks),
  scored by exact match and by reward models.
* `PassAtK`: pass@k and mean@n of sampled answers to them.

Preference accuracy is a metric of the DPO and reward losses themselves
(eval/rewards/accuracies, eval/accuracy); experiments/preference_breakdown.py
computes it over every held-out pair, per family and kind of error.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import numpy as np
import tqdm

from research import sampling
from research.data import chat, pipeline, sources
from research.data.tokenizer import Tokenizer


def perplexity(policy, tokenizer, metrics: dict) -> dict[str, float]:
  """exp(eval/loss) (capped at exp(50))."""
  del policy, tokenizer
  return {'perplexity': math.exp(min(metrics['eval/loss'], 50.0))}


def greedy_texts(model, params, tokenizer: Tokenizer, prompts: list[list[int]], stops: Sequence[int], *,
                 max_new_tokens: int = 24, batch_size: int = 128, progress: bool = False) -> list[str]:
  """The greedy continuation (text, stop tokens removed) of each prompt (token
  ids), `batch_size` prompts at a time (the last batch padded: one compiled shape)."""
  replies = []
  for i in tqdm.trange(0, len(prompts), batch_size, desc='generate', disable=None if progress else True, leave=False):
    chunk = prompts[i:i + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    outs = sampling.generate(model, params, padded, max_new_tokens=max_new_tokens, stop_tokens=tuple(stops),
                             pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)[:len(chunk)]
    replies += [tokenizer.decode([t for t in out if t not in stops]) for out in outs]
  return replies


def sampled_texts(model, params, tokenizer: Tokenizer, prompts: list[list[int]], stops: Sequence[int], rng, *,
                  n: int, temperature: float, max_new_tokens: int = 24) -> list[str]:
  """n sampled continuations (text, stop tokens removed) of each prompt, in one
  rollout: prompt i's samples are items i*n .. i*n + n-1."""
  tokens, segs, pos = sampling.left_pad(prompts, tokenizer.pad_id)
  out = sampling.rollout(model, params, tokens, segs, pos, rng, np.asarray(stops, np.int32),
                         max_new_tokens=max_new_tokens, n=n, temperature=float(temperature),
                         pad_id=tokenizer.pad_id, vocab_limit=tokenizer.vocab_size)
  ids, mask = np.asarray(out['tokens']), np.asarray(out['mask'])
  return [tokenizer.decode([t for t, m in zip(i, mk) if m and t not in stops]) for i, mk in zip(ids, mask)]


def pass_at_k_metrics(correct_RN: np.ndarray, ks: Sequence[int], suffix: str = '') -> dict[str, float]:
  """pass@k (unbiased, for each k) and mean@n (the share of correct samples) of
  a [rows, n] table of correct samples, averaged over rows; names end in `suffix`."""
  n = correct_RN.shape[1]
  c = correct_RN.sum(axis=1)
  out = {f'pass@{k}{suffix}': float(np.mean([pass_at_k(n, int(ci), k) for ci in c])) for k in ks}
  out[f'mean@{n}{suffix}'] = float(np.mean(c / n))
  return out


def greedy_replies(model, params, tokenizer: Tokenizer, rows: list[dict], *, max_new_tokens: int = 24,
                   batch_size: int = 128) -> list[str]:
  """The greedy reply (text, stop token removed) to each row's `messages`."""
  prompts = [chat.prompt_ids(r['messages'], tokenizer) for r in rows]
  return greedy_texts(model, params, tokenizer, prompts, chat.stop_tokens(tokenizer), max_new_tokens=max_new_tokens,
                      batch_size=batch_size)


def exact_match_of(replies: list[str], rows: list[dict]) -> dict[str, float]:
  """Fraction of `replies` equal to their row's answer (stripped), overall
  ('exact_match') and per family ('exact_match/<family>')."""
  correct = [text.strip() == row['answer'].strip() for text, row in zip(replies, rows)]
  result = {'exact_match': float(np.mean(correct))}
  for family in sorted({r['family'] for r in rows}):
    hits = [c for c, r in zip(correct, rows) if r['family'] == family]
    result[f'exact_match/{family}'] = float(np.mean(hits))
  return result


def exact_match(model, params, tokenizer: Tokenizer, rows: list[dict], *, max_new_tokens: int = 24,
                batch_size: int = 128) -> dict[str, float]:
  """exact_match_of the greedy replies to `rows`."""
  replies = greedy_replies(model, params, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
  return exact_match_of(replies, rows)


def task_rows(data_cfg, examples: int = 0) -> list[dict]:
  """The held-out generated tasks (sft_tasks validation), sorted by family and
  question; the first `examples` of them (0: all 300)."""
  src = pipeline.open_named(data_cfg, 'sft_tasks', 'validation')
  rows = [json.loads(example['json']) for example in sources.first_rows(src)]
  rows.sort(key=lambda r: (r['family'], r['messages'][0]['content']))
  return rows[:examples] if examples > 0 else rows


class _TaskEvaluator:
  """An evaluator on the held-out generated tasks, loaded on first use."""

  def __init__(self, data_cfg, examples: int = 0, max_new_tokens: int = 24):
    self.data_cfg, self.examples, self.max_new_tokens = data_cfg, examples, max_new_tokens
    self._rows = None

  @property
  def rows(self) -> list[dict]:
    if self._rows is None:
      self._rows = task_rows(self.data_cfg, self.examples)
    return self._rows


class GreedyTaskEval(_TaskEvaluator):
  """Evaluator: greedy replies to the held-out generated tasks, generated once and
  scored by exact match (exact_match, exact_match/<family>) and by each reward
  model in `reward_models` (workdirs of reward runs): its mean score of the
  replies, logged as reward_model/score (one model) or reward_model/score/<dir
  name> (several). Online RL against a reward model should raise that score;
  exact match tells whether the raise is real."""

  def __init__(self, data_cfg, examples: int = 0, max_new_tokens: int = 24, *, exact_match: bool = True,
               reward_models: tuple[str, ...] = ()):
    super().__init__(data_cfg, examples, max_new_tokens)
    self.exact_match, self.reward_models = exact_match, tuple(reward_models)

  def __call__(self, policy, tokenizer: Tokenizer, metrics: dict) -> dict[str, float]:
    del metrics
    replies = greedy_replies(policy.model, policy.params, tokenizer, self.rows, max_new_tokens=self.max_new_tokens)
    result = exact_match_of(replies, self.rows) if self.exact_match else {}
    if self.reward_models:
      from research.rewards import shared_reward_model  # pylint: disable=import-outside-toplevel
      convos = [chat.history(r['messages']) + [{'role': 'assistant', 'content': text}]
                for r, text in zip(self.rows, replies)]
      for workdir in self.reward_models:
        # The stage's reward function loaded this model before the loop entered its
        # mesh (loading builds a mesh of its own); this is the same object.
        name = 'reward_model/score' + ('' if len(self.reward_models) == 1 else f'/{os.path.basename(workdir)}')
        result[name] = float(np.mean(shared_reward_model(workdir).score(convos)))
    return result


def task_evaluators(data_cfg, task_eval_cfg, reward_models: tuple[str, ...] = ()) -> tuple:
  """One GreedyTaskEval on the held-out generated tasks: exact match when
  task_eval.exact_match, and the score of each reward model in `reward_models`
  (from the same replies); () when there is nothing to score."""
  t = task_eval_cfg
  if not t.exact_match and not reward_models:
    return ()
  return (GreedyTaskEval(data_cfg, t.examples, t.max_new_tokens, exact_match=t.exact_match,
                         reward_models=reward_models),)


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):
  1 - C(n - c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


class PassAtK(_TaskEvaluator):
  """Evaluator: n sampled replies per held-out task at `temperature`; logs
  pass@k (unbiased) and mean@n (the share of correct samples), overall and per family."""

  def __init__(self, data_cfg, *, n: int, k: int, temperature: float, examples: int = 0,
               max_new_tokens: int = 24, seed: int = 0):
    super().__init__(data_cfg, examples, max_new_tokens)
    self.n, self.k, self.temperature, self.seed = n, k, temperature, seed

  def __call__(self, policy, tokenizer: Tokenizer, metrics: dict) -> dict[str, float]:
    del metrics
    prompts = [chat.prompt_ids(r['messages'], tokenizer) for r in self.rows]
    texts = sampled_texts(policy.model, policy.params, tokenizer, prompts, chat.stop_tokens(tokenizer),
                          jax.random.PRNGKey(self.seed), n=self.n, temperature=self.temperature,
                          max_new_tokens=self.max_new_tokens)
    correct = np.asarray([t.strip() == self.rows[j // self.n]['answer'].strip()
                          for j, t in enumerate(texts)]).reshape(-1, self.n)
    result = {}
    for family in [None] + sorted({r['family'] for r in self.rows}):
      pick = [i for i, r in enumerate(self.rows) if family is None or r['family'] == family]
      result.update(pass_at_k_metrics(correct[pick], (self.k,), '' if family is None else f'/{family}'))
    return result
