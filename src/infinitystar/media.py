"""Reading and writing images and videos.

Writes go to a temporary file in the target folder, then a rename (an interrupted write never leaves a
half-written output behind), with the permissions the umask gives. Videos are H.264 in yuv420p by default, the
format every player and browser plays; `lossless=True` writes exact RGB (4:4:4) instead. Encoding is
single-threaded, so the same frames always give the same bytes.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from infinitystar import checkpoint_io


def require_av():
    """PyAV, imported when a video file is read or written (a dependency, but the rest of the package runs
    without it: e.g. on a GPU image that lacks it)."""
    try:
        import av
    except ImportError:
        raise MediaError("reading or writing .mp4 needs PyAV: pip install av") from None
    return av

PathLike = Union[str, Path]
VIDEO_SUFFIXES = (".mp4", ".gif", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PIX_FMTS = ("yuv420p", "yuv444p")


class MediaError(ValueError):
    """An unreadable, unwritable or ill-shaped image or video."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path next to `path`, renamed over it (with the umask's permissions) if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise MediaError(f"cannot write {path}: folder {path.parent} does not exist")
    with checkpoint_io.atomic_path(path) as tmp:
        yield tmp


def as_uint8(frames, what: str = "frames") -> np.ndarray:
    """uint8 pixels from what the pipelines return and diffusers users hold: uint8 arrays, float arrays or tensors
    in [0, 1] (rounded to x * 255), a PIL image or a list of PIL images. Channels last."""
    if isinstance(frames, Image.Image):
        return np.asarray(frames.convert("RGB"))
    if isinstance(frames, (list, tuple)) and frames and all(isinstance(f, Image.Image) for f in frames):
        return np.stack([np.asarray(f.convert("RGB")) for f in frames])
    a = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if a.dtype == np.uint8:
        return a
    if not np.issubdtype(a.dtype, np.floating):
        raise MediaError(f"{what} must be uint8, or float in [0, 1], got {a.dtype}")
    if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
        raise MediaError(f"float {what} must lie in [0, 1] (got values from {np.nanmin(a):.3g} to "
                         f"{np.nanmax(a):.3g}); pass uint8 for 0-255 pixels")
    return (a.astype(np.float32) * 255).round().astype(np.uint8)


def _as_frames(frames) -> np.ndarray:
    frames = as_uint8(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise MediaError(f"frames must be (T, H, W, 3), got {frames.shape}")
    return frames


def _suffix(path: Path, allowed: Sequence[str], what: str) -> str:
    suffix = path.suffix.lower()
    if suffix not in allowed:
        raise MediaError(f"unsupported {what} file {path.name}: use {', '.join(allowed)}")
    return suffix


def export_to_video(frames, path: PathLike, fps: int = 16, lossless: bool = False,
                    pix_fmt: str = "yuv420p") -> Path:
    """Write (T, H, W, 3) frames (uint8, float in [0, 1], or PIL images) as an H.264 `.mp4` (`pix_fmt` yuv420p,
    which plays everywhere, or yuv444p; `lossless=True`: RGB H.264 at qp 0, exact colours), an animated `.gif`,
    or a `.npy` array. yuv420p needs even sizes: an odd height or width is padded by repeating the last row or
    column, with a warning."""
    frames = _as_frames(frames)
    path = Path(path)
    suffix = _suffix(path, VIDEO_SUFFIXES, "video")
    if not (isinstance(fps, (int, float)) and np.isfinite(fps) and fps > 0):
        raise MediaError(f"fps must be a positive number, got {fps!r}")
    if suffix == ".gif":
        return export_to_gif(frames, path, fps)
    if suffix == ".npy":
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, frames)
        return path
    if pix_fmt not in PIX_FMTS:
        raise MediaError(f"unsupported pixel format {pix_fmt!r}; choose one of {', '.join(PIX_FMTS)}")
    if not lossless and pix_fmt == "yuv420p" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        warnings.warn(f"frames of odd size {frames.shape[2]}x{frames.shape[1]} padded to even for yuv420p "
                      f"(use lossless=True for the exact size)", stacklevel=2)
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    T, H, W, _ = frames.shape
    rate = Fraction(fps).limit_denominator(1001)
    # The same frames must give the same bytes: threaded encoding varies, and so does the macroblock-tree rate
    # control even on one thread (6 of 150 runs in one process differed). Without both: 300 of 300 identical.
    options = {"threads": "1", "preset": "veryfast", "x264-params": "mbtree=0"}
    av = require_av()
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            if lossless:
                stream = container.add_stream("libx264rgb", rate=rate, options={**options, "qp": "0"})
                stream.pix_fmt = "rgb24"
            else:
                stream = container.add_stream("libx264", rate=rate, options={**options, "crf": "12"})
                stream.pix_fmt = pix_fmt
            stream.codec_context.thread_count = 1
            stream.width, stream.height = W, H
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def export_to_gif(frames, path: PathLike, fps: int = 16) -> Path:
    """Write (T, H, W, 3) frames (uint8, float in [0, 1], or PIL images) as an animated GIF that loops (an
    adaptive 256-colour palette per frame; GIF frame times are whole hundredths of a second)."""
    frames = _as_frames(frames)
    path = Path(path)
    _suffix(path, (".gif",), "GIF")
    images = [Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], loop=0,
                       duration=10 * max(1, round(100 / fps)), optimize=False)
    return path


def save_image(frame, path: PathLike) -> Path:
    """Write one (H, W, 3) frame (uint8, float in [0, 1], or a PIL image) as a PNG or JPEG."""
    frame = _as_frames(frame)[0]
    path = Path(path)
    suffix = _suffix(path, IMAGE_SUFFIXES, "image")
    with atomic_path(path) as tmp:
        Image.fromarray(frame).save(tmp, format="PNG" if suffix == ".png" else "JPEG")
    return path


def load_image(path: PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise MediaError(f"cannot read image {path}: {e}") from None


def load_video(path: PathLike) -> np.ndarray:
    """All frames of a video as (T, H, W, 3) uint8 (`.npy` / `.npz` arrays are accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"cannot read video {path}: no such file")
    if path.suffix.lower() in (".npy", ".npz"):
        arr = np.load(path)
        arr = arr[arr.files[0]] if hasattr(arr, "files") else arr
        return _as_frames(arr)
    av = require_av()
    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise MediaError(f"cannot read video {path}: {e}") from None
    if not frames:
        raise MediaError(f"cannot read video {path}: no frames")
    return np.stack(frames)
