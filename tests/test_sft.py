"""Chat template, loss masks, SFT data and its packing."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import init_params
from research.data import chat, registry, sft_sources, sources
from research.data import sft as sft_data
from research.errors import UserError
from research.models.llama import Config, Model
from research.stages import sft

CONVO = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi there'},
         {'role': 'assistant', 'content': 'Hello.'}, {'role': 'user', 'content': 'Add 2 and 3'},
         {'role': 'assistant', 'content': '5'}]


def _expected(tok, mask):
  """The template written out by hand from its docstring."""
  ids, w = [tok.bos_id], [0]
  end = tok.special_id('<|end|>')
  for i, m in enumerate(CONVO):
    body = tok.encode(m['content']) + [end]
    ids += [tok.special_id(f'<|{m["role"]}|>')] + body
    on = {'assistant': m['role'] == 'assistant', 'completion': i == 4, 'all': True}[mask]
    w += [int(mask == 'all')] + [int(on)] * len(body)
  return ids, w


@pytest.mark.parametrize('mask', chat.MASK_MODES)
def test_render_matches_documented_template(tok, mask):
  ids, weights = chat.render(CONVO, tok, mask=mask)
  want_ids, want_w = _expected(tok, mask)
  assert ids.tolist() == want_ids and weights.tolist() == want_w


def test_prompt_ends_with_assistant_marker(tok):
  ids = chat.prompt_ids(CONVO, tok)
  full, _ = chat.render(CONVO, tok)
  assert ids[-1] == tok.special_id('<|assistant|>')
  assert full.tolist()[:len(ids)] == ids  # the prompt is a prefix of the training sequence


def test_row_formats_and_malformed_rows():
  pr = chat.to_messages({'prompt': 'p', 'response': 'r'})
  alpaca = chat.to_messages({'instruction': 'do', 'input': 'x', 'output': 'y'})
  assert pr == [{'role': 'user', 'content': 'p'}, {'role': 'assistant', 'content': 'r'}]
  assert alpaca[0]['content'] == 'do\n\nx' and alpaca[1]['content'] == 'y'
  assert chat.to_messages(json.dumps({'messages': CONVO})) == CONVO
  for bad in ('{oops', {'messages': [{'role': 'robot', 'content': 'x'}]},
              {'messages': [{'role': 'user', 'content': 'no reply'}]}, {'text': 'x'}, [1, 2]):
    assert chat.to_messages(bad) is None


def test_generated_tasks_are_correct_and_held_out():
  train = [r for _, r in sft_sources.task_rows('train', 300)]
  val = [r for _, r in sft_sources.task_rows('validation', 30)]
  assert not {r['messages'][0]['content'] for r in train} & {r['messages'][0]['content'] for r in val}
  for r in train + val:
    q = r['messages'][0]['content']
    if r['family'] == 'add':
      a, b = q[len('What is '):-1].split(' + ')
      assert int(r['answer']) == int(a) + int(b)
    elif r['family'] == 'reverse':
      assert r['answer'].split() == q.split(': ')[1].split()[::-1]
    else:
      assert r['answer'].split() == [str(x) for x in sorted(int(x) for x in q.split(': ')[1].split())]


def _tiny_model():
  model = Model(Config(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64))
  return model, init_params(model)


def _batches(tok, rows, packing, seq_len=64):
  ds = sft_data.sft_dataset([rows], [1.0], tok, seq_len=seq_len, batch_size=1, seed=0,
                       packing=packing, shuffle=False, num_epochs=1)
  return [{k: jnp.asarray(v) for k, v in b.items()} for b in ds]


def test_mined_code_with_invalid_escapes_parses_without_warnings(tmp_path):
  """The standard library has plain strings like "\\(" (a DeprecationWarning or
  SyntaxWarning from ast.parse): mining it must not print one per file."""
  import warnings
  source = 'def f(x):\n    """Matches a parenthesis."""\n    return "\\(" + x\n'
  path = tmp_path / 'm.py'
  path.write_text(source)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    rows = [row for _, row in sft_sources.code_pairs(str(path), 'm.py')]
    assert sources.parse_python('def (:') is None
  assert [r['messages'][1]['content'] for r in rows] == [source]


def test_loss_mask_prompt_targets_do_not_count(tok):
  model, params = _tiny_model()
  rows = [{'json': json.dumps({'messages': CONVO})}]
  batch = _batches(tok, rows, packing=False)[0]
  base = float(sft.loss(model, params, batch, {}, None)[0])
  mask = np.asarray(batch['loss_mask'][0])
  seg = np.asarray(batch['segment_ids'][0])
  prompt_pos = int(np.nonzero((mask == 0) & (seg > 0))[0][3])
  answer_pos = int(np.nonzero(mask == 1)[0][0])
  for pos, should_change in ((prompt_pos, False), (answer_pos, True)):
    t = batch['targets'].at[0, pos].set((batch['targets'][0, pos] + 7) % 512)
    new = float(sft.loss(model, params, {**batch, 'targets': t}, {}, None)[0])
    assert (new != base) == should_change, (pos, base, new)


def test_packed_and_padded_give_the_same_token_losses(tok):
  model, params = _tiny_model()
  rows = [{'json': json.dumps(r)} for _, r in sft_sources.task_rows('train', 2)]  # 6 examples
  packed, padded = _batches(tok, rows, True), _batches(tok, rows, False)
  assert len(padded) == 6 and len(packed) < 6  # several examples share a packed row
  def total(batches):
    sums = [sft.loss(model, params, b, {}, None) for b in batches]
    return sum(float(l) * float(n) for l, n, _ in sums), sum(float(n) for _, n, _ in sums)
  (sp, np_), (sd, nd) = total(packed), total(padded)
  assert np_ == nd and abs(sp - sd) / sd < 1e-5


def test_malformed_rows_are_counted(tmp_path, data_dir, capsys):
  path = tmp_path / 'sft.jsonl'
  good = [json.dumps({'prompt': f'q{i}', 'response': f'a{i}'}) for i in range(40)]
  path.write_text('\n'.join(good + ['{bad', json.dumps({'prompt': 'no response'})]) + '\n')
  src = registry.open_split('files', 'train', data_dir=data_dir, files=str(path), text_key='')
  val = registry.open_split('files', 'validation', data_dir=data_dir, files=str(path), text_key='')
  assert len(src) + len(val) == 42
  # Which split a row lands in hashes its key (which holds tmp_path), so count per split.
  bad = {name: sum(sft_data.example_messages(s[i], '') is None for i in range(len(s)))
         for name, s in (('train', src), ('validation', val))}
  assert bad['train'] + bad['validation'] == 2
  sft_data.check_rows(src, 'files', '')  # 40 good rows: never all bad
  out = capsys.readouterr().out
  assert (f'skipped {bad["train"]} malformed of the first {len(src)} rows' in out) == (bad['train'] > 0)
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"x": 1}\n{"y": 2}\n{"z": 3}\n')
  src = registry.open_split('files', 'train', data_dir=data_dir, files=str(bad), text_key='')
  with pytest.raises(UserError, match='malformed'):
    sft_data.check_rows(src, 'files', '')
