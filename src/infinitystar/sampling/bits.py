"""Per-bit sampling and per-scale settings, shared by the InfinityStar and Infinity generation loops."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def per_scale(value: Union[float, Sequence[float]], n: int, name: str) -> list[float]:
    """A number for every scale, or one value per scale (checked)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} must be a number or one value per scale ({n}), got {len(value)}")
    return value


def sample_bits(logits: torch.Tensor, top_p: float = 0.0, generator: Optional[torch.Generator] = None,
                greedy: bool = False) -> torch.Tensor:
    """Bits (uint8) from logits (..., 2). greedy: the likely value (l1 > l0). top_p in (0, 1]: a bit whose less
    likely value has probability <= 1 - top_p is decided greedily, the others are drawn (top_p = 0: no filter)."""
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    likely = logits[..., 1] > logits[..., 0]
    if greedy:
        return likely.to(torch.uint8)
    p1 = logits.float().softmax(-1)[..., 1]
    gen_device = generator.device if generator is not None else p1.device   # a CPU generator reproduces anywhere
    u = torch.rand(p1.shape, generator=generator, device=gen_device).to(p1.device)
    bits = u < p1
    if top_p > 0:
        bits = torch.where(torch.minimum(p1, 1 - p1) <= 1 - top_p, likely, bits)
    return bits.to(torch.uint8)
