"""HuggingFace interop: exact import and export of checkpoints of every model family.

    model, params = load_pretrained('path/to/hf_dir')             # config.json + *.safetensors
    save_pretrained('out_dir', model, params)                      # transformers can load it

config.json's `model_type` picks the family (research/models: llama for Llama,
Mistral and Qwen2; qwen3; gemma; mixtral), whose Config.from_hf / to_hf translate the
architecture and whose `hf_param_map` names and reshapes every tensor. This
module only walks that map: weights are read with `safetensors` (never pickle)
one tensor at a time; given a mesh and logical rules, each tensor is placed
sharded by `jax.make_array_from_callback`, so no host holds the whole model.

Tokenizers: a SentencePiece `tokenizer.model` (Llama 2, Mistral) loads with
`research.data.tokenizer.Tokenizer`; a `tokenizer.json` (Llama 3, Qwen2, Qwen3)
with `HFTokenizer` (the `tokenizers` library), which also carries the
checkpoint's chat template.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from research import models
from research.errors import UserError


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


def _placer(model, dtype, mesh, rules):
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


def read_config(path: str) -> dict:
  """The config.json of an HF checkpoint directory."""
  cfg_path = os.path.join(path, 'config.json')
  if not os.path.exists(cfg_path):
    raise UserError(f'{path} has no config.json; point at an HF model directory.')
  with open(cfg_path) as f:
    return json.load(f)


def model_config_from_hf(hf: dict, **overrides):
  """The model family's Config for an HF config.json dict (model_type picks the family)."""
  return models.family_for_hf(hf.get('model_type')).Config.from_hf(hf, **overrides)


def load_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None, mesh=None, rules=None,
                    **model_overrides) -> tuple[Any, Any]:
  """(model, params) from an HF checkpoint directory (config.json + *.safetensors).

  With `mesh` (and logical `rules`, e.g. configs.base.DEFAULT_RULES) each
  tensor is placed sharded as it is read. `dtype` is the parameter dtype,
  `compute_dtype` the activations' (default: the same); `model_overrides` set
  other non-architecture fields such as remat='full' or scan_layers=True.
  """
  cfg = model_config_from_hf(read_config(path), param_dtype=jnp.dtype(dtype).name,
                             dtype=jnp.dtype(compute_dtype or dtype).name, **model_overrides)
  model = models.family(cfg.family).Model(cfg)
  reader = _SafetensorsReader(path)
  place = _placer(model, dtype, mesh, rules)
  top, layer = models.family(cfg.family).hf_param_map(cfg)
  params: dict = {}
  for ours, theirs, to_ours, _ in top:
    if ours[0] in models.NEW_HEADS and theirs not in reader.files:
      continue  # a causal LM loaded as a reward model: the trainer initialises the new head
    _set(params, ours, place(ours, to_ours(reader.get(theirs))))
  for ours, theirs, to_ours, _ in layer:
    layers = [_layer_tensor(reader.get, f'model.layers.{i}.{theirs}', to_ours, cfg) for i in range(cfg.n_layers)]
    if cfg.scan_layers:
      _set(params, ('layers',) + ours, place(('layers',) + ours, np.stack(layers)))
    else:
      for i, w in enumerate(layers):
        _set(params, (f'layers_{i}',) + ours, place((f'layers_{i}',) + ours, w))
  return model, params


def _layer_tensor(get, name: str, to_ours, cfg) -> np.ndarray:
  """One layer's tensor; a name with '{e}' (one tensor per expert in HF, an
  MoE family) is read for every expert and stacked on a leading axis."""
  if '{e}' in name:
    return np.stack([to_ours(get(name.format(e=e))) for e in range(cfg.n_experts)])
  return to_ours(get(name))


def to_hf_state_dict(cfg, params) -> dict[str, np.ndarray]:
  """HF tensor name -> numpy array, from our parameter pytree."""
  top, layer = models.family(cfg.family).hf_param_map(cfg)
  out = {}
  for ours, theirs, _, to_hf in top:
    out[theirs] = np.asarray(to_hf(np.asarray(_get(params, ours))))
  for ours, theirs, _, to_hf in layer:
    for i in range(cfg.n_layers):
      w = _get(params, ('layers',) + ours)[i] if cfg.scan_layers else _get(params, (f'layers_{i}',) + ours)
      name = f'model.layers.{i}.{theirs}'
      for e, w_e in enumerate(w) if '{e}' in name else [(None, w)]:  # per expert: axis 0 of ours
        out[name.format(e=e) if e is not None else name] = np.ascontiguousarray(to_hf(np.asarray(w_e)))
  return out


def save_pretrained(path: str, model, params, model_type: str | None = None, tokenizer=None) -> None:
  """Writes config.json and model.safetensors that transformers loads (and the
  tokenizer's bos/eos/pad ids, so HF generation stops where ours does).
  `model_type` defaults to the family's own (llama: 'llama'; also 'mistral')."""
  os.makedirs(path, exist_ok=True)
  params = jax.device_get(params)
  cfg = model.cfg
  hf_cfg = cfg.to_hf(model_type) if model_type else cfg.to_hf()
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
  """The checkpoint's tokenizer: tokenizer.model (SentencePiece) if it ships one,
  else tokenizer.json with its tokenizer_config.json and generation_config.json;
  a clear error if it has neither."""
  from research.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  if os.path.exists(os.path.join(path, tokenizer_lib.SP_FILE)):
    return tokenizer_lib.Tokenizer.load(os.path.join(path, tokenizer_lib.SP_FILE))
  if os.path.exists(os.path.join(path, 'tokenizer.json')):
    return tokenizer_lib.HFTokenizer.load(path)
  raise UserError(f'{path} has no tokenizer.model or tokenizer.json; set --config.data.tokenizer.')


def save_tokenizer(path: str, tokenizer) -> None:
  """Writes `tokenizer`'s files into the HF directory `path` (tokenizer.model, or
  tokenizer.json and its config files as the checkpoint shipped them)."""
  from research.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  if isinstance(tokenizer, tokenizer_lib.HFTokenizer):
    for name, data in tokenizer.files.items():
      with open(os.path.join(path, name), 'wb') as f:
        f.write(data)
  else:
    tokenizer.save(os.path.join(path, tokenizer_lib.SP_FILE))
