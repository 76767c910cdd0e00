"""infinitystar: bitwise next-scale autoregressive image and video generation (InfinityStar and Infinity)."""

__version__ = "0.1.0"
