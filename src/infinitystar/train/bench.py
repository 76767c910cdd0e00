"""Training throughput of a small random-weight generator: tokens per second and achieved FLOP rate against the
machine's measured dense matmul rate. Used by `benchmarks/train_throughput.py` (and `infinitystar bench --train`).

FLOPs are the useful matmul work of the packed step: linear layers on every real token, attention scores and
values only over the (query, key) pairs the spacetime-sparse mask allows, embeddings and heads; a training step
counts 3x the forward (4x with activation checkpointing). Padding and masked-out attention pairs are not
counted, so a dense-mask kernel (SDPA on CPU) shows as a lower achieved rate, which is the point.
"""
from __future__ import annotations

import json
import time
from typing import Optional

import torch

from infinitystar.config import PyramidConfig, TransformerConfig
from infinitystar.model.packing import PackedSequence

BENCH_MODEL = dict(width=256, depth=4, num_heads=4, num_kv_heads=2, mlp_ratio=4.0, text_channels=64,
                   text_maxlen=64, null_text_len=64)
BENCH_PYRAMID = dict(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4], [8, 8], [12, 12]], frames_per_clip=4,
                     image_repetition=[2, 2, 1, 1, 1], video_repetition=[2, 1, 1, 1, 1], detail_min_tokens=64)
TEXT_TOKENS = 16


def packed_forward_flops(cfg: TransformerConfig, packed: PackedSequence) -> float:
    """Useful matmul FLOPs of one forward over a packed sequence (see the module docstring)."""
    C, H, KV, hd, I = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
    per_token = 2 * (C * H * hd + 2 * C * KV * hd + H * hd * C + 3 * C * I)
    lengths = torch.tensor(packed.segment_lengths[:-1], dtype=torch.float64)   # the last segment is padding
    table = packed.segment_table[:-1, :-1].to(torch.float64)
    pairs = float((lengths * (table @ lengths)).sum())
    real = packed.num_visual + packed.num_text
    flops = cfg.depth * (real * per_token + 4 * H * hd * pairs)
    flops += 2 * cfg.latent_channels * C * packed.num_visual + 2 * cfg.text_channels * C * packed.num_text
    flops += sum(2 * C * 2 * step.scale.bits * step.scale.tokens for _, step in packed.visual_segments)
    return float(flops)


def run_train_bench(device: Optional[str] = None, steps: int = 8, frames: int = 33, micro_batch: int = 1,
                    activation_checkpointing: bool = False, as_json: bool = False, seed: int = 0) -> dict:
    """Time `steps` optimizer steps (after 2 warm-up steps) on random latents and text; print and return a
    summary with tokens/s, achieved TFLOP/s and its share of the measured matmul rate."""
    from infinitystar.bench import matmul_rate
    from infinitystar.model.infinitystar import InfinityStarTransformer
    from infinitystar.train.config import ScaleSubsetConfig
    from infinitystar.train.metrics import peak_memory_mb
    from infinitystar.train.targets import PackedTrainModule, pack_batch, packed_loss, prepare_sample

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    cfg = TransformerConfig(**BENCH_MODEL)
    pyr = PyramidConfig(**BENCH_PYRAMID)
    schedule = pyr.build(frames)
    model = InfinityStarTransformer(cfg).to(dev).train()
    model.gradient_checkpointing = activation_checkpointing
    module = PackedTrainModule(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.97))
    bf16 = dev.type == "cuda"
    backend = "flex" if dev.type == "cuda" else "sdpa"
    h, w = schedule.full_hw
    z = torch.randn(micro_batch, cfg.latent_channels, schedule.num_latent_frames, h, w, device=dev)
    text = torch.randn(micro_batch, TEXT_TOKENS, cfg.text_channels, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(i: int):
        t0 = time.perf_counter()
        samples = [prepare_sample(z[b], schedule, ["x"], [0] * schedule.num_clips,
                                  torch.Generator().manual_seed(i * 1000 + b), subset=ScaleSubsetConfig("all"),
                                  text_dropout=0.1) for b in range(micro_batch)]
        batch = pack_batch(samples, [[text[b]] for b in range(micro_batch)], cfg.text_maxlen, 128, dev)
        sync()
        t1 = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits, anchor = module(batch.x_visual, batch.captions, batch.packed, backend)
        out = packed_loss(logits, batch, anchor)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return batch, t1 - t0, time.perf_counter() - t1

    for i in range(2):
        step(i)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    prep = model_s = 0.0
    tokens = flops = 0.0
    for i in range(steps):
        batch, tp, tm = step(100 + i)
        prep += tp
        model_s += tm
        tokens += batch.tokens
        flops += (4 if activation_checkpointing else 3) * packed_forward_flops(cfg, batch.packed)
    total = prep + model_s
    peak32 = matmul_rate(dev, torch.float32)
    result = {
        "device": str(dev), "precision": "bf16 autocast" if bf16 else "fp32", "attention": backend,
        "model": f"width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}/{cfg.num_kv_heads}",
        "frames": frames, "micro_batch": micro_batch, "activation_checkpointing": activation_checkpointing,
        "tokens_per_step": round(tokens / steps), "padded_length": batch.packed.length,
        "steps": steps, "step_s": round(total / steps, 4), "targets_s": round(prep / steps, 4),
        "tokens_per_s": round(tokens / total, 1),
        "achieved_tflops": round(flops / model_s / 1e12, 4),
        "matmul_fp32_tflops": round(peak32 / 1e12, 4),
        "fraction_of_fp32_matmul": round(flops / model_s / peak32, 4),
        "peak_memory_mb": round(peak_memory_mb(dev), 1),
    }
    if bf16:
        peak16 = matmul_rate(dev, torch.bfloat16)
        result["matmul_bf16_tflops"] = round(peak16 / 1e12, 4)
        result["fraction_of_bf16_matmul"] = round(flops / model_s / peak16, 4)
    if as_json:
        print(json.dumps(result))
    else:
        print(f"train throughput on {result['device']} ({result['precision']}, {backend}), {result['model']}, "
              f"{frames} frames x {micro_batch}: {result['tokens_per_s']:.0f} tokens/s, "
              f"{result['step_s'] * 1e3:.1f} ms/step ({result['targets_s'] * 1e3:.1f} ms building targets), "
              f"{result['achieved_tflops']:.3f} TFLOP/s useful = {100 * result['fraction_of_fp32_matmul']:.1f}% of the "
              f"measured fp32 matmul rate ({result['matmul_fp32_tflops']:.3f} TFLOP/s)"
              + (f", {100 * result['fraction_of_bf16_matmul']:.1f}% of bf16 ({result['matmul_bf16_tflops']:.1f})"
                 if bf16 else "") + f"; peak memory {result['peak_memory_mb']:.0f} MB")
    return result
