"""Train-step benchmark: this project against the same model in PyTorch, side by side.

    python -m experiments.benchmarks.train_step            # `make bench`
    python -m experiments.benchmarks.train_step --gpu      # accelerator: the rows of GPU_ROWS (1b at
                                                           # 2048 and 8192 tokens, 8b LoRA SFT), bf16

Each part runs in its own process (clean peak memory) on the same token
batches, and the driver prints one table and a summary. Parts:

  peak        a large matmul (float32 on CPU, bfloat16 on GPU): the measured peak FLOP/s
  jax         the project's jitted train step (research.training.trainer.Trainer)
  torch_eager / torch_compile   the same architecture in PyTorch (benchmark only)
  pipeline    the grain input pipeline alone (tokens/s it delivers)
  loop        the real training loop (`train()`: data, host transfer, logging) on the
              tiny preset, against the bare jitted step of that preset

Host memory: the JAX parts run as the project's entry points do, with glibc's
transparent huge pages on CPU hosts (research/training/host_memory.py); the
PyTorch rows run as a plain process starts, plus one eager row with huge pages,
since PyTorch gains from them too.

FLOP convention: 6 N + 12 L H Dh T per token (PaLM appendix B; N = matmul
parameters, attention counted in full, not causally halved). MFU = model
FLOP/s over the peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from research.training import host_memory

# The CPU comparison model (issue: d_model 256, 4 layers, 4 heads, vocab 8000, seq 256, batch 16).
REFERENCE = dict(vocab_size=8000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768,
                 tie_embeddings=False)
REF_BATCH, REF_SEQ = 16, 256


# `--isa=avx2`: both sides restricted to AVX2 on a machine that has AVX-512, to
# measure the other common kind of x86 machine (issue 18). XLA: its own switch;
# PyTorch: ATen's kernel dispatch, oneDNN and MKL each have one.
ISA_ENV = {'avx2': {'XLA_FLAGS': '--xla_cpu_max_isa=AVX2', 'ATEN_CPU_CAPABILITY': 'avx2',
                    'ONEDNN_MAX_CPU_ISA': 'AVX2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}}
_ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16')


def machine_header(isa: str = '') -> str:
  """What the benchmark ran on: CPU model, the ISA flags that matter, cores,
  library versions (and the ISA restriction, if any)."""
  import importlib.metadata as metadata  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel
  info, flags = {}, set()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = (part.strip() for part in line.partition(':'))
        if key in ('model name', 'cpu family', 'model') and key not in info:
          info[key] = value
        elif key == 'flags':
          flags = set(value.split())
          break
  except OSError:
    pass
  model = (f'{info.get("model name", platform.processor() or "?")} (family {info.get("cpu family", "?")}, '
           f'model {info.get("model", "?")})')
  versions = []
  for pkg in ('jax', 'jaxlib', 'torch'):
    try:
      versions.append(f'{pkg} {metadata.version(pkg)}')
    except metadata.PackageNotFoundError:
      pass
  isa_note = f'; restricted to {isa.upper()} ({", ".join(f"{k}={v}" for k, v in ISA_ENV[isa].items())})' if isa else ''
  return (f'machine: {model}, {os.cpu_count()} logical CPUs; ISA: '
          f'{" ".join(f for f in _ISA_FLAGS if f in flags) or "?"}{isa_note}\n'
          f'versions: python {platform.python_version()}, {", ".join(versions)}')


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tokens(batch, seq, vocab, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, vocab, (batch, seq + 1)).astype(np.int32)


def _config(model_fields, batch, seq, dtype='float32', stage='pretrain', lora_rank=0, quantize_base=''):
  import importlib  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f'configs.{stage}').get_config('size=tiny')
  c.model.update(model_fields)
  c.model.dtype = dtype
  c.batch_size, c.seq_len = batch, seq
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.optimizer.warmup_steps = 1
  if lora_rank:
    c.lora.update(rank=lora_rank, targets='all_linear', quantize_base=quantize_base)
  return c


def part_peak(gpu: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  n, dtype = (8192, jnp.bfloat16) if gpu else (2048, jnp.float32)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)  # not ones: data changes the clock
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  reps = 20 if gpu else 5
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  sec = (time.perf_counter() - t0) / reps
  return {'peak_flops': 2 * n ** 3 / sec, 'dtype': jnp.dtype(dtype).name}


def measure_peak_gflops() -> float:
  """This machine's float32 matmul peak in GFLOP/s (`part_peak`, in a subprocess so
  that the caller does not start a JAX client of its own)."""
  return _run_part('peak')['peak_flops'] / 1e9


def compiled_step(model_fields, batch, seq, dtype='float32', stage='pretrain', lora_rank=0, quantize_base=''):
  """(trainer, state, frozen, global batch, compiled train step, compile seconds) for
  the project's jitted train step of `stage` (pretrain, or sft: every token in the
  loss) on one device and a random token batch."""
  import importlib  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from research.training import init  # pylint: disable=import-outside-toplevel
  from research.training.trainer import Trainer  # pylint: disable=import-outside-toplevel
  c = _config(model_fields, batch, seq, dtype, stage, lora_rank, quantize_base)
  t = Trainer(c, importlib.import_module(f'research.stages.{stage}').stage(c), devices=jax.devices()[:1])
  state, frozen = init.setup_state(t, None)[:2]
  toks = _tokens(batch, seq, model_fields['vocab_size'])
  host = {'inputs': toks[:, :-1], 'targets': toks[:, 1:],
          'segment_ids': np.ones((batch, seq), np.int32),
          'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
  if stage == 'sft':
    host['loss_mask'] = np.ones((batch, seq), np.int32)
  with t.mesh_context():
    b = t.to_global(host)
    t0 = time.perf_counter()
    compiled = t.train_step.lower(state, b, frozen).compile()
  return t, state, frozen, b, compiled, time.perf_counter() - t0


def time_steps(compiled, state, batch, frozen, steps: int, warmup: int = 2):
  """(state after warmup + steps calls, mean seconds per timed call) of a compiled train step.

  Call inside the trainer's mesh context. Warm-up calls are not timed."""
  import jax  # pylint: disable=import-outside-toplevel
  for _ in range(warmup):
    state, _ = compiled(state, batch, frozen)
  jax.block_until_ready(state)
  metrics = None
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch, frozen)
  jax.block_until_ready((state, metrics))
  return state, (time.perf_counter() - t0) / steps


def _jax_step_time(model_fields, batch, seq, steps, dtype='float32', stage='pretrain', lora_rank=0,
                   quantize_base=''):
  import jax  # pylint: disable=import-outside-toplevel
  from research.models import flops_per_token  # pylint: disable=import-outside-toplevel
  t, state, frozen, b, compiled, compile_s = compiled_step(model_fields, batch, seq, dtype, stage, lora_rank,
                                                          quantize_base)
  with t.mesh_context():
    state, sec = time_steps(compiled, state, b, frozen, steps, warmup=2)
  mem = None
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    mem = stats['peak_bytes_in_use'] / 2 ** 20
  # A frozen base (LoRA) does no weight-gradient matmuls: 4 N instead of 6 N. MFU
  # still counts 6 N (the usual convention), so LoRA rows read as work done per token.
  return {'compile_s': compile_s, 'step_s': sec, 'tokens_per_s': batch * seq / sec,
          'model_flops_per_s': flops_per_token(t.model.cfg, seq) * batch * seq / sec,
          'peak_mem_mb': mem if mem is not None else _rss_mb(),
          'mem_kind': 'device' if mem is not None else 'rss'}


# GPU rows (`--gpu`): (name, preset, batch, seq, attention, remat, stage, LoRA rank
# (or (rank, 'nf4'): QLoRA, the frozen base in NF4), extra XLA_FLAGS). remat 'dots_with_no_batch_dims' keeps the projections' outputs
# and recomputes the rest; 'none' keeps everything (it fits at 8 x 2048 when attention
# is fused: no [B, H, T, T] scores are stored).
NO_TRITON_GEMM = '--xla_gpu_enable_triton_gemm=false'  # matmuls to cuBLAS only
GPU_ROWS = (
    ('1b, 8 x 2048, remat dots', '1b', 8, 2048, 'auto', 'dots_with_no_batch_dims', 'pretrain', 0, ''),
    ('1b, 8 x 2048, no remat', '1b', 8, 2048, 'auto', 'none', 'pretrain', 0, ''),
    ('1b, 8 x 2048, no remat, cuBLAS only', '1b', 8, 2048, 'auto', 'none', 'pretrain', 0, NO_TRITON_GEMM),
    ('1b, 2 x 8192, no remat', '1b', 2, 8192, 'auto', 'none', 'pretrain', 0, ''),
    ('8b LoRA r16 SFT, 4 x 2048, remat dots', '8b', 4, 2048, 'auto', 'dots_with_no_batch_dims', 'sft', 16, ''),
    ('8b QLoRA (NF4 base) r16 SFT, 4 x 2048, remat dots', '8b', 4, 2048, 'auto', 'dots_with_no_batch_dims', 'sft',
     (16, 'nf4'), ''),
)


def part_jax(gpu: bool, steps: int, attention: str = 'einsum', row: int = 0) -> dict:
  if gpu:
    from configs.base import MODEL_PRESETS  # pylint: disable=import-outside-toplevel
    _, preset, batch, seq, impl, remat, stage, rank, _ = GPU_ROWS[row]
    rank, quantize_base = rank if isinstance(rank, tuple) else (rank, '')
    fields = dict(MODEL_PRESETS[preset], scan_layers=True, remat=remat, attention_impl=impl)
    return _jax_step_time(fields, batch, seq, steps, 'bfloat16', stage, rank, quantize_base)
  return _jax_step_time(dict(REFERENCE, attention_impl=attention), REF_BATCH, REF_SEQ, steps)


def torch_step():
  """(step, loss_fn, inputs, targets): the reference model's PyTorch train step and
  the same token batch as the JAX side."""
  import torch  # pylint: disable=import-outside-toplevel
  from experiments.benchmarks.torch_reference import Decoder, make_train_step  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  r = REFERENCE
  model = Decoder(r['vocab_size'], r['d_model'], r['n_layers'], r['n_heads'], r['n_kv_heads'], r['d_ff'])
  step, loss_fn = make_train_step(model)
  toks = torch.from_numpy(_tokens(REF_BATCH, REF_SEQ, r['vocab_size']).astype(np.int64))
  return step, loss_fn, toks[:, :-1], toks[:, 1:]


def part_torch(compiled: bool, steps: int) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from research.models.llama import Config, flops_per_token  # pylint: disable=import-outside-toplevel
  r = REFERENCE
  step, loss_fn, inputs, targets = torch_step()
  compiled_loss = None
  t0 = time.perf_counter()
  if compiled:
    compiled_loss = torch.compile(loss_fn)
  for _ in range(2):
    step(inputs, targets, compiled_loss)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    step(inputs, targets, compiled_loss)
  sec = (time.perf_counter() - t0) / steps
  fpt = flops_per_token(Config(**r), REF_SEQ)
  return {'compile_s': compile_s, 'step_s': sec, 'tokens_per_s': REF_BATCH * REF_SEQ / sec,
          'model_flops_per_s': fpt * REF_BATCH * REF_SEQ / sec, 'peak_mem_mb': _rss_mb(),
          'mem_kind': 'rss'}


def part_pipeline(batches: int) -> dict:
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  from research.data import pipeline  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config('size=tiny')
  tok = pipeline.get_tokenizer(c.data, c.model.vocab_size)
  ds = pipeline.packed_dataset(pipeline.open_source(c.data, 'train'), tok, seq_len=c.seq_len,
                               batch_size=c.batch_size, seed=0)
  it = iter(ds)
  next(it)  # fills the shuffle window
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  sec = time.perf_counter() - t0
  return {'tokens_per_s': batches * c.batch_size * c.seq_len / sec}


def part_loop(steps: int) -> dict:
  """Tiny preset: the bare jitted step against the full `train()` loop."""
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  from configs.base import MODEL_PRESETS  # pylint: disable=import-outside-toplevel
  from research.training.metrics import read_metrics  # pylint: disable=import-outside-toplevel
  from research.stages import pretrain as pretrain_stage  # pylint: disable=import-outside-toplevel
  from research.training.loop import train  # pylint: disable=import-outside-toplevel
  c0 = pretrain.get_config('size=tiny')
  bare = _jax_step_time(MODEL_PRESETS['tiny'], c0.batch_size, c0.seq_len, steps)
  c = pretrain.get_config('size=tiny')
  log_every = 10
  c.update(steps=steps + 2 * log_every, log_every=log_every, eval_every=10 ** 6,
           checkpoint_every=10 ** 6, eval_batches=1)
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.sample.prompts = ()
  workdir = tempfile.mkdtemp()
  import jax  # pylint: disable=import-outside-toplevel
  train(c, workdir, pretrain_stage.stage(c), devices=jax.devices()[:1])
  rows = [r for r in read_metrics(workdir) if 'train/tokens_per_sec' in r]
  # Skip the first interval (compilation); the last one includes the final checkpoint.
  loop_tps = float(np.mean([r['train/tokens_per_sec'] for r in rows[1:-1]]))
  return {'bare_tokens_per_s': bare['tokens_per_s'], 'loop_tokens_per_s': loop_tps}


def _run_part(name: str, *args: str, xla_flags: str = '', huge_pages: str = 'auto') -> dict:
  """One part in its own process. huge_pages: the project's entry points' setting
  (research/training/host_memory.py; 'auto': on when JAX runs on the CPU), 'on' or
  'off' (as a plain `python` process starts: PyTorch as it ships)."""
  cmd = [sys.executable, '-m', 'experiments.benchmarks.train_step', f'--part={name}', *args]
  env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {xla_flags}'.strip())
  env = host_memory.huge_pages_env(dict(env, RESEARCH_HUGE_PAGES=huge_pages)) or env
  out = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if out.returncode:
    raise SystemExit(f'part {name} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--part', default='')
  parser.add_argument('--gpu', action='store_true')
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--attention', default='einsum', help='einsum | xla | cudnn | auto (CPU row)')
  parser.add_argument('--row', type=int, default=-1, help='--gpu: run only this row of GPU_ROWS')
  parser.add_argument('--isa', default='', choices=('', *ISA_ENV), help='restrict both sides to this ISA')
  args = parser.parse_args()
  if args.part:
    fn = {'peak': lambda: part_peak(args.gpu),
          'jax': lambda: part_jax(args.gpu, args.steps, args.attention, args.row),
          'torch_eager': lambda: part_torch(False, args.steps),
          'torch_compile': lambda: part_torch(True, args.steps),
          'pipeline': lambda: part_pipeline(200), 'loop': lambda: part_loop(40)}[args.part]
    print(json.dumps(fn()))
    return

  if args.isa:  # the parts (subprocesses) inherit it
    for k, v in ISA_ENV[args.isa].items():
      os.environ[k] = f'{os.environ.get(k, "")} {v}'.strip() if k == 'XLA_FLAGS' else v
  if not args.gpu:
    print(machine_header(args.isa), flush=True)
  flag = ['--gpu'] if args.gpu else []
  steps = [f'--steps={args.steps}']
  peak = _run_part('peak', *flag)
  if args.gpu:  # one process per row: each row's peak memory is its own
    rows = {}
    for i, row in enumerate(GPU_ROWS):
      if args.row in (-1, i):
        try:
          rows[row[0]] = _run_part('jax', *flag, *steps, f'--row={i}', xla_flags=row[-1])
          print(row[0], json.dumps(rows[row[0]]), flush=True)
        except SystemExit as e:
          print(f'({row[0]} failed: {str(e).splitlines()[-1][:300]})', flush=True)
  else:
    rows = {'jax (this project)': _run_part('jax', *flag, *steps)}
    rows['pytorch eager'] = _run_part('torch_eager', *steps, huge_pages='off')
    rows['pytorch compile'] = _run_part('torch_compile', *steps, huge_pages='off')
    # PyTorch gains from huge pages too: shown, so the ratio can be read both ways.
    rows['pytorch eager, huge pages'] = _run_part('torch_eager', *steps, huge_pages='on')
  what = 'bf16 compute, float32 parameters and AdamW, attention auto (cuDNN)' if args.gpu else (
      f'd256 L4 H4 V8000, batch {REF_BATCH} x {REF_SEQ}, float32, AdamW')
  print(f'\ntrain step: {what}; peak {peak["dtype"]} matmul {peak["peak_flops"] / 1e9:.1f} GFLOP/s')
  print('| implementation | compile (s) | step (ms) | tokens/s | MFU | peak mem (MB) | vs pytorch eager |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  eager = rows.get('pytorch eager', {}).get('tokens_per_s')
  for name, r in rows.items():
    ratio = f'{r["tokens_per_s"] / eager:.2f}' if eager else '-'
    print(f'| {name} | {r["compile_s"]:.1f} | {1000 * r["step_s"]:.0f} | {r["tokens_per_s"]:,.0f} | '
          f'{100 * r["model_flops_per_s"] / peak["peak_flops"]:.1f}% | {r["peak_mem_mb"]:.0f} '
          f'({r["mem_kind"]}) | {ratio} |')
  if args.gpu:
    return
  pipe = _run_part('pipeline')
  loop = _run_part('loop')
  print(f'\ninput pipeline: {pipe["tokens_per_s"]:,.0f} tokens/s = '
        f'{pipe["tokens_per_s"] / loop["bare_tokens_per_s"]:.1f}x what the tiny train step consumes '
        f'({loop["bare_tokens_per_s"]:,.0f} tokens/s)')
  overhead = loop['bare_tokens_per_s'] / loop['loop_tokens_per_s'] - 1
  print(f'training loop (tiny): bare jitted step {loop["bare_tokens_per_s"]:,.0f} tokens/s, '
        f'train() loop {loop["loop_tokens_per_s"]:,.0f} tokens/s: loop overhead {100 * overhead:+.1f}%')
  print(f'ratio vs pytorch compile: {rows["jax (this project)"]["tokens_per_s"] / rows["pytorch compile"]["tokens_per_s"]:.2f}')
  jax_tps = rows['jax (this project)']['tokens_per_s']
  print(f'ratio vs pytorch eager: {jax_tps / eager:.2f} '
        f'(vs eager with huge pages: {jax_tps / rows["pytorch eager, huge pages"]["tokens_per_s"]:.2f})')


if __name__ == '__main__':
  main()
