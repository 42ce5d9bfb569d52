"""HuggingFace interop: exact import and export of Llama, Mistral and Qwen2 checkpoints.

    model, params = load_pretrained('path/to/hf_dir')             # config.json + *.safetensors
    save_pretrained('out_dir', model, params)                      # transformers can load it

Weights are read with `safetensors` (never pickle) one tensor at a time; given
a mesh and logical rules, each tensor is placed sharded by
`jax.make_array_from_callback`, so no host holds the whole model at once.

Layout mapping (HF stores torch Linear weights as [out, in]):
    q_proj.weight [H*Dh, D]  -> attn/q/kernel [D, H, Dh]     (same for k, v with K heads)
    o_proj.weight [D, H*Dh]  -> attn/o/kernel [H, Dh, D]
    gate/up_proj  [F, D]     -> mlp/gate|up/kernel [D, F];   down_proj [D, F] -> [F, D]
    lm_head.weight [V, D]    -> lm_head/kernel [D, V]
    score.weight [1, D]      -> score/kernel [D, 1]          (reward models, head='score':
                                                              LlamaForSequenceClassification)
HF checkpoints already use the "rotate half" RoPE layout that the model uses,
so no permutation is needed.

Tokenizers: a SentencePiece `tokenizer.model` (Llama 2, Mistral) loads with
`research.data.tokenizer.Tokenizer`. Checkpoints that ship only `tokenizer.json`
(Llama 3, Qwen2) are not supported: `load_tokenizer` says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from research.errors import UserError
from research.models.llama import NEW_HEADS, ModelConfig, Transformer

SUPPORTED = ('llama', 'mistral', 'qwen2')


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
  """ModelConfig for an HF config.json dict; raises on fields the model cannot honour."""
  kind = hf.get('model_type')
  if kind not in SUPPORTED:
    raise UserError(f'HF model_type {kind!r} is not supported; supported: {SUPPORTED}.')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise UserError(f'hidden_act={hf["hidden_act"]!r}: only silu (SwiGLU) is supported.')
  window = hf.get('sliding_window')
  uses_window = hf.get('use_sliding_window', kind == 'mistral')
  if window is not None and uses_window and window < hf.get('max_position_embeddings', 0):
    raise UserError(f'sliding_window={window} is shorter than max_position_embeddings='
                    f'{hf.get("max_position_embeddings")}; sliding-window attention is not '
                    'implemented, so logits would differ beyond the window.')
  scaling = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  rope_type = scaling.get('rope_type', scaling.get('type', 'default'))
  if rope_type not in ('default', 'llama3'):
    raise UserError(f'rope_scaling type {rope_type!r} is not supported (default or llama3 only).')
  heads = hf['num_attention_heads']
  fields = dict(
      vocab_size=hf['vocab_size'], d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
      n_heads=heads, n_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, d_ff=hf['intermediate_size'],
      rope_theta=float(hf.get('rope_theta', scaling.get('rope_theta', 10000.0))),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
      tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
      qkv_bias=kind == 'qwen2' or bool(hf.get('attention_bias', False)),
      head='score' if any(a.endswith('ForSequenceClassification') for a in hf.get('architectures') or ())
      else 'lm')
  n_labels = hf.get('num_labels') or len(hf.get('id2label') or {}) or 1
  if fields['head'] == 'score' and n_labels != 1:
    raise UserError(f'a sequence classifier with {n_labels} labels: only scalar reward models '
                    '(num_labels=1) are supported.')
  if hf.get('mlp_bias'):
    raise UserError('mlp_bias=True is not supported.')
  if rope_type == 'llama3':
    fields.update(rope_scaling_factor=float(scaling['factor']),
                  rope_low_freq_factor=float(scaling['low_freq_factor']),
                  rope_high_freq_factor=float(scaling['high_freq_factor']),
                  rope_original_max_len=int(scaling['original_max_position_embeddings']))
  if kind in ('llama', 'mistral') and hf.get('attention_bias'):
    raise UserError(f'{kind} with attention_bias=True also has an o_proj bias, which this model '
                    'does not implement.')
  fields.update(overrides)
  return ModelConfig(**fields)


def hf_config_from_model(cfg: ModelConfig, model_type: str = 'llama') -> dict:
  """config.json dict for `cfg` (Llama, or Qwen2 when q/k/v have biases)."""
  if cfg.qkv_bias and model_type in ('llama', 'mistral'):
    model_type = 'qwen2'  # the family whose attention has q/k/v (and no o) biases
  family = {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2'}[model_type]
  out = {
      'architectures': [family + ('ForSequenceClassification' if cfg.head == 'score' else 'ForCausalLM')],
      'model_type': model_type, 'vocab_size': cfg.vocab_size, 'hidden_size': cfg.d_model,
      'num_hidden_layers': cfg.n_layers, 'num_attention_heads': cfg.n_heads,
      'num_key_value_heads': cfg.n_kv_heads, 'head_dim': cfg.dh, 'intermediate_size': cfg.d_ff,
      'rope_theta': cfg.rope_theta, 'rms_norm_eps': cfg.norm_eps,
      'tie_word_embeddings': cfg.tie_embeddings, 'hidden_act': 'silu',
      'max_position_embeddings': max(cfg.rope_original_max_len, 8192), 'torch_dtype': cfg.param_dtype,
  }
  if cfg.head == 'score':
    out['num_labels'] = 1  # a scalar reward, read at the last non-padding token
  if model_type == 'llama':
    out['attention_bias'] = False
  if model_type in ('mistral', 'qwen2'):
    out['sliding_window'] = None
    out['use_sliding_window'] = False
  if cfg.rope_scaling_factor > 0:
    out['rope_scaling'] = {'rope_type': 'llama3', 'factor': cfg.rope_scaling_factor,
                           'low_freq_factor': cfg.rope_low_freq_factor,
                           'high_freq_factor': cfg.rope_high_freq_factor,
                           'original_max_position_embeddings': cfg.rope_original_max_len}
  return out


# (our path within one layer, HF name within one layer, HF -> ours, ours -> HF)
def _layer_map(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, Callable, Callable]]:
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dh
  def proj_in(heads):  # [heads*Dh, D] <-> [D, heads, Dh]
    return (lambda w: w.T.reshape(D, heads, Dh), lambda k: k.reshape(D, heads * Dh).T)
  def bias(heads):
    return (lambda b: b.reshape(heads, Dh), lambda b: b.reshape(heads * Dh))
  t = (lambda w: w.T, lambda k: k.T)
  same = (lambda x: x, lambda x: x)
  rows = [
      (('attn', 'q', 'kernel'), 'self_attn.q_proj.weight', *proj_in(H)),
      (('attn', 'k', 'kernel'), 'self_attn.k_proj.weight', *proj_in(K)),
      (('attn', 'v', 'kernel'), 'self_attn.v_proj.weight', *proj_in(K)),
      (('attn', 'o', 'kernel'), 'self_attn.o_proj.weight',
       lambda w: w.T.reshape(H, Dh, D), lambda k: k.reshape(H * Dh, D).T),
      (('mlp', 'gate', 'kernel'), 'mlp.gate_proj.weight', *t),
      (('mlp', 'up', 'kernel'), 'mlp.up_proj.weight', *t),
      (('mlp', 'down', 'kernel'), 'mlp.down_proj.weight', *t),
      (('attn_norm', 'scale'), 'input_layernorm.weight', *same),
      (('mlp_norm', 'scale'), 'post_attention_layernorm.weight', *same),
  ]
  if cfg.qkv_bias:
    rows += [(('attn', n, 'bias'), f'self_attn.{n}_proj.bias', *bias(h))
             for n, h in (('q', H), ('k', K), ('v', K))]
  return rows


def _global_map(cfg: ModelConfig):
  t = (lambda w: w.T, lambda k: k.T)
  same = (lambda x: x, lambda x: x)
  rows = [(('embed', 'embedding'), 'model.embed_tokens.weight', *same),
          (('final_norm', 'scale'), 'model.norm.weight', *same)]
  if cfg.head == 'score':
    rows.append((('score', 'kernel'), 'score.weight', *t))
  elif not cfg.tie_embeddings:
    rows.append((('lm_head', 'kernel'), 'lm_head.weight', *t))
  return rows


class _SafetensorsReader:
  """Tensor-by-tensor access to single or index-sharded safetensors files."""

  def __init__(self, path: str):
    index = os.path.join(path, 'model.safetensors.index.json')
    if os.path.exists(index):
      with open(index) as f:
        self.files = {k: os.path.join(path, v) for k, v in json.load(f)['weight_map'].items()}
    else:
      files = sorted(f for f in os.listdir(path) if f.endswith('.safetensors'))
      if not files:
        raise UserError(f'no *.safetensors in {path}; convert pickled .bin weights to safetensors '
                        'first (this project never loads pickle).')
      self.files = {}
      for name in files:
        with safe_open(os.path.join(path, name), framework='numpy') as f:
          self.files.update({k: os.path.join(path, name) for k in f.keys()})
    self._open: dict[str, Any] = {}

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise UserError(f'tensor {name!r} is missing from the checkpoint.')
    path = self.files[name]
    if path not in self._open:
      self._open[path] = safe_open(path, framework='numpy')
    return self._open[path].get_tensor(name)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
  for p in path:
    tree = tree[p]
  return tree


def _placer(model: Transformer, dtype, mesh, rules):
  """Returns place(path, host_array) -> jax.Array, sharded over `mesh` when given."""
  specs = None
  if mesh is not None:
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    specs = nn.get_partition_spec(boxed)['params']

  def place(path, host):
    host = np.asarray(host).astype(jnp.dtype(dtype))
    if specs is None:
      return jnp.asarray(host)
    spec = nn.logical_to_mesh_axes(_get(specs, path), rules)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  return place


def load_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None, mesh=None, rules=None,
                    **model_overrides) -> tuple[Transformer, Any]:
  """(model, params) from an HF checkpoint directory (config.json + *.safetensors).

  With `mesh` (and logical `rules`, e.g. configs.base.DEFAULT_RULES) each
  tensor is placed sharded as it is read. `dtype` is the parameter dtype,
  `compute_dtype` the activations' (default: the same); `model_overrides` set
  other non-architecture fields such as remat='full' or scan_layers=True.
  """
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{path} has no config.json; point at an HF model directory.')
  with open(cfg_path) as f:
    hf = json.load(f)
  cfg = model_config_from_hf(hf, param_dtype=jnp.dtype(dtype).name,
                             dtype=jnp.dtype(compute_dtype or dtype).name, **model_overrides)
  model = Transformer(cfg)
  reader = _SafetensorsReader(path)
  place = _placer(model, dtype, mesh, rules)
  params: dict = {}
  for ours, theirs, to_ours, _ in _global_map(cfg):
    if ours[0] in NEW_HEADS and theirs not in reader.files:
      continue  # a causal LM loaded as a reward model: the trainer initialises the new head
    _set(params, ours, place(ours, to_ours(reader.get(theirs))))
  for ours, theirs, to_ours, _ in _layer_map(cfg):
    layers = [to_ours(reader.get(f'model.layers.{i}.{theirs}')) for i in range(cfg.n_layers)]
    if cfg.scan_layers:
      _set(params, ('layers',) + ours, place(('layers',) + ours, np.stack(layers)))
    else:
      for i, w in enumerate(layers):
        _set(params, (f'layers_{i}',) + ours, place((f'layers_{i}',) + ours, w))
  return model, params


def to_hf_state_dict(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array, from our parameter pytree."""
  out = {}
  for ours, theirs, _, to_hf in _global_map(cfg):
    out[theirs] = np.asarray(to_hf(np.asarray(_get(params, ours))))
  for ours, theirs, _, to_hf in _layer_map(cfg):
    for i in range(cfg.n_layers):
      w = _get(params, ('layers',) + ours)[i] if cfg.scan_layers else _get(params, (f'layers_{i}',) + ours)
      out[f'model.layers.{i}.{theirs}'] = np.ascontiguousarray(to_hf(np.asarray(w)))
  return out


def save_pretrained(path: str, model: Transformer, params, model_type: str = 'llama',
                    tokenizer=None) -> None:
  """Writes config.json and model.safetensors that transformers loads (and the
  tokenizer's bos/eos/pad ids, so HF generation stops where ours does)."""
  os.makedirs(path, exist_ok=True)
  params = jax.device_get(params)
  cfg = dataclasses.replace(model.cfg)
  hf_cfg = hf_config_from_model(cfg, model_type)
  if tokenizer is not None:
    hf_cfg.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                  pad_token_id=tokenizer.pad_id)
  elif cfg.head == 'score':  # HF finds the scored (last) token by the pad id: ours is 0
    hf_cfg['pad_token_id'] = 0
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_cfg, f, indent=2)
  tensors = {k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(cfg, params).items()}
  save_file(tensors, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})


def load_tokenizer(path: str):
  """The checkpoint's SentencePiece tokenizer, or a clear error if it has none."""
  from research.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  sp = os.path.join(path, 'tokenizer.model')
  if os.path.exists(sp):
    return Tokenizer.load(sp)
  if os.path.exists(os.path.join(path, 'tokenizer.json')):
    raise UserError(f'{path} ships only tokenizer.json (a HF "fast" BPE tokenizer, as in Llama 3 '
                    'and Qwen2), which this project does not read; convert it to a SentencePiece '
                    'model or set --config.data.tokenizer to a compatible .model file.')
  raise UserError(f'{path} has no tokenizer.model; set --config.data.tokenizer.')
