"""The Infinity transformer (bitwise next-scale text-to-image). Its teacher-forcing targets and losses are in
`infinitystar.train.infinity_targets`.

Sequence: [start token ; word_embed(x_2) ; ... ; word_embed(x_K)] where the start token is the attention-pooled
text plus a learned offset, x_k is the running code map bilinearly resized to scale k, and every token of
scale k gets level_embed[k] once, before the first block. Positions come only from RoPE-2D in self-attention,
anchored to the last grid of the template's 1M schedule. Block-causal attention: full inside a scale, causal
across scales. Each of the `bits` outputs per token is a 2-way classifier (logits (..., bits, 2)).

Block (pre-norm, shared adaLN: one SiLU+Linear(C -> 6C) of the pooled text for all blocks, plus per-block
biases; chunk order gamma1, gamma2, scale1, scale2, shift1, shift2):
    x += gamma1 * SelfAttn(LN(x) * (1 + scale1) + shift1)       cosine attention, learned per-head scale
    x += CrossAttn(LN_affine(x), text memory)                    per-sample key masks, 1/sqrt(c) scale
    x += gamma2 * MLP(LN(x) * (1 + scale2) + shift2)             Linear, GELU(tanh), Linear

Text: RMSNorm over T5 features, then (a) a pooled vector (learned-query attention) = start-token content and
the adaLN / head condition, (b) an MLP memory for every block's cross-attention. Captions are padded with a
mask of real tokens (the reference's varlen form is the same function, see `text_from_varlen`).

Upstream bugs that this implementation does not have (reference/infinity.md section 11.1):
  * the per-scale RoPE offset is always applied in the KV-cached path (positions are sliced per scale here,
    there is no separate "fused" path that could forget it);
  * condition dropout runs only in training mode and never writes into the caller's text tensor;
  * the scale-reweighted loss works (`train.infinity_targets.token_weights(..., reweight_by_scale=True)`);
  * no block-chunk requirement: blocks are one flat list (chunks are only an official key prefix);
  * loading is strict and accepts both shapes of the per-head attention scale ((1, H, 1, 1) and (1, 1, H, 1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from infinitystar.checkpoint_io import PretrainedMixin
from infinitystar.config import ArchConfig
from infinitystar.model.attention import AttentionContext, attend
from infinitystar.model.layers import RMSNorm
from infinitystar.model.rope import Rope2D, apply_rope, rope2d_positions
from infinitystar.runtime import fp32_region
from infinitystar.schedules.infinity_resolution import rope_anchor as default_rope_anchor

Scale2D = tuple[int, int]


CONFIG_TYPE = "infinity_transformer"   # the "type" of our config.json (tells the folder from a VAE's)


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class InfinityConfig(ArchConfig):
    """Shape of an Infinity transformer.

    latent_channels: bits per latent cell (the VAE codebook_dim d). spatial_patchify: one token covers 2x2 latent
        cells (the 8B), so a token has 4d bits (`bits`).
    text_maxlen: rows of the learned null text (the longest caption). pooler_head_dim: head dim of the text
        pooler's key space (None: 128, or 64 above width 4096, as the reference).
    cond_drop_rate, drop_path_rate: training-only regularisation (ignored in eval mode).
    """
    depth: int = 2
    width: int = 64
    num_heads: int = 2
    latent_channels: int = 16
    spatial_patchify: bool = False
    text_channels: int = 2048
    text_maxlen: int = 512
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    num_levels: int = 15
    pooler_head_dim: Optional[int] = None
    rope_base: float = 10000.0
    max_log_scale: float = math.log(100.0)
    drop_path_rate: float = 0.0
    cond_drop_rate: float = 0.1

    def __post_init__(self):
        for name in ("depth", "width", "num_heads", "latent_channels", "text_channels", "text_maxlen", "num_levels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InfinityConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.spatial_patchify, bool):
            raise ValueError(f"InfinityConfig.spatial_patchify must be a bool, got {self.spatial_patchify!r}")
        if self.width % self.num_heads:
            raise ValueError(f"InfinityConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"InfinityConfig: head dim {self.head_dim} must be a multiple of 4 (RoPE-2D)")
        if self.ffn_hidden < 1:
            raise ValueError(f"InfinityConfig: width * mlp_ratio = {self.width * self.mlp_ratio} rounds to an "
                             f"empty FFN (hidden = round(width * mlp_ratio / 256) * 256); use width >= 48")
        pd = self.pooler_dim_per_key
        if self.text_channels % pd:
            raise ValueError(f"InfinityConfig: text_channels {self.text_channels} must be a multiple of the pooler "
                             f"head dim {pd}")
        if self.width % self.pooler_heads:
            raise ValueError(f"InfinityConfig: width {self.width} must be divisible by the pooler heads "
                             f"{self.pooler_heads} (text_channels / {pd})")
        if not (0.0 <= self.drop_path_rate < 1.0 and 0.0 <= self.cond_drop_rate <= 1.0):
            raise ValueError("InfinityConfig: drop_path_rate must be in [0, 1) and cond_drop_rate in [0, 1]")
        if not (self.norm_eps > 0 and self.rope_base > 0 and self.mlp_ratio > 0):
            raise ValueError("InfinityConfig: norm_eps, rope_base and mlp_ratio must be positive")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        # Python round is half-to-even, as in the reference (C=32 gives an empty FFN there too)
        return int(round(self.width * self.mlp_ratio / 256)) * 256

    @property
    def bits(self) -> int:
        """Bits per transformer token (input width of word_embed, half the head width)."""
        return self.latent_channels * (4 if self.spatial_patchify else 1)

    @property
    def pooler_dim_per_key(self) -> int:
        if self.pooler_head_dim is not None:
            return int(self.pooler_head_dim)
        return 128 if self.width <= 4096 else 64

    @property
    def pooler_heads(self) -> int:
        return self.text_channels // self.pooler_dim_per_key

    def num_params(self) -> int:
        """Exact parameter count (the formula of reference/infinity.md section 3.9)."""
        C, Fh, H, d, Ct, Lt = self.width, self.ffn_hidden, self.num_heads, self.bits, self.text_channels, self.text_maxlen
        block = 8 * C * C + 2 * C * Fh + Fh + 15 * C + H
        other = (Lt * Ct + C + Ct + (2 * C * Ct + C * C + 3 * C) + (Ct * C + C * C + 2 * C) + self.num_levels * C
                 + (d * C + C) + (6 * C * C + 6 * C) + (2 * C * C + 2 * C) + (2 * d * C + 2 * d))
        return self.depth * block + other

    @classmethod
    def preset(cls, name: str, **overrides) -> "InfinityConfig":
        if name not in INFINITY_PRESETS:
            raise ValueError(f"unknown Infinity preset {name!r}; choose one of {', '.join(INFINITY_PRESETS)}")
        return cls(**{**INFINITY_PRESETS[name], **overrides})


# Released sizes (reference/infinity.md section 3.9) and the parity fixture's tiny model.
INFINITY_PRESETS: dict[str, dict[str, Any]] = {
    "infinity_2b": dict(depth=32, width=2048, num_heads=16, latent_channels=32, drop_path_rate=0.1),
    "infinity_8b": dict(depth=40, width=3584, num_heads=28, latent_channels=14, spatial_patchify=True,
                        drop_path_rate=0.1),
    "tiny": dict(depth=2, width=64, num_heads=2, latent_channels=16, text_channels=256, text_maxlen=16,
                 cond_drop_rate=0.0),
}


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TextConditioning:
    """Everything the blocks and the head read from the captions (batch B, padded length Lt)."""
    cond: torch.Tensor                   # (B, C) pooled text: start-token content and head condition
    memory: torch.Tensor                 # (B, Lt, C) cross-attention memory
    mask: Optional[torch.Tensor]         # (B, Lt) bool, True = real token; None = all real
    ada: torch.Tensor                    # (B, 6, C) float32 shared adaLN output (before per-block biases)


def text_from_varlen(kv_compact: torch.Tensor, lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's varlen text (concatenated real rows, per-sample lengths) -> padded (B, max, Ct) and mask."""
    lens = [int(n) for n in lens]
    if sum(lens) != kv_compact.shape[0] or min(lens) < 1:
        raise ValueError(f"lengths {lens} do not split {kv_compact.shape[0]} rows into non-empty captions")
    out = kv_compact.new_zeros(len(lens), max(lens), kv_compact.shape[1])
    mask = torch.zeros(len(lens), max(lens), dtype=torch.bool, device=kv_compact.device)
    for i, row in enumerate(kv_compact.split(lens)):
        out[i, :len(row)] = row
        mask[i, :len(row)] = True
    return out, mask


def _check_text(features: torch.Tensor, mask: Optional[torch.Tensor], channels: int) -> None:
    if features.dim() != 3 or features.shape[-1] != channels:
        raise ValueError(f"text features must be (batch, tokens, {channels}), got {tuple(features.shape)}")
    if mask is not None:
        if mask.shape != features.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"text mask must be bool of shape {tuple(features.shape[:2])}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        if not bool(mask.any(1).all()):
            raise ValueError("every caption needs at least one real token (mask row all False)")


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (identity in eval mode)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.dim() - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------------------------
class TextPool(nn.Module):
    """Attention pooling of the text with a learned query per head (the reference's TextAttentivePool)."""

    def __init__(self, text_channels: int, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.query = nn.Parameter(torch.empty(heads, self.head_dim))
        self.kv_proj = nn.Linear(text_channels, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, text: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, Lt, _ = text.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])   # keys carry no bias
        kv = F.linear(text, self.kv_proj.weight, bias).view(B, Lt, 2, self.heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                        # (B, H, Lt, hd)
        q = self.query.to(k.dtype)[None, :, None, :].expand(B, -1, -1, -1)
        m = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)        # (B, H, 1, hd)
        return self.out_proj(o.reshape(B, -1))


class TextMLP(nn.Module):
    def __init__(self, text_channels: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(text_channels, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """Cosine attention: logits = exp(min(s_h, ln 100)) * cos(q, k), RoPE-2D on q and k, bias (q_bias, 0, v_bias)."""

    def __init__(self, width: int, heads: int, max_log_scale: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.max_log_scale = max_log_scale
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.log_scale = nn.Parameter(torch.full((heads,), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext,
                layer: int) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # the shared `attend` scales by 1/sqrt(hd); fold sqrt(hd) into q so the net attention scale is 1
        scale = self.log_scale.clamp_max(self.max_log_scale).exp() * math.sqrt(self.head_dim)
        q = F.normalize(q, dim=-1) * scale.to(q.dtype).view(1, -1, 1, 1)
        k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attend(q, k, v, ctx, layer)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    """Image tokens attend to the caption memory; no QK-norm, scale 1/sqrt(hd), padded keys masked per sample."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, Lt, hd) of the memory; constant over a generation, so computed once there."""
        B, Lt, C = memory.shape
        bias = torch.cat([torch.zeros_like(self.v_bias), self.v_bias])
        kv = F.linear(memory, self.kv_proj.weight, bias).view(B, Lt, 2, self.heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        m = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=m)
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class InfinityBlock(nn.Module):
    def __init__(self, cfg: InfinityConfig, drop_path: float = 0.0):
        super().__init__()
        C = cfg.width
        self.eps = cfg.norm_eps
        self.drop_path = drop_path
        self.ada_bias = nn.Parameter(torch.zeros(6, C))   # added to the shared adaLN output
        self.attn = SelfAttention(C, cfg.num_heads, cfg.max_log_scale)
        self.cross_norm = nn.LayerNorm(C, eps=cfg.norm_eps)
        self.cross = CrossAttention(C, cfg.num_heads)
        self.mlp = MLP(C, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, text: TextConditioning, cos: torch.Tensor, sin: torch.Tensor,
                ctx: AttentionContext, layer: int,
                cross_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        mod = (text.ada + self.ada_bias.float()).to(x.dtype).unsqueeze(2)    # (B, 6, 1, C)
        g1, g2, s1, s2, b1, b2 = mod.unbind(1)
        x = x + _drop_path(self.attn(_modulate(x, s1, b1, self.eps), cos, sin, ctx, layer) * g1,
                           self.drop_path, self.training)
        kv = cross_kv if cross_kv is not None else self.cross.kv(text.memory)
        x = x + self.cross(self.cross_norm(x), kv, text.mask)
        return x + _drop_path(self.mlp(_modulate(x, s2, b2, self.eps)) * g2, self.drop_path, self.training)


# ---------------------------------------------------------------------------------------------------------------
def level_ids(scales: Sequence[Scale2D], device=None) -> torch.Tensor:
    """(L,) scale index of every token (the start token is level 0, it is the 1x1 scale's slot)."""
    return torch.cat([torch.full((h * w,), k, dtype=torch.long, device=device) for k, (h, w) in enumerate(scales)])


def block_causal_mask(scales: Sequence[Scale2D], device=None) -> torch.Tensor:
    """(L, L) bool: query token i may attend to key j iff level(j) <= level(i)."""
    lv = level_ids(scales, device)
    return lv[None, :] <= lv[:, None]


def as_scales(scales: Sequence) -> list[Scale2D]:
    """Accept (h, w) pairs or the reference's (t, h, w) triples with t ignored (every image path uses t=1)."""
    out = []
    for s in scales:
        s = tuple(int(v) for v in s)
        if len(s) == 3:
            s = s[1:]
        if len(s) != 2 or min(s) < 1:
            raise ValueError(f"a scale must be (h, w) or (t, h, w) with positive sizes, got {s}")
        out.append(s)
    if not out or out[0] != (1, 1):
        raise ValueError(f"an Infinity schedule starts with the 1x1 scale (the start token), got {out[:1]}")
    return out


class InfinityTransformer(PretrainedMixin, nn.Module):
    config_type, folder_what, config_class = CONFIG_TYPE, "Infinity transformer", InfinityConfig

    def __init__(self, config: InfinityConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.width
        self.null_text = nn.Parameter(torch.empty(cfg.text_maxlen, cfg.text_channels))
        self.text_norm = RMSNorm(cfg.text_channels, cfg.norm_eps)
        self.text_pool = TextPool(cfg.text_channels, C, cfg.pooler_heads)
        self.text_mlp = TextMLP(cfg.text_channels, C)
        self.start_pos = nn.Parameter(torch.zeros(C))
        self.word_embed = nn.Linear(cfg.bits, C)
        self.level_embed = nn.Embedding(cfg.num_levels, C)
        self.ada_lin = nn.Linear(C, 6 * C)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]   # linear in depth
        self.blocks = nn.ModuleList(InfinityBlock(cfg, rates[i]) for i in range(cfg.depth))
        self.head_ada_lin = nn.Linear(C, 2 * C)
        self.head = nn.Linear(C, 2 * cfg.bits)
        self.rope = Rope2D(cfg.head_dim, cfg.rope_base)
        self.reset_parameters()

    # --- initialisation (the official recipe, applied to this module only) ---------------------------------------
    @torch.no_grad()
    def reset_parameters(self, aln: float = 1e-3, alng: float = 5e-6, hd0: float = 0.02,
                         generator: Optional[torch.Generator] = None) -> None:
        """trunc-normal(std sqrt(1/(3C))) Linear/Embedding weights with zero biases, then the reference's
        special init: head x hd0, head adaLN x aln, output projections / sqrt(2 depth), block gammas x alng and
        the other adaLN biases x aln (residual branches start almost closed). The null text is
        trunc-normal(std 1.2) / sqrt(text channels) from a generator seeded 0, as released."""
        if self.null_text.is_meta:
            return
        C, depth = self.config.width, self.config.depth
        std = math.sqrt(1 / (3 * C))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.start_pos, std=std, generator=generator)
        nn.init.trunc_normal_(self.text_pool.query, std=std, generator=generator)
        nn.init.zeros_(self.text_pool.v_bias)
        g0 = torch.Generator(device="cpu").manual_seed(0)
        null = torch.empty(self.null_text.shape)
        nn.init.trunc_normal_(null, std=1.2, generator=g0)
        self.null_text.copy_(null / math.sqrt(self.config.text_channels))
        self.head.weight.mul_(hd0)
        self.head_ada_lin.weight.mul_(aln)
        for b in self.blocks:
            b.ada_bias.copy_(torch.randn(b.ada_bias.shape, generator=generator) / math.sqrt(C))
            b.ada_bias[:2].mul_(alng)
            b.ada_bias[2:].mul_(aln)
            b.attn.log_scale.fill_(math.log(4.0))
            nn.init.zeros_(b.attn.q_bias)
            nn.init.zeros_(b.attn.v_bias)
            nn.init.zeros_(b.cross.v_bias)
            for lin in (b.attn.proj, b.cross.proj, b.mlp.fc2):
                lin.weight.div_(math.sqrt(2 * depth))

    # --- text -------------------------------------------------------------------------------------------------------
    def null_text_features(self, mask: torch.Tensor) -> torch.Tensor:
        """The learned unconditional caption with the layout of `mask` (B, Lt): each prompt's null text has the
        prompt's length (rows 0..len-1 of the null text); padded rows are zeros."""
        B, Lt = mask.shape
        lens = mask.sum(1)
        if int(lens.max()) > self.config.text_maxlen:
            raise ValueError(f"caption of {int(lens.max())} tokens is longer than the null text "
                             f"({self.config.text_maxlen} rows)")
        rows = self.null_text[:min(Lt, self.config.text_maxlen)]
        if Lt > rows.shape[0]:
            rows = torch.cat([rows, rows.new_zeros(Lt - rows.shape[0], rows.shape[1])])
        return torch.where(mask[..., None], rows[None], rows.new_zeros(()))

    def drop_condition(self, features: torch.Tensor, mask: Optional[torch.Tensor],
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Training-time condition dropout: each caption is replaced by the null text (same length) with
        probability cond_drop_rate. Returns a new tensor; the input is never modified."""
        p = self.config.cond_drop_rate
        if not self.training or p <= 0:
            return features
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        drop = torch.rand(features.shape[0], generator=generator).to(features.device) < p
        if not bool(drop.any()):
            return features
        null = self.null_text_features(mask).to(features.dtype)
        return torch.where(drop[:, None, None] & mask[..., None], null, features)

    def encode_text(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> TextConditioning:
        """Padded T5 features (B, Lt, Ct) and mask -> pooled condition, cross-attention memory, shared adaLN."""
        _check_text(features, mask, self.config.text_channels)
        t = self.text_norm(features.to(self.word_embed.weight.dtype))
        cond = self.text_pool(t, mask)
        memory = self.text_mlp(t)
        with fp32_region(cond.device):   # adaLN in float32, as the reference
            w, b = self.ada_lin.weight.float(), self.ada_lin.bias.float()
            ada = F.linear(F.silu(cond.float()), w, b).view(cond.shape[0], 6, -1)
        return TextConditioning(cond, memory, mask, ada)

    # --- sequence pieces ---------------------------------------------------------------------------------------------
    def start_tokens(self, text: TextConditioning) -> torch.Tensor:
        """(B, 1, C) start token: pooled text + learned offset (level 0 embedding not yet added)."""
        return (text.cond + self.start_pos.to(text.cond.dtype))[:, None]

    def embed(self, text: TextConditioning, x_wo_prefix: torch.Tensor, scales: Sequence) -> torch.Tensor:
        """Teacher-forced sequence (B, L, C): [start ; word_embed(x)] + level_embed[level]."""
        scales = as_scales(scales)
        L = sum(h * w for h, w in scales)
        if len(scales) > self.config.num_levels:
            raise ValueError(f"{len(scales)} scales but only {self.config.num_levels} level embeddings")
        B = text.cond.shape[0]
        if x_wo_prefix.shape != (B, L - 1, self.config.bits):
            raise ValueError(f"x_wo_prefix must be ({B}, {L - 1}, {self.config.bits}) for this schedule, got "
                             f"{tuple(x_wo_prefix.shape)}")
        h = torch.cat([self.start_tokens(text), self.word_embed(x_wo_prefix.to(self.word_embed.weight.dtype))], 1)
        return h + self.level_embed(level_ids(scales, h.device))

    def rope_cos_sin(self, scales: Sequence, rope_anchor: Optional[Scale2D] = None,
                     device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (L, hd/2) of every token of a schedule (anchor: the template's 1M grid by default)."""
        scales = as_scales(scales)
        anchor = tuple(rope_anchor) if rope_anchor is not None else default_rope_anchor(scales)
        return self.rope.cos_sin(rope2d_positions(scales, anchor, device))

    def run_blocks(self, h: torch.Tensor, text: TextConditioning, cos: torch.Tensor, sin: torch.Tensor,
                   ctx: AttentionContext, cross_kvs: Optional[Sequence] = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, text, cos, sin, ctx, i, None if cross_kvs is None else cross_kvs[i])
        return h

    def logits(self, h: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        """Head: LN, adaLN from the pooled text (own SiLU+Linear, order scale, shift), Linear(C -> 2 bits), in
        float32 -> (B, L, bits, 2); [..., 0] scores bit value 0, [..., 1] bit value 1."""
        with fp32_region(h.device):
            cond = F.silu(text.cond.float())
            scale, shift = F.linear(cond, self.head_ada_lin.weight.float(),
                                    self.head_ada_lin.bias.float()).view(-1, 1, 2, h.shape[-1]).unbind(2)
            x = _modulate(h.float(), scale, shift, self.config.norm_eps)
            out = F.linear(x, self.head.weight.float(), self.head.bias.float())
        return out.unflatten(-1, (self.config.bits, 2))

    # --- teacher-forced forward (training, evaluation) -----------------------------------------------------------------
    def forward(self, text: torch.Tensor, text_mask: Optional[torch.Tensor], x_wo_prefix: torch.Tensor,
                scales: Sequence, *, rope_anchor: Optional[Scale2D] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Logits (B, L, bits, 2) of every token given the teacher-forcing inputs (B, L-1, bits).

        text: padded T5 features (B, Lt, Ct); text_mask (B, Lt) bool or None. In training mode captions are
        dropped to the null text with probability cond_drop_rate (a copy; `text` is not modified)."""
        scales = as_scales(scales)
        text = self.drop_condition(text, text_mask, generator)
        tc = self.encode_text(text, text_mask)
        h = self.embed(tc, x_wo_prefix, scales)
        cos, sin = self.rope_cos_sin(scales, rope_anchor, h.device)
        h = self.run_blocks(h, tc, cos, sin, AttentionContext(mask=block_causal_mask(scales, h.device)))
        return self.logits(h, tc)


# ---------------------------------------------------------------------------------------------------------------
# Token grids of the residual loop (shared by teacher forcing in train/ and the sampler)
# ---------------------------------------------------------------------------------------------------------------

def vae_scales(scales: Sequence, spatial_patchify: bool) -> list[Scale2D]:
    """Latent grids of the residual loop: the token grids, or twice them with 2x2 patchify."""
    f = 2 if spatial_patchify else 1
    return [(h * f, w * f) for h, w in as_scales(scales)]


def latent_to_tokens(x: torch.Tensor, hw: Scale2D, spatial_patchify: bool) -> torch.Tensor:
    """Per-cell rows (B, H*W, d) of one latent grid -> per-token rows (B, h*w, bits). With patchify a token takes
    the 2x2 cells under it, channel c*4 + dy*2 + dx (pixel_unshuffle order)."""
    if not spatial_patchify:
        return x
    B, n, d = x.shape
    H, W = hw
    grid = x.transpose(1, 2).reshape(B, d, H, W)
    return F.pixel_unshuffle(grid, 2).flatten(2).transpose(1, 2)


def tokens_to_latent(x: torch.Tensor, hw: Scale2D, spatial_patchify: bool) -> torch.Tensor:
    """Inverse of `latent_to_tokens`: (B, h*w, bits) -> (B, H*W, d) with (H, W) the latent grid."""
    if not spatial_patchify:
        return x
    B, n, bits = x.shape
    H, W = hw
    grid = x.transpose(1, 2).reshape(B, bits, H // 2, W // 2)
    return F.pixel_shuffle(grid, 2).flatten(2).transpose(1, 2)


__all__ = ["InfinityConfig", "INFINITY_PRESETS", "InfinityTransformer", "InfinityBlock", "TextConditioning",
           "text_from_varlen", "as_scales", "level_ids", "block_causal_mask", "vae_scales", "latent_to_tokens",
           "tokens_to_latent"]
