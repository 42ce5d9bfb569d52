"""Recovery from what goes wrong in a run: divergence, a damaged newest
checkpoint, a changed config on resume, a start that failed half-way."""

import glob
import json
import os

import jax
import numpy as np
import pytest

from conftest import make_trainer, train
from research.errors import UserError
from research.training import checkpoint as ckpt_lib
from research.training.metrics import read_metrics
from research.training.stage import Hook


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(str(workdir)) if 'train/loss' in r}


def _saved_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def test_divergence_stops_the_run_and_every_checkpoint_is_finite(test_config, tmp_path):
  """optimizer.lr=1e6: the run stops with one line naming the step, and no
  checkpoint on disk holds a non-finite parameter."""
  c = test_config(steps=40, log_every=1, checkpoint_every=3, keep_checkpoints=0)
  c.optimizer.lr, c.optimizer.max_skipped_steps = 1e6, 4
  with pytest.raises(UserError, match=r'training diverged at step \d+: .* 4 steps in a row') as e:
    train(c, tmp_path)
  assert '\n' not in str(e.value)
  rows = [r for r in read_metrics(str(tmp_path)) if 'train/loss' in r]
  skipped = [r['step'] for r in rows if not (np.isfinite(r['train/loss']) and np.isfinite(r['train/grad_norm']))]
  assert skipped and rows[-1]['train/skipped_steps'] == len(skipped)  # every non-finite step counted
  first = int(str(e.value).split('at step ')[1].split(':')[0])
  assert first == skipped[0] and rows[-1]['step'] < c.steps
  abstract = make_trainer(c, jax.devices()[:1]).layout.trainable
  steps = _saved_steps(str(tmp_path))
  assert steps and max(steps) >= first  # checkpoints were written after the divergence began ...
  for s in steps:  # ... and none holds a non-finite value
    params, _ = ckpt_lib.restore_params(str(tmp_path), abstract, step=s)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params)), s


def _crash_at(step):
  """A stage hook that raises after `step`'s checkpoint was issued (a crash)."""
  def fn(run, s):
    del run
    if s == step:
      raise RuntimeError('simulated crash')
  return Hook(1, fn)


def _train_with_hooks(config, workdir, hooks):
  import dataclasses
  from research import stages
  from research.training import init, loop
  config = init.resolve_config(config)
  stage = stages.get(config.stage)(config)
  return loop.train(config, str(workdir), dataclasses.replace(stage, hooks=tuple(stage.hooks) + tuple(hooks)))


def _truncate_parameter_data(step_dir):
  """Cuts every data file of the checkpoint's parameters in half (the arrays'
  bytes; metadata files such as _sharding may not be read by a restore)."""
  files = glob.glob(os.path.join(step_dir, 'params', 'ocdbt.process_*', 'd', '*'))
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(test_config, tmp_path, capsys):
  kw = dict(steps=6, log_every=1, checkpoint_every=2, keep_checkpoints=0)
  train(test_config(**kw), tmp_path / 'whole')
  want = _losses(tmp_path / 'whole')

  run = tmp_path / 'run'
  with pytest.raises(RuntimeError, match='simulated crash'):
    _train_with_hooks(test_config(**kw), run, [_crash_at(4)])
  assert _saved_steps(str(run)) == [2, 4]
  _truncate_parameter_data(str(run / 'checkpoints' / '4'))

  # Without the fallback: the error names the checkpoint, and nothing moves.
  with pytest.raises(UserError, match='checkpoints/4 cannot be restored'):
    train(test_config(checkpoint_fallback=False, **kw), run)
  assert _saved_steps(str(run)) == [2, 4]
  capsys.readouterr()
  train(test_config(**kw), run)
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines() if line.startswith('warning: checkpoint 4')]
  assert len(warnings) == 1 and 'resumed from checkpoint 2' in warnings[0], out
  assert _losses(run) == want  # bitwise: every step, 3 and 4 trained again
  assert len(os.listdir(run / 'damaged_checkpoints')) == 1


def test_resume_refuses_trajectory_changes_and_allows_harmless_ones(test_config, tmp_path, capsys):
  kw = dict(steps=4, log_every=1, checkpoint_every=2)
  train(test_config(**kw), tmp_path)
  with pytest.raises(UserError, match=r'batch_size: 8 -> 16') as e:
    train(test_config(**{**kw, 'batch_size': 16}), tmp_path)
  assert 'allow_changes=batch_size' in str(e.value)
  with pytest.raises(UserError, match=r'data.name: "files" -> "stdlib"'):
    train(test_config(**{**kw, 'data__name': 'stdlib'}), tmp_path)
  with pytest.raises(UserError, match=r'optimizer.lr: 0.003 -> 0.001'):
    train(test_config(**{**kw, 'optimizer__lr': 1e-3}), tmp_path)
  assert _saved_steps(str(tmp_path)) == [2, 4]  # the refused launches changed nothing
  assert json.load(open(tmp_path / 'config.json'))['batch_size'] == 8

  capsys.readouterr()
  train(test_config(**{**kw, 'steps': 6, 'eval_every': 3}), tmp_path)  # harmless: continues
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]
  from research.training.optimizer import lr_schedule
  c = test_config(**kw)
  old, new = float(lr_schedule(c.optimizer, 4)(4)), float(lr_schedule(c.optimizer, 6)(4))
  assert f'the learning rate at step 4 goes from {old:.3g} to {new:.3g}' in capsys.readouterr().out
  train(test_config(**{**kw, 'steps': 8, 'optimizer__lr': 1e-3, 'allow_changes': 'optimizer.lr'}), tmp_path)
  assert max(_losses(tmp_path)) == 8
  history = [json.loads(line) for line in open(tmp_path / 'config_changes.jsonl')]
  assert [h['step'] for h in history] == [4, 6]
  assert history[0]['changes']['steps'] == [4, 6] and history[0]['changes']['eval_every'] == [200, 3]
  assert history[1]['changes']['optimizer.lr'] == [0.003, 0.001]
  assert json.load(open(tmp_path / 'config.json'))['optimizer']['lr'] == 0.001


def test_resume_may_change_memory_knobs_and_follows_the_same_trajectory(test_config, tmp_path):
  """grad_accum_steps and remat change memory, not the function: a run resumed with
  2 micro-batches and full remat matches the uninterrupted run (float32 rounding of
  the accumulated sums only)."""
  kw = dict(log_every=1, checkpoint_every=2, optimizer__decay='constant', mesh__data=4, mesh__tensor=2)
  want = _losses_after(train, test_config(steps=5, **kw), tmp_path / 'straight')
  run = tmp_path / 'resumed'
  train(test_config(steps=2, **kw), run)
  got = _losses_after(train, test_config(steps=5, optimizer__grad_accum_steps=2, model__remat='full', **kw), run)
  assert sorted(got) == [1, 2, 3, 4, 5]
  assert [got[s] for s in (1, 2)] == [want[s] for s in (1, 2)]
  for s in (3, 4, 5):
    assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got[s], want[s])
  changes = json.loads(open(run / 'config_changes.jsonl').readline())['changes']
  assert changes['optimizer.grad_accum_steps'] == [1, 2] and changes['model.remat'] == ['none', 'full']


def _losses_after(train_fn, config, workdir):
  train_fn(config, workdir)
  return _losses(workdir)


def test_a_failed_start_leaves_no_tokenizer_for_the_next_one(test_config, tmp_path, tok):
  src, run = tmp_path / 'src', tmp_path / 'run'
  train(test_config(steps=2, checkpoint_every=2), src)
  bad = tmp_path / 'empty'
  bad.mkdir()
  with pytest.raises(UserError, match='no checkpoints/ directory'):
    train(test_config(steps=2, init_from=str(bad)), run)
  assert not os.path.exists(run / 'tokenizer.model')
  # A stray copy from an older failed start is not preferred to init_from's either.
  tok.save(str(run / 'tokenizer.model'))
  src_bytes = open(src / 'tokenizer.model', 'rb').read()
  assert open(run / 'tokenizer.model', 'rb').read() != src_bytes
  train(test_config(steps=2, init_from=str(src)), run)
  assert open(run / 'tokenizer.model', 'rb').read() == src_bytes


def test_resume_keeps_the_init_from_checkpoint_it_started_from(test_config, tmp_path):
  """A LoRA run's frozen base is rebuilt from init_from on resume: from the
  checkpoint the run started from, not init_from's newest (it trained on since)."""
  src = tmp_path / 'src'
  train(test_config(steps=2, checkpoint_every=2), src)
  lora_kw = dict(steps=4, log_every=1, checkpoint_every=2, init_from=str(src), lora__rank=2)
  train(test_config(**lora_kw), tmp_path / 'whole')
  run = tmp_path / 'run'
  with pytest.raises(RuntimeError, match='simulated crash'):
    _train_with_hooks(test_config(**lora_kw), run, [_crash_at(2)])
  train(test_config(steps=4, checkpoint_every=2), src)  # init_from trains on: its newest is now 4
  train(test_config(**lora_kw), run)
  assert json.load(open(run / 'init_from.json'))['step'] == 2
  assert _losses(run) == _losses(tmp_path / 'whole')


def test_resume_compares_paths_as_the_directories_they_name():
  from research.training import resume
  saved = {'init_from': 'runs/sft', 'data': {'tokenizer': ''},
           'grpo': {'rewards': ['exact_match', 'reward_model:runs/reward']}}
  same = {'init_from': './runs//sft', 'data': {'tokenizer': ''},
          'grpo': {'rewards': ['exact_match', f'reward_model:{os.path.abspath("runs/reward")}']}}
  assert resume.config_changes(saved, same) == {}
  other = {'init_from': 'runs/sft2', 'data': {'tokenizer': ''},
           'grpo': {'rewards': ['exact_match', 'reward_model:runs/reward2']}}
  assert sorted(resume.config_changes(saved, other)) == ['grpo.rewards', 'init_from']
