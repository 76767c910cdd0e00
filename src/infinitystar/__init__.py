"""infinitystar: bitwise next-scale autoregressive image and video generation (InfinityStar and Infinity).

The names below are imported on first use, so `import infinitystar` stays light (no torch until one is touched).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "InfinityStarPipeline": "infinitystar.pipelines.infinitystar",
    "InfinityPipeline": "infinitystar.pipelines.infinity",
    "Guidance": "infinitystar.sampling.guidance",
    "MemoryOptions": "infinitystar.memory",
    "export_to_video": "infinitystar.media",
    "export_to_gif": "infinitystar.media",
    "save_image": "infinitystar.media",
    "load_image": "infinitystar.media",
    "load_video": "infinitystar.media",
}
__all__ = ["__version__", "load_pipeline", *_EXPORTS]


def __getattr__(name: str):
    if name == "load_pipeline":
        return importlib.import_module("infinitystar.pipelines").load
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'infinitystar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
