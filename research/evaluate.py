"""Evaluate a finished run or an HF checkpoint, without training.

    python -m research.evaluate --workdir=runs/sft                       # the held-out tasks
    python -m research.evaluate --workdir=runs/pretrain --task=perplexity:stdlib
    python -m research.evaluate --init_from=hf:/path/to/llama --out=evals/llama --config=configs/pretrain.py \\
        --task=choice:mc.jsonl --task=generate:qa.jsonl --samples=8 --k=1,4 --temperature=0.8

Tasks (--task, repeatable):
  heldout                   greedy exact match on the embedded held-out generated
                            tasks (sft_tasks validation), overall and per family:
                            what SFT, DPO and RL log as eval/exact_match
  perplexity[:NAME[:SPLIT]] mean token NLL and perplexity on a dataset the data layer
                            reads (data.name NAME: 'stdlib', 'files' with --files,
                            a prepared TFDS name; default: the run's own), packed
                            as pretraining packs it, --batches batches of --batch_size
  generate:FILE.jsonl       rows {"prompt" (or "messages"), "answer"}: exact match of
                            the greedy reply; with --samples=n > 1 also pass@k
                            (unbiased, each k of --k) and mean@n at --temperature
  choice:FILE.jsonl         rows {"prompt" (or "messages"), "choices", "label"}: the
                            choice with the highest summed log-likelihood (acc) and
                            per byte (acc_norm), as lm-evaluation-harness scores them

A run trained on chat (every stage after pretraining) is prompted through the chat
template; pretraining runs and HF checkpoints with plain text (--format overrides).
Results go to OUT/results.json and OUT/results.md (OUT: --out, default
WORKDIR/eval). Parameters are sharded over config.mesh on all local devices, as
in training, and batches over its data axes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from research import evaluation, losses, models
from research.data import chat, pipeline
from research.data.tokenizer import Tokenizer
from research.errors import UserError
from research.training import host_memory, init, sharding

_BUCKET = 64  # scored sequences are padded to a multiple of this (few compiled shapes)


@dataclasses.dataclass
class Evaluee:
  """A model to evaluate: parameters (sharded over `mesh`), tokenizer, prompt style."""

  model: Any
  params: Any
  tokenizer: Tokenizer
  mesh: jax.sharding.Mesh
  rules: tuple
  chat: bool  # prompts through the chat template (else plain text after bos)
  config: Any  # the run's config (for an HF checkpoint: the --config given, or None)
  max_length: int  # longest scored sequence; longer contexts lose their start

  @property
  def stop_tokens(self) -> tuple[int, ...]:
    """Tokens that end a generated reply."""
    return chat.stop_tokens(self.tokenizer) if self.chat else (self.tokenizer.eos_id,)

  def prompt_ids(self, row: dict) -> list[int]:
    """Token ids of a row's prompt ('messages' always go through the chat template)."""
    if 'messages' in row:
      return chat.prompt_ids(row['messages'], self.tokenizer)
    if self.chat:
      return chat.CHAT.encode(self.tokenizer, row['prompt'])
    return self.tokenizer.encode(row['prompt'], add_bos=True)


# Without a config (an HF checkpoint evaluated on its own): parameters replicated,
# batches split over every device.
_DATA_PARALLEL = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
_BATCH_ONLY_RULES = (('batch', ('data', 'fsdp')),)


def load(workdir: str = '', init_from: str = '', *, config=None, prompt_format: str = 'auto',
         max_length: int = 0) -> Evaluee:
  """The model of a run's latest checkpoint (`workdir`, sharded over the run's
  config.mesh on all devices) or of `init_from` ('hf:<dir>'; sharded as `config`
  says, a stage config whose data settings perplexity uses; without one,
  replicated). prompt_format: 'chat', 'plain' or 'auto' (chat for runs after
  pretraining, plain for HF checkpoints)."""
  if bool(workdir) == bool(init_from):
    raise UserError('give one of --workdir (a training run) or --init_from=hf:<dir>.')
  if init_from:
    if not init_from.startswith(init.HF_PREFIX):
      raise UserError(f'--init_from={init_from!r}: write hf:<dir> (for a training run use --workdir).')
    from research.interop import hf  # pylint: disable=import-outside-toplevel
    path = init_from[len(init.HF_PREFIX):]
    mesh = sharding.make_mesh(config.mesh if config is not None else _DATA_PARALLEL)
    rules = sharding.rules_from_config(config.sharding_rules) if config is not None else _BATCH_ONLY_RULES
    model, params = hf.load_pretrained(path, mesh=mesh, rules=rules)
    tokenizer, is_chat = hf.load_tokenizer(path), False
    longest = int(config.seq_len) if config is not None else int(
        hf.read_config(path).get('max_position_embeddings', 2048))
  else:
    run = init.load_params(workdir, run_mesh=True)
    if run.tokenizer is None:
      raise UserError(f'{workdir} has no tokenizer: it never finished setting up.')
    config, model, params, tokenizer, mesh = run.config, run.model, run.params, run.tokenizer, run.layout.mesh
    rules, is_chat, longest = run.layout.rules, config.stage != 'pretrain', int(config.seq_len)
  if prompt_format not in ('auto', 'chat', 'plain'):
    raise UserError(f'--format={prompt_format!r}: choose auto, chat or plain.')
  if prompt_format != 'auto':
    is_chat = prompt_format == 'chat'
  return Evaluee(model, params, tokenizer, mesh, rules, is_chat, config, max_length or longest)


def _needs_config(ev: Evaluee, task: str):
  """ev.config, or a one-line error for an HF checkpoint loaded without one."""
  if ev.config is None:
    raise UserError(f'the {task} task reads data settings from a config: add --config=configs/pretrain.py '
                    '(or another stage config) to --init_from.')
  return ev.config


# ---- scoring continuations: log p(continuation | context) ----

def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, *, add_bos: bool = True
                ) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) of plain text, split as lm-evaluation-harness
  splits them: the whole string is encoded once and the continuation is what
  follows the context's own encoding, so its first token is the one the model
  would really see there (trailing spaces of the context move to the continuation)."""
  stripped = context.rstrip(' ')
  continuation = context[len(stripped):] + continuation
  whole = tokenizer.encode(stripped + continuation, add_bos=add_bos)
  n_context = len(tokenizer.encode(stripped, add_bos=add_bos))
  return whole[:n_context], whole[n_context:]


def _score_fn(model, params, inputs_BT, targets_BT, mask_BT, chunk: int):
  """(sum of log p(target) over the mask [B], all masked targets greedy [B])."""
  positions_BT = jnp.broadcast_to(jnp.arange(inputs_BT.shape[1]), inputs_BT.shape)
  segments_BT = (mask_BT >= 0).astype(jnp.int32)  # padding is masked -1: its own segment 0
  head, _ = model.apply({'params': params}, inputs_BT, positions_BT, segments_BT, unembedding=True)

  def stats(features, targets_BC):
    logits_BCV = head.logits(features).astype(jnp.float32)
    return losses.token_log_probs(logits_BCV, targets_BC), jnp.argmax(logits_BCV, -1) == targets_BC

  logps_BT, greedy_BT = losses.map_over_length(stats, (head.features, targets_BT), chunk)
  scored = mask_BT > 0
  return jnp.sum(jnp.where(scored, logps_BT, 0.0), -1), jnp.all(greedy_BT | ~scored, -1)


_score = jax.jit(_score_fn, static_argnames=('model', 'chunk'))


def _rows_per_batch(ev: Evaluee, batch_size: int) -> int:
  """batch_size rounded up to a multiple of the data-parallel shards."""
  dp = sharding.data_parallel_size(ev.mesh, ev.rules)
  return -(-batch_size // dp) * dp


def continuation_logprobs(ev: Evaluee, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          batch_size: int = 16, progress: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(log p(continuation | context) [N] (float32 sums), greedy [N] bool: every continuation
  token is the argmax) for (context ids, continuation ids) pairs, batched and
  sharded; logits are formed 256 positions at a time. A pair longer than
  ev.max_length + 1 tokens loses the start of its context."""
  if not pairs:
    return np.zeros(0), np.zeros(0, bool)
  for ctx, cont in pairs:
    if not ctx or not cont:
      raise UserError('every scored pair needs a context (at least bos) and a continuation of one token or more.')
  rows = _rows_per_batch(ev, batch_size)
  logps, greedy = np.zeros(len(pairs)), np.zeros(len(pairs), bool)
  order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # similar lengths together
  put = functools.partial(jax.device_put, device=sharding.batch_sharding(ev.mesh, ev.rules))
  with sharding.MeshContext(ev.mesh, ev.rules):
    for start in tqdm.trange(0, len(order), rows, desc=progress or 'scoring', disable=None, leave=False):
      idx = order[start:start + rows]
      seqs = [(list(pairs[i][0]) + list(pairs[i][1]))[-(ev.max_length + 1):] for i in idx]
      n_cont = [min(len(pairs[i][1]), len(s) - 1) for i, s in zip(idx, seqs)]
      T = -(-max(len(s) - 1 for s in seqs) // _BUCKET) * _BUCKET
      inputs, targets = np.zeros((rows, T), np.int32), np.zeros((rows, T), np.int32)
      mask = np.full((rows, T), -1, np.int32)
      for r, (s, n) in enumerate(zip(seqs, n_cont)):
        L = len(s) - 1
        inputs[r, :L], targets[r, :L], mask[r, :L] = s[:-1], s[1:], 0
        mask[r, L - n:L] = 1
      lp, gr = _score(ev.model, ev.params, put(inputs), put(targets), put(mask), chunk=min(256, T))
      lp, gr = np.asarray(jax.device_get(lp)), np.asarray(jax.device_get(gr))
      logps[idx], greedy[idx] = lp[:len(idx)], gr[:len(idx)]
  return logps, greedy


# ---- tasks ----

def _packed_nll_fn(model, params, batch):
  """(summed NLL, count) of the non-padding targets of packed rows, as the
  pretraining loss reads them (models.target_log_probs, chunked with the model's
  logits_chunk)."""
  logps, count = losses.masked_sums(models.target_log_probs(model, params, batch), batch['segment_ids'] > 0)
  return -jnp.sum(logps), jnp.sum(count)


_packed_nll = jax.jit(_packed_nll_fn, static_argnames=('model',))


def perplexity(ev: Evaluee, name: str = '', split: str = '', *, files: str = '', batch_size: int = 0,
               batches: int = 0) -> dict[str, float]:
  """Mean token NLL ('loss', nats), 'perplexity' and 'tokens' on dataset `name`'s
  `split` (default: the run's data and validation split), packed into rows of the
  run's seq_len as pretraining packs its validation rows (pipeline.eval_batches):
  the pretraining stage's eval/loss when the dataset, batch size and number of
  batches (default: the run's) are the run's."""
  cfg = _needs_config(ev, 'perplexity')
  data = copy.deepcopy(cfg.data)
  with data.unlocked():
    if name and name != cfg.data.name:
      data.name, data.text_key, data.mix_weights = name, 'text', ()
    data.files = files or data.files
    data.eval_split = split or data.eval_split
  rows = _rows_per_batch(ev, batch_size or int(cfg.batch_size))
  data_batches = pipeline.eval_batches(data, ev.tokenizer, seq_len=int(cfg.seq_len), batch_size=rows,
                                       max_batches=batches or int(cfg.eval_batches))
  nll, tokens = 0.0, 0
  put = functools.partial(jax.device_put, device=sharding.batch_sharding(ev.mesh, ev.rules))
  with sharding.MeshContext(ev.mesh, ev.rules):
    for b in tqdm.tqdm(data_batches, desc='perplexity', disable=None, leave=False):
      s, n = _packed_nll(ev.model, ev.params, {k: put(v) for k, v in b.items()})
      nll, tokens = nll + float(s), tokens + int(n)
  return {'loss': nll / tokens, 'perplexity': math.exp(min(nll / tokens, 50.0)), 'tokens': float(tokens)}


def heldout(ev: Evaluee, *, examples: int = 0, max_new_tokens: int = 24) -> dict[str, float]:
  """Greedy exact match on the embedded held-out generated tasks (overall and
  per family), computed as the training stages compute eval/exact_match."""
  rows = evaluation.task_rows(_needs_config(ev, 'heldout').data, examples)
  with sharding.MeshContext(ev.mesh, ev.rules):
    return evaluation.exact_match(ev.model, ev.params, ev.tokenizer, rows, max_new_tokens=max_new_tokens)


def read_jsonl(path: str, fields: Sequence[str]) -> list[dict]:
  """The rows of a JSONL file, each checked for `fields` ('prompt' may be 'messages')."""
  if not os.path.exists(path):
    raise UserError(f'{path}: no such file.')
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{i}: not JSON ({e.msg}).') from None
      missing = [k for k in fields if k not in row and not (k == 'prompt' and 'messages' in row)]
      if missing:
        raise UserError(f'{path}:{i}: the row lacks {missing}; each row needs {list(fields)}.')
      rows.append(row)
  if not rows:
    raise UserError(f'{path} holds no rows.')
  return rows


def generation(ev: Evaluee, rows: list[dict], *, samples: int = 1, ks: Sequence[int] = (1,),
               temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 64,
               seed: int = 0) -> dict[str, float]:
  """Exact match of the greedy reply to each row's prompt against its 'answer'
  (stripped); with samples=n > 1 also pass@k (unbiased, for each k <= n) and
  mean@n (the share of correct samples) of n replies sampled at `temperature`."""
  if samples > 1 and max(ks) > samples:
    raise UserError(f'pass@{max(ks)} needs at least {max(ks)} samples; raise --samples.')
  prompts = [ev.prompt_ids(r) for r in rows]
  answers = [str(r['answer']).strip() for r in rows]
  rows_per = _rows_per_batch(ev, batch_size)
  sampled = []
  with sharding.MeshContext(ev.mesh, ev.rules):
    greedy = evaluation.greedy_texts(ev.model, ev.params, ev.tokenizer, prompts, ev.stop_tokens,
                                     max_new_tokens=max_new_tokens, batch_size=rows_per, progress=True)
    for i in range(0, len(prompts) if samples > 1 else 0, rows_per):
      chunk = prompts[i:i + rows_per]
      padded = chunk + [chunk[-1]] * (rows_per - len(chunk))  # one compiled shape
      sampled += evaluation.sampled_texts(
          ev.model, ev.params, ev.tokenizer, padded, ev.stop_tokens, jax.random.fold_in(jax.random.PRNGKey(seed), i),
          n=samples, temperature=temperature, max_new_tokens=max_new_tokens)[:len(chunk) * samples]
  result = {'exact_match': float(np.mean([g.strip() == a for g, a in zip(greedy, answers)]))}
  if samples > 1:
    correct = np.asarray([s.strip() == answers[j // samples] for j, s in enumerate(sampled)]).reshape(-1, samples)
    result.update(evaluation.pass_at_k_metrics(correct, ks))
  return result


def choice_pairs(ev: Evaluee, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
  """(context ids, continuation ids) of every choice of every row, row by row.
  Chat: the prompt through the template, the choice as the reply's first tokens;
  plain: encode_pair(prompt, choice) (a choice usually starts with a space)."""
  pairs = []
  for r in rows:
    for choice in r['choices']:
      if ev.chat or 'messages' in r:
        pairs.append((ev.prompt_ids(r), ev.tokenizer.encode(choice)))
      else:
        pairs.append(encode_pair(ev.tokenizer, r['prompt'], choice))
  return pairs


def multiple_choice(ev: Evaluee, rows: list[dict], *, batch_size: int = 16) -> dict[str, float]:
  """Accuracy of picking the choice of highest log-likelihood given the prompt
  ('acc'), and of highest log-likelihood per UTF-8 byte of the choice ('acc_norm')."""
  logps, _ = continuation_logprobs(ev, choice_pairs(ev, rows), batch_size=batch_size, progress='choice')
  hits, hits_norm, at = [], [], 0
  for r in rows:
    n = len(r['choices'])
    lp = logps[at:at + n]
    per_byte = lp / np.asarray([max(len(c.encode()), 1) for c in r['choices']])
    hits.append(int(np.argmax(lp)) == int(r['label']))
    hits_norm.append(int(np.argmax(per_byte)) == int(r['label']))
    at += n
  return {'acc': float(np.mean(hits)), 'acc_norm': float(np.mean(hits_norm))}


def run_task(ev: Evaluee, spec: str, opts: dict) -> tuple[str, dict[str, float]]:
  """(a name for the results, its metrics) of one --task spec."""
  kind, _, rest = spec.partition(':')
  if kind == 'heldout':
    return 'heldout', heldout(ev, examples=opts['examples'], max_new_tokens=opts['max_new_tokens'])
  if kind == 'perplexity':
    name, _, split = rest.partition(':')
    return (f'perplexity/{name or _needs_config(ev, "perplexity").data.name}',
            perplexity(ev, name, split, files=opts['files'], batch_size=opts['batch_size'], batches=opts['batches']))
  if kind in ('generate', 'choice') and rest:
    label = os.path.splitext(os.path.basename(rest))[0]
    if kind == 'generate':
      return f'generate/{label}', generation(
          ev, read_jsonl(rest, ('prompt', 'answer')), samples=opts['samples'], ks=opts['ks'],
          temperature=opts['temperature'], max_new_tokens=opts['max_new_tokens'], seed=opts['seed'])
    return f'choice/{label}', multiple_choice(ev, read_jsonl(rest, ('prompt', 'choices', 'label')),
                                              batch_size=opts['batch_size'] or 16)
  raise UserError(f'--task={spec!r}: write heldout, perplexity[:NAME[:SPLIT]], generate:FILE.jsonl or '
                  'choice:FILE.jsonl.')


def write_results(out: str, source: str, results: dict[str, dict[str, float]]) -> str:
  """Writes OUT/results.json and OUT/results.md; returns the markdown table."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump({'source': source, 'results': results}, f, indent=2)
  lines = [f'# Evaluation of {source}', '', '| task | metric | value |', '| --- | --- | --- |']
  for task, metrics in results.items():
    lines += [f'| {task} | {k} | {v:.4f} |' for k, v in metrics.items()]
  table = '\n'.join(lines[2:])
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return table


_WORKDIR = flags.DEFINE_string('workdir', '', 'A training run to evaluate (its latest checkpoint).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'With --init_from: a stage config file[:arg] for the '
                                          'data, mesh and seq_len (e.g. configs/pretrain.py).', lock_config=False)
_INIT_FROM = flags.DEFINE_string('init_from', '', 'hf:<dir>: an HF checkpoint to evaluate instead.')
_TASKS = flags.DEFINE_multi_string('task', [], 'heldout | perplexity[:NAME[:SPLIT]] | generate:F.jsonl | choice:F.jsonl '
                                   '(repeatable; default: heldout for chat runs, perplexity otherwise).')
_OUT = flags.DEFINE_string('out', '', 'Where results.json/.md go (default: WORKDIR/eval).')
_FORMAT = flags.DEFINE_enum('format', 'auto', ['auto', 'chat', 'plain'], 'How prompts are encoded.')
_FILES = flags.DEFINE_string('files', '', 'For perplexity:files, comma-separated globs of .txt/.jsonl.')
_BATCH = flags.DEFINE_integer('batch_size', 0, 'Rows per batch (perplexity default: the run\'s; choice: 16).')
_BATCHES = flags.DEFINE_integer('batches', 0, 'Perplexity batches (default: the run\'s eval_batches).')
_SAMPLES = flags.DEFINE_integer('samples', 1, 'Sampled replies per generate prompt (pass@k, mean@n).')
_K = flags.DEFINE_list('k', ['1'], 'The k of pass@k (each <= --samples).')
_TEMP = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature for --samples > 1.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 24, 'Longest generated reply.')
_EXAMPLES = flags.DEFINE_integer('examples', 0, 'heldout: the first N tasks (0: all 300).')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  try:
    if _CONFIG.value is not None and _WORKDIR.value:
      raise UserError('--config goes with --init_from; a --workdir run uses its own config.json.')
    ev = load(_WORKDIR.value, _INIT_FROM.value, config=_CONFIG.value, prompt_format=_FORMAT.value)
    out = _OUT.value or (os.path.join(_WORKDIR.value, 'eval') if _WORKDIR.value else '')
    if not out:
      raise UserError('--out is required with --init_from (where results.json and results.md go).')
    opts = dict(files=_FILES.value, batch_size=_BATCH.value, batches=_BATCHES.value, samples=_SAMPLES.value,
                ks=[int(k) for k in _K.value], temperature=_TEMP.value, max_new_tokens=_MAX_NEW.value,
                examples=_EXAMPLES.value, seed=_SEED.value)
    tasks = _TASKS.value or (['heldout'] if ev.chat else ['perplexity'])
    results = dict(run_task(ev, spec, opts) for spec in tasks)
    print(write_results(out, _WORKDIR.value or _INIT_FROM.value, results))
    print(f'\n{out}/results.json and results.md written')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  host_memory.reexec_with_huge_pages()
  app.run(main)
