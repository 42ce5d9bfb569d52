"""The batch source of online RL: sample from the current policy, score, and
turn the samples into a training batch.

    source = RolloutSource(prompt_stream, tokenizer, settings, rewards, weights)
    batch = source.next(policy)      # the loop passes the policy it is training

Each call takes `prompts_per_step` prompts, samples `group_size` replies to each
with `sampling.rollout` (one prefill per prompt, the replies' log-probabilities
under the distribution sampled from), scores them with the reward functions
(research/rewards.py), and computes group advantages (losses.group_advantages).
The batch it returns holds, per row (one reply), the whole sequence and

    loss_mask   [batch, length]  1 on the reply's target tokens (0 for a zero-weight row)
    old_logps   [batch, length]  the sampler's log-probabilities of those tokens
    advantages  [batch]
    vocab_limit [batch]          the tokenizer's size: the sampler draws only ids
                                 below it, and the loss masks the rest the same way

With `iterations` > 1 the same rollout serves that many optimizer steps (its
log-probabilities are then the "old policy" of the clipped ratio).
DAPO's dynamic sampling draws `oversample` times the prompts and keeps groups
whose rewards differ; a shortfall is filled with zero-weight groups, so shapes
never change.

PPOSource (stage ppo) builds per-token fields instead: the critic's values at
the rollout's parameters (`old_values`), GAE `advantages` [batch, length] over
rewards that are the reply's score minus a per-token KL penalty to the
reference, and `returns`.

Each rollout logs its time split: time/update_s (the optimizer steps and hooks
since the last rollout), time/rollout_s (sampling), time/reward_s (reward
functions), time/reference_s (advantages: PPO's critic and reference forwards).

Resume is exact: the sampling key is derived from the seed and the number of
rollouts so far, which the source's state (checkpointed) holds with the prompt
stream's; checkpoints fall on rollout boundaries (a config check).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import numpy as np

from research import losses, models, rewards, sampling
from research.data import chat
from research.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """How replies are sampled and turned into advantages (config.grpo)."""

  prompts_per_step: int
  group_size: int
  prompt_len: int            # prompts are left-padded (never longer) to this many tokens
  max_new_tokens: int
  temperature: float = 1.0
  seed: int = 0
  iterations: int = 1        # optimizer steps per rollout
  advantage: str = 'grpo'    # grpo | drgrpo | rloo
  scale: str = 'group'       # group | batch | none (grpo)
  mask_truncated: bool = False  # zero weight for replies that hit max_new_tokens
  oversample: int = 1        # > 1: DAPO dynamic sampling over this many times the prompts


def _left_pad_to(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  tokens, segs, pos = sampling.left_pad(prompts, pad_id, bucket=length)
  assert tokens.shape[1] == length, (tokens.shape, length)
  return tokens, segs, pos


def _host(x) -> np.ndarray:
  """A (possibly multi-process) global array on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


class RolloutSource:
  """A batch source (see research/training/stage.py) that samples from the policy."""

  def __init__(self, prompts, tokenizer: Tokenizer, settings: RolloutSettings, reward_fns: dict,
               reward_weights: dict[str, float]):
    self.prompts = iter(prompts)
    self.tokenizer, self.s = tokenizer, settings
    self.reward_fns, self.reward_weights = reward_fns, reward_weights
    self.stop_ids = np.asarray(chat.stop_tokens(tokenizer), np.int32)
    self.rollouts = 0        # rollouts so far (the sampling key's counter)
    self._cached, self._served = None, 0
    self._last_end = 0.0     # when the last rollout ended (for time/update_s)
    self.metrics: dict[str, float] = {}  # of the latest rollout, for logging

  # -- state ----------------------------------------------------------------------

  def get_state(self) -> dict:
    """The prompt stream's position and the rollout counter (JSON-serialisable)."""
    if self._cached is not None and self._served < self.s.iterations:
      raise RuntimeError('a checkpoint inside a multi-step rollout cannot resume exactly')
    return {'prompts': self.prompts.get_state(), 'rollouts': self.rollouts}

  def set_state(self, state: dict) -> None:
    self.prompts.set_state(state['prompts'])
    self.rollouts = int(state['rollouts'])
    self._cached, self._served = None, 0

  # -- batches ----------------------------------------------------------------------

  def next(self, policy) -> dict[str, np.ndarray]:
    """The next training batch: a new rollout from `policy`, or the cached one
    while it serves `iterations` steps."""
    if self._cached is None or self._served >= self.s.iterations:
      self._cached, self._served = self._rollout(policy), 0
    self._served += 1
    return self._cached

  def _sample(self, policy, prompts: list[dict]):
    s = self.s
    tokens, segs, pos = _left_pad_to([p['ids'] for p in prompts], s.prompt_len, self.tokenizer.pad_id)
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s.seed), 2), self.rollouts)
    out = sampling.rollout(policy.model, policy.params, tokens, segs, pos, rng, self.stop_ids,
                           max_new_tokens=s.max_new_tokens, n=s.group_size, temperature=s.temperature,
                           pad_id=self.tokenizer.pad_id, vocab_limit=self.tokenizer.vocab_size)
    return {k: _host(v) for k, v in out.items()}

  def _score(self, prompts: list[dict], out: dict) -> tuple[np.ndarray, dict]:
    G, stops = self.s.group_size, set(self.stop_ids.tolist())
    samples = []
    for i, (ids, mask, trunc) in enumerate(zip(out['tokens'], out['mask'], out['truncated'])):
      reply = [int(t) for t, m in zip(ids, mask) if m]
      prompt = prompts[i // G]
      samples.append(rewards.Sample(prompt['messages'], self.tokenizer.decode([t for t in reply if t not in stops]),
                                    tuple(reply), prompt['row'], bool(trunc)))
    values = {name: list(fn(samples)) for name, fn in self.reward_fns.items()}
    return rewards.combine(values, self.reward_weights), values

  def _rollout(self, policy) -> dict[str, np.ndarray]:
    s = self.s
    t_update = self._wait_for_update(policy)
    t0 = time.time()
    prompts = [next(self.prompts) for _ in range(s.prompts_per_step * s.oversample)]
    out = self._sample(policy, prompts)
    t_sample = time.time() - t0
    reward_N, values = self._score(prompts, out)
    t_reward = time.time() - t0 - t_sample
    self.rollouts += 1
    G = s.group_size
    groups = np.arange(len(prompts))
    spread = np.ptp(reward_N.reshape(-1, G), axis=1) > 0
    if s.oversample > 1:  # keep groups that teach something; fill up with zero-weight ones
      keep = np.concatenate([groups[spread], groups[~spread]])[:s.prompts_per_step]
      row_weight = np.repeat(np.isin(keep, groups[spread]), G).astype(np.float32)
    else:
      keep, row_weight = groups, np.ones(len(prompts) * G, np.float32)
    rows = (keep[:, None] * G + np.arange(G)).reshape(-1)
    if s.mask_truncated:
      row_weight = row_weight * (~out['truncated'][rows])
    batch = self._batch(out, rows, row_weight)
    t1 = time.time()
    batch.update(self._advantages(policy, batch, reward_N[rows], row_weight))
    t_reference = time.time() - t1
    self.metrics = self._metrics(prompts, out, reward_N, values, spread, row_weight)
    self.metrics.update({'time/update_s': t_update, 'time/rollout_s': t_sample, 'time/reward_s': t_reward,
                         'time/reference_s': t_reference,
                         'tokens_per_sec': float(out['mask'].sum()) / max(t_sample, 1e-9)})
    self._last_end = time.time()
    return batch

  def _wait_for_update(self, policy) -> float:
    """Seconds from the end of the last rollout until `policy`'s parameters are
    computed: the optimizer steps on it (and any hooks) in between; 0 at first."""
    jax.block_until_ready(policy.params)
    return time.time() - self._last_end if self._last_end else 0.0

  def _advantages(self, policy, batch: dict, reward_N: np.ndarray, row_weight: np.ndarray) -> dict:
    """The batch fields a rollout's rewards give the loss: GRPO-family group advantages [B]."""
    del policy, batch
    adv_N = np.asarray(losses.group_advantages(reward_N, self.s.group_size, method=self.s.advantage,
                                               scale=self.s.scale))
    return {'advantages': adv_N.astype(np.float32) * row_weight}

  def _batch(self, out: dict, rows: np.ndarray, row_weight: np.ndarray) -> dict:
    """Rows of the rollout as a training batch (targets are the next tokens)."""
    P = self.s.prompt_len
    seq, seg, pos = out['sequences'][rows], out['segment_ids'][rows], out['positions'][rows]
    B, L = seq.shape
    loss_mask = np.zeros((B, L - 1), np.int32)
    loss_mask[:, P - 1:] = out['mask'][rows] * (row_weight[:, None] > 0)
    old_logps = np.zeros((B, L - 1), np.float32)
    old_logps[:, P - 1:] = out['logps'][rows]
    return {'inputs': seq[:, :-1], 'targets': seq[:, 1:], 'segment_ids': seg[:, :-1],
            'positions': pos[:, :-1], 'loss_mask': loss_mask, 'old_logps': old_logps * loss_mask,
            'vocab_limit': np.full((B,), self.tokenizer.vocab_size, np.int32)}

  def _metrics(self, prompts, out, reward_N, values, spread, row_weight) -> dict:
    """Host-side metrics of one rollout (rewards overall, per function and per task family)."""
    G = self.s.group_size
    lengths = out['mask'].sum(axis=1)
    m = {'reward/mean': float(reward_N.mean()), 'reward/std': float(reward_N.std()),
         'groups/kept': float(row_weight.mean()),
         'completion/length': float(lengths.mean()), 'completion/truncated': float(out['truncated'].mean())}
    if G > 1:
      m['groups/zero_spread'] = float(1 - spread.mean())
    for name, vals in values.items():
      judged = [v for v in vals if v is not None]
      if judged:
        m[f'reward/{name}'] = float(np.mean(judged))
    families = [p['row'].get('family') for p in prompts for _ in range(G)]
    for family in sorted({f for f in families if isinstance(f, str)}):
      m[f'reward/family/{family}'] = float(np.mean([r for r, f in zip(reward_N, families) if f == family]))
    return m


@dataclasses.dataclass(frozen=True)
class CriticSettings:
  """PPO's per-token rewards and advantages (config.ppo)."""

  kl_coef: float = 0.05      # the KL penalty to the reference in the reward, per token
  gamma: float = 1.0
  lam: float = 0.95
  whiten: bool = True        # advantages to mean 0, std 1 over the batch's reply tokens


@functools.partial(jax.jit, static_argnames=('model', 'temperature'))
def values_and_reference_logps(model, params, reference, batch: dict, temperature: float):
  """(the critic's values [B, T] at `params`, log p [B, T] of the targets under
  `reference` at `temperature` over ids < batch['vocab_limit'] (the sampler's
  support), or None without a reference)."""
  _, values_BT = models.forward_with_values(model, params, batch['inputs'], batch['positions'],
                                            batch['segment_ids'])
  if reference is None:
    return values_BT, None
  scale = lambda logits: sampling.mask_vocab(logits / temperature, batch.get('vocab_limit'))
  return values_BT, models.target_log_probs(model, reference, batch, logits_fn=scale)  # chunked if configured


def token_rewards(score_B: np.ndarray, logps_BT: np.ndarray, ref_logps_BT: np.ndarray | None,
                  mask_BT: np.ndarray, kl_coef: float) -> tuple[np.ndarray, np.ndarray]:
  """RLHF's per-token reward (Ziegler et al., 2019; Ouyang et al., 2022):
  -kl_coef * (log pi - log ref) on every reply token, plus the sequence's score
  on its last one. Returns (rewards_BT, kl_BT), 0 outside the mask."""
  mask = mask_BT.astype(np.float32)
  kl_BT = np.zeros_like(mask) if ref_logps_BT is None else (logps_BT - ref_logps_BT) * mask
  rewards_BT = -kl_coef * kl_BT
  has_reply = mask.sum(axis=1) > 0
  last_B = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
  rows = np.flatnonzero(has_reply)
  rewards_BT[rows, last_B[rows]] += score_B[rows]
  return rewards_BT, kl_BT


class PPOSource(RolloutSource):
  """RolloutSource for PPO: per-token advantages by GAE over the critic's values
  (the policy's value head, read at the rollout's parameters) and rewards that
  are the sequence's score minus a per-token KL penalty to the reference."""

  def __init__(self, prompts, tokenizer: Tokenizer, settings: RolloutSettings, reward_fns: dict,
               reward_weights: dict[str, float], critic: CriticSettings):
    super().__init__(prompts, tokenizer, settings, reward_fns, reward_weights)
    self.critic = critic

  def _advantages(self, policy, batch: dict, reward_N: np.ndarray, row_weight: np.ndarray) -> dict:
    c = self.critic
    reference = policy.frozen_views().get('reference') if c.kl_coef > 0 and policy.frozen_views else None
    values_BT, ref_BT = values_and_reference_logps(
        policy.model, policy.params, reference,
        {k: batch[k] for k in ('inputs', 'targets', 'positions', 'segment_ids', 'vocab_limit')},
        self.s.temperature)
    values_BT = _host(values_BT)
    ref_BT = None if ref_BT is None else _host(ref_BT)
    mask = batch['loss_mask'].astype(np.float32)
    rewards_BT, kl_BT = token_rewards(reward_N * row_weight, batch['old_logps'], ref_BT, mask, c.kl_coef)
    adv_BT, returns_BT = (np.asarray(x) for x in losses.gae(rewards_BT, values_BT, mask, gamma=c.gamma,
                                                            lam=c.lam))
    n = max(mask.sum(), 1.0)
    if c.whiten:
      mean = (adv_BT * mask).sum() / n
      std = np.sqrt((np.square(adv_BT - mean) * mask).sum() / n)
      adv_BT = (adv_BT - mean) / (std + 1e-8) * mask
    rows = max(float((mask.sum(axis=1) > 0).sum()), 1.0)
    self._critic_metrics = {'kl/sequence': float(kl_BT.sum() / rows), 'values/mean': float((values_BT * mask).sum() / n),
                            'returns/mean': float((returns_BT * mask).sum() / n)}
    return {'advantages': adv_BT.astype(np.float32), 'returns': returns_BT.astype(np.float32),
            'old_values': (values_BT * mask).astype(np.float32)}

  def _rollout(self, policy) -> dict[str, np.ndarray]:
    batch = super()._rollout(policy)
    self.metrics.update(self._critic_metrics)
    return batch
