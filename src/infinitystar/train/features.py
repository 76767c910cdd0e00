"""Latent caching: encode every manifest sample once with the video tokenizer and store its continuous latent in
the cache (`train.latent_cache`: one file per sample, written atomically), so a rerun skips what exists (resume)
and ranks split the work by sample index. Training cuts a cached latent to a shorter duration by taking its
first latent frames (the tokenizer is causal in time).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import torch
from tqdm import tqdm

from infinitystar.schedules.pyramid import latent_frames, pyramid_preset
from infinitystar.train.data import (SampleSpec, SkipSample, bucket_for_frame, decode_frames, frames_to_tensor,
                                     read_manifests, resize_cover_crop)
from infinitystar.train.latent_cache import cache_meta, cache_path, write_latent


class VideoTokenizer(Protocol):
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...   # (B, 3, T, H, W) in [-1, 1] -> (B, C, T', h, w)


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
    if spec is None:
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
        write_latent(path, z, cache_meta(rec, spec, pixels.shape[1]))
        stats.written += 1
    stats.seconds = time.perf_counter() - t0
    return stats
