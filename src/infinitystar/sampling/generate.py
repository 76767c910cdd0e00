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

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from infinitystar.model.attention import AttentionContext, KVCache, visible_context
from infinitystar.model.infinitystar import InfinityStarTransformer
from infinitystar.model.rope import condition_positions, text_positions, visual_positions
from infinitystar.quant.residual import CodeAccumulator
from infinitystar.runtime import autocast
from infinitystar.sampling.bits import per_scale, sample_bits
from infinitystar.sampling.guidance import guide
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


@dataclass
class SamplingOptions:
    """How bits are drawn from the logits of a step (per-scale guidance and temperature are lists elsewhere)."""
    guidance: str = "cfg"                 # "cfg" or "apg"; applied on scales whose guidance scale is not 1
    apg_norm_threshold: float = 0.05
    apg_eta: float = 0.0
    generator: Optional[torch.Generator] = None
    greedy: bool = False
    record_logits: bool = False           # keep per step the cond / uncond / guided logits (parity tests)


class GenerationState:
    """What generation keeps between clips: the KV cache (captions, condition blocks, and the reference scales
    that later clips attend to) and the batch layout ([conditional, unconditional] rows when guided).

    With sparse attention the cache holds, between clips, the captions still in use and the last scale of the
    previous clip, so a clip costs the same however long the video already is.

    precision: the resolved compute dtype (`runtime.resolve_precision`) of the transformer blocks, which run under
    its autocast; the bit heads, guidance, sampling and the code maps stay float32 either way.
    """

    def __init__(self, model: InfinityStarTransformer, batch: int, device, use_cfg: bool,
                 precision: torch.dtype = torch.float32):
        self.model = model
        self.precision = precision
        self.batch = batch
        self.device = torch.device(device)
        self.use_cfg = use_cfg
        self.dtype = model.word_embed.weight.dtype
        self.cache = KVCache(model.config.depth)
        self.peak_cache_bytes = 0

    def _note_memory(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache.nbytes())

    def add_caption(self, key: int, caption: Caption) -> None:
        """Run a caption through the blocks and cache it as ("text", key) (with the null text when guided)."""
        feats, mask = caption.features.to(device=self.device, dtype=self.dtype), caption.mask
        if feats.shape[0] != self.batch:
            raise ValueError(f"caption batch {feats.shape[0]} differs from the generation batch {self.batch}")
        if self.use_cfg:
            null = self.model.null_text_features(feats.shape[1]).to(self.dtype)[None].expand_as(feats)
            feats = torch.cat([feats, null])
            mask = None if mask is None else torch.cat([mask, mask])
        ctx = AttentionContext(cache=self.cache, write=("text", key), self_mask=mask)
        with autocast(self.device, self.precision):
            self.model.run_blocks(self.model.text_proj(feats), text_positions(feats.shape[1], self.device), ctx)
        self._note_memory()

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
            with autocast(self.device, self.precision):
                x = self.model.word_embed(z.to(device=self.device, dtype=self.dtype).flatten(2).transpose(1, 2))
                if self.use_cfg:
                    x = torch.cat([x, x])
                self.model.run_blocks(x, condition_positions(block, schedule.full_hw, self.model.config.text_maxlen,
                                                             self.device), ctx)
        self._note_memory()

    def run_clip(self, schedule: Schedule, clip: int, caption_of_clip: Sequence[int], guidance_scale: Sequence[float],
                 tau: Sequence[float], options: SamplingOptions, out: "GenerationOutput",
                 prefix_bits: Sequence[torch.Tensor] = (), keep_for: Optional[Schedule] = None,
                 progress=None) -> torch.Tensor:
        """Generate clip `clip` of `schedule`; returns its code map (B, C, t, H, W) and appends its bits (and
        logits) to `out`. guidance_scale / tau: one value per scale of the schedule. keep_for: the schedule whose
        later scales decide which keys/values outlive this clip (default `schedule`; streaming passes the
        schedule with one more clip, so the last scale stays for the next call)."""
        model, B, dtype = self.model, self.batch, self.dtype
        cfgm = model.config
        last_ref = (keep_for or schedule).last_reference
        acc = CodeAccumulator(B, cfgm.latent_channels, schedule.clip_size(clip), device=self.device,
                              dtype=torch.float32)
        for scale in schedule.clip_scales(clip):
            for step in schedule.scale_steps(scale.index):
                forced = step.index < len(prefix_bits)
                keep_kv = step.is_last_repetition and scale.index in last_ref
                want_logits = options.record_logits or not forced
                if want_logits or keep_kv:
                    h = self._forward(schedule, step, acc, caption_of_clip, keep_kv)
                if want_logits:
                    guided = self._logits(h, scale.bits, tau[scale.index], guidance_scale[scale.index], options, out)
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
                if progress is not None:
                    progress.update(1)
        out.peak_cache_bytes = max(out.peak_cache_bytes, self.peak_cache_bytes)
        return acc.F

    def _forward(self, schedule: Schedule, step: Step, acc: CodeAccumulator, caption_of_clip: Sequence[int],
                 keep_kv: bool) -> torch.Tensor:
        scale = step.scale
        code_in = acc.inputs(scale.shape).to(self.dtype)
        refs, cap, conditions = visible_context(schedule, scale.index, caption_of_clip)
        read = [*refs, ("text", cap), *(("condition", c) for c in conditions)]
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
            extra = ({"norm_threshold": options.apg_norm_threshold, "eta": options.apg_eta}
                     if options.guidance == "apg" else {})
            guided = guide(cond.flatten(2), uncond.flatten(2), scale_cfg, options.guidance, **extra).view_as(cond)
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
    caption_of_clip: Optional[Sequence[int]] = None,
    conditions: Optional[Mapping[str, torch.Tensor]] = None,
    guidance_scale: Union[float, Sequence[float]] = 1.0,
    guidance: str = "cfg",
    apg_norm_threshold: float = 0.05,
    apg_eta: float = 0.0,
    tau: Union[float, Sequence[float]] = 1.0,
    generator: Optional[torch.Generator] = None,
    greedy: bool = False,
    prefix_bits: Sequence[torch.Tensor] = (),
    record_logits: bool = False,
    progress: bool = False,
    precision: torch.dtype = torch.float32,
) -> GenerationOutput:
    """Generate the latent code map of `schedule` for a batch of captions.

    captions: one Caption for every clip, or a list with `caption_of_clip[k]` naming clip k's caption (a long
    video whose prompt changes). conditions: the latent map of every condition block of the schedule (an
    interactive segment; see `infinitystar.sampling.interact`). guidance_scale and tau are a number or one value
    per scale; guidance is applied when a scale's value differs from 1 (the batch then carries the learned null
    text). prefix_bits: teacher bits (B, t, h, w, c) of the first len(prefix_bits) steps. record_logits keeps,
    per step, the conditional/unconditional logits after temperature and the guided logits (for parity tests).
    precision: the compute dtype of the transformer blocks (see `GenerationState`); default fp32.
    """
    captions = [captions] if isinstance(captions, Caption) else list(captions)
    if not captions:
        raise ValueError("at least one caption is needed")
    caption_of_clip = list(caption_of_clip) if caption_of_clip is not None else [0] * schedule.num_clips
    if len(caption_of_clip) < schedule.num_clips or max(caption_of_clip) >= len(captions):
        raise ValueError(f"caption_of_clip {caption_of_clip} must name one of {len(captions)} captions for each "
                         f"of {schedule.num_clips} clips")
    if len(prefix_bits) > len(schedule.steps):
        raise ValueError(f"{len(prefix_bits)} teacher steps given, the schedule has {len(schedule.steps)}")
    n_scales = len(schedule.scales)
    scales_cfg = per_scale(guidance_scale, n_scales, "guidance_scale")
    taus = per_scale(tau, n_scales, "tau")
    options = SamplingOptions(guidance, apg_norm_threshold, apg_eta, generator, greedy, record_logits)
    state = GenerationState(model, captions[0].features.shape[0], captions[0].features.device,
                            use_cfg=any(g != 1.0 for g in scales_cfg), precision=precision)
    for ci, cap in enumerate(captions):
        state.add_caption(ci, cap)
    if schedule.conditions or conditions:
        state.add_conditions(schedule, conditions or {})
    out = GenerationOutput(codes=torch.empty(0), bits=[])
    with tqdm(total=len(schedule.steps), desc="generating", unit="step", disable=not progress, leave=False) as bar:
        maps = [state.run_clip(schedule, clip, caption_of_clip, scales_cfg, taus, options, out, prefix_bits,
                               progress=bar) for clip in range(schedule.num_clips)]
    out.codes = torch.cat(maps, dim=2)
    return out
