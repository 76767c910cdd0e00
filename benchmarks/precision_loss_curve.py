"""Training quality under bf16 autocast: the same generator run twice from the same seed and on the same batches,
once in fp32 and once in the `auto` precision, with both loss curves written out.

    python benchmarks/precision_loss_curve.py [--config configs/tiny_generator.yaml] [--steps 300] [--out FILE]

Data: Shapes World images and 17-frame videos rendered from a fixed seed, encoded once (fp32) by the shipped
default model's tokenizer and captioned by its text encoder (frozen). Model and training settings: the run config's generator
(configs/tiny_generator.yaml by default: width 64, depth 2, the tiny pyramid), its scale subsets,
self-correction, text dropout and packing, AdamW at its learning rate with 20 warm-up steps, micro-batch 4. The summary compares the final
models' loss on 16 fixed held-out batches (fp32, no text dropout; a training batch's loss is too noisy to compare
runs by) and the mean training loss of the last 50 steps. A third run, fp32 from the next seed (another init and
batch order), shows how far two fp32 runs land apart. With --seeds N, fp32 and auto each run from N seeds and
their mean losses are compared (a single pair's difference is within the spread of fp32 runs across seeds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from infinitystar.model.infinitystar import InfinityStarTransformer
from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.runtime import autocast, precision_name, resolve_device, resolve_precision
from infinitystar.shapes.data import iter_samples
from infinitystar.train.config import load_config
from infinitystar.train.targets import PackedTrainModule, pack_batch, packed_loss, prepare_sample

REPO = Path(__file__).resolve().parents[1]


def encode_pool(pipe, n: int, seed: int, device):
    """(latent, caption features) of n rendered samples."""
    pool = []
    for s in iter_samples(seed, kinds=("image", "video"), video_frames=(17,), limit=n):
        video = torch.from_numpy(s["frames"]).permute(3, 0, 1, 2)[None].float().div(127.5).sub(1).to(device)
        with torch.no_grad():
            z = pipe.tokenizer.encode(video)[0]
            feats, mask = pipe.text_encoder.encode([s["caption"]], device)
        pool.append((z, feats[0, :int(mask[0].sum())] if mask is not None else feats[0]))
    return pool


def make_batch(run, pool, picks, gen, device, text_dropout: float):
    t, cfg, pyramid = run.train, run.model.build(), run.pyramid.build()
    samples, texts = [], []
    for i in picks:
        z, text = pool[i]
        schedule = pyramid.build(1 + 4 * (z.shape[1] - 1))
        samples.append(prepare_sample(z, schedule, ["x"], [0] * schedule.num_clips, gen, subset=t.scale_subset,
                                      bsc_strength=t.bsc_strength, repetition=t.repetition, text_dropout=text_dropout,
                                      reweight_by_scale=t.reweight_by_scale, max_reweight=t.max_reweight))
        texts.append([text])
    return pack_batch(samples, texts, cfg.text_maxlen, t.pad_multiple, device)


@torch.no_grad()
def held_out_loss(module, run, pool, micro_batch: int, device) -> float:
    losses = []
    for k in range(16):
        gen = torch.Generator().manual_seed(10 ** 6 + k)
        picks = torch.randint(len(pool), (micro_batch,), generator=gen).tolist()
        batch = make_batch(run, pool, picks, gen, device, text_dropout=0.0)
        logits, anchor = module(batch.x_visual, batch.captions, batch.packed)
        losses.append(float(packed_loss(logits, batch, anchor).loss))
    return statistics.mean(losses)


def train_run(run, pool, held_out, precision: str, steps: int, micro_batch: int, seed: int, device) -> dict:
    dtype = resolve_precision(precision, device)
    cfg = run.model.build()
    torch.manual_seed(seed)
    model = InfinityStarTransformer(cfg).to(device).train()
    module = PackedTrainModule(model)
    opt = torch.optim.AdamW(model.parameters(), lr=run.optim.lr, betas=tuple(run.optim.betas),
                            weight_decay=run.optim.weight_decay)
    order = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = run.optim.lr * min(1.0, (step + 1) / 20)
        picks = torch.randint(len(pool), (micro_batch,), generator=order).tolist()
        batch = make_batch(run, pool, picks, torch.Generator().manual_seed(seed * 100003 + step), device,
                           run.train.text_dropout)
        with autocast(device, dtype):
            logits, anchor = module(batch.x_visual, batch.captions, batch.packed)
        out = packed_loss(logits, batch, anchor)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    return {"precision": precision_name(dtype), "losses": losses, "seconds": time.perf_counter() - t0,
            "held_out_loss": held_out_loss(module, run, held_out, micro_batch, device),
            "train_mean_last_50": statistics.mean(losses[-50:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny_generator.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--samples", type=int, default=256, help="rendered samples in the pool")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="N > 1: fp32 and auto from each of N seeds (seed, seed + 1, ...), compared by their means")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("precision_loss_curve.json"))
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    run = load_config(a.config)
    pipe = InfinityStarPipeline.from_pretrained("default", device=device)
    pool = encode_pool(pipe, a.samples, a.seed, device)
    held_out = encode_pool(pipe, 32, a.seed + 1, device)
    if a.seeds > 1:
        return paired_seeds(a, run, pool, held_out, device)
    runs = [train_run(run, pool, held_out, prec, a.steps, a.micro_batch, seed, device)
            for prec, seed in (("fp32", a.seed), ("auto", a.seed), ("fp32", a.seed + 1))]
    labels = ["fp32", runs[1]["precision"], "fp32_next_seed"]
    summary = {"config": str(a.config), "steps": a.steps, "micro_batch": a.micro_batch,
               "threads": torch.get_num_threads(), "seconds": dict(zip(labels, (round(r["seconds"], 1) for r in runs)))}
    for key in ("held_out_loss", "train_mean_last_50"):
        ref = runs[0][key]
        summary[key] = {label: round(r[key], 4) for label, r in zip(labels, runs)}
        summary[key].update({f"{label}_relative_difference": round((r[key] - ref) / ref, 4)
                             for label, r in zip(labels[1:], runs[1:])})
    a.out.write_text(json.dumps({"summary": summary, "runs": runs}))
    print(json.dumps(summary))
    return 0


def paired_seeds(a, run, pool, held_out, device) -> int:
    """fp32 and `auto` from each of --seeds seeds: the mean of each precision's losses, their relative
    difference, and the per-seed differences beside the spread of the fp32 runs across seeds."""
    runs = [train_run(run, pool, held_out, prec, a.steps, a.micro_batch, seed, device)
            for seed in range(a.seed, a.seed + a.seeds) for prec in ("fp32", "auto")]
    fp32, auto = runs[0::2], runs[1::2]
    summary = {"config": str(a.config), "steps": a.steps, "micro_batch": a.micro_batch,
               "threads": torch.get_num_threads(), "seeds": list(range(a.seed, a.seed + a.seeds)),
               "auto_precision": auto[0]["precision"]}
    for key in ("held_out_loss", "train_mean_last_50"):
        f, b = [r[key] for r in fp32], [r[key] for r in auto]
        summary[key] = {"fp32": [round(x, 4) for x in f], "auto": [round(x, 4) for x in b],
                        "fp32_mean": round(statistics.mean(f), 4), "auto_mean": round(statistics.mean(b), 4),
                        "relative_difference_of_means": round(statistics.mean(b) / statistics.mean(f) - 1, 4),
                        "per_seed_relative_difference": [round(y / x - 1, 4) for x, y in zip(f, b)],
                        "fp32_relative_spread": round(statistics.stdev(f) / statistics.mean(f), 4)}
    a.out.write_text(json.dumps({"summary": summary, "runs": runs}))
    print(json.dumps(summary))
    return 0
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
