"""The generation loop: clip by clip, scale by scale, repetition by repetition, with a per-scale KV cache.

Per step: input = word_embed(resized running code map); logits / tau; guidance on logits (CFG or APG);
independent per-bit sampling; codes added to the clip's running map. A teacher-forced prefix (image-to-video,
continuation) takes given bits instead of sampling, and runs the transformer only where a later scale will
attend to the result (the last repetition of a referenced scale), so forced steps cost almost nothing.

`GenerationState` holds what lives between clips (the KV cache of captions, condition blocks and the reference
scales later clips attend to); `GenerationState.run_clip` generates one clip. `generate` (a whole schedule at
once) and the streaming API (`infinitystar.pipelines.stream`, one clip per call) both drive clips through it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch

from infinitystar.model.attention import (AttentionContext, ClipCaptions, KVCache, caption_orders, captions_of,
                                          visible_context)
from infinitystar.model.infinitystar import InfinityStarTransformer
from infinitystar.model.layers import PackedWeights
from infinitystar.model.rope import condition_positions, text_positions, visual_positions
from infinitystar.quant.residual import CodeAccumulator
from infinitystar.runtime import autocast, fp32_region
from infinitystar.sampling.bits import Generators, OnStep, StepInfo, check_generators, per_scale, sample_bits
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import Schedule, Step


@dataclass
class Caption:
    """Text features of a batch of prompts: (B, L, Ct) with an optional (B, L) mask of real tokens."""
    features: torch.Tensor
    mask: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.features.dim() != 3:
            raise ValueError(f"caption features must be (batch, tokens, channels), got {tuple(self.features.shape)}")
        if self.features.shape[1] == 0:
            raise ValueError("a caption must have at least one token")
        if self.mask is not None and self.mask.shape != self.features.shape[:2]:
            raise ValueError(f"caption mask {tuple(self.mask.shape)} does not match features "
                             f"{tuple(self.features.shape[:2])}")


@dataclass
class GenerationOutput:
    codes: torch.Tensor                                  # (B, C, T_lat, H, W): the latent for the decoder
    bits: list[torch.Tensor]                             # per step (B, t, h, w, c), uint8
    logits: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per step when recorded
    peak_cache_bytes: int = 0
    stopped: bool = False                                # `on_step` asked to stop before the schedule's end


@dataclass
class SamplingOptions:
    """How bits are drawn from the logits of a step (per-scale temperatures are a list elsewhere)."""
    guidance: Guidance = field(default_factory=Guidance)   # applied on scales whose guidance scale is not 1
    generator: Generators = None          # one, or a list with one per sample
    greedy: bool = False
    record_logits: bool = False           # keep per step the cond / uncond / guided logits (parity tests)
    on_step: OnStep = None                # called after every step with a StepInfo; True stops the generation


class GenerationState:
    """What generation keeps between clips: the KV cache (captions, condition blocks, and the reference scales
    that later clips attend to) and the batch layout ([conditional, unconditional] rows when guided).

    With sparse attention the cache holds, between clips, the captions still in use and the last scale of the
    previous clip, so a clip costs the same however long the video already is.

    precision: the resolved compute dtype (`runtime.resolve_precision`) of the transformer blocks, which run under
    its autocast; the bit heads, guidance, sampling and the code maps stay float32 either way.
    pack_weights: on the CPU the blocks' linears run on weights packed for oneDNN (`PackedWeights`: faster matmuls
    for one more copy of the block weights). True: packed for this state; a `PackedWeights`: that one, whose copies
    outlive the state (a pipeline keeps one for all its calls); False: the plain layers.
    """

    def __init__(self, model: InfinityStarTransformer, batch: int, device, use_cfg: bool,
                 precision: torch.dtype = torch.float32, pack_weights: Union[bool, PackedWeights] = True):
        self.model = model
        self.precision = precision
        self.packed = pack_weights if isinstance(pack_weights, PackedWeights) else (
            PackedWeights() if pack_weights else None)
        self.batch = batch
        self.device = torch.device(device)
        self.use_cfg = use_cfg
        self.dtype = model.word_embed.weight.dtype
        self.cache = KVCache(model.config.depth)
        self.peak_cache_bytes = 0

    def _packed(self):
        return self.packed.use() if self.packed is not None else contextlib.nullcontext()

    def _note_memory(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache.nbytes())

    def add_caption(self, key: int, caption: Caption, negative: Optional[Caption] = None, order: int = 0) -> None:
        """Run a caption through the blocks and cache it as ("text", key); when guided, its unconditional half
        is the learned null text, or the `negative` caption (a negative prompt). order: its frame position
        (`text_positions`)."""
        feats, mask = caption.features.to(device=self.device, dtype=self.dtype), caption.mask
        if feats.shape[0] != self.batch:
            raise ValueError(f"caption batch {feats.shape[0]} differs from the generation batch {self.batch}")
        if self.use_cfg:
            feats, mask = self._with_unconditional(feats, mask, negative)
        ctx = AttentionContext(cache=self.cache, write=("text", key), self_mask=mask)
        with autocast(self.device, self.precision), self._packed():
            self.model.run_blocks(self.model.text_proj(feats), text_positions(feats.shape[1], self.device, order), ctx)
        self._note_memory()

    def _with_unconditional(self, feats: torch.Tensor, mask: Optional[torch.Tensor], negative: Optional[Caption]
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """[conditional ; unconditional] text: the null text with the caption's length, or the negative caption
        (both padded to the longer one; padded keys are masked)."""
        if negative is None:
            null = self.model.null_text_features(feats.shape[1]).to(self.dtype)[None].expand_as(feats)
            return torch.cat([feats, null]), None if mask is None else torch.cat([mask, mask])
        neg = negative.features.to(device=self.device, dtype=self.dtype)
        if neg.shape[0] != feats.shape[0]:
            raise ValueError(f"negative caption batch {neg.shape[0]} differs from the caption batch {feats.shape[0]}")
        real = lambda t: torch.ones(t.shape[:2], dtype=torch.bool, device=self.device)
        neg_mask = negative.mask.to(self.device) if negative.mask is not None else real(neg)
        mask = mask.to(self.device) if mask is not None else real(feats)
        L = max(feats.shape[1], neg.shape[1])
        pad = lambda t, m: (torch.nn.functional.pad(t, (0, 0, 0, L - t.shape[1])),
                            torch.nn.functional.pad(m, (0, L - m.shape[1])))
        (feats, mask), (neg, neg_mask) = pad(feats, mask), pad(neg, neg_mask)
        return torch.cat([feats, neg]), torch.cat([mask, neg_mask])

    def drop_caption(self, key: int) -> None:
        self.cache.evict(("text", key))

    def add_conditions(self, schedule: Schedule, maps: Mapping[str, torch.Tensor]) -> None:
        """Run every condition block of the schedule (its latent map (B, C, t, h, w) in `maps`) through the blocks,
        attending only to itself, and cache it as ("condition", name). Replaces earlier blocks of that name."""
        missing = [c.name for c in schedule.conditions if c.name not in maps]
        if missing or set(maps) - {c.name for c in schedule.conditions}:
            raise ValueError(f"condition maps {sorted(maps)} do not match the schedule's blocks "
                             f"{[c.name for c in schedule.conditions]}")
        for block in schedule.conditions:
            z = maps[block.name]
            want = (self.batch, self.model.config.latent_channels, *block.shape)
            if tuple(z.shape) != want:
                raise ValueError(f"condition {block.name!r} has shape {tuple(z.shape)}, expected {want}")
            ctx = AttentionContext(cache=self.cache, write=("condition", block.name))
            with autocast(self.device, self.precision), self._packed():
                x = self.model.word_embed(z.to(device=self.device, dtype=self.dtype).flatten(2).transpose(1, 2))
                if self.use_cfg:
                    x = torch.cat([x, x])
                self.model.run_blocks(x, condition_positions(block, schedule.full_hw, self.model.config.text_maxlen,
                                                             self.device), ctx)
        self._note_memory()

    def run_clip(self, schedule: Schedule, clip: int, caption_of_clip: Sequence[ClipCaptions], tau: Sequence[float],
                 options: SamplingOptions, out: "GenerationOutput", prefix_bits: Sequence[torch.Tensor] = (),
                 keep_for: Optional[Schedule] = None) -> torch.Tensor:
        """Generate clip `clip` of `schedule`; returns its code map (B, C, t, H, W) and appends its bits (and
        logits) to `out`. tau: one value per scale of the schedule. keep_for: the schedule whose later scales
        decide which keys/values outlive this clip (default `schedule`; streaming passes the schedule with one
        more clip, so the last scale stays for the next call). When `options.on_step` asks to stop, the clip's
        map so far is returned and `out.stopped` is set."""
        model, B = self.model, self.batch
        cfgm = model.config
        guidance_scale = options.guidance.scales(len(schedule.scales))
        last_ref = (keep_for or schedule).last_reference
        acc = CodeAccumulator(B, cfgm.latent_channels, schedule.clip_size(clip), device=self.device,
                              dtype=torch.float32)
        # one autocast region around the clip's steps (each step opens its own inside): autocast keeps the bf16
        # copies of the weights it casts until its outermost region ends, so they are cast once per clip instead
        # of once per step (the bit heads, guidance and sampling stay float32 as before)
        with autocast(self.device, self.precision), self._packed():
            for scale in schedule.clip_scales(clip):
                for step in schedule.scale_steps(scale.index):
                    forced = step.index < len(prefix_bits)
                    keep_kv = step.is_last_repetition and scale.index in last_ref
                    want_logits = options.record_logits or not forced
                    if want_logits or keep_kv:
                        h = self._forward(schedule, step, acc, caption_of_clip, keep_kv)
                    if want_logits:
                        guided = self._logits(h, scale.bits, tau[scale.index], guidance_scale[scale.index], options,
                                              out)
                    if forced:
                        bits = prefix_bits[step.index].to(device=self.device, dtype=torch.uint8)
                        bits = bits.reshape(B, *scale.shape, scale.bits)
                    else:
                        bits = sample_bits(guided, generator=options.generator, greedy=options.greedy)
                        bits = bits.reshape(B, *scale.shape, scale.bits)
                    acc.add(bits)
                    out.bits.append(bits)
                    if step.is_last_repetition:
                        for r in [r for r, last in last_ref.items() if last == scale.index]:
                            self.cache.evict(r)
                    self._note_memory()
                    if options.on_step is not None:
                        with fp32_region(self.device):      # the caller's callback runs as outside generation
                            stop = options.on_step(StepInfo(step.index, len(schedule.steps), scale.index, scale.clip,
                                                            tuple(scale.shape), bits, forced))
                        if stop:
                            out.stopped = True
                            break
                if out.stopped:
                    break
        out.peak_cache_bytes = max(out.peak_cache_bytes, self.peak_cache_bytes)
        return acc.F

    def _forward(self, schedule: Schedule, step: Step, acc: CodeAccumulator,
                 caption_of_clip: Sequence[ClipCaptions], keep_kv: bool) -> torch.Tensor:
        scale = step.scale
        code_in = acc.inputs(scale.shape).to(self.dtype)
        refs, caps, conditions = visible_context(schedule, scale.index, caption_of_clip)
        read = [*refs, *(("text", c) for c in caps), *(("condition", c) for c in conditions)]
        ctx = AttentionContext(cache=self.cache, read=read, write=scale.index if keep_kv else None)
        with autocast(self.device, self.precision):
            x = self.model.word_embed(code_in)
            if self.use_cfg:
                x = torch.cat([x, x])
            return self.model.run_blocks(
                x, visual_positions(step, schedule.full_hw, self.model.config.text_maxlen, self.device), ctx)

    def _logits(self, h: torch.Tensor, bits: int, tau: float, scale_cfg: float, options: SamplingOptions,
                out: "GenerationOutput") -> torch.Tensor:
        logits = self.model.logits(h, bits) / tau                  # (B or 2B, L, c, 2)
        if self.use_cfg:
            cond, uncond = logits[:self.batch], logits[self.batch:]
            guided = options.guidance(cond.flatten(2), uncond.flatten(2), scale_cfg).view_as(cond)
        else:
            cond, uncond, guided = logits, None, logits
        if options.record_logits:
            out.logits.append({"cond": cond, "uncond": uncond, "guided": guided})
        return guided


@torch.no_grad()
def generate(
    model: InfinityStarTransformer,
    schedule: Schedule,
    captions: Union[Caption, Sequence[Caption]],
    *,
    caption_of_clip: Optional[Sequence[ClipCaptions]] = None,
    conditions: Optional[Mapping[str, torch.Tensor]] = None,
    guidance: Guidance = Guidance(),
    negative_captions: Optional[Sequence[Caption]] = None,
    tau: Union[float, Sequence[float]] = 1.0,
    generator: Generators = None,
    greedy: bool = False,
    prefix_bits: Sequence[torch.Tensor] = (),
    record_logits: bool = False,
    on_step: OnStep = None,
    precision: torch.dtype = torch.float32,
    pack_weights: Union[bool, PackedWeights] = True,
) -> GenerationOutput:
    """Generate the latent code map of `schedule` for a batch of captions.

    captions: one Caption for every clip, or a list with `caption_of_clip[k]` naming clip k's caption (a long
    video whose prompt changes), or a tuple of them that clip k reads together. conditions: the latent map of every
    condition block of the schedule (an interactive segment; see `infinitystar.sampling.interact`). guidance: its
    scale (a number or one value per scale) applies where it differs from 1; the unconditional half then reads the
    learned null text, or `negative_captions` (one per caption, same batch). tau: a number or one value per scale.
    generator: one, or a list with one per sample. prefix_bits: teacher bits (B, t, h, w, c) of the first
    len(prefix_bits) steps.
    record_logits keeps, per step, the conditional/unconditional logits after temperature and the guided logits
    (for parity tests). on_step is called after every step with a `StepInfo`; when it returns True the loop
    stops and the codes so far are returned (the clips begun, each as far as it got). precision: the compute
    dtype of the transformer blocks (see `GenerationState`); default fp32. pack_weights: see `GenerationState`.
    """
    captions = [captions] if isinstance(captions, Caption) else list(captions)
    if not captions:
        raise ValueError("at least one caption is needed")
    caption_of_clip = list(caption_of_clip) if caption_of_clip is not None else [0] * schedule.num_clips
    named = [c for entry in caption_of_clip for c in captions_of(entry)]
    if len(caption_of_clip) < schedule.num_clips or not all(0 <= c < len(captions) for c in named):
        raise ValueError(f"caption_of_clip {caption_of_clip} must name one (or a tuple) of {len(captions)} captions "
                         f"for each of {schedule.num_clips} clips")
    if len(prefix_bits) > len(schedule.steps):
        raise ValueError(f"{len(prefix_bits)} teacher steps given, the schedule has {len(schedule.steps)}")
    n_scales = len(schedule.scales)
    taus = per_scale(tau, n_scales, "tau")
    batch = captions[0].features.shape[0]
    check_generators(generator, batch)
    if negative_captions is not None and len(negative_captions) != len(captions):
        raise ValueError(f"{len(negative_captions)} negative captions given for {len(captions)} captions")
    options = SamplingOptions(guidance, generator, greedy, record_logits, on_step)
    state = GenerationState(model, batch, captions[0].features.device,
                            use_cfg=guidance.active(n_scales), precision=precision, pack_weights=pack_weights)
    orders = caption_orders(caption_of_clip, len(captions))
    for ci, cap in enumerate(captions):
        state.add_caption(ci, cap, None if negative_captions is None else negative_captions[ci], orders[ci])
    if schedule.conditions or conditions:
        state.add_conditions(schedule, conditions or {})
    out = GenerationOutput(codes=torch.empty(0), bits=[])
    maps = []
    for clip in range(schedule.num_clips):
        maps.append(state.run_clip(schedule, clip, caption_of_clip, taus, options, out, prefix_bits))
        if out.stopped:
            break
    out.codes = torch.cat(maps, dim=2)
    return out
