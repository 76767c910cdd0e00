"""Teacher forcing and losses of the Infinity transformer: the targets and inputs of an encoded image through the
shared residual loop (`quant.residual`), bitwise self-correction, the per-token loss and its reduction. The
sampler's half of the loop (bits -> inputs) is `replay_bits`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from infinitystar.model.infinity import (InfinityTransformer, as_scales, latent_to_tokens, tokens_to_latent,
                                         vae_scales)
from infinitystar.quant.residual import (BitwiseSelfCorrection, CodeAccumulator, FlipSource, RecordedFlips,
                                         encode_targets)
from infinitystar.runtime import fp32_region
from infinitystar.schedules.infinity_resolution import image_schedule
from infinitystar.train.loss import bitwise_loss


def forward_loss(model: InfinityTransformer, text: torch.Tensor, text_mask: Optional[torch.Tensor],
                 x_wo_prefix: torch.Tensor, bits: torch.Tensor, scales: Sequence, **kw
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and bit accuracy (B, L): 2-class cross-entropy per bit, mean over the bits.
    Reduce with `token_weights` (uniform 1/L or the scale reweighting) and a mean over the batch."""
    logits = model(text, text_mask, x_wo_prefix, scales, **kw)
    B, L, d, _ = logits.shape
    if bits.shape != (B, L, d):
        raise ValueError(f"bits must be ({B}, {L}, {d}), got {tuple(bits.shape)}")
    with fp32_region(logits.device):   # the head's logits are float32; so is the loss, under any autocast
        loss, acc = bitwise_loss(logits.reshape(B * L, d, 2), bits.reshape(B * L, d))
    return loss.view(B, L), acc.view(B, L)


def token_weights(scales: Sequence, reweight_by_scale: bool = False, device=None) -> torch.Tensor:
    """(L,) loss weight per token, summing to 1: uniform 1/L, or (reweight) proportional to
    sqrt(h_K w_K / (h_k w_k)) for a token of scale k, so each scale's total weight grows like sqrt(h_k w_k)
    (the official option, which crashes upstream)."""
    scales = as_scales(scales)
    areas = torch.tensor([h * w for h, w in scales], dtype=torch.float64)
    per_scale = (areas[-1] / areas).sqrt() if reweight_by_scale else torch.ones_like(areas)
    w = torch.repeat_interleave(per_scale, areas.long())
    return (w / w.sum()).float().to(device)


def reduce_loss(per_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The trainer's scalar: mean over the batch of the weighted sum over tokens."""
    return (per_token * weights.to(per_token.device, per_token.dtype)).sum(-1).mean()


# ---------------------------------------------------------------------------------------------------------------
# Teacher forcing through the shared residual loop
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class BitTargets:
    """Transformer-side view of the residual loop of one image batch."""
    inputs: torch.Tensor                 # (B, L-1, bits) teacher-forcing inputs x_2..x_K (x_BLC_wo_prefix)
    bits: torch.Tensor                   # (B, L, bits) uint8 clean targets
    codes: torch.Tensor                  # (B, d, H, W) summed codes (with flips) = the VAE decoder input
    flips: Optional[torch.Tensor] = None  # (B, L, bits) uint8 flip masks (None: no flip anywhere)


def _flat_bits(b: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w, c) -> (B, h*w, c)."""
    return b.reshape(b.shape[0], -1, b.shape[-1])


def teacher_forcing(f: torch.Tensor, scales: Sequence, flip: Optional[FlipSource] = None,
                    spatial_patchify: bool = False) -> BitTargets:
    """Targets and inputs of an encoded image f (B, d, H, W) through the shared residual loop: area-downsampled
    residual (identity at full size), sign bits, bilinear upsampling of the codes, bilinear resizing of the
    running map for the next scale's input. `flip` (BSC) corrupts the accumulated map, not the targets."""
    vs = vae_scales(scales, spatial_patchify)
    if f.dim() != 4 or tuple(f.shape[-2:]) != vs[-1]:
        raise ValueError(f"features must be (B, d, {vs[-1][0]}, {vs[-1][1]}) for this schedule, got {tuple(f.shape)}")
    t = encode_targets(f.unsqueeze(2), image_schedule(vs, f.shape[1]), flip, input_mode="trilinear",
                       up_mode="trilinear")
    inputs = [latent_to_tokens(x, hw, spatial_patchify) for x, hw in zip(t.inputs[1:], vs[1:])]
    bits = [latent_to_tokens(_flat_bits(b), hw, spatial_patchify) for b, hw in zip(t.bits, vs)]
    flips = None
    if any(m is not None for m in t.flips):
        flips = torch.cat([latent_to_tokens(_flat_bits(m if m is not None else torch.zeros_like(b)), hw,
                                            spatial_patchify) for m, b, hw in zip(t.flips, t.bits, vs)], 1)
    return BitTargets(torch.cat(inputs, 1), torch.cat(bits, 1), t.codes.squeeze(2), flips)


def replay_bits(bits: torch.Tensor, scales: Sequence, spatial_patchify: bool = False) -> BitTargets:
    """Inputs and summed codes of given bits (B, L, bits) per token (sampled or teacher bits): the same loop
    without residuals, as the sampler runs it."""
    scales = as_scales(scales)
    vs = vae_scales(scales, spatial_patchify)
    B, L, nb = bits.shape
    d = nb // 4 if spatial_patchify else nb
    acc = CodeAccumulator(B, d, (1, *vs[-1]), device=bits.device, input_mode="trilinear", up_mode="trilinear")
    inputs, start = [], 0
    for k, ((h, w), hw) in enumerate(zip(scales, vs)):
        if k:
            inputs.append(latent_to_tokens(acc.inputs((1, *hw)), hw, spatial_patchify))
        cell_bits = tokens_to_latent(bits[:, start:start + h * w], hw, spatial_patchify)
        acc.add(cell_bits.reshape(B, 1, *hw, d))
        start += h * w
    if start != L:
        raise ValueError(f"bits have {L} tokens, the schedule {start}")
    return BitTargets(torch.cat(inputs, 1), bits, acc.F.squeeze(2))


def bitwise_self_correction(scales: Sequence, strength: float = 0.3, num_layers: Optional[int] = None,
                            generator: Optional[torch.Generator] = None) -> FlipSource:
    """BSC flips for `teacher_forcing`: per scale k < num_layers one rate p ~ U{0, .01, ..., strength} shared by
    the batch, each bit flipped with probability p (the shared loop never flips the last scale, where a flip
    changes no input and no target)."""
    n = len(as_scales(scales))
    inner = BitwiseSelfCorrection(image_schedule(as_scales(scales), 1), strength, generator)
    limit = n if num_layers is None else int(num_layers)

    def flip(step, bits):
        return inner(step, bits) if step.scale.index < limit else None
    return flip


def recorded_flips(mask: torch.Tensor, scales: Sequence, spatial_patchify: bool = False,
                   num_layers: Optional[int] = None) -> RecordedFlips:
    """Replay recorded flip masks (B, L, bits) per token (True = flipped) at the scales k < num_layers."""
    scales = as_scales(scales)
    vs = vae_scales(scales, spatial_patchify)
    limit = len(scales) if num_layers is None else int(num_layers)
    masks, start = {}, 0
    for k, ((h, w), hw) in enumerate(zip(scales, vs)):
        m = mask[:, start:start + h * w].to(torch.uint8)
        if k < limit and bool(m.any()):
            masks[k] = tokens_to_latent(m, hw, spatial_patchify)
        start += h * w
    if start != mask.shape[1]:
        raise ValueError(f"flip mask has {mask.shape[1]} tokens, the schedule {start}")
    return RecordedFlips(masks)


__all__ = ["forward_loss", "token_weights", "reduce_loss", "BitTargets", "teacher_forcing", "replay_bits",
           "bitwise_self_correction", "recorded_flips"]
