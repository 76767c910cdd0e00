"""Guidance on bit logits: classifier-free guidance (CFG) on logits as the official code does it, CFG on bit
probabilities, adaptive projected guidance (APG), and `Guidance`, the one description of it that both generation
loops and both pipelines take."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from infinitystar.sampling.bits import per_scale

METHODS = ("cfg", "cfg_prob", "apg")
PROB_FLOOR = 1e-6


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * cond + (1 - scale) * uncond


def cfg_prob(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on each bit's probabilities instead of its logits; the last axis holds (bit 0, bit 1) logit pairs.

    On logits a bit flips whenever the unconditional margin exceeds scale / (scale - 1) times the conditional
    one, even when both branches are certain of the same value (a memorised sample sampled at CFG 5 loses ~5 % of
    its bits that way). In probability space two certain branches stay certain; where they disagree the
    probability is pushed away from the unconditional one as usual, clipped to [PROB_FLOOR, 1]."""
    pairs = cond.shape[:-1] + (-1, 2)
    pc, pu = cond.float().view(pairs).softmax(-1), uncond.float().view(pairs).softmax(-1)
    pg = (pu + scale * (pc - pu)).clamp(min=PROB_FLOOR)
    return (pg / pg.sum(-1, keepdim=True)).log().view(cond.shape).to(cond.dtype)


def apg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, eta: float = 0.0,
        norm_threshold: float = 0.05) -> torch.Tensor:
    """Adaptive projected guidance, per sample over all of its (tokens x logits) entries.

    diff = cond - uncond, rescaled so its RMS is at most `norm_threshold` (when > 0); split (in float64) into the
    parts parallel and orthogonal to cond; out = cond + (scale - 1) * (orthogonal + eta * parallel).
    """
    dims = tuple(range(1, cond.dim()))
    diff = cond - uncond
    if norm_threshold > 0:
        n = diff[0].numel()
        rms = torch.linalg.vector_norm(diff, dim=dims, keepdim=True) / n ** 0.5
        diff = diff * torch.clamp(norm_threshold / rms, max=1.0)
    c64, d64 = cond.double(), diff.double()
    unit = c64 / torch.linalg.vector_norm(c64, dim=dims, keepdim=True)
    parallel = (d64 * unit).sum(dim=dims, keepdim=True) * unit
    orthogonal = d64 - parallel
    return cond + (scale - 1) * (orthogonal.to(cond.dtype) + eta * parallel.to(cond.dtype))


@dataclass(frozen=True)
class Guidance:
    """How the conditional and unconditional logits are mixed.

    scale: one number, or one value per scale of the schedule (1 everywhere: no guidance, no unconditional pass).
    method: "cfg" (scale * cond + (1 - scale) * uncond) or "apg" (see `apg`, with `apg_eta` and
    `apg_norm_threshold`)."""
    scale: Union[float, tuple[float, ...]] = 1.0
    method: str = "cfg"
    apg_eta: float = 0.0
    apg_norm_threshold: float = 0.05

    def __post_init__(self):
        scale = self.scale
        if isinstance(scale, Sequence) and not isinstance(scale, str):
            scale = tuple(float(s) for s in scale)
            if not scale:
                raise ValueError("guidance scale: an empty list (give a number, or one value per scale)")
        elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scale = float(scale)
        else:
            raise ValueError(f"guidance scale must be a number or a list of numbers, got {scale!r}")
        object.__setattr__(self, "scale", scale)
        values = scale if isinstance(scale, tuple) else (scale,)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"guidance scale must be finite, got {self.scale}")
        if self.method not in METHODS:
            raise ValueError(f"unknown guidance {self.method!r}; use one of {', '.join(METHODS)}")
        if not math.isfinite(self.apg_eta):
            raise ValueError(f"apg_eta must be finite, got {self.apg_eta}")
        if not (math.isfinite(self.apg_norm_threshold) and self.apg_norm_threshold >= 0):
            raise ValueError(f"apg_norm_threshold must be a finite number >= 0, got {self.apg_norm_threshold}")

    def scales(self, n: int) -> list[float]:
        """The guidance scale of each of `n` scales (checked)."""
        return per_scale(self.scale, n, "guidance scale")

    def active(self, n: int) -> bool:
        """Whether the unconditional half is needed at all."""
        return any(s != 1.0 for s in self.scales(n))

    def __call__(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Guided logits of one scale; `cond`/`uncond` are (B, ...) with a sample's entries after the batch axis."""
        if self.method == "cfg":
            return cfg(cond, uncond, scale)
        if self.method == "cfg_prob":
            return cfg_prob(cond, uncond, scale)
        return apg(cond, uncond, scale, eta=self.apg_eta, norm_threshold=self.apg_norm_threshold)
