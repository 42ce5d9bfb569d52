"""What may change when a run resumes: the new config against the saved one.

A resumed run must continue the trajectory it started, so a change to anything
that shapes it (model, data, tokenizer, batch, sequence length, seed, optimizer,
the stage's own settings, init_from) is refused with one line naming each field
and both values. Fields that only say how long to run and what to report are
free (`HARMLESS`). `config.allow_changes` lets named fields change anyway:

    --config.allow_changes=optimizer.lr       # that field
    --config.allow_changes=optimizer,seed     # every optimizer.* field, and seed
    --config.allow_changes=all                # anything (the model must still fit)

Every resume with changes appends one JSON line to workdir/config_changes.jsonl
(step, time, {field: [old, new]}); config.json holds the config in use, and
undoing the recorded changes, newest first, gives each earlier one.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import jax

from research.errors import UserError
from research.training.metrics import log

CHANGES_FILE = 'config_changes.jsonl'
_ABSENT = object()  # a field one config has and the other lacks

# Dotted fields (or prefixes of them) a resumed run may change freely: the run
# length, intervals, reporting and evaluation, the mesh (a checkpoint restores
# onto any mesh), the knobs that change memory or speed but not the function
# (attention_impl, logits_chunk, remat, and grad_accum_steps: the global batch
# and the accumulated (loss, weight) sums are the same, up to float rounding as
# for a new mesh), and the recovery knobs themselves.
HARMLESS = ('steps', 'log_every', 'eval_every', 'eval_batches', 'checkpoint_every', 'keep_checkpoints',
            'checkpoint_fallback', 'allow_changes', 'dry_run', 'sample', 'task_eval', 'logging', 'mesh',
            'sharding_rules', 'optimizer.max_skipped_steps', 'model.attention_impl', 'model.logits_chunk',
            'model.remat', 'optimizer.grad_accum_steps', 'grpo.eval_samples', 'grpo.eval_k', 'ppo.eval_samples',
            'ppo.eval_k')


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for every leaf of nested dicts (JSON-shaped: tuples as lists)."""
  if not isinstance(tree, dict):
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f'{prefix}.{k}' if prefix else k))
  return out


def _covered(key: str, prefixes) -> bool:
  return any(key == p or key.startswith(p + '.') for p in prefixes)


_PATH_FIELDS = ('init_from', 'data.tokenizer', 'data.data_dir')


def _same_path(value: Any) -> Any:
  """A path-valued config string spelled one way (absolute, normalised): './runs/x'
  and 'runs/x' name one directory. Keeps an 'hf:' prefix; '' stays ''."""
  if not isinstance(value, str) or not value:
    return value
  prefix = 'hf:' if value.startswith('hf:') else ''
  return prefix + os.path.abspath(value[len(prefix):])


def _normalised(key: str, value: Any) -> Any:
  """`value` of field `key` as compared on resume: paths (see _same_path) and the
  'reward_model:<workdir>' entries of a reward list spelled one way."""
  if key in _PATH_FIELDS:
    return _same_path(value)
  if key.endswith('.rewards') and isinstance(value, list):
    return [f'reward_model:{_same_path(v.partition(":")[2])}' if isinstance(v, str) and
            v.startswith('reward_model:') else v for v in value]
  return value


def config_changes(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} for every leaf that differs (paths compared
  as the directories they name); a field only one side has (a newer code
  version's new option) counts as changed too."""
  a, b = flatten(saved), flatten(new)
  return {k: (a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if k not in a or k not in b or _normalised(k, a[k]) != _normalised(k, b[k])}


def refused(changes: dict[str, tuple[Any, Any]], allow: str) -> dict[str, tuple[Any, Any]]:
  """The changes neither harmless nor allowed by `allow` (config.allow_changes).
  A field new to one side only is a code-version difference, not a user change:
  it is recorded, never refused."""
  allowed = tuple(p.strip() for p in allow.split(',') if p.strip())
  if 'all' in allowed:
    return {}
  return {k: (a, b) for k, (a, b) in changes.items()
          if not _covered(k, HARMLESS + allowed) and a is not _ABSENT and b is not _ABSENT}


def _show(value: Any) -> str:
  return '(absent)' if value is _ABSENT else json.dumps(value)


def config_json(config) -> dict:
  """The config as config.json holds it."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_resume(config, workdir: str, step: int) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with workdir/config.json before resuming at `step`.
  Raises UserError naming every refused change (field, saved and new value);
  returns all changes (for record_changes)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return {}  # a run from before config.json existed: nothing to compare
  with open(path) as f:
    saved = json.load(f)
  changes = config_changes(saved, config_json(config))
  bad = refused(changes, config.get('allow_changes', ''))
  if bad:
    listed = '; '.join(f'{k}: {_show(a)} -> {_show(b)}' for k, (a, b) in bad.items())
    raise UserError(f'{workdir} resumes at step {step} with a changed config ({listed}), which changes '
                    'the trajectory; use a new workdir (with init_from to start from this run), or allow '
                    f'it with --config.allow_changes={",".join(bad)}')
  return changes


def record_changes(workdir: str, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
  """Appends the changes a resume made to workdir/config_changes.jsonl (process 0)."""
  if not changes or jax.process_index() != 0:
    return
  line = {'step': step, 'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'changes': {k: [None if a is _ABSENT else a, None if b is _ABSENT else b]
                      for k, (a, b) in changes.items()}}
  with open(os.path.join(workdir, CHANGES_FILE), 'a') as f:
    f.write(json.dumps(line) + '\n')


def describe_changes(changes: dict[str, tuple[Any, Any]]) -> str:
  """'steps 100 -> 200, eval_every 50 -> 20' for the log line."""
  return ', '.join(f'{k} {_show(a)} -> {_show(b)}' for k, (a, b) in changes.items())


def write_config(config, workdir: str) -> None:
  """Writes the resolved config atomically as workdir/config.json."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(path + '.tmp', path)
  except OSError as e:  # a full disk: leave no half-written config.json.tmp behind
    if os.path.exists(path + '.tmp'):
      os.remove(path + '.tmp')
    raise OSError(e.errno, e.strerror, path) from None


def warn_if_schedule_moves(config, changes: dict[str, tuple[Any, Any]], step: int) -> None:
  """Logs a warning when a changed `steps` moves the learning rate at `step`
  (the decay is stretched, or squeezed, over the new length)."""
  from research.training.optimizer import lr_schedule  # pylint: disable=import-outside-toplevel
  if 'steps' not in changes or _ABSENT in changes['steps']:
    return
  old, new = (float(lr_schedule(config.optimizer, int(n))(step)) for n in changes['steps'])
  if abs(new - old) > 1e-12 + 1e-6 * abs(old):
    log(f'warning: steps {changes["steps"][0]} -> {changes["steps"][1]} stretches the '
        f'{config.optimizer.decay} schedule: the learning rate at step {step} goes from {old:.3g} to {new:.3g}')
