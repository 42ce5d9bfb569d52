"""Preference optimization: DPO and relatives on {"prompt", "chosen", "rejected"} pairs.

Pairs are rendered by research/data/pairs.py (the loss reads log-probabilities
of the final assistant reply only). The reference model is frozen: a copy of
the initial parameters, or, with LoRA, the same base with the adapters
switched off, so only one copy of the base exists. The reference-free losses
(SimPO, ORPO) hold no reference at all.

config.dpo.loss_type: sigmoid (DPO), ipo, robust (use beta, label_smoothing),
or the reference-free simpo (beta, simpo_gamma) and orpo (orpo_lambda).
config.dpo.rpo_alpha > 0 adds alpha x the per-token NLL of the chosen reply (RPO),
which stops DPO from lowering the likelihood of both replies.
Evaluation logs the held-out loss, eval/rewards/accuracies and the other
reward metrics, and exact match on the held-out generated tasks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from research import evaluation, losses, models
from research.data import chat, pairs, pipeline
from research.data import sft as sft_data
from research.errors import UserError
from research.training.stage import Stage

LOSS_TYPES = ('sigmoid', 'ipo', 'robust', 'simpo', 'orpo')
REFERENCE_FREE = ('simpo', 'orpo')
BATCH_AXES = {k: ('batch', 'length') for k in pairs.side_keys(sft_data.BATCH_KEYS)}


def pair_logps(model, params, batch, rng=None):
  """Summed log-probs [B] and token counts [B] of the chosen and rejected
  replies: (chosen, rejected, chosen count, rejected count), in one forward pass."""
  side = lambda k: pairs.stack_sides(batch, k)
  logits_2BTV = models.forward(model, params, side('inputs'), side('positions'), side('segment_ids'), rng)
  mask_2BT = (side('loss_mask') > 0) & (side('segment_ids') > 0)
  logps_2B, n_2B = losses.sequence_logprobs(logits_2BTV, side('targets'), mask_2BT)
  B = batch['chosen_inputs'].shape[0]
  return logps_2B[:B], logps_2B[B:], n_2B[:B], n_2B[B:]


def make_loss(dpo_cfg):
  """loss(model, params, batch, frozen, rng) for a config.dpo section; reads
  frozen['reference'] unless the loss is reference-free."""
  c = dpo_cfg

  def loss(model, params, batch, frozen, rng):
    pc, pr, nc, nr = pair_logps(model, params, batch, rng)
    if c.loss_type == 'simpo':
      value, metrics = losses.simpo_loss(pc, pr, nc, nr, beta=c.beta, gamma=c.simpo_gamma)
    elif c.loss_type == 'orpo':
      value, metrics = losses.orpo_loss(pc, pr, nc, nr, lam=c.orpo_lambda)
    else:
      rc, rr, _, _ = pair_logps(model, jax.lax.stop_gradient(frozen['reference']), batch)
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


def stage(config) -> Stage:
  """DPO (or a relative, config.dpo.loss_type) on config.data's pairs."""
  if config.dpo.loss_type not in LOSS_TYPES:
    raise UserError(f'config.dpo.loss_type={config.dpo.loss_type!r}; choose one of {LOSS_TYPES}.')
  d = config.data
  render = lambda tok: pairs.RenderPair(tok, config.seq_len, d.text_key)
  return Stage(
      name='dpo', loss=make_loss(config.dpo), batch_axes=BATCH_AXES,
      train_source=lambda tok: pipeline.GrainSource(pairs.train_dataset(
          d, render(tok), batch_size=config.batch_size, seed=config.seed)),
      eval_batches=lambda tok: pairs.eval_batches(d, render(tok), batch_size=config.batch_size,
                                                  max_batches=config.eval_batches),
      frozen=() if config.dpo.loss_type in REFERENCE_FREE else ('reference',),
      evaluators=evaluation.task_evaluators(d, config.task_eval), prompt_format=chat.CHAT)
