"""`infinitystar eval shapes`: seeded prompts for the five tasks, generated in batches, judged by the reference
decoder of Shapes World.

Tasks and their inputs (evaluation prompts are drawn uniformly over all attributes, held-out (color, shape)
pairs included; results are reported for seen and held-out pairs separately):
  t2i           an image caption -> 1 frame
  t2v           a video caption -> 17 frames
  i2v           the rendered first frame + a caption describing it and a motion -> 17 frames
  continuation  the first 17 rendered frames of a 33-frame video (slowly or still) + its caption -> 33 frames
  long          two segment captions (same object, different motions) -> 33 frames; the second half must follow
                the second caption (prompt switching)
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from infinitystar.shapes.evaluate import TASKS, aggregate, save_grid, score_image, score_video
from infinitystar.shapes.world import (
    ShapeSpec, caption_image, caption_video, captions_per_segment, render, sample_image, sample_long_video,
    sample_video,
)

TASK_FRAMES = {"t2i": 1, "t2v": 17, "i2v": 17, "continuation": 33, "long": 33}


@dataclass
class EvalItem:
    task: str
    spec: ShapeSpec
    prompts: list[str]
    num_frames: int
    condition: Optional[np.ndarray] = None      # given frames (i2v: 1, continuation: 17)


def build_items(task: str, n: int, seed: int) -> list[EvalItem]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    rng = np.random.default_rng([seed, TASKS.index(task)])
    items = []
    for _ in range(n):
        if task == "t2i":
            spec = sample_image(rng, "all")
            items.append(EvalItem(task, spec, [caption_image(spec)], 1))
        elif task == "t2v":
            spec = sample_video(rng, 17, "all")
            items.append(EvalItem(task, spec, [caption_video(spec)], 17))
        elif task == "i2v":
            spec = sample_video(rng, 17, "all")
            items.append(EvalItem(task, spec, [caption_video(spec)], 17, render(spec, 1)))
        elif task == "continuation":
            spec = sample_video(rng, 33, "all")
            items.append(EvalItem(task, spec, [caption_video(spec)], 33, render(spec, 33)[:17]))
        else:
            spec = sample_long_video(rng, 33, "all", distinct_consecutive=True)
            items.append(EvalItem(task, spec, captions_per_segment(spec), 33))
    return items


Generator = Callable[[list[EvalItem], int], list[np.ndarray]]


def pipeline_generator(pipe, guidance_scale: Optional[float] = None) -> Generator:
    """Adapt an InfinityStarPipeline: a batch of items of one task (same frame count) -> frames per item."""
    def run(items: list[EvalItem], seed: int) -> list[np.ndarray]:
        kw = {}
        if items[0].task == "i2v":
            kw["image"] = [it.condition[0] for it in items]
        elif items[0].task == "continuation":
            kw["video"] = [it.condition for it in items]
        prompts = [it.prompts for it in items]
        g = torch.Generator(device="cpu").manual_seed(seed)
        return list(pipe(prompts, num_frames=items[0].num_frames, guidance_scale=guidance_scale, generator=g,
                         output_type="uint8", **kw).frames)
    return run


def infinity_generator(pipe, guidance_scale: Optional[float] = None, temperature: Optional[float] = None
                       ) -> Generator:
    """Adapt an InfinityPipeline (text-to-image only): a batch of t2i items -> one frame (1, H, W, 3) per item."""
    def run(items: list[EvalItem], seed: int) -> list[np.ndarray]:
        if any(it.task != "t2i" for it in items):
            raise ValueError("an Infinity (text-to-image) pipeline runs the t2i task only")
        g = torch.Generator(device="cpu").manual_seed(seed)
        out = pipe([it.prompts[0] for it in items], guidance_scale=guidance_scale, temperature=temperature,
                   generator=g, output_type="uint8")
        return [img[None] for img in out.images]
    return run


def _json_scalar(x):
    """numpy scalars and arrays in decoded records -> plain JSON values."""
    return x.tolist() if hasattr(x, "tolist") else str(x)


# sampling rounds of one prompt set draw from seeds this far apart (batch offsets stay below it)
ROUND_SEED_STRIDE = 1_000_000_007


def evaluate(generate_batch: Generator, n_per_task: int = 200, seed: int = 0, tasks: Sequence[str] = TASKS,
             batch_size: int = 25, out_dir: Optional[Path] = None, progress: bool = True,
             grid_per_task: int = 6, samples_per_prompt: int = 1) -> dict:
    """Generate and score every task; write `results.json`, `samples.jsonl` (one judged sample per line: prompts,
    what the decoder read, which attributes were right, the sampling round) and `grid.png` (the first
    `grid_per_task` samples of each task) to out_dir when given.

    samples_per_prompt > 1 samples every prompt that many times (round r adds r * ROUND_SEED_STRIDE to the sampling
    seeds; round 0 is the single-sample evaluation) and averages over all of them: one sample per prompt varies by
    several points between sampling seeds. Each task then also reports every round's all-correct rate and the
    share of prompts with at least one all-correct sample."""
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    all_scores, rounds, grid, grid_caps, timings = [], [], [], [], {}
    for task in tasks:
        items = build_items(task, n_per_task, seed)
        t0 = time.perf_counter()
        bar = tqdm(total=len(items) * samples_per_prompt, desc=f"eval {task}", disable=not progress, leave=False)
        for r in range(samples_per_prompt):
            for b in range(0, len(items), batch_size):
                batch = items[b:b + batch_size]
                frames = generate_batch(batch, seed * 100003 + TASKS.index(task) * 1009 + b + r * ROUND_SEED_STRIDE)
                for it, fr in zip(batch, frames):
                    if task == "t2i":
                        s = score_image(fr[0], it.prompts)
                    else:
                        s = score_video(fr, it.prompts, condition_frames=it.condition, task=task)
                    all_scores.append(s)
                    rounds.append(r)
                    if r == 0 and len([c for c in grid_caps if c[0] == task]) < grid_per_task:
                        grid.append(fr)
                        grid_caps.append((task, f"{task}: " + " | ".join(it.prompts)))
                bar.update(len(batch))
        bar.close()
        timings[task] = {"seconds": time.perf_counter() - t0, "samples": len(items) * samples_per_prompt}
    result = {"n_per_task": n_per_task, "seed": seed, "samples_per_prompt": samples_per_prompt, "timings": timings,
              **aggregate(all_scores)}
    if samples_per_prompt > 1:
        for task in tasks:   # a task's scores run round by round, prompts in order within a round
            ok = np.array([s.all_correct for s in all_scores if s.task == task]).reshape(samples_per_prompt, -1)
            result["by_task"][task].update(all_correct_per_round=ok.mean(1).round(4).tolist(),
                                           prompts_with_a_correct_sample=float(ok.any(0).mean()))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(result, indent=1))
        with open(out_dir / "samples.jsonl", "w") as f:
            for s, r in zip(all_scores, rounds):
                f.write(json.dumps({**asdict(s), "round": r}, default=_json_scalar) + "\n")
        # images side by side; a video is a strip of frames, two per row
        save_grid(out_dir / "grid.png", grid, [c for _, c in grid_caps],
                  columns=8 if all(len(g) == 1 for g in grid) else 2)
    return result
