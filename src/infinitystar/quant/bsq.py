"""Binary spherical quantization (BSQ): the bit primitive of every scale.

A token's residual r (c channels) is projected onto the unit sphere and quantized to sign(r)/sqrt(c).
Bit value 1 means code +1/sqrt(c) on that channel, 0 means -1/sqrt(c). Integer indices are never formed
(for 64 bits they would overflow; the official code's are garbage), only bit labels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def residual_to_bits(r: torch.Tensor) -> torch.Tensor:
    """Bits (uint8) of a residual. Normalising by a positive norm never changes a sign, so this is r > 0
    (exact zeros map to 0, as in the reference)."""
    return (r > 0).to(torch.uint8)


def bits_to_codes(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes of bit labels along the last axis: (2*b - 1) / sqrt(c)."""
    c = bits.shape[-1]
    return (bits.to(dtype) * 2 - 1) * (1.0 / math.sqrt(c))


def bsq_quantize(r: torch.Tensor, dim: int = 1, inv_temperature: float = 100.0):
    """Differentiable BSQ for tokenizer training.

    Returns (codes with a straight-through gradient, bits, aux) where aux holds the commitment loss and the
    entropy terms of the official recipe: per-sample entropy minus codebook entropy, with
    p = sigmoid(-4 u / sqrt(c) * inv_temperature) per bit.
    """
    c = r.shape[dim]
    u = F.normalize(r, dim=dim)
    q = torch.where(u > 0, 1.0, -1.0).to(u.dtype) / math.sqrt(c)
    q_st = u + (q - u).detach()
    bits = (u > 0).to(torch.uint8)
    commit = F.mse_loss(u, q.detach())
    p = torch.sigmoid(-4 * u / math.sqrt(c) * inv_temperature)      # probability of bit 0 per channel
    p = p.movedim(dim, -1).reshape(-1, c)
    probs = torch.stack([p, 1 - p], dim=-1)                          # (N, c, 2)
    per_sample = -(probs * torch.log(probs.clamp_min(1e-8))).sum(-1).sum(-1).mean()
    avg = probs.mean(0)
    codebook = -(avg * torch.log(avg.clamp_min(1e-8))).sum(-1).sum()
    return q_st, bits, {"commitment": commit, "entropy": per_sample - codebook,
                        "per_sample_entropy": per_sample, "codebook_entropy": codebook}
