"""The web demo's request handlers, free of any web framework: each takes what a page's controls hold and returns
a `Reply` (the written file, the seed used, a status message), so they are called directly by the tests and
wrapped by the Gradio page (`infinitystar.demo.app`).

Generation goes through `infinitystar.generation`, the functions `infinitystar generate` uses. Whatever is wrong
with a request (no prompt, an unreadable upload, too short a video, a model folder that did not load) comes
back as a message in the reply, never as an exception that would leave the page without an answer.
"""
from __future__ import annotations

import math
import secrets
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np

from infinitystar.generation import (extend_stream, generate_image, generate_video, load_pipeline, model_index,
                                     save_result, start_stream)
from infinitystar.media import export_to_video, save_image
from infinitystar.pipelines.stream import VideoStream
from infinitystar.runtime import UserError
from infinitystar.shapes import world

MAX_SEED = 2 ** 31 - 1
MAX_INTERACTIVE_CLIPS = 64        # a page's video is kept in memory: 1 + 64 x 16 frames at most
DEFAULT_CHOICE = "model default"
ASPECT_RATIOS = (DEFAULT_CHOICE, "1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16")
PIXEL_BUDGETS = (DEFAULT_CHOICE, "0.06M", "0.25M", "0.60M", "1M")
Number = Union[int, float, None]


@dataclass
class Reply:
    """What a handler hands back to the page."""
    path: Optional[str]               # the written .mp4 or .png; None when there was an error
    seed: Optional[int]               # the seed used (shown in the seed box, so a random one can be repeated)
    message: str                      # Markdown for the status line under the result
    notes: list[str] = field(default_factory=list)    # warnings to show (unknown words, resized uploads, ...)
    error: Optional[str] = None
    frames: int = 0


def _error(message: str, seed: Optional[int] = None) -> Reply:
    return Reply(None, seed, f"**Error:** {message}", error=message)


def _success(path: Path, seed: int, frames: np.ndarray, notes: list[str], headline: str) -> Reply:
    lines = [f"Seed **{seed}** · {headline}"] + [f"⚠️ {n}" for n in notes]
    count = 1 if frames.ndim == 3 else frames.shape[0]
    return Reply(str(path), seed, "\n\n".join(lines), list(notes), frames=count)


def _size(frames: np.ndarray) -> str:
    """'an image of 64x64' or '17 frames of 64x64'."""
    count, h, w = (1, *frames.shape[:2]) if frames.ndim == 3 else frames.shape[:3]
    return f"{'an image' if count == 1 else f'{count} frames'} of {w}x{h}"


def pick_seed(seed: Number, randomize: bool) -> int:
    """The seed to use: a fresh random one, or the one typed (a whole number from 0 to MAX_SEED)."""
    if randomize:
        return secrets.randbelow(MAX_SEED + 1)
    if seed is None or not math.isfinite(float(seed)) or float(seed) != int(seed) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"the seed must be a whole number from 0 to {MAX_SEED} (or tick 'random'), got {seed!r}")
    return int(seed)


def _optional_float(value: Union[Number, str], name: str) -> Optional[float]:
    """None or an empty box: the model's default."""
    if value is None or not str(value).strip():
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"{name} must be a positive number (leave it empty for the model's default), got {value!r}")
    return number


def _prompt(prompt: Optional[str]) -> str:
    if prompt is None or not str(prompt).strip():
        raise UserError("type a prompt first (the examples below the controls are a good start)")
    return str(prompt).strip()


def _frames(frames: Number) -> int:
    if frames is None or float(frames) != int(frames):
        raise UserError(f"the number of frames must be a whole number, got {frames!r}")
    return int(frames)


@dataclass
class InteractiveSession:
    """One visitor's interactive video: no stream until the first prompt, then the stream that holds it (its KV
    cache and decoder state: each clip costs the same however long the video is) and its seed."""
    stream: Optional[VideoStream] = None
    seed: Optional[int] = None

    @property
    def clips(self) -> int:
        return 0 if self.stream is None else len(self.stream.prompts)


class DemoModel:
    """The model a demo serves (or why it did not load) and the folder its results are written to."""

    def __init__(self, model: Union[str, Path] = "default", device: str = "cpu",
                 out_dir: Union[str, Path, None] = None):
        self.model = str(model)
        self._tmp = None
        if out_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="infinitystar-demo-")
            out_dir = self._tmp.name
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pipe, self.error = None, None
        try:
            index = model_index(model)            # read once: the family and the pipeline
            self.family = index.family
            self.pipe = load_pipeline(index, device)
        except UserError as e:
            self.family = "infinitystar"
            self.error = f"the model did not load: {e}"

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    @property
    def description(self) -> str:
        if self.pipe is None:
            return f"no model ({self.error})"
        name = "the built-in default model" if self.model == "default" else self.model
        if self.family == "infinity":
            res = self.pipe.resolution(warn=False)
            return f"{name}: Infinity text-to-image, {res.width}x{res.height} by default, on {self.pipe.device}"
        return (f"{name}: InfinityStar, {self.pipe.width}x{self.pipe.height} frames at {self.pipe.defaults.fps} fps, "
                f"on {self.pipe.device}")

    # --- what the page shows ------------------------------------------------------------------------------------
    def vocabulary_note(self) -> str:
        """Markdown: what the model's text encoder understands, so free text being ignored is no surprise."""
        words = getattr(self.pipe.text_encoder, "words", None) if self.pipe is not None else None
        if words is None:
            return ("This model reads prompts with T5, so free text is understood as far as its training data "
                    "covered it." if self.pipe is not None else "")
        heldout = ", ".join(f"{c} {s}" for c, s in world.HELDOUT_PAIRS_SORTED)
        return (f"Prompts are read by the built-in word encoder, which knows these {len(words)} words and nothing "
                f"else: {', '.join(words)}. Any other word is ignored, and the page names it in a warning. The "
                f"built-in model was trained on Shapes World captions (one coloured shape on a plain background): "
                f"*{world.MOVING_TEMPLATE}* and *{world.STILL_TEMPLATE}* for videos, *{world.IMAGE_TEMPLATE}* for "
                f"images. Three colour-shape pairs were held out of its training ({heldout}): try them to see "
                f"whether it composes what it learned separately.")

    def new_path(self, task: str, seed: int, suffix: str) -> Path:
        return self.out_dir / f"{task}-seed{seed}-{uuid.uuid4().hex[:8]}{suffix}"

    def _check_model(self, family: str) -> None:
        if self.pipe is None:
            raise UserError(self.error)
        if self.family != family:
            what = "an Infinity (text-to-image) model" if self.family == "infinity" else "an InfinityStar model"
            raise UserError(f"this tab does not apply: the demo serves {what}")

    # --- handlers -----------------------------------------------------------------------------------------------
    def _video(self, task: str, prompt, frames, seed, randomize, guidance, temperature, image=None, video=None,
               progress: bool = False, need: Optional[str] = None) -> Reply:
        used = None
        try:
            self._check_model("infinitystar")
            text = _prompt(prompt)
            if need == "image" and not image:
                raise UserError("upload a first frame (an image) to animate")
            if need == "video" and not video:
                raise UserError("upload a video to continue")
            used = pick_seed(seed, randomize)
            result = generate_video(self.pipe, [text], _frames(frames), image=image, video=video,
                                    guidance_scale=_optional_float(guidance, "guidance"),
                                    temperature=_optional_float(temperature, "temperature"), seed=used,
                                    progress=progress)
            suffix = ".png" if result.frames.shape[0] == 1 else ".mp4"
            path = save_result(result.frames, self.new_path(task, used, suffix), fps=result.fps)
        except UserError as e:
            return _error(str(e), used)
        return _success(path, used, result.frames, result.notes,
                        f"{_size(result.frames)} · {result.timings['total_s']:.2f} s")

    def text_to_image(self, prompt, seed, randomize, guidance, temperature, progress=False) -> Reply:
        return self._video("t2i", prompt, 1, seed, randomize, guidance, temperature, progress=progress)

    def text_to_video(self, prompt, frames, seed, randomize, guidance, temperature, progress=False) -> Reply:
        return self._video("t2v", prompt, frames, seed, randomize, guidance, temperature, progress=progress)

    def image_to_video(self, prompt, image, frames, seed, randomize, guidance, temperature, progress=False) -> Reply:
        return self._video("i2v", prompt, frames, seed, randomize, guidance, temperature, image=image or None,
                           progress=progress, need="image")

    def continuation(self, prompt, video, frames, seed, randomize, guidance, temperature, progress=False) -> Reply:
        return self._video("continue", prompt, frames, seed, randomize, guidance, temperature, video=video or None,
                           progress=progress, need="video")

    def infinity_image(self, prompt, aspect_ratio, pn, seed, randomize, guidance, temperature) -> Reply:
        used = None
        try:
            self._check_model("infinity")
            text = _prompt(prompt)
            used = pick_seed(seed, randomize)
            result = generate_image(self.pipe, text,
                                    aspect_ratio=None if aspect_ratio in (None, "", DEFAULT_CHOICE) else aspect_ratio,
                                    pn=None if pn in (None, "", DEFAULT_CHOICE) else pn,
                                    guidance_scale=_optional_float(guidance, "guidance"),
                                    temperature=_optional_float(temperature, "temperature"), seed=used)
            path = save_result(result.image, self.new_path("t2i", used, ".png"))
        except UserError as e:
            return _error(str(e), used)
        return _success(path, used, result.image, result.notes,
                        f"{_size(result.image)} · template h/w {result.template:g}, pn {result.pn} · "
                        f"{result.timings['total_s']:.2f} s")

    def interactive_submit(self, session: Optional[InteractiveSession], prompt, seed, randomize, guidance,
                           temperature) -> tuple[InteractiveSession, Reply]:
        """Add one clip with this prompt (the first submit starts the video with the seed and settings given,
        later ones keep them) and write the whole video so far. A failed submit leaves the video as it was."""
        session = session if session is not None else InteractiveSession()
        try:
            self._check_model("infinitystar")
            text = _prompt(prompt)
            if session.stream is None:
                used = pick_seed(seed, randomize)
                stream, notes = start_stream(self.pipe, text, guidance_scale=_optional_float(guidance, "guidance"),
                                             temperature=_optional_float(temperature, "temperature"), seed=used)
                session = InteractiveSession(stream, used)
            elif session.clips >= MAX_INTERACTIVE_CLIPS:
                raise UserError(f"this video has {session.clips} clips, the most this page makes; press reset to "
                                f"start a new one")
            else:
                _, notes = extend_stream(session.stream, text)
            frames = session.stream.video()
            path = save_result(frames, self.new_path("interactive", session.seed, ".mp4"),
                               fps=self.pipe.defaults.fps)
        except UserError as e:
            return session, _error(str(e), session.seed)
        prompts = "".join(f"\n{i + 1}. {p}" for i, p in enumerate(session.stream.prompts))
        seconds = session.stream.timings[-1]["seconds"]
        return session, _success(path, session.seed, frames, notes,
                                 f"{session.clips} clip(s), {_size(frames)} so far · last clip {seconds:.2f} s\n"
                                 f"{prompts}")

    @staticmethod
    def interactive_reset() -> InteractiveSession:
        return InteractiveSession()


# --- examples -----------------------------------------------------------------------------------------------------
# Seen pairs first, then the three held-out (colour, shape) pairs the built-in model never saw together.
_EXAMPLE_OBJECTS = (("large", "red", "circle", "black"), ("small", "blue", "square", "white"),
                    ("large", "green", "triangle", "gray"), ("large", "purple", "triangle", "black"),
                    ("large", "yellow", "circle", "gray"), ("small", "cyan", "square", "white"))
_EXAMPLE_MOTIONS = (("right", "slowly"), ("down", "quickly"), ("left", "slowly"), ("up", "slowly"),
                    ("right", "quickly"), ("left", "slowly"))


def image_examples() -> list[str]:
    return [world.caption_for(size, color, shape, bg) for size, color, shape, bg in _EXAMPLE_OBJECTS]


def video_examples() -> list[str]:
    return [world.caption_for(size, color, shape, bg, d, s)
            for (size, color, shape, bg), (d, s) in zip(_EXAMPLE_OBJECTS, _EXAMPLE_MOTIONS)]


def interactive_examples() -> list[str]:
    """One object turning at every clip: a prompt per submit."""
    return [world.caption_for("large", "cyan", "square", "black", d, s)
            for d, s in (("right", "slowly"), ("down", "slowly"), ("left", "slowly"), ("up", "slowly"))] + [
        world.caption_for("large", "cyan", "square", "black", "still")]


def write_example_media(out_dir: Union[str, Path]) -> list[tuple[str, str, str]]:
    """Rendered Shapes World inputs for the upload tabs: (prompt, first-frame .png, 17-frame .mp4) per example,
    the prompt describing how the object goes on moving."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((size, color, shape, bg), (d, s)) in enumerate(zip(_EXAMPLE_OBJECTS, _EXAMPLE_MOTIONS)):
        motion = world.Motion(d, s)
        vx, vy = motion.velocity     # start back from the centre so the whole clip stays on the canvas
        half = (world.VIDEO_FRAMES - 1) // 2
        spec = world.ShapeSpec(color=color, shape=shape, size=size, background=bg, cx0=32.0 - vx * half,
                               cy0=32.0 - vy * half, segments=(motion,))
        frames = world.render(spec, world.VIDEO_FRAMES)
        image = save_image(frames[0], out_dir / f"example{i}_{color}_{shape}.png")
        video = export_to_video(frames, out_dir / f"example{i}_{color}_{shape}.mp4", fps=world.FPS)
        rows.append((world.caption_for(size, color, shape, bg, d, s), str(image), str(video)))
    return rows
