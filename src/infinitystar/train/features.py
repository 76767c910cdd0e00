"""Latent caching: encode every manifest sample once with the video tokenizer and store its continuous latent.

A sample's file is `OUT/ab/abcdef....safetensors`, named by the SHA-256 of its full absolute path and frame range
(so files with the same basename in different folders never collide). It holds one tensor `latent`
(C, T_lat, h, w) float32 and metadata (path, range, frame count, sampling fps), checked on read. Files are
written to a temporary name and renamed, so an existing file is always complete: a rerun skips them (resume)
and ranks split the work by sample index. Training cuts a cached latent to a shorter duration by taking its
first latent frames (the tokenizer is causal in time).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import torch

from infinitystar.schedules.pyramid import latent_frames
from infinitystar.train.data import (MediaRecord, SampleSpec, SkipSample, bucket_for_frame, decode_frames,
                                     frames_to_tensor, read_manifests, resize_cover_crop)

CACHE_FORMAT = 1


class VideoTokenizer(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...   # (B, 3, T, H, W) in [-1, 1] -> (B, C, T', h, w)


class CacheMismatch(ValueError):
    """A cached file exists but was made for other settings (or is unreadable)."""


def cache_key(record: MediaRecord) -> str:
    ident = [os.path.abspath(record.path), record.begin if record.kind == "video" else None,
             record.end if record.kind == "video" else None]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()


def cache_path(cache_dir: Union[str, os.PathLike], record: MediaRecord) -> Path:
    key = cache_key(record)
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def _meta(record: MediaRecord, spec: SampleSpec, num_frames: int) -> dict[str, str]:
    return {"format": str(CACHE_FORMAT), "path": os.path.abspath(record.path), "kind": record.kind,
            "begin": str(record.begin), "end": str(record.end), "frames": str(num_frames),
            "fps": str(spec.fps), "pixels_per_latent": str(spec.pixels_per_latent)}


def read_cached_latent(cache_dir, record: MediaRecord, spec: SampleSpec,
                       num_frames: Optional[int]) -> Optional[torch.Tensor]:
    """The cached latent cut to `num_frames` video frames (None: all cached frames, whole duration units only);
    None when the sample is not cached; CacheMismatch when the file does not fit these settings."""
    path = cache_path(cache_dir, record)
    if not path.is_file():
        return None
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            latent = f.get_tensor("latent")
    except Exception as e:
        raise CacheMismatch(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    expect = _meta(record, spec, 0)
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


def _write_latent(path: Path, latent: torch.Tensor, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"latent": latent.detach().float().contiguous().cpu()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class ExtractStats:
    written: int = 0
    existing: int = 0
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0
    messages: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"written": self.written, "existing": self.existing, "skipped": dict(self.skipped),
                "seconds": round(self.seconds, 3)}


@torch.no_grad()
def encode_pixels(tokenizer: VideoTokenizer, pixels: torch.Tensor, device, pixels_per_latent: int,
                  temporal_compression: int) -> torch.Tensor:
    """(3, T, H, W) pixels -> (C, T_lat, H/ppl, W/ppl) latent, shape-checked against the pyramid's strides."""
    x = pixels[None].to(device)
    z = tokenizer.encode(x)
    if isinstance(z, (tuple, list)):
        z = z[0]
    T, H, W = pixels.shape[1:]
    want = (latent_frames(T, temporal_compression), H // pixels_per_latent, W // pixels_per_latent)
    if z.dim() != 5 or tuple(z.shape[2:]) != want:
        raise ValueError(f"tokenizer.encode gave {tuple(z.shape)} for a (1, 3, {T}, {H}, {W}) video; expected "
                         f"(1, C, {want[0]}, {want[1]}, {want[2]}) with pixels_per_latent={pixels_per_latent} and "
                         f"temporal compression {temporal_compression}")
    return z[0].float()


def extract_features(manifest: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
                     tokenizer: VideoTokenizer, out_dir: Union[str, os.PathLike], rank: int = 0,
                     world_size: int = 1, *, spec: Optional[SampleSpec] = None, device=None,
                     video_caption_fields: Sequence[str] = ("tarsier2_caption", "MiniCPM_V_2_6_caption", "caption"),
                     image_caption_fields: Sequence[str] = ("text", "long_caption"),
                     progress: bool = True) -> ExtractStats:
    """Encode the samples `i` with `i % world_size == rank` of the manifest(s) into `out_dir`.

    `spec` fixes the duration (the longest: `max_frames`), sampling rate and pixel size; use the training
    config's (`SampleSpec` from `Trainer.sample_spec` or `spec_from_config`) so that training finds the files.
    Existing files are skipped; missing or corrupt media are skipped and counted, never fatal.
    """
    from tqdm import tqdm

    if spec is None:
        from infinitystar.config import pyramid_preset
        spec = SampleSpec(pyramid_preset("tiny"))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    paths = [manifest] if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    records = read_manifests(paths, video_caption_fields, image_caption_fields)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = ExtractStats()
    t0 = time.perf_counter()
    mine = records[rank::world_size]
    for rec in tqdm(mine, desc=f"extract rank {rank}", disable=not progress):
        path = cache_path(out, rec)
        if path.is_file():
            stats.existing += 1
            continue
        try:
            frames = decode_frames(rec, spec)
            _, (H, W) = bucket_for_frame(frames.shape[1], frames.shape[2], spec.pyramid, spec.pixels_per_latent)
            pixels = frames_to_tensor(resize_cover_crop(frames, H, W))
        except SkipSample as e:
            stats.skipped[e.reason] = stats.skipped.get(e.reason, 0) + 1
            if len(stats.messages) < 20:
                stats.messages.append(f"{rec.source}: {e}")
            continue
        z = encode_pixels(tokenizer, pixels, device, spec.pixels_per_latent, spec.pyramid.temporal_compression)
        _write_latent(path, z, _meta(rec, spec, pixels.shape[1]))
        stats.written += 1
    stats.seconds = time.perf_counter() - t0
    return stats
