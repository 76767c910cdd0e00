"""The InfinityStar transformer: a decoder-only Qwen3-style stack over [caption tokens, visual tokens].

Visual input is the accumulated continuous code of the current step (64 channels) through `word_embed`; text
features (T5 or the built-in encoder) go through `text_proj` and act as prefix tokens. Per token, one of two
bitwise heads predicts 2 logits per bit: 16 bits on semantic scales, 64 bits on detail scales.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from infinitystar.checkpoint_io import PretrainedMixin
from infinitystar.config import ArchConfig
from infinitystar.model.attention import AttentionContext
from infinitystar.model.layers import Block, RMSNorm
from infinitystar.model.packing import PackedSequence
from infinitystar.model.rope import Rope4D
from infinitystar.runtime import autocast_enabled, fp32_region


CONFIG_TYPE = "infinitystar_transformer"   # the "type" of our config.json


@dataclass
class TransformerConfig(ArchConfig):
    """The InfinityStar transformer (Qwen3-style blocks, 4-D RoPE, text as prefix tokens, two bitwise heads)."""
    width: int = 64
    depth: int = 4
    num_heads: int = 2
    num_kv_heads: Optional[int] = None    # None: as many as query heads (MHA)
    mlp_ratio: float = 4.0
    qkvo_bias: bool = False
    text_channels: int = 2048             # T5 feature size (flan-t5-xl: 2048)
    text_maxlen: int = 512                # offset of visual tokens on the RoPE scale axis
    null_text_len: int = 512              # rows of the learned null text used for guidance
    latent_channels: int = 64             # tokenizer latent channels = detail bits
    semantic_bits: int = 16
    norm_eps: float = 1e-6
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name in ("width", "depth", "num_heads", "num_kv_heads", "text_channels", "text_maxlen",
                     "null_text_len", "latent_channels", "semantic_bits"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 8:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 8 (4-D RoPE splits it over 4 axes)")
        if self.mlp_hidden < 1:
            raise ValueError(f"width * mlp_ratio must be at least 128 (MLP hidden size rounds to 256), got "
                             f"{self.width * self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio / 256)) * 256

    @property
    def detail_bits(self) -> int:
        return self.latent_channels


# Official presets (reference/infinitystar.md section 1.6). `block_chunks` only matters for checkpoint key names.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "infinity_qwen8b": dict(width=4096, depth=36, num_heads=32, num_kv_heads=8, mlp_ratio=4.0),
    "infinity_qwen7b": dict(width=4096, depth=36, num_heads=32, num_kv_heads=8, mlp_ratio=3.0),
    "infinity_qwen_wide14b": dict(width=5632, depth=36, num_heads=44, num_kv_heads=11, mlp_ratio=3.4),
    "infinity_qwen13bMHA": dict(width=5120, depth=40, num_heads=40, mlp_ratio=3.4, qkvo_bias=True),
    "infinity_qwen2_2b": dict(width=2304, depth=28, num_heads=18, mlp_ratio=3.55),
    "infinity_qwen0b": dict(width=512, depth=4, num_heads=4, mlp_ratio=3.55),
    "infinity_qwen2_30b": dict(width=6144, depth=54, num_heads=48, num_kv_heads=12, mlp_ratio=4.0),
    "infinity_qwen14b": dict(width=4608, depth=48, num_heads=36, num_kv_heads=9, mlp_ratio=4.0),
    # test sizes
    "tiny": dict(width=64, depth=2, num_heads=2, num_kv_heads=1, mlp_ratio=4.0, text_channels=32, text_maxlen=64),
    "small": dict(width=256, depth=6, num_heads=4, num_kv_heads=2, mlp_ratio=4.0, text_channels=256, text_maxlen=64),
}


def transformer_preset(name: str, **overrides) -> TransformerConfig:
    if name not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; choose one of {', '.join(TRANSFORMER_PRESETS)}")
    return TransformerConfig(**{**TRANSFORMER_PRESETS[name], **overrides})


class InfinityStarTransformer(PretrainedMixin, nn.Module):
    config_type, folder_what, config_class = CONFIG_TYPE, "InfinityStar transformer", TransformerConfig

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.width
        self.null_text = nn.Parameter(torch.empty(cfg.null_text_len, cfg.text_channels))
        self.text_proj = nn.Linear(cfg.text_channels, C)
        self.word_embed = nn.Linear(cfg.latent_channels, C)
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, cfg.num_kv_heads, cfg.mlp_hidden, cfg.qkvo_bias, cfg.norm_eps)
            for _ in range(cfg.depth))
        self.final_norm = RMSNorm(C, cfg.norm_eps)
        self.head_detail = nn.Linear(C, 2 * cfg.detail_bits)
        self.head_semantic = nn.Linear(C, 2 * cfg.semantic_bits)
        self.rope = Rope4D(cfg.head_dim, cfg.rope_base)
        self.gradient_checkpointing = False
        self.token_chunk: Optional[int] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official from-scratch init: every Linear N(0, 0.02) with zero bias, norms 1, and the null text
        trunc-normal(std 1.2) / sqrt(text channels) from a CPU generator seeded 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        null = _trunc_normal(self.null_text.shape, std=1.2, bound=2.0, seed=0)
        with torch.no_grad():
            self.null_text.copy_(null / math.sqrt(self.config.text_channels))

    # --- pieces -------------------------------------------------------------------------------------------
    def null_text_features(self, length: int) -> torch.Tensor:
        """The learned unconditional caption of a given length (its first `length` rows)."""
        if length > self.null_text.shape[0]:
            raise ValueError(f"caption of {length} tokens is longer than the null text ({self.null_text.shape[0]})")
        return self.null_text[:length]

    def set_token_chunk(self, tokens: Optional[int]) -> None:
        """Run KV-cached passes over more than `tokens` tokens in chunks of that many (None: one pass); see
        `Block`. Bounds generation memory at large scales."""
        if tokens is not None and int(tokens) < 1:
            raise ValueError(f"token_chunk must be a positive number of tokens, got {tokens}")
        self.token_chunk = None if tokens is None else int(tokens)
        for block in self.blocks:
            block.token_chunk = self.token_chunk

    def set_cpu_block_rows(self, rows: Optional[int]) -> None:
        """KV-cached CPU passes without autograd run the work around each attention call on blocks of about `rows`
        token rows (default 512; None: one pass, the path every other device takes); see `Block`."""
        if rows is not None and int(rows) < 1:
            raise ValueError(f"cpu_block_rows must be a positive number of token rows, got {rows}")
        for block in self.blocks:
            block.cpu_block_rows = None if rows is None else int(rows)

    def set_compile(self, enabled: bool) -> None:
        """Run each block's work around its attention call under torch.compile (see `model.layers.Block`): one
        compilation of tens of seconds per process, then faster steps; falls back to eager execution with one
        warning where inductor cannot compile (no C++ compiler). Results equal eager ones to rounding."""
        for block in self.blocks:
            block.compiled = bool(enabled)

    def run_blocks(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if autocast_enabled(x.device):
            # the embeddings are Linear layers, so autocast hands them over in bf16; the residual stream stays
            # float32 (each block adds its bf16 output to it); a bf16 stream raised the training loss by ~3 %
            x = x.float()
        cos, sin = self.rope.cos_sin(positions)
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, ctx, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, ctx, i)
        return x

    def logits(self, h: torch.Tensor, bits: int) -> torch.Tensor:
        """(..., C) hidden states -> (..., bits, 2) logits, in float32 with autocast off."""
        head = self.head_semantic if bits == self.config.semantic_bits else self.head_detail
        if bits not in (self.config.semantic_bits, self.config.detail_bits):
            raise ValueError(f"no head for {bits} bits per token")
        n = self.token_chunk
        with fp32_region(h.device):
            if n and h.dim() == 3 and h.shape[1] > n:     # the float32 norm of a large scale, a chunk at a time
                out = torch.cat([F.linear(self.final_norm(h[:, s:s + n]).float(), head.weight.float(),
                                          head.bias.float()) for s in range(0, h.shape[1], n)], 1)
            else:
                out = F.linear(self.final_norm(h).float(), head.weight.float(), head.bias.float())
        return out.unflatten(-1, (bits, 2))

    # --- training: one packed sequence ----------------------------------------------------------------------
    def forward_packed(self, x_visual: torch.Tensor, captions: Sequence[torch.Tensor], packed: PackedSequence,
                       backend: str = "auto", conditions: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
        """Teacher-forced forward of a packed sequence.

        x_visual: (L_visual, latent_channels) step inputs in packed order; captions: text features (L_i, Ct)
        in the order of `packed.text_segments`; conditions: the condition blocks' latent tokens (L_j,
        latent_channels), (t, h, w) row-major, in the order of `packed.condition_segments` (interactive segments).
        Returns the logits (tokens, bits, 2) of every visual segment. backend: how the attention pattern is
        executed (model/attention.py; "auto" picks by device).
        """
        if x_visual.shape[0] != packed.num_visual:
            raise ValueError(f"x_visual has {x_visual.shape[0]} tokens, the pack has {packed.num_visual}")
        if len(captions) != len(packed.text_segments):
            raise ValueError(f"{len(captions)} captions given, the pack has {len(packed.text_segments)}")
        if [c.shape[0] for c in conditions] != [b.tokens for _, b in packed.condition_segments]:
            raise ValueError(f"condition tokens {[tuple(c.shape) for c in conditions]} do not match the pack's "
                             f"condition blocks {[(b.name, b.tokens) for _, b in packed.condition_segments]}")
        tokens = ([self.word_embed(x_visual)] + [self.word_embed(c) for c in conditions]
                  + [self.text_proj(c) for c in captions])
        pad = packed.length - packed.num_visual - packed.num_condition - packed.num_text
        tokens.append(x_visual.new_zeros(pad, self.config.width))
        x = torch.cat([t[None] for t in tokens], 1)   # not a view: compiled blocks see the same kind of input
        h = self.run_blocks(x, packed.positions, packed.attention_context(backend))[0]
        # split, not slices: a slice's backward fills a full-length buffer, per segment
        parts = h[:packed.num_visual].split([step.scale.tokens for _, step in packed.visual_segments])
        return [self.logits(part, step.scale.bits) for part, (_, step) in zip(parts, packed.visual_segments)]


def _trunc_normal(shape, std: float, bound: float, seed: int) -> torch.Tensor:
    """Truncated normal by inverse CDF of a uniform draw, written out so the values do not depend on the torch
    version (they equal torch 2.5's `trunc_normal_` with a CPU generator, which made the released null text)."""
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))
    lo, hi = cdf(-bound / std), cdf(bound / std)
    g = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.empty(shape, device="cpu").uniform_(2 * lo - 1, 2 * hi - 1, generator=g)
    return (u.erfinv_() * (std * math.sqrt(2))).clamp_(-bound, bound)

