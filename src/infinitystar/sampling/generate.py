"""The generation loop: clip by clip, scale by scale, repetition by repetition, with a per-scale KV cache.

Per step: input = word_embed(resized running code map); logits / tau; guidance on logits (CFG or APG);
independent per-bit sampling; codes added to the clip's running map. A teacher-forced prefix (image-to-video,
continuation) takes given bits instead of sampling, and runs the transformer only where a later scale will
attend to the result (the last repetition of a referenced scale), so forced steps cost almost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from infinitystar.model.attention import AttentionContext, KVCache, visible_context
from infinitystar.model.infinitystar import InfinityStarTransformer
from infinitystar.model.rope import text_positions, visual_positions
from infinitystar.quant.residual import CodeAccumulator
from infinitystar.sampling.bits import per_scale, sample_bits
from infinitystar.sampling.guidance import guide
from infinitystar.schedules.pyramid import Schedule


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


@torch.no_grad()
def generate(
    model: InfinityStarTransformer,
    schedule: Schedule,
    captions: Union[Caption, Sequence[Caption]],
    *,
    caption_of_clip: Optional[Sequence[int]] = None,
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
) -> GenerationOutput:
    """Generate the latent code map of `schedule` for a batch of captions.

    captions: one Caption for every clip, or a list with `caption_of_clip[k]` naming clip k's caption (a long
    video whose prompt changes). guidance_scale and tau are a number or one value per scale; guidance is
    applied when a scale's value differs from 1 (the batch then carries the learned null text). prefix_bits:
    teacher bits (B, t, h, w, c) of the first len(prefix_bits) steps. record_logits keeps, per step, the
    conditional/unconditional logits after temperature and the guided logits (for parity tests).
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
    use_cfg = any(g != 1.0 for g in scales_cfg)
    B = captions[0].features.shape[0]
    device = captions[0].features.device
    dtype = model.word_embed.weight.dtype
    cfgm = model.config

    cache = KVCache(cfgm.depth)
    for ci, cap in enumerate(captions):
        feats, mask = cap.features.to(dtype), cap.mask
        if feats.shape[0] != B:
            raise ValueError("every caption must have the same batch size")
        if use_cfg:
            null = model.null_text_features(feats.shape[1]).to(dtype)[None].expand_as(feats)
            feats = torch.cat([feats, null])
            mask = None if mask is None else torch.cat([mask, mask])
        ctx = AttentionContext(cache=cache, write=("text", ci), self_mask=mask)
        model.run_blocks(model.text_proj(feats), text_positions(feats.shape[1], device), ctx)

    out = GenerationOutput(codes=torch.empty(0), bits=[])
    maps: list[torch.Tensor] = []
    acc: Optional[CodeAccumulator] = None
    current_clip = -1
    last_ref = schedule.last_reference
    steps = tqdm(schedule.steps, desc="generating", unit="step", disable=not progress, leave=False)
    for step in steps:
        scale = step.scale
        if scale.clip != current_clip:
            if acc is not None:
                maps.append(acc.F)
            current_clip = scale.clip
            acc = CodeAccumulator(B, cfgm.latent_channels, schedule.clip_size(scale.clip), device=device,
                                  dtype=torch.float32)
        forced = step.index < len(prefix_bits)
        keep_kv = step.is_last_repetition and scale.index in last_ref
        want_logits = record_logits or not forced
        if want_logits or keep_kv:
            x = model.word_embed(acc.inputs(scale.shape).to(dtype))
            if use_cfg:
                x = torch.cat([x, x])
            refs, cap = visible_context(schedule, scale.index, caption_of_clip)
            ctx = AttentionContext(cache=cache, read=[*refs, ("text", cap)], write=scale.index if keep_kv else None)
            h = model.run_blocks(x, visual_positions(step, schedule.full_hw, cfgm.text_maxlen, device), ctx)
        if want_logits:
            logits = model.logits(h, scale.bits) / taus[scale.index]       # (B or 2B, L, c, 2)
            if use_cfg:
                cond, uncond = logits[:B], logits[B:]
                guided = guide(cond.flatten(2), uncond.flatten(2), scales_cfg[scale.index], guidance,
                               **({"norm_threshold": apg_norm_threshold, "eta": apg_eta} if guidance == "apg" else {})
                               ).view_as(cond)
            else:
                cond, uncond, guided = logits, None, logits
            if record_logits:
                out.logits.append({"cond": cond, "uncond": uncond, "guided": guided})
        if forced:
            bits = prefix_bits[step.index].to(device=device, dtype=torch.uint8).reshape(B, *scale.shape, scale.bits)
        else:
            bits = sample_bits(guided, generator=generator, greedy=greedy).reshape(B, *scale.shape, scale.bits)
        acc.add(bits)
        out.bits.append(bits)
        if step.is_last_repetition:
            for r in [r for r, last in last_ref.items() if last == scale.index]:
                cache.evict(r)
        out.peak_cache_bytes = max(out.peak_cache_bytes, cache.nbytes())
    maps.append(acc.F)
    out.codes = torch.cat(maps, dim=2)
    return out
