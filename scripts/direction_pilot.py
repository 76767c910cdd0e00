"""Can the generator learn the direction (or shape) word? Data and judge of the motion and shape pilots
(docs/default_model_log.md).

    python scripts/direction_pilot.py data OUT [--vary [--vary-only color,...]] [--n 1000] [--seed 5]
        17-frame videos moving `quickly` in each of the four directions or standing still (one fifth each), as a
        manifest OUT/videos.jsonl: one object (a large red square on black) at random starts, or with --vary random
        attributes of the training pairs. Train on it with any generator config (data.manifests).
    python scripts/direction_pilot.py eval MODEL [--vary] [--n 40] [--seed 0]
        Generate n prompts of the same kind (five directions in turn) and print one JSON line: the share whose
        decoded motion has the prompted direction (and colour, with --vary).

    --words motion (both commands): captions name the motion alone ("moving left quickly", "standing still"), so a
    run tells whether the generator can draw motion over varied objects when the text carries nothing else.
    --i2v (eval): the true first frame is given (image-to-video), so only the motion is asked of the model (with
    --words motion the model cannot know what to draw otherwise).
    --images (both commands): the shape pilot. Still images instead of videos (manifest OUT/images.jsonl); eval
    judges colour, shape, size and all four attributes with the background instead of the direction.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from infinitystar.media import save_image
from infinitystar.shapes.world import (HELD_OUT_PAIRS, Motion, ShapeSpec, caption_image, caption_video, fits_canvas,
                                      render, sample_attributes)

DIRECTIONS = ("left", "right", "up", "down", "still")
ONE_OBJECT = {"color": "red", "shape": "square", "size": "large", "background": "black"}


def spec_for(rng: np.random.Generator, direction: str, vary: bool, only: tuple[str, ...] = ()) -> ShapeSpec:
    """A random start (and with `vary`, random attributes of training pairs; with `only` too, just those attributes
    random, the others the one object's) that keeps the object inside for 17 frames."""
    motion = Motion(direction, None if direction == "still" else "quickly")
    frames = 1 if direction == "still" else 17
    while True:
        a = sample_attributes(rng, "train") if vary else ONE_OBJECT
        if vary and only:
            a = {k: a[k] if k in only else v for k, v in ONE_OBJECT.items()}
            if (a["color"], a["shape"]) in HELD_OUT_PAIRS:
                continue
        spec = ShapeSpec(a["color"], a["shape"], a["size"], a["background"], float(rng.integers(6, 59)),
                         float(rng.integers(6, 59)), (motion,))
        if fits_canvas(spec, frames):
            return spec


def caption_for(spec: ShapeSpec, words: str, images: bool = False) -> str:
    if images:
        return caption_image(spec)
    if words == "all":
        return caption_video(spec)
    motion = spec.segments[0]
    return "standing still" if motion.direction == "still" else f"moving {motion.direction} {motion.speed}"


def direction_of(i: int, images: bool) -> str:
    return "still" if images else DIRECTIONS[i % len(DIRECTIONS)]


def write_data(out: Path, n: int, seed: int, vary: bool, words: str = "all", only: tuple[str, ...] = (),
               images: bool = False) -> Path:
    kind = "images" if images else "videos"
    (out / kind).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        spec = spec_for(rng, direction_of(i, images), vary, only)
        caption = caption_for(spec, words, images)
        if images:
            path = save_image(render(spec, 1)[0], out / kind / f"{i:06d}.png")
            lines.append({"image_path": str(Path(path).resolve()), "text": caption, "h_div_w": 1.0})
        else:
            path = out / kind / f"{i:06d}.npy"
            np.save(path, render(spec, 17))
            lines.append({"video_path": str(path.resolve()), "begin_frame_id": 0, "end_frame_id": 17, "fps": 16,
                          "caption": caption, "h_div_w": 1.0})
    manifest = out / f"{kind}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def judge(model: str, n: int, seed: int, vary: bool, batch: int = 8, words: str = "all", i2v: bool = False,
          only: tuple[str, ...] = (), images: bool = False) -> dict:
    from infinitystar.pipelines import InfinityStarPipeline
    from infinitystar.shapes.decoder import decode_frame, decode_video
    pipe = InfinityStarPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    specs = [spec_for(rng, direction_of(i, images), vary, only) for i in range(n)]
    right = dict.fromkeys(("shape", "size", "all") if images else ("direction",), 0) | {"color": 0}
    for start in range(0, n, batch):
        part = specs[start:start + batch]
        image = [render(s, 1)[0] for s in part] if i2v else None
        frames = pipe([caption_for(s, words, images) for s in part], num_frames=1 if images else 17, image=image,
                      generator=torch.Generator().manual_seed(seed + start)).frames
        for f, s in zip(frames, part):
            if images:
                got = decode_frame(np.asarray(f)[0])      # (1, H, W, 3): the one frame
                ok = {a: getattr(got, a) == getattr(s, a) for a in ("color", "shape", "size", "background")}
                right["all"] += all(ok.values())
                for a in ("color", "shape", "size"):
                    right[a] += ok[a]
            else:
                got = decode_video(np.asarray(f))
                right["direction"] += got.direction == s.segments[0].direction
                right["color"] += got.color == s.color
    return {"model": model, "n": n, "vary": vary, "words": words, "i2v": i2v, "images": images} | {
        k: v / n for k, v in right.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out", type=Path)
    d.add_argument("--n", type=int, default=1000)
    d.add_argument("--seed", type=int, default=5)
    d.add_argument("--vary", action="store_true")
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("--n", type=int, default=40)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--vary", action="store_true")
    e.add_argument("--i2v", action="store_true")
    for q in (d, e):
        q.add_argument("--images", action="store_true", help="still images: the shape pilot")
        q.add_argument("--words", choices=("all", "motion"), default="all")
        q.add_argument("--vary-only", default="", help="with --vary: only these attributes vary (comma-separated, "
                       "of color, shape, size, background)")
    a = p.parse_args(argv)
    only = tuple(x for x in a.vary_only.split(",") if x)
    unknown = set(only) - set(ONE_OBJECT)
    if unknown or (only and not a.vary):
        p.error(f"--vary-only takes {', '.join(ONE_OBJECT)} and needs --vary" + (f"; got {', '.join(sorted(unknown))}"
                                                                                if unknown else ""))
    if a.images and (a.words != "all" or getattr(a, "i2v", False)):
        p.error("--images takes neither --words motion nor --i2v")
    if a.cmd == "data":
        print(write_data(a.out, a.n, a.seed, a.vary, a.words, only, a.images))
    else:
        print(json.dumps(judge(a.model, a.n, a.seed, a.vary, words=a.words, i2v=a.i2v, only=only,
                               images=a.images)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
