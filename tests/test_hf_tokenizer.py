"""HF tokenizers (tokenizer.json) and chat templates against transformers.

Two tokenizers are built here with the `tokenizers` library, no download: a
Llama 3-style one (its pre-tokenizer regex, byte-level BPE, bos added by the
post-processor, header/eot chat markers) and a Qwen-style one (its regex, NFC,
no bos, ChatML). transformers.AutoTokenizer loads the same files as the oracle.
"""

import json
import os

import numpy as np
import pytest

from research.data import chat
from research.data.tokenizer import HFTokenizer, load_tokenizer

tokenizers = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
CHATML_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

STYLES = {
    'llama3': dict(split=LLAMA3_SPLIT, nfc=False, bos='<|begin_of_text|>', eos='<|eot_id|>', pad=None,
                   special=['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                            '<|eot_id|>'], generation_eos=['<|end_of_text|>', '<|eot_id|>'],
                   template=LLAMA3_TEMPLATE),
    'qwen': dict(split=QWEN_SPLIT, nfc=True, bos=None, eos='<|im_end|>', pad='<|endoftext|>',
                 special=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                 generation_eos=['<|im_end|>', '<|endoftext|>'], template=CHATML_TEMPLATE),
}

EDGE_CASES = [
    '', ' ', '  leading and trailing  ', 'tabs\tand\r\nwindows\nnewlines\n\n\n', 'héllo wörld', 'e\u0301 vs \u00e9',
    '日本語のテキスト', 'مرحبا بالعالم', 'emoji 😀👍🏽 and ZWJ 👨\u200d👩\u200d👧', '\u200b zero width', 'x' * 300,
    '1234567890 3.14159 1e-10', "it's they're we'll I'd", 'def f(x):\n    return x ** 2  # sq',
    'control \x01\x02 chars', 'a <|eot_id|> b <|im_end|> c', '\U0001F600' * 5, 'ǅ ﬁ ẞ Ω',
]


def _build(style: str, texts: list[str], directory: str, vocab_size: int = 700) -> str:
  """Trains a byte-level BPE of `style` on `texts` and writes an HF tokenizer directory."""
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  s = STYLES[style]
  tok = Tokenizer(models.BPE())
  if s['nfc']:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(s['split']), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=s['special'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer)
  if s['bos']:
    bos = tok.token_to_id(s['bos'])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{s['bos']} $A", pair=f"{s['bos']} $A {s['bos']} $B",
                                      special_tokens=[(s['bos'], bos)])])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': s['bos'], 'eos_token': s['eos'],
            'pad_token': s['pad'], 'chat_template': s['template'], 'clean_up_tokenization_spaces': False,
            'model_max_length': 4096}
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(directory, 'generation_config.json'), 'w') as f:
    json.dump({'eos_token_id': [tok.token_to_id(t) for t in s['generation_eos']]}, f)
  return directory


@pytest.fixture(scope='module')
def corpus_texts(corpus_dir):
  return [open(os.path.join(corpus_dir, f)).read() for f in sorted(os.listdir(corpus_dir))]


@pytest.fixture(scope='module', params=sorted(STYLES))
def built(request, corpus_texts, tmp_path_factory):
  """(style, our tokenizer, transformers' AutoTokenizer) over one directory."""
  directory = _build(request.param, corpus_texts + EDGE_CASES, str(tmp_path_factory.mktemp(request.param)))
  return request.param, load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)


def test_ids_equal_transformers_on_the_corpus_and_unicode_edge_cases(built, corpus_texts):
  style, ours, hf = built
  assert isinstance(ours, HFTokenizer)
  lines = [line for text in corpus_texts for line in text.splitlines()[::7]][:400]
  samples = lines + [text[:3000] for text in corpus_texts] + EDGE_CASES
  for text in samples:
    assert ours.encode(text, add_bos=True) == hf(text)['input_ids'], text
    assert ours.encode(text) == hf(text, add_special_tokens=False)['input_ids'], text
  assert ours.bos_id == (hf.bos_token_id if style == 'llama3' else -1)
  assert ours.eos_id == hf.eos_token_id and ours.vocab_size == len(hf)
  assert ours.stop_ids == tuple(dict.fromkeys([hf.eos_token_id] + [hf.convert_tokens_to_ids(t) for t in
                                                                   STYLES[style]['generation_eos']]))
  for text in samples[:50] + EDGE_CASES:  # byte-level BPE is lossless (Qwen's NFC aside)
    want = hf.decode(hf(text, add_special_tokens=False)['input_ids'], skip_special_tokens=True)
    assert ours.decode(ours.encode(text)) == want


CONVERSATIONS = [
    [{'role': 'system', 'content': 'You answer briefly.'}, {'role': 'user', 'content': 'What is 2 + 2?'},
     {'role': 'assistant', 'content': '4'}, {'role': 'user', 'content': 'And 3 + 3?'},
     {'role': 'assistant', 'content': 'It is 6.'}],
    [{'role': 'user', 'content': 'Reverse: a b c'}, {'role': 'assistant', 'content': 'c b a'},
     {'role': 'user', 'content': 'Sort: 9 4 7, héllo 😀'}, {'role': 'assistant', 'content': '4 7 9\nDone.'},
     {'role': 'user', 'content': 'Thanks'}, {'role': 'assistant', 'content': "You're welcome!"}],
]


def _runs(mask):
  """The [start, end) index ranges of the 1s of a 0/1 vector."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize('convo', range(len(CONVERSATIONS)))
def test_chat_rendering_equals_apply_chat_template_and_masks_the_replies(built, convo):
  style, ours, hf = built
  messages = CONVERSATIONS[convo]
  ids, weights = chat.render(messages, ours)
  want = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
  assert ids.tolist() == list(want)
  prompt = chat.prompt_ids(messages, ours)
  assert prompt == list(hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=False))
  assert ids.tolist()[:len(prompt)] == prompt  # the generation prompt is a prefix of the training sequence
  # The mask covers each assistant reply and its end-of-turn token, nothing else.
  end = ours.special_id(STYLES[style]['eos'])
  replies = [m['content'] for m in messages if m['role'] == 'assistant']
  runs = _runs(weights)
  assert [ids[a:b].tolist() for a, b in runs] == [ours.encode(r) + [end] for r in replies]
  _, last_only = chat.render(messages, ours, mask='completion')
  assert _runs(last_only) == runs[-1:]
  assert chat.stop_tokens(ours) == ours.stop_ids and end in chat.stop_tokens(ours)


def test_the_project_template_stays_for_its_own_tokenizers(tok):
  assert tok.chat_template == ''
  ids, _ = chat.render(CONVERSATIONS[0], tok)
  assert tok.special_id('<|assistant|>') in ids.tolist()


def test_a_run_keeps_an_exact_copy_and_reloads_it(built, tmp_path):
  from research.interop import hf as hf_interop
  _, ours, _ = built
  path = ours.save_to(str(tmp_path))
  again = load_tokenizer(path)
  assert again.identity == ours.identity and again.encode('héllo 😀') == ours.encode('héllo 😀')
  assert again.chat_template == ours.chat_template and again.stop_ids == ours.stop_ids
  export = tmp_path / 'export'
  export.mkdir()
  hf_interop.save_tokenizer(str(export), ours)
  assert hf_interop.load_tokenizer(str(export)).identity == ours.identity


def test_sft_trains_and_answers_with_a_tokenizer_json(built, test_config, tmp_path):
  """A short SFT run on the embedded tasks through the checkpoint's tokenizer and
  chat template, then evaluated greedily with its stop ids."""
  from configs import sft as sft_cfg
  from conftest import train
  from research import evaluate
  _, ours, _ = built
  c = test_config(steps=2, eval_every=2, checkpoint_every=2, model__vocab_size=768)
  s = sft_cfg.get_config('size=test')
  with c.unlocked():
    c.stage, c.sft, c.task_eval = 'sft', s.sft, s.task_eval
    c.task_eval.examples, c.task_eval.max_new_tokens = 6, 4
    c.data.name, c.data.text_key, c.data.mix_weights = 'sft_tasks', '', ()
    c.data.tokenizer = ours.path
  last = train(c, tmp_path)
  assert np.isfinite(last['train/loss']) and 'eval/exact_match' in last
  ev = evaluate.load(str(tmp_path))
  assert ev.chat and ev.tokenizer.identity == ours.identity and ev.stop_tokens == ours.stop_ids
  assert 0.0 <= evaluate.heldout(ev, examples=6, max_new_tokens=4)['exact_match'] <= 1.0


def test_preference_sides_render_through_the_template(built):
  """DPO's side (loss on the last reply) and the reward model's scored side (read
  at the reply's last token, its stop token not fed) with a checkpoint's template."""
  from research.data import pairs
  style, ours, _ = built
  messages = CONVERSATIONS[0]
  ids, weights = chat.render(messages, ours, mask='completion')
  end = ours.special_id(STYLES[style]['eos'])
  side = pairs.render_side(messages, ours, 128)
  assert side['loss_mask'][side['targets'] == end].sum() == 1  # the last reply's end-of-turn is trained
  scored = pairs.render_scored(messages, ours, 128)
  n = int(scored['segment_ids'].sum())
  assert scored['inputs'][:n].tolist() == ids.tolist()[:n] and ids[n] == end  # cut just before <|eot_id|> / <|im_end|>
  assert scored['score_index'] == n - 1 and ours.decode(ids[n - len(ours.encode('It is 6.')):n]) == 'It is 6.'
