"""Per-bit sampling, per-scale settings and the per-step report, shared by the InfinityStar and Infinity generation
loops."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from infinitystar.runtime import UserError

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


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


def check_generators(generator: Generators, batch: int) -> None:
    """One generator for the whole batch, or a list with one per sample."""
    if isinstance(generator, Sequence) and len(generator) != batch:
        raise ValueError(f"{len(generator)} generators given for {batch} outputs (give one, or one per output)")


def _uniform(shape: torch.Size, generator: Generators, device: torch.device) -> torch.Tensor:
    """U[0, 1) draws; with a list of generators, sample i's draws come from generator i alone, so a sample is the
    same whatever batch it is generated in."""
    if isinstance(generator, Sequence):
        check_generators(generator, shape[0])
        return torch.stack([_uniform(shape[1:], g, device) for g in generator])
    gen_device = generator.device if generator is not None else device   # a CPU generator reproduces anywhere
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_bits(logits: torch.Tensor, top_p: float = 0.0, generator: Generators = None,
                greedy: bool = False) -> torch.Tensor:
    """Bits (uint8) from logits (B, ..., 2). greedy: the likely value (l1 > l0). top_p in (0, 1]: a bit whose less
    likely value has probability <= 1 - top_p is decided greedily, the others are drawn (top_p = 0: no filter).
    generator: one torch.Generator, or a list with one per sample. Non-finite logits are a NonFiniteLogits
    error."""
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    check_finite_logits(logits)
    likely = logits[..., 1] > logits[..., 0]
    if greedy:
        return likely.to(torch.uint8)
    p1 = logits.float().softmax(-1)[..., 1]
    bits = _uniform(p1.shape, generator, p1.device) < p1
    if top_p > 0:
        bits = torch.where(torch.minimum(p1, 1 - p1) <= 1 - top_p, likely, bits)
    return bits.to(torch.uint8)


@dataclass(frozen=True)
class StepInfo:
    """What a generation loop reports after each step (`on_step`).

    step / num_steps: the step just done, counting every repetition; scale: index of its scale in the schedule;
    clip: the video clip it belongs to (0 for images); shape: (t, h, w) of its token grid; bits: its (B, t, h, w,
    bits) uint8 bits; forced: taken from a given prefix (image-to-video, continuation) rather than sampled."""
    step: int
    num_steps: int
    scale: int
    clip: int
    shape: tuple[int, int, int]
    bits: torch.Tensor
    forced: bool = False


# Called after every step; returning True stops the generation (the codes so far are returned).
OnStep = Optional[Callable[[StepInfo], Optional[bool]]]
