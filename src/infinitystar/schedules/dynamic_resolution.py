"""Spatial scale tables of the InfinityStar pyramid, computed from the official formula.

For each base aspect ratio r = h/w and each "side" s, the scale is pw = round(sqrt(s^2 / r)),
ph = round(sqrt(s^2 / r) * r), with numpy's half-to-even rounding applied to the float values. The mirrored
ratio 1/r swaps h and w. A template is keyed by int(1000 * h/w of its last scale) / 1000.
"""
from __future__ import annotations

import math

import numpy as np

BASE_RATIOS: tuple[float, ...] = (1.0, 100 / 116, 3 / 4, 2 / 3, 9 / 16, 1 / 2, 2 / 5, 1 / 3)
SIDES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 40, 60)
PN_NUM_SCALES: dict[str, int] = {"0.06M": 11, "0.25M": 13, "0.40M": 14, "0.90M": 15}
PIXELS_PER_LATENT = 16  # the video tokenizer's spatial stride (8 conv + 2x2 absorbed patchify)
MAX_TEMPLATE_DISTANCE = math.log(1.2)  # how far (in log h/w) a request may be from its nearest template

Scale2D = tuple[int, int]


def base_ratio_scales(ratio: float) -> list[Scale2D]:
    """The 15 (h, w) scales of one base ratio h/w <= 1."""
    out = []
    for s in SIDES:
        pw_float = math.sqrt(s * s / ratio)
        out.append((int(np.round(pw_float * ratio)), int(np.round(pw_float))))
    return out


def template_key(scales: list[Scale2D]) -> float:
    h, w = scales[-1]
    return int(h / w * 1000) / 1000


def all_templates() -> dict[float, list[Scale2D]]:
    """All 15 templates (the 8 base ratios and their mirrors) in the reference's dict order."""
    out: dict[float, list[Scale2D]] = {}
    for r in BASE_RATIOS:
        scales = base_ratio_scales(r)
        out[template_key(scales)] = scales
        if r != 1.0:
            mirrored = [(w, h) for h, w in scales]
            out[template_key(mirrored)] = mirrored
    return out


def num_scales(pn: str) -> int:
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown pixel budget {pn!r}; choose one of {', '.join(PN_NUM_SCALES)}")
    return PN_NUM_SCALES[pn]


def nearest_template(h_div_w: float) -> float:
    """The template key nearest to an aspect ratio h/w (in log space); an error when none is close."""
    if not (h_div_w > 0 and math.isfinite(h_div_w)):
        raise ValueError(f"aspect ratio h/w must be a positive number, got {h_div_w}")
    keys = list(all_templates())
    best = min(keys, key=lambda k: abs(math.log(h_div_w / k)))
    if abs(math.log(h_div_w / best)) > MAX_TEMPLATE_DISTANCE:
        raise ValueError(
            f"aspect ratio h/w = {h_div_w:.3f} is far from every template "
            f"({min(keys)} .. {max(keys)}); crop the input closer to one of {sorted(keys)}")
    return best


def spatial_scales(pn: str, h_div_w: float) -> list[Scale2D]:
    """The first N scales (N from the pixel budget) of the template nearest to h/w."""
    return all_templates()[nearest_template(h_div_w)][: num_scales(pn)]


def pixel_size(scales: list[Scale2D], pixels_per_latent: int = PIXELS_PER_LATENT) -> tuple[int, int]:
    h, w = scales[-1]
    return h * pixels_per_latent, w * pixels_per_latent
