"""`infinitystar bench`: generation speed and memory of a small random-weight transformer, spacetime-sparse versus
dense block-causal attention, for 1, 2, 4 and 8 video clips, with the machine's measured matmul rate beside
the achieved FLOP rate. Each case runs in a fresh process so its peak memory is its own."""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import sys
import time
from dataclasses import dataclass

import torch

from infinitystar.config import PyramidConfig, TransformerConfig
from infinitystar.schedules.pyramid import Schedule

BENCH_MODEL = dict(width=256, depth=4, num_heads=4, num_kv_heads=2, mlp_ratio=4.0, text_channels=64, text_maxlen=64,
                   null_text_len=64)
BENCH_PYRAMID = dict(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4], [8, 8], [12, 12]], frames_per_clip=4,
                     image_repetition=[1] * 5, video_repetition=[1] * 5, detail_min_tokens=64)
TEXT_TOKENS = 16


def matmul_rate(device: torch.device, dtype=torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured dense matmul FLOP/s (best of repeated n x n products)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def generation_flops(cfg: TransformerConfig, schedule: Schedule, batch: int, text_tokens: int) -> float:
    """Matmul FLOPs of one generation (linear layers, attention scores and values, heads), CFG batch included."""
    C, H, KV, hd, I = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
    per_token_linear = 2 * (C * H * hd + 2 * C * KV * hd + H * hd * C + 3 * C * I)
    flops = cfg.depth * batch * text_tokens * (per_token_linear + 4 * text_tokens * H * hd)
    for step in schedule.steps:
        L = step.scale.tokens
        Lk = L + text_tokens + sum(schedule.scales[r].tokens for r in schedule.refs(step.scale.index))
        flops += batch * L * (cfg.depth * (per_token_linear + 4 * Lk * H * hd)
                              + 2 * cfg.latent_channels * C + 2 * C * 2 * step.scale.bits)
    return float(flops)


@dataclass
class CaseResult:
    attention: str
    clips: int
    frames: int
    steps: int
    seconds: float
    gflop: float
    kv_cache_mb: float
    peak_mb: float


def _run_case(attention: str, clips: int, device: str, conn) -> None:
    from infinitystar.model.infinitystar import InfinityStarTransformer
    from infinitystar.sampling.generate import Caption, generate

    torch.set_num_threads(torch.get_num_threads())
    dev = torch.device(device)
    cfg = TransformerConfig(**BENCH_MODEL)
    pyr = PyramidConfig(**BENCH_PYRAMID, attention=attention)
    frames = 1 + pyr.temporal_compression * pyr.frames_per_clip * clips
    schedule = pyr.build(frames)
    torch.manual_seed(0)
    model = InfinityStarTransformer(cfg).to(dev).eval()
    cap = Caption(torch.randn(1, TEXT_TOKENS, cfg.text_channels, device=dev))
    kw = dict(guidance_scale=3.0, generator=torch.Generator(device=dev).manual_seed(0))
    generate(model, PyramidConfig(**BENCH_PYRAMID).build(1), cap, **kw)           # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = generate(model, schedule, cap, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # KiB -> MiB (Linux)
    seconds = time.perf_counter() - t0
    conn.send(CaseResult(attention, clips, frames, len(schedule.steps), seconds,
                         generation_flops(cfg, schedule, 2, TEXT_TOKENS) / 1e9, out.peak_cache_bytes / 2 ** 20, peak))
    conn.close()


def run(clips=(1, 2, 4, 8), device: str | None = None, as_json: bool = False) -> list[CaseResult]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mp.get_context("spawn")
    results = []
    for n in clips:
        for attention in ("sparse", "dense"):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_run_case, args=(attention, n, device, child))
            p.start()
            results.append(parent.recv())
            p.join()
    peak = matmul_rate(torch.device(device))
    if as_json:
        for r in results:
            print(json.dumps({**r.__dict__, "gflops_per_s": r.gflop / r.seconds, "matmul_peak_gflops": peak / 1e9}))
        return results
    cfg = TransformerConfig(**BENCH_MODEL)
    print(f"device {device} ({torch.get_num_threads()} threads); model width {cfg.width}, depth {cfg.depth}, "
          f"heads {cfg.num_heads}/{cfg.num_kv_heads}; latent scales {BENCH_PYRAMID['custom_scales']}, "
          f"{BENCH_PYRAMID['frames_per_clip']} latent frames per clip, CFG batch 2, random weights")
    print(f"measured fp32 matmul rate: {peak / 1e9:.1f} GFLOP/s")
    print(f"{'clips':>5} {'frames':>6} {'attention':>9} {'steps':>5} {'time s':>8} {'GFLOP':>8} {'GFLOP/s':>8} "
          f"{'% peak':>6} {'KV MB':>7} {'peak MB':>8}")
    for r in results:
        rate = r.gflop / r.seconds
        print(f"{r.clips:>5} {r.frames:>6} {r.attention:>9} {r.steps:>5} {r.seconds:>8.2f} {r.gflop:>8.1f} "
              f"{rate:>8.1f} {100 * rate * 1e9 / peak:>5.1f}% {r.kv_cache_mb:>7.2f} {r.peak_mb:>8.0f}")
    by = {(r.attention, r.clips): r for r in results}
    print("dense / sparse time: " + ", ".join(
        f"{n} clips {by['dense', n].seconds / by['sparse', n].seconds:.2f}x" for n in clips))
    print("peak MB is the process's max RSS on CPU (torch itself included) or max allocated on CUDA")
    return results


def run_model(model: str = "default", num_frames: int = 17, repeats: int = 3, device: str | None = None,
              as_json: bool = False, prompt: str = "a large red circle moving right quickly on a black background"
              ) -> dict:
    """Wall time of one real generation with a model folder (the shipped default model by default), decoding
    included: one warm-up call, then the median of `repeats` calls (batch 1, CFG on, the model's defaults)."""
    import statistics
    from infinitystar.pipelines.infinitystar import InfinityStarPipeline
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = InfinityStarPipeline.from_pretrained(model, device=device)
    runs = []
    for i in range(repeats + 1):
        out = pipe(prompt, num_frames=num_frames, generator=torch.Generator().manual_seed(i), progress=False)
        if i:
            runs.append(out.timings)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    res = {"model": str(model), "device": device, "threads": torch.get_num_threads(), "frames": num_frames,
           **{k: round(v, 3) for k, v in med.items()},
           "matmul_peak_gflops": round(matmul_rate(torch.device(device)) / 1e9, 1)}
    if as_json:
        print(json.dumps(res))
    else:
        print(f"{model} on {device} ({res['threads']} threads): a {num_frames}-frame video in {res['total_s']:.2f} s "
              f"(transformer {res['generate_s']:.2f} s, decode {res['decode_s']:.2f} s; median of {repeats}); "
              f"measured fp32 matmul rate {res['matmul_peak_gflops']:.1f} GFLOP/s")
    return res


if __name__ == "__main__":
    run(as_json="--json" in sys.argv)
