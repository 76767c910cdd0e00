"""How much of Shapes World survives the tokenizer alone: encode, quantize with all scales, decode the rendered
ground truth of `infinitystar eval shapes`' text-to-video (and text-to-image) prompts, and judge the round trip
with the same decoder. This is the ceiling the generator can reach with that tokenizer.

    python scripts/tokenizer_ceiling.py src/infinitystar/weights/default/tokenizer --n 200
    python scripts/tokenizer_ceiling.py RUN/model --continuous --n 48     # a continuous stage, before quantization
    python scripts/tokenizer_ceiling.py RUN/model --scales 6 --n 48       # decoded from each clip's first 6 scales

`--scales K` measures what the coarse scales carry on their own: a generator's last scales are its hardest to
predict, so a tokenizer whose coarse prefix already shows the object's colour, size and place is easier to
generate with (docs/default_model_log.md).
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
    a = ap.parse_args(argv)
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
            rec = video_to_frames(reconstruct(model, frames_to_video(truth), pyramid, a.scales).clamp(-1, 1))[0]
            ps.append(psnr(truth, rec))
            scores.append(score_image(rec[0], it.prompts) if task == "t2i" else score_video(rec, it.prompts, task=task))
    res = aggregate(scores)
    out = {"psnr": float(np.mean(ps)), **{t: {s: res["by_task"][t][s] for s in ("seen", "heldout", "overall")}
                                           for t in ("t2i", "t2v")}}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
