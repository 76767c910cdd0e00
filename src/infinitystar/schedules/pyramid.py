"""The spacetime pyramid: an image pyramid (latent frame 0) followed by clip pyramids, every scale repeated.

One `Schedule` answers every ordering question the generator, the quantizer, the trainer and the attention
pattern ask: which scales exist (global index over all clips), their (t, h, w), clip and latent-frame range,
bits per token (one rule: a scale with fewer than `detail_min_tokens` spatial tokens is "semantic"), the step
order (scale after scale, each repeated), which earlier scales a scale may attend to, and the condition blocks
(interactive model) every scale attends to.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Optional, Sequence

from infinitystar.config import ArchConfig
from infinitystar.schedules.dynamic_resolution import PN_NUM_SCALES, spatial_scales

AttentionPattern = Literal["sparse", "dense"]


def latent_frames(num_frames: int, temporal_compression: int = 4) -> int:
    """Video frames 1 + k*tc -> latent frames 1 + k (the first frame is encoded on its own)."""
    if num_frames < 1 or (num_frames - 1) % temporal_compression:
        lo = 1 + (max(num_frames - 1, 0) // temporal_compression) * temporal_compression
        raise ValueError(
            f"a video must have 1 + {temporal_compression}k frames (1, {1 + temporal_compression}, "
            f"{1 + 2 * temporal_compression}, ...), got {num_frames}; use {lo} or {lo + temporal_compression}")
    return 1 + (num_frames - 1) // temporal_compression


class _TokenGrid:
    """shape and token count of a (t, h, w) grid of tokens (for dataclasses with t, h, w fields)."""
    t: int
    h: int
    w: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.t, self.h, self.w)

    @property
    def tokens(self) -> int:
        return self.t * self.h * self.w


@dataclass(frozen=True)
class Scale(_TokenGrid):
    index: int          # global index over the whole schedule
    clip: int           # 0 = image pyramid, k >= 1 = video clip k
    in_clip: int        # index inside the clip's pyramid
    t: int
    h: int
    w: int
    frame_start: int    # first absolute latent frame of the clip
    bits: int           # bits per token (semantic or detail)
    repetitions: int

    @property
    def frame_end(self) -> int:
        return self.frame_start + self.t


@dataclass(frozen=True)
class ConditionBlock(_TokenGrid):
    """Tokens made from the previous segment of an interactive video, attended to by every scale of the new one.

    They are not generated: their (t, h, w) map is given (see `infinitystar.quant.interact`). Each block is run
    through the transformer once, attending only to itself, and its keys/values are cached.
    """
    name: str                 # "semantic" or "detail"
    t: int
    h: int
    w: int
    frames: tuple[int, ...]   # RoPE latent frame of each of its t frames
    position: int             # RoPE scale-axis position after the text (the official 800 / 801)


@dataclass(frozen=True)
class Step:
    index: int          # global step counter (the RoPE scale axis counts these)
    scale: Scale
    repetition: int

    @property
    def is_last_repetition(self) -> bool:
        return self.repetition == self.scale.repetitions - 1


class Schedule:
    """The full generation order for one video (or image) size.

    Args:
        spatial: the (h, w) latent sizes of one pyramid, coarse to fine.
        num_latent_frames: T_lat (1 for an image).
        frames_per_clip: latent frames of a full video clip (20 in the official models). A partial last clip
            keeps its own length at every scale and its own full-size target (the official inference resized
            earlier clips to the partial clip's size; we do not).
        image_repetition / video_repetition: repetitions per in-clip scale index.
        detail_min_tokens: a scale with h*w >= this many tokens is a detail scale (`detail_bits` per token),
            otherwise semantic (`semantic_bits`). The same rule picks the codebook and the head.
        attention: "sparse" (official: each clip scale sees the previous clip's last scale) or "dense"
            (block-causal: every earlier scale).
        first_clip_frames: latent frames of clip 0: 1 is the image pyramid (text-to-video); an interactive
            segment is one clip of `frames_per_clip` frames starting at frame 0 (the official interactive model).
        conditions: condition blocks every scale attends to (interactive segments); none by default.
    """

    def __init__(
        self,
        spatial: Sequence[tuple[int, int]],
        num_latent_frames: int,
        frames_per_clip: int,
        image_repetition: Sequence[int],
        video_repetition: Sequence[int],
        detail_min_tokens: int,
        semantic_bits: int = 16,
        detail_bits: int = 64,
        attention: AttentionPattern = "sparse",
        first_clip_frames: int = 1,
        conditions: Sequence[ConditionBlock] = (),
    ):
        spatial = [tuple(int(v) for v in hw) for hw in spatial]
        if not spatial or any(len(hw) != 2 or min(hw) < 1 for hw in spatial):
            raise ValueError(f"spatial scales must be a non-empty list of positive (h, w) pairs, got {spatial}")
        n = len(spatial)
        for name, reps in (("image_repetition", image_repetition), ("video_repetition", video_repetition)):
            if len(reps) != n or any(int(r) < 1 for r in reps):
                raise ValueError(f"{name} must list {n} positive counts (one per scale), got {list(reps)}")
        if num_latent_frames < 1 or frames_per_clip < 1 or first_clip_frames < 1:
            raise ValueError("num_latent_frames, frames_per_clip and first_clip_frames must be positive")
        if first_clip_frames > num_latent_frames:
            raise ValueError(f"first_clip_frames {first_clip_frames} exceeds num_latent_frames {num_latent_frames}")
        if attention not in ("sparse", "dense"):
            raise ValueError(f"attention must be 'sparse' or 'dense', got {attention!r}")
        self.spatial = spatial
        self.num_latent_frames = num_latent_frames
        self.frames_per_clip = frames_per_clip
        self.image_repetition = [int(r) for r in image_repetition]
        self.video_repetition = [int(r) for r in video_repetition]
        self.detail_min_tokens = detail_min_tokens
        self.semantic_bits = semantic_bits
        self.detail_bits = detail_bits
        self.attention = attention
        self.conditions: tuple[ConditionBlock, ...] = tuple(conditions)
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            raise ValueError(f"condition block names must be unique, got {names}")

        # clips: (frame_start, t)
        clips = [(0, first_clip_frames)]
        start = first_clip_frames
        while start < num_latent_frames:
            t = min(frames_per_clip, num_latent_frames - start)
            clips.append((start, t))
            start += t
        self.clips = clips
        scales = []
        for c, (fs, t) in enumerate(clips):
            reps = self.image_repetition if c == 0 else self.video_repetition
            for k, (h, w) in enumerate(spatial):
                scales.append(Scale(len(scales), c, k, t, h, w, fs, self.bits_for(h, w), reps[k]))
        self.scales: list[Scale] = scales
        steps = []
        for s in scales:
            for r in range(s.repetitions):
                steps.append(Step(len(steps), s, r))
        self.steps: list[Step] = steps
        self._steps_of_scale: list[list[Step]] = [[] for _ in scales]
        for st in steps:
            self._steps_of_scale[st.scale.index].append(st)

    # --- derived facts -------------------------------------------------------------------------------
    def bits_for(self, h: int, w: int) -> int:
        return self.semantic_bits if h * w < self.detail_min_tokens else self.detail_bits

    @property
    def scales_per_clip(self) -> int:
        return len(self.spatial)

    @property
    def num_clips(self) -> int:
        return len(self.clips)

    @property
    def full_hw(self) -> tuple[int, int]:
        """The largest spatial size: the RoPE height/width anchor and the decoded latent size."""
        return self.spatial[-1]

    def clip_size(self, clip: int) -> tuple[int, int, int]:
        """(t, H, W) of a clip's full-size code map."""
        return (self.clips[clip][1], *self.spatial[-1])

    def clip_scales(self, clip: int) -> list[Scale]:
        n = self.scales_per_clip
        return self.scales[clip * n:(clip + 1) * n]

    def scale_steps(self, scale_index: int) -> list[Step]:
        return list(self._steps_of_scale[scale_index])

    def refs(self, scale_index: int) -> list[int]:
        """Earlier scales whose (last-repetition) tokens a scale attends to, besides itself and its caption."""
        if self.attention == "dense":
            return list(range(scale_index))
        clip = self.scales[scale_index].clip
        return [] if clip == 0 else [clip * self.scales_per_clip - 1]

    @cached_property
    def last_reference(self) -> dict[int, int]:
        """For every scale referenced by a later one: the index of the last scale that references it."""
        last: dict[int, int] = {}
        for s in self.scales:
            for r in self.refs(s.index):
                last[r] = s.index
        return last

    def __repr__(self) -> str:
        cond = f", conditions={[c.name for c in self.conditions]}" if self.conditions else ""
        return (f"Schedule({self.num_clips} clips, {len(self.scales)} scales, {len(self.steps)} steps, "
                f"full {self.full_hw}, T_lat {self.num_latent_frames}, attention={self.attention}{cond})")


@dataclass
class PyramidConfig(ArchConfig):
    """How a video is cut into the spacetime pyramid.

    Either a pixel budget `pn` with an aspect ratio (official tables, 16 pixels per latent), or `custom_scales`,
    an explicit coarse-to-fine list of (h, w) latent sizes (e.g. for 64x64 frames with an 8x tokenizer).
    """
    pn: Optional[str] = "0.40M"
    h_div_w: float = 9 / 16
    custom_scales: Optional[list[list[int]]] = None
    frames_per_clip: int = 20            # latent frames in one video clip
    temporal_compression: int = 4        # video frames per latent frame (after the first)
    image_repetition: Optional[list[int]] = None   # default: 1 per scale
    video_repetition: Optional[list[int]] = None
    detail_min_tokens: int = 350         # h*w >= this -> detail scale (64 bits), else semantic (16 bits)
    semantic_bits: int = 16
    detail_bits: int = 64
    attention: str = "sparse"            # "sparse" (official) or "dense" block-causal

    def __post_init__(self):
        if self.custom_scales is None and self.pn not in PN_NUM_SCALES:
            raise ValueError(f"unknown pixel budget {self.pn!r}; choose one of {', '.join(PN_NUM_SCALES)} "
                             "or give custom_scales")
        if self.custom_scales is not None:
            self.custom_scales = [list(map(int, hw)) for hw in self.custom_scales]
        n = len(self.spatial_scales())
        if self.image_repetition is None:
            self.image_repetition = [1] * n
        if self.video_repetition is None:
            self.video_repetition = list(self.image_repetition)
        if self.frames_per_clip < 1 or self.temporal_compression < 1:
            raise ValueError("frames_per_clip and temporal_compression must be positive")
        # Building a one-clip schedule runs every remaining check (repetition lengths, attention name).
        self.build(1)

    def spatial_scales(self) -> list[tuple[int, int]]:
        if self.custom_scales is not None:
            if not self.custom_scales or any(len(hw) != 2 or min(hw) < 1 for hw in self.custom_scales):
                raise ValueError(f"custom_scales must be a list of positive [h, w] pairs, got {self.custom_scales}")
            return [tuple(hw) for hw in self.custom_scales]
        return spatial_scales(self.pn, self.h_div_w)

    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.temporal_compression)

    def build(self, num_frames: int, attention: Optional[str] = None) -> Schedule:
        """The schedule for a video of `num_frames` frames (1 = an image)."""
        return Schedule(
            self.spatial_scales(), self.latent_frames(num_frames), self.frames_per_clip,
            self.image_repetition, self.video_repetition, self.detail_min_tokens,
            self.semantic_bits, self.detail_bits, attention or self.attention)


PYRAMID_PRESETS: dict[str, dict[str, Any]] = {
    "480p": dict(pn="0.40M", h_div_w=9 / 16, image_repetition=[3] * 14, video_repetition=[3] * 12 + [2, 1],
                 detail_min_tokens=350),
    "720p": dict(pn="0.90M", h_div_w=9 / 16, image_repetition=[3] * 15, video_repetition=[3] * 12 + [2, 1, 1],
                 detail_min_tokens=750),
    # InfinityStar-Interact (tools/infer_interact_480p.py): one repetition list for images and clips
    "interact_480p": dict(pn="0.40M", h_div_w=9 / 16, image_repetition=[3] * 12 + [2, 1],
                          video_repetition=[3] * 12 + [2, 1], detail_min_tokens=350),
    # a tiny pyramid for tests: 64x64 frames at stride 8 -> 8x8 latents
    "tiny": dict(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4], [8, 8]], frames_per_clip=4,
                 image_repetition=[2, 2, 1, 1], video_repetition=[2, 1, 1, 1], detail_min_tokens=64),
    # the built-in default model (Shapes World, 64x64 frames, 8x8 latents): 16-frame clips, one caption each
    "shapes": dict(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]], frames_per_clip=4,
                   detail_min_tokens=36),
}


def pyramid_preset(name: str, **overrides) -> PyramidConfig:
    if name not in PYRAMID_PRESETS:
        raise ValueError(f"unknown pyramid preset {name!r}; choose one of {', '.join(PYRAMID_PRESETS)}")
    return PyramidConfig(**{**PYRAMID_PRESETS[name], **overrides})
