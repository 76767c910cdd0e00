"""Guidance on bit logits: classifier-free guidance (CFG) and adaptive projected guidance (APG)."""
from __future__ import annotations

import torch


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * cond + (1 - scale) * uncond


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


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float, method: str = "cfg", **apg_kwargs) -> torch.Tensor:
    if method == "cfg":
        return cfg(cond, uncond, scale)
    if method == "apg":
        return apg(cond, uncond, scale, **apg_kwargs)
    raise ValueError(f"unknown guidance {method!r}; use 'cfg' or 'apg'")
