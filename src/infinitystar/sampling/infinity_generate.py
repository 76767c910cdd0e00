"""Infinity generation: scale by scale with a KV cache, guidance on logits, per-bit sampling.

Per scale k (batch 2B = [cond ; uncond] when any guidance scale differs from 1):
  1. tokens: the start token at k = 0, else word_embed(bilinear resize of the running code map to scale k);
     + level_embed[k]; every block attends to the cached keys/values of scales < k and to its own scale, with
     the RoPE-2D positions of scale k (the slice starting at the scale's token offset);
  2. logits / tau_k, then guidance on all logits (`Guidance`: CFG l = cfg_k * l_cond + (1 - cfg_k) * l_uncond as
     the reference, or APG);
  3. each bit independently: p1 = softmax(l)[..., 1]; with top_p > 0 a bit whose less likely value has
     probability <= 1 - top_p takes the likely value (the reference's top-p over the two classes), otherwise
     it is drawn from Bernoulli(p1);
  4. the codes (2b - 1)/sqrt(d) are added, bilinearly upsampled, to the running map (the shared
     `CodeAccumulator`); after the last scale the map is the VAE decoder's input.
The unconditional half uses the learned null text with each prompt's length, or a negative prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from infinitystar.model.attention import AttentionContext, KVCache
from infinitystar.model.infinity import (InfinityTransformer, Scale2D, as_scales, latent_to_tokens,
                                         tokens_to_latent, vae_scales)
from infinitystar.model.rope import rope2d_positions
from infinitystar.quant.residual import CodeAccumulator
from infinitystar.runtime import autocast
from infinitystar.sampling.bits import Generators, OnStep, StepInfo, check_generators, per_scale, sample_bits
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.infinity_resolution import rope_anchor as default_rope_anchor


@dataclass
class InfinityGenerationOutput:
    bits: list[torch.Tensor]            # per scale (B, h, w, bits) uint8
    codes: torch.Tensor                 # (B, d, H, W): summed codes, the VAE decoder input
    logits: list[dict[str, Optional[torch.Tensor]]] = field(default_factory=list)
    # per scale when recorded: "cond" / "uncond" raw head outputs (B, n, bits, 2), "guided" after tau and CFG
    text: Optional[dict[str, torch.Tensor]] = None   # when recorded: pooled texts "cond" / "uncond" (B, C)

    @property
    def token_bits(self) -> torch.Tensor:
        """All bits as (B, L, bits), scale-major and row-major inside a scale."""
        return torch.cat([b.reshape(b.shape[0], -1, b.shape[-1]) for b in self.bits], 1)


@torch.no_grad()
def generate_infinity(
    model: InfinityTransformer,
    text: torch.Tensor,
    text_mask: Optional[torch.Tensor],
    scales: Sequence,
    *,
    guidance: Guidance = Guidance(3.0),
    tau: Union[float, Sequence[float]] = 1.0,
    top_p: float = 0.0,
    greedy: bool = False,
    generator: Generators = None,
    negative_text: Optional[torch.Tensor] = None,
    negative_mask: Optional[torch.Tensor] = None,
    rope_anchor: Optional[Scale2D] = None,
    prefix_bits: Sequence[torch.Tensor] = (),
    record: bool = False,
    on_step: OnStep = None,
    precision: torch.dtype = torch.float32,
) -> InfinityGenerationOutput:
    """Generate the bits and summed codes of `scales` ((h, w) or (1, h, w) token grids) for a batch of captions.

    text (B, Lt, Ct) padded T5 features with text_mask (B, Lt) bool (None: all real). guidance: its scale (a number
    or one per scale) and method; tau: a number or one value per scale. negative_text/negative_mask replace the
    null text of the unconditional half. generator: one, or a list with one per sample. prefix_bits: bits
    (B, h, w, bits) that replace the sampled bits of the first scales (reconstruction and debugging). record
    keeps per-scale logits and the pooled texts (for parity tests). on_step is called after every scale with a
    `StepInfo`; when it returns True the loop stops and the codes so far are returned. Decode the image with the
    tokenizer: `vae.decode(out.codes)`. precision: the resolved compute dtype (`runtime.resolve_precision`)
    of the text encoder and the blocks, which run under its autocast; adaLN, the bit head, guidance, sampling
    and the code map stay float32 either way.
    """
    scales = as_scales(scales)
    cfgm = model.config
    n = len(scales)
    if n > cfgm.num_levels:
        raise ValueError(f"{n} scales but the model has {cfgm.num_levels} level embeddings")
    if len(prefix_bits) > n:
        raise ValueError(f"{len(prefix_bits)} teacher scales given, the schedule has {n}")
    cfgs, taus = guidance.scales(n), per_scale(tau, n, "tau")
    if any(t <= 0 for t in taus):
        raise ValueError(f"tau must be positive, got {taus}")
    use_cfg = guidance.active(n)
    B = text.shape[0]
    check_generators(generator, B)
    device = text.device
    if text_mask is None:
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device)

    if use_cfg:
        if negative_text is None:
            neg, neg_mask = model.null_text_features(text_mask).to(text.dtype), text_mask
        else:
            neg = negative_text
            neg_mask = negative_mask if negative_mask is not None else torch.ones(
                negative_text.shape[:2], dtype=torch.bool, device=device)
            if neg.shape[0] != B:
                raise ValueError(f"negative_text has batch {neg.shape[0]}, the prompts {B}")
            Lt = max(text.shape[1], neg.shape[1])          # one padded batch for both halves
            pad = lambda t, m: (torch.nn.functional.pad(t, (0, 0, 0, Lt - t.shape[1])),
                                torch.nn.functional.pad(m, (0, Lt - m.shape[1])))
            (text, text_mask), (neg, neg_mask) = pad(text, text_mask), pad(neg, neg_mask)
        text, text_mask = torch.cat([text, neg]), torch.cat([text_mask, neg_mask])
    with autocast(device, precision):
        tc = model.encode_text(text, text_mask)
        cross_kvs = [blk.cross.kv(tc.memory) for blk in model.blocks]   # constant over the scales
    out = InfinityGenerationOutput(bits=[], codes=torch.empty(0))
    if record:
        out.text = {"cond": tc.cond[:B], "uncond": tc.cond[B:] if use_cfg else None}

    anchor = tuple(rope_anchor) if rope_anchor is not None else default_rope_anchor(scales)
    cos, sin = model.rope.cos_sin(rope2d_positions(scales, anchor, device))
    cache = KVCache(cfgm.depth)
    vs = vae_scales(scales, cfgm.spatial_patchify)
    acc = CodeAccumulator(B, cfgm.latent_channels, (1, *vs[-1]), device=device, dtype=torch.float32,
                          input_mode="trilinear", up_mode="trilinear")
    dtype = model.word_embed.weight.dtype
    start = 0
    for k, ((h, w), hw) in enumerate(zip(scales, vs)):
        ctx = AttentionContext(cache=cache, read=list(range(k)), write=k if k < n - 1 else None)
        code_in = None if k == 0 else latent_to_tokens(acc.inputs((1, *hw)), hw, cfgm.spatial_patchify)
        with autocast(device, precision):
            if k == 0:
                x = model.start_tokens(tc)
            else:
                x = model.word_embed(code_in.to(dtype))
                if use_cfg:
                    x = torch.cat([x, x])
            x = x + model.level_embed.weight[k].to(x.dtype)
            hs = model.run_blocks(x, tc, cos[start:start + h * w], sin[start:start + h * w], ctx, cross_kvs)
            raw = model.logits(hs, tc)
        logits = raw / taus[k]
        guided = guidance(logits[:B], logits[B:], cfgs[k]) if use_cfg else logits
        if record:
            out.logits.append({"cond": raw[:B], "uncond": raw[B:] if use_cfg else None, "guided": guided})
        forced = k < len(prefix_bits)
        if forced:
            bits = prefix_bits[k].to(device=device, dtype=torch.uint8).reshape(B, h, w, cfgm.bits)
        else:
            bits = sample_bits(guided, top_p, generator, greedy).reshape(B, h, w, cfgm.bits)
        out.bits.append(bits)
        cell_bits = tokens_to_latent(bits.reshape(B, h * w, -1), hw, cfgm.spatial_patchify)
        acc.add(cell_bits.reshape(B, 1, *hw, cfgm.latent_channels))
        start += h * w
        if on_step is not None and on_step(StepInfo(k, n, k, 0, (1, h, w), bits[:, None], forced)):
            break
    out.codes = acc.F.squeeze(2)
    return out


__all__ = ["generate_infinity", "sample_bits", "InfinityGenerationOutput"]
