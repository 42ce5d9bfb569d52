"""EleutherAI lm-evaluation-harness adapter: a run or an HF checkpoint as an `lm_eval` model.

    pip install -e '.[eval]'
    python -m research.interop.lm_harness --model research --model_args workdir=runs/pretrain \\
        --tasks lambada_openai,hellaswag --batch_size 16
    python -m research.interop.lm_harness --model research --model_args init_from=hf:/path/to/llama ...

The arguments are those of the `lm_eval` command. lm_eval (0.4.x) finds models only
in its own registry and has no plugin hook for outside packages, so the stock
`lm_eval` executable cannot see this one; this entry point registers the model
as 'research' and then runs that same command line. From Python:

    from research.interop.lm_harness import ResearchLM
    lm_eval.simple_evaluate(model=ResearchLM(workdir='runs/sft'), tasks=[...])

Requests are plain text (lm_eval's tasks are): contexts start with bos and are
encoded as lm_eval's own HF model encodes them (research.evaluate.encode_pair).
A chat-tuned run is scored on the plain text too: the project's chat markers are
reserved tokens, not text, so lm_eval's --apply_chat_template does not apply.
Log-likelihoods and greedy generation are research.evaluate's and
research.sampling's, batched and sharded as there.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from research import evaluate, sampling
from research.training import sharding

NAME = 'research'


class ResearchLM(LM):
  """lm_eval model over research.evaluate.load(workdir | init_from=hf:<dir>).

  model_args: workdir=RUN or init_from=hf:DIR; max_length (default: the run's
  seq_len; longer contexts lose their start); max_gen_toks (default 256).
  """

  def __init__(self, workdir: str = '', init_from: str = '', batch_size: int | str = 16,
               max_length: int = 0, max_gen_toks: int = 256, **unused):
    super().__init__()
    del unused  # device, max_batch_size: lm_eval passes them to every model
    self.ev = evaluate.load(workdir, init_from, prompt_format='plain', max_length=int(max_length))
    self.tokenizer = self.ev.tokenizer
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # 'auto' -> 16
    self.max_gen_toks = int(max_gen_toks)

  def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if not context:  # lm_eval: an empty context is the bos token alone
      return [self.tokenizer.bos_id], self.tokenizer.encode(continuation)
    return evaluate.encode_pair(self.tokenizer, context, continuation)

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation)."""
    pairs = [self._encode(*r.args) for r in requests]
    logps, greedy = evaluate.continuation_logprobs(self.ev, pairs, batch_size=self.batch_size,
                                                   progress='loglikelihood')
    return [(float(lp), bool(g)) for lp, g in zip(logps, greedy)]

  def loglikelihood_rolling(self, requests) -> list[float]:
    """log p(text) of whole documents, in windows of max_length tokens after bos."""
    windows, owner = [], []
    for i, r in enumerate(requests):
      ids = self.tokenizer.encode(r.args[0])
      for w in lm_utils.get_rolling_token_windows(token_list=ids, prefix_token=self.tokenizer.bos_id,
                                                  max_seq_len=self.ev.max_length, context_len=1):
        windows.append(lm_utils.make_disjoint_window(w))
        owner.append(i)
    logps, _ = evaluate.continuation_logprobs(self.ev, windows, batch_size=self.batch_size, progress='rolling')
    totals = np.zeros(len(requests))
    np.add.at(totals, np.asarray(owner, int), logps)
    return [float(t) for t in totals]

  def generate_until(self, requests) -> list[str]:
    """Greedy continuations (sampled when do_sample with a temperature), cut
    before the first `until` string; at most max_gen_toks tokens, stopping at eos."""
    texts = [''] * len(requests)
    for start in range(0, len(requests), self.batch_size):
      idx = range(start, min(start + self.batch_size, len(requests)))
      settings = []  # the distinct generation settings of this chunk, one call each
      for i in idx:
        if requests[i].args[1] not in settings:
          settings.append(requests[i].args[1])
      for kwargs in settings:
        group = [i for i in idx if requests[i].args[1] == kwargs]
        for i, text in zip(group, self._generate([requests[i].args[0] for i in group], kwargs)):
          texts[i] = text
    return texts

  def _generate(self, contexts: list[str], kwargs: dict) -> list[str]:
    until = kwargs.get('until') or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
    max_new = int(kwargs.get('max_gen_toks', self.max_gen_toks))
    prompts = [self.tokenizer.encode(c, add_bos=True)[-self.ev.max_length:] for c in contexts]
    padded = prompts + [prompts[-1]] * (self.batch_size - len(prompts))  # one compiled shape
    with sharding.MeshContext(self.ev.mesh, self.ev.rules):
      ids = sampling.generate(self.ev.model, self.ev.params, padded, max_new_tokens=max_new,
                              temperature=temperature, rng=jax.random.PRNGKey(int(kwargs.get('seed', 0))),
                              stop_tokens=(self.tokenizer.eos_id,), pad_id=self.tokenizer.pad_id,
                              vocab_limit=self.tokenizer.vocab_size)[:len(prompts)]
    return [cut_at(self.tokenizer.decode([t for t in row if t != self.tokenizer.eos_id]), until) for row in ids]


def cut_at(text: str, until: list[str]) -> str:
  """`text` up to (excluding) the first occurrence of any string of `until`."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


def register() -> None:
  """Registers ResearchLM with lm_eval as 'research' (once)."""
  from lm_eval.api import registry  # pylint: disable=import-outside-toplevel
  if NAME not in registry.MODEL_REGISTRY:
    register_model(NAME)(ResearchLM)


def main() -> None:
  """The lm_eval command line, with the 'research' model registered."""
  register()
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  sys.argv[0] = 'lm_eval'
  cli_evaluate()


if __name__ == '__main__':
  main()
