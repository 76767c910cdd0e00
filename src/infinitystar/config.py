"""Typed, validated configurations and presets (official sizes and tiny test sizes)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from infinitystar.schedules.dynamic_resolution import PN_NUM_SCALES, spatial_scales
from infinitystar.schedules.pyramid import Schedule, latent_frames


class ArchConfig:
    """What every architecture config dataclass shares (these three, `InfinityConfig`, `VideoVAEConfig`,
    `InfinityVAEConfig`): `to_dict` (JSON-ready: tuples as lists) and a strict `from_dict` (an unknown field is an
    error that names it; a model folder's "type" key is skipped)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"type"})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TransformerConfig(ArchConfig):
    """The InfinityStar transformer (Qwen3-style blocks, 4-D RoPE, text as prefix tokens, two bitwise heads)."""
    width: int = 64
    depth: int = 4
    num_heads: int = 2
    num_kv_heads: Optional[int] = None    # None: as many as query heads (MHA)
    mlp_ratio: float = 4.0
    qkvo_bias: bool = False
    text_channels: int = 2048             # T5 feature size (flan-t5-xl: 2048)
    text_maxlen: int = 512                # offset of visual tokens on the RoPE scale axis
    null_text_len: int = 512              # rows of the learned null text used for guidance
    latent_channels: int = 64             # tokenizer latent channels = detail bits
    semantic_bits: int = 16
    norm_eps: float = 1e-6
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        for name in ("width", "depth", "num_heads", "num_kv_heads", "text_channels", "text_maxlen",
                     "null_text_len", "latent_channels", "semantic_bits"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TransformerConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 8:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 8 (4-D RoPE splits it over 4 axes)")
        if self.mlp_hidden < 1:
            raise ValueError(f"width * mlp_ratio must be at least 128 (MLP hidden size rounds to 256), got "
                             f"{self.width * self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.width * self.mlp_ratio / 256)) * 256

    @property
    def detail_bits(self) -> int:
        return self.latent_channels


# Official presets (reference/infinitystar.md section 1.6). `block_chunks` only matters for checkpoint key names.
TRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "infinity_qwen8b": dict(width=4096, depth=36, num_heads=32, num_kv_heads=8, mlp_ratio=4.0),
    "infinity_qwen7b": dict(width=4096, depth=36, num_heads=32, num_kv_heads=8, mlp_ratio=3.0),
    "infinity_qwen_wide14b": dict(width=5632, depth=36, num_heads=44, num_kv_heads=11, mlp_ratio=3.4),
    "infinity_qwen13bMHA": dict(width=5120, depth=40, num_heads=40, mlp_ratio=3.4, qkvo_bias=True),
    "infinity_qwen2_2b": dict(width=2304, depth=28, num_heads=18, mlp_ratio=3.55),
    "infinity_qwen0b": dict(width=512, depth=4, num_heads=4, mlp_ratio=3.55),
    "infinity_qwen2_30b": dict(width=6144, depth=54, num_heads=48, num_kv_heads=12, mlp_ratio=4.0),
    "infinity_qwen14b": dict(width=4608, depth=48, num_heads=36, num_kv_heads=9, mlp_ratio=4.0),
    # test sizes
    "tiny": dict(width=64, depth=2, num_heads=2, num_kv_heads=1, mlp_ratio=4.0, text_channels=32, text_maxlen=64),
    "small": dict(width=256, depth=6, num_heads=4, num_kv_heads=2, mlp_ratio=4.0, text_channels=256, text_maxlen=64),
}


def transformer_preset(name: str, **overrides) -> TransformerConfig:
    if name not in TRANSFORMER_PRESETS:
        raise ValueError(f"unknown transformer preset {name!r}; choose one of {', '.join(TRANSFORMER_PRESETS)}")
    return TransformerConfig(**{**TRANSFORMER_PRESETS[name], **overrides})


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


@dataclass
class InteractConfig(ArchConfig):
    """The interactive long-video mode (the official InfinityStar-Interact model, `infinity_star_interact`).

    Every new clip is one segment of `frames_per_clip` latent frames, generated as a lone clip (latent frames
    0..T-1, step positions from 0), conditioned on two token blocks made from the previous segment's 1 + T latents
    P (P[0] is dropped) and the session's first latent:
      * semantic: P[1:] area-downsampled to the (h, w) of in-clip scale `semantic_scale`; RoPE frames 1..T,
        scale-axis position text_maxlen + `semantic_position`;
      * detail: the first latent and the last `detail_frames` latents of P, full size; RoPE frames
        [0, T - detail_frames + 1, ..., T], position text_maxlen + `detail_position`.
    Training adds noise a * std(x) * N(0, 1) to each condition (the detail block's first latent stays clean), with
    a drawn per block from `condition_noise`.
    """
    semantic_scale: int = 7
    detail_frames: int = 2
    semantic_position: int = 800
    detail_position: int = 801
    condition_noise: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.15, 0.30])

    def __post_init__(self):
        if self.semantic_scale < 0 or self.detail_frames < 1:
            raise ValueError(f"InteractConfig: semantic_scale must be >= 0 and detail_frames >= 1, got "
                             f"{self.semantic_scale} and {self.detail_frames}")
        if self.semantic_position == self.detail_position:
            raise ValueError("InteractConfig: the two condition blocks need different RoPE positions")
        self.condition_noise = [float(a) for a in self.condition_noise]
        if not self.condition_noise or min(self.condition_noise) < 0:
            raise ValueError(f"InteractConfig.condition_noise must list non-negative strengths, got "
                             f"{self.condition_noise}")

    def check(self, pyramid: "PyramidConfig") -> None:
        """Raise unless this mode fits the pyramid (a scale `semantic_scale`, enough frames per clip)."""
        n = len(pyramid.spatial_scales())
        if self.semantic_scale >= n:
            raise ValueError(f"InteractConfig.semantic_scale {self.semantic_scale} is not a scale of the pyramid "
                             f"({n} scales per clip)")
        if self.detail_frames > pyramid.frames_per_clip:
            raise ValueError(f"InteractConfig.detail_frames {self.detail_frames} exceeds the "
                             f"{pyramid.frames_per_clip} latent frames of a clip")


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
