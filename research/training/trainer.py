"""The one training loop every stage shares.

    setup:  mesh + rules -> model, optimizer -> sharded init (eval_shape ->
            shardings -> jit(init, out_shardings)) or restore or init_from
    loop:   state, metrics = train_step(state, batch, frozen)    # jit, donated state
            every N steps: log (metrics fetched only then), checkpoint, eval

A stage (research/stages/) supplies the data and the loss; see its package
docstring for the interface.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research import sampling
from research.data import pipeline
from research.data.tokenizer import Tokenizer
from research.errors import UserError
from research.models.llama import NEW_HEADS, ModelConfig, Transformer, count_params, flops_per_token
from research.training import checkpoint as ckpt_lib
from research.training import sharding
from research.training.metrics import MetricWriter
from research.training.optimizer import make_optimizer
from research.training.state import TrainState


def log(msg: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def build_model(config) -> Transformer:
  """The Transformer described by config.model (+ config.lora), validated."""
  from research import lora  # pylint: disable=import-outside-toplevel
  fields = dict(config.model)
  if int(config.lora.rank) > 0:
    fields.update(lora_rank=int(config.lora.rank), lora_alpha=float(config.lora.alpha),
                  lora_dropout=float(config.lora.dropout),
                  lora_targets=lora.resolve_targets(config.lora.targets),
                  lora_rslora=bool(config.lora.rslora))
  try:
    cfg = ModelConfig.from_dict(fields)
  except (TypeError, ValueError) as e:
    raise UserError(f'config.model: {e}') from None
  for field in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff'):
    if getattr(cfg, field) <= 0:
      raise UserError(f'config.model.{field}={getattr(cfg, field)} must be positive.')
  if cfg.n_heads % cfg.n_kv_heads:
    raise UserError(f'config.model.n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads}.')
  if cfg.dh % 2:
    raise UserError(f'config.model head dim {cfg.dh} must be even for rotary embeddings.')
  if cfg.head not in ('lm', 'score'):
    raise UserError(f"config.model.head={cfg.head!r}; choose 'lm' (next-token logits) or 'score' "
                    '(a scalar per position, for reward models).')
  if cfg.attention_impl not in ('einsum', 'xla', 'cudnn'):
    raise UserError(f'config.model.attention_impl={cfg.attention_impl!r}; choose einsum, xla or cudnn.')
  if cfg.remat not in ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims'):
    raise UserError(f'config.model.remat={cfg.remat!r}; choose none, full, dots_saveable or '
                    'dots_with_no_batch_dims.')
  for field in ('dtype', 'param_dtype'):
    if getattr(cfg, field) not in ('float32', 'bfloat16', 'float16'):
      raise UserError(f'config.model.{field}={getattr(cfg, field)!r}; choose float32, bfloat16 or float16.')
  if cfg.lora_rank < 0 or not 0 <= cfg.lora_dropout < 1:
    raise UserError('config.lora: rank must be >= 0 and dropout in [0, 1).')
  return Transformer(cfg)


def validate_run(config, mesh, rules) -> None:
  """Checks the run shape before anything is compiled."""
  for key in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'checkpoint_every'):
    if int(config[key]) <= 0:
      raise UserError(f'config.{key}={config[key]} must be positive.')
  accum = int(config.optimizer.grad_accum_steps)
  if accum <= 0:
    raise UserError(f'config.optimizer.grad_accum_steps={accum} must be positive.')
  shards = sharding.data_parallel_size(mesh, rules)
  if config.batch_size % (shards * accum):
    raise UserError(
        f'config.batch_size={config.batch_size} does not divide over {shards} batch shards '
        f'(mesh data x fsdp) x {accum} grad_accum_steps; make it a multiple of {shards * accum}.')
  if config.batch_size % jax.process_count():
    raise UserError(f'config.batch_size={config.batch_size} does not divide over '
                    f'{jax.process_count()} processes.')
  if shards % jax.process_count():
    raise UserError(f'config.mesh: the batch is split {shards} ways (data x fsdp) over '
                    f'{jax.process_count()} processes; each process must feed its own rows, so make '
                    'data x fsdp a multiple of the process count (keep tensor parallelism within a host).')
  s = config.sample
  if s.temperature < 0 or not 0 < s.top_p <= 1 or not 0 <= s.top_k <= config.model.vocab_size:
    raise UserError(f'config.sample: need temperature >= 0, 0 < top_p <= 1 and 0 <= top_k <= vocab '
                    f'(got {s.temperature}, {s.top_p}, {s.top_k}).')


def _overlay(tree, base):
  """`tree` with every leaf that `base` holds replaced by base's."""
  if not isinstance(tree, dict):
    return base
  return {k: _overlay(v, base[k]) if k in base else v for k, v in tree.items()}


@jax.jit
def _copy(tree):
  """A copy in new buffers (same shardings), safe to keep when the original is donated
  (the train step donates the state, so the reference must not share its buffers)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _with_shardings(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Trainer:
  """Holds the compiled steps, the sharded state and the run's side effects.

  Parameters come in two trees: `state.params`, the trainable ones (all of
  them, or only the LoRA adapters), and `frozen`, the rest (the LoRA base; an
  empty dict otherwise). Only the trainable tree has optimizer state and goes
  into checkpoints; the frozen base is rebuilt from init_from (or the seed).
  """

  def __init__(self, config, workdir: str, stage, devices=None):
    self.config, self.workdir, self.stage = config, workdir, stage
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_from_config(config.sharding_rules)
    validate_run(config, self.mesh, self.rules)
    self.model = build_model(config)
    self.use_lora = self.model.cfg.lora_rank > 0
    self.loss_fn = stage.make_loss(config) if hasattr(stage, 'make_loss') else stage.loss
    # A frozen reference model (DPO): a copy of the initial parameters, except with
    # LoRA, where it is the base with adapters off and needs no copy.
    self.needs_reference = getattr(stage, 'needs_reference', False)
    self.keeps_reference_copy = self.needs_reference and not self.use_lora
    self.tx, self.schedule = make_optimizer(config.optimizer, config.steps)
    self._setup_shardings()

  # ---- shapes and shardings -------------------------------------------------

  def _context(self):
    """Mesh and logical rules active while tracing."""
    return _Context(self.mesh, self.rules)

  def _init_params_boxed(self, rng):
    dummy = jnp.zeros((1, min(8, self.config.seq_len)), jnp.int32)
    return self.model.init(rng, dummy)['params']

  def _split(self, tree):
    """(trainable, frozen) parts of a full parameter-shaped tree."""
    from research import lora  # pylint: disable=import-outside-toplevel
    return lora.split(tree) if self.use_lora else (tree, {})

  def _setup_shardings(self):
    with self._context():
      boxed = jax.eval_shape(self._init_params_boxed, jax.random.PRNGKey(0))
    logical = nn.get_partition_spec(boxed)
    full_shardings = sharding.logical_to_shardings(logical, self.mesh, self.rules)
    full_abstract = nn.meta.unbox(boxed)
    sharding.check_divisible(full_abstract, full_shardings)
    if self.use_lora and not self._split(full_abstract)[0]:
      raise UserError(f'config.lora.targets={self.config.lora.targets!r} matches no parameter; '
                      "use 'attention', 'all_linear' or a regex over paths like 'layers_0/attn/q/kernel'.")
    self.param_shardings, self.frozen_shardings = self._split(full_shardings)
    self.reference_shardings = self.param_shardings if self.keeps_reference_copy else {}
    self.abstract_params, self.abstract_frozen = self._split(full_abstract)
    abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    repl = sharding.replicated(self.mesh)
    opt_shardings = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
                                          transform_non_params=lambda _: repl,
                                          is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    self.state_shardings = TrainState(step=repl, params=self.param_shardings,
                                      opt_state=opt_shardings, rng=repl)
    abstract_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                                opt_state=abstract_opt, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    self.abstract_state = _with_shardings(abstract_state, self.state_shardings)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self.rows = pipeline.process_rows(self.config.batch_size, jax.process_index(), jax.process_count())

  # ---- state ------------------------------------------------------------------

  def init_state(self, base=None) -> tuple[TrainState, Any]:
    """(fresh state, frozen params), created already sharded (no full copy on any host).

    `base`, loaded weights (the full tree, or with LoRA the frozen base; either
    may lack a new head), replaces the random values it covers: jit drops their
    random init, and base's buffers are donated, so there is one copy at peak.
    """
    seed = self.config.seed

    def init(rng, base):
      full = nn.meta.unbox(self._init_params_boxed(rng))
      trainable, frozen = self._split(_overlay(full, base))
      state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                         opt_state=self.tx.init(trainable),
                         rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))
      return state, frozen

    with self._context():
      return jax.jit(init, out_shardings=(self.state_shardings, self.frozen_shardings),
                     donate_argnums=(1,))(jax.random.PRNGKey(seed), base or {})

  def load_init_from(self):
    """Base parameters of init_from (a run's workdir, or hf:<dir>), placed sharded:
    the full tree, or with LoRA the frozen base. A new head (a reward model's
    `score`) may be missing from them; init_state initialises it."""
    src = self.config.init_from
    if src.startswith(HF_PREFIX):
      from research.interop import hf  # pylint: disable=import-outside-toplevel
      _, params = hf.load_pretrained(
          src[len(HF_PREFIX):], dtype=self.model.cfg.param_dtype, compute_dtype=self.model.cfg.dtype,
          mesh=self.mesh, rules=self.rules, remat=self.model.cfg.remat,
          scan_layers=self.model.cfg.scan_layers, head=self.model.cfg.head)
      return self._split(params)[1] if self.use_lora else params
    base_abstract = self.abstract_frozen if self.use_lora else self.abstract_params
    base_shardings = self.frozen_shardings if self.use_lora else self.param_shardings
    return ckpt_lib.restore_params(src, _with_shardings(base_abstract, base_shardings),
                                   optional=NEW_HEADS)[0]

  def setup_state(self, ckpt, with_reference: bool = True) -> tuple[TrainState, Any, Any, dict | None]:
    """(state, frozen, reference, data iterator state or None): resumed from the
    latest checkpoint, else fresh, warm-started from init_from when set.

    `reference` is the frozen copy of the initial parameters for stages that
    need one (DPO without LoRA) and `with_reference`, else {}.
    """
    keep_reference = self.keeps_reference_copy and with_reference
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None:
      state, data_state = ckpt.restore(latest, self.abstract_state)
      # Neither the LoRA base nor the reference is in the checkpoint: rebuild them exactly.
      initial = self._initial_params() if self.use_lora or keep_reference else {}
      frozen = initial if self.use_lora else {}
      reference = initial if keep_reference else {}
      return state, frozen, reference, data_state
    state, frozen = self.init_state(self.load_init_from() if self.config.init_from else None)
    return state, frozen, _copy(state.params) if keep_reference else {}, None

  def _initial_params(self):
    """What a fresh run starts from, init_from's weights or the seed's: the frozen
    base with LoRA, else the full tree."""
    if self.config.init_from:
      return self.load_init_from()
    state, frozen = self.init_state()
    return frozen if self.use_lora else state.params

  def full_params(self, params, frozen):
    """The model's parameter tree from trainable and frozen parts."""
    from research import lora  # pylint: disable=import-outside-toplevel
    return lora.combine(frozen, params)

  def _call_loss(self, params, frozen, reference, batch, rng):
    full = self.full_params(params, frozen)
    if not self.needs_reference:
      return self.loss_fn(self.model, full, batch, rng)
    if not self.keeps_reference_copy:  # LoRA: the same base, adapters zeroed
      reference = self.full_params(jax.tree.map(jnp.zeros_like, params), frozen)
    return self.loss_fn(self.model, full, batch, rng, reference=reference)

  # ---- compiled steps -------------------------------------------------------

  def _loss_and_grads(self, params, frozen, reference, batch, rng):
    def f(p):
      loss, weight, metrics = self._call_loss(p, frozen, reference, batch, rng)
      return loss * weight, (loss, weight, metrics)
    (_, (loss, weight, metrics)), grads_sum = jax.value_and_grad(f, has_aux=True)(params)
    return loss, weight, metrics, grads_sum

  def _train_step(self, state: TrainState, batch, frozen, reference):
    rng, step_rng = jax.random.split(state.rng)
    accum = int(self.config.optimizer.grad_accum_steps)
    if accum == 1:
      loss, weight, metrics, grads_sum = self._loss_and_grads(state.params, frozen, reference, batch,
                                                              step_rng)
      loss_sum = loss * weight
    else:
      # Microbatch a takes rows a, a + accum, ...: each device splits its own rows, no reshuffle.
      micro = jax.tree.map(lambda x: x.reshape((-1, accum) + x.shape[1:]).swapaxes(0, 1), batch)
      micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, *self.batch_sharding.spec))), micro)

      def body(carry, xs):
        g_acc, l_acc, w_acc = carry
        mb, i = xs
        loss, weight, metrics, g = self._loss_and_grads(state.params, frozen, reference, mb,
                                                        jax.random.fold_in(step_rng, i))
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        return (g_acc, l_acc + loss * weight, w_acc + weight), metrics

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads_sum, loss_sum, weight), metrics = jax.lax.scan(
          body, (zeros, jnp.float32(0), jnp.float32(0)), (micro, jnp.arange(accum)))
      metrics = jax.tree.map(jnp.mean, metrics)
    grads = jax.tree.map(lambda g: g / jnp.maximum(weight, 1.0), grads_sum)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {'train/loss': loss_sum / jnp.maximum(weight, 1.0), 'train/grad_norm': optax.tree.norm(grads),
           'train/lr': self.schedule(state.step), 'train/weight': weight}
    out.update({f'train/{k}': v for k, v in metrics.items()})
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, out

  def _eval_step(self, params, frozen, reference, batch):
    loss, weight, metrics = self._call_loss(params, frozen, reference, batch, None)
    out = {'loss_sum': loss * weight, 'weight': weight}
    out.update({k: v * weight for k, v in metrics.items()})
    return out

  @functools.cached_property
  def train_step(self):
    # Every batch leaf is [batch, length]: one sharding serves as a pytree prefix.
    return jax.jit(self._train_step,
                   in_shardings=(self.state_shardings, self.batch_sharding, self.frozen_shardings,
                                 self.reference_shardings),
                   out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

  @functools.cached_property
  def eval_step(self):
    return jax.jit(self._eval_step,
                   in_shardings=(self.param_shardings, self.frozen_shardings, self.reference_shardings,
                                 self.batch_sharding),
                   out_shardings=sharding.replicated(self.mesh))

  # ---- data ---------------------------------------------------------------------

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows of a global numpy batch."""
    local = pipeline.local_rows(batch, self.rows)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, batch[k].shape)
            for k, v in local.items()}

  # ---- evaluation ---------------------------------------------------------------

  def evaluate(self, params, frozen, reference, batches, tokenizer: Tokenizer) -> dict[str, float]:
    """Weighted means over the fixed eval batches (eval/loss, eval/perplexity, ...),
    plus the stage's own task metrics when it defines `evaluate`."""
    totals = None
    with self._context():
      for b in batches:
        out = self.eval_step(params, frozen, reference, self.to_global(b))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    w = max(float(totals.pop('weight')), 1.0)
    result = {'eval/loss': float(totals.pop('loss_sum')) / w}
    result['eval/perplexity'] = math.exp(min(result['eval/loss'], 50.0))
    result.update({f'eval/{k}': float(v) / w for k, v in totals.items()})
    if hasattr(self.stage, 'evaluate'):
      with self._context():
        extra = self.stage.evaluate(self, self.full_params(params, frozen), tokenizer)
      result.update({f'eval/{k}': float(v) for k, v in extra.items()})
    return result

  def samples(self, params, tokenizer: Tokenizer) -> list[str]:
    """Greedy and temperature continuations of config.sample.prompts (through
    the stage's prompt format, e.g. the chat template, when it has one)."""
    s = self.config.sample
    encode = getattr(self.stage, 'prompt_ids', lambda tok, text: tok.encode(text, add_bos=True))
    stops = getattr(self.stage, 'stop_tokens', lambda tok: (tok.eos_id,))(tokenizer)
    prompts = [encode(tokenizer, p) for p in s.prompts]
    lines = []
    with self._context():
      for temp in sorted({0.0, float(s.temperature)}):
        outs = sampling.generate(self.model, params, prompts, max_new_tokens=s.max_new_tokens,
                                 rng=jax.random.PRNGKey(self.config.seed), temperature=temp,
                                 top_k=s.top_k, top_p=s.top_p, stop_tokens=stops,
                                 pad_id=tokenizer.pad_id)
        for p, o in zip(s.prompts, outs):
          lines.append(f'[T={temp:g}] {p!r} -> {tokenizer.decode(o)!r}')
    return lines


class _Context:
  """`with mesh + logical rules` for tracing sharded code."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._mesh_cm = jax.set_mesh(self.mesh)
    self._rules_cm = nn.logical_axis_rules(self.rules)
    self._mesh_cm.__enter__()
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m{seconds % 60:02d}s'


def _eval_summary(ev: dict) -> str:
  parts = [f'eval loss {ev["eval/loss"]:.4f}', f'ppl {ev["eval/perplexity"]:.1f}']
  parts += [f'{k[5:]} {v:.3f}' for k, v in ev.items()
            if k.startswith('eval/') and k not in ('eval/loss', 'eval/perplexity')]
  return ' | '.join(parts)


def write_config(config, workdir: str) -> None:
  """Writes the resolved config atomically as workdir/config.json."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(path + '.tmp', path)


HF_PREFIX = 'hf:'


def apply_hf_architecture(config) -> None:
  """For init_from=hf:<dir>, takes the architecture fields of config.model from
  the checkpoint's config.json (dtype, remat and scan_layers stay as configured)."""
  if not config.init_from.startswith(HF_PREFIX):
    return
  from research.interop import hf  # pylint: disable=import-outside-toplevel
  path = config.init_from[len(HF_PREFIX):]
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'init_from={config.init_from!r}: no config.json in {path}.')
  with open(cfg_path) as f:
    arch = hf.model_config_from_hf(json.load(f))
  keep = ('dtype', 'param_dtype', 'remat', 'scan_layers', 'init_std', 'head')
  with config.unlocked():
    for field in ModelConfig.__dataclass_fields__:
      if field not in keep:
        config.model[field] = getattr(arch, field)


def load_tokenizer(config, workdir: str) -> Tokenizer:
  """The run's tokenizer: its own copy if resuming, init_from's, or the configured one."""
  own = os.path.join(workdir, 'tokenizer.model')
  if os.path.exists(own):
    tok = Tokenizer.load(own)
  elif config.init_from.startswith(HF_PREFIX) and not config.data.tokenizer:
    from research.interop import hf  # pylint: disable=import-outside-toplevel
    tok = hf.load_tokenizer(config.init_from[len(HF_PREFIX):])
  elif config.init_from and os.path.exists(os.path.join(config.init_from, 'tokenizer.model')):
    tok = Tokenizer.load(os.path.join(config.init_from, 'tokenizer.model'))
  else:
    tok = pipeline.get_tokenizer(config.data, config.model.vocab_size)
  if tok.vocab_size > config.model.vocab_size:
    raise UserError(f'the tokenizer {tok.path} has {tok.vocab_size} tokens but '
                    f'config.model.vocab_size={config.model.vocab_size}; set model.vocab_size to at '
                    'least the tokenizer size, or use a matching tokenizer.')
  if jax.process_index() == 0 and not os.path.exists(own):
    tok.save(own + '.tmp')
    os.replace(own + '.tmp', own)
  return tok


def load_run(workdir: str) -> tuple[Trainer, Any, Tokenizer | None]:
  """(trainer, full parameters, tokenizer or None) of a run's latest checkpoint,
  on one device: for export, scoring and evaluation outside training."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from research.stages import get_stage  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{workdir} has no config.json; point at a training run\'s workdir.')
  with open(cfg_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  ckpt = ckpt_lib.Checkpointer(workdir)
  if ckpt.latest_step() is None:
    raise UserError(f'{workdir} has no complete checkpoint.')
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.optimizer.grad_accum_steps = 1
  trainer = Trainer(config, workdir, get_stage(config.stage), devices=jax.devices()[:1])
  state, frozen, _, _ = trainer.setup_state(ckpt, with_reference=False)
  ckpt.close()
  tok_path = os.path.join(workdir, 'tokenizer.model')
  tokenizer = Tokenizer.load(tok_path) if os.path.exists(tok_path) else None
  return trainer, trainer.full_params(state.params, frozen), tokenizer


def train(config, workdir: str, devices=None) -> dict[str, Any]:
  """Runs (or resumes) a training run in `workdir`; returns the last metrics.

  `devices` restricts the mesh to a subset of jax.devices() (tests use it to
  compare meshes in one process).
  """
  from research.stages import get_stage  # pylint: disable=import-outside-toplevel
  stage = get_stage(config.stage)
  apply_hf_architecture(config)
  trainer = Trainer(config, workdir, stage, devices)
  n_params = count_params(trainer.abstract_params)
  log(f'model: {n_params / 1e6:.2f}M parameters | mesh {dict(trainer.mesh.shape)} | '
      f'{jax.device_count()} devices, {jax.process_count()} processes')
  if config.dry_run:
    return dry_run(trainer)

  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(config, workdir)
  write_config(config, workdir)
  train_data = stage.train_dataset(config, tokenizer)
  eval_data = stage.eval_batches(config, tokenizer)
  data_iter = iter(train_data)

  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  writer = MetricWriter(workdir)
  state, frozen, reference, data_state = trainer.setup_state(ckpt)
  start = int(jax.device_get(state.step))
  if data_state is not None:
    data_iter.set_state(data_state)
    writer.truncate_after(start)
    log(f'resumed from {ckpt_lib.checkpoint_dir(workdir)}/{start}')
  elif config.init_from:
    log(f'initialised parameters from {config.init_from}')
  n_train, n_all = count_params(state.params), count_params(state.params) + count_params(frozen)
  log(f'trainable parameters: {n_train:,} of {n_all:,} ({100 * n_train / n_all:.2f}%)')

  last: dict[str, Any] = {}
  if start == 0:
    last = trainer.evaluate(state.params, frozen, reference, eval_data, tokenizer)
    last['train/trainable_params'] = n_train
    writer.write(0, last)
    log(f'step 0 | {_eval_summary(last)}')

  tokens_per_step = config.batch_size * config.seq_len
  t_interval, steps_interval, t_start = time.time(), 0, time.time()
  with trainer._context():  # pylint: disable=protected-access
    for step in range(start + 1, config.steps + 1):
      batch = trainer.to_global(next(data_iter))
      state, metrics = trainer.train_step(state, batch, frozen, reference)
      steps_interval += 1
      if step % config.log_every == 0 or step == config.steps:
        metrics = jax.device_get(metrics)  # the only per-interval host sync
        elapsed = time.time() - t_interval
        metrics['train/tokens_per_sec'] = steps_interval * tokens_per_step / max(elapsed, 1e-9)
        metrics.pop('train/weight', None)
        writer.write(step, metrics)
        eta = (config.steps - step) * elapsed / steps_interval
        log(f'step {step}/{config.steps} | loss {metrics["train/loss"]:.4f} | '
            f'lr {metrics["train/lr"]:.2e} | gnorm {metrics["train/grad_norm"]:.2f} | '
            f'{metrics["train/tokens_per_sec"]:,.0f} tok/s | eta {_fmt_time(eta)}')
        last.update(metrics)
        t_interval, steps_interval = time.time(), 0
      if step % config.checkpoint_every == 0 or step == config.steps:
        ckpt.save(state, data_iter.get_state())
      if step % config.eval_every == 0 or step == config.steps:
        eval_start = time.time()
        ev = trainer.evaluate(state.params, frozen, reference, eval_data, tokenizer)
        writer.write(step, ev)
        last.update(ev)
        log(f'step {step} | {_eval_summary(ev)}')
        if config.sample.prompts and trainer.model.cfg.head == 'lm':  # every process runs the sharded sampler; process 0 prints
          for line in trainer.samples(trainer.full_params(state.params, frozen), tokenizer):
            log('  sample ' + line)
        t_interval += time.time() - eval_start  # evaluation time is not training throughput
  ckpt.close()
  writer.close()
  log(f'done: {config.steps - start} steps in {_fmt_time(time.time() - t_start)}')
  return last


def dry_run(trainer: Trainer) -> dict[str, Any]:
  """Compiles the train step on abstract inputs and reports sizes, memory and FLOPs."""
  c = trainer.config
  abstract_batch = jax.ShapeDtypeStruct((c.batch_size, c.seq_len), jnp.int32, sharding=trainer.batch_sharding)
  keys = getattr(trainer.stage, 'BATCH_KEYS', ('inputs', 'targets', 'segment_ids', 'positions'))
  batch = {k: abstract_batch for k in keys}
  t0 = time.time()
  with trainer._context():  # pylint: disable=protected-access
    frozen = _with_shardings(trainer.abstract_frozen, trainer.frozen_shardings)
    reference = _with_shardings(trainer.abstract_params, trainer.reference_shardings) \
        if trainer.keeps_reference_copy else {}
    compiled = trainer.train_step.lower(trainer.abstract_state, batch, frozen, reference).compile()
  compile_s = time.time() - t0

  def per_device_bytes(tree):
    total = 0
    for leaf in jax.tree.leaves(tree):
      shard = leaf.sharding.shard_shape(leaf.shape)
      total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total

  n_params = count_params(trainer.abstract_params)
  report = {
      'params': n_params,
      'param_bytes_per_device': per_device_bytes(trainer.abstract_state.params),
      'opt_state_bytes_per_device': per_device_bytes(trainer.abstract_state.opt_state),
      'compile_seconds': compile_s,
  }
  mem = compiled.memory_analysis()
  if mem is not None:
    for name in ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
                 'generated_code_size_in_bytes'):
      report[name] = getattr(mem, name, None)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if cost:  # XLA counts a scanned layer's body once, so this undercounts with scan_layers
    report['xla_flops_per_step_per_device'] = cost.get('flops')
  tokens = c.batch_size * c.seq_len
  report['model_flops_per_step'] = flops_per_token(trainer.model.cfg, c.seq_len) * tokens
  gib = 2 ** 30
  log(f'dry run: {n_params / 1e9:.2f}B parameters')
  log(f'  parameters per device:      {report["param_bytes_per_device"] / gib:8.3f} GiB')
  log(f'  optimizer state per device: {report["opt_state_bytes_per_device"] / gib:8.3f} GiB')
  if mem is not None:
    log(f'  compiled temp per device:   {report["temp_size_in_bytes"] / gib:8.3f} GiB')
  log(f'  model FLOPs per step:       {report["model_flops_per_step"]:.3e} (6N + 12LHQT, all devices)')
  if report.get('xla_flops_per_step_per_device'):
    log(f'  XLA FLOPs per step/device:  {report["xla_flops_per_step_per_device"]:.3e} '
        '(a scanned layer counts once)')
  log(f'  compile time:               {compile_s:8.1f} s')
  log(json.dumps(report))
  return report

