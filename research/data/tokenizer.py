"""Tokenizers: SentencePiece (load any `.model`, or train one from a corpus) and
HF "fast" tokenizers (`tokenizer.json`, read with the `tokenizers` library),
behind one interface: vocab_size, bos_id, eos_id, pad_id, stop_ids,
special_id(piece), encode(text, add_bos, add_eos), decode(ids), chat_template,
identity, save_to(dir). `load_tokenizer(path)` picks the kind from the path.

Trained tokenizers reserve, from the start, the ids later stages rely on:
pad=0, unk=1, bos=2, eos=3, then the chat-template markers in CHAT_MARKERS.
Loaded third-party models (e.g. Llama-2's) keep their own ids; a missing pad
falls back to 0 (padding is masked by segment ids, so its id never matters).
An HF tokenizer's bos is the token its post-processor puts first (Llama 3's
<|begin_of_text|>; Qwen adds none: bos_id -1), its eos the tokenizer_config's
eos_token, and its stop ids that eos plus generation_config.json's eos_token_id.

Train one from the command line:

    python -m research.data.tokenizer --data=stdlib --vocab_size=4096 --out=/tmp/stdlib.model
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import Iterable, Iterator

import sentencepiece as spm

from research.errors import UserError

# Chat-template markers, user-defined symbols that always encode as one token.
CHAT_MARKERS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
_CHUNK_CHARS = 2000  # SentencePiece trains on "sentences"; code is fed in chunks


class Tokenizer:
  """Thin wrapper over SentencePieceProcessor with the ids the project uses."""

  def __init__(self, model_proto: bytes, path: str = '<memory>'):
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.path = path

  @classmethod
  def load(cls, path: str) -> 'Tokenizer':
    """Loads a SentencePiece `.model` file."""
    try:
      with open(path, 'rb') as f:
        proto = f.read()
      return cls(proto, path)
    except (OSError, RuntimeError) as e:
      raise UserError(f'cannot load tokenizer {path!r}: {e}. Pass a SentencePiece .model file '
                      'in --config.data.tokenizer, or leave it empty to train one.') from None

  def save(self, path: str) -> None:
    """Writes the serialized model (identical bytes to the loaded file)."""
    with open(path, 'wb') as f:
      f.write(self.model_proto)

  def save_to(self, directory: str) -> str:
    """Writes directory/tokenizer.model atomically; returns its path."""
    path = os.path.join(directory, SP_FILE)
    try:
      self.save(path + '.tmp')
      os.replace(path + '.tmp', path)
    except OSError as e:  # name the file (a full disk fails at close, naming none)
      raise OSError(e.errno, e.strerror, path) from None
    return path

  @property
  def identity(self) -> bytes:
    """Bytes that differ between tokenizers that encode differently."""
    return self.model_proto

  @property
  def chat_template(self) -> str:
    """'' : conversations use the project's own template (research/data/chat.py)."""
    return ''

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end generated text (eos)."""
    return (self.eos_id,)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self.sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self.sp.eos_id()

  @property
  def pad_id(self) -> int:
    return max(self.sp.pad_id(), 0)

  def special_id(self, piece: str) -> int:
    """Id of a reserved special token such as '<|user|>'; error if absent."""
    i = self.sp.piece_to_id(piece)
    if i == self.sp.unk_id() or self.sp.id_to_piece(i) != piece:
      raise UserError(f'tokenizer {self.path} has no special token {piece!r}; train one with '
                      '`python -m research.data.tokenizer` (it reserves the chat markers).')
    return i

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally framed by bos/eos."""
    ids = self.sp.encode(text)
    if add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if add_eos and self.eos_id >= 0:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of token ids (special control ids are dropped, and so are ids past
    the vocabulary: a model may have more rows than its tokenizer has pieces)."""
    n = self.vocab_size
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])


SP_FILE = 'tokenizer.model'
HF_DIR = 'hf_tokenizer'  # a run's copy of an HF tokenizer: its files, as the checkpoint ships them
HF_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'generation_config.json',
            'chat_template.jinja')


def _token_text(token) -> str:
  """A special token of tokenizer_config.json: a string, or an AddedToken dict."""
  if isinstance(token, dict):
    return token.get('content', '')
  return token or ''


class HFTokenizer:
  """An HF "fast" tokenizer (tokenizer.json) with Tokenizer's interface.

  `files` maps the checkpoint's file names (HF_FILES; tokenizer.json required)
  to their bytes, kept to save an exact copy with a run.
  """

  def __init__(self, files: dict[str, bytes], path: str = '<memory>'):
    try:
      from tokenizers import Tokenizer as FastTokenizer  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise UserError(f'{path}: reading tokenizer.json needs the `tokenizers` package (pip install tokenizers).'
                      ) from None
    self.files, self.path = dict(files), path
    try:
      self.fast = FastTokenizer.from_str(files['tokenizer.json'].decode())
      config = json.loads(files.get('tokenizer_config.json', b'{}'))
      generation = json.loads(files.get('generation_config.json', b'{}'))
    except Exception as e:  # pylint: disable=broad-except  # the Rust library raises plain Exceptions
      raise UserError(f'{path}: cannot read tokenizer.json and its config files '
                      f'({(str(e).splitlines() or [type(e).__name__])[0][:200]}).') from None
    first = self.fast.encode('', add_special_tokens=True).ids  # what the post-processor puts first
    self._bos = first[0] if first else -1
    # The special tokens' texts, which chat templates read (bos_token, eos_token, ...).
    self.special_tokens = {k: _token_text(config.get(k)) for k in ('bos_token', 'eos_token', 'unk_token', 'pad_token')}
    self._eos = self._id_of(_token_text(config.get('eos_token')))
    self._pad = self._id_of(_token_text(config.get('pad_token')))
    gen_eos = generation.get('eos_token_id', [])
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    self._stops = tuple(dict.fromkeys(i for i in [self._eos, *gen_eos] if i is not None and i >= 0))
    template = config.get('chat_template') or ''
    if isinstance(template, list):  # named templates: the 'default' one
      template = next((t['template'] for t in template if t.get('name') == 'default'), '')
    self._template = files['chat_template.jinja'].decode() if 'chat_template.jinja' in files else template

  @classmethod
  def load(cls, path: str) -> 'HFTokenizer':
    """From a directory holding tokenizer.json (and the config files beside it)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    files = {}
    for name in HF_FILES:
      if os.path.exists(os.path.join(directory, name)):
        with open(os.path.join(directory, name), 'rb') as f:
          files[name] = f.read()
    if 'tokenizer.json' not in files:
      raise UserError(f'{path}: no tokenizer.json there.')
    return cls(files, directory)

  def save_to(self, directory: str) -> str:
    """Writes the files to directory/hf_tokenizer (replaced whole); returns that path."""
    target, tmp = os.path.join(directory, HF_DIR), os.path.join(directory, HF_DIR + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, data in self.files.items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target

  def _id_of(self, token: str) -> int:
    found = self.fast.token_to_id(token) if token else None
    return -1 if found is None else found

  @property
  def identity(self) -> bytes:
    return b'\0'.join(self.files.get(name, b'') for name in HF_FILES)

  @property
  def vocab_size(self) -> int:
    return self.fast.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int:
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return max(self._pad, 0)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The eos token and generation_config.json's eos_token_id (one id or several)."""
    return self._stops

  @property
  def chat_template(self) -> str:
    """The checkpoint's jinja chat template ('' when it ships none)."""
    return self._template

  def special_id(self, piece: str) -> int:
    """Id of a token such as '<|eot_id|>'; error if absent."""
    i = self._id_of(piece)
    if i < 0:
      raise UserError(f'tokenizer {self.path} has no token {piece!r}.')
    return i

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text` (special tokens written in it are parsed as such), with
    the checkpoint's bos (if it adds one) and eos when asked."""
    ids = self.fast.encode(text, add_special_tokens=False).ids
    if add_bos and self._bos >= 0:
      ids = [self._bos] + ids
    if add_eos and self._eos >= 0:
      ids = ids + [self._eos]
    return ids

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, (start, end) character span of each) of `text`, no tokens added."""
    enc = self.fast.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids: Iterable[int]) -> str:
    """Text of token ids (special tokens and ids past the vocabulary dropped)."""
    n = self.vocab_size
    return self.fast.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True)


def load_tokenizer(path: str):
  """A tokenizer from `path`: a SentencePiece .model file, a tokenizer.json (or a
  directory holding one: HF checkpoints, a run's hf_tokenizer/), or a directory
  holding tokenizer.model."""
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, SP_FILE)):
      return Tokenizer.load(os.path.join(path, SP_FILE))
    return HFTokenizer.load(path)
  if path.endswith('.json'):
    return HFTokenizer.load(path)
  return Tokenizer.load(path)


def saved_tokenizer(directory: str) -> str:
  """The path of the tokenizer a run (or an export) keeps in `directory`, or ''."""
  for name in (SP_FILE, HF_DIR):
    if os.path.exists(os.path.join(directory, name)):
      return os.path.join(directory, name)
  return ''


def _chunks(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  total = 0
  for text in texts:
    for i in range(0, len(text), _CHUNK_CHARS):
      chunk = text[i:i + _CHUNK_CHARS]
      yield chunk
      total += len(chunk)
      if total >= max_chars:
        return


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_chars: int = 10_000_000,
                    model_type: str = 'bpe') -> Tokenizer:
  """Trains a byte-fallback SentencePiece model on `texts` (first `max_chars`).

  Identity normalisation and whitespace-only pieces keep code (indentation,
  newlines) lossless: decode(encode(x)) == x for any text.
  """
  n_reserved = 4 + len(CHAT_MARKERS) + 256  # control ids, markers, byte fallback
  if vocab_size <= n_reserved:
    raise UserError(f'vocab_size={vocab_size} is too small: it must exceed {n_reserved} '
                    '(special tokens plus 256 byte-fallback pieces).')
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_chunks(texts, max_chars), model_writer=out, vocab_size=vocab_size,
        model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(CHAT_MARKERS), byte_fallback=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, max_sentence_length=4 * _CHUNK_CHARS, num_threads=2,
        minloglevel=2, hard_vocab_limit=False)
  except RuntimeError as e:
    raise UserError(_training_error(str(e), vocab_size)) from None
  return Tokenizer(out.getvalue())


def _training_error(message: str, vocab_size: int) -> str:
  """One readable line for SentencePiece's internal error `message` (which names
  a C++ source line, not the data at fault)."""
  if 'sentences_.empty()' in message:
    return 'no text to train the tokenizer on: the training split holds no characters.'
  chars = re.search(r'smaller than required_chars\. \d+ vs (\d+)', message)
  if chars:
    return (f'cannot train a tokenizer of {vocab_size} pieces: the training text needs '
            f'{chars.group(1)} pieces for its distinct characters and the special tokens (binary data, '
            'or a script that needs a larger vocab_size); raise vocab_size (config.model.vocab_size) '
            'or pass a trained one in config.data.tokenizer.')
  return f'SentencePiece could not train a tokenizer: {message.strip().splitlines()[-1][:300]}'


def main(argv=None):
  """CLI: train a tokenizer on a project corpus and write it to --out."""
  import argparse  # pylint: disable=import-outside-toplevel
  from research.data import registry, sources  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default='stdlib', help="'stdlib', 'files' or a prepared TFDS name")
  parser.add_argument('--files', default='', help="comma-separated globs for --data=files")
  parser.add_argument('--text_key', default='text')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--vocab_size', type=int, default=4096)
  parser.add_argument('--max_chars', type=int, default=10_000_000)
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  try:
    src = registry.open_split(args.data, 'train', data_dir=args.data_dir, files=args.files,
                             text_key=args.text_key)
    tok = train_tokenizer(sources.iter_texts(src, args.text_key), args.vocab_size,
                          max_chars=args.max_chars)
  except UserError as e:
    raise SystemExit(f'error: {e}') from None
  tok.save(args.out)
  print(f'wrote {args.out} (vocab {tok.vocab_size})')


if __name__ == '__main__':
  main()
