"""`infinitystar bench`: generation speed and memory.

`run`: a random-weight transformer (width 256, depth 4 unless told), spacetime-sparse versus dense block-causal
attention, for 1, 2, 4 and 8 video clips, transformer only, with the measured matmul rate of the precision used
beside the achieved useful FLOP rate. Each case runs in a fresh process so its peak memory is its own.
`run_model`: the real generation of a model folder (CFG and decoding included).

Generation packs the transformer's weights once per process and reuses them across the timed calls, as a
pipeline does (`PackedWeights`); an older checkout is timed with an older copy of this module
(benchmarks/speed_compare.py --before-bench).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.model.layers import PackedWeights
from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.runtime import peak_memory_mb, precision_name, resolve_device, resolve_precision
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig, Schedule

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
    precision: str
    seconds: float
    cpu_s: float
    gflop: float
    matmul_gflops: float
    kv_cache_mb: float
    peak_mb: float


def _run_case(attention: str, clips: int, device: str, precision: str, model: dict, repeats: int, conn) -> None:
    dev = torch.device(device)
    dtype = resolve_precision(precision, dev)
    cfg = TransformerConfig(**model)
    pyr = PyramidConfig(**BENCH_PYRAMID, attention=attention)
    frames = 1 + pyr.temporal_compression * pyr.frames_per_clip * clips
    schedule = pyr.build(frames)
    torch.manual_seed(0)
    net = InfinityStarTransformer(cfg).to(dev).eval()
    cap = Caption(torch.randn(1, TEXT_TOKENS, cfg.text_channels, device=dev))
    kw = dict(guidance=Guidance(3.0), generator=torch.Generator(device=dev).manual_seed(0), precision=dtype,
              pack_weights=PackedWeights())
    generate(net, schedule, cap, **kw)           # warm-up: thread pools, kernel caches, the weights packed once
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = generate(net, schedule, cap, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    conn.send(CaseResult(attention, clips, frames, len(schedule.steps), precision_name(dtype), statistics.median(times),
                         statistics.median(cpu),
                         generation_flops(cfg, schedule, 2, TEXT_TOKENS) / 1e9, matmul_rate(dev, dtype) / 1e9,
                         out.peak_cache_bytes / 2 ** 20, peak_memory_mb(dev)))
    conn.close()


def run(clips=(1, 2, 4, 8), device: str | None = None, as_json: bool = False, precision: str = "fp32",
        width: int = 256, depth: int = 4, attention=("sparse", "dense"), repeats: int = 1) -> list[CaseResult]:
    """Transformer-only generation (CFG batch 2, random weights): median of `repeats` per case."""
    device = str(resolve_device(device or "auto"))
    model = {**BENCH_MODEL, "width": width, "depth": depth}
    ctx = mp.get_context("spawn")
    results = []
    for n in clips:
        for att in attention:
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_run_case, args=(att, n, device, precision, model, repeats, child))
            p.start()
            results.append(parent.recv())
            p.join()
    if as_json:
        for r in results:
            rate = r.gflop / r.seconds
            print(json.dumps({"bench": "generation", **r.__dict__, "width": width, "depth": depth,
                              "seconds_per_video": round(r.seconds, 3), "useful_gflops": round(rate, 2),
                              "useful_fraction": round(rate / r.matmul_gflops, 4)}))
        return results
    print(f"device {device} ({torch.get_num_threads()} threads); model width {width}, depth {depth}, "
          f"heads {model['num_heads']}/{model['num_kv_heads']}; latent scales {BENCH_PYRAMID['custom_scales']}, "
          f"{BENCH_PYRAMID['frames_per_clip']} latent frames per clip, CFG batch 2, random weights")
    print(f"{'clips':>5} {'frames':>6} {'attention':>9} {'prec':>4} {'steps':>5} {'time s':>8} {'GFLOP':>8} "
          f"{'GFLOP/s':>8} {'% peak':>6} {'KV MB':>7} {'peak MB':>8}")
    for r in results:
        rate = r.gflop / r.seconds
        print(f"{r.clips:>5} {r.frames:>6} {r.attention:>9} {r.precision:>4} {r.steps:>5} {r.seconds:>8.2f} "
              f"{r.gflop:>8.1f} {rate:>8.1f} {100 * rate / r.matmul_gflops:>5.1f}% {r.kv_cache_mb:>7.2f} "
              f"{r.peak_mb:>8.0f}")
    by = {(r.attention, r.clips): r for r in results}
    if set(attention) == {"sparse", "dense"}:
        print("dense / sparse time: " + ", ".join(
            f"{n} clips {by['dense', n].seconds / by['sparse', n].seconds:.2f}x" for n in clips))
    print("% peak: useful FLOP rate over the measured matmul rate of the precision used; peak MB: the process's "
          "max RSS on CPU (torch itself included) or max allocated on CUDA")
    return results


def run_model(model: str = "default", num_frames: int = 17, repeats: int = 3, device: str | None = None,
              as_json: bool = False, precision: str = "auto",
              prompt: str = "a large red circle moving right quickly on a black background") -> dict:
    """Wall time of one real generation with a model folder (the shipped default model by default): text
    encoding, the sampling loop (batch 1, CFG as the model's defaults say) and decoding; one warm-up call, then
    the median of `repeats` calls."""
    dev = resolve_device(device or "auto")
    dtype = resolve_precision(precision, dev)
    pipe = InfinityStarPipeline.from_pretrained(model, device=dev)
    d, schedule = pipe.defaults, pipe.pyramid.build(num_frames)
    tau = [d.tau_image if s.clip == 0 else d.tau_video for s in schedule.scales]
    cfg = pipe.transformer.config
    runs = []
    for i in range(repeats + 1):
        c0, t0 = time.process_time(), time.perf_counter()
        feats, mask = pipe.text_encoder.encode([prompt], dev)
        t1 = time.perf_counter()
        out = generate(pipe.transformer, schedule, Caption(feats, mask), guidance=d.guidance_config(), tau=tau,
                       generator=torch.Generator().manual_seed(i), precision=dtype,
                       pack_weights=pipe.packed_weights)
        t2 = time.perf_counter()
        pipe.tokenizer.decode(out.codes, precision=dtype)
        t3 = time.perf_counter()
        if i:
            runs.append({"encode_s": t1 - t0, "generate_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0,
                         "cpu_s": time.process_time() - c0})
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    rate = matmul_rate(dev, dtype)
    use_cfg = d.guidance_config().active(len(schedule.scales))
    useful = generation_flops(cfg, schedule, 2 if use_cfg else 1, feats.shape[1]) / med["generate_s"]
    res = {"bench": "model", "model": str(model), "device": str(dev), "threads": torch.get_num_threads(),
           "precision": precision_name(dtype), "frames": num_frames, "seconds_per_video": round(med["total_s"], 3),
           **{k: round(v, 3) for k, v in med.items()}, "matmul_tflops": round(rate / 1e12, 4),
           "useful_fraction": round(useful / rate, 4), "peak_memory_mb": round(peak_memory_mb(dev), 1)}
    if as_json:
        print(json.dumps(res))
    else:
        print(f"{model} on {dev} ({res['threads']} threads, {res['precision']}): a {num_frames}-frame video in "
              f"{res['total_s']:.2f} s (transformer {res['generate_s']:.2f} s, decode {res['decode_s']:.2f} s; "
              f"median of {repeats}); transformer useful FLOPs {100 * res['useful_fraction']:.1f}% of the measured "
              f"{res['precision']} matmul rate ({res['matmul_tflops']:.3f} TFLOP/s); peak memory "
              f"{res['peak_memory_mb']:.0f} MB")
    return res


if __name__ == "__main__":
    run(as_json="--json" in sys.argv)
