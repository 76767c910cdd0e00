"""Packed training sequences: the visual tokens of the selected steps of every sample, then the condition blocks
of interactive segments, then every caption, then padding, with a segment table that encodes the attention
pattern and the 4-D RoPE positions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from infinitystar.model.attention import (AttentionContext, ClipCaptions, SegmentGroups, dense_mask,
                                          flex_block_mask, caption_orders, resolve_backend, segment_groups,
                                          visible_context)
from infinitystar.model.rope import condition_positions, text_positions, visual_positions
from infinitystar.schedules.pyramid import ConditionBlock, Schedule, Step


def select_steps(schedule: Schedule, scale_indices: Optional[Sequence[int]] = None,
                 repetition: Literal["random", "last"] = "random",
                 generator: Optional[torch.Generator] = None) -> list[Step]:
    """One step per selected scale. "random" draws the repetition uniformly (official training); "last" takes
    the last one, which is what generation caches and later scales attend to."""
    if repetition not in ("random", "last"):
        raise ValueError(f"repetition must be 'random' or 'last', got {repetition!r}")
    idx = range(len(schedule.scales)) if scale_indices is None else scale_indices
    out = []
    for si in idx:
        steps = schedule.scale_steps(si)
        r = len(steps) - 1 if repetition == "last" else int(torch.randint(len(steps), (), generator=generator))
        out.append(steps[r])
    return out


@dataclass
class PackSample:
    """One sample of a pack: its schedule, the steps packed (one per selected scale) and its captions."""
    schedule: Schedule
    steps: list[Step]
    caption_lengths: list[int]
    caption_of_clip: Optional[list[ClipCaptions]] = None   # default: every clip uses caption 0

    def caption_index(self) -> list[ClipCaptions]:
        if self.caption_of_clip is None:
            return [0] * self.schedule.num_clips
        if len(self.caption_of_clip) < self.schedule.num_clips:
            raise ValueError(f"caption_of_clip has {len(self.caption_of_clip)} entries for "
                             f"{self.schedule.num_clips} clips")
        return list(self.caption_of_clip)


@dataclass
class PackedSequence:
    samples: list[PackSample]
    segment_lengths: list[int]
    visual_segments: list[tuple[int, Step]]    # (sample, step) for segments 0..S-1
    condition_segments: list[tuple[int, ConditionBlock]]   # (sample, block) for the next segments
    text_segments: list[tuple[int, int]]       # (sample, caption) for the following segments
    document_id: torch.Tensor                  # (L,) segment of every token
    segment_table: torch.Tensor                # (n_seg, n_seg) bool, official semantics (padding sees nothing)
    positions: torch.Tensor                    # (L, 4) RoPE positions (padding rows 0)
    num_visual: int                            # tokens of the generated steps
    num_condition: int                         # tokens of the condition blocks (they follow the visual tokens)
    num_text: int

    @property
    def length(self) -> int:
        return self.document_id.shape[0]

    def attention_table(self) -> torch.Tensor:
        """The segment table used for attention: segments that see nothing (padding) see themselves, so no
        softmax row is empty (an all-masked row gives NaN under SDPA). Their outputs are discarded."""
        t = self.segment_table.clone()
        empty = ~t.any(1)
        t[empty, empty] = True
        return t

    def attention_groups(self) -> SegmentGroups:
        """The segment table as groups for grouped SDPA (padding attends to nothing and gets zeros)."""
        return segment_groups(self.segment_lengths, self.segment_table)

    def attention_context(self, backend: str = "auto") -> AttentionContext:
        """How this pack's attention runs under `backend` (model/attention.py; "auto" picks by device)."""
        backend = resolve_backend(backend, self.document_id.device)
        if backend == "grouped":
            return AttentionContext(groups=self.attention_groups())
        if backend == "sdpa":
            return AttentionContext(mask=dense_mask(self.document_id, self.attention_table()))
        return AttentionContext(block_mask=flex_block_mask(self.document_id, self.attention_table()))

    def to(self, device) -> "PackedSequence":
        self.document_id = self.document_id.to(device)
        self.segment_table = self.segment_table.to(device)
        self.positions = self.positions.to(device)
        return self


def pack_sequence(samples: Sequence[PackSample], text_maxlen: int, pad_multiple: int = 128) -> PackedSequence:
    vis: list[tuple[int, Step]] = [(b, st) for b, s in enumerate(samples) for st in s.steps]
    cond: list[tuple[int, ConditionBlock]] = [(b, c) for b, s in enumerate(samples) for c in s.schedule.conditions]
    txt: list[tuple[int, int]] = [(b, c) for b, s in enumerate(samples) for c in range(len(s.caption_lengths))]
    seg_of_scale = {(b, st.scale.index): i for i, (b, st) in enumerate(vis)}
    seg_of_cond = {(b, c.name): len(vis) + i for i, (b, c) in enumerate(cond)}
    seg_of_text = {key: len(vis) + len(cond) + i for i, key in enumerate(txt)}
    lengths = ([st.scale.tokens for _, st in vis] + [c.tokens for _, c in cond]
               + [samples[b].caption_lengths[c] for b, c in txt])
    n_real = sum(lengths)
    pad = (-n_real) % pad_multiple if pad_multiple > 1 else 0
    n_seg = len(lengths) + 1
    table = torch.zeros(n_seg, n_seg, dtype=torch.bool)
    for i, (b, st) in enumerate(vis):
        refs, captions, conditions = visible_context(samples[b].schedule, st.scale.index, samples[b].caption_index())
        table[i, i] = True
        for caption in captions:
            if (b, caption) not in seg_of_text:
                raise ValueError(f"sample {b}: clip {st.scale.clip} uses caption {caption}, which is not given")
            table[i, seg_of_text[(b, caption)]] = True
        for name in conditions:
            table[i, seg_of_cond[(b, name)]] = True
        for r in refs:
            if (b, r) not in seg_of_scale:
                raise ValueError(f"sample {b}: scale {st.scale.index} attends to scale {r}, which is not packed; "
                                 "every selected scale's reference scales must be selected too")
            table[i, seg_of_scale[(b, r)]] = True
    for j in [*seg_of_cond.values(), *seg_of_text.values()]:
        table[j, j] = True
    document_id = torch.repeat_interleave(torch.arange(n_seg), torch.tensor(lengths + [pad]))
    pos = [visual_positions(st, samples[b].schedule.full_hw, text_maxlen) for b, st in vis]
    pos += [condition_positions(c, samples[b].schedule.full_hw, text_maxlen) for b, c in cond]
    orders = [caption_orders(s.caption_index(), len(s.caption_lengths)) for s in samples]
    pos += [text_positions(samples[b].caption_lengths[c], order=orders[b][c]) for b, c in txt]
    pos.append(torch.zeros(pad, 4, dtype=torch.long))
    n_vis, n_cond = len(vis), len(cond)
    return PackedSequence(list(samples), lengths + [pad], vis, cond, txt, document_id, table, torch.cat(pos),
                          sum(lengths[:n_vis]), sum(lengths[n_vis:n_vis + n_cond]), sum(lengths[n_vis + n_cond:]))
