"""Tokenizer, sources and packing pipeline."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from research.data import pipeline, registry, sources
from research.data.tokenizer import CHAT_MARKERS, Tokenizer, train_tokenizer
from research.errors import UserError
from research.training.checkpoint import json_lists_to_tuples


@pytest.fixture(scope='module')
def tokenizer(tok):
  return tok


def test_tokenizer_reserves_special_ids_and_round_trips(tokenizer, tmp_path):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  for i, marker in enumerate(CHAT_MARKERS):
    assert tokenizer.special_id(marker) == 4 + i
    assert tokenizer.encode(f'a{marker}b').count(4 + i) == 1
  text = 'def f(x):\n\tif x:\n        return "é\u00df" + str(12345)\n'
  assert tokenizer.decode(tokenizer.encode(text)) == text
  ids = tokenizer.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == 2 and ids[-1] == 3
  path = str(tmp_path / 't.model')
  tokenizer.save(path)
  assert Tokenizer.load(path).encode(text) == tokenizer.encode(text)


def test_missing_tokenizer_file_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='cannot load tokenizer'):
    Tokenizer.load(str(tmp_path / 'nope.model'))


def _docs(tokenizer, source):
  return [tokenizer.encode(t, True, True) for t in sources.iter_texts(source)]


def test_packing_keeps_documents_aligned(tokenizer, test_config):
  c = test_config()
  src = pipeline.open_source(c.data, 'train')
  ds = pipeline.packed_dataset(src, tokenizer, seq_len=64, batch_size=4, seed=0, shuffle=False)
  rows = []
  for i, batch in enumerate(ds):
    assert batch['inputs'].shape == (4, 64) and batch['inputs'].dtype == np.int32
    rows.extend({k: v[r] for k, v in batch.items()} for r in range(4))
    if i == 20:
      break
  # Reassemble: inside a segment, targets are the next input; positions count up.
  stream = []
  for row in rows:
    seg, pos = row['segment_ids'], row['positions']
    assert (seg > 0).all()  # concat-then-split fills every row
    for t in range(64):
      if t + 1 < 64 and seg[t + 1] == seg[t]:
        assert row['targets'][t] == row['inputs'][t + 1]
        assert pos[t + 1] == pos[t] + 1
      stream.append((row['inputs'][t], row['targets'][t]))
  # The concatenated stream is exactly the documents' (input, target) pairs.
  want = [(d[i], d[i + 1]) for d in _docs(tokenizer, src) for i in range(len(d) - 1)]
  assert stream == want[:len(stream)]


@pytest.mark.parametrize('skip,window', [(1, 1024), (7, 1024), (9, 16)])
def test_iterator_state_resumes_exactly(tokenizer, test_config, skip, window):
  c = test_config()
  src = pipeline.open_source(c.data, 'train')
  make = lambda: iter(pipeline.packed_dataset(src, tokenizer, seq_len=32, batch_size=4, seed=3,
                                              shuffle_window=window))
  it = make()
  for _ in range(skip):
    next(it)
  # Through JSON, as checkpoints store it.
  state = json_lists_to_tuples(json.loads(json.dumps(it.get_state())))
  expected = [next(it) for _ in range(5)]
  it2 = make()
  it2.set_state(state)
  for e in expected:
    got = next(it2)
    for k in e:
      np.testing.assert_array_equal(got[k], e[k])


def test_splits_are_disjoint_and_fixed(test_config):
  c = test_config()
  train = {ex['key'] for ex in pipeline.open_source(c.data, 'train')}
  val = {ex['key'] for ex in pipeline.open_source(c.data, 'validation')}
  assert train and val and not train & val


def test_process_rows_partition_the_batch():
  parts = [pipeline.process_rows(8, p, 4) for p in range(4)]
  assert [list(range(8))[s] for s in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
  with pytest.raises(UserError, match='batch_size=6'):
    pipeline.process_rows(6, 0, 4)


def test_malformed_jsonl_rows_are_counted_not_fatal(tmp_path, data_dir, capsys):
  path = tmp_path / 'd.jsonl'
  good = [json.dumps({'text': f'document number {i} ' * 20}) for i in range(30)]
  path.write_text('\n'.join(good + ['{not json', json.dumps({'txt': 'x'}), json.dumps({'text': 3})]))
  src = registry.open_split('files', 'train', data_dir=data_dir, files=str(path))
  val = registry.open_split('files', 'validation', data_dir=data_dir, files=str(path))
  assert len(src) + len(val) == 30
  assert 'skipped 3 malformed of 33 rows' in capsys.readouterr().err


def test_all_rows_malformed_is_a_user_error(tmp_path, data_dir):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"a": 1}\n[]\n')
  with pytest.raises(UserError, match='every row is malformed'):
    registry.open_split('files', 'train', data_dir=data_dir, files=str(path))


def test_unprepared_tfds_name_is_a_user_error(data_dir):
  with pytest.raises(UserError, match='not a prepared TFDS dataset'):
    registry.open_split('no_such_dataset_xyz', 'train', data_dir=data_dir)


def test_every_registered_dataset_opens_both_splits(data_dir):
  """The registry names every embedded dataset; each builds offline into both splits."""
  assert {'stdlib', 'files', 'sft_tasks', 'sft_code', 'pref_tasks', 'pref_code'} <= set(registry.BUILDERS)
  for name in ('sft_tasks', 'pref_tasks'):
    train, val = (registry.open_split(name, s, data_dir=data_dir) for s in ('train', 'validation'))
    assert (len(train), len(val)) == {'sft_tasks': (24000, 300), 'pref_tasks': (12000, 300)}[name]
    assert json.loads(val[0]['json'])['family'] in ('add', 'reverse', 'sort')


def test_grain_source_state_resumes_the_stream(tokenizer, test_config):
  """The batch source the loop sees: next(policy) ignores the policy, and its
  state (what checkpoints hold) continues the same stream."""
  c = test_config()
  ds = pipeline.packed_dataset(pipeline.open_source(c.data, 'train'), tokenizer, seq_len=32, batch_size=4, seed=1)
  a, b = pipeline.GrainSource(ds), pipeline.GrainSource(ds)
  a.next(None)
  b.set_state(json_lists_to_tuples(json.loads(json.dumps(a.get_state()))))
  for _ in range(3):
    x, y = a.next(object()), b.next(None)
    assert sorted(x) == ['inputs', 'positions', 'segment_ids', 'targets']
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_streams_partition_the_data_and_their_state_resumes_exactly(tokenizer, test_config):
  """data.streams=2 in one process: stream s packs every 2nd document from the s-th
  (documents land in exactly one stream), a batch is stream 0's rows then stream
  1's, and the gathered state continues both streams exactly."""
  c = test_config()
  src = pipeline.open_source(c.data, 'train')
  make = lambda s, n, rows: pipeline.packed_dataset(src, tokenizer, seq_len=32, batch_size=rows, seed=1,
                                                    stream=(s, n))
  docs = grain.MapDataset.source(src).shuffle(seed=1)
  firsts = [pipeline.take_stream(docs, s, 2)[0] for s in (0, 1)]
  assert firsts == [docs[0], docs[1]]
  a, b = pipeline.StreamSource(make, 2, 4), pipeline.StreamSource(make, 2, 4)
  whole = [iter(make(s, 2, 2)) for s in (0, 1)]
  first = a.next(None)
  parts = [next(it) for it in whole]
  for k in first:
    np.testing.assert_array_equal(first[k], np.concatenate([parts[0][k], parts[1][k]]))
  state = json_lists_to_tuples(json.loads(json.dumps(a.get_state())))
  assert list(state['rows_built']) == [4] and sorted(state['states']) == ['0', '1']
  b.set_state(state)
  for _ in range(3):
    x, y = a.next(None), b.next(None)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  with pytest.raises(UserError, match='data.streams=3'):
    pipeline.StreamSource(make, 3, 4)  # does not divide the batch


def _split_texts(path, data_dir, text_key='text'):
  return [[ex['text'].decode() for ex in registry.open_split('files', s, data_dir=data_dir, files=str(path),
                                                             text_key=text_key)]
          for s in ('train', 'validation')]


def test_one_document_corpus_trains_on_its_head_and_evaluates_on_its_tail(tmp_path, data_dir, tokenizer,
                                                                          capsys):
  text = ''.join(f'line {i}: the quick brown fox\n' for i in range(300))
  path = tmp_path / 'book.txt'
  path.write_text(text)
  train, val = _split_texts(path, data_dir)
  assert len(train) == len(val) == 1 and train[0] + val[0] == text  # a cut, nothing lost or shared
  assert 0.05 < len(val[0]) / len(text) <= 0.15 and val[0].startswith('line ')  # ~10%, at a line start
  assert 'single document' in capsys.readouterr().err
  ds = pipeline.packed_dataset(registry.open_split('files', 'train', data_dir=data_dir, files=str(path)),
                               tokenizer, seq_len=32, batch_size=4, seed=0)
  assert next(iter(ds))['inputs'].shape == (4, 32)


def test_one_structured_row_is_both_splits_with_a_warning(tmp_path, data_dir, capsys):
  row = json.dumps({'prompt': 'What is 2 + 2?', 'response': '4'})
  path = tmp_path / 'one.jsonl'
  path.write_text(row + '\n')
  assert _split_texts(path, data_dir, text_key='') == [[row], [row]]
  assert 'not held out' in capsys.readouterr().err


def test_binary_and_non_utf8_files_are_skipped_and_counted(tmp_path, data_dir, capsys):
  docs = {f'doc{i}.txt': f'document {i} ' * 50 for i in range(3)}
  for name, text in docs.items():
    (tmp_path / name).write_text(text)
  (tmp_path / 'image.txt').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR' + bytes(range(256)) * 4)
  (tmp_path / 'latin1.txt').write_bytes('caf\xe9 cr\xe8me'.encode('latin-1'))
  train, val = _split_texts(tmp_path / '*.txt', data_dir)
  assert sorted(train + val) == sorted(docs.values())
  err = capsys.readouterr().err
  assert 'skipped 2 binary' in err and 'image.txt' in err


def test_empty_file_is_called_empty_not_malformed(tmp_path, data_dir, capsys):
  (tmp_path / 'a.jsonl').write_text(''.join(json.dumps({'text': f'row {i} ' * 20}) + '\n' for i in range(5)))
  (tmp_path / 'b.jsonl').write_text('')
  train, val = _split_texts(tmp_path / '*.jsonl', data_dir)
  assert len(train) + len(val) == 5
  err = capsys.readouterr().err
  assert 'skipped 1 empty file' in err and 'b.jsonl' in err and 'malformed' not in err


@pytest.mark.parametrize('contents,match', [((b'', b'\n \n'), 'empty'),
                                            ((b'\x00\x01\x02', b'\xff\xfe'), 'binary')])
def test_no_usable_file_is_a_user_error_naming_them(tmp_path, data_dir, contents, match):
  for name, data in zip(('a.txt', 'b.jsonl'), contents):
    (tmp_path / name).write_bytes(data)
  with pytest.raises(UserError, match=f"2 {match}.*a.txt.*b.jsonl"):
    registry.open_split('files', 'train', data_dir=data_dir, files=str(tmp_path / '*'))


def test_tokenizer_training_failures_are_user_errors():
  with pytest.raises(UserError, match='no text'):
    train_tokenizer([], 512)
  many_chars = ''.join(chr(0x4e00 + i) for i in range(2000)) * 3  # more distinct characters than pieces
  needed = 2000 + 4 + len(CHAT_MARKERS) + 256  # characters, control ids, markers, byte pieces
  with pytest.raises(UserError, match=f'needs {needed} pieces for its distinct characters'):
    train_tokenizer([many_chars], 512)


def test_runs_side_by_side_prepare_a_dataset_once(tmp_path):
  """Two processes open the same unprepared dataset in one data dir at once (the
  pipeline's parallel stages, a sweep): both read it, one prepared it. Before the
  lock, TFDS failed in the second with 'Cannot rename .../incomplete.*'."""
  code = ('import sys; from research.data import registry; '
          'print(len(registry.open_split("pref_tasks", "train", data_dir=sys.argv[1])))')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  sizes = {out.split()[-1] for out, _ in outs}  # the preparing one also prints TFDS's lines
  assert len(sizes) == 1 and int(sizes.pop()) > 0
  assert len(list(tmp_path.glob('pref_tasks/*/incomplete*'))) == 0


def test_a_mixture_without_a_tokenizer_trains_one_on_all_its_datasets(data_dir):
  """SFT from scratch on the default mixture: the tokenizer is trained on both
  datasets (it once failed: the mixture's name was opened as one dataset)."""
  from configs import sft
  c = sft.get_config('size=test')
  c.data.data_dir, c.data.tokenizer = data_dir, ''
  assert '+' in c.data.name
  tok = pipeline.get_tokenizer(c.data, 512)
  assert os.path.exists(pipeline.default_tokenizer_path(c.data, 512))
  for text in ('def reverse(xs):\n    return xs[::-1]', '12 + 30 = 42'):  # one from each dataset's kind
    assert tok.decode(tok.encode(text, False, False)) == text
