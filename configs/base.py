"""Shared config pieces: defaults every stage has, model presets, arg parsing.

A stage file (pretrain.py, ...) calls `base_config(stage, size)` and edits it.
Every field can be overridden on the command line, e.g.
`--config.optimizer.lr=1e-3`; `lock_config=True` makes a misspelled key fail.
"""

from __future__ import annotations

import dataclasses

import ml_collections

# Model presets. Shapes for 7b/8b are Llama-2-7B and Llama-3-8B.
MODEL_PRESETS = {
    # The CPU demo: trains in minutes on 2 cores.
    'tiny': dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
                 tie_embeddings=True),
    # Test-sized: the smallest model that still exercises GQA.
    'test': dict(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
    'small': dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                  d_ff=2560, tie_embeddings=True),
    '1b': dict(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
               rope_theta=500000.0),
    '7b': dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008),
    '8b': dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, logits_chunk=1024,
               rope_theta=500000.0),
    # Gemma (family 'gemma', set by the preset): the published shapes.
    'gemma2-2b': dict(family='gemma', version=2, vocab_size=256000, d_model=2304, n_layers=26, n_heads=8,
                      n_kv_heads=4, head_dim=256, d_ff=9216, query_pre_attn_scalar=256.0, sliding_window=4096,
                      logits_chunk=1024),
    'gemma2-9b': dict(family='gemma', version=2, vocab_size=256000, d_model=3584, n_layers=42, n_heads=16,
                      n_kv_heads=8, head_dim=256, d_ff=14336, query_pre_attn_scalar=256.0, sliding_window=4096,
                      logits_chunk=1024),
    'gemma3-1b': dict(family='gemma', version=3, vocab_size=262144, d_model=1152, n_layers=26, n_heads=4,
                      n_kv_heads=1, head_dim=256, d_ff=6912, query_pre_attn_scalar=256.0, sliding_window=512,
                      sliding_pattern=6, rope_theta=1_000_000.0, attn_softcap=0.0, final_softcap=0.0,
                      logits_chunk=1024),
    # Mixtral 8x7B (family 'mixtral'), with GShard capacity dispatch (1.25) rather than
    # dropless, which would compute all 8 experts per token (init_from=hf: routes dropless).
    'mixtral-8x7b': dict(family='mixtral', vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         d_ff=14336, n_experts=8, experts_per_token=2, capacity_factor=1.25, rope_theta=1e6),
    # Qwen3-30B-A3B (family 'qwen3_moe'): 128 experts, 8 active; capacity dispatch (1.25).
    'qwen3-30b-a3b': dict(family='qwen3_moe', vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4,
                          head_dim=128, d_ff=768, n_experts=128, experts_per_token=8, capacity_factor=1.25,
                          rope_theta=1e6, logits_chunk=1024),
    'gemma3-4b': dict(family='gemma', version=3, vocab_size=262208, d_model=2560, n_layers=34, n_heads=8,
                      n_kv_heads=4, head_dim=256, d_ff=10240, query_pre_attn_scalar=256.0, sliding_window=1024,
                      sliding_pattern=6, rope_theta=1_000_000.0, rope_linear_factor=8.0, attn_softcap=0.0,
                      final_softcap=0.0, logits_chunk=1024),
}

# Per-preset run shape: (batch_size, seq_len, steps, optimizer lr).
RUN_PRESETS = {
    'tiny': (16, 256, 1000, 3e-3),
    'test': (8, 32, 20, 3e-3),
    'small': (256, 1024, 100_000, 6e-4),
    '1b': (256, 2048, 100_000, 3e-4),
    '7b': (1024, 4096, 250_000, 3e-4),
    '8b': (1024, 8192, 250_000, 3e-4),
    'gemma2-2b': (512, 4096, 100_000, 3e-4),
    'gemma2-9b': (1024, 4096, 250_000, 3e-4),
    'gemma3-1b': (512, 4096, 100_000, 3e-4),
    'gemma3-4b': (1024, 4096, 250_000, 3e-4),
    'mixtral-8x7b': (1024, 4096, 250_000, 3e-4),
    'qwen3-30b-a3b': (1024, 4096, 250_000, 3e-4),
}
ACCELERATOR_SIZES = ('small', '1b', '7b', '8b', 'gemma2-2b', 'gemma2-9b', 'gemma3-1b', 'gemma3-4b',
                     'mixtral-8x7b', 'qwen3-30b-a3b')  # bfloat16
LARGE_SIZES = ACCELERATOR_SIZES[1:]  # scanned layers, full remat

# Logical axis -> mesh axes. Order is priority: flax assigns a mesh axis to the
# first matching rule whose mesh axes are still free in that array, so `batch`
# comes first (activations then keep `embed` unsharded) and parameters, which
# have no batch axis, get `embed` sharded over fsdp.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp', 'expert')),
    # A Mixture of Experts: its weights split over `expert`; the tokens inside the
    # layer keep to the other data axes (research/models/moe.py).
    ('expert', 'expert'),
    ('expert_batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
    ('embed', 'fsdp'),
    ('length', None),
    ('head_dim', None),
    ('norm', None),
    ('layers', None),
    ('lora', None),
)


def parse_arg(arg: str | None, **defaults) -> dict:
  """Parses 'size=tiny,foo=bar' into a dict, starting from `defaults`."""
  out = dict(defaults)
  for part in filter(None, (arg or '').split(',')):
    if '=' not in part:
      raise ValueError(f"config argument {part!r} is not key=value (e.g. 'size=tiny')")
    key, value = part.split('=', 1)
    if key not in out:
      raise ValueError(f'unknown config argument {key!r}; known: {sorted(out)}')
    out[key] = value
  return out


def model_config(size: str, family: str = 'llama') -> ml_collections.ConfigDict:
  """Model section for a preset: `family` and every field of that family's Config
  (research/models), the preset's shape on top of the family's defaults."""
  if size not in MODEL_PRESETS:
    raise ValueError(f'unknown size {size!r}; choose one of {sorted(MODEL_PRESETS)}')
  from research import models  # pylint: disable=import-outside-toplevel
  preset = dict(MODEL_PRESETS[size])
  family = preset.pop('family', family)  # a Gemma preset is of the gemma family whatever `family` says
  fields = {f.name: f.default for f in dataclasses.fields(models.family(family).Config)}
  fields.update(preset)
  return ml_collections.ConfigDict({'family': family, **fields})


def apply_mode(c: ml_collections.ConfigDict, mode: str, *, tiny: dict, large: dict) -> None:
  """mode=full leaves `c` as it is; mode=lora turns on LoRA with the preset for
  the size (`tiny` for size=tiny, else `large`): dicts of rank, alpha, lr and
  optionally targets (the optimizer's learning rate changes with LoRA).

  mode=qlora is QLoRA's recipe (Dettmers et al., 2023): the frozen base in NF4
  and adapters on every linear layer of the blocks (`all_linear`, which the
  paper finds necessary to match 16-bit LoRA), with the preset's optional
  'qlora' dict overriding its other fields (e.g. a higher rank)."""
  if mode == 'full':
    return
  if mode not in ('lora', 'qlora'):
    raise ValueError(f'mode={mode!r}; choose full, lora or qlora')
  preset = dict(tiny if c.size == 'tiny' else large)
  if mode == 'qlora':
    preset.update(targets='all_linear', **preset.pop('qlora', {}))
    c.lora.quantize_base = 'nf4'
  c.lora.rank, c.lora.alpha = preset['rank'], preset['alpha']
  c.lora.targets = preset.get('targets', c.lora.targets)
  c.optimizer.lr = preset['lr']


def task_eval_config() -> ml_collections.ConfigDict:
  """Greedy exact match on the held-out generated tasks (sft_tasks validation)."""
  return ml_collections.ConfigDict(dict(exact_match=True, examples=0,  # 0 = all 300
                                        max_new_tokens=24))


def use_preference_data(c: ml_collections.ConfigDict) -> None:
  """The embedded preference pairs (DPO, reward models): generated tasks and stdlib
  code, as raw JSON rows."""
  c.data.name = 'pref_tasks+pref_code'
  c.data.text_key = ''
  c.data.mix_weights = (0.8, 0.2)


def base_config(stage: str, size: str, family: str = 'llama') -> ml_collections.ConfigDict:
  """The keys every stage has, sized for `size`, with a model of `family`."""
  batch_size, seq_len, steps, lr = RUN_PRESETS[size] if size in RUN_PRESETS else RUN_PRESETS['tiny']
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.size = size
  c.seed = 0
  c.steps = steps
  c.batch_size = batch_size  # global, in sequences
  c.seq_len = seq_len
  c.log_every = 10
  c.eval_every = 200
  c.eval_batches = 4
  c.checkpoint_every = 200
  c.keep_checkpoints = 2  # the newest N; 0 keeps every checkpoint
  c.checkpoint_fallback = True  # resume from the previous checkpoint if the newest is damaged
  c.allow_changes = ''  # fields a resume may change anyway, e.g. 'optimizer.lr' (research/training/resume.py)
  c.init_from = ''  # another run's workdir: warm-start its parameters
  c.init_step = 0   # ... from this checkpoint of it (0: the latest)
  c.dry_run = False

  c.model = model_config(size, family)
  if size in ACCELERATOR_SIZES:
    c.model.dtype = 'bfloat16'  # compute; parameters and optimizer state stay float32
  if size in LARGE_SIZES:
    c.model.scan_layers = True  # compile one layer, not 32
    c.model.remat = 'full'

  c.optimizer = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=min(100, max(1, steps // 10)), decay='cosine',  # cosine | linear | constant
      min_lr_ratio=0.1, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0,
      grad_accum_steps=1,
      max_skipped_steps=10,  # stop after this many non-finite steps in a row (each one skipped)
      head_lr_scale=1.0))  # learning-rate multiplier of new heads (reward score, PPO value)

  # Mesh axis sizes; one may be -1 to take the remaining devices. `expert` shards a
  # Mixture of Experts' experts (and, outside those layers, the batch).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.sharding_rules = DEFAULT_RULES

  c.data = ml_collections.ConfigDict(dict(
      name='stdlib',   # 'stdlib' (embedded), 'files', or a prepared TFDS name such as 'c4/en:3.1.0'
      files='',        # for name='files': comma-separated globs of .txt / .jsonl files
      text_key='text',  # field holding the text in .jsonl files and TFDS examples
      train_split='train',
      eval_split='validation',
      data_dir='',     # TFDS data dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
      tokenizer='',    # SentencePiece .model; '' = train one on the corpus (cached in data_dir)
      add_bos=True,
      add_eos=True,
      shuffle_window=1024,  # packed rows shuffled in windows of this many rows
      mix_weights=(),       # for data.name='a+b': sampling weights of the datasets
      # Per-host input: the global batch is this many independent streams, and each
      # process builds only its own (a multiple of the process count; divides
      # batch_size). The data order depends on it, not on the process count.
      # 1: one stream that every process builds whole, keeping its rows.
      streams=1,
  ))

  # LoRA: rank 0 = off. targets: a preset (attention | attention_up_down | all_linear) or a regex
  # fully matching parameter paths such as 'layers_0/attn/q/kernel'.
  # quantize_base: '' | nf4 | int8 keeps the frozen base quantized (QLoRA; adapters stay float32).
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets='attention',
                                          rslora=False, quantize_base=''))

  # Metrics always go to metrics.jsonl and TensorBoard (workdir/tensorboard); with a
  # wandb_project also to Weights & Biases (`pip install wandb`; wandb_mode='offline'
  # writes workdir/wandb without network, `wandb sync` uploads it later).
  c.logging = ml_collections.ConfigDict(dict(wandb_project='', wandb_entity='', wandb_name='', wandb_mode=''))

  c.sample = ml_collections.ConfigDict(dict(
      prompts=('def ', 'import ', 'class '), max_new_tokens=48, temperature=0.8, top_k=0,
      top_p=0.95))
  return c


def online_rl_config(stage: str, args: dict, section: dict) -> ml_collections.ConfigDict:
  """The shape the online-RL configs (grpo, ppo) share: prompts from the embedded
  tasks, config.<stage> = `section`, greedy exact match on the held-out tasks,
  run sizes for the preset (tiny: 64 replies of at most 24 tokens after 40 prompt
  tokens), and the mode (full or LoRA)."""
  c = base_config(stage, args['size'], args['family'])
  c.data.name, c.data.text_key, c.data.mix_weights = 'sft_tasks', '', ()
  c[stage] = ml_collections.ConfigDict(section)
  c.task_eval = task_eval_config()
  c.sample.prompts = ('What is 12 + 30?', 'Reverse the letters: c o d e')
  c.sample.temperature = 0.0
  c.optimizer.weight_decay = 0.0
  if args['size'] in ('tiny', 'test'):
    c.seq_len, c.batch_size = 64, 64
    c.steps, c.eval_every, c.checkpoint_every, c.log_every = 100, 50, 50, 5
    c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.decay = 1e-5, 5, 'constant'
  else:
    c.seq_len, c.batch_size = 2048, 512
    c[stage].max_new_tokens = 1024
    c.steps = 500
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-6, 20
  apply_mode(c, args['mode'], tiny=dict(rank=8, alpha=16.0, lr=2e-4), large=dict(rank=16, alpha=32.0, lr=1e-5))
  return c
