"""How much of Shapes World survives the tokenizer alone: encode, quantize with all scales, decode the rendered
ground truth of `infinitystar eval shapes`' text-to-video (and text-to-image) prompts, and judge the round trip
with the same decoder. This is the ceiling the generator can reach with that tokenizer.

    python scripts/tokenizer_ceiling.py src/infinitystar/weights/default/tokenizer --n 200
    python scripts/tokenizer_ceiling.py RUN/model --continuous --n 48     # a continuous stage, before quantization
    python scripts/tokenizer_ceiling.py RUN/model --scales 6 --n 48       # decoded from each clip's first 6 scales

`--scales K` measures what the coarse scales carry on their own: a generator's last scales are its hardest to
predict, so a tokenizer whose coarse prefix already shows the object's colour, size and place is easier to
generate with (docs/default_model.md).

`--upscale 2 --pyramid P.json` encodes every frame enlarged 2x (pixel copies) and judges the reconstruction
averaged back down to 64 x 64: an 8x tokenizer used as a 4x one, with the pyramid P's finer scales (e.g. up to
16 x 16 latents).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.shapes.benchmark import build_items
from infinitystar.shapes.evaluate import aggregate, score_image, score_video
from infinitystar.shapes.world import render
from infinitystar.tokenizer.training_eval import frames_to_video, psnr, reconstruct, video_to_frames
from infinitystar.tokenizer.video_vae import VideoVAE


def shrink(frames: np.ndarray, k: int) -> np.ndarray:
    """(T, kH, kW, 3) uint8 -> (T, H, W, 3): the mean of each k x k block, rounded."""
    if k == 1:
        return frames
    t, h, w, c = frames.shape
    blocks = frames.reshape(t, h // k, k, w // k, k, c).astype(np.float64).mean(axis=(2, 4))
    return np.clip(np.round(blocks), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", help="VideoVAE folder")
    ap.add_argument("--pyramid", help="pyramid JSON (default: TOKENIZER/pyramid.json or the model_index.json next "
                                      "to the folder)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--continuous", action="store_true",
                    help="decode the posterior mean without quantizing (a continuous stage's ceiling)")
    ap.add_argument("--scales", type=int, default=None,
                    help="quantize with only the first K scales of every clip (default: all)")
    ap.add_argument("--upscale", type=int, default=1,
                    help="enlarge frames by this integer factor before encoding, average the output back down")
    a = ap.parse_args(argv)
    if a.upscale < 1:
        ap.error(f"--upscale must be a positive integer, got {a.upscale}")
    if a.continuous and a.scales is not None:
        ap.error("--scales needs the quantizer; it does not go with --continuous")
    torch.set_num_threads(a.threads)
    from pathlib import Path
    d = Path(a.tokenizer)
    if a.pyramid:
        pyr = json.loads(Path(a.pyramid).read_text())
    elif (d / "pyramid.json").is_file():
        pyr = json.loads((d / "pyramid.json").read_text())
    else:
        pyr = json.loads((d.parent / "model_index.json").read_text())["pyramid"]
    pyramid = None if a.continuous else PyramidConfig.from_dict(pyr)
    model = VideoVAE.from_pretrained(d).eval()
    scores, ps = [], []
    for task in ("t2i", "t2v"):
        for it in build_items(task, a.n, a.seed):
            truth = render(it.spec, it.num_frames)
            big = truth.repeat(a.upscale, axis=1).repeat(a.upscale, axis=2)
            rec = video_to_frames(reconstruct(model, frames_to_video(big), pyramid, a.scales).clamp(-1, 1))[0]
            rec = shrink(rec, a.upscale)
            ps.append(psnr(truth, rec))
            scores.append(score_image(rec[0], it.prompts) if task == "t2i" else score_video(rec, it.prompts, task=task))
    res = aggregate(scores)
    out = {"psnr": float(np.mean(ps)), **{t: {s: res["by_task"][t][s] for s in ("seen", "heldout", "overall")}
                                           for t in ("t2i", "t2v")}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
