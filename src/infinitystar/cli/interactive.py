"""`infinitystar generate --interactive --out FILE.mp4`: one prompt per line on standard input, one clip per
prompt. After each clip the new clip is written beside FILE (FILE's stem + `_clip001.mp4`, `_clip002.mp4`, ...) and
FILE is rewritten with the whole video so far; both writes are atomic (a temporary file renamed over the target),
so an error or an interrupt never loses or corrupts a clip already written. It stops at the end of the input."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Optional, TextIO

from infinitystar.generation import extend_stream, start_stream
from infinitystar.media import export_to_video
from infinitystar.runtime import UserError


def clip_path(out: Path, index: int) -> Path:
    return out.with_name(f"{out.stem}_clip{index:03d}{out.suffix}")


def _lines(stream: TextIO, ask: bool) -> Iterable[str]:
    k = 1
    while True:
        if ask:
            print(f"clip {k}> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()        # readline, not iteration: a pipe's lines are handled as they arrive
        if not line:
            return
        yield line.rstrip("\r\n")
        k += 1


def run(pipe, out: Path, *, seed: int, guidance_scale: Optional[float], temperature: Optional[float],
        inference: Optional[str], image: Optional[str], video: Optional[str], as_json: bool,
        stdin: Optional[TextIO] = None) -> int:
    stdin = stdin or sys.stdin
    stream = None
    for k, prompt in enumerate(_lines(stdin, ask=stdin.isatty()), 1):
        if not prompt.strip():
            kept = f"; the {k - 1} clip(s) written so far are kept in {out}" if k > 1 else ""
            raise UserError(f"line {k} of the input is empty: give one non-empty prompt per line{kept}")
        if stream is None:
            stream, notes = start_stream(pipe, prompt, inference=inference, image=image, video=video,
                                         guidance_scale=guidance_scale, temperature=temperature, seed=seed)
            clip = stream.clips[-1]
        else:
            clip, notes = extend_stream(stream, prompt)
        for note in notes:                   # e.g. an unknown word
            print(f"note: clip {k}: {note}", file=sys.stderr)
        path = clip_path(out, k)
        export_to_video(clip, path, fps=pipe.defaults.fps)
        whole = stream.video()
        export_to_video(whole, out, fps=pipe.defaults.fps)
        info = {"clip": k, "prompt": prompt, "clip_file": str(path), "clip_frames": int(len(clip)),
                "output": str(out), "frames": int(len(whole)), "seconds": round(stream.timings[-1]["seconds"], 3)}
        print(json.dumps(info) if as_json else f"clip {k}: {len(clip)} frames -> {path}; {out} now has "
              f"{len(whole)} frames ({info['seconds']:.2f} s)", flush=True)
    if stream is None:
        raise UserError("no prompt on standard input: give one prompt per line (one line per clip)")
    return 0
