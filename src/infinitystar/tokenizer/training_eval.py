"""Reconstruction quality of the video tokenizer: PSNR, SSIM (Gaussian window, in torch) and the
encode -> multi-scale quantize -> decode round trip shared by training validation and `tokenizer reconstruct`.

Conventions: pixel tensors are (B, 3, T, H, W) in [-1, 1] (the tokenizer's range); metrics are computed on
[0, 1] values, per frame, after the output is clamped. PSNR is capped at `PSNR_CAP_DB` (identical frames give the
cap, not inf, so every number stays valid JSON).
"""
from __future__ import annotations

import math
from typing import Collection, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from infinitystar.quant.residual import quantize_multiscale
from infinitystar.schedules.pyramid import PyramidConfig

PSNR_CAP_DB = 100.0
SSIM_WINDOW = 11          # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 = 0.01, K2 = 0.03
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


# --------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------

def frames_to_video(frames: Union[np.ndarray, Sequence[np.ndarray]], device=None) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) (or a batch of equal-shaped ones) -> (B, 3, T, H, W) float in [-1, 1]."""
    arr = np.stack(frames) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    if arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or (B, T, H, W, 3), got {arr.dtype} {arr.shape}")
    if not arr.flags.writeable:          # e.g. decoded video frames: torch wants a writable buffer
        arr = arr.copy()
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), clamped and rounded (what a viewer sees)."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def _unit_frames(x: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
    """Any of: uint8 (T, H, W, 3) frames, or a (3, T, H, W) / (B, 3, T, H, W) tensor in [-1, 1] -> (N, 3, H, W)
    float64 in [0, 1], N = frames (times batch)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (4, 5) or x.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 (T, H, W, 3) or (B, T, H, W, 3), got {x.dtype} {x.shape}")
        t = torch.from_numpy(np.ascontiguousarray(x)).double() / 255.0
        return t.reshape(-1, *t.shape[-3:]).permute(0, 3, 1, 2)
    if x.dim() == 4:
        x = x[None]
    if x.dim() != 5 or x.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got {tuple(x.shape)}")
    x = (x.detach().double().clamp(-1, 1) + 1) / 2
    return x.permute(0, 2, 1, 3, 4).reshape(-1, 3, *x.shape[-2:])


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _psnr_from_mse(mse: float) -> float:
    if mse <= 10 ** (-PSNR_CAP_DB / 10):
        return PSNR_CAP_DB
    return min(PSNR_CAP_DB, -10.0 * math.log10(mse))


def psnr_per_frame(a, b) -> list[float]:
    """PSNR (dB, peak 1 on [0, 1] values) of every frame; inputs as in `_unit_frames` (same shapes)."""
    x, y = _unit_frames(a), _unit_frames(b)
    if x.shape != y.shape:
        raise ValueError(f"cannot compare frames of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x - y).square().flatten(1).mean(1)
    return [_psnr_from_mse(float(m)) for m in mse]


def psnr(a, b) -> float:
    """PSNR of a whole clip from its overall mean squared error (not the mean of per-frame PSNRs)."""
    x, y = _unit_frames(a), _unit_frames(b)
    if x.shape != y.shape:
        raise ValueError(f"cannot compare frames of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    return _psnr_from_mse(float((x - y).square().mean()))


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    r = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma ** 2))
    return g / g.sum()


def ssim_per_frame(a, b, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> list[float]:
    """SSIM (Wang et al. 2004) of every frame: Gaussian-weighted local statistics over the valid area (no
    padding), per channel, averaged over channels and positions; data range 1. A window larger than the frame
    shrinks to the frame's smaller side (kept odd)."""
    x, y = _unit_frames(a), _unit_frames(b)
    if x.shape != y.shape:
        raise ValueError(f"cannot compare frames of shapes {tuple(x.shape)} and {tuple(y.shape)}")
    n, c, h, w = x.shape
    size = min(window, h, w)
    size -= 1 - size % 2
    g = _gaussian_window(size, sigma, x.dtype)
    kx = g.view(1, 1, 1, size).expand(c, 1, 1, size).contiguous()
    ky = g.view(1, 1, size, 1).expand(c, 1, size, 1).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:   # the Gaussian is separable: rows, then columns
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return [float(v) for v in s.flatten(1).mean(1)]


def ssim(a, b) -> float:
    vals = ssim_per_frame(a, b)
    return float(sum(vals) / len(vals))


# --------------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------------

def fit_pyramid(pyramid: PyramidConfig, latent_hw: tuple[int, int]) -> PyramidConfig:
    """The pyramid for a latent of another size: its custom scales are scaled by the ratio of the final sizes
    (rounded, at least 1, duplicates removed, the last one exactly the latent size). Unchanged when it fits."""
    scales = pyramid.spatial_scales()
    if tuple(scales[-1]) == tuple(latent_hw):
        return pyramid
    if pyramid.custom_scales is None:
        raise ValueError(f"the pyramid ends at {scales[-1]} but the latent is {latent_hw}; official pyramids "
                         f"cannot be rescaled, give custom_scales")
    H, W = scales[-1]
    new: list[list[int]] = []
    for h, w in scales[:-1]:
        hw = [max(1, round(h * latent_hw[0] / H)), max(1, round(w * latent_hw[1] / W))]
        if (not new or hw != new[-1]) and tuple(hw) != tuple(latent_hw):
            new.append(hw)
    new.append(list(latent_hw))
    d = pyramid.to_dict()
    d.update(custom_scales=new, image_repetition=None, video_repetition=None)
    return PyramidConfig.from_dict(d)


def dropped_for_first(num_scales: Optional[int], scales_per_clip: int) -> Collection[int]:
    """In-clip scales to skip so that only the first `num_scales` are used (None: all)."""
    if num_scales is None:
        return ()
    if not 1 <= num_scales <= scales_per_clip:
        raise ValueError(f"--scales must be 1..{scales_per_clip} (the pyramid has {scales_per_clip} scales per "
                         f"clip), got {num_scales}")
    return range(num_scales, scales_per_clip)


@torch.no_grad()
def reconstruct(model, video: torch.Tensor, pyramid: Optional[PyramidConfig], num_scales: Optional[int] = None,
                chunked: bool = True, precision: torch.dtype = torch.float32) -> torch.Tensor:
    """Video (B, 3, T, H, W) in [-1, 1] -> reconstruction (not clamped): posterior mean, then, unless `pyramid` is
    None (continuous round trip), the residual multi-scale quantizer with the first `num_scales` scales of every
    clip (None: all), then the decoder. precision: the resolved compute dtype of the encoder and the decoder
    (autocast); the latent and the quantizer stay in float32."""
    z = model.encode(video, precision=precision)
    if pyramid is not None:
        cfg = model.config
        p = fit_pyramid(pyramid, tuple(z.shape[-2:]))
        schedule = p.build(cfg.pixel_frames(z.shape[2]))
        z = quantize_multiscale(z, schedule, drop_scales=dropped_for_first(num_scales, schedule.scales_per_clip)
                                ).codes
    return model.decode(z, chunked=chunked, precision=precision)


__all__ = ["PSNR_CAP_DB", "psnr", "psnr_per_frame", "ssim", "ssim_per_frame", "frames_to_video", "video_to_frames",
           "fit_pyramid", "reconstruct", "dropped_for_first"]
