"""Resizing latent maps between scales, including the official channel-axis trick for semantic scales.

`resize(x, (c, t, h, w), mode)` with x of shape (B, C, T, H, W) and mode "area" (adaptive average pooling,
overlapping windows for non-integer ratios) or "trilinear" (align_corners=False). When the frame count is
unchanged, the reference permutes to (B, T, C, H, W) and interpolates (C, H, W) -> (c, h, w): channels are
resampled like a spatial axis (16 <-> 64 bits for semantic scales) and frames act as the interpolation's
channels. We reproduce that exactly, because the released weights were trained on those inputs. On a single
frame with unchanged channels "trilinear" is plain bilinear resizing (the Infinity image family).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("area", "trilinear")


def resize(x: torch.Tensor, size: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, T, H, W) to (B, c, t, h, w)."""
    if mode not in MODES:
        raise ValueError(f"unknown resize mode {mode!r}; choose one of {MODES}")
    c, t, h, w = size
    B, C, T, H, W = x.shape
    if (C, T, H, W) == (c, t, h, w):
        return x  # both modes are the identity at the same size
    extra = {} if mode == "area" else {"align_corners": False}
    if T == t:
        y = F.interpolate(x.permute(0, 2, 1, 3, 4), size=(c, h, w), mode=mode, **extra)
        return y.permute(0, 2, 1, 3, 4)
    if C == c:
        return F.interpolate(x, size=(t, h, w), mode=mode, **extra)
    raise ValueError(f"cannot resize {tuple(x.shape)} to channels {c} and frames {t} at once")
