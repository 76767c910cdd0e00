"""Per-bit sampling and per-scale settings, shared by the InfinityStar and Infinity generation loops."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from infinitystar.runtime import UserError


def per_scale(value: Union[float, Sequence[float]], n: int, name: str) -> list[float]:
    """A number for every scale, or one value per scale (checked)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{name} must be a number or one value per scale ({n}), got {len(value)}")
    return value


class NonFiniteLogits(UserError):
    """The model produced NaN or infinite logits: broken weights or inputs, or a guidance scale or temperature so
    large that the logits overflow. Sampling them would give silent garbage."""


def check_finite_logits(logits: torch.Tensor) -> None:
    finite = torch.isfinite(logits)
    if not bool(finite.all()):
        bad = logits[~finite]
        kinds = sorted({"nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") for v in bad[:64].tolist()})
        raise NonFiniteLogits(f"the model produced non-finite logits ({', '.join(kinds)} at {bad.numel()} of "
                              f"{logits.numel()}): check the weights, the guidance scale and the temperature")


def sample_bits(logits: torch.Tensor, top_p: float = 0.0, generator: Optional[torch.Generator] = None,
                greedy: bool = False) -> torch.Tensor:
    """Bits (uint8) from logits (..., 2). greedy: the likely value (l1 > l0). top_p in (0, 1]: a bit whose less
    likely value has probability <= 1 - top_p is decided greedily, the others are drawn (top_p = 0: no filter).
    Non-finite logits are a NonFiniteLogits error."""
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    check_finite_logits(logits)
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
