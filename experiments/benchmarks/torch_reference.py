"""The benchmark's reference: the same decoder in PyTorch (eager or torch.compile).

Benchmark-only code: PyTorch is never a dependency of research/. The layer
math mirrors research/models/llama.py (pre-norm RMSNorm, rotate-half RoPE,
grouped-query attention, SwiGLU, untied output layer) so both sides do the
same FLOPs.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
  def __init__(self, d, eps=1e-5):
    super().__init__()
    self.scale, self.eps = nn.Parameter(torch.ones(d)), eps

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rope(x, cos, sin):  # x [B, H, T, Dh]
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
  def __init__(self, d, heads, kv_heads, d_ff):
    super().__init__()
    self.h, self.k, self.dh = heads, kv_heads, d // heads
    self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
    self.q = nn.Linear(d, heads * self.dh, bias=False)
    self.kv = nn.Linear(d, 2 * kv_heads * self.dh, bias=False)
    self.o = nn.Linear(heads * self.dh, d, bias=False)
    self.gate_up = nn.Linear(d, 2 * d_ff, bias=False)
    self.down = nn.Linear(d_ff, d, bias=False)

  def forward(self, x, cos, sin):
    B, T, _ = x.shape
    h = self.attn_norm(x)
    q = self.q(h).view(B, T, self.h, self.dh).transpose(1, 2)
    k, v = self.kv(h).view(B, T, 2, self.k, self.dh).permute(2, 0, 3, 1, 4)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if self.k != self.h:
      k = k.repeat_interleave(self.h // self.k, dim=1)
      v = v.repeat_interleave(self.h // self.k, dim=1)
    a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = x + self.o(a.transpose(1, 2).reshape(B, T, -1))
    g, u = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
    return x + self.down(nn.functional.silu(g) * u)


class Decoder(nn.Module):
  """Decoder-only transformer returning logits [B, T, V]."""

  def __init__(self, vocab, d, layers, heads, kv_heads, d_ff, theta=10000.0, max_len=4096):
    super().__init__()
    self.embed = nn.Embedding(vocab, d)
    self.blocks = nn.ModuleList(Block(d, heads, kv_heads, d_ff) for _ in range(layers))
    self.norm = RMSNorm(d)
    self.head = nn.Linear(d, vocab, bias=False)
    dh = d // heads
    inv = 1.0 / theta ** (torch.arange(0, dh, 2).float() / dh)
    ang = torch.arange(max_len).float()[:, None] * inv
    self.register_buffer('cos', ang.cos(), persistent=False)
    self.register_buffer('sin', ang.sin(), persistent=False)
    for p in self.parameters():
      if p.dim() >= 2:
        nn.init.normal_(p, std=0.02)

  def forward(self, tokens):
    T = tokens.shape[1]
    cos, sin = self.cos[:T], self.sin[:T]
    x = self.embed(tokens)
    for b in self.blocks:
      x = b(x, cos, sin)
    return self.head(self.norm(x))


def make_train_step(model, lr=3e-4, weight_decay=0.1):
  """A closure doing one AdamW step on (inputs, targets); returns the loss tensor."""
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)

  def loss_fn(inputs, targets):
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

  def step(inputs, targets, compiled_loss=None):
    opt.zero_grad(set_to_none=True)
    loss = (compiled_loss or loss_fn)(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss
  return step, loss_fn


__all__ = ['Decoder', 'make_train_step', 'math']
