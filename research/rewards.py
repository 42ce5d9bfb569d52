"""Rewards for scoring replies: a learned reward model (a finished reward run).

    rm = load_reward_model('runs/reward')
    rewards = rm.score([[{'role': 'user', 'content': 'What is 2 + 3?'},
                         {'role': 'assistant', 'content': '5'}]])     # float32 [N]

A reward model is the decoder with a `score` head ([D, 1], model.head='score')
read at the reply's last token (research/data/pairs.py: render_scored), as
HF's *ForSequenceClassification models read the last non-padding token.
"""

from __future__ import annotations

import functools

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
