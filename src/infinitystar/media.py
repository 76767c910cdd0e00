"""Reading and writing images and videos. Writes go to a temporary file in the target folder, then a rename,
so an interrupted write never leaves a half-written output behind."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import numpy as np

PathLike = Union[str, Path]


class MediaError(ValueError):
    """An unreadable, unwritable or ill-shaped image or video."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    if not path.parent.exists():
        raise MediaError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _as_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise MediaError(f"frames must be (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise MediaError(f"frames must be uint8, got {frames.dtype}")
    return frames


def export_to_video(frames: np.ndarray, path: PathLike, fps: int = 16, lossless: bool = False) -> Path:
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 (`lossless=True`: RGB H.264 at qp 0, exact colours),
    or as a `.npy` array."""
    frames = _as_frames(frames)
    path = Path(path)
    suffix = path.suffix.lower()   # X.MP4 is an mp4
    if suffix == ".npy":
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, frames)
        return path
    if suffix != ".mp4":
        raise MediaError(f"unsupported video file {path.name}: use .mp4 or .npy")
    import av

    T, H, W, _ = frames.shape
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            if lossless:
                stream = container.add_stream("libx264rgb", rate=fps, options={"qp": "0", "preset": "veryfast"})
                stream.pix_fmt = "rgb24"
            else:
                stream = container.add_stream("libx264", rate=fps, options={"crf": "12", "preset": "veryfast"})
                stream.pix_fmt = "yuv444p"
            stream.width, stream.height = W, H
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


def save_image(frame: np.ndarray, path: PathLike) -> Path:
    from PIL import Image

    frame = _as_frames(frame)[0]
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(frame).save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return path


def load_image(path: PathLike) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

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
    if path.suffix in (".npy", ".npz"):
        arr = np.load(path)
        arr = arr[arr.files[0]] if hasattr(arr, "files") else arr
        return _as_frames(arr)
    import av

    try:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise MediaError(f"cannot read video {path}: {e}") from None
    if not frames:
        raise MediaError(f"cannot read video {path}: no frames")
    return np.stack(frames)
