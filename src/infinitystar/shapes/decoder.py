"""The Shapes World evaluator: decode attributes, motion and consistency from pixels.

Implements the "What an evaluator decodes" section of ``shared/shapes_world.md`` with its exact
reference constants, so our numbers match an independent evaluator's. Numpy only (connected
components by vectorised min-label propagation with pointer jumping), so it runs anywhere.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from infinitystar.media import as_uint8

from .world import BACKGROUNDS, CANVAS, PALETTE, SEGMENT_FRAMES

FOREGROUND_DISTANCE: float = 60.0
"""A pixel is foreground when its Euclidean RGB distance to the background colour exceeds this."""
MIN_OBJECT_PIXELS: int = 12
"""A largest component with fewer pixels means "no object in this frame"."""
FILL_RATIOS: dict[str, float] = {"circle": 0.785, "square": 1.0, "triangle": 0.5}
SMALL_BELOW: float = 16.0
"""size = small if the mean of bounding-box height and width is below this."""
STILL_BELOW: float = 0.4
"""Still if the larger |slope| (px/frame) is below this."""
SLOWLY_BELOW: float = 1.5
"""Slowly if the dominant |slope| is below this, else quickly."""

_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float64)
_PAL_NAMES = tuple(PALETTE)
_PAL_RGB = np.array([PALETTE[n] for n in _PAL_NAMES], dtype=np.float64)


@dataclass(frozen=True)
class FrameDecode:
    """What one frame shows. Object fields are None when the frame has no object."""

    background: str
    color: str | None = None
    shape: str | None = None
    size: str | None = None
    pixels: int = 0
    fill_ratio: float | None = None
    bbox: tuple[int, int, int, int] | None = None  # (y0, x0, y1, x1), inclusive
    centroid: tuple[float, float] | None = None  # (x, y) of pixel centres, in pixels

    @property
    def has_object(self) -> bool:
        return self.color is not None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MotionDecode:
    """Least-squares centroid slopes over frame index and the words they decode to."""

    direction: str | None  # None when fewer than two frames have an object
    speed: str | None  # None when still or undecidable
    slope_x: float | None
    slope_y: float | None


@dataclass(frozen=True)
class VideoDecode:
    """Per-frame decodes plus the video-level majority attributes, motion and consistency."""

    frames: tuple[FrameDecode, ...]
    background: str | None
    color: str | None
    shape: str | None
    size: str | None
    direction: str | None
    speed: str | None
    slope_x: float | None
    slope_y: float | None
    consistency: float
    consistency_per_attribute: dict[str, float]

    def to_dict(self, with_frames: bool = False) -> dict:
        d = {k: getattr(self, k) for k in ("background", "color", "shape", "size", "direction", "speed",
                                           "slope_x", "slope_y", "consistency", "consistency_per_attribute")}
        if with_frames:
            d["frames"] = [f.to_dict() for f in self.frames]
        return d


def _as_frame(frame: np.ndarray) -> np.ndarray:
    a = as_uint8(frame)       # float [0, 1] pixels are judged as the uint8 pixels they stand for
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"a frame must be (H, W, 3) RGB, got shape {a.shape}")
    if a.shape[0] < 3 or a.shape[1] < 3:
        raise ValueError(f"a frame must be at least 3x3 to have a border, got {a.shape[:2]}")
    return a


def _as_video(frames: np.ndarray) -> np.ndarray:
    a = as_uint8(frames)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[3] != 3:
        raise ValueError(f"a video must be (T, H, W, 3) RGB, got shape {a.shape}")
    if a.shape[0] == 0:
        raise ValueError("a video needs at least one frame")
    return a


def border_pixels(frame: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels (each pixel once), shape (N, 3)."""
    f = _as_frame(frame)
    return np.concatenate([f[0, :], f[-1, :], f[1:-1, 0], f[1:-1, -1]], axis=0)


def decode_background(frame: np.ndarray) -> str:
    """Nearest background colour to the per-channel median of the border pixels."""
    med = np.median(border_pixels(frame).astype(np.float64), axis=0)
    return _BG_NAMES[int(np.argmin(((_BG_RGB - med) ** 2).sum(axis=1)))]


def foreground_mask(frame: np.ndarray, background: str) -> np.ndarray:
    """Pixels whose Euclidean RGB distance to the background colour exceeds 60."""
    f = _as_frame(frame).astype(np.float64)
    d2 = ((f - np.array(BACKGROUNDS[background], dtype=np.float64)) ** 2).sum(axis=2)
    return d2 > FOREGROUND_DISTANCE ** 2


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels: -1 off the mask, else the smallest flat index in the component.

    Vectorised min-label propagation with pointer jumping: every label is the flat index of a pixel
    of the same component, so ``lab[lab]`` is too and jumping shortens chains; it stops when no label
    changes, i.e. labels are constant on each component (a neighbour with a larger label would shrink).
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    h, w = m.shape
    big = h * w
    lab = np.where(m, np.arange(big).reshape(h, w), big)
    while True:
        new = lab.copy()
        # neighbours (labels of off-mask pixels are `big`, so they never win the min)
        np.minimum(new[1:, :], lab[:-1, :], out=new[1:, :])
        np.minimum(new[:-1, :], lab[1:, :], out=new[:-1, :])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new = np.where(m, new, big)
        flat = new.ravel()
        on = flat < big
        for _ in range(8):  # pointer jumping
            jumped = flat.copy()
            jumped[on] = flat[flat[on]]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat.reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(m, lab, -1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 4-connected component (ties: smallest first pixel), or all False."""
    lab = label_components(mask)
    vals = lab[lab >= 0]
    if vals.size == 0:
        return np.zeros_like(lab, dtype=bool)
    ids, counts = np.unique(vals, return_counts=True)
    return lab == ids[int(np.argmax(counts))]


def decode_frame(frame: np.ndarray) -> FrameDecode:
    """Background, then colour, shape, size and centroid of the largest foreground component."""
    f = _as_frame(frame)
    background = decode_background(f)
    comp = largest_component(foreground_mask(f, background))
    n = int(comp.sum())
    if n < MIN_OBJECT_PIXELS:
        return FrameDecode(background=background, pixels=n)
    ys, xs = np.nonzero(comp)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    med = np.median(f[comp].astype(np.float64), axis=0)
    color = _PAL_NAMES[int(np.argmin(((_PAL_RGB - med) ** 2).sum(axis=1)))]
    fill = n / float(bh * bw)
    shape = min(FILL_RATIOS, key=lambda k: abs(FILL_RATIOS[k] - fill))
    size = "small" if (bh + bw) / 2.0 < SMALL_BELOW else "large"
    centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
    return FrameDecode(background=background, color=color, shape=shape, size=size, pixels=n,
                       fill_ratio=fill, bbox=(y0, x0, y1, x1), centroid=centroid)


def decode_motion(decodes: list[FrameDecode] | tuple[FrameDecode, ...]) -> MotionDecode:
    """Least-squares slope of the centroid's x and y over frame index (frames with an object only).

    Still if max |slope| < 0.4; else the dominant axis (x on a tie) and its sign give the direction,
    slowly if that |slope| < 1.5, else quickly.
    """
    pts = [(t, d.centroid) for t, d in enumerate(decodes) if d.centroid is not None]
    if len(pts) < 2:
        return MotionDecode(None, None, None, None)
    t = np.array([p[0] for p in pts], dtype=np.float64)
    xy = np.array([p[1] for p in pts], dtype=np.float64)
    tc = t - t.mean()
    denom = float((tc * tc).sum())
    sx = float((tc * (xy[:, 0] - xy[:, 0].mean())).sum() / denom)
    sy = float((tc * (xy[:, 1] - xy[:, 1].mean())).sum() / denom)
    if max(abs(sx), abs(sy)) < STILL_BELOW:
        return MotionDecode("still", None, sx, sy)
    if abs(sx) >= abs(sy):
        direction, dom = ("right" if sx > 0 else "left"), abs(sx)
    else:
        direction, dom = ("down" if sy > 0 else "up"), abs(sy)
    return MotionDecode(direction, "slowly" if dom < SLOWLY_BELOW else "quickly", sx, sy)


def _majority(values: list) -> tuple[object, float]:
    """Majority non-None value (ties: first seen) and the share of all entries that equal it."""
    present = [v for v in values if v is not None]
    if not present:
        return None, 0.0
    value, count = Counter(present).most_common(1)[0]
    return value, count / len(values)


def decode_video(frames: np.ndarray, start: int = 0, stop: int | None = None) -> VideoDecode:
    """Decode frames ``start:stop`` of a (T, H, W, 3) video (a single (H, W, 3) frame is accepted).

    Video attributes are per-frame majorities; motion is the centroid slope over the decoded range;
    consistency is, for color, shape and size, the share of frames agreeing with the majority (frames
    without an object disagree), and the video's value is the minimum of the three.
    """
    video = _as_video(frames)[start:stop]
    if video.shape[0] == 0:
        raise ValueError(f"empty frame range [{start}:{stop}] of a {len(_as_video(frames))}-frame video")
    decs = tuple(decode_frame(f) for f in video)
    return decode_from_frames(decs)


def decode_from_frames(decs: tuple[FrameDecode, ...] | list[FrameDecode]) -> VideoDecode:
    """Video-level result from already decoded frames (lets callers decode once, judge many ranges)."""
    decs = tuple(decs)
    background, _ = _majority([d.background for d in decs])
    per_attr: dict[str, float] = {}
    values: dict[str, object] = {}
    for key in ("color", "shape", "size"):
        values[key], per_attr[key] = _majority([getattr(d, key) for d in decs])
    motion = decode_motion(decs)
    return VideoDecode(
        frames=decs, background=background, color=values["color"], shape=values["shape"],
        size=values["size"], direction=motion.direction, speed=motion.speed,
        slope_x=motion.slope_x, slope_y=motion.slope_y,
        consistency=min(per_attr.values()), consistency_per_attribute=per_attr,
    )


def segment_range(k: int, num_frames: int | None = None) -> tuple[int, int]:
    """Frame range [a, b) used to judge segment ``k``'s motion: frames 16k .. 16k+16 inclusive.

    It includes the last frame of the previous segment (frame 0 for the first), so a segment is judged
    on 17 frames exactly like a 17-frame video.
    """
    a, b = SEGMENT_FRAMES * k, SEGMENT_FRAMES * (k + 1) + 1
    if k < 0 or (num_frames is not None and b > num_frames):
        raise ValueError(f"segment {k} (frames {a}..{b - 1}) is not inside a {num_frames}-frame video")
    return a, b


def decode_segments(frames: np.ndarray) -> list[VideoDecode]:
    """Decode each 16-frame segment of a long video (see segment_range); (T-1) must divide by 16."""
    video = _as_video(frames)
    T = video.shape[0]
    if T < 1 + SEGMENT_FRAMES or (T - 1) % SEGMENT_FRAMES:
        raise ValueError(f"a segmented video has 1 + 16k frames (k >= 1), got {T}")
    decs = [decode_frame(f) for f in video]
    return [decode_from_frames(decs[a:b]) for a, b in
            (segment_range(k, T) for k in range((T - 1) // SEGMENT_FRAMES))]


__all__ = [
    "FOREGROUND_DISTANCE", "MIN_OBJECT_PIXELS", "FILL_RATIOS", "SMALL_BELOW", "STILL_BELOW", "SLOWLY_BELOW",
    "FrameDecode", "MotionDecode", "VideoDecode", "border_pixels", "decode_background", "foreground_mask",
    "label_components", "largest_component", "decode_frame", "decode_motion", "decode_video",
    "decode_from_frames", "segment_range", "decode_segments", "CANVAS",
]
