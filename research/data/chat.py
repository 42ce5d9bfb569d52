"""The chat template, shared by training and sampling, and its loss masks.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}.
It is rendered at the token level, so no text can forge a marker:

    <bos> <|system|> ...system text... <|end|>
          <|user|> ...user text... <|end|>
          <|assistant|> ...reply... <|end|>
          <|user|> ... <|end|> <|assistant|> ...reply... <|end|>

Each marker is one reserved token of the project's tokenizer. A prompt for
generation ends with `<|assistant|>`; the model writes the reply and `<|end|>`,
which is the stop token.

Loss masks (over the target of each position):
  'assistant'  every assistant reply and its <|end|> (the default)
  'completion' only the last assistant reply and its <|end|>
  'all'        every token

A tokenizer that carries a checkpoint's chat template (an HF tokenizer.json
with tokenizer_config.json's `chat_template` or chat_template.jinja) renders
with that template instead, as transformers' apply_chat_template does (jinja2,
sandboxed; the text is then tokenized with its special tokens parsed, so there
a message can spell a marker). Each assistant reply's tokens are found by
rendering: the reply is the text between the conversation rendered up to it
(with the generation prompt) and rendered through it, and a token belongs to it
where it starts; the reply's first stop token (tokenizer.stop_ids, e.g.
<|eot_id|> or <|im_end|>) ends it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Any, Callable

import numpy as np

from research.data.tokenizer import Tokenizer
from research.errors import UserError

ROLES = ('system', 'user', 'assistant')
MASK_MODES = ('assistant', 'completion', 'all')


def to_messages(example: Any) -> list[dict] | None:
  """Normalises a data row to a message list, or None if malformed.

  Accepts {"messages": [...]}, {"prompt", "response"} and Alpaca's
  {"instruction", "input", "output"}, as a dict or a JSON string/bytes.
  """
  try:
    if isinstance(example, (bytes, str)):
      example = json.loads(example)
    if not isinstance(example, dict):
      return None
    if 'messages' in example:
      messages = example['messages']
      if isinstance(messages, (bytes, str)):
        messages = json.loads(messages)
    elif 'prompt' in example and 'response' in example:
      messages = [{'role': 'user', 'content': example['prompt']},
                  {'role': 'assistant', 'content': example['response']}]
    elif 'instruction' in example and 'output' in example:
      prompt = example['instruction'] + (f"\n\n{example['input']}" if example.get('input') else '')
      messages = [{'role': 'user', 'content': prompt},
                  {'role': 'assistant', 'content': example['output']}]
    else:
      return None
    out = []
    for m in messages:
      role, content = m['role'], m['content']
      role = role.decode() if isinstance(role, bytes) else role
      content = content.decode() if isinstance(content, bytes) else content
      if role not in ROLES or not isinstance(content, str):
        return None
      out.append({'role': role, 'content': content})
  except (ValueError, KeyError, TypeError, AttributeError):
    return None
  if not out or out[-1]['role'] != 'assistant':
    return None
  return out


def render(messages: list[dict], tokenizer: Tokenizer, *, mask: str = 'assistant',
           add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Token ids [N] and a 0/1 loss weight per token [N] (1 = predict this token).

  With add_generation_prompt, the ids end with <|assistant|> (for sampling).
  """
  if mask not in MASK_MODES:
    raise ValueError(f'mask={mask!r}; choose one of {MASK_MODES}')
  if tokenizer.chat_template:
    return _render_with_template(messages, tokenizer, mask, add_generation_prompt)
  end = tokenizer.special_id('<|end|>')
  last_assistant = max((i for i, m in enumerate(messages) if m['role'] == 'assistant'), default=-1)
  ids, weights = [tokenizer.bos_id], [0]
  for i, m in enumerate(messages):
    content = tokenizer.encode(m['content'])
    ids.append(tokenizer.special_id(f'<|{m["role"]}|>'))
    weights.append(0)
    trained = (mask == 'all' or (m['role'] == 'assistant' and
                                 (mask == 'assistant' or i == last_assistant)))
    ids.extend(content + [end])
    weights.extend([int(trained)] * (len(content) + 1))
  if add_generation_prompt:
    ids.append(tokenizer.special_id('<|assistant|>'))
    weights.append(0)
  if mask == 'all':
    weights = [1] * len(ids)
    weights[0] = 0  # nothing predicts bos
  return np.asarray(ids, np.int32), np.asarray(weights, np.int32)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """The jinja template in the environment transformers renders chat templates in."""
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import sandbox  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=['jinja2.ext.loopcontrols'])
  env.filters['tojson'] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
      x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def template_text(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
  """The text tokenizer.chat_template renders `messages` to."""
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    return _compiled(tokenizer.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
        **tokenizer.special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise UserError(f'the chat template of {tokenizer.path} failed: {e}') from None


def _render_with_template(messages, tokenizer, mask: str, add_generation_prompt: bool):
  """render() through the tokenizer's chat template (see the module docstring)."""
  text = template_text(messages, tokenizer, add_generation_prompt)
  ids, offsets = tokenizer.encode_with_offsets(text)
  ids = np.asarray(ids, np.int32)
  weights = np.zeros(len(ids), np.int32)
  if mask == 'all':
    weights[1:] = 1
    return ids, weights
  starts = np.asarray([start for start, _ in offsets], np.int64)
  stops = set(tokenizer.stop_ids)
  replies = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
  for i in replies[-1:] if mask == 'completion' else replies:
    head = template_text(messages[:i], tokenizer, add_generation_prompt=True)
    through = template_text(messages[:i + 1], tokenizer)
    if not (text.startswith(through) and through.startswith(head)):
      raise UserError(f'the chat template of {tokenizer.path} does not render a conversation as a prefix of its '
                      'continuation (it rewrites earlier turns), so the assistant replies cannot be located for '
                      'the loss mask; use a template without that, or the project\'s own tokenizer.')
    inside = np.flatnonzero((starts >= len(head)) & (starts < len(through)))
    ended = [j for j in inside if int(ids[j]) in stops]
    weights[inside[inside <= ended[0]] if ended else inside] = 1
  return ids, weights


def history(messages: list[dict]) -> list[dict]:
  """A conversation without its last message if that is an assistant reply."""
  return list(messages[:-1] if messages and messages[-1]['role'] == 'assistant' else messages)


def prompt_ids(messages: list[dict], tokenizer: Tokenizer) -> list[int]:
  """Ids of a conversation up to (excluding) its last assistant reply, ending
  with <|assistant|>: what the model sees when asked to write that reply."""
  ids, _ = render(history(messages), tokenizer, add_generation_prompt=True)
  return ids.tolist()


def stop_tokens(tokenizer: Tokenizer) -> tuple[int, ...]:
  """Tokens that end a generated reply: <|end|> and eos, or with a checkpoint's
  chat template its stop ids (eos and generation_config.json's)."""
  if tokenizer.chat_template:
    return tuple(tokenizer.stop_ids)
  return (tokenizer.special_id('<|end|>'), tokenizer.eos_id)


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How a stage turns a text prompt into token ids to sample from, and which
  tokens end the reply."""

  encode: Callable[[Tokenizer, str], list[int]]
  stop_tokens: Callable[[Tokenizer], tuple[int, ...]]


# Plain text (pretraining): bos + text, continued until eos.
PLAIN = PromptFormat(lambda tok, text: tok.encode(text, add_bos=True), lambda tok: (tok.eos_id,))
# One user turn through the chat template, answered until <|end|>.
CHAT = PromptFormat(lambda tok, text: prompt_ids([{'role': 'user', 'content': text}], tok), stop_tokens)
