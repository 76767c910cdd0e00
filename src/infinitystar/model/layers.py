"""Transformer building blocks: RMSNorm, SwiGLU MLP, grouped-query attention with QK-RMSNorm, the block."""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from infinitystar.model.attention import AttentionContext, attend
from infinitystar.model.rope import apply_rope
from infinitystar.runtime import Compiler


class PackedWeights:
    """The blocks' linear weights reordered into oneDNN's blocked layout, for inference on the CPU.

    At these models' sizes torch's default CPU matmul (MKL sgemm, which repacks the weight on every call) reaches
    ~90 GFLOP/s on one core in fp32; oneDNN's linear on a weight packed once ~105-110 (benchmarks/matmul_shapes.py
    --inference). Under bf16 autocast the packed copy is in bf16 and replaces autocast's cast of every weight.

    `use()` makes every block linear run on the packed weights while it is open, on CPU inputs without autograd
    (elsewhere, under torch.compile and with oneDNN off, the layers run as usual). A bf16 weight is packed on its
    first use; an fp32 one once it has multiplied `FP32_AFTER_ROWS` token rows here, since packing it costs about
    what the faster product saves over ~2,000 rows (the default model's 17-frame video, ~1,200 rows per weight,
    took 10 % longer with every fp32 weight packed on each call; width 384 and 4 clips, ~7,800 rows: 1.06x less
    time packed on each call, 1.14x kept packed across calls). A weight is packed again when it changed (another
    tensor, or an in-place update: its version counter) or the compute dtype did; an assignment to `weight.data`
    bypasses the version counter and is not seen. The copies (one of the block weights) live as long as this
    object: one generation's by default, all of a pipeline's calls for the one it keeps."""

    FP32_AFTER_ROWS = 2048

    def __init__(self):
        self._packed: dict[int, tuple[torch.Tensor, tuple, torch.Tensor]] = {}   # id(layer): (weight, key, copy)
        self._rows: dict[int, int] = {}                                          # id(layer): fp32 rows so far

    def weight(self, layer: nn.Linear, dtype: torch.dtype, rows: int) -> Optional[torch.Tensor]:
        """The packed weight for a product over `rows` token rows, or None: multiply unpacked this time."""
        w = layer.weight
        key = (w.data_ptr(), w._version, dtype)
        entry = self._packed.get(id(layer))
        if entry is not None and entry[0] is w and entry[1] == key:
            return entry[2]
        if dtype == torch.float32:
            seen = self._rows.get(id(layer), 0)
            self._rows[id(layer)] = seen + rows
            if seen < self.FP32_AFTER_ROWS:
                return None
        entry = (w, key, torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), None))
        self._packed[id(layer)] = entry
        return entry[2]

    def __len__(self) -> int:
        """How many weights are packed."""
        return len(self._packed)

    @contextlib.contextmanager
    def use(self):
        token = _PACKED.set(self)
        try:
            yield self
        finally:
            _PACKED.reset(token)


_PACKED: ContextVar[Optional[PackedWeights]] = ContextVar("packed_weights", default=None)
_PACKABLE = (torch.float32, torch.bfloat16)


def _onednn_on() -> bool:
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, on the packed weight of the open `PackedWeights` where there is one (see there). Under
    autocast the product is computed in the autocast dtype, as `layer(x)` would."""
    if torch.compiler.is_compiling():
        return layer(x)
    packed = _PACKED.get()
    if packed is None or x.device.type != "cpu" or torch.is_grad_enabled() or not _onednn_on():
        return layer(x)
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if x.dtype not in _PACKABLE or layer.weight.dtype not in _PACKABLE:
            return layer(x)
    else:
        dtype = layer.weight.dtype
        if x.dtype != dtype:                # as layer(x): a mismatch is its error
            return layer(x)
    if dtype not in _PACKABLE or (dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return layer(x)
    w = packed.weight(layer, dtype, x.numel() // x.shape[-1])
    if w is None:
        return layer(x)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w, bias, "none", [], "")


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
        gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        if torch.is_grad_enabled():
            return linear(self.down_proj, F.silu(gate) * up)
        # inference: nothing else holds the gate's product, so SiLU and the product reuse its memory (two fewer
        # hidden-size temporaries written and read)
        return linear(self.down_proj, F.silu(gate, inplace=True).mul_(up))


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

    # The block calls the three parts itself (compiled halves, token chunks), so there is no forward.
    # (B, L, heads, hd) throughout: RoPE broadcasts over heads, and the attention gets transposed views, so
    # gathering token rows (grouped attention) reads contiguous memory

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> rotated, normalised queries, (B, H, L, hd) as a transposed view."""
        B, L, _ = x.shape
        q = self.q_norm(linear(self.q_proj, x).view(B, L, self.num_heads, self.head_dim))
        return apply_rope(q, cos.unsqueeze(-2), sin.unsqueeze(-2)).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, C) -> rotated, normalised keys and the values, (B, KV, L, hd) each as transposed views."""
        B, L, _ = x.shape
        k = self.k_norm(linear(self.k_proj, x).view(B, L, self.num_kv_heads, self.head_dim))
        v = linear(self.v_proj, x).view(B, L, self.num_kv_heads, self.head_dim)
        return apply_rope(k, cos.unsqueeze(-2), sin.unsqueeze(-2)).transpose(1, 2), v.transpose(1, 2)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output (B, H, L, hd) -> (B, L, C)."""
        B, _, L, _ = out.shape
        return linear(self.o_proj, out.transpose(1, 2).reshape(B, L, -1))


def attention_inputs(block: "Block", x: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's work before attention: norm, projections, QK-norm, RoPE -> q, k, v."""
    h = block.attn_norm(x)
    return (block.attn.queries(h, cos, sin), *block.attn.keys_values(h, cos, sin))


def attention_output_and_mlp(block: "Block", x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """A block's work after attention: output projection and residual, then the MLP half."""
    x = x + block.attn.output(attended)
    return x + block.mlp(block.mlp_norm(x))


# The two halves around the attention call under torch.compile (`InfinityStarTransformer.set_compile`): the
# attention itself stays eager (grouped segments and KV-cache reads are Python-level structure that would
# recompile per batch), while everything elementwise around it (norms, RoPE, SwiGLU, casts, residuals) fuses.
BLOCK_COMPILER = Compiler("the transformer blocks")
COMPILED_HALVES = (BLOCK_COMPILER.wrap(attention_inputs), BLOCK_COMPILER.wrap(attention_output_and_mlp))


class Block(nn.Module):
    """Pre-norm block. `token_chunk` (set by `InfinityStarTransformer.set_token_chunk`): a KV-cached pass over more
    tokens than this runs its attention queries and MLP in chunks of that many tokens, so the large temporaries
    (the MLP's hidden activations, fp32 norms, RoPE) exist for one chunk at a time. Every token's result is
    computed by the same operations as in one pass. `compiled` (`InfinityStarTransformer.set_compile`): the
    halves around the attention run under torch.compile. On the CPU a KV-cached pass without autograd runs those
    halves on blocks of about `cpu_block_rows` token rows (batch x tokens) around one attention call, which keeps
    their temporaries in cache (`InfinityStarTransformer.set_cpu_block_rows`; None: one pass)."""

    token_chunk: Optional[int] = None
    compiled: bool = False
    cpu_block_rows: Optional[int] = 512   # of 128-1024 rows, 512-768 were fastest at width 384 (~3 % over one pass)

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_hidden: int, bias: bool, eps: float):
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, num_heads, num_kv_heads, bias, eps)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x, cos, sin, ctx: AttentionContext, layer: int):
        n = self.token_chunk
        if n and ctx.cache is not None and x.shape[1] > n:
            return self._forward_chunked(x, cos, sin, ctx, layer, n)
        before, after = COMPILED_HALVES if self.compiled else (attention_inputs, attention_output_and_mlp)
        block = max(1, (self.cpu_block_rows or 0) // x.shape[0])
        if (self.cpu_block_rows and ctx.cache is not None and x.device.type == "cpu" and x.shape[1] > block
                and not torch.is_grad_enabled()):
            return self._forward_blocked(x, cos, sin, ctx, layer, block, before, after)
        q, k, v = before(self, x, cos, sin)
        attended = attend(q, k, v, ctx, layer)
        del q, k, v          # at inference they would otherwise live through the MLP (autograd keeps its own)
        return after(self, x, attended)

    def _forward_blocked(self, x, cos, sin, ctx: AttentionContext, layer: int, n: int, before, after):
        # As one pass, but the work around the attention call runs on blocks of n tokens, so its temporaries
        # (the MLP's hidden activations above all) stay in the CPU's cache between the products and the
        # elementwise ops instead of going through memory; the attention itself runs once on all tokens.
        L = x.shape[1]
        n = -(-L // -(-L // n))      # blocks of equal size: a small remainder block multiplies at a lower rate
        spans = [(s, min(n, L - s)) for s in range(0, L, n)]
        parts = [before(self, x[:, s:s + m], cos.narrow(-2, s, m), sin.narrow(-2, s, m)) for s, m in spans]
        q, k, v = (torch.cat([p[i] for p in parts], 2) for i in range(3))
        del parts
        attended = attend(q, k, v, ctx, layer)
        del q, k, v
        out = torch.empty_like(x)
        for s, m in spans:
            out[:, s:s + m] = after(self, x[:, s:s + m], attended[:, :, s:s + m])
        return out

    def _forward_chunked(self, x, cos, sin, ctx: AttentionContext, layer: int, n: int):
        # Keys and values of every token first (each query chunk attends to all of them), then per chunk:
        # queries, attention, output projection, residual, MLP.
        L = x.shape[1]
        parts = [self.attn.keys_values(self.attn_norm(x[:, s:s + n]), cos.narrow(-2, s, min(n, L - s)),
                                       sin.narrow(-2, s, min(n, L - s))) for s in range(0, L, n)]
        k = torch.cat([p[0] for p in parts], 2)
        v = torch.cat([p[1] for p in parts], 2)
        del parts
        out = torch.empty_like(x)
        for s in range(0, L, n):
            m = min(n, L - s)
            xc = x[:, s:s + m]
            q = self.attn.queries(self.attn_norm(xc), cos.narrow(-2, s, m), sin.narrow(-2, s, m))
            out[:, s:s + m] = attention_output_and_mlp(self, xc, attend(q, k, v, ctx, layer))
        return out
