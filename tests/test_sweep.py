"""The sweep runner (experiments/sweep.py) and run plots (experiments/plot.py)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import plot, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png_ok(path):
  """A readable PNG: matplotlib decodes it to an RGB(A) image."""
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  img = matplotlib.image.imread(path)
  return img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50


def _metric_columns(table: str) -> list[list[str]]:
  """Each row of a results table without its wall-time and tokens/s columns."""
  return [line.split('|')[1:-3] for line in table.splitlines() if line.startswith('|')]


@pytest.fixture(scope='module')
def tokenizer_file(tok, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tok') / 'tok.model')
  tok.save(path)
  return path


def _sweep_cmd(out, data_dir, tokenizer_file, ranks='4,8'):
  return [sys.executable, '-m', 'experiments.sweep', '--config=configs/sft.py:size=tiny',
          '--grid', f'lora.rank={ranks}', '--grid', 'optimizer.lr=3e-3', f'--out={out}',
          '--set', 'steps=4', '--set', 'eval_every=4', '--set', 'checkpoint_every=2', '--set', 'log_every=1',
          '--set', 'eval_batches=1', '--set', 'batch_size=8', '--set', 'seq_len=64',
          '--set', 'task_eval.exact_match=False', '--set', 'sample.prompts=()', '--set', 'data.name=sft_tasks',
          '--set', 'data.mix_weights=()',
          '--set', f'data.data_dir={data_dir}',
          '--set', f'data.tokenizer={tokenizer_file}', '--set', 'model.vocab_size=512']


def test_killed_sweep_finishes_without_redoing_points_and_matches_an_uninterrupted_one(
    tmp_path, data_dir, tokenizer_file):
  names = ['lora.rank=4,optimizer.lr=3e-3', 'lora.rank=8,optimizer.lr=3e-3']
  # Killed while the second point trains (after its first checkpoint), then re-run.
  cut = str(tmp_path / 'cut')
  proc = subprocess.Popen(_sweep_cmd(cut, data_dir, tokenizer_file), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  second = os.path.join(cut, names[1], 'checkpoints', '2')
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(second, 'commit_success.txt')) and time.time() < deadline:
    time.sleep(0.2)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  assert os.path.exists(os.path.join(cut, names[0], sweep.MARKER))
  assert not os.path.exists(os.path.join(cut, names[1], sweep.MARKER))
  first_mark = os.path.getmtime(os.path.join(cut, names[0], sweep.MARKER))

  listed = subprocess.run(_sweep_cmd(cut, data_dir, tokenizer_file) + ['--list'], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.splitlines()
  assert len(listed) == 1 and 'research.main' in listed[0]  # the finished point is not listed

  r = subprocess.run(_sweep_cmd(cut, data_dir, tokenizer_file), cwd=ROOT, capture_output=True, text=True,
                     timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  assert os.path.getmtime(os.path.join(cut, names[0], sweep.MARKER)) == first_mark  # not redone
  assert 'resumed from' in r.stdout  # the interrupted point continued from its checkpoint
  assert sorted(d for d in os.listdir(cut) if os.path.isdir(os.path.join(cut, d))) == names
  pngs = sorted(p for p in os.listdir(cut) if p.endswith('.png'))
  assert pngs == ['curves.png', 'eval_loss_vs_lora.rank.png']  # an axis of one value gets no plot
  assert all(_png_ok(os.path.join(cut, p)) for p in pngs)
  with open(os.path.join(cut, 'results.md')) as f:
    got = _metric_columns(f.read())

  # The interrupted point against the same point run uninterrupted (the first point was not interrupted).
  full = str(tmp_path / 'full')
  r = subprocess.run(_sweep_cmd(full, data_dir, tokenizer_file, ranks='8'), cwd=ROOT, capture_output=True,
                     text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  with open(os.path.join(full, 'results.md')) as f:
    want = _metric_columns(f.read())
  assert len(got) == 4 and len(want) == 3  # header, separator, a row per point
  assert [got[0], got[1], got[3]] == want
  assert got[2][0].strip() == '4' and got[3][0].strip() == '8'


def test_seed_axis_gives_mean_and_spread(tmp_path):
  """The report alone, on hand-written run directories: mean and sample std over seeds."""
  grid = {'optimizer.lr': ['0.1'], 'seed': ['0', '1', '2']}
  losses = [1.0, 2.0, 4.0]
  for point, loss in zip(sweep.points(grid), losses):
    d = tmp_path / sweep.point_name(point)
    d.mkdir()
    (d / 'metrics.jsonl').write_text(f'{{"step": 1, "eval/loss": {loss}}}\n')
    (d / sweep.MARKER).write_text('{"wall_s": 1.0}')
  table = sweep.report(str(tmp_path), sweep.points(grid), 'eval/loss')
  mean, std = np.mean(losses), np.std(losses, ddof=1)
  assert f'| 0.1 | {mean:.4f} +- {std:.4f} | 3 |' in table


def test_plot_draws_one_curve_per_run_and_metric(tmp_path):
  runs = {}
  for name, n in (('a', 5), ('b', 3)):
    runs[name] = [{'step': s, 'eval/loss': 1 / s, 'train/loss': 2 / s} for s in range(1, n + 1)]
  out = str(tmp_path / 'p.png')
  assert plot.plot_curves(runs, ['eval/loss', 'train/loss'], out) == 4
  assert _png_ok(out)


def test_pipeline_leaves_a_summary_picture_of_every_stage(tmp_path, monkeypatch, capsys):
  """experiments.pipeline's report on stand-in stage results (the stages themselves
  run in `make run`): summary.png holds one held-out curve per stage."""
  from experiments import pipeline  # pylint: disable=import-outside-toplevel
  keys = ('eval/loss', 'eval/perplexity', 'eval/exact_match', 'eval/exact_match/add', 'eval/rewards/accuracies',
          'eval/rewards/margins', 'eval/accuracy', 'eval/margin', 'eval/pass@4', 'eval/reward_model/score',
          'rollout/kl/sequence')
  rows = [dict({k: 0.5 + 0.1 * step for k in keys}, step=step) for step in (0, 10, 20)]
  monkeypatch.setattr(pipeline, 'run_stage', lambda *a, **kw: rows)
  monkeypatch.setattr(pipeline, 'evaluate_run', lambda *a: {'heldout': {'exact_match': 0.7}})
  monkeypatch.setattr(pipeline.train_step, 'measure_peak_gflops', lambda: pipeline.REF_PEAK_GFLOPS / 2)
  monkeypatch.setattr(sys, 'argv', ['pipeline', f'--runs={tmp_path}'])
  drawn = []
  real = plot.plot_stages
  monkeypatch.setattr(plot, 'plot_stages', lambda panels, out: drawn.append(real(panels, out)) or drawn[-1])
  pipeline.main()
  assert drawn == [6]
  assert _png_ok(str(tmp_path / 'summary.png'))
  printed = capsys.readouterr().out
  assert 'ppo: held-out reward-model score' in printed
  # A machine with half the reference matmul peak: twice the measured stage times.
  assert f'estimated total: {2 * sum(pipeline.STAGE_SECONDS.values()) / 60:.0f} min' in printed
  assert 'research.evaluate on its checkpoint: 70.0% (DIFFERS' in printed  # the stand-in stage logged 2.5
