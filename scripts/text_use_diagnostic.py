"""Does the generator read each word of the prompt, and at which step? Teacher-force every step with the
ground-truth bits of rendered Shapes World prompts, then compare the conditional logits of the true prompt with
those of the same prompt with one word swapped (colour, shape, size, background, direction).

Per step it prints the greedy bit accuracy of the conditional and unconditional branches for the true prompt, and per
swapped word the mean |change| of the conditional logits. A word the model uses moves the logits of the steps that
decide it (colour at the 1x1 scale, motion at a clip's 2x2 and 3x3 scales); a word it ignores moves them about as
little as nothing does. Pair it with scripts/forcing_diagnostic.py, which shows which steps decide each attribute.

    python scripts/text_use_diagnostic.py [--model DIR] [--task t2v] [--n 24] [--seed 3] [--out report.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import torch

from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.quant.residual import encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.shapes.benchmark import build_items
from infinitystar.shapes.world import BACKGROUNDS, COLORS, SHAPES, SIZES, render
from infinitystar.tokenizer.training_eval import frames_to_video

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _next(options, word: str) -> str:
    options = list(options)
    return options[(options.index(word) + 1) % len(options)]


def swap_word(prompt: str, attribute: str) -> str | None:
    """The prompt with its `attribute` word replaced by another value; None where the prompt has no such word."""
    words = prompt.split()
    if attribute == "direction":
        if "moving" not in words:
            return None
        i = words.index("moving") + 1
        words[i] = OPPOSITE[words[i]]
    else:
        options = {"size": SIZES, "color": COLORS, "shape": SHAPES}.get(attribute)
        if attribute == "background":
            i = len(words) - 2                                   # "... on a {background} background"
            options = BACKGROUNDS
        else:
            i = next(j for j, w in enumerate(words) if w in options)
        words[i] = _next(options, words[i])
    return " ".join(words)


def bit_accuracy(logits: torch.Tensor, bits: torch.Tensor) -> float:
    pred = logits[..., 1] > logits[..., 0] if logits.shape[-1] == 2 else logits > 0
    return float((pred.reshape(bits.shape).to(bits.dtype) == bits).float().mean())


def run(pipe: InfinityStarPipeline, task: str, n: int, seed: int) -> dict:
    items = build_items(task, n, seed)
    prompts = [it.prompts if isinstance(it.prompts, str) else it.prompts[0] for it in items]
    frames = items[0].num_frames
    schedule = pipe.pyramid.build(frames)
    guidance = pipe.defaults.guidance_config()
    if not guidance.active(len(schedule.steps)):
        raise SystemExit("the model's default guidance is off: the unconditional branch is not computed")
    with torch.no_grad():
        truth = np.stack([render(it.spec, frames) for it in items])
        targets = encode_targets(pipe.tokenizer.encode(frames_to_video(truth).to(pipe.device)), schedule)

    def logits_of(ps: list[str]) -> list[dict]:
        feats, mask = pipe.text_encoder.encode(ps, pipe.device)
        return generate(pipe.transformer, schedule, Caption(feats, mask), guidance=guidance,
                        prefix_bits=targets.bits, record_logits=True,
                        generator=torch.Generator().manual_seed(0)).logits

    true = logits_of(prompts)
    rows = [{"step": f"clip {s.scale.clip} scale {s.scale.in_clip} {s.scale.shape}",
             "cond_accuracy": bit_accuracy(lg["cond"], bits), "uncond_accuracy": bit_accuracy(lg["uncond"], bits)}
            for s, lg, bits in zip(schedule.steps, true, targets.bits)]
    swaps = {}
    for attribute in ("color", "shape", "size", "background", "direction"):
        keep = [i for i, p in enumerate(prompts) if swap_word(p, attribute) is not None]
        if not keep:
            continue
        swapped = logits_of([swap_word(prompts[i], attribute) if i in keep else prompts[i]
                             for i in range(len(prompts))])
        swaps[attribute] = len(keep)
        for row, a, b in zip(rows, true, swapped):
            row[f"dlogit_{attribute}"] = float((a["cond"][keep] - b["cond"][keep]).abs().mean())
    return {"task": task, "n": n, "seed": seed, "swapped_prompts": swaps, "steps": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--task", default="t2v", choices=["t2i", "t2v"])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=3, help="prompt seed (keep it apart from the evaluation's 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the report as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(InfinityStarPipeline.from_pretrained(args.model), args.task, args.n, args.seed)
    cols = [k for k in report["steps"][0] if k != "step"]
    print(f"{args.task}, {args.n} prompts of seed {args.seed}; teacher-forced; prompts with each word swapped: "
          f"{report['swapped_prompts']}")
    print("step".ljust(26) + "".join(re.sub("_accuracy|dlogit_", "", c)[:10].rjust(11) for c in cols))
    for row in report["steps"]:
        print(row["step"].ljust(26) + "".join(f"{row[c]:11.3f}" for c in cols))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
