"""HF transformers (torch, CPU) as the oracle for checkpoint import and export."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from research import sampling
from research.errors import UserError
from research.interop import hf

torch.set_num_threads(1)


def _families():
  common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
  return {
      'llama3_gqa_scaled': transformers.LlamaConfig(
          **common, num_key_value_heads=2, rope_theta=500000.0,
          rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                        'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}),
      'llama_tied_headdim': transformers.LlamaConfig(
          **common, num_key_value_heads=4, head_dim=24, tie_word_embeddings=True),
      'mistral': transformers.MistralConfig(**common, num_key_value_heads=2, sliding_window=None),
      'qwen2_bias': transformers.Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=False,
                                             tie_word_embeddings=False),
      # Qwen3: per-head q/k RMSNorm; a head dim apart from hidden / heads (as in Qwen3,
      # 128 for hidden 2048 and 16 heads), tied embeddings, and MHA with its own rope base.
      'qwen3_gqa_headdim': transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=24,
                                                    tie_word_embeddings=False, rope_theta=1e6),
      'qwen3_tied': transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=16,
                                             tie_word_embeddings=True),
      'qwen3_mha_headdim': transformers.Qwen3Config(**common, num_key_value_heads=4, head_dim=32,
                                                    tie_word_embeddings=False, rope_theta=50000.0),
      # Gemma 2: windows shorter than the test sequences (40 tokens; 25 when decoding),
      # soft-capping on (and tight enough to bite), query scaling apart from head_dim.
      'gemma2_gqa': transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=16,
                                              query_pre_attn_scalar=16, sliding_window=8),
      'gemma2_tight_caps': transformers.Gemma2Config(
          **{**common, 'num_hidden_layers': 3}, num_key_value_heads=4, head_dim=24, query_pre_attn_scalar=32,
          sliding_window=12, attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
      'gemma2_no_caps': transformers.Gemma2Config(**common, num_key_value_heads=2, head_dim=32,
                                                  query_pre_attn_scalar=20, sliding_window=5,
                                                  attn_logit_softcapping=None, final_logit_softcapping=None),
      # Gemma 3: q/k norms, local and global RoPE bases, linear scaling on global layers.
      'gemma3_alternate': transformers.Gemma3TextConfig(
          **{**common, 'num_hidden_layers': 3}, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
          sliding_window=8, layer_types=['sliding_attention', 'full_attention', 'sliding_attention']),
      'gemma3_linear_rope': transformers.Gemma3TextConfig(
          **{**common, 'num_hidden_layers': 6}, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
          sliding_window=6, rope_parameters={
              'full_attention': {'rope_type': 'linear', 'factor': 8.0, 'rope_theta': 1e6},
              'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}}),
      # Mixtral: top-2 of 4 with GQA; top-1 of 8 with a sliding window shorter than the
      # sequences; top-3 of 6, tied embeddings and a head dim apart from hidden / heads.
      'mixtral_top2': transformers.MixtralConfig(**common, num_key_value_heads=2, num_local_experts=4,
                                                 num_experts_per_tok=2),
      'mixtral_top1_window': transformers.MixtralConfig(**{**common, 'num_hidden_layers': 3}, num_key_value_heads=4,
                                                        num_local_experts=8, num_experts_per_tok=1, sliding_window=8),
      'mixtral_top3_tied': transformers.MixtralConfig(**common, num_key_value_heads=2, head_dim=24,
                                                      num_local_experts=6, num_experts_per_tok=3,
                                                      tie_word_embeddings=True, rope_theta=1e6),
      # Qwen3-MoE: q/k norms, experts narrower than hidden, top-k weights renormalised or not.
      'qwen3_moe_norm': transformers.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=24, num_experts=6,
                                                    num_experts_per_tok=2, moe_intermediate_size=40,
                                                    norm_topk_prob=True),
      'qwen3_moe_raw_top4': transformers.Qwen3MoeConfig(**{**common, 'num_hidden_layers': 3}, num_key_value_heads=4,
                                                        num_experts=8, num_experts_per_tok=4,
                                                        moe_intermediate_size=32, norm_topk_prob=False,
                                                        tie_word_embeddings=True),
      'gemma3_mha': transformers.Gemma3TextConfig(
          **common, num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=32, sliding_window=10,
          layer_types=['sliding_attention', 'full_attention']),
  }


def _random_hf_model(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32,
                                                        attn_implementation='eager').eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module', params=sorted(_families()))
def family(request, tmp_path_factory):
  model = _random_hf_model(_families()[request.param])
  path = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(path, safe_serialization=True)
  return request.param, model, path


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_logits_match_transformers(family):
  _, hf_model, path = family
  model, params = hf.load_pretrained(path)
  tokens = np.random.RandomState(0).randint(0, 512, (2, 40))
  want = _hf_logits(hf_model, tokens)
  got, _ = model.apply({'params': params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4


def test_scan_layers_import_matches(family):
  _, hf_model, path = family
  model, params = hf.load_pretrained(path, scan_layers=True)
  tokens = np.random.RandomState(1).randint(0, 512, (1, 17))
  want = _hf_logits(hf_model, tokens)
  got, _ = model.apply({'params': params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4


def test_export_reloads_bit_identical(family, tmp_path):
  _, hf_model, path = family
  model, params = hf.load_pretrained(path)
  out = str(tmp_path / 'export')
  hf.save_pretrained(out, model, params, model_type=hf_model.config.model_type)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
  assert type(reloaded) is type(hf_model)
  # transformers saves it again in its checkpoint layout (Mixtral: one tensor per
  # expert, which it fuses in memory): that file holds exactly our tensors.
  resaved = str(tmp_path / 'resaved')
  reloaded.save_pretrained(resaved)
  with safe_open(os.path.join(resaved, 'model.safetensors'), framework='numpy') as f:
    theirs = {k: f.get_tensor(k) for k in f.keys()}
  ours = hf.to_hf_state_dict(model.cfg, params)
  assert sorted(theirs) == sorted(ours)
  for key, value in ours.items():
    np.testing.assert_array_equal(theirs[key], value, err_msg=key)


def test_greedy_decoding_matches_generate(family):
  _, hf_model, path = family
  model, params = hf.load_pretrained(path)
  prompt = [5, 17, 300, 42, 9]
  with torch.no_grad():
    want = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20,
                             min_new_tokens=20, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
  got = sampling.generate(model, params, [prompt], max_new_tokens=20)[0]
  assert got == want


def test_sharded_load_places_tensors_on_the_mesh(family):
  from configs.base import DEFAULT_RULES
  _, hf_model, path = family
  from research.training import sharding
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2), jax.devices()[:8])
  model, params = hf.load_pretrained(path, mesh=mesh, rules=DEFAULT_RULES)
  q = params['layers_0']['attn']['q']['kernel']
  assert q.sharding.spec[0] == 'fsdp'
  assert q.addressable_shards[0].data.shape[0] == q.shape[0] // 4
  tokens = np.random.RandomState(0).randint(0, 512, (1, 9))
  got, _ = model.apply({'params': params}, jnp.asarray(tokens))
  want = _hf_logits(hf_model, tokens)
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4


def test_unsupported_fields_raise(tmp_path):
  with pytest.raises(UserError, match='sliding_window'):
    hf.model_config_from_hf(transformers.MistralConfig(sliding_window=1024, max_position_embeddings=4096).to_dict())
  with pytest.raises(UserError, match='o_proj bias'):
    hf.model_config_from_hf(transformers.LlamaConfig(attention_bias=True).to_dict())
  with pytest.raises(UserError, match='model_type'):
    hf.model_config_from_hf({'model_type': 'gpt2'})
  with pytest.raises(UserError, match='o_proj bias'):
    hf.model_config_from_hf(transformers.Qwen3Config(attention_bias=True).to_dict())
  with pytest.raises(UserError, match='sliding'):
    hf.model_config_from_hf(transformers.Qwen3Config(use_sliding_window=True, sliding_window=64,
                                                     max_window_layers=1, num_hidden_layers=2).to_dict())
  with pytest.raises(UserError, match='one global layer every N'):
    hf.model_config_from_hf(transformers.Gemma3TextConfig(
        num_hidden_layers=3, layer_types=['full_attention', 'sliding_attention', 'sliding_attention']).to_dict())
  with pytest.raises(UserError, match='bidirectional'):
    hf.model_config_from_hf(transformers.Gemma3TextConfig(use_bidirectional_attention=True).to_dict())
  (tmp_path / 'tokenizer.json').write_text('{}')
  with pytest.raises(UserError, match='tokenizer.json'):
    hf.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize('name,family', [('llama3_gqa_scaled', 'llama'), ('qwen3_gqa_headdim', 'qwen3'),
                                         ('gemma2_tight_caps', 'gemma'), ('gemma3_linear_rope', 'gemma'),
                                         ('mixtral_top2', 'mixtral'), ('qwen3_moe_norm', 'qwen3_moe')])
def test_init_from_hf_starts_from_those_weights(name, family, tmp_path, test_config, tok):
  """Step-0 eval loss of a run with init_from=hf:<dir> equals the HF model's loss;
  the run takes the checkpoint's family and architecture."""
  from conftest import train
  from research.training.metrics import read_metrics
  hf_model = _random_hf_model(_families()[name], seed=3)
  path = str(tmp_path / 'hf')
  hf_model.save_pretrained(path, safe_serialization=True)
  tok.save(os.path.join(path, 'tokenizer.model'))  # as Llama-2 checkpoints ship one

  config = test_config(steps=1, init_from=f'hf:{path}', eval_batches=1, seq_len=48)
  workdir = str(tmp_path / 'run')
  train(config, workdir, devices=jax.devices()[:1])
  eval0 = next(r['eval/loss'] for r in read_metrics(workdir) if r['step'] == 0)
  import json
  with open(os.path.join(workdir, 'config.json')) as f:
    model_section = json.load(f)['model']
  assert model_section['family'] == family
  hf_cfg = hf_model.config  # (Mixtral's config.json leaves head_dim null: hidden / heads)
  assert model_section['head_dim'] == (hf_cfg.head_dim or hf_cfg.hidden_size // hf_cfg.num_attention_heads)

  # The HF loss on the same eval batch, document segment by document segment.
  from research.stages import pretrain
  batch = pretrain.stage(config).eval_batches(tok)[0]
  total, count = 0.0, 0
  for row in range(batch['inputs'].shape[0]):
    seg = batch['segment_ids'][row]
    for s in np.unique(seg[seg > 0]):
      idx = np.nonzero(seg == s)[0]
      with torch.no_grad():
        logits = hf_model(torch.tensor(batch['inputs'][row, idx][None]),
                          position_ids=torch.tensor(batch['positions'][row, idx][None])).logits[0]
      logp = torch.log_softmax(logits.double(), -1)
      total -= logp[torch.arange(len(idx)), torch.tensor(batch['targets'][row, idx])].sum().item()
      count += len(idx)
  assert abs(eval0 - total / count) / (total / count) < 1e-5


def test_export_cli_writes_a_loadable_checkpoint(tmp_path, test_config):
  from conftest import train
  from research import export
  workdir = str(tmp_path / 'run')
  train(test_config(steps=2, model__qkv_bias=True), workdir, devices=jax.devices()[:1])
  # A run written before LoRA lived in config.lora alone has lora_* copies in config.model.
  import json
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['model'].update(lora_rank=0, lora_alpha=16.0, lora_dropout=0.0, lora_targets='', lora_rslora=False)
  with open(path, 'w') as f:
    json.dump(saved, f)
  out = export.export(workdir, str(tmp_path / 'out'))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
  assert reloaded.config.model_type == 'qwen2' and os.path.exists(os.path.join(out, 'tokenizer.model'))
  model, params = hf.load_pretrained(out)
  tokens = np.arange(12)[None] % 100
  got, _ = model.apply({'params': params}, jnp.asarray(tokens))
  want = _hf_logits(reloaded, tokens)
  assert np.abs(np.asarray(got) - want).max() / np.abs(want).max() < 1e-4


def test_export_as_a_family_that_cannot_hold_the_model_is_an_error():
  from research.models.llama import Config
  with pytest.raises(UserError, match='qwen2'):
    Config(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64).to_hf('qwen2')
  with pytest.raises(UserError, match='qwen3'):
    Config(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64).to_hf('qwen3')
