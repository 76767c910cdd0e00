"""Transformer building blocks: RMSNorm, SwiGLU MLP, grouped-query attention with QK-RMSNorm, the block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from infinitystar.model.attention import AttentionContext, attend
from infinitystar.model.rope import apply_rope


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, bias: bool = False, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                layer: int) -> torch.Tensor:
        B, L, _ = x.shape
        # (B, L, heads, hd) throughout: RoPE broadcasts over heads, and the attention gets transposed views, so
        # gathering token rows (grouped attention) reads contiguous memory
        q = self.q_norm(self.q_proj(x).view(B, L, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx, layer)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, bias: bool, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, bias, eps)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x, cos, sin, ctx: AttentionContext, layer: int):
        x = x + self.attn(self.attn_norm(x), cos, sin, ctx, layer)
        return x + self.mlp(self.mlp_norm(x))
