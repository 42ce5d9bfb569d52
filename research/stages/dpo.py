"""Preference optimization: DPO and relatives on {"prompt", "chosen", "rejected"} pairs.

`prompt`, `chosen` and `rejected` are strings or message lists (rendered with
the chat template; the loss reads log-probabilities of the final assistant
reply only). The reference model is frozen: the `init_from` parameters (one
extra copy, no optimizer state), or, with LoRA, the same base with the adapters
switched off, so only one copy of the base exists.

config.dpo.loss_type: sigmoid (DPO), ipo, robust (use beta, label_smoothing),
or the reference-free simpo (beta, simpo_gamma) and orpo (orpo_lambda).
config.dpo.rpo_alpha > 0 adds alpha x the per-token NLL of the chosen reply (RPO),
which stops DPO from lowering the likelihood of both replies.
Evaluation logs the held-out loss, eval/rewards/accuracies and the other
reward metrics, and exact match on the held-out generated tasks.
"""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np

from research import losses
from research.data import chat, pipeline
from research.data.tokenizer import Tokenizer
from research.stages import sft

needs_reference = True
REFERENCE_FREE = ('simpo', 'orpo')
SIDES = ('chosen', 'rejected')
BATCH_KEYS = tuple(f'{side}_{k}' for side in SIDES for k in sft.BATCH_KEYS)


def pair_messages(example, text_key: str = ''):
  """(chosen messages, rejected messages) of a stored row, or None if malformed."""
  try:
    raw = example.get('json', example.get(text_key or 'text'))
    row = json.loads(raw) if raw is not None else {
        k: v.decode() if isinstance(v, bytes) else v for k, v in example.items()}
    prompt = row['prompt']
    prompt = json.loads(prompt) if isinstance(prompt, str) and prompt.startswith('[{') else prompt
    history = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else list(prompt)
    out = []
    for side in SIDES:
      reply = row[side]
      msgs = history + ([{'role': 'assistant', 'content': reply}] if isinstance(reply, str) else list(reply))
      msgs = chat.to_messages({'messages': msgs})
      if msgs is None:
        return None
      out.append(msgs)
  except (ValueError, KeyError, TypeError, AttributeError):
    return None
  return tuple(out)


def render_side(messages: list[dict], tokenizer: Tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """One side of a pair for DPO: the SFT arrays, padded, with the loss on the last reply."""
  return sft.pad_example(sft.render_example(messages, tokenizer, seq_len, mask='completion'), seq_len)


class RenderPair(grain.transforms.Map):
  """Row -> chosen_* and rejected_* arrays, each side from render_side(messages,
  tokenizer, seq_len); None if the row is malformed, a side renders to None, or
  both sides are the same within seq_len (nothing to prefer)."""

  def __init__(self, tokenizer: Tokenizer, seq_len: int, text_key: str, render_side=render_side):
    self.tokenizer, self.seq_len, self.text_key = tokenizer, seq_len, text_key
    self.render_side = render_side

  def map(self, example):
    pair = pair_messages(example, self.text_key)
    if pair is None:
      return None
    chosen, rejected = (self.render_side(m, self.tokenizer, self.seq_len) for m in pair)
    if chosen is None or rejected is None or all(np.array_equal(chosen[k], rejected[k]) for k in chosen):
      return None
    return {f'{side}_{k}': v for side, arrays in zip(SIDES, (chosen, rejected)) for k, v in arrays.items()}


def pair_dataset(sources_list, weights, tokenizer, *, seq_len, batch_size, seed, text_key='',
                 shuffle=True, num_epochs=None, render=None):
  """Batches of preference pairs, one pair per row on each side. `render` maps a
  row to the arrays of both sides (default: RenderPair with the DPO arrays)."""
  render = render or RenderPair(tokenizer, seq_len, text_key)
  ds = pipeline.mixed_source(sources_list, weights, seed=seed, shuffle=shuffle, num_epochs=num_epochs)
  ds = ds.map(render).filter(lambda x: x is not None)
  return ds.to_iter_dataset().batch(batch_size, drop_remainder=True)


def train_dataset(config, tokenizer, render=None):
  """The shuffled, mixed, repeating stream of pair batches (`render`: see pair_dataset)."""
  names, srcs, weights = pipeline.open_mixture(config.data, config.data.train_split)
  for name, src in zip(names, srcs):
    sft.check_rows(src, name, config.data.text_key, parse=pair_messages,
                   expected='"prompt", "chosen" and "rejected"')
  return pair_dataset(srcs, weights, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size,
                      seed=config.seed, text_key=config.data.text_key, render=render)


def eval_batches(config, tokenizer, render=None):
  """Held-out pair batches, in storage order."""
  _, srcs, weights = pipeline.open_mixture(config.data, config.data.eval_split)
  ds = pair_dataset(srcs, weights, tokenizer, seq_len=config.seq_len, batch_size=config.batch_size,
                    seed=0, text_key=config.data.text_key, shuffle=False, num_epochs=1, render=render)
  return pipeline.take_batches(ds, config.eval_batches)


def pair_logps(model, params, batch, rng=None):
  """Summed log-probs and token counts of the chosen and rejected replies (one forward)."""
  cat = lambda k: jnp.concatenate([batch[f'chosen_{k}'], batch[f'rejected_{k}']], axis=0)
  logits, _ = model.apply({'params': params}, cat('inputs'), cat('positions'), cat('segment_ids'),
                          rngs={} if rng is None else {'dropout': rng})
  mask = (cat('loss_mask') > 0) & (cat('segment_ids') > 0)
  logps, n = losses.sequence_logprobs(logits, cat('targets'), mask)
  B = batch['chosen_inputs'].shape[0]
  return logps[:B], logps[B:], n[:B], n[B:]


def make_loss(config):
  """loss(model, params, batch, rng, reference) for config.dpo."""
  c = config.dpo

  def loss(model, params, batch, rng, reference=None):
    pc, pr, nc, nr = pair_logps(model, params, batch, rng)
    if c.loss_type == 'simpo':
      value, metrics = losses.simpo_loss(pc, pr, nc, nr, beta=c.beta, gamma=c.simpo_gamma)
    elif c.loss_type == 'orpo':
      value, metrics = losses.orpo_loss(pc, pr, nc, nr, lam=c.orpo_lambda)
    else:
      rc, rr, _, _ = pair_logps(model, jax.lax.stop_gradient(reference), batch)
      value, metrics = losses.dpo_loss(pc, pr, rc, rr, beta=c.beta, label_smoothing=c.label_smoothing,
                                       loss_type=c.loss_type)
    if c.rpo_alpha > 0:  # RPO: keep the chosen reply likely (Pang et al., 2024)
      nll = jnp.mean(-pc / jnp.maximum(nc, 1.0))
      value = value + c.rpo_alpha * nll
      metrics['nll/chosen'] = nll
    metrics['logps/chosen'] = jnp.mean(pc)
    metrics['logps/rejected'] = jnp.mean(pr)
    return value, jnp.float32(pc.shape[0]), metrics
  return loss


def loss(model, params, batch, rng, reference=None):
  """DPO (sigmoid, beta 0.1) with the default config; see make_loss."""
  from configs import dpo as dpo_config  # pylint: disable=import-outside-toplevel
  return make_loss(dpo_config.get_config())(model, params, batch, rng, reference)


prompt_ids = sft.prompt_ids
stop_tokens = sft.stop_tokens
evaluate = sft.evaluate

__all__ = ['SIDES', 'pair_messages', 'render_side', 'RenderPair', 'make_loss', 'loss', 'pair_logps', 'pair_dataset', 'train_dataset', 'eval_batches',
           'evaluate']
