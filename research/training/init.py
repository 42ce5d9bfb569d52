"""Where parameters come from: the seed, `init_from` (a run's workdir or
hf:<dir>), a checkpoint to resume, the frozen trees, and a finished run.

    config = resolve_config(config)                     # init_from=hf:<dir> sets the architecture
    state, frozen, data_state = setup_state(trainer, ckpt)
    run = load_params('runs/sft')                       # config, model, params, tokenizer

Everything is created already sharded: abstract shapes -> shardings ->
jit(init, out_shardings), or orbax restoring onto those shardings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from research import lora, models
from research.data import pipeline
from research.data import tokenizer as tokenizer_lib
from research.errors import UserError
from research.models import quant
from research.training import checkpoint as ckpt_lib
from research.training import checkpoint_meta
from research.training import sharding
from research.training.state import TrainState, no_skips
from research.training.step import BASE
from research.training.validate import build_model

HF_PREFIX = 'hf:'
# Model fields an hf:<dir> checkpoint does not decide: numerics, memory and the head.
_KEEP_ON_HF = ('dtype', 'param_dtype', 'remat', 'scan_layers', 'init_std', 'head', 'value_head',
               'attention_impl', 'logits_chunk')


def resolve_config(config):
  """The config to run: for init_from=hf:<dir>, a copy whose config.model takes
  its family and architecture from the checkpoint's config.json (the fields in
  _KEEP_ON_HF stay as configured); otherwise `config` itself. `config` is never
  changed. Call it once, before building the stage (research/main.py does)."""
  if not config.init_from.startswith(HF_PREFIX):
    return config
  from research.interop import hf  # pylint: disable=import-outside-toplevel
  arch = hf.model_config_from_hf(hf.read_config(config.init_from[len(HF_PREFIX):]))
  fields = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch)}
  fields.update({k: config.model[k] for k in _KEEP_ON_HF if k in config.model})
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.model = ml_collections.ConfigDict({'family': arch.family, **fields})
  return resolved


def load_tokenizer(config, workdir: str, resuming: bool):
  """The run's tokenizer: its own copy when resuming, else init_from's, or the
  configured one (trained on the corpus when none is given).

  A copy left in the workdir by a start that failed before its first checkpoint
  is ignored: only a resumed run reads its own. When resuming, the copy must
  still equal init_from's, or the vocabulary would mean something else.
  """
  own = tokenizer_lib.saved_tokenizer(workdir)
  origin = (tokenizer_lib.saved_tokenizer(config.init_from)
            if config.init_from and not config.init_from.startswith(HF_PREFIX) else '')
  if resuming and own:
    tok = tokenizer_lib.load_tokenizer(own)
    if origin and tokenizer_lib.load_tokenizer(origin).identity != tok.identity:
      raise UserError(f'{own} differs from init_from\'s {origin}: that run changed after this one started. '
                      'Resume needs the same tokenizer; use a new workdir to start from the changed run.')
  elif config.init_from.startswith(HF_PREFIX) and not config.data.tokenizer:
    from research.interop import hf  # pylint: disable=import-outside-toplevel
    tok = hf.load_tokenizer(config.init_from[len(HF_PREFIX):])
  elif origin:
    tok = tokenizer_lib.load_tokenizer(origin)
  else:
    tok = pipeline.get_tokenizer(config.data, config.model.vocab_size)
  if tok.vocab_size > config.model.vocab_size:
    raise UserError(f'the tokenizer {tok.path} has {tok.vocab_size} tokens but '
                    f'config.model.vocab_size={config.model.vocab_size}; set model.vocab_size to at '
                    'least the tokenizer size, or use a matching tokenizer.')
  return tok


def save_tokenizer(tok, workdir: str) -> None:
  """Writes the run's copy of its tokenizer atomically (process 0), once the run
  has set up, so that a failed start leaves none behind."""
  if jax.process_index() == 0:
    tok.save_to(workdir)


def _overlay(tree, base):
  """`tree` with every leaf that `base` holds replaced by base's."""
  if not isinstance(tree, dict):
    return base
  return {k: _overlay(v, base[k]) if k in base else v for k, v in tree.items()}


def _seeded(layout: sharding.ParamLayout, seq_len: int):
  """(rng, base) -> the full parameter tree: the seed's init, overlaid by `base`."""
  return lambda rng, base: _overlay(nn.meta.unbox(layout.init_boxed(rng, seq_len)), base)


def seed_params(layout: sharding.ParamLayout, seed: int, seq_len: int, base=None):
  """The full parameter tree a seed initialises (overlaid by `base` where given), sharded."""
  with sharding.MeshContext(layout.mesh, layout.rules):
    return jax.jit(_seeded(layout, seq_len), out_shardings=layout.shardings,
                   donate_argnums=(1,))(jax.random.PRNGKey(seed), base or {})


def init_state(trainer, base=None) -> tuple[TrainState, Any]:
  """(fresh state, frozen LoRA base or {}), created already sharded.

  `base`, loaded weights (the full tree, or with LoRA the frozen base; either
  may lack a new head), replaces the random values it covers: jit drops their
  random init, and base's buffers are donated, so there is one copy at peak.
  """
  seed, layout = trainer.config.seed, trainer.layout
  seeded = _seeded(layout, trainer.config.seq_len)

  def init(rng, base):
    trainable, frozen = layout.split(seeded(rng, base))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=trainer.tx.init(trainable),
                       rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1), skipped=no_skips())
    return state, frozen

  base_shardings = jax.tree.map(lambda a: a.sharding, layout.base)
  with trainer.mesh_context():
    return jax.jit(init, out_shardings=(trainer.state_shardings, base_shardings),
                   donate_argnums=(1,))(jax.random.PRNGKey(seed), base or {})


def load_init_from(config, layout: sharding.ParamLayout, step: int | None = None):
  """The weights of config.init_from (a run's workdir, or hf:<dir>), placed
  sharded: the full tree, or with LoRA the frozen base. A new head (a reward
  model's `score`) may be missing from them; the seed initialises it."""
  src = config.init_from
  if src.startswith(HF_PREFIX):
    from research.interop import hf  # pylint: disable=import-outside-toplevel
    cfg = layout.model.cfg
    _, params = hf.load_pretrained(
        src[len(HF_PREFIX):], dtype=cfg.param_dtype, compute_dtype=cfg.dtype, mesh=layout.mesh,
        rules=layout.rules, remat=cfg.remat, scan_layers=cfg.scan_layers, head=cfg.head,
        value_head=cfg.value_head)
    return layout.split(params)[1] if layout.uses_lora else params
  return ckpt_lib.restore_params(src, layout.base if layout.uses_lora else layout.trainable,
                                 optional=models.NEW_HEADS,
                                 step=config.get('init_step', 0) if step is None else step)[0]


@jax.jit
def _copy(tree):
  """A copy in new buffers (same shardings), safe to keep when the original is donated
  (the train step donates the state, so a frozen copy must not share its buffers)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


INIT_RECORD = 'init_from.json'


def pinned_init_step(config, workdir: str, resuming: bool) -> int:
  """The checkpoint step of init_from (a run's workdir) this run starts from: on
  resume, the one recorded at its start (init_from may have trained on since:
  its latest checkpoint would silently change a LoRA base or a DPO reference);
  else init_step, or init_from's latest. 0 without a workdir init_from."""
  if not config.init_from or config.init_from.startswith(HF_PREFIX):
    return 0
  record = os.path.join(workdir, INIT_RECORD)
  if resuming and os.path.exists(record):
    with open(record) as f:
      return int(json.load(f)['step'])
  return int(config.get('init_step', 0)) or (checkpoint_meta.latest_saved_step(config.init_from) or 0)


def record_init_step(config, workdir: str, step: int) -> None:
  """Writes workdir/init_from.json: which checkpoint of init_from the run started from."""
  if step and jax.process_index() == 0:
    with open(os.path.join(workdir, INIT_RECORD), 'w') as f:
      json.dump({'init_from': config.init_from, 'step': step}, f)


def _initial_params(trainer, init_step: int | None = None):
  """What a fresh run starts from, init_from's weights or the seed's: the frozen
  base with LoRA, else the full tree."""
  if trainer.config.init_from:
    return load_init_from(trainer.config, trainer.layout, init_step)
  trainable, base = trainer.layout.split(seed_params(trainer.layout, trainer.config.seed, trainer.config.seq_len))
  return base if trainer.uses_lora else trainable  # the seed's values, without an optimizer state


def setup_state(trainer, ckpt, init_step: int | None = None) -> tuple[TrainState, dict, dict | None]:
  """(state, frozen trees by name, data iterator state or None): resumed from
  the latest checkpoint of `ckpt` that restores (config.checkpoint_fallback:
  see Checkpointer.restore_latest), else fresh, warm-started from init_from
  when set. See Trainer for what `frozen` holds."""
  restored = (ckpt.restore_latest(trainer.abstract_state, fallback=trainer.config.get('checkpoint_fallback', True))
              if ckpt is not None else None)
  if restored is not None:
    state, data_state = restored
    # Frozen trees are not in the checkpoint: rebuild them exactly.
    initial = _initial_params(trainer, init_step) if trainer.held_frozen else {}
    initial = trainer.frozen_base(initial) if trainer.uses_lora else initial
    return state, {name: initial for name in trainer.held_frozen}, data_state
  state, base = init_state(trainer, load_init_from(trainer.config, trainer.layout, init_step)
                           if trainer.config.init_from else None)
  if trainer.uses_lora:
    return state, {BASE: trainer.frozen_base(base)}, None
  copied = _copy(state.params) if trainer.held_frozen else {}
  return state, {name: copied for name in trainer.held_frozen}, None


@dataclasses.dataclass
class LoadedRun:
  """A finished run's parameters on one device, for export, scoring and evaluation."""

  config: Any
  model: Any
  params: Any  # the full tree (LoRA base and adapters combined)
  tokenizer: Any  # data.tokenizer.Tokenizer or HFTokenizer; None if the run never set up
  layout: sharding.ParamLayout
  init_step: int | None = None  # the checkpoint of init_from the run started from

  def initial_params(self):
    """The parameters the run started from, DPO's frozen reference: init_from's
    (or the seed's); with LoRA the base with adapters off."""
    if self.layout.uses_lora:
      return lora.reference_params(*self.layout.split(self.params))
    if self.config.init_from:
      return load_init_from(self.config, self.layout, self.init_step)
    return seed_params(self.layout, self.config.seed, self.config.seq_len)


def load_params(workdir: str, mesh: jax.sharding.Mesh | None = None, *, run_mesh: bool = False) -> LoadedRun:
  """The latest checkpoint's parameters of the run in `workdir` (no optimizer state
  is read), on one device, or sharded by the run's sharding rules over `mesh`, or
  with run_mesh over the run's own config.mesh on all devices."""
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{workdir} has no config.json; point at a training run\'s workdir.')
  with open(cfg_path) as f:
    saved = json.load(f)
  # Runs written before LoRA moved to config.lora alone also hold lora_* copies in
  # config.model; config.lora has the same values.
  saved['model'] = {k: v for k, v in saved['model'].items() if not k.startswith('lora_')}
  config = ml_collections.ConfigDict(saved)
  model = build_model(config)
  if run_mesh:
    mesh = sharding.make_mesh(config.mesh)
  mesh = mesh or sharding.make_mesh({'data': 1}, jax.devices()[:1])
  layout = sharding.param_layout(model, mesh, sharding.rules_from_config(config.sharding_rules),
                                 uses_lora=model.lora is not None, seq_len=config.seq_len)
  trainable, _ = ckpt_lib.restore_params(workdir, layout.trainable, role='workdir')
  init_step = pinned_init_step(config, workdir, resuming=True)
  params = trainable
  if layout.uses_lora:  # the base is not in the run's checkpoints: rebuild it as training did
    base = (load_init_from(config, layout, init_step) if config.init_from
            else layout.split(seed_params(layout, config.seed, config.seq_len))[1])
    if kind := lora.quantize_kind(config.lora):  # QLoRA: the weights training saw, dequantized
      base = quant.dequantize_tree(quant.quantize_tree(base, kind))
    params = lora.combine(base, trainable)
  tok_path = tokenizer_lib.saved_tokenizer(workdir)
  tokenizer = tokenizer_lib.load_tokenizer(tok_path) if tok_path else None
  return LoadedRun(config, model, params, tokenizer, layout, init_step)
