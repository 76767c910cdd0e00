"""Shapes World: constants, exact renderer, captions and seeded samplers.

The world is fixed by ``shared/shapes_world.md``; every constant below is copied from it verbatim,
because an independent evaluator decodes our model's outputs with exactly these values.

Coordinates: pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)`` and its centre is ``(x+0.5, y+0.5)``;
``y`` grows downward. Object centres live on the half-pixel lattice (multiples of 0.5). The renderer
works in *doubled* coordinates (``2*x + 1`` for a pixel centre, ``2*cx`` for an object centre), so
every inside/on-edge test is integer arithmetic and edge pixels are decided exactly.

The samplers draw start centres on the **integer** grid (``cx0, cy0`` integers), uniformly among the
integer positions that keep the whole geometric shape (its box ``[c-s, c+s]``) inside ``[0, 64]`` on
every frame. Speeds are integers, so every frame's centre is an integer too. The renderer itself
accepts half-integer centres as well.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# --------------------------------------------------------------------------------------------------
# Constants (verbatim from the spec)
# --------------------------------------------------------------------------------------------------

CANVAS: int = 64
"""Frames are CANVAS x CANVAS RGB uint8."""

FPS: int = 16
SEGMENT_FRAMES: int = 16
"""A long video is frame 0 followed by segments of this many frames (1-16, 17-32, ...)."""

VIDEO_FRAMES: int = 17
CONTINUATION_FRAMES: int = 33
LONG_VIDEO_FRAMES: tuple[int, ...] = (33, 49, 65)

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (160, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 6, "large": 10}
"""Half-extent s in pixels."""
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "still": (0, 0),
}
SPEEDS: dict[str, int] = {"slowly": 1, "quickly": 2}
"""Pixels per frame."""

COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
MOVING_DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SPEED_NAMES: tuple[str, ...] = tuple(SPEEDS)

HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("yellow", "circle"), ("cyan", "square")}
)
"""(color, shape) pairs that never appear in training data (compositional generalisation test)."""

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
HELDOUT_PAIRS_SORTED: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELD_OUT_PAIRS)

MOVING_TEMPLATE = "a {size} {color} {shape} moving {direction} {speed} on a {background} background"
STILL_TEMPLATE = "a {size} {color} {shape} standing still on a {background} background"
IMAGE_TEMPLATE = "a {size} {color} {shape} on a {background} background"

Split = Literal["train", "heldout", "all"]
SPLITS: tuple[str, ...] = ("train", "heldout", "all")


def vocabulary() -> list[str]:
    """Every word a Shapes World caption can contain (the built-in text encoder's vocabulary)."""
    words = set()
    for template in (MOVING_TEMPLATE, STILL_TEMPLATE, IMAGE_TEMPLATE):
        words |= {w for w in template.split() if not w.startswith("{")}
    for names in (SIZE_NAMES, COLORS, SHAPES, BACKGROUND_NAMES, MOVING_DIRECTIONS, SPEED_NAMES):
        words |= set(names)
    return sorted(words)

CENTRE_STEP: float = 1.0
"""Grid of the sampled start centres (integers). The renderer accepts any multiple of 0.5."""


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Motion:
    """The motion of one caption segment: a direction word and a speed word (None when still)."""

    direction: str = "still"
    speed: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}; expected one of {DIRECTION_NAMES}")
        if self.direction == "still":
            if self.speed is not None:
                raise ValueError(f"a still motion has no speed word, got speed={self.speed!r}")
        elif self.speed not in SPEEDS:
            raise ValueError(
                f"moving {self.direction!r} needs a speed in {SPEED_NAMES}, got speed={self.speed!r}"
            )

    @property
    def velocity(self) -> tuple[int, int]:
        """(vx, vy) in pixels per frame."""
        dx, dy = DIRECTIONS[self.direction]
        v = 0 if self.speed is None else SPEEDS[self.speed]
        return dx * v, dy * v


STILL = Motion("still", None)


def _half_units(value: float, name: str) -> int:
    """Return ``2*value`` as an int, refusing values that are not multiples of 0.5 (exactness)."""
    doubled = round(2 * float(value))
    if doubled != 2 * float(value):
        raise ValueError(f"{name}={value!r} is not a multiple of 0.5; centres must be integer or half-integer")
    return int(doubled)


@dataclass(frozen=True)
class ShapeSpec:
    """One object in one image or video: its attributes, start centre and per-segment motion.

    ``segments`` is empty for a still image, has one entry for a video with a single caption (it
    applies to every step ``t-1 -> t``), and one entry per 16-frame segment for a long video with a
    caption per segment (segment ``k`` moves frames ``16k+1 .. 16k+16``).
    """

    color: str
    shape: str
    size: str
    background: str
    cx0: float
    cy0: float
    segments: tuple[Motion, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZE_NAMES}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {BACKGROUND_NAMES}")
        if not isinstance(self.segments, tuple) or not all(isinstance(m, Motion) for m in self.segments):
            raise TypeError("segments must be a tuple of Motion")
        _half_units(self.cx0, "cx0")
        _half_units(self.cy0, "cy0")

    @property
    def half_extent(self) -> int:
        return SIZES[self.size]

    @property
    def is_heldout(self) -> bool:
        return (self.color, self.shape) in HELD_OUT_PAIRS

    def attributes(self) -> dict[str, str]:
        """The static attributes as a plain dict (what the decoder reports per frame)."""
        return {"background": self.background, "color": self.color, "shape": self.shape, "size": self.size}

    def to_dict(self) -> dict:
        """JSON-friendly form (used in manifests)."""
        return {
            **self.attributes(),
            "cx0": float(self.cx0),
            "cy0": float(self.cy0),
            "segments": [{"direction": m.direction, "speed": m.speed} for m in self.segments],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeSpec":
        return cls(
            color=d["color"], shape=d["shape"], size=d["size"], background=d["background"],
            cx0=d["cx0"], cy0=d["cy0"],
            segments=tuple(Motion(m["direction"], m["speed"]) for m in d.get("segments", [])),
        )


def _velocities_doubled(spec: ShapeSpec, num_frames: int) -> np.ndarray:
    """Per-step velocity in half-pixel units, shape (num_frames-1, 2); row t-1 moves frame t-1 -> t."""
    steps = num_frames - 1
    segs = spec.segments
    if steps == 0 or len(segs) == 0:
        return np.zeros((steps, 2), dtype=np.int64)
    if len(segs) == 1:
        return np.tile(np.array(segs[0].velocity, dtype=np.int64) * 2, (steps, 1))
    if steps != SEGMENT_FRAMES * len(segs):
        raise ValueError(
            f"a spec with {len(segs)} segments describes exactly {1 + SEGMENT_FRAMES * len(segs)} frames, "
            f"got num_frames={num_frames}"
        )
    per_seg = np.array([m.velocity for m in segs], dtype=np.int64) * 2
    return np.repeat(per_seg, SEGMENT_FRAMES, axis=0)


def centres_doubled(spec: ShapeSpec, num_frames: int) -> np.ndarray:
    """Centres of every frame in half-pixel units (exact ints), shape (num_frames, 2) as (2cx, 2cy)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    start = np.array([_half_units(spec.cx0, "cx0"), _half_units(spec.cy0, "cy0")], dtype=np.int64)
    vel = _velocities_doubled(spec, num_frames)
    offsets = np.concatenate([np.zeros((1, 2), dtype=np.int64), np.cumsum(vel, axis=0)], axis=0)
    return start[None, :] + offsets


def centres(spec: ShapeSpec, num_frames: int) -> np.ndarray:
    """Centres (cx, cy) of every frame in pixels, float64, shape (num_frames, 2)."""
    return centres_doubled(spec, num_frames).astype(np.float64) / 2.0


def fits_canvas(spec: ShapeSpec, num_frames: int) -> bool:
    """True when the whole geometric shape (box [c-s, c+s]) stays inside [0, 64]^2 on every frame."""
    c2 = centres_doubled(spec, num_frames)
    s2 = 2 * spec.half_extent
    return bool((c2 - s2 >= 0).all() and (c2 + s2 <= 2 * CANVAS).all())


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------

# Doubled pixel-centre coordinates: pixel x has centre x + 0.5, doubled 2x + 1.
_P2 = 2 * np.arange(CANVAS, dtype=np.int64) + 1


def shape_mask(shape: str, size: str, cx: float, cy: float) -> np.ndarray:
    """Boolean (64, 64) mask [y, x] of the pixels the object covers; exact for half-integer centres.

    All tests are integer inequalities in doubled coordinates (u = 2(x+0.5) - 2cx, v likewise):
      circle   u^2 + v^2 <= (2s)^2
      square   |u| <= 2s and |v| <= 2s
      triangle apex (cx, cy-s), base y = cy+s: v <= 2s and 2|u| <= v + 2s  (inside or on an edge)
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZE_NAMES}")
    s2 = 2 * SIZES[size]
    u = (_P2 - _half_units(cx, "cx"))[None, :]  # x along columns
    v = (_P2 - _half_units(cy, "cy"))[:, None]  # y along rows
    if shape == "circle":
        return u * u + v * v <= s2 * s2
    if shape == "square":
        return (np.abs(u) <= s2) & (np.abs(v) <= s2)
    return (v <= s2) & (2 * np.abs(u) <= v + s2)


def render(spec: ShapeSpec, num_frames: int = 1) -> np.ndarray:
    """Render ``num_frames`` frames of ``spec`` as a (T, 64, 64, 3) uint8 array (no anti-aliasing).

    Raises ValueError when the object would leave the canvas: the world never clips objects.
    """
    if not fits_canvas(spec, num_frames):
        raise ValueError(
            f"the object leaves the canvas within {num_frames} frames (centres {centres(spec, num_frames)[[0, -1]].tolist()}, "
            f"half-extent {spec.half_extent}); Shapes World never clips objects"
        )
    c2 = centres_doubled(spec, num_frames)
    bg = np.array(BACKGROUNDS[spec.background], dtype=np.uint8)
    fg = np.array(PALETTE[spec.color], dtype=np.uint8)
    out = np.empty((num_frames, CANVAS, CANVAS, 3), dtype=np.uint8)
    out[:] = bg
    for t in range(num_frames):
        mask = shape_mask(spec.shape, spec.size, c2[t, 0] / 2, c2[t, 1] / 2)
        out[t][mask] = fg
    return out


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def caption_for(size: str, color: str, shape: str, background: str,
                direction: str | None = None, speed: str | None = None) -> str:
    """Format one caption. ``direction=None`` gives the image template, ``"still"`` the still video one."""
    for name, value, allowed in (("size", size, SIZES), ("color", color, PALETTE), ("shape", shape, SHAPES),
                                 ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(allowed)}")
    if direction is None:
        if speed is not None:
            raise ValueError("an image caption has no speed")
        return IMAGE_TEMPLATE.format(size=size, color=color, shape=shape, background=background)
    m = Motion(direction, speed)  # validates the pair
    if m.direction == "still":
        return STILL_TEMPLATE.format(size=size, color=color, shape=shape, background=background)
    return MOVING_TEMPLATE.format(size=size, color=color, shape=shape, direction=m.direction,
                                  speed=m.speed, background=background)


def caption_image(spec: ShapeSpec) -> str:
    """`a {size} {color} {shape} on a {background} background`."""
    return caption_for(spec.size, spec.color, spec.shape, spec.background)


def caption_motion(spec: ShapeSpec, motion: Motion) -> str:
    """The moving or still video caption of ``spec`` with ``motion``."""
    return caption_for(spec.size, spec.color, spec.shape, spec.background, motion.direction, motion.speed)


def caption_video(spec: ShapeSpec) -> str:
    """The single caption of a video whose spec has one motion segment (or none: still)."""
    if len(spec.segments) > 1:
        raise ValueError(f"spec has {len(spec.segments)} segments; use captions_per_segment")
    return caption_motion(spec, spec.segments[0] if spec.segments else STILL)


def captions_per_segment(spec: ShapeSpec) -> list[str]:
    """One caption per 16-frame segment (frames 1-16, 17-32, ...)."""
    if not spec.segments:
        raise ValueError("spec has no motion segments")
    return [caption_motion(spec, m) for m in spec.segments]


_WORD = {
    "size": "|".join(SIZES), "color": "|".join(PALETTE), "shape": "|".join(SHAPES),
    "background": "|".join(BACKGROUNDS), "direction": "|".join(MOVING_DIRECTIONS), "speed": "|".join(SPEEDS),
}
_RE_MOVING = re.compile(
    rf"a (?P<size>{_WORD['size']}) (?P<color>{_WORD['color']}) (?P<shape>{_WORD['shape']}) "
    rf"moving (?P<direction>{_WORD['direction']}) (?P<speed>{_WORD['speed']}) "
    rf"on a (?P<background>{_WORD['background']}) background"
)
_RE_STILL = re.compile(
    rf"a (?P<size>{_WORD['size']}) (?P<color>{_WORD['color']}) (?P<shape>{_WORD['shape']}) "
    rf"standing still on a (?P<background>{_WORD['background']}) background"
)
_RE_IMAGE = re.compile(
    rf"a (?P<size>{_WORD['size']}) (?P<color>{_WORD['color']}) (?P<shape>{_WORD['shape']}) "
    rf"on a (?P<background>{_WORD['background']}) background"
)


def parse_caption(text: str) -> dict:
    """Parse one exact Shapes World caption.

    Returns ``{"kind": "moving"|"still"|"image", "size", "color", "shape", "background",
    "direction", "speed"}``; images have direction and speed None, still videos direction "still" and
    speed None. Raises ValueError for anything that is not exactly one of the three templates
    (the templates are exact: lower case, single spaces, no trailing period).
    """
    if not isinstance(text, str):
        raise ValueError(f"a caption must be a str, got {type(text).__name__}")
    for kind, rx in (("moving", _RE_MOVING), ("still", _RE_STILL), ("image", _RE_IMAGE)):
        m = rx.fullmatch(text)
        if m:
            d = m.groupdict()
            return {
                "kind": kind, "size": d["size"], "color": d["color"], "shape": d["shape"],
                "background": d["background"],
                "direction": d.get("direction") or ("still" if kind == "still" else None),
                "speed": d.get("speed"),
            }
    raise ValueError(
        f"not a Shapes World caption: {text!r}; expected one of {MOVING_TEMPLATE!r}, {STILL_TEMPLATE!r}, "
        f"{IMAGE_TEMPLATE!r} with the vocabulary of shared/shapes_world.md"
    )


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def pairs_for_split(split: str) -> tuple[tuple[str, str], ...]:
    """(color, shape) pairs a split may produce: train excludes HELD_OUT_PAIRS, heldout is only them."""
    _check_split(split)
    return {"train": TRAIN_PAIRS, "heldout": HELDOUT_PAIRS_SORTED, "all": ALL_PAIRS}[split]


def sample_attributes(rng: np.random.Generator, split: str = "train") -> dict[str, str]:
    """Static attributes: (color, shape) uniform over the split's pairs; size and background uniform."""
    pairs = pairs_for_split(split)
    color, shape = pairs[int(rng.integers(len(pairs)))]
    size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
    background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    return {"color": color, "shape": shape, "size": size, "background": background}


def _sample_motion(rng: np.random.Generator, speeds: tuple[str, ...]) -> Motion:
    """Direction uniform over the 5 words; speed uniform over ``speeds`` when moving."""
    direction = DIRECTION_NAMES[int(rng.integers(len(DIRECTION_NAMES)))]
    if direction == "still":
        return STILL
    if not speeds:
        raise ValueError("no speed allowed for a moving object")
    return Motion(direction, speeds[int(rng.integers(len(speeds)))])


def _path_extent(segments: tuple[Motion, ...], num_frames: int) -> tuple[int, int, int, int]:
    """(min_x, max_x, min_y, max_y) of the integer centre offsets from frame 0 over the video."""
    probe = ShapeSpec("red", "circle", "small", "black", 0.0, 0.0, segments)
    off = centres_doubled(probe, num_frames) // 2
    return int(off[:, 0].min()), int(off[:, 0].max()), int(off[:, 1].min()), int(off[:, 1].max())


def _start_range(size: str, segments: tuple[Motion, ...], num_frames: int) -> tuple[int, int, int, int] | None:
    """Inclusive integer ranges (x_lo, x_hi, y_lo, y_hi) for the start centre, or None if nothing fits."""
    s = SIZES[size]
    mnx, mxx, mny, mxy = _path_extent(segments, num_frames)
    x_lo, x_hi = s - mnx, CANVAS - s - mxx
    y_lo, y_hi = s - mny, CANVAS - s - mxy
    if x_lo > x_hi or y_lo > y_hi:
        return None
    return x_lo, x_hi, y_lo, y_hi


def _make_spec(rng: np.random.Generator, attrs: dict[str, str], segments: tuple[Motion, ...],
               num_frames: int) -> ShapeSpec:
    rng_range = _start_range(attrs["size"], segments, num_frames)
    if rng_range is None:  # callers only pass motions that fit
        raise ValueError(f"motion {segments} does not fit a {attrs['size']} object in {num_frames} frames")
    x_lo, x_hi, y_lo, y_hi = rng_range
    cx0 = int(rng.integers(x_lo, x_hi + 1))
    cy0 = int(rng.integers(y_lo, y_hi + 1))
    return ShapeSpec(cx0=float(cx0), cy0=float(cy0), segments=segments, **attrs)


def allowed_speeds(num_frames: int) -> tuple[str, ...]:
    """Speeds whose travel over a single-caption video fits even a large object (so size and motion
    stay independent): both for 17 frames, only ``slowly`` for 33 frames."""
    span = CANVAS - 2 * max(SIZES.values())
    return tuple(w for w, v in SPEEDS.items() if v * (num_frames - 1) <= span)


def sample_image(rng: np.random.Generator, split: str = "train") -> ShapeSpec:
    """A still object, centre uniform over the integer positions that keep it inside the canvas."""
    attrs = sample_attributes(rng, split)
    return _make_spec(rng, attrs, (), 1)


def sample_video(rng: np.random.Generator, num_frames: int = VIDEO_FRAMES, split: str = "train") -> ShapeSpec:
    """A video with one caption: direction uniform over the 5 words, speed uniform over the speeds
    that fit ``num_frames`` (17 frames: slowly or quickly; 33 frames: slowly only)."""
    if not 2 <= num_frames <= CONTINUATION_FRAMES:
        raise ValueError(
            f"single-caption videos have 2..{CONTINUATION_FRAMES} frames, got {num_frames}; "
            "use sample_long_video for a caption per 16-frame segment"
        )
    attrs = sample_attributes(rng, split)
    motion = _sample_motion(rng, allowed_speeds(num_frames))
    return _make_spec(rng, attrs, (motion,), num_frames)


def sample_long_video(rng: np.random.Generator, num_frames: int = 65, split: str = "train",
                      distinct_consecutive: bool = False, max_tries: int = 10_000) -> ShapeSpec:
    """A video with one caption per 16-frame segment (frames 1-16, 17-32, ...).

    Each segment draws its own direction (uniform over 5) and speed (uniform over 2); the whole set of
    segment motions is redrawn until the path fits the canvas for the drawn size (rejection sampling,
    so every fitting combination is equally likely), then the start is drawn uniformly among the
    integer positions that keep the object inside for the whole video. With
    ``distinct_consecutive`` two neighbouring segments never share a caption.
    """
    if num_frames not in LONG_VIDEO_FRAMES:
        raise ValueError(f"long videos have {LONG_VIDEO_FRAMES} frames, got {num_frames}")
    n_seg = (num_frames - 1) // SEGMENT_FRAMES
    attrs = sample_attributes(rng, split)
    for _ in range(max_tries):
        segments = tuple(_sample_motion(rng, SPEED_NAMES) for _ in range(n_seg))
        if distinct_consecutive and any(a == b for a, b in zip(segments, segments[1:])):
            continue
        if _start_range(attrs["size"], segments, num_frames) is not None:
            return _make_spec(rng, attrs, segments, num_frames)
    raise RuntimeError(f"no fitting motion found in {max_tries} tries (num_frames={num_frames})")
