"""One generation request against a model folder: load the folder by name, generate from prompts with a seed,
and collect the notes a user should see (unknown words, a resized upload, a snapped image size).

`infinitystar generate` and the web demo (`infinitystar demo`) both run through these functions, so a prompt, a
seed and the same settings give the same frames in either. Every problem with the request is a `UserError` with
a one-line message.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from infinitystar.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, MediaError, export_to_video, save_image
from infinitystar.memory import MemoryOptions
from infinitystar.pipelines import (DEFAULT_MODEL_DIR, InfinityPipeline, InfinityStarPipeline, ModelIndex, load,
                                    read_model_index, resolve_model_path)
from infinitystar.pipelines.stream import VideoStream
from infinitystar.runtime import UserError, resolve_device

AnyPipeline = Union[InfinityStarPipeline, InfinityPipeline]


def model_index(model: Union[str, Path]) -> ModelIndex:
    """The model_index.json of a model name ("default": the model shipped inside the package; a folder; a Hugging
    Face Hub repo id), read once: its family decides what the request may ask and which pipeline runs."""
    try:
        return read_model_index(resolve_model_path(model))
    except FileNotFoundError as e:
        if str(model) == "default":
            raise UserError(f"the shipped default model is missing from this install ({DEFAULT_MODEL_DIR}); "
                            f"reinstall the package, or pass --model DIR (scripts/train_default_model.sh trains "
                            f"it)") from None
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None


def model_family(model: Union[str, Path]) -> str:
    """`family` of a model's model_index.json: "infinitystar" or "infinity"."""
    return model_index(model).family


def load_pipeline(model: Union[str, Path, ModelIndex], device: Union[str, torch.device, None] = "cpu",
                  precision: str = "auto", memory: Optional[MemoryOptions] = None,
                  torch_dtype: Union[torch.dtype, dict, None] = None) -> AnyPipeline:
    """The pipeline of a model (a name as `model_index` takes, or its already read index), InfinityStar or Infinity
    as its model_index.json says, placed as the memory options say (default `MemoryOptions()`), its weights read
    straight into `torch_dtype` (as `from_pretrained`: one dtype or one per component); the device is checked
    first."""
    dev = resolve_device(device)
    index = model if isinstance(model, ModelIndex) else model_index(model)
    try:
        return load(index, device=dev, precision=precision, memory=memory, torch_dtype=torch_dtype)
    except (FileNotFoundError, ValueError) as e:      # a missing part, a bad config, a strict-loading mismatch
        raise UserError(str(e)) from None


@contextmanager
def collect_notes() -> Iterator[list[str]]:
    """The UserWarnings raised inside the block, as messages (each once, in order): what the user should be told
    (unknown words, a resized upload, a snapped size). Other warnings are passed on as usual."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        notes: list[str] = []
        yield notes
    for w in caught:
        if not issubclass(w.category, UserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif str(w.message) not in notes:
            notes.append(str(w.message))


@dataclass
class VideoResult:
    frames: np.ndarray                     # (T, H, W, 3) uint8
    seed: int
    fps: int
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"                # what sampling and decoding computed in


@dataclass
class ImageResult:
    image: np.ndarray                      # (H, W, 3) uint8
    seed: int
    height: int
    width: int
    template: float                        # h/w of the template used
    pn: str
    notes: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"


def generate_video(pipe: InfinityStarPipeline, prompts: Sequence[str], num_frames: int = 17, *, image=None,
                   video=None, guidance_scale: Optional[float] = None, temperature: Optional[float] = None,
                   seed: int = 0, progress: bool = False, negative_prompt: Optional[str] = None) -> VideoResult:
    """Frames of one video (one frame: an image). prompts: one per clip (the last one carries on); image: a first
    frame to animate; video: frames to continue (paths or arrays); negative_prompt: what guidance steers from."""
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UserError("give a non-empty prompt describing what to generate")
    try:   # the first frame is a clip of its own that shares the first prompt
        clips = max(1, pipe.pyramid.build(num_frames).num_clips - 1)
    except ValueError as e:
        raise UserError(str(e)) from None
    if len(prompts) > clips:
        per_clip = pipe.pyramid.frames_per_clip * pipe.pyramid.temporal_compression
        raise UserError(f"{len(prompts)} prompts for {num_frames} frames ({clips} clip(s)): each clip takes one "
                        f"prompt; ask for {1 + per_clip * len(prompts)} frames or give fewer prompts")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    pipe.set_progress_bar_config(disable=not progress)
    with collect_notes() as notes:
        try:
            out = pipe([list(prompts)], num_frames=num_frames, image=image, video=video,
                       negative_prompt=negative_prompt, guidance_scale=guidance_scale, temperature=temperature,
                       generator=generator, output_type="uint8")
        except ValueError as e:                      # bad frames, too short a video, unreadable media, ...
            raise UserError(str(e)) from None
    return VideoResult(out.frames[0], int(seed), pipe.defaults.fps, notes, out.timings, out.precision)


def generate_image(pipe: InfinityPipeline, prompt: str, *, aspect_ratio: Union[float, str, None] = None,
                   pn: Optional[str] = None, guidance_scale: Optional[float] = None,
                   temperature: Optional[float] = None, seed: int = 0, progress: bool = False,
                   negative_prompt: Optional[str] = None) -> ImageResult:
    """One image from an Infinity (text-to-image) model; aspect_ratio h/w or 'W:H', snapped with a note."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("give a non-empty prompt describing the image")
    pipe.set_progress_bar_config(disable=not progress)
    with collect_notes() as notes:
        try:
            out = pipe(prompt, aspect_ratio=aspect_ratio, pn=pn, negative_prompt=negative_prompt,
                       guidance_scale=guidance_scale, temperature=temperature,
                       generator=torch.Generator(device="cpu").manual_seed(int(seed)), output_type="uint8")
        except ValueError as e:
            raise UserError(str(e)) from None
    return ImageResult(out.images[0], int(seed), out.height, out.width, out.template, out.pn, notes, out.timings,
                       out.precision)


def _stream_step(call):
    """Run one stream call, returning its result and notes; a bad prompt or unusable media is a UserError."""
    with collect_notes() as notes:
        try:
            result = call()
        except UserError:
            raise
        except ValueError as e:                      # unreadable or unusable image / video, a prompt without words
            raise UserError(str(e)) from None
    return result, notes


def start_stream(pipe: InfinityStarPipeline, prompt: str, *, inference: Optional[str] = None, image=None,
                 video=None, guidance_scale: Optional[float] = None, temperature: Optional[float] = None,
                 seed: int = 0) -> tuple[VideoStream, list[str]]:
    """Start a video that grows clip by clip (`InfinityStarPipeline.start`): the stream (its first frames in
    `stream.clips[0]`) and the notes of its first clip."""
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return _stream_step(lambda: pipe.start(prompt, inference=inference, image=image, video=video,
                                           guidance_scale=guidance_scale, temperature=temperature,
                                           generator=generator))


def extend_stream(stream: VideoStream, prompt: str) -> tuple[np.ndarray, list[str]]:
    """Add one clip to a stream: its frames and notes. On an error the stream is left as it was."""
    return _stream_step(lambda: stream.extend(prompt))


def check_output(out: Union[str, Path]) -> Path:
    """An output path whose suffix is a video (.mp4, .gif, .npy) or an image (.png, .jpg) one, checked before any
    work (the folder: `cli.args.check_output_file`)."""
    out = Path(out)
    if out.suffix.lower() not in (*VIDEO_SUFFIXES, *IMAGE_SUFFIXES):
        raise UserError(f"the output must end in {', '.join(VIDEO_SUFFIXES)} (video) or {', '.join(IMAGE_SUFFIXES)} "
                        f"(image), got {out.name}")
    return out


def save_result(frames: np.ndarray, out: Union[str, Path], fps: float = 16, lossless: bool = False) -> Path:
    """Write frames to `out` atomically: an image path (.png/.jpg) takes one frame, a video path (.mp4 in yuv420p,
    or exact RGB with `lossless`; .gif; .npy) a video."""
    out = check_output(out)
    frames = np.asarray(frames)
    try:
        if out.suffix.lower() in IMAGE_SUFFIXES:
            if frames.ndim == 4 and frames.shape[0] != 1:
                raise UserError(f"{out} is an image; use a video output for {frames.shape[0]} frames")
            return save_image(frames, out)
        return export_to_video(frames, out, fps=fps, lossless=lossless)
    except MediaError as e:
        raise UserError(str(e)) from None
    except OSError as e:   # disk full, quota, the folder gone: the write is atomic, an existing file is intact
        raise UserError(f"{out}: cannot write ({e.strerror or e})") from None


__all__ = ["model_index", "model_family", "load_pipeline", "check_output", "collect_notes", "generate_video",
           "generate_image", "start_stream", "extend_stream", "save_result", "VideoResult", "ImageResult",
           "IMAGE_SUFFIXES"]
