"""The tokenizer trainers' clips: Shapes World rendered on the fly, or windows of manifest videos. Every source
keeps its validation clips apart from its training clips.

- Shapes World: training clips come from the world's train split (the held-out colour/shape pairs never appear),
  one seed per step; the validation clips are rendered once from their own seed (`data.val_seed`). The world is
  procedural, so a validation clip is never a training clip.
- Manifests: the validation windows come from held-aside videos (`data.val_manifests`, or else a share
  `data.val_fraction` of the listed items, picked by a hash of the media path so the choice is stable), and the
  training windows only from the rest.
"""
from __future__ import annotations

import hashlib
import random
import sys
from typing import Optional, Sequence

import numpy as np

from infinitystar.manifest import ManifestError, manifest_lines, media_path
from infinitystar.media import MediaError, load_image, load_video
from infinitystar.shapes.data import iter_samples
from infinitystar.shapes.world import CANVAS
from infinitystar.train.config import ConfigError
from infinitystar.train.data import resize_cover_crop

# (manifest key, media path, first frame, end frame or None)
Item = tuple[str, str, int, Optional[int]]


class ShapesSource:
    """Shapes World clips of `frames` frames (images when frames == 1)."""

    def __init__(self, frames: int, height: int, width: int, val_seed: int, val_samples: int):
        if (height, width) != (CANVAS, CANVAS):
            raise ConfigError(f"data: Shapes World frames are {CANVAS}x{CANVAS}, got {height}x{width}")
        self.frames = frames
        self.kinds = ("image",) if frames == 1 else ("video",)
        self.val_seed, self.val_samples = val_seed, val_samples

    def train_clips(self, seed: int, n: int) -> list[np.ndarray]:
        return [s["frames"] for s in iter_samples(seed, self.kinds, "train", video_frames=(self.frames,), limit=n)]

    def val_clips(self) -> list[np.ndarray]:
        return self.train_clips(self.val_seed, self.val_samples)


def read_items(manifests: Sequence[str], frames: int) -> list[Item]:
    """The usable lines of JSONL manifests (`video_path` or `image_path`, relative to the manifest; optional
    `begin_frame_id` / `end_frame_id`). Images only count for one-frame clips."""
    items: list[Item] = []
    for where, rec, folder in manifest_lines(manifests):
        key = "video_path" if "video_path" in rec else "image_path" if "image_path" in rec else None
        if key is None or not isinstance(rec[key], str):
            raise ManifestError(f"{where}: a line needs a string video_path or image_path")
        if key == "image_path" and frames != 1:
            continue   # an image cannot fill a multi-frame clip
        items.append((key, media_path(rec[key], folder), int(rec.get("begin_frame_id", 0) or 0), rec.get("end_frame_id")))
    return items


def held_aside(item: Item, fraction: float) -> bool:
    """Whether an item belongs to the validation share: a hash of its media path, so the split never depends
    on the order or number of the other items."""
    h = int.from_bytes(hashlib.sha1(item[1].encode()).digest()[:8], "big")
    return h / 2 ** 64 < fraction


class ManifestSource:
    """Random windows of `frames` frames from manifest videos (or single images), cover-resized and
    centre-cropped to height x width; validation windows only from held-aside items (see the module docstring)."""

    def __init__(self, manifests: Sequence[str], frames: int, height: int, width: int, val_seed: int,
                 val_samples: int, val_manifests: Sequence[str] = (), val_fraction: float = 0.1):
        self.frames, self.height, self.width = frames, height, width
        self.val_seed, self.val_samples = val_seed, val_samples
        what = "image or video" if frames == 1 else "video"
        items = read_items(manifests, frames)
        if val_manifests:
            self.train_items, self.val_items = items, read_items(val_manifests, frames)
            if not self.val_items:
                raise ConfigError(f"data.val_manifests: no usable {what} lines in {list(val_manifests)}")
        else:
            self.val_items = [it for it in items if held_aside(it, val_fraction)]
            self.train_items = [it for it in items if not held_aside(it, val_fraction)]
            if len(items) > 1 and not self.val_items:   # a small list may hash nothing aside: keep one item apart
                self.val_items, self.train_items = self.train_items[-1:], self.train_items[:-1]
            if len(items) > 1 and not self.train_items:  # ... or everything aside: train on all but one
                self.train_items, self.val_items = self.val_items[:-1], self.val_items[-1:]
            if len(items) < 2:
                raise ConfigError(f"data.manifests: {len(items)} usable {what} line(s) in {list(manifests)}; "
                                  f"validation needs held-aside items: list more, or give data.val_manifests")
        if not self.train_items:
            raise ConfigError(f"data.manifests: no usable {what} lines for training in {list(manifests)}")

    def _load(self, item: Item, rng: random.Random) -> Optional[np.ndarray]:
        key, media, begin, end = item
        try:
            arr = load_image(media)[None] if key == "image_path" else load_video(media)
        except MediaError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            return None
        arr = arr[begin:end]
        if len(arr) < self.frames:
            return None
        start = rng.randrange(len(arr) - self.frames + 1)
        return resize_cover_crop(arr[start:start + self.frames], self.height, self.width)

    def _windows(self, items: list[Item], seed: int, n: int) -> list[np.ndarray]:
        rng = random.Random(seed)
        out = []
        for _ in range(50 * n):
            if len(out) == n:
                return out
            clip = self._load(items[rng.randrange(len(items))], rng)
            if clip is not None:
                out.append(clip)
        raise ConfigError(f"could not read {n} clips of {self.frames} frames from the manifests (too short or "
                          f"unreadable files)")

    def train_clips(self, seed: int, n: int) -> list[np.ndarray]:
        return self._windows(self.train_items, seed, n)

    def val_clips(self) -> list[np.ndarray]:
        return self._windows(self.val_items, self.val_seed, self.val_samples)
