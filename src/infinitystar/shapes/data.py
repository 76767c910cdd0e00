"""Shapes World datasets: on-the-fly samples and on-disk datasets in the official manifest format.

Storage (chosen because it round-trips bit-exactly, checked by the tests):
- videos: ``.mp4`` with H.264 in RGB (``libx264rgb``, ``qp=0``, ``rgb24``), which is lossless, via
  PyAV; or ``.npy`` uint8 arrays (T, 64, 64, 3) with ``video_format="npy"`` (no PyAV needed).
- images: 8-bit RGB PNG via Pillow.

Manifests are JSONL with the official field names (extra fields are ignored by official loaders):
- ``videos.jsonl`` and ``long_videos.jsonl``: ``video_path``, ``begin_frame_id`` (0),
  ``end_frame_id`` (T), ``fps`` (16), ``caption``, ``tarsier2_caption`` (same as caption),
  ``h_div_w`` (1.0), ``shapes`` (the ShapeSpec as a dict); long videos add ``captions_per_segment``
  and their ``caption`` is the first segment's caption.
- ``images.jsonl``: ``image_path``, ``text``, ``long_caption`` (both the caption), ``h_div_w``, ``shapes``.
Paths are absolute by default (official loaders open ``video_path`` as is); with
``relative_paths=True`` they are relative to the manifest's folder, which ``load_manifest`` resolves.

Run ``python -m infinitystar.shapes.data OUT --n-images 100 --n-videos 100 --n-long 20``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from infinitystar.manifest import MEDIA_KEYS, manifest_lines, media_path
from infinitystar.media import export_to_video, load_image, load_video, save_image

from .world import (
    FPS, LONG_VIDEO_FRAMES, SPLITS, ShapeSpec, caption_image, caption_video, captions_per_segment,
    render, sample_image, sample_long_video, sample_video,
)

VIDEO_FORMATS: tuple[str, ...] = ("mp4", "npy")
KINDS: tuple[str, ...] = ("image", "video", "long")
MANIFEST_NAMES: dict[str, str] = {"image": "images.jsonl", "video": "videos.jsonl", "long": "long_videos.jsonl"}


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


def _sample(kind: str, rng: np.random.Generator, split: str, num_frames: int) -> dict:
    """One sample dict: kind, spec, attributes, num_frames, frames (T,64,64,3) uint8, caption(s)."""
    if kind == "image":
        spec = sample_image(rng, split)
        caption = caption_image(spec)
        captions = [caption]
        num_frames = 1
    elif kind == "video":
        spec = sample_video(rng, num_frames, split)
        caption = caption_video(spec)
        captions = [caption]
    elif kind == "long":
        spec = sample_long_video(rng, num_frames, split)
        captions = captions_per_segment(spec)
        caption = captions[0]
    else:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {KINDS}")
    return {
        "kind": kind, "spec": spec, "attributes": spec.to_dict(), "num_frames": num_frames,
        "frames": render(spec, num_frames), "caption": caption, "captions": captions,
        "heldout": spec.is_heldout,
    }


def iter_samples(seed: int, kinds: Sequence[str] = KINDS, split: str = "train",
                 video_frames: Sequence[int] = (17,), long_frames: Sequence[int] = (65,),
                 limit: int | None = None) -> Iterator[dict]:
    """Yield rendered samples forever (or ``limit`` of them), reproducibly from ``seed``.

    Each step picks a kind uniformly from ``kinds`` and a length uniformly from ``video_frames`` or
    ``long_frames``. A dict has ``kind``, ``frames`` ((T, 64, 64, 3) uint8, T = 1 for images),
    ``caption``, ``captions`` (one per 16-frame segment for long videos, else ``[caption]``),
    ``spec`` (ShapeSpec), ``attributes`` (its dict), ``num_frames`` and ``heldout``.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    video_frames, long_frames = tuple(video_frames), tuple(long_frames)
    if "video" in kinds and not video_frames:
        raise ValueError("video_frames is empty")
    if "long" in kinds and (not long_frames or any(n not in LONG_VIDEO_FRAMES for n in long_frames)):
        raise ValueError(f"long_frames must be a non-empty subset of {LONG_VIDEO_FRAMES}, got {long_frames}")
    rng = np.random.default_rng(seed)
    n = 0
    while limit is None or n < limit:
        kind = kinds[int(rng.integers(len(kinds)))]
        lengths = video_frames if kind == "video" else long_frames if kind == "long" else (1,)
        num_frames = int(lengths[int(rng.integers(len(lengths)))])
        yield _sample(kind, rng, split, num_frames)
        n += 1


# --------------------------------------------------------------------------------------------------
# Datasets on disk
# --------------------------------------------------------------------------------------------------


def _media_path(path: Path, manifest_dir: Path, relative: bool) -> str:
    return os.path.relpath(path, manifest_dir) if relative else str(path.resolve())


def write_dataset(out_dir: str | os.PathLike, n_images: int = 0, n_videos: int = 0, n_long: int = 0,
                  seed: int = 0, split: str = "train", *, video_frames: Sequence[int] = (17, 33),
                  long_frames: Sequence[int] = LONG_VIDEO_FRAMES, video_format: str = "mp4",
                  relative_paths: bool = False) -> dict[str, Path]:
    """Render a dataset into ``out_dir`` and write its JSONL manifests; returns {kind: manifest path}.

    Each kind draws from its own child of ``SeedSequence(seed)``, so e.g. the images do not change when
    ``n_videos`` does. Single-caption videos take a length uniformly from ``video_frames`` (17: any
    speed; 33: slowly or still), long videos from ``long_frames``. Only kinds with n > 0 get a manifest.
    """
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"unknown video_format {video_format!r}; expected one of {VIDEO_FORMATS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    for name, n in (("n_images", n_images), ("n_videos", n_videos), ("n_long", n_long)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rngs = dict(zip(KINDS, (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))))
    counts = {"image": n_images, "video": n_videos, "long": n_long}
    lengths = {"image": (1,), "video": tuple(video_frames), "long": tuple(long_frames)}
    folders = {"image": "images", "video": "videos", "long": "long_videos"}
    manifests: dict[str, Path] = {}
    for kind in KINDS:
        if counts[kind] == 0:
            continue
        media_dir = out / folders[kind]
        media_dir.mkdir(exist_ok=True)
        manifest = out / MANIFEST_NAMES[kind]
        rng = rngs[kind]
        with open(manifest, "w", encoding="utf-8") as fh:
            for i in range(counts[kind]):
                num_frames = int(lengths[kind][int(rng.integers(len(lengths[kind])))])
                s = _sample(kind, rng, split, num_frames)
                spec: ShapeSpec = s["spec"]
                if kind == "image":
                    p = save_image(s["frames"][0], media_dir / f"{i:06d}.png")
                    line = {"image_path": _media_path(p, out, relative_paths), "text": s["caption"],
                            "long_caption": s["caption"], "h_div_w": 1.0}
                else:
                    p = export_to_video(s["frames"], media_dir / f"{i:06d}.{video_format}", FPS, lossless=True)
                    line = {"video_path": _media_path(p, out, relative_paths), "begin_frame_id": 0,
                            "end_frame_id": num_frames, "fps": FPS, "caption": s["caption"],
                            "tarsier2_caption": s["caption"], "h_div_w": 1.0}
                    if kind == "long":
                        line["captions_per_segment"] = s["captions"]
                line["shapes"] = spec.to_dict()
                fh.write(json.dumps(line) + "\n")
        manifests[kind] = manifest
    return manifests


def load_manifest(path: str | os.PathLike) -> list[dict]:
    """The lines of a JSONL manifest, relative media paths made absolute against the manifest's folder."""
    lines = []
    for _, d, folder in manifest_lines([path]):
        lines.append({k: media_path(v, folder) if k in MEDIA_KEYS else v for k, v in d.items()})
    return lines


def load_media(line: dict) -> np.ndarray:
    """Frames of a manifest line as (T, H, W, 3) uint8 (T = 1 for an image line)."""
    if "video_path" in line:
        v = load_video(line["video_path"])
        return v[line.get("begin_frame_id", 0):line.get("end_frame_id", len(v))]
    if "image_path" in line:
        return load_image(line["image_path"])[None]
    raise ValueError(f"manifest line has neither video_path nor image_path: {sorted(line)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m infinitystar.shapes.data OUT ...`: write a Shapes World dataset."""
    p = argparse.ArgumentParser(prog="python -m infinitystar.shapes.data", description=write_dataset.__doc__)
    p.add_argument("out_dir")
    p.add_argument("--n-images", type=int, default=0)
    p.add_argument("--n-videos", type=int, default=0)
    p.add_argument("--n-long", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--video-frames", type=int, nargs="+", default=[17, 33])
    p.add_argument("--long-frames", type=int, nargs="+", default=list(LONG_VIDEO_FRAMES))
    p.add_argument("--video-format", choices=VIDEO_FORMATS, default="mp4")
    p.add_argument("--relative-paths", action="store_true")
    a = p.parse_args(argv)
    manifests = write_dataset(a.out_dir, a.n_images, a.n_videos, a.n_long, a.seed, a.split,
                              video_frames=a.video_frames, long_frames=a.long_frames,
                              video_format=a.video_format, relative_paths=a.relative_paths)
    for kind, m in manifests.items():
        print(f"{kind}: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
