"""Dynamic-resolution scale tables of Infinity (the image model): 13 token grids per aspect ratio.

The official table (`infinity/utils/dynamic_resolution.py`) is hand-written data with no generating formula, so
it is embedded here as data: 8 base ratios h/w >= 1, each with 13 (h, w) grids at VAE stride 16. Every base
ratio r != 1 also yields its transpose under the key int(1/r * 1000) / 1000 (0.8, 0.75, 0.666, 0.571, 0.5, 0.4,
0.333), giving 15 templates. A pixel budget `pn` keeps a prefix of the 13 scales (0.06M: 7, 0.25M: 10,
0.60M: 12, 1M: 13), so a shorter budget is a prefix of the 1M schedule of the same template.

RoPE-2D anchors every schedule to the last grid of the 1M schedule of its template (`rope_anchor`), which is
why weights transfer between 256, 512 and 1024 pixel training.
"""
from __future__ import annotations

import math
from typing import Sequence

from infinitystar.schedules.dynamic_resolution import pixel_size as _pixel_size
from infinitystar.schedules.pyramid import Schedule

Scale2D = tuple[int, int]

# Base ratio h/w -> 13 token grids (h, w), in the official dict order.
BASE_TABLE: dict[float, tuple[Scale2D, ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}
# The frame counts the official table carries (a video leftover); every image code path replaces them by 1.
PREDEFINED_T: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15, 17, 21)
PN_NUM_SCALES: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
PIXELS_PER_TOKEN = 16  # VAE stride of the released d16..d64 tokenizers (8B: stride 8 x 2x2 patchify)


def transposed_key(ratio: float) -> float:
    """The official key of the transposed template: int(1/r * 1000) / 1000 (1/1.5 -> 0.666)."""
    return int(1 / ratio * 1000) / 1000


def all_templates() -> dict[float, list[Scale2D]]:
    """The 15 templates h/w -> 13 grids, in the official dict order (each base ratio, then its transpose)."""
    out: dict[float, list[Scale2D]] = {}
    for r, scales in BASE_TABLE.items():
        out[r] = list(scales)
        if r != 1.0:
            out[transposed_key(r)] = [(w, h) for h, w in scales]
    return out


def template_keys() -> list[str]:
    """String keys of the templates as the official code prints them ("1.0", "1.333", "0.666", ...)."""
    return [repr(float(k)) for k in all_templates()]


def num_scales(pn: str) -> int:
    if pn not in PN_NUM_SCALES:
        raise ValueError(f"unknown Infinity pixel budget {pn!r}; choose one of {', '.join(PN_NUM_SCALES)}")
    return PN_NUM_SCALES[pn]


def nearest_template(h_div_w: float) -> float:
    """The template nearest to an aspect ratio h/w by |h/w - template| (the official rule; ties go to the
    first template in dict order)."""
    if not (isinstance(h_div_w, (int, float)) and h_div_w > 0 and math.isfinite(h_div_w)):
        raise ValueError(f"aspect ratio h/w must be a positive number, got {h_div_w!r}")
    return min(all_templates(), key=lambda k: abs(h_div_w - k))


def spatial_scales(pn: str, h_div_w: float) -> list[Scale2D]:
    """The (h, w) token grids of a pixel budget for the template nearest to h/w."""
    return all_templates()[nearest_template(h_div_w)][: num_scales(pn)]


def pixel_size(scales: Sequence[Scale2D], pixels_per_token: int = PIXELS_PER_TOKEN) -> tuple[int, int]:
    """(H, W) in pixels of a schedule: its last grid times the token stride."""
    return _pixel_size(list(scales), pixels_per_token)


def seq_len(scales: Sequence[Scale2D]) -> int:
    """Tokens of a schedule including the 1x1 start scale."""
    return sum(h * w for h, w in scales)


def dynamic_resolution_table() -> dict[float, dict[str, dict]]:
    """The official `dynamic_resolution_h_w` dict: template -> pn -> {"pixel": (H, W), "scales": [(t, h, w)]},
    with the official (unused) t values."""
    out: dict[float, dict[str, dict]] = {}
    for key, scales in all_templates().items():
        out[key] = {}
        for pn, n in PN_NUM_SCALES.items():
            s = scales[:n]
            out[key][pn] = {"pixel": pixel_size(s), "scales": [(t, h, w) for t, (h, w) in zip(PREDEFINED_T, s)]}
    return out


def rope_anchor(scales: Sequence[Scale2D]) -> tuple[int, int]:
    """The RoPE-2D anchor grid (Hu, Wu) of a schedule: the last grid of the 1M schedule of the template whose
    list the schedule is a prefix of. A schedule that is no template's prefix is anchored to its own last grid
    (as if it were a full schedule). A short schedule that is a prefix of several templates with different
    anchors (only the first two scales are shared) is ambiguous: pass the anchor explicitly."""
    scales = [tuple(int(v) for v in s) for s in scales]
    if not scales:
        raise ValueError("empty schedule")
    anchors = {tuple(t[-1]) for t in all_templates().values() if t[:len(scales)] == scales}
    if not anchors:
        return scales[-1]
    if len(anchors) > 1:
        raise ValueError(f"schedule {scales} is a prefix of several templates with different RoPE anchors "
                         f"{sorted(anchors)}; pass rope_anchor explicitly")
    return anchors.pop()


def image_schedule(scales: Sequence[Scale2D], bits: int) -> Schedule:
    """A one-frame `Schedule` for the shared residual loop: every scale once, every scale `bits` bits."""
    scales = [tuple(int(v) for v in s) for s in scales]
    ones = [1] * len(scales)
    return Schedule(scales, num_latent_frames=1, frames_per_clip=1, image_repetition=ones, video_repetition=ones,
                    detail_min_tokens=0, semantic_bits=bits, detail_bits=bits)


def check_custom_scales(scales: Sequence, what: str = "scales") -> list[Scale2D]:
    """A custom image schedule (a model trained at one small size, e.g. [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]
    for 8x8 latents): (h, w) grids of positive integers starting at 1x1 (the start token), each grid at least as
    large as the one before in both sides and not equal to it. Returns it as tuples; a ValueError names the fault."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise ValueError(f"{what}: expected a non-empty list of [h, w] grids, got {scales!r}")
    out: list[Scale2D] = []
    for i, s in enumerate(scales):
        if (isinstance(s, (str, bytes)) or not isinstance(s, Sequence) or len(s) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in s)):
            raise ValueError(f"{what}[{i}]: expected [h, w] with positive integers, got {s!r}")
        out.append((int(s[0]), int(s[1])))
    if out[0] != (1, 1):
        raise ValueError(f"{what}: the first scale must be [1, 1] (the start token), got {list(out[0])}")
    for (h0, w0), (h1, w1) in zip(out, out[1:]):
        if h1 < h0 or w1 < w0 or (h1, w1) == (h0, w0):
            raise ValueError(f"{what}: grids must grow from scale to scale, got [{h0}, {w0}] then [{h1}, {w1}]")
    return out


def template_anchor(h_div_w: float) -> tuple[int, int]:
    """The RoPE-2D anchor of the template nearest to h/w (the last grid of its 1M schedule)."""
    return all_templates()[nearest_template(h_div_w)][-1]
