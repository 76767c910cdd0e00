"""Scoring generated Shapes World samples against their prompts (model-agnostic: arrays in, numbers out).

The intended attributes come from the prompt captions (``parse_caption``), or from a ``ShapeSpec``.
Every judgement goes through ``decoder.py`` (the reference evaluator), so a perfect render scores 1.0.

Per sample (``SampleScore.correct``):
- ``background``, ``color``, ``shape``, ``size``: the video's majority decode equals the prompt.
- ``direction``, ``speed`` (videos): the centroid slope over the whole video; for a prompt per
  16-frame segment, every segment judged on its own frames ``16k .. 16k+16`` (all must be right;
  per-segment results are in ``decoded["segments"]``).
- ``condition`` (image-to-video, continuation): every conditioning frame's decode (colour, shape, size,
  background) matches the generated frame at the same index and the centroids are within
  ``CONDITION_CENTROID_TOL`` px; ``extra["condition_mae"]`` is the mean absolute pixel difference.
- ``continued_motion`` (continuation): the motion of the new part alone (from the last given frame on)
  matches the caption.
``extra["start_leaves_room"]`` (text-to-video, moving captions; not a criterion): 1 if the first frame's
decoded centre leaves room on the canvas for the prompted travel (speed x (T - 1) px, within
``START_ROOM_TOL``), else 0. Shapes World never clips an object, so a start without room forces a
shorter, slower move; this tells such speed errors apart from motion the model did not learn.
``all_correct`` is the AND of them; ``consistency`` is the decoder's temporal consistency (videos).
``aggregate`` splits results into ``seen`` and ``heldout`` (the prompt's (color, shape) pair).
"""
from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infinitystar.media import as_uint8

from .decoder import decode_frame, decode_from_frames, decode_motion, segment_range
from .world import (
    CANVAS, HELD_OUT_PAIRS, SEGMENT_FRAMES, Motion, ShapeSpec, caption_image, caption_video, captions_per_segment,
    fits_canvas, parse_caption,
)

CONDITION_CENTROID_TOL: float = 2.0
"""Max centroid distance (px) between a conditioning frame and the generated frame at its index."""

START_ROOM_TOL: float = 1.5
"""Slack (px) when checking that a generated first frame leaves room for the prompted travel."""

TASKS: tuple[str, ...] = ("t2i", "t2v", "i2v", "continuation", "long")
STATIC: tuple[str, ...] = ("background", "color", "shape", "size")


@dataclass
class SampleScore:
    """The judgement of one generated sample."""

    task: str
    split: str  # "seen" or "heldout"
    prompts: list[str]
    correct: dict[str, bool]
    all_correct: bool
    consistency: float | None  # None for images
    decoded: dict = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)


Prompt = str | Sequence[str] | ShapeSpec


def prompts_of(prompt: Prompt, image: bool = False) -> list[str]:
    """Normalise a prompt (a caption, captions per segment, or a ShapeSpec) to a list of captions."""
    if isinstance(prompt, ShapeSpec):
        if image:
            return [caption_image(prompt)]
        return captions_per_segment(prompt) if len(prompt.segments) > 1 else [caption_video(prompt)]
    if isinstance(prompt, str):
        return [prompt]
    prompts = list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompt must be a caption, a non-empty list of captions, or a ShapeSpec")
    return prompts


def intended(prompts: Sequence[str]) -> list[dict]:
    """Parse the captions; all segments must describe the same object on the same background."""
    parsed = [parse_caption(p) for p in prompts]
    first = {k: parsed[0][k] for k in STATIC}
    for k, p in enumerate(parsed[1:], 1):
        other = {key: p[key] for key in STATIC}
        if other != first:
            raise ValueError(f"segment {k} describes {other}, segment 0 describes {first}: one object per video")
    return parsed


def split_of(parsed: dict) -> str:
    """'heldout' for the held-out (color, shape) pairs, else 'seen'."""
    return "heldout" if (parsed["color"], parsed["shape"]) in HELD_OUT_PAIRS else "seen"


def _video(frames: np.ndarray) -> np.ndarray:
    a = as_uint8(frames)      # a pipeline's float [0, 1] output is scored as the pixels it stands for
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (H, W, 3), got {a.shape}")
    return a


def score_image(frame: np.ndarray, prompt: Prompt) -> SampleScore:
    """Text-to-image: the decoded frame's background, colour, shape and size against the caption."""
    img = _video(frame)
    if img.shape[0] != 1:
        raise ValueError(f"score_image takes one frame, got {img.shape[0]}; use score_video")
    prompts = prompts_of(prompt, image=True)
    want = intended(prompts)[0]
    d = decode_frame(img[0])
    correct = {k: getattr(d, k) == want[k] for k in STATIC}
    return SampleScore(task="t2i", split=split_of(want), prompts=prompts, correct=correct,
                       all_correct=all(correct.values()), consistency=None, decoded=d.to_dict())


def _condition_check(gen_decs, cond: np.ndarray, gen: np.ndarray) -> tuple[bool, dict[str, float]]:
    n = cond.shape[0]
    if n > gen.shape[0]:
        raise ValueError(f"{n} conditioning frames but only {gen.shape[0]} generated frames")
    if cond.shape[1:] != gen.shape[1:]:
        raise ValueError(f"conditioning frames {cond.shape[1:]} differ in size from generated {gen.shape[1:]}")
    ok, worst = True, 0.0
    for t in range(n):
        c, g = decode_frame(cond[t]), gen_decs[t]
        if any(getattr(c, k) != getattr(g, k) for k in STATIC) or c.centroid is None or g.centroid is None:
            ok = False
            worst = math.inf
            continue
        dist = math.dist(c.centroid, g.centroid)
        worst = max(worst, dist)
        ok = ok and dist <= CONDITION_CENTROID_TOL
    mae = float(np.abs(cond.astype(np.float64) - gen[:n].astype(np.float64)).mean())
    return ok, {"condition_mae": mae, "condition_centroid_err": worst}


def score_video(frames: np.ndarray, prompt: Prompt, *, condition_frames: np.ndarray | None = None,
                task: str | None = None) -> SampleScore:
    """Score a generated video against its caption, or its captions per 16-frame segment.

    ``condition_frames`` are the given frames (1 for image-to-video, 17 for continuation) that the
    generated video should start with. ``task`` defaults from the inputs: several prompts -> "long",
    one conditioning frame -> "i2v", more -> "continuation", else "t2v".
    """
    video = _video(frames)
    T = video.shape[0]
    if T < 2:
        raise ValueError(f"a video needs at least 2 frames to judge motion, got {T}; use score_image")
    prompts = prompts_of(prompt)
    parsed = intended(prompts)
    if any(p["kind"] == "image" for p in parsed):
        raise ValueError(f"video prompts need a motion (moving or standing still): {prompts}")
    cond = None if condition_frames is None else _video(condition_frames)
    if task is None:
        task = "long" if len(prompts) > 1 else "t2v" if cond is None else "i2v" if cond.shape[0] == 1 else "continuation"
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if len(prompts) > 1 and T != 1 + SEGMENT_FRAMES * len(prompts):
        raise ValueError(f"{len(prompts)} segment prompts need {1 + SEGMENT_FRAMES * len(prompts)} frames, got {T}")

    decs = [decode_frame(f) for f in video]
    whole = decode_from_frames(decs)
    want = parsed[0]
    correct = {k: getattr(whole, k) == want[k] for k in STATIC}
    decoded = whole.to_dict()
    if len(prompts) == 1:
        correct["direction"] = whole.direction == want["direction"]
        correct["speed"] = whole.speed == want["speed"]
    else:
        segs = []
        for k, p in enumerate(parsed):
            a, b = segment_range(k, T)
            m = decode_motion(decs[a:b])
            # where a moving segment begins must leave room for its travel, or it cannot move as prompted
            start = decs[a].centroid
            room = (None if p["direction"] == "still" or start is None
                    else _start_leaves_room(start, p, SEGMENT_FRAMES + 1))
            segs.append({"frames": [a, b - 1], "direction": m.direction, "speed": m.speed,
                         "slope_x": m.slope_x, "slope_y": m.slope_y,
                         "direction_ok": m.direction == p["direction"], "speed_ok": m.speed == p["speed"],
                         "prompted": "still" if p["direction"] == "still" else p["speed"], "room": room})
        decoded["segments"] = segs
        correct["direction"] = all(s["direction_ok"] for s in segs)
        correct["speed"] = all(s["speed_ok"] for s in segs)
    extra: dict[str, float] = {}
    if len(prompts) > 1:
        extra["segment_motion_accuracy"] = float(np.mean([s["direction_ok"] and s["speed_ok"]
                                                          for s in decoded["segments"]]))
        room = [seg["room"] for seg in decoded["segments"][1:] if seg["room"] is not None]
        if room:
            extra["later_segment_start_leaves_room"] = float(np.mean(room))
    if task == "t2v" and want["direction"] != "still" and decs[0].centroid is not None:
        extra["start_leaves_room"] = float(_start_leaves_room(decs[0].centroid, want, T))
    if cond is not None:
        correct["condition"], cond_extra = _condition_check(decs, cond, video)
        extra.update(cond_extra)
        if task == "continuation":
            tail = decode_motion(decs[cond.shape[0] - 1:])
            decoded["continued_motion"] = {"direction": tail.direction, "speed": tail.speed,
                                           "slope_x": tail.slope_x, "slope_y": tail.slope_y}
            correct["continued_motion"] = (tail.direction == want["direction"]
                                           and (len(prompts) > 1 or tail.speed == want["speed"]))
    return SampleScore(task=task, split=split_of(want), prompts=prompts, correct=correct,
                       all_correct=all(correct.values()), consistency=whole.consistency,
                       decoded=decoded, extra=extra)


def _start_leaves_room(centre: tuple[float, float], want: dict, num_frames: int) -> bool:
    """Whether the prompted object and move, started at a decoded `centre`, fit the canvas (`fits_canvas`), the
    centre first moved up to START_ROOM_TOL px toward the middle (a decoded centroid is not exact)."""
    middle = CANVAS / 2
    start = [round(2 * (c + float(np.clip(middle - c, -START_ROOM_TOL, START_ROOM_TOL)))) / 2 for c in centre]
    spec = ShapeSpec(want["color"], want["shape"], want["size"], want["background"], *start,
                     (Motion(want["direction"], want["speed"]),))
    return fits_canvas(spec, num_frames)


def score(frames: np.ndarray, prompt: Prompt, *, condition_frames: np.ndarray | None = None,
          task: str | None = None) -> SampleScore:
    """score_image for one frame with an image caption, else score_video."""
    video = _video(frames)
    if video.shape[0] == 1:
        return score_image(video[0], prompt)
    return score_video(video, prompt, condition_frames=condition_frames, task=task)


def _summary(scores: list[SampleScore]) -> dict:
    out: dict = {"n": len(scores)}
    if not scores:
        return out
    out["all_correct"] = float(np.mean([s.all_correct for s in scores]))
    keys = sorted({k for s in scores for k in s.correct})
    out["accuracy"] = {k: float(np.mean([s.correct[k] for s in scores if k in s.correct])) for k in keys}
    cons = [s.consistency for s in scores if s.consistency is not None]
    if cons:
        out["consistency"] = float(np.mean(cons))
    extras = sorted({k for s in scores for k in s.extra})
    for k in extras:
        vals = [s.extra[k] for s in scores if k in s.extra and math.isfinite(s.extra[k])]
        if vals:
            out[k] = float(np.mean(vals))
    return out


def segment_breakdown(scores: Sequence[SampleScore]) -> dict:
    """Segments of long videos, grouped by place (``first`` / ``later``), prompted motion (``quickly``, ``slowly``,
    ``still``) and, for moving ones, whether their start left room for the travel: ``{group: {"n": segments,
    "moved": segments that moved as captioned}}``, e.g. ``"later quickly, no room"``."""
    groups: dict[str, dict[str, int]] = {}
    for s in scores:
        for k, seg in enumerate(s.decoded.get("segments", ())):
            name = f"{'first' if k == 0 else 'later'} {seg['prompted']}"
            if seg["room"] is not None:
                name += ", room" if seg["room"] else ", no room"
            g = groups.setdefault(name, {"n": 0, "moved": 0})
            g["n"] += 1
            g["moved"] += int(seg["direction_ok"] and seg["speed_ok"])
    return dict(sorted(groups.items()))


def aggregate(scores: Sequence[SampleScore]) -> dict:
    """Mean accuracies: ``overall``, ``seen``, ``heldout`` and ``by_task`` (each also split by seen/heldout)."""
    scores = list(scores)
    result = {
        "overall": _summary(scores),
        "seen": _summary([s for s in scores if s.split == "seen"]),
        "heldout": _summary([s for s in scores if s.split == "heldout"]),
        "by_task": {},
    }
    for task in TASKS:
        sub = [s for s in scores if s.task == task]
        if sub:
            result["by_task"][task] = {
                "overall": _summary(sub),
                "seen": _summary([s for s in sub if s.split == "seen"]),
                "heldout": _summary([s for s in sub if s.split == "heldout"]),
            }
            if task == "long":
                result["by_task"][task]["segments"] = segment_breakdown(sub)
    return result


def _frame_indices(T: int, max_frames: int) -> list[int]:
    if T <= max_frames:
        return list(range(T))
    return sorted({int(round(i)) for i in np.linspace(0, T - 1, max_frames)})


def save_grid(path: str | os.PathLike, samples: Sequence[np.ndarray], captions: Sequence[str] | None = None,
              max_frames: int = 8, scale: int = 2, columns: int | None = None, font_size: int = 10) -> Path:
    """Save a PNG contact sheet: one strip of up to ``max_frames`` evenly spaced frames per sample,
    nearest-neighbour upscaled by ``scale``, with the sample's caption wrapped underneath (if given)."""
    if not samples:
        raise ValueError("save_grid needs at least one sample")
    if captions is not None and len(captions) != len(samples):
        raise ValueError(f"{len(captions)} captions for {len(samples)} samples")
    if scale < 1 or max_frames < 1:
        raise ValueError("scale and max_frames must be >= 1")
    vids = [_video(s) for s in samples]
    h, w = vids[0].shape[1:3]
    if any(v.shape[1:3] != (h, w) for v in vids):
        raise ValueError("all samples must have the same frame size")
    strips = []
    for v in vids:
        idx = _frame_indices(v.shape[0], max_frames)
        strips.append((np.concatenate([v[i] for i in idx], axis=1), len(idx)))
    pad = 4
    cell_w = max(s.shape[1] for s, _ in strips) * scale
    if columns is None:
        columns = max(1, min(len(strips), 1024 // (cell_w + pad)))
    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # older Pillow: fixed bitmap font
        font = ImageFont.load_default()
    line_h = font_size + 3
    wrapped: list[list[str]] = []
    for i in range(len(strips)):
        if captions is None:
            wrapped.append([])
            continue
        char_w = max(1.0, float(font.getlength("m")) if hasattr(font, "getlength") else 6.0)
        wrapped.append(textwrap.wrap(str(captions[i]), max(8, int(cell_w / char_w))) or [""])
    text_h = max((len(lines) for lines in wrapped), default=0) * line_h
    cell_h = h * scale + text_h
    rows = math.ceil(len(strips) / columns)
    sheet = Image.new("RGB", (columns * (cell_w + pad) + pad, rows * (cell_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (strip, n_frames) in enumerate(strips):
        r, c = divmod(i, columns)
        x, y = pad + c * (cell_w + pad), pad + r * (cell_h + pad)
        im = Image.fromarray(np.ascontiguousarray(strip))
        im = im.resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST)
        sheet.paste(im, (x, y))
        # thin separators so frames on a white background stay distinguishable from the sheet
        for j in range(n_frames + 1):
            draw.line([(x + j * w * scale - (j == n_frames), y), (x + j * w * scale - (j == n_frames), y + h * scale - 1)],
                      fill=(160, 160, 160))
        draw.line([(x, y), (x + n_frames * w * scale - 1, y)], fill=(160, 160, 160))
        draw.line([(x, y + h * scale - 1), (x + n_frames * w * scale - 1, y + h * scale - 1)], fill=(160, 160, 160))
        for j, line in enumerate(wrapped[i]):
            draw.text((x, y + h * scale + j * line_h), line, fill=(0, 0, 0), font=font)
    path = Path(path)
    sheet.save(path, format="PNG")
    return path


__all__ = [
    "CONDITION_CENTROID_TOL", "TASKS", "SampleScore", "prompts_of", "intended", "split_of", "score_image",
    "score_video", "score", "aggregate", "save_grid",
]
