"""Shapes World: the synthetic domain the built-in default model is trained on and evaluated with.

``world`` fixes the constants, renders exactly and samples; ``decoder`` is the reference evaluator;
``evaluate`` scores generated arrays against prompts; ``data`` writes datasets and manifests.
See shared/shapes_world.md for the specification.
"""
from .decoder import decode_frame, decode_segments, decode_video, segment_range
from .world import (
    HELD_OUT_PAIRS, Motion, ShapeSpec, caption_image, caption_video, captions_per_segment, parse_caption,
    render, sample_image, sample_long_video, sample_video,
)

__all__ = [
    "HELD_OUT_PAIRS", "Motion", "ShapeSpec", "caption_image", "caption_video", "captions_per_segment",
    "parse_caption", "render", "sample_image", "sample_long_video", "sample_video",
    "decode_frame", "decode_segments", "decode_video", "segment_range",
]
