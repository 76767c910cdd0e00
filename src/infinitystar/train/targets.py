"""From a continuous latent to one packed training sequence: scale subsets, residual targets with bitwise
self-correction, one repetition per scale, text dropout, the packed forward and the per-scale weighted loss.
`prepare_interact_samples` lays a video out for the interactive mode (a segment with its condition blocks)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch
from torch import nn

from infinitystar.model.attention import ClipCaptions, read_captions
from infinitystar.model.packing import PackSample, PackedSequence, pack_sequence, select_steps
from infinitystar.quant.interact import InteractConfig, condition_maps, segment_schedule
from infinitystar.quant.residual import BitwiseSelfCorrection, encode_targets
from infinitystar.schedules.pyramid import PyramidConfig, Schedule, Step
from infinitystar.train.config import ScaleSubsetConfig
from infinitystar.train.loss import bitwise_loss, scale_loss_weights


def reference_closure(schedule: Schedule, scales: Sequence[int]) -> list[int]:
    """`scales` plus every scale they attend to, transitively (so the packed segment table is complete)."""
    out, todo = set(), list(scales)
    while todo:
        s = todo.pop()
        if s in out:
            continue
        if not 0 <= s < len(schedule.scales):
            raise IndexError(f"scale {s} is outside the schedule's {len(schedule.scales)} scales")
        out.add(s)
        todo += schedule.refs(s)
    return sorted(out)


def choose_scales(schedule: Schedule, cfg: ScaleSubsetConfig, generator: Optional[torch.Generator] = None
                  ) -> list[int]:
    """Global indices of the scales to pack. Draws only among the sample's own clips and scales (the official
    outcome lists assume full-length videos and index out of range otherwise)."""
    n_all = len(schedule.scales)
    if cfg.mode == "all":
        return list(range(n_all))
    N, C = schedule.scales_per_clip, schedule.num_clips
    weights = (list(cfg.clip_weights) if cfg.clip_weights else [1.0] * C) + [0.0] * C
    w = torch.tensor(weights[:C], dtype=torch.float64)
    if w.sum() <= 0:   # the weights only cover clip counts this sample does not have: take all its clips
        w[-1] = 1.0
    k = int(torch.multinomial(w, 1, generator=generator)) + 1
    lo = min(cfg.min_last_scales, N)
    m = int(torch.randint(lo, N + 1, (), generator=generator))
    last = k - 1
    chosen = [last * N + i for i in range(m)]
    for c in range(last):
        if float(torch.rand((), generator=generator)) < cfg.earlier_full_prob:
            chosen += range(c * N, (c + 1) * N)
    return reference_closure(schedule, chosen)


@dataclass
class PreparedSample:
    schedule: Schedule
    steps: list[Step]                    # one per packed scale, in order
    inputs: torch.Tensor                 # (visual tokens, C): concatenated step inputs
    bits: list[torch.Tensor]             # (tokens, bits) uint8 labels per step
    weights: torch.Tensor                # (steps,) normalised loss weights
    captions: list[str]
    caption_of_clip: list[ClipCaptions]
    drop_text: bool                      # captions replaced by the null text (guidance training)
    conditions: list[torch.Tensor] = field(default_factory=list)   # (tokens, C) per condition block of the
                                                                   # schedule, in its order (interactive)
    bit_weights: Optional[list[torch.Tensor]] = None   # (tokens, bits) per step, mean 1 ("residual" weighting)


def prepare_sample(z: torch.Tensor, schedule: Schedule, captions: Sequence[str],
                   caption_of_clip: Sequence[ClipCaptions],
                   generator: torch.Generator, *, subset: ScaleSubsetConfig, bsc_strength: float = 0.3,
                   repetition: str = "random", text_dropout: float = 0.0, reweight_by_scale: float = 4.0,
                   max_reweight: float = 40.0, bit_weighting: str = "uniform") -> PreparedSample:
    """Targets of one sample. z: (C, T_lat, h, w) latent of the schedule's size. Every random draw comes from
    `generator` in a fixed order, so a sample's targets depend only on its seed."""
    scales = choose_scales(schedule, subset, generator)
    last_clip = schedule.scales[scales[-1]].clip
    steps, inputs, bits, weights, bit_weights = _targets(z, schedule, scales, last_clip + 1, generator, bsc_strength,
                                                         repetition, reweight_by_scale, max_reweight, bit_weighting)
    drop = text_dropout > 0 and float(torch.rand((), generator=generator)) < text_dropout
    # keep only the captions the packed clips read (a long video cut to its first clips needs fewer captions)
    used, of_clip = read_captions(caption_of_clip, last_clip + 1)
    return PreparedSample(schedule, steps, inputs, bits, weights, [captions[i] for i in used], of_clip, drop,
                          bit_weights=bit_weights)


def _targets(z: torch.Tensor, schedule: Schedule, scales: Sequence[int], num_clips: int, generator: torch.Generator,
             bsc_strength: float, repetition: str, reweight_by_scale: float, max_reweight: float,
             bit_weighting: str = "uniform"):
    """Steps (one repetition per packed scale), their inputs and labels under BSC, the per-scale loss weights and,
    with "residual" bit weighting, each label bit's weight (its residual's magnitude over the step's mean)."""
    if bit_weighting not in ("uniform", "residual"):
        raise ValueError(f"bit_weighting must be 'uniform' or 'residual', got {bit_weighting!r}")
    by_residual = bit_weighting == "residual"
    flip = BitwiseSelfCorrection(schedule, bsc_strength, generator) if bsc_strength > 0 else None
    with torch.no_grad():
        targets = encode_targets(z[None].float(), schedule, flip, num_clips=num_clips, magnitudes=by_residual)
    steps = select_steps(schedule, scales, repetition, generator)
    where = {st.index: i for i, st in enumerate(targets.steps)}
    inputs = torch.cat([targets.inputs[where[st.index]][0] for st in steps])
    bits = [targets.bits[where[st.index]][0].reshape(-1, st.scale.bits) for st in steps]
    weights = scale_loss_weights([st.scale.tokens for st in steps], schedule.scales[-1].tokens,
                                 reweight_by_scale, max_reweight).to(z.device)
    bit_weights = None
    if by_residual:
        mags = [targets.magnitudes[where[st.index]][0].reshape(-1, st.scale.bits) for st in steps]
        bit_weights = [m / m.mean() if m.mean() > 0 else torch.ones_like(m) for m in mags]
    return steps, inputs, bits, weights, bit_weights


def boost_scale_weights(sample: PreparedSample, boost: Optional[Sequence[float]],
                        first_frame: Optional[Sequence[float]] = None) -> PreparedSample:
    """The sample with each video-clip step's loss weight times boost[its index within the clip] and, in a sample
    that has video clips, each first-frame step's weight times first_frame[its index] (an image sample keeps its
    weights), renormalised to sum to 1 (`train.clip_scale_boost`, `train.first_frame_scale_boost`; None: 1)."""
    is_video = any(st.scale.clip >= 1 for st in sample.steps)

    def factor(st) -> float:
        if st.scale.clip >= 1:
            return 1.0 if boost is None else boost[st.scale.in_clip]
        return first_frame[st.scale.in_clip] if first_frame is not None and is_video else 1.0

    f = torch.tensor([factor(st) for st in sample.steps], dtype=sample.weights.dtype, device=sample.weights.device)
    weights = sample.weights * f
    return replace(sample, weights=weights / weights.sum())


def prepare_interact_samples(z: torch.Tensor, pyramid: PyramidConfig, num_frames: int, interact: InteractConfig,
                             captions: Sequence[str], caption_of_clip: Sequence[int], generator: torch.Generator, *,
                             first_segment: bool = True, subset: ScaleSubsetConfig, bsc_strength: float = 0.3,
                             repetition: str = "random", text_dropout: float = 0.0, reweight_by_scale: float = 4.0,
                             max_reweight: float = 40.0, bit_weighting: str = "uniform") -> list[PreparedSample]:
    """Targets of one video in the interactive layout (what InfinityStar-Interact's inference runs).

    A segment: video clip k >= 2 (drawn uniformly among the video's whole clips), laid out as a lone clip
    (`segment_schedule`: frames 0..T-1, steps from 0), with the two condition blocks made from the continuous
    latents before it (the previous 1 + T latents and latent 0), each noised with a strength drawn from
    `interact.condition_noise` (the reference's training noise). Every scale is packed, one repetition each, with
    BSC, as the reference's interactive `video_encode` does. With `first_segment`, the first 1 + T latents (image
    + clip 1) are added as a second sample in the text-to-video layout (all scales). A video with fewer than two
    whole clips trains in the text-to-video layout only (`prepare_sample`)."""
    T = pyramid.frames_per_clip
    clips = (z.shape[1] - 1) // T
    common = dict(bsc_strength=bsc_strength, repetition=repetition, text_dropout=text_dropout,
                  reweight_by_scale=reweight_by_scale, max_reweight=max_reweight, bit_weighting=bit_weighting)
    if clips < 2:
        return [prepare_sample(z, pyramid.build(num_frames), captions, caption_of_clip, generator, subset=subset,
                               **common)]
    k = int(torch.randint(2, clips + 1, (), generator=generator))
    seg = segment_schedule(pyramid, interact)
    start = 1 + (k - 1) * T
    steps, inputs, bits, weights, bit_weights = _targets(z[:, start:start + T], seg, range(len(seg.scales)), 1,
                                                         generator, bsc_strength, repetition, reweight_by_scale,
                                                         max_reweight, bit_weighting)
    choices = interact.condition_noise
    noise = {c.name: choices[int(torch.randint(len(choices), (), generator=generator))] for c in seg.conditions}
    maps = condition_maps(z[None, :, start - 1 - T:start].float(), z[None, :, :1].float(), seg, noise, generator)
    drop = text_dropout > 0 and float(torch.rand((), generator=generator)) < text_dropout
    out = [PreparedSample(seg, steps, inputs, bits, weights, [captions[caption_of_clip[k]]], [0], drop,
                          [maps[c.name][0].flatten(1).T for c in seg.conditions], bit_weights)]
    if first_segment:
        tc = pyramid.temporal_compression
        out.insert(0, prepare_sample(z[:, :1 + T], pyramid.build(1 + tc * T), captions, caption_of_clip[:2],
                                     generator, subset=ScaleSubsetConfig(mode="all"), **common))
    return out


@dataclass(frozen=True)
class TextRow:
    """A caption the module encodes itself (trainable text encoder): row `row` of the tokenized prompts,
    its first `length` tokens."""
    row: int
    length: int


class PackedTrainModule(nn.Module):
    """The unit that distributed wrappers shard: its forward swaps dropped captions for the learned null text
    (inside forward, where FSDP has gathered the parameters) and runs the packed forward. With a trainable
    text encoder it also encodes the tokenized prompts, so the encoder's gradients flow and are reduced with
    the transformer's.

    It also returns a zero "anchor" that touches every parameter outside the blocks. A micro-batch may leave the
    null text, the text encoder or one of the two bit heads unused, and ranks must agree on which parameters
    have gradients (FSDP2 reduce-scatters only those, DDP expects all); the anchor's gradient is exactly zero.
    """

    def __init__(self, transformer: nn.Module, text_encoder: Optional[nn.Module] = None):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder

    def forward(self, x_visual: torch.Tensor, captions: Sequence[Union[torch.Tensor, int, TextRow]],
                packed: PackedSequence, backend: str = "auto",
                text_tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                conditions: Sequence[torch.Tensor] = ()) -> tuple[list[torch.Tensor], torch.Tensor]:
        t = self.transformer
        encoded = self.text_encoder(*text_tokens) if text_tokens is not None else None
        feats = []
        for c in captions:
            if isinstance(c, int):
                feats.append(t.null_text_features(c))
            elif isinstance(c, TextRow):
                feats.append(encoded[c.row, :c.length])
            else:
                feats.append(c)
        logits = t.forward_packed(x_visual, feats, packed, backend=backend, conditions=conditions)
        in_blocks = {id(p) for p in t.blocks.parameters()}
        anchor = sum(p.sum() for p in self.parameters() if p.requires_grad and id(p) not in in_blocks) * 0.0
        # clone: FSDP2 warns about views returned from a wrapped module (in-place ops on them skip its hooks)
        return [lg.clone() for lg in logits], anchor


@dataclass
class PackedBatch:
    packed: PackedSequence
    x_visual: torch.Tensor
    captions: list[Union[torch.Tensor, int, TextRow]]   # features (L, Ct); an int L: the null text of that
                                                        # length; a TextRow: encoded inside the module
    samples: list[PreparedSample]
    conditions: list[torch.Tensor] = field(default_factory=list)   # in packed.condition_segments order

    @property
    def tokens(self) -> int:
        return self.packed.num_visual + self.packed.num_condition + self.packed.num_text


def _caption_length(f: Union[torch.Tensor, TextRow]) -> int:
    return f.length if isinstance(f, TextRow) else f.shape[0]


def pack_batch(samples: Sequence[PreparedSample], text_features: Sequence[Sequence[Union[torch.Tensor, TextRow]]],
               text_maxlen: int, pad_multiple: int, device) -> PackedBatch:
    """text_features[b][c]: features (L, Ct) of caption c of sample b, or its TextRow."""
    packs = [PackSample(s.schedule, s.steps, [_caption_length(f) for f in feats], s.caption_of_clip)
             for s, feats in zip(samples, text_features)]
    packed = pack_sequence(packs, text_maxlen, pad_multiple).to(device)
    captions: list[Union[torch.Tensor, int, TextRow]] = []
    for b, c in packed.text_segments:
        f = text_features[b][c]
        if samples[b].drop_text:
            captions.append(_caption_length(f))
        else:
            captions.append(f if isinstance(f, TextRow) else f.to(device))
    x = torch.cat([s.inputs for s in samples]).to(device)
    conditions = [samples[b].conditions[samples[b].schedule.conditions.index(block)].to(device)
                  for b, block in packed.condition_segments]
    return PackedBatch(packed, x, captions, list(samples), conditions)


@dataclass
class LossOutput:
    loss: torch.Tensor                  # mean over samples of each sample's weighted per-scale loss
    scale_acc: list[tuple[Step, torch.Tensor]]   # (step, bit accuracy) of every packed segment (detached)
    sample_losses: list[torch.Tensor]


def packed_loss(logits: Sequence[torch.Tensor], batch: PackedBatch, anchor: Optional[torch.Tensor] = None,
                focal_gamma: float = 0.0) -> LossOutput:
    """Per sample: sum_s w_s * mean_tokens(mean_bits CE) with the normalised official weights; then the mean
    over the batch's samples (plus the module's zero anchor, see PackedTrainModule)."""
    per_sample: list[list[torch.Tensor]] = [[] for _ in batch.samples]
    accs = []
    bits_iter = [iter(s.bits) for s in batch.samples]
    bit_weights_iter = [iter(s.bit_weights) if s.bit_weights is not None else None for s in batch.samples]
    for (b, step), lg in zip(batch.packed.visual_segments, logits):
        bits = next(bits_iter[b]).to(lg.device)
        w = next(bit_weights_iter[b]).to(lg.device) if bit_weights_iter[b] is not None else None
        ce, acc = bitwise_loss(lg, bits, w, focal_gamma)
        per_sample[b].append(ce.mean())
        accs.append((step, acc.mean().detach()))
    losses = [(torch.stack(ls) * s.weights.to(ls[0].device)).sum() for ls, s in zip(per_sample, batch.samples)]
    total = torch.stack(losses).mean()
    if anchor is not None:
        total = total + anchor
    return LossOutput(total, accs, [l.detach() for l in losses])
