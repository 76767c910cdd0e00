"""The spacetime attention pattern and its executions: packed sequences (training) and a per-scale KV cache
(generation).

The pattern (official "spacetime sparse attention"): tokens of a scale attend to every token of their own scale,
to the caption of their clip, to the scales `Schedule.refs` lists (sparse: the previous clip's last scale;
dense: every earlier scale) and, in an interactive segment, to every condition block of the schedule. Captions
and condition blocks attend to themselves only. `visible_context` is the single definition; the packed segment
table (model/packing.py) and the generation loop both read it.

A packed sequence runs with one of three backends that compute the same function:
  * "grouped": every query segment attends to its visible segments' keys, gathered; segments with the same
    (query, key) lengths are stacked into one SDPA call. No masked pair is computed (the CPU default).
  * "sdpa": one SDPA over the whole packed length with the dense (L, L) segment mask (for comparison).
  * "flex": FlexAttention with a block mask (compiled on CUDA; the CUDA default).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from infinitystar.runtime import fp32_region
from infinitystar.schedules.pyramid import Schedule


# what one clip reads of a sample's captions: one caption's index, or several (e.g. a long video's first frame
# reading every segment's caption, `first_frame_all_captions`)
ClipCaptions = Union[int, tuple[int, ...]]


def _several(entry: ClipCaptions) -> bool:
    return isinstance(entry, (tuple, list))


def captions_of(entry: ClipCaptions) -> tuple[int, ...]:
    """The caption indices of one `caption_of_clip` entry."""
    return tuple(entry) if _several(entry) else (int(entry),)


def segment_captions(num_clips: int, num_captions: int, first_frame_all: bool = False) -> list[ClipCaptions]:
    """Which caption each clip of a video with a caption per segment reads: clip 0 (the first frame) and clip 1 the
    first segment's, clip k segment k-1's (the last one repeats). `first_frame_all`: the first frame reads every
    segment's caption (`data.first_frame_all_captions`, the `first_frame_all_prompts` default)."""
    out: list[ClipCaptions] = [min(max(c - 1, 0), num_captions - 1) for c in range(num_clips)]
    if first_frame_all and num_captions > 1:
        out[0] = tuple(range(num_captions))
    return out


def read_captions(caption_of_clip: Sequence[ClipCaptions], clips: int) -> tuple[list[int], list[ClipCaptions]]:
    """(the captions that clips 0..clips-1 read, in order; every entry renumbered into that list, a caption
    outside it as 0): what a sample keeps when fewer clips than its captions cover are used."""
    used = sorted({i for e in caption_of_clip[:clips] for i in captions_of(e)})
    new = {old: k for k, old in enumerate(used)}
    return used, [tuple(new.get(i, 0) for i in e) if _several(e) else new.get(e, 0) for e in caption_of_clip]


def caption_orders(caption_of_clip: Sequence[ClipCaptions], num_captions: int) -> list[int]:
    """The frame position (`text_positions`) of each of a sample's captions. When a clip reads several captions,
    caption k sits at k, or that clip could not tell which comes first (the segments' order decides where a video
    can start); otherwise every caption sits at 0, the official layout."""
    ordered = any(_several(e) for e in caption_of_clip)
    return list(range(num_captions)) if ordered else [0] * num_captions


def visible_context(schedule: Schedule, scale_index: int,
                    caption_of_clip: Sequence[ClipCaptions]) -> tuple[list[int], tuple[int, ...], list[str]]:
    """(earlier scales, caption indices, condition block names) that the tokens of a scale may attend to, besides
    their own scale. Captions and condition blocks see only themselves."""
    return (schedule.refs(scale_index), captions_of(caption_of_clip[schedule.scales[scale_index].clip]),
            [c.name for c in schedule.conditions])


# ---------------------------------------------------------------------------------------------------------------
# Packed sequences (training): segments with a boolean segment table.
# ---------------------------------------------------------------------------------------------------------------

BACKENDS = ("auto", "grouped", "sdpa", "flex")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto": FlexAttention on CUDA (a fused kernel skips masked blocks), grouped SDPA elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "flex" if torch.device(device).type == "cuda" else "grouped"
    return backend


@dataclass
class SegmentGroup:
    """`queries`: n query segments of q_len tokens each; `keys`: the segments each of them sees, query after
    query (kv_len tokens per query)."""
    q_len: int
    kv_len: int
    queries: list[int]
    keys: list[int]


@dataclass
class SegmentGroups:
    """The packed attention as a few dense SDPA calls: query segments with the same (query length, key length)
    are stacked into one call on their gathered keys. Segments in no group (padding) attend to nothing and get
    zeros. Everything is split and concatenated along whole segments: contiguous copies forward and backward
    (an index gather's backward is a scatter-add, several times slower on the CPU)."""
    lengths: list[int]
    groups: list[SegmentGroup]


def segment_groups(segment_lengths: Sequence[int], segment_table: torch.Tensor) -> SegmentGroups:
    """Group the segments of a packed sequence; segment i sees the segments j with segment_table[i, j]."""
    visible = [torch.nonzero(row).flatten().tolist() for row in segment_table]
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, seen in enumerate(visible):
        if seen and segment_lengths[i]:
            buckets.setdefault((segment_lengths[i], sum(segment_lengths[j] for j in seen)), []).append(i)
    groups = [SegmentGroup(q_len, kv_len, queries, [j for i in queries for j in visible[i]])
              for (q_len, kv_len), queries in buckets.items()]
    return SegmentGroups(list(segment_lengths), groups)


def _stack_segments(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Concatenate (len, heads, hd) segment rows into (n, heads, rows / n, hd) SDPA input (a view when one)."""
    x = parts[0] if len(parts) == 1 else torch.cat(parts)
    return x.unflatten(0, (n, -1)).transpose(1, 2)


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sg: SegmentGroups, gqa: bool) -> torch.Tensor:
    """q (1, H, L, hd), k, v (1, KV, L, hd) -> (1, H, L, hd): one SDPA per group. On the CPU the groups run in
    float32 with autocast off, whatever the input dtype: at these segment sizes the CPU's bf16 flash-attention
    backward costs about twice the float32 one (much of it a fixed cost per call), and its forward no less."""
    if q.device.type == "cpu":
        with fp32_region(q.device):
            return _grouped_sdpa(q.float(), k.float(), v.float(), sg, gqa).to(q.dtype)
    return _grouped_sdpa(q, k, v, sg, gqa)


def _grouped_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sg: SegmentGroups, gqa: bool) -> torch.Tensor:
    qs, ks, vs = (t[0].transpose(0, 1).split(sg.lengths) for t in (q, k, v))    # per segment (len, heads, hd)
    out: list[Optional[torch.Tensor]] = [None] * len(sg.lengths)
    for g in sg.groups:
        n = len(g.queries)
        o = F.scaled_dot_product_attention(_stack_segments([qs[i] for i in g.queries], n),
                                           _stack_segments([ks[j] for j in g.keys], n),
                                           _stack_segments([vs[j] for j in g.keys], n), enable_gqa=gqa)
        for i, oi in zip(g.queries, o.transpose(1, 2).unbind(0)):
            out[i] = oi
    out = [qs[i].new_zeros(qs[i].shape) if o is None else o for i, o in enumerate(out)]
    return torch.cat(out).transpose(0, 1)[None]


def dense_mask(document_id: torch.Tensor, segment_table: torch.Tensor) -> torch.Tensor:
    """(L, L) boolean mask: query i may attend to key j iff segment_table[doc[i], doc[j]]."""
    return segment_table[document_id][:, document_id]


def flex_block_mask(document_id: torch.Tensor, segment_table: torch.Tensor, block_size: int = 128):
    """The same mask as a FlexAttention BlockMask (GPU training; also runs eagerly on CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return segment_table[document_id[q], document_id[kv]]

    L = document_id.shape[0]
    return create_block_mask(mask_mod, None, None, L, L, device=document_id.device, BLOCK_SIZE=block_size)


# ---------------------------------------------------------------------------------------------------------------
# KV cache (generation)
# ---------------------------------------------------------------------------------------------------------------

class KVCache:
    """Per-layer key/value entries keyed by scale index, ("text", caption index) or ("condition", name); keys are
    stored after RoPE and before the grouped-query repeat. An entry may carry a key mask (B, L) for padded captions."""

    def __init__(self, depth: int):
        self.layers: list[dict[Hashable, tuple[torch.Tensor, torch.Tensor]]] = [dict() for _ in range(depth)]
        self.key_masks: dict[Hashable, Optional[torch.Tensor]] = {}

    def keys(self) -> list[Hashable]:
        return list(self.layers[0])

    def evict(self, key: Hashable) -> None:
        for layer in self.layers:
            layer.pop(key, None)
        self.key_masks.pop(key, None)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for layer in self.layers for k, v in layer.values())


@dataclass
class AttentionContext:
    """What a forward pass attends to.

    Packed mode: `groups` for grouped SDPA, `mask` (L, L) bool for SDPA, or `block_mask` for FlexAttention.
    Cached mode: `cache` with the entries to `read` (prepended in order) and the key to `write` this pass's own
    keys/values under (None: not stored). `self_mask` (B, L) masks padded own tokens (captions of unequal length).
    """
    mask: Optional[torch.Tensor] = None
    block_mask: object = None
    groups: Optional[SegmentGroups] = None
    cache: Optional[KVCache] = None
    read: Sequence[Hashable] = ()
    write: Optional[Hashable] = None
    self_mask: Optional[torch.Tensor] = None


_compiled_flex = None


def _flex(q, k, v, block_mask, gqa: bool):
    """FlexAttention: compiled on GPUs (fused kernel); eager elsewhere (materialises scores; tests only)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)  # packed lengths vary per batch
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, layer: int) -> torch.Tensor:
    """q (B, H, Lq, hd); k, v (B, KV, L, hd) of the pass's own tokens -> (B, H, Lq, hd)."""
    gqa = q.shape[1] != k.shape[1]
    if ctx.groups is not None:
        return _grouped(q, k, v, ctx.groups, gqa)
    if ctx.block_mask is not None:
        return _flex(q, k, v, ctx.block_mask, gqa)
    if ctx.cache is None:
        mask = None if ctx.mask is None else ctx.mask[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    entries = ctx.cache.layers[layer]
    if ctx.write is not None:
        entries[ctx.write] = (k, v)
        ctx.cache.key_masks[ctx.write] = ctx.self_mask
    ks = [entries[key][0] for key in ctx.read] + [k]
    vs = [entries[key][1] for key in ctx.read] + [v]
    masks = [ctx.cache.key_masks.get(key) for key in ctx.read] + [ctx.self_mask]
    mask = None
    if any(m is not None for m in masks):
        B = q.shape[0]
        mask = torch.cat([torch.ones(B, kk.shape[2], dtype=torch.bool, device=q.device) if m is None else m
                          for m, kk in zip(masks, ks)], dim=1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, torch.cat(ks, 2), torch.cat(vs, 2), attn_mask=mask, enable_gqa=gqa)
