"""research.evaluate (perplexity, held-out exact match, generation, multiple choice)
and the lm-evaluation-harness adapter, against the training stages' own metrics
and a plain full-forward computation."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import full_forward, run_env, train
from research import evaluate, losses
from research.data import chat
from research.training.metrics import read_metrics


# One worker runs the module (make test's --dist loadgroup): its training fixture is built once.
pytestmark = pytest.mark.xdist_group('test_evaluate')


@pytest.fixture(scope='module')
def runs(tmp_path_factory, corpus_dir, data_dir):
  """A 4-step pretraining run on the test corpus and a 2-step SFT run from it,
  each evaluated and checkpointed at its last step."""
  from configs import sft as sft_cfg
  from conftest import make_test_config
  root = tmp_path_factory.mktemp('eval_runs')
  pre, sft = str(root / 'pretrain'), str(root / 'sft')
  train(make_test_config(corpus_dir, data_dir, steps=4, eval_every=4, checkpoint_every=4), pre)
  c = make_test_config(corpus_dir, data_dir, steps=2, eval_every=2, checkpoint_every=2, init_from=pre)
  s = sft_cfg.get_config('size=test')
  with c.unlocked():
    c.stage, c.sft, c.task_eval = 'sft', s.sft, s.task_eval
    c.task_eval.examples, c.task_eval.max_new_tokens = 30, 8
    c.data.name, c.data.text_key, c.data.mix_weights = 'sft_tasks', '', ()
  train(c, sft)
  return pre, sft


def _last(workdir, key):
  return [r for r in read_metrics(workdir) if key in r][-1]


def test_perplexity_equals_the_pretraining_eval_loss(runs):
  ev = evaluate.load(runs[0])
  got = evaluate.perplexity(ev)
  want = _last(runs[0], 'eval/loss')
  assert abs(got['loss'] - want['eval/loss']) < 1e-5 * want['eval/loss']
  assert abs(got['perplexity'] - want['eval/perplexity']) < 1e-4 * want['eval/perplexity']


def test_heldout_command_equals_the_sft_stage_exact_match(runs, tmp_path):
  out = tmp_path / 'eval'
  proc = subprocess.run([sys.executable, '-m', 'research.evaluate', f'--workdir={runs[1]}', '--task=heldout',
                         '--examples=30', '--max_new_tokens=8', f'--out={out}'], capture_output=True, text=True,
                        env=run_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads((out / 'results.json').read_text())['results']['heldout']
  want = _last(runs[1], 'eval/exact_match')
  assert set(got) == {k[len('eval/'):] for k in want if k.startswith('eval/exact_match')}
  for k, v in got.items():
    assert v == want[f'eval/{k}'], k
  assert '| heldout | exact_match |' in (out / 'results.md').read_text()


def _full_forward_logps(ev, ctx, cont):
  """log p(cont | ctx) from the whole logits of one unpadded sequence."""
  ids = np.asarray([list(ctx) + list(cont)], np.int32)
  logits = full_forward(ev.model, ev.params, ids[:, :-1])
  mask = np.zeros_like(ids[:, 1:])
  mask[:, len(ctx) - 1:] = 1
  return float(losses.sequence_logprobs(logits, jnp.asarray(ids[:, 1:]), jnp.asarray(mask))[0][0])


def _greedy_without_cache(ev, prompt, max_new, stops):
  """Greedy decoding by a whole forward pass per token (no KV cache)."""
  ids = list(prompt)
  for _ in range(max_new):
    logits = full_forward(ev.model, ev.params, [ids])
    t = int(jnp.argmax(logits[0, -1, :ev.tokenizer.vocab_size]))
    if t in stops:
      break
    ids.append(t)
  return ev.tokenizer.decode(ids[len(prompt):]).strip()


@pytest.mark.parametrize('which', ['plain', 'chat'])
def test_multiple_choice_equals_sequence_logprobs(runs, which):
  ev = evaluate.load(runs[0] if which == 'plain' else runs[1])
  assert ev.chat == (which == 'chat')
  rows = [{'prompt': 'def add(a, b):\n    return', 'choices': [' a + b', ' a', ' None and more'], 'label': 0},
          {'prompt': 'import', 'choices': [' os', ' the string', ' 1'], 'label': 2},
          {'prompt': 'What is 12 + 30?', 'choices': ['42', '43 4', '12'], 'label': 1}]
  pairs = evaluate.choice_pairs(ev, rows)
  if which == 'plain':  # the context is bos + the prompt's own encoding; the choice follows it
    for (ctx, cont), (r, c) in zip(pairs, [(r, c) for r in rows for c in r['choices']]):
      assert ctx == ev.tokenizer.encode(r['prompt'], add_bos=True)
      assert ctx + cont == ev.tokenizer.encode(r['prompt'] + c, add_bos=True)
  else:
    assert pairs[0][0] == chat.prompt_ids([{'role': 'user', 'content': rows[0]['prompt']}], ev.tokenizer)
  got, _ = evaluate.continuation_logprobs(ev, pairs, batch_size=4)  # 9 pairs: 3 batches, one padded
  want = np.asarray([_full_forward_logps(ev, c, x) for c, x in pairs])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  picks = want.reshape(3, 3).argmax(1)
  acc = evaluate.multiple_choice(ev, rows)['acc']
  assert acc == np.mean(picks == [0, 2, 1])


def test_generation_exact_match_and_pass_at_k(runs):
  ev = evaluate.load(runs[1])
  prompts = ['What is 12 + 30?', 'Reverse the letters: c o d e', 'Sort ascending: 9 4 7', 'Hi', 'def f', 'x']
  replies = [_greedy_without_cache(ev, ev.prompt_ids({'prompt': p}), 6, ev.stop_tokens) for p in prompts]
  # Half the answers are the reference's greedy replies, half are not.
  rows = [{'prompt': p, 'answer': r if i % 2 == 0 else r + ' !'} for i, (p, r) in enumerate(zip(prompts, replies))]
  got = evaluate.generation(ev, rows, max_new_tokens=6, batch_size=4)
  assert got == {'exact_match': 0.5}
  # At temperature 0 every sample is the greedy reply: pass@k = mean@n = exact match.
  got = evaluate.generation(ev, rows, samples=2, ks=(1, 2), temperature=0.0, max_new_tokens=6, batch_size=4)
  assert got == {'exact_match': 0.5, 'pass@1': 0.5, 'pass@2': 0.5, 'mean@2': 0.5}


def test_an_exported_checkpoint_scores_as_its_run(runs, tmp_path):
  """--init_from=hf:<dir> of the run's export: the same log-likelihoods; data
  tasks without a --config say what to add."""
  from research.errors import UserError
  from research.export import export
  run_ev = evaluate.load(runs[0])
  hf_ev = evaluate.load(init_from='hf:' + export(runs[0], str(tmp_path / 'hf')))
  assert not hf_ev.chat and hf_ev.config is None
  rows = [{'prompt': 'import', 'choices': [' os', ' sys', ' re'], 'label': 0}]
  pairs = evaluate.choice_pairs(hf_ev, rows)
  assert pairs == evaluate.choice_pairs(run_ev, rows)
  np.testing.assert_allclose(evaluate.continuation_logprobs(hf_ev, pairs)[0],
                             evaluate.continuation_logprobs(run_ev, pairs)[0], rtol=1e-6, atol=1e-6)
  with pytest.raises(UserError, match='add --config=configs/pretrain.py'):
    evaluate.perplexity(hf_ev)


def test_bad_task_files_get_one_line_errors(runs, tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text(json.dumps({'prompt': 'p', 'choices': ['a']}) + '\n')
  proc = subprocess.run([sys.executable, '-m', 'research.evaluate', f'--workdir={runs[0]}', f'--task=choice:{bad}',
                         f'--out={tmp_path}'], capture_output=True, text=True, env=run_env())
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f"error: {bad}:1: the row lacks ['label']; each row needs ['prompt', 'choices', 'label']."]


_TASKS = {
    'research_mc': dict(output_type='multiple_choice', doc_to_text='{{question}}', doc_to_choice='{{choices}}',
                        doc_to_target='label', target_delimiter='', metric_list=[{'metric': 'acc'}]),
    'research_gen': dict(output_type='generate_until', doc_to_text='{{question}}', doc_to_target='answer',
                         generation_kwargs={'until': ['\n\n'], 'max_gen_toks': 10, 'do_sample': False},
                         metric_list=[{'metric': 'exact_match'}]),
    'research_roll': dict(output_type='loglikelihood_rolling', doc_to_text='', doc_to_target='{{text}}',
                          metric_list=[{'metric': 'word_perplexity'}]),
}
_DOCS = {
    'research_mc': [{'question': 'def add(a, b):\n    return', 'choices': [' a + b', ' a - b', ' None'], 'label': 0},
                    {'question': 'import', 'choices': [' os', ' the', ' 12345'], 'label': 0}],
    'research_gen': [{'question': 'def main():\n', 'answer': 'pass'}, {'question': 'class Foo', 'answer': 'x'}],
    'research_roll': [{'text': 'def f(x):\n    return x * 2\n'}, {'text': 'import os\nimport sys\n' * 30}],
}


def test_lm_eval_adapter_matches_the_project(runs, tmp_path, monkeypatch):
  lm_eval = pytest.importorskip('lm_eval')  # the 'test' extra installs it
  yaml = pytest.importorskip('yaml')
  from lm_eval.tasks import TaskManager
  from research.interop.lm_harness import ResearchLM, cut_at
  from research import sampling
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')  # local JSON files only, no hub
  for name, spec in _TASKS.items():
    data = tmp_path / f'{name}.jsonl'
    data.write_text(''.join(json.dumps(d) + '\n' for d in _DOCS[name]))
    (tmp_path / f'{name}.yaml').write_text(yaml.safe_dump(dict(
        task=name, dataset_path='json', test_split='test', **spec,
        dataset_kwargs={'data_files': {'test': str(data)}, 'cache_dir': str(tmp_path / 'datasets')})))
  lm = ResearchLM(workdir=runs[0], batch_size=4, max_length=48)  # the 2nd rolling doc needs several windows
  out = lm_eval.simple_evaluate(model=lm, tasks=list(_TASKS), task_manager=TaskManager(include_path=str(tmp_path)),
                                log_samples=True)
  ev, tok = lm.ev, lm.tokenizer
  for s in out['samples']['research_mc']:
    doc = s['doc']
    assert len(s['resps']) == len(doc['choices'])
    for resp, choice in zip(s['resps'], doc['choices']):
      ctx, whole = tok.encode(doc['question'], add_bos=True), tok.encode(doc['question'] + choice, add_bos=True)
      assert abs(float(resp[0][0]) - _full_forward_logps(ev, ctx, whole[len(ctx):])) < 1e-5
  for s in out['samples']['research_roll']:
    ids = tok.encode(s['doc']['text'])
    want = sum(_full_forward_logps(ev, ctx, cont) for ctx, cont in _windows(ids, tok.bos_id, 48))
    # Each window is a float32 sum of ~48 log-probs (|sum| ~ 400, one ulp ~ 3e-5), and the
    # adapter's batched, padded windows round differently from one unpadded forward: a
    # few ulps per window. An absolute 1e-4 on a ~2770-nat total was 4e-8 relative, under
    # float32's epsilon (1.2e-7), and failed on one CI machine by 1.1e-4; rtol 1e-6 is ~8 ulps.
    np.testing.assert_allclose(float(s['resps'][0][0]), want, rtol=1e-6)
  for s in out['samples']['research_gen']:
    prompt = tok.encode(s['doc']['question'], add_bos=True)
    ids = sampling.generate(ev.model, ev.params, [prompt], max_new_tokens=10, stop_tokens=(tok.eos_id,),
                            pad_id=tok.pad_id, vocab_limit=tok.vocab_size)[0]
    assert s['resps'][0][0] == cut_at(tok.decode([t for t in ids if t != tok.eos_id]), ['\n\n'])


def _windows(ids, bos, max_len):
  """lm_eval's disjoint rolling windows written out: the first max_len tokens after
  bos, then each next max_len tokens after the rest of the max_len + 1 tokens
  before their end."""
  out = [([bos], ids[:max_len])]
  for start in range(max_len, len(ids), max_len):
    end = min(start + max_len, len(ids))
    out.append((ids[end - max_len - 1:start], ids[start:end]))
  return out
