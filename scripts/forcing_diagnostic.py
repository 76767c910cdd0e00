"""Which scale spoils a sample: force the ground-truth bits of the first k steps, sample the rest with the model's
default settings, and judge every attribute with the reference decoder, for every k.

k = 0 is plain generation; k = all steps is the tokenizer round trip. The k where an attribute's accuracy jumps
is the step that decides it; a change to the model or the pyramid should move accuracy at the k it targets.
--flip P flips a share P of the forced bits first: how well the later steps correct a corrupted context (what
bitwise self-correction trains for).

    python scripts/forcing_diagnostic.py [--model DIR] [--n 12] [--seed 3] [--k 0 8 ...] [--flip 0.05] [--out F]
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.quant.residual import encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.shapes.benchmark import build_items
from infinitystar.shapes.evaluate import score_image, score_video
from infinitystar.shapes.world import render
from infinitystar.tokenizer.training_eval import frames_to_video, video_to_frames

ATTRIBUTES = ("background", "color", "shape", "size", "direction", "speed")


def run_task(pipe: InfinityStarPipeline, task: str, n: int, seed: int, guidance_scale, greedy: bool,
             ks=None, flip: float = 0.0) -> dict:
    items = build_items(task, n, seed)
    frames = items[0].num_frames
    schedule = pipe.pyramid.build(frames)
    d = pipe.defaults
    guidance = d.guidance_config(guidance_scale)
    cfg = guidance.scale
    tau = [d.tau_image if s.clip == 0 else d.tau_video for s in schedule.scales]
    truth = np.stack([render(it.spec, frames) for it in items])
    prompts = [it.prompts if isinstance(it.prompts, str) else it.prompts[0] for it in items]
    with torch.no_grad():
        targets = encode_targets(pipe.tokenizer.encode(frames_to_video(truth).to(pipe.device)), schedule)
        feats, mask = pipe.text_encoder.encode(prompts, pipe.device)
    table = []
    for k in range(len(schedule.steps) + 1):
        if ks is not None and k not in ks:
            continue
        g_flip = torch.Generator().manual_seed(seed + 1)
        forced = [b ^ (torch.rand(b.shape, generator=g_flip) < flip).to(b.device, b.dtype) for b in targets.bits[:k]]
        g = torch.Generator().manual_seed(seed)
        out = generate(pipe.transformer, schedule, Caption(feats, mask), guidance=guidance, tau=tau, generator=g,
                       greedy=greedy, prefix_bits=forced)
        with torch.no_grad():
            video = video_to_frames(pipe.tokenizer.decode(out.codes).clamp(-1, 1))
        scores = [score_image(v[0], p) if frames == 1 else score_video(v, p, task="t2v")
                  for v, p in zip(video, prompts)]
        step = schedule.steps[k - 1] if k else None
        row = {"k": k, "forced_through": None if step is None else
               f"clip {step.scale.clip} scale {step.scale.in_clip} {step.scale.shape}",
               "all_correct": sum(s.all_correct for s in scores) / n}
        for a in ATTRIBUTES:
            vals = [s.correct[a] for s in scores if a in s.correct]
            if vals:
                row[a] = sum(vals) / len(vals)
        table.append(row)
    return {"task": task, "frames": frames, "guidance_scale": cfg, "greedy": greedy, "flip": flip, "table": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=3, help="prompt seed (keep it apart from the evaluation's 0)")
    ap.add_argument("--guidance-scale", type=float, default=None, help="default: the model's")
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--tasks", nargs="+", default=["t2i", "t2v"], choices=["t2i", "t2v"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=None, help="only these k (default: every k)")
    ap.add_argument("--flip", type=float, default=0.0, help="flip this share of the forced bits (0-1)")
    ap.add_argument("--out", default=None, help="write the full report as JSON")
    a = ap.parse_args(argv)
    if not 0.0 <= a.flip <= 1.0:
        ap.error(f"--flip must be between 0 and 1, got {a.flip}")
    torch.set_num_threads(a.threads)
    pipe = InfinityStarPipeline.from_pretrained(a.model)
    report = [run_task(pipe, t, a.n, a.seed, a.guidance_scale, a.greedy, a.k, a.flip) for t in a.tasks]
    for r in report:
        print(f"{r['task']} ({r['frames']} frames, guidance {r['guidance_scale']}{', greedy' if a.greedy else ''}),"
              f" accuracy over {a.n} prompts with the first k steps forced"
              f"{f' ({a.flip:g} of their bits flipped)' if a.flip else ''}:")
        cols = ["all_correct", *[c for c in ATTRIBUTES if c in r["table"][0]]]
        print(f"{'k':>3} {'forced through':<26} " + " ".join(f"{c[:9]:>9}" for c in cols))
        for row in r["table"]:
            print(f"{row['k']:>3} {row['forced_through'] or '-':<26} " +
                  " ".join(f"{row[c]:>9.2f}" for c in cols))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
