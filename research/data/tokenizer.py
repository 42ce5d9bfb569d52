"""SentencePiece tokenizer: load any `.model`, or train one from a corpus.

Trained tokenizers reserve, from the start, the ids later stages rely on:
pad=0, unk=1, bos=2, eos=3, then the chat-template markers in CHAT_MARKERS.
Loaded third-party models (e.g. Llama-2's) keep their own ids; a missing pad
falls back to 0 (padding is masked by segment ids, so its id never matters).

Train one from the command line:

    python -m research.data.tokenizer --data=stdlib --vocab_size=4096 --out=/tmp/stdlib.model
"""

from __future__ import annotations

import io
import re
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
