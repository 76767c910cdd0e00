"""Round trip of the Shapes World evaluation images through a trained 2-D tokenizer (docs/infinity.md).

Renders the ground-truth images of the `infinitystar eval shapes --tasks t2i --n N --seed S` prompts, encodes,
quantizes (every scale of the tokenizer's schedule) and decodes them, and judges the reconstructions with the same
reference decoder as the evaluation. This is the ceiling a generator using this tokenizer can reach.

    python scripts/infinity_shapes_roundtrip.py runs/infinity_shapes/tokenizer/model \
        runs/infinity_shapes/tokenizer_decoder/model [--n 200] [--seed 0] [--out roundtrip.json]

Prints one JSON object per tokenizer folder: mean per-image PSNR (uint8, dB) and the evaluation's summary
(overall / seen / held-out: n, all_correct, per-attribute accuracy).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from infinitystar.shapes.benchmark import build_items
from infinitystar.shapes.evaluate import aggregate, score_image
from infinitystar.shapes.world import render
from infinitystar.train.infinity_tokenizer import SCALES_FILE, SHAPES_SCALES, reconstruct_images
from infinitystar.tokenizer.infinity_vae import InfinityVAE
from infinitystar.tokenizer.training_eval import frames_to_video, psnr, video_to_frames


def roundtrip(folder: Path, n: int, seed: int, batch: int = 50) -> dict:
    vae = InfinityVAE.from_pretrained(folder)
    scales_file = folder / SCALES_FILE
    scales = json.loads(scales_file.read_text())["scales"] if scales_file.is_file() else SHAPES_SCALES
    items = build_items("t2i", n, seed)                 # the evaluation's prompts, in its order
    refs = [render(it.spec, 1) for it in items]         # (1, 64, 64, 3) uint8 each
    recs = []
    for i in range(0, n, batch):
        images = frames_to_video(refs[i:i + batch], "cpu")[:, :, 0]
        recs.extend(video_to_frames(reconstruct_images(vae, images, scales).unsqueeze(2)))
    summary = aggregate([score_image(r[0], it.prompts) for it, r in zip(items, recs)])
    return {"tokenizer": str(folder), "n": n, "seed": seed,
            "psnr": round(sum(psnr(a, b) for a, b in zip(refs, recs)) / n, 3),
            **{k: summary[k] for k in ("overall", "seen", "heldout")}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tokenizers", nargs="+", type=Path, help="InfinityVAE folders")
    p.add_argument("--n", type=int, default=200, help="evaluation prompts (as eval shapes --n)")
    p.add_argument("--seed", type=int, default=0, help="as eval shapes --seed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, help="also write the results (a JSON list) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for folder in args.tokenizers:
        if not (folder / "config.json").is_file():
            raise SystemExit(f"error: {folder} is not a tokenizer folder (no config.json)")
        results.append(roundtrip(folder, args.n, args.seed))
        print(json.dumps(results[-1]), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
