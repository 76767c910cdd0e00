"""The latent cache on disk, read by training (`train.data`) and written by `extract_features` (`train.features`).

A sample's file is `CACHE/ab/abcdef....safetensors`, named by the SHA-256 of its full absolute path and frame range
(so files with the same basename in different folders never collide). It holds one tensor `latent`
(C, T_lat, h, w) float32 and metadata (path, range, frame count, sampling fps), checked on read. Files are written
to a temporary name and renamed, so an existing file is always complete. `record` arguments are
`train.data.MediaRecord`s and `spec` a `train.data.SampleSpec`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from infinitystar.schedules.pyramid import latent_frames

CACHE_FORMAT = 1


class CacheMismatch(ValueError):
    """A cached file exists but was made for other settings (or is unreadable)."""


def cache_key(record) -> str:
    ident = [os.path.abspath(record.path), record.begin if record.kind == "video" else None,
             record.end if record.kind == "video" else None]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def cache_path(cache_dir: Union[str, os.PathLike], record) -> Path:
    key = cache_key(record)
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def cache_meta(record, spec, num_frames: int) -> dict[str, str]:
    return {"format": str(CACHE_FORMAT), "path": os.path.abspath(record.path), "kind": record.kind,
            "begin": str(record.begin), "end": str(record.end), "frames": str(num_frames),
            "fps": str(spec.fps), "pixels_per_latent": str(spec.pixels_per_latent)}


def read_cached_latent(cache_dir, record, spec, num_frames: Optional[int]) -> Optional[torch.Tensor]:
    """The cached latent cut to `num_frames` video frames (None: all cached frames, whole duration units only);
    None when the sample is not cached; CacheMismatch when the file does not fit these settings."""
    path = cache_path(cache_dir, record)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            latent = f.get_tensor("latent")
    except Exception as e:
        raise CacheMismatch(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    expect = cache_meta(record, spec, 0)
    for k in ("path", "kind", "begin", "end", "fps", "pixels_per_latent"):
        if meta.get(k) != expect[k]:
            raise CacheMismatch(f"{path}: made with {k}={meta.get(k)!r}, this run has {expect[k]!r}")
    cached_frames = int(meta["frames"])
    tc = spec.pyramid.temporal_compression
    if num_frames is None:   # length unknown from the manifest: the cached duration, cut to whole units
        num_frames = 1 + ((min(cached_frames, spec.max_frames) - 1) // spec.unit) * spec.unit
    if num_frames > cached_frames:
        raise CacheMismatch(f"{path}: holds {cached_frames} frames, {num_frames} are needed")
    t = latent_frames(num_frames, tc)
    if latent.dim() != 4 or latent.shape[1] < t:
        raise CacheMismatch(f"{path}: latent of shape {tuple(latent.shape)} has fewer than {t} latent frames")
    return latent[:, :t].contiguous()


def write_latent(path: Path, latent: torch.Tensor, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"latent": latent.detach().float().contiguous().cpu()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
