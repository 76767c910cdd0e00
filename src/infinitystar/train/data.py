"""Training data: JSONL manifests with the official field names, media decoding, duration and aspect buckets,
caption choice and augmentation, and a resumable per-rank sample order.

Manifest lines (one JSON object per line; relative paths are relative to the manifest's folder):
- video: `video_path`, `begin_frame_id` (default 0), `end_frame_id` (default: the end of the file), `fps` (the
  source rate; default: frames are taken one by one), captions in `tarsier2_caption` / `MiniCPM_V_2_6_caption` /
  `caption` (one present field is picked per sample), optional `captions_per_segment` (one caption per clip
  for long videos whose prompt changes: clip k >= 1 uses segment k-1, the first frame uses segment 0).
- image: `image_path`, caption in `text` / `long_caption`.
Any other field (`h_div_w`, `width`, `shapes`, ...) is ignored. A line with a missing or ill-typed field raises
`ManifestError` naming the file and line; a missing or undecodable media file is skipped at training time and
counted, never fatal.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
from concurrent.futures import Future, ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from infinitystar.manifest import ManifestError, manifest_lines, media_path
from infinitystar.media import require_av
from infinitystar.model.attention import ClipCaptions, read_captions, segment_captions
from infinitystar.schedules.dynamic_resolution import all_templates, nearest_template, num_scales
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.train.latent_cache import CacheMismatch, read_cached_latent


class SkipSample(Exception):
    """A sample that cannot be used (missing or corrupt file, too short, uncached, ...); `reason` is counted."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


SKIP_REASONS = ("missing", "corrupt", "short", "aspect", "uncached", "cache_mismatch")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions, unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------
# Manifests
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MediaRecord:
    source: str                                   # "manifest.jsonl:LINE", for messages
    kind: str                                     # "video" or "image"
    path: str                                     # absolute media path
    captions: tuple[str, ...]                     # candidate captions; one is drawn per sample
    begin: int = 0
    end: Optional[int] = None                     # exclusive; None: until the end of the file
    fps: Optional[float] = None                   # source frame rate
    segment_captions: Optional[tuple[str, ...]] = None


def _field_error(source: str, name: str, want: str, got) -> ManifestError:
    return ManifestError(f"{source}: field {name!r} must be {want}, got {got!r}")


def parse_line(d: dict, source: str, base_dir: Path, video_caption_fields: Sequence[str],
               image_caption_fields: Sequence[str]) -> MediaRecord:
    if not isinstance(d, dict):
        raise ManifestError(f"{source}: a manifest line must be a JSON object, got {type(d).__name__}")
    if "video_path" in d:
        kind, key, fields = "video", "video_path", video_caption_fields
    elif "image_path" in d:
        kind, key, fields = "image", "image_path", image_caption_fields
    else:
        raise ManifestError(f"{source}: a line needs 'video_path' or 'image_path' (has {', '.join(sorted(d))})")
    path = d[key]
    if not isinstance(path, str) or not path:
        raise _field_error(source, key, "a non-empty string", path)
    path = media_path(path, base_dir)
    captions = []
    for f in fields:
        if f in d and d[f] is not None:
            if not isinstance(d[f], str) or not d[f].strip():
                raise _field_error(source, f, "a non-empty string", d[f])
            captions.append(d[f].strip())
    segments = d.get("captions_per_segment")
    if segments is not None:
        if (kind != "video" or not isinstance(segments, list) or not segments
                or not all(isinstance(s, str) and s.strip() for s in segments)):
            raise _field_error(source, "captions_per_segment", "a non-empty list of non-empty strings (videos)",
                               segments)
        segments = tuple(s.strip() for s in segments)
    if not captions and segments is None:
        raise ManifestError(f"{source}: no caption; expected one of {', '.join(fields)}")
    if not captions:
        captions = [segments[0]]
    if kind == "image":
        return MediaRecord(source, kind, path, tuple(captions))
    begin = d.get("begin_frame_id", 0)
    if isinstance(begin, bool) or not isinstance(begin, int) or begin < 0:
        raise _field_error(source, "begin_frame_id", "an integer >= 0", begin)
    end = d.get("end_frame_id")
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end <= begin):
        raise _field_error(source, "end_frame_id", f"an integer > begin_frame_id ({begin})", end)
    fps = d.get("fps")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0):
        raise _field_error(source, "fps", "a positive number", fps)
    return MediaRecord(source, kind, path, tuple(captions), begin, end, None if fps is None else float(fps),
                       segments)


def read_manifests(paths: Sequence[str | os.PathLike],
                   video_caption_fields: Sequence[str] = ("tarsier2_caption", "MiniCPM_V_2_6_caption", "caption"),
                   image_caption_fields: Sequence[str] = ("text", "long_caption")) -> list[MediaRecord]:
    records = [parse_line(d, source, folder, video_caption_fields, image_caption_fields)
               for source, d, folder in manifest_lines(paths)]
    if not records:
        raise ManifestError(f"no samples in {', '.join(map(str, paths))}")
    return records


# --------------------------------------------------------------------------------------------------
# Durations, buckets and captions
# --------------------------------------------------------------------------------------------------

def frame_offsets(source_frames: Optional[int], source_fps: Optional[float], target_fps: Optional[float],
                  max_frames: int, unit: int) -> list[int]:
    """Source frame offsets (from begin) of the frames to train on: 1 + k * unit frames at the target rate,
    as many whole units as the source holds, capped at max_frames. A source shorter than 1 + unit frames
    gives a single frame (trained as an image)."""
    step = source_fps / target_fps if (source_fps and target_fps) else 1.0
    avail = max_frames if source_frames is None else int(math.floor((source_frames - 1) / step + 1e-9)) + 1
    k = (min(avail, max_frames) - 1) // unit
    return [int(math.floor(j * step + 1e-9)) for j in range(1 + k * unit)]


def bucket_for_frame(height: int, width: int, pyramid: PyramidConfig, pixels_per_latent: int
                     ) -> tuple[PyramidConfig, tuple[int, int]]:
    """(pyramid of the bucket, (H, W) pixel size): the nearest aspect template at the pyramid's pixel budget, or
    the fixed size of custom scales. Raises SkipSample('aspect') for a ratio far from every template."""
    if pyramid.custom_scales is None:
        try:
            key = nearest_template(height / width)
        except ValueError as e:
            raise SkipSample("aspect", str(e)) from None
        pyramid = replace(pyramid, h_div_w=key)
    h, w = pyramid.spatial_scales()[-1]
    return pyramid, (h * pixels_per_latent, w * pixels_per_latent)


def bucket_for_latent(h: int, w: int, pyramid: PyramidConfig) -> PyramidConfig:
    """The bucket whose full-size scale is a latent's (h, w) (for cached latents)."""
    if pyramid.custom_scales is not None:
        if tuple(pyramid.custom_scales[-1]) != (h, w):
            raise SkipSample("cache_mismatch", f"latent {h}x{w} does not match the custom scales' "
                             f"{pyramid.custom_scales[-1]}")
        return pyramid
    n = num_scales(pyramid.pn)
    for key, scales in all_templates().items():
        if tuple(scales[n - 1]) == (h, w):
            return replace(pyramid, h_div_w=key)
    raise SkipSample("cache_mismatch", f"latent {h}x{w} is no template's full size at {pyramid.pn}")


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def truncate_sentences(caption: str, rng: random.Random) -> str:
    """Keep the first k ~ U{1..n} sentences (the official dynamic-length prompt augmentation)."""
    sentences = [s for s in _SENTENCE.split(caption.strip()) if s]
    if len(sentences) < 2:
        return caption
    return " ".join(sentences[:rng.randint(1, len(sentences))])


def duration_prefix(seconds: float) -> str:
    """The official duration conditioning prefix (only used when `data.duration_prefix` is on)."""
    s = f"{seconds:g}"
    return f"<<<t={s}s>>> "


def sample_captions(record: MediaRecord, num_clips: int, rng: random.Random, short_prob: float,
                    seconds: Optional[float], first_frame_all: bool = False) -> tuple[list[str], list[ClipCaptions]]:
    """(captions, caption index of every clip). One caption for ordinary samples; for `captions_per_segment`, the
    segments' captions the clips read (`segment_captions`: with `first_frame_all` the first frame reads every
    segment's, those of segments cut off included)."""
    if record.segment_captions is not None and num_clips > 1:
        segs = record.segment_captions
        used, caption_of_clip = read_captions(segment_captions(num_clips, len(segs), first_frame_all), num_clips)
        captions = [segs[i] for i in used]
    else:
        captions = [record.captions[rng.randrange(len(record.captions))]]
        caption_of_clip = [0] * num_clips
    out = []
    for c in captions:
        if short_prob > 0 and rng.random() < short_prob:
            c = truncate_sentences(c, rng)
        if seconds is not None:
            c = duration_prefix(seconds) + c
        out.append(c)
    return out, caption_of_clip


# --------------------------------------------------------------------------------------------------
# Media decoding
# --------------------------------------------------------------------------------------------------

def read_video_frames(path: str, indices: Sequence[int], allow_short: bool = False) -> np.ndarray:
    """Frames at absolute `indices` (increasing) as (T, H, W, 3) uint8, decoded with PyAV (or read from .npy /
    .npz arrays). With `allow_short`, a file that ends early gives the frames it has (a prefix of indices)."""
    if not os.path.isfile(path):
        raise SkipSample("missing", path)
    want = list(indices)
    try:
        if path.endswith((".npy", ".npz")):
            # allow_pickle=False (numpy's default, stated): an object array in a data file is refused, never run
            arr = np.load(path, mmap_mode="r", allow_pickle=False) if path.endswith(".npy") else \
                np.load(path, allow_pickle=False)
            if hasattr(arr, "files"):
                arr = arr[arr.files[0]]
            if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
                raise SkipSample("corrupt", f"{path}: expected (T, H, W, 3) uint8, got {arr.shape} {arr.dtype}")
            have = [i for i in want if i < arr.shape[0]]
            frames = np.array(arr[have]) if have else np.zeros((0, 1, 1, 3), np.uint8)
        else:
            wanted = set(want)
            last = want[-1]
            got: dict[int, np.ndarray] = {}
            with require_av().open(path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        got[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
            have = [i for i in want if i in got]
            frames = np.stack([got[i] for i in have]) if have else np.zeros((0, 1, 1, 3), np.uint8)
    except SkipSample:
        raise
    except Exception as e:   # PyAV and numpy raise many types for truncated or garbage files
        raise SkipSample("corrupt", f"{path}: {type(e).__name__}: {e}") from None
    if len(frames) == 0:
        raise SkipSample("corrupt", f"{path}: no decodable frame")
    if len(frames) < len(want) and not allow_short:
        raise SkipSample("short", f"{path}: {len(frames)} of the {len(want)} frames up to index {want[-1]}")
    return frames


def read_image(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise SkipSample("missing", path)
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))[None]
    except Exception as e:
        raise SkipSample("corrupt", f"{path}: {type(e).__name__}: {e}") from None


def resize_cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Lanczos-resize (T, H, W, 3) uint8 frames to cover (height, width), then crop the centre."""
    T, H, W, _ = frames.shape
    if (H, W) == (height, width):
        return frames
    s = max(height / H, width / W)
    rh, rw = max(height, round(H * s)), max(width, round(W * s))
    top, left = (rh - height) // 2, (rw - width) // 2
    out = np.empty((T, height, width, 3), np.uint8)
    for i, f in enumerate(frames):
        im = Image.fromarray(np.ascontiguousarray(f)).resize((rw, rh), Image.LANCZOS)
        out[i] = np.asarray(im)[top:top + height, left:left + width]
    return out


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    if not frames.flags.writeable:   # PIL and memory-mapped arrays are read-only; torch wants writable memory
        frames = frames.copy()
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------------

@dataclass
class SampleSpec:
    """What the loader needs from the run config (kept small so extraction and training share it)."""
    pyramid: PyramidConfig
    pixels_per_latent: int = 16
    fps: Optional[float] = 16.0
    max_frames: int = 81
    unit: int = 80
    short_caption_prob: float = 0.0
    duration_prefix: bool = False
    latent_cache: Optional[str] = None
    require_cache: bool = False
    first_frame_all_captions: bool = False


@dataclass
class RawSample:
    record: MediaRecord
    seed: int                                     # drives every random choice made for this sample
    num_frames: int
    pyramid: PyramidConfig                        # the sample's bucket
    captions: list[str]
    caption_of_clip: list[ClipCaptions]
    pixels: Optional[torch.Tensor] = None         # (3, T, H, W) in [-1, 1], to be encoded by the tokenizer
    latent: Optional[torch.Tensor] = None         # (C, T_lat, h, w) from the cache


def planned_offsets(record: MediaRecord, spec: SampleSpec) -> Optional[list[int]]:
    """Frame offsets from the manifest alone (None when the video's length is unknown until decoded)."""
    if record.kind == "image":
        return [0]
    if record.end is None:
        return None
    return frame_offsets(record.end - record.begin, record.fps, spec.fps, spec.max_frames, spec.unit)


def decode_frames(record: MediaRecord, spec: SampleSpec) -> np.ndarray:
    """The frames a record trains on, before resizing: (T, H, W, 3) uint8 with T = 1 + k * unit."""
    if record.kind == "image":
        return read_image(record.path)
    offsets = planned_offsets(record, spec)
    if offsets is not None:
        return read_video_frames(record.path, [record.begin + o for o in offsets])
    longest = frame_offsets(None, record.fps, spec.fps, spec.max_frames, spec.unit)
    frames = read_video_frames(record.path, [record.begin + o for o in longest], allow_short=True)
    k = (len(frames) - 1) // spec.unit     # the decoded prefix, cut to whole units
    return frames[:1 + k * spec.unit]


def load_sample(record: MediaRecord, seed: int, spec: SampleSpec) -> RawSample:
    """Everything of one sample that needs no model: cached latent or decoded pixels, bucket and captions.
    Raises SkipSample when the sample cannot be used."""
    rng = random.Random(seed)
    latent, pixels = None, None
    offsets = planned_offsets(record, spec)
    if spec.latent_cache is not None:
        try:
            latent = read_cached_latent(spec.latent_cache, record, spec, None if offsets is None else len(offsets))
        except CacheMismatch as e:   # without require_cache: decoded from the media instead
            if spec.require_cache:
                raise SkipSample("cache_mismatch", f"{record.source}: {e}") from None
        else:
            if latent is None and spec.require_cache:
                raise SkipSample("uncached", f"{record.source}: no cached latent in {spec.latent_cache}")
    if latent is not None:
        pyramid = bucket_for_latent(latent.shape[2], latent.shape[3], spec.pyramid)
        t_lat = latent.shape[1]
        num_frames = 1 + (t_lat - 1) * spec.pyramid.temporal_compression
    else:
        frames = decode_frames(record, spec)
        pyramid, (H, W) = bucket_for_frame(frames.shape[1], frames.shape[2], spec.pyramid, spec.pixels_per_latent)
        pixels = frames_to_tensor(resize_cover_crop(frames, H, W))
        num_frames = pixels.shape[1]
    num_clips = pyramid.build(num_frames).num_clips
    seconds = None
    if spec.duration_prefix and num_frames > 1:
        seconds = (num_frames - 1) / spec.fps if spec.fps else float(num_frames - 1)
    captions, caption_of_clip = sample_captions(record, num_clips, rng, spec.short_caption_prob, seconds,
                                                spec.first_frame_all_captions)
    return RawSample(record, seed, num_frames, pyramid, captions, caption_of_clip, pixels, latent)


# --------------------------------------------------------------------------------------------------
# Order and loading
# --------------------------------------------------------------------------------------------------

class ShardedOrder:
    """An endless, resumable order over `n` records: per epoch a permutation from (seed, epoch), padded by
    wrapping to a multiple of world_size; rank r takes global positions r, r + W, r + 2W, ...

    With the same seed, the union of what the ranks take at micro-step s is what one process with a W times
    larger batch takes, so runs on different numbers of processes see the same global batches.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n < 1:
            raise ValueError("no records to iterate over")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.per_rank = -(-n // world_size)
        self.epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm_epoch != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._perm_epoch = epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, int]:
        """(record index, sample seed) of the next position; advances the state."""
        g = self.cursor * self.world_size + self.rank
        idx = self._permutation(self.epoch)[g % self.n]
        seed = derive_seed(self.seed, "sample", self.epoch, g)
        self.cursor += 1
        if self.cursor == self.per_rank:
            self.epoch, self.cursor = self.epoch + 1, 0
        return idx, seed

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "world_size": self.world_size}

    def load_state_dict(self, d: dict) -> None:
        if d.get("n") != self.n or d.get("world_size") != self.world_size:
            raise ValueError(f"data position was saved for {d.get('n')} records on {d.get('world_size')} ranks; "
                             f"this run has {self.n} records on {self.world_size} ranks")
        self.epoch, self.cursor = int(d["epoch"]), int(d["cursor"])


@dataclass
class DataStats:
    skipped: dict = field(default_factory=lambda: {k: 0 for k in SKIP_REASONS})
    cache_hits: int = 0
    encoded: int = 0
    messages: list = field(default_factory=list)

    def skip(self, e: SkipSample, limit: int = 20) -> None:
        self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
        if len(self.messages) < limit:
            self.messages.append(str(e))


class SampleLoader:
    """Yields usable RawSamples in the order's sequence, decoding up to `num_workers` ahead in threads.

    The loader's state is the position after the last *consumed* sample (prefetched work is redone after a
    resume), so checkpoints record exactly which samples were trained on. Skipped samples are counted in
    `stats`; `max_consecutive_skips` guards against spinning forever on a dataset with no usable sample.
    """

    def __init__(self, records: Sequence[MediaRecord], spec: SampleSpec, order: ShardedOrder, num_workers: int = 2,
                 max_consecutive_skips: Optional[int] = None):
        self.records, self.spec, self.order = list(records), spec, order
        self.num_workers = num_workers
        self.stats = DataStats()
        self.max_skips = max_consecutive_skips or max(100, 2 * len(self.records))
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._queue: deque[tuple[Future | tuple, dict]] = deque()
        self._consumed_state = order.state_dict()

    def _submit(self) -> None:
        idx, seed = next(self.order)
        state = self.order.state_dict()
        rec = self.records[idx]
        if self._pool is None:
            self._queue.append(((rec, seed), state))
        else:
            self._queue.append((self._pool.submit(load_sample, rec, seed, self.spec), state))

    def _take(self):
        while len(self._queue) < max(1, self.num_workers * 2):
            self._submit()
        job, state = self._queue.popleft()
        self._consumed_state = state
        if isinstance(job, tuple):
            return load_sample(job[0], job[1], self.spec)
        return job.result()

    def next(self) -> RawSample:
        for _ in range(self.max_skips):
            try:
                return self._take()
            except SkipSample as e:
                self.stats.skip(e)
        raise RuntimeError(f"{self.max_skips} consecutive samples were unusable; first problems: "
                           + "; ".join(self.stats.messages[:5]))

    def batch(self, n: int) -> list[RawSample]:
        return [self.next() for _ in range(n)]

    def state_dict(self) -> dict:
        return dict(self._consumed_state)

    def load_state_dict(self, d: dict) -> None:
        self._drain()
        self.order.load_state_dict(d)
        self._consumed_state = self.order.state_dict()

    def _drain(self) -> None:
        for job, _ in self._queue:
            if isinstance(job, Future):
                job.cancel()
        self._queue.clear()

    def close(self) -> None:
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
