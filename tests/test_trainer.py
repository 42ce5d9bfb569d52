"""The shared trainer: mesh equivalence, FSDP shards, accumulation, warm start, restore."""

import os

import jax
import pytest

from conftest import make_trainer, train
from research.errors import UserError
from research.training import init
from research.training.metrics import read_metrics


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


def _run(config, workdir, devices=None):
  train(config, workdir, devices=devices)
  return _losses(str(workdir))


# One worker runs the module (make test's --dist loadgroup): its training fixture is built once.
pytestmark = pytest.mark.xdist_group('test_trainer')


# One baseline per model shape; tensor meshes need kv_heads divisible by 4.
@pytest.fixture(scope='module')
def baselines(tmp_path_factory, corpus_dir, data_dir):
  from conftest import make_test_config
  out = {}
  for kv in (2, 4):
    c = make_test_config(corpus_dir, data_dir, steps=5, log_every=1, model__n_kv_heads=kv)
    out[kv] = _run(c, tmp_path_factory.mktemp(f'base{kv}'), devices=jax.devices()[:1])
  return out


@pytest.mark.parametrize('mesh,kv', [
    (dict(data=8), 2),
    (dict(data=1, fsdp=8), 2),
    (dict(data=2, tensor=4), 4),
    (dict(data=2, fsdp=2, tensor=2), 4),
])
def test_mesh_gives_same_losses_as_one_device(mesh, kv, baselines, test_config, tmp_path):
  overrides = {f'mesh__{k}': v for k, v in dict(dict(data=1, fsdp=1, tensor=1), **mesh).items()}
  got = _run(test_config(steps=5, log_every=1, model__n_kv_heads=kv, **overrides), tmp_path)
  want = baselines[kv]
  assert sorted(got) == [1, 2, 3, 4, 5]
  for step in got:
    assert abs(got[step] - want[step]) / abs(want[step]) < 1e-5, (step, got[step], want[step])


def test_fsdp_shards_parameters_and_moments(test_config):
  t = make_trainer(test_config(mesh__data=1, mesh__fsdp=8))
  state, _ = init.init_state(t)
  mu = state.opt_state[1][0].mu  # chain(clip, adamw) -> adamw's ScaleByAdamState
  for tree in (state.params, mu):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if x.size < 32 * 32:  # norms stay replicated
        continue
      shard = x.addressable_shards[0].data
      assert shard.size * 8 == x.size, (jax.tree_util.keystr(path), x.shape, shard.shape)


def test_grad_accumulation_matches_one_big_batch(test_config, tmp_path):
  a = _run(test_config(steps=3, log_every=1), tmp_path / 'a', devices=jax.devices()[:1])
  b = _run(test_config(steps=3, log_every=1, optimizer__grad_accum_steps=4), tmp_path / 'b',
           devices=jax.devices()[:1])
  for step in a:
    assert abs(a[step] - b[step]) / a[step] < 1e-5


def test_init_from_and_restore_on_another_mesh(test_config, tmp_path):
  src = tmp_path / 'src'
  _run(test_config(steps=4, log_every=1, checkpoint_every=2, mesh__data=8), src)
  # The same checkpoint restores onto an fsdp x tensor mesh and training continues.
  resumed = _run(test_config(steps=6, log_every=1, checkpoint_every=2, mesh__data=2, mesh__fsdp=2,
                             mesh__tensor=2, model__n_kv_heads=2), src)
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  # Warm start: a new run's step-0 eval loss equals the source's final eval loss.
  src_eval = [r['eval/loss'] for r in read_metrics(str(src)) if 'eval/loss' in r][-1]
  warm = tmp_path / 'warm'
  train(test_config(steps=1, init_from=str(src)), warm)
  warm_eval0 = next(r['eval/loss'] for r in read_metrics(str(warm)) if r['step'] == 0)
  assert abs(warm_eval0 - src_eval) < 1e-5
  # init_step picks an earlier checkpoint the source still keeps (4 of 4 and 6), and names those it has.
  src_eval4 = [r['eval/loss'] for r in read_metrics(str(src)) if 'eval/loss' in r and r['step'] == 4][-1]
  train(test_config(steps=1, init_from=str(src), init_step=4), tmp_path / 'warm4')
  warm4_eval0 = next(r['eval/loss'] for r in read_metrics(str(tmp_path / 'warm4')) if r['step'] == 0)
  assert abs(warm4_eval0 - src_eval4) < 1e-5 and abs(src_eval4 - src_eval) > 1e-6
  with pytest.raises(UserError, match=r'no checkpoint of step 2; it has \[4, 6\]'):
    train(test_config(steps=1, init_from=str(src), init_step=2), tmp_path / 'warm2')


def test_keep_checkpoints_zero_keeps_every_checkpoint(test_config, tmp_path):
  train(test_config(steps=3, checkpoint_every=1, keep_checkpoints=0), tmp_path / 'run', devices=jax.devices()[:1])
  assert sorted(os.listdir(tmp_path / 'run' / 'checkpoints')) == ['1', '2', '3']
  with pytest.raises(UserError, match='keep_checkpoints=-1'):
    make_trainer(test_config(keep_checkpoints=-1))


def test_config_errors_are_user_errors(test_config):
  with pytest.raises(UserError, match='config.mesh.data'):
    make_trainer(test_config(mesh__data=3))
  with pytest.raises(UserError, match='config.batch_size=12'):
    make_trainer(test_config(batch_size=12))
  with pytest.raises(UserError, match='n_kv_heads'):
    make_trainer(test_config(model__n_kv_heads=3))
  with pytest.raises(UserError, match='cannot be split'):
    make_trainer(test_config(mesh__data=1, mesh__tensor=8))
  with pytest.raises(UserError, match='config.model.family'):
    make_trainer(test_config(model__family='gpt2'))


def test_stage_hooks_run_after_their_steps_and_see_the_state(test_config, tmp_path):
  import dataclasses
  from research.stages import pretrain
  from research.training import loop
  from research.training.stage import Hook
  config = test_config(steps=5, eval_every=100, checkpoint_every=100)
  seen = []
  hook = Hook(2, lambda run, step: seen.append((step, int(run.state.step), sorted(run.last))))
  stage = dataclasses.replace(pretrain.stage(config), hooks=(hook,))
  loop.train(config, str(tmp_path), stage, devices=jax.devices()[:1])
  assert [s for s, _, _ in seen] == [2, 4, 5]  # every 2nd step and the last
  assert all(step == state_step for step, state_step, _ in seen)
  # Built-in hooks ran first at the last step: its eval metrics are already logged.
  assert 'eval/loss' in seen[-1][2] and 'train/loss' in seen[-1][2]


class _RecordingWandb:
  """A stand-in for the wandb module: records init's arguments and logged rows."""

  def __init__(self):
    self.inits, self.rows, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, row, step):
    self.rows.append({'step': step, **row})

  def finish(self):
    self.finished += 1


def test_wandb_logs_every_metrics_row_and_resumes_the_same_run(test_config, tmp_path, monkeypatch):
  import sys
  fake = _RecordingWandb()
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  kw = dict(eval_every=2, checkpoint_every=2, log_every=1, logging__wandb_project='proj',
            logging__wandb_mode='offline')
  train(test_config(steps=2, **kw), tmp_path)
  assert fake.rows == read_metrics(tmp_path) and fake.finished == 1
  (first,) = fake.inits
  run_id = (tmp_path / 'wandb_id.txt').read_text()
  assert (first['project'], first['mode'], first['id'], first['resume'], first['dir']) == (
      'proj', 'offline', run_id, 'allow', str(tmp_path))
  assert first['config']['steps'] == 2
  # The real wandb, offline (no network), resuming: the same wandb run, new rows.
  monkeypatch.delitem(sys.modules, 'wandb')
  pytest.importorskip('wandb')  # the 'test' extra installs it
  monkeypatch.setenv('WANDB_SILENT', 'true')
  train(test_config(steps=4, **kw), tmp_path)
  assert (tmp_path / 'wandb_id.txt').read_text() == run_id
  (record,) = (tmp_path / 'wandb').glob(f'offline-run-*-{run_id}/run-{run_id}.wandb')
  assert b'train/loss' in record.read_bytes() and b'eval/loss' in record.read_bytes()
