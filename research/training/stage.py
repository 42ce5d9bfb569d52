"""What a training stage is, as a value the loop consumes.

Each module under research/stages/ exports `stage(config) -> Stage`;
research/main.py picks it by `config.stage` and hands it to `loop.train`. The
loop, the Trainer and the step never look at a stage's name or module: all
they know of it is below.

    Stage(
      name='dpo',
      loss=loss,                          # (model, params, batch, frozen, rng) -> (loss, weight, metrics)
      batch_axes={'chosen_inputs': ('batch', 'length'), ...},
      train_source=lambda tok: GrainSource(...),   # tokenizer -> BatchSource
      eval_batches=lambda tok: [...],              # tokenizer -> list of global numpy batches
      frozen=('reference',),              # frozen copies of the initial parameters the loss reads
      evaluators=(GreedyTaskEval(...),),      # (policy, tokenizer, metrics) -> {name: value}
      prompt_format=chat.CHAT,            # how sample prompts are encoded; None: no samples
      hooks=(),                           # more Hook(every, fn) for the loop
    )

A batch source is any object with `next(policy) -> dict of global numpy
arrays`, `get_state() -> dict` and `set_state(dict)` (research.data.pipeline.
GrainSource wraps a grain dataset; an online-RL source would sample from the
policy it is given). Its state is checkpointed with the train state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]
Evaluator = Callable[[Any, Any, dict], dict]  # (policy, tokenizer, eval metrics so far) -> metrics


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(run, step)` after every `every`-th train step and after the last one
  (`run` is the loop's research.training.loop.Run)."""

  every: int
  fn: Callable[[Any, int], None]

  def due(self, step: int, last_step: int) -> bool:
    return step % self.every == 0 or step == last_step


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage: its loss, its data, and what the loop does for it.

  Attributes:
    name: the stage's name (config.stage).
    loss: (model, params, batch, frozen, rng) -> (loss, weight, metrics), with
      params the full tree, frozen a dict of the trees named in `frozen`, loss a
      mean over `weight` items, rng None in evaluation (research.training.step).
    batch_axes: logical axes of every batch field, e.g. {'inputs': ('batch',
      'length'), 'advantages': ('batch',)}; the config's rules shard each.
    train_source: tokenizer -> the training BatchSource.
    eval_batches: tokenizer -> the fixed held-out batches (global numpy dicts).
    frozen: names of frozen copies of the initial parameters the loss reads
      ('reference' for DPO). A LoRA run holds none: the base with adapters off is one.
    evaluators: run after the eval loss; each returns metrics logged as eval/<name>.
    prompt_format: research.data.chat.PromptFormat for config.sample.prompts,
      or None for a stage whose model does not generate.
    hooks: more loop hooks (logging, checkpoints, evaluation and samples are built in).
    batch_dtypes: dtype per batch field where not int32 (for dry runs).
    plan: trainer -> {name: bytes per device} of what the stage holds besides the
      train step (an RL stage's rollout: KV cache, logits), for the dry run.
  """

  name: str
  loss: LossFn
  batch_axes: Mapping[str, tuple[str | None, ...]]
  train_source: Callable[[Any], Any]
  eval_batches: Callable[[Any], list[dict[str, np.ndarray]]]
  frozen: tuple[str, ...] = ()
  evaluators: Sequence[Evaluator] = ()
  prompt_format: Any = None
  hooks: Sequence[Hook] = ()
  batch_dtypes: Mapping[str, str] = dataclasses.field(default_factory=dict)
  plan: Callable[[Any], dict[str, int]] | None = None
