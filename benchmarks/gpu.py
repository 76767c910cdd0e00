"""The official 8B InfinityStar configuration on a real GPU, random weights: time, MFU and memory per stage, beside
the plan's prediction (`infinitystar plan`).

    python benchmarks/gpu.py                         # 480p and 720p, 81 frames, default memory options
    python benchmarks/gpu.py --resolution 720p --sequential-offload
    python benchmarks/gpu.py --dry-run               # a tiny configuration on the CPU: checks the script itself

Per resolution: (1) the plan, simulated on the CPU (a minute or two); (2) the pipeline built on the GPU with random
weights (transformer bf16, flan-t5-xl-shaped encoder fp16, video VAE fp32), one short warm-up generation (one
frame), then one timed generation. Stages are timed with CUDA synchronisation at their boundaries (the same hooks
the planner uses); memory is `torch.cuda.max_memory_allocated` per stage. MFU = the stage's planned FLOPs / time /
the card's dense peak (bf16; TF32 for the fp32 decoder; `--peak-tflops` overrides). With `--flex`, one
teacher-forced packed forward over the 480p schedule is timed with each attention backend (FlexAttention compiled on
CUDA, grouped SDPA, dense masked SDPA), and their outputs compared.

Needs ~30 GiB free GPU memory with the defaults at 720p (see docs/gpu.md for the options that fit smaller cards)
and ~20 GiB of host memory for the plan's bookkeeping-free simulation (it allocates almost nothing).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from infinitystar.bench import matmul_rate  # noqa: E402
from infinitystar.memory import MemoryOptions, add_memory_flags, memory_from_args  # noqa: E402
from infinitystar.plan import named_targets, plan  # noqa: E402
from infinitystar.plan.gpus import GPUS  # noqa: E402
from infinitystar.plan.models import PlanTokenizer, Target, _make  # noqa: E402
from infinitystar.plan.run import StageHooks  # noqa: E402

GIB = 2 ** 30


def tiny_target(frames: int = 9) -> Target:
    """A small InfinityStar (same code paths: T5-shaped text encoder, video VAE, 4-D RoPE, APG) for --dry-run."""
    from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
    from infinitystar.pipelines.infinitystar import GenerationDefaults, InfinityStarPipeline
    from infinitystar.plan.models import t5_encoder
    from infinitystar.schedules.pyramid import PyramidConfig
    from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig
    t5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
              feed_forward_proj="gated-gelu", is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
              decoder_start_token_id=0)

    def build(dtype, text_tokens, device="meta"):
        vae_cfg = VideoVAEConfig.tiny()
        cfg = TransformerConfig(width=64, depth=2, num_heads=2, num_kv_heads=1, text_channels=32, text_maxlen=32,
                                null_text_len=32, latent_channels=vae_cfg.codebook_dim)
        pyr = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4]], frames_per_clip=2, detail_min_tokens=16)
        return InfinityStarPipeline(_make(lambda: InfinityStarTransformer(cfg), dtype, device),
                                    _make(lambda: VideoVAE(vae_cfg), None, device),
                                    t5_encoder(t5, torch.float32, PlanTokenizer(text_tokens), device), pyr, 64, 64,
                                    GenerationDefaults(guidance_scale=34.0, guidance="apg", tau_video=0.4))
    return Target("tiny", "infinitystar", "a tiny InfinityStar (dry run)", build, {"num_frames": frames})


def randomise(module: torch.nn.Module) -> None:
    """Random weights without an fp32 copy: matrices N(0, 0.02), biases 0, norm gains 1 (buffers are kept)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


class StageClock:
    """Wall time and peak allocated memory per stage (synchronising at every boundary)."""

    def __init__(self, device: torch.device):
        self.device, self.rows, self.name, self.t0 = device, {}, None, 0.0

    def begin(self, name: str) -> None:
        self.end()
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.name, self.t0 = name, time.perf_counter()

    def end(self) -> None:
        if self.name is None:
            return
        _sync(self.device)
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        reserved = torch.cuda.max_memory_reserved(self.device) if cuda else 0     # what the card must hold
        self.rows[self.name] = {"seconds": time.perf_counter() - self.t0, "peak_bytes": peak,
                                "peak_reserved_bytes": reserved}
        self.name = None


def peak_tflops(device: torch.device, override) -> tuple[float, str]:
    if override:
        return float(override), "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gpu in GPUS.items():
            if key.split("-")[0] in name:
                return gpu.bf16_tflops, f"{key} datasheet"
    return matmul_rate(device, torch.float32 if device.type == "cpu" else torch.bfloat16) / 1e12, "measured matmul"


def peak_breakdown(trace: list[dict], top: int = 25) -> dict:
    """Replay an allocator trace (`torch.cuda.memory._snapshot()["device_traces"][i]`): the allocations alive at the
    moment allocated memory peaked (counting only what the trace saw allocated), summed by the innermost frames of
    this package that made them, largest first."""
    live, total, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])
    live = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in live.values():
        ours = [f for f in e.get("frames", []) if "infinitystar" in f["filename"]]
        where = " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in ours[:2]) or "(other)"
        g = groups.setdefault(where, [0, 0])
        g[0] += e["size"]
        g[1] += 1
    rows = sorted(({"where": k, "bytes": v[0], "count": v[1]} for k, v in groups.items()), key=lambda r: -r["bytes"])
    return {"peak_bytes_in_trace": peak, "groups": rows[:top]}


def run_resolution(target: Target, options: MemoryOptions, device: torch.device, text_tokens: int, peak: float,
                   do_plan: bool, breakdown: bool = False) -> dict:
    predicted = plan(target, options, text_tokens=text_tokens) if do_plan else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    clock = StageClock(device)
    clock.begin("load")
    # with sequential offload the blocks' home is the host: build there, so that a small card never holds them all
    pipe = target.build(dtype, text_tokens, torch.device("cpu") if options.sequential_offload else device)
    for part in (pipe.transformer, pipe.tokenizer, pipe.text_encoder):
        randomise(part)
    pipe.memory = options
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    clock.end()
    gen = torch.Generator().manual_seed(0)
    pipe(["warm-up"], num_frames=1, generator=gen)          # kernels, autotuning, compiled code
    hooks = StageHooks(pipe, target.family, clock.begin)
    recording = breakdown and device.type == "cuda"
    if recording:   # allocations made from here on, with their Python stacks (slows the run; times then mean little)
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    clock.begin("text")
    pipe(["benchmark"], generator=gen, **target.call)
    clock.end()
    hooks.remove()
    extra = {}
    if recording:
        try:    # private API: a change in its format costs this number, not the run's others
            trace = torch.cuda.memory._snapshot(device)["device_traces"][_cuda_index(device)]
            extra["peak_breakdown"] = {"allocated_before": allocated_before, **peak_breakdown(trace)}
        except Exception as e:     # noqa: BLE001
            extra["peak_breakdown"] = {"error": f"{type(e).__name__}: {e}"}
        torch.cuda.memory._record_memory_history(enabled=None)
    rows = []
    for name, m in clock.rows.items():
        row = {"stage": name, **m}
        if predicted is not None:
            st = next(s for s in predicted.stages if s["name"] == name)
            kind = 1.0 if name != "decode" else 0.5                 # the fp32 decoder runs on TF32 (half rate)
            row.update(planned_flops=st["flops"], predicted_peak_bytes=st["peak_bytes"],
                       tflops_per_s=st["flops"] / m["seconds"] / 1e12,
                       mfu=st["flops"] / m["seconds"] / (peak * kind * 1e12))
        rows.append(row)
    return {"target": target.name, "options": options.to_dict(), "stages": rows,
            "total_s": sum(r["seconds"] for r in rows if r["stage"] != "load"),
            "predicted": None if predicted is None else {"peak_bytes": predicted.peak_bytes, "flops": predicted.flops,
                                                         "H100_s": predicted.gpu_times["H100-80GB"]["total_s"]},
            **extra}


def run_flex(device: torch.device, dry_run: bool, peak: float) -> dict:
    """One packed teacher-forced forward over the largest official 480p training pack (the image pyramid, 8 clip
    scales and the clip's largest scale: 39,719 visual tokens; dry run: tiny), with each attention backend:
    FlexAttention (compiled on CUDA), grouped SDPA and one dense masked SDPA. Times each, and checks that they
    compute the same function: the logits' largest difference from the dense SDPA's, and the same for one
    attention call alone in fp32 (random q, k, v over the pack's mask)."""
    from infinitystar.model.attention import attend
    from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig, transformer_preset
    from infinitystar.model.packing import PackSample, pack_sequence, select_steps
    from infinitystar.schedules.pyramid import pyramid_preset
    from infinitystar.train.bench import packed_forward_flops
    if dry_run:
        cfg = TransformerConfig(width=64, depth=2, num_heads=2, num_kv_heads=1, text_channels=32, text_maxlen=32,
                                null_text_len=32)
        schedule, scales = pyramid_preset("tiny").build(17), None
    else:
        cfg = transformer_preset("infinity_qwen8b")
        schedule = pyramid_preset("480p").build(81)
        n = schedule.scales_per_clip
        scales = list(range(n + 8)) + [2 * n - 1]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _make(lambda: InfinityStarTransformer(cfg), dtype, device)
    randomise(model)
    packed = pack_sequence([PackSample(schedule, select_steps(schedule, scales, "last"), [64])], cfg.text_maxlen)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(packed.num_visual, cfg.latent_channels, dtype=dtype, device=device, generator=gen)
    caption = [torch.randn(64, cfg.text_channels, dtype=dtype, device=device, generator=gen)]
    packed = packed.to(device)
    flops = packed_forward_flops(cfg, packed)

    rows, logits = {}, {}
    with torch.no_grad():
        for backend in ("flex", "grouped", "sdpa"):
            model.forward_packed(x, caption, packed, backend=backend)          # compiles / warms up
            _sync(device)
            t0 = time.perf_counter()
            out = torch.cat([o.float().flatten() for o in model.forward_packed(x, caption, packed, backend=backend)])
            _sync(device)
            seconds = time.perf_counter() - t0
            rows[backend] = {"seconds": seconds, "mfu": flops / seconds / (peak * 1e12)}
            logits[backend] = out
        for backend in ("flex", "grouped"):
            rows[backend]["logits_max_abs_diff_vs_sdpa"] = (logits[backend] - logits["sdpa"]).abs().max().item()
        rows["sdpa"]["logits_max_abs"] = logits["sdpa"].abs().max().item()
        # one attention call in fp32: the backends' mask handling alone, without bf16 rounding through the blocks
        # (as many query heads as key heads: SDPA's fused kernels take a mask only without grouped queries)
        L, hd = packed.length, cfg.width // cfg.num_heads
        q, k, v = (torch.randn(1, cfg.num_kv_heads, L, hd, device=device, generator=gen) for _ in range(3))
        real = packed.num_visual + packed.num_condition + packed.num_text     # padding rows: each backend its own
        ref = attend(q, k, v, packed.attention_context("sdpa"), 0)[:, :, :real]
        attention_fp32 = {name: (attend(q, k, v, packed.attention_context(name), 0)[:, :, :real] - ref).abs().max()
                          .item() for name in ("flex", "grouped")}
    return {"visual_tokens": packed.num_visual, "packed_length": packed.length, "flops": flops,
            "backends": rows, "attention_fp32_max_abs_diff_vs_sdpa": attention_fp32,
            "seconds": rows["flex"]["seconds"], "mfu": rows["flex"]["mfu"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", nargs="+", default=["480p", "720p"], choices=["480p", "720p"])
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--text-tokens", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (default: datasheet)")
    p.add_argument("--dry-run", action="store_true", help="a tiny configuration (CPU by default): checks the script")
    p.add_argument("--no-plan", action="store_true", help="skip the prediction")
    p.add_argument("--flex", action="store_true", help="also time one packed forward with FlexAttention")
    p.add_argument("--peak-breakdown", action="store_true",
                   help="record the allocator's trace during the timed generation and list what is alive at its peak")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap this process's GPU memory at N GiB, as a smaller card would (less its CUDA context)")
    p.add_argument("--json", action="store_true")
    add_memory_flags(p)
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cpu" if a.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; use --dry-run on a CPU")
    if a.memory_cap_gib and device.type == "cuda":
        index = _cuda_index(device)
        torch.cuda.set_per_process_memory_fraction(a.memory_cap_gib * 2 ** 30 / torch.cuda.get_device_properties(index)
                                                   .total_memory, index)
    peak, source = peak_tflops(device, a.peak_tflops)
    options = memory_from_args(a)
    targets = [tiny_target()] if a.dry_run else [named_targets(a.frames)[f"infinitystar-8b-{r}"] for r in a.resolution]
    text_tokens = min(a.text_tokens, 16) if a.dry_run else a.text_tokens     # the tiny model's null text: 32 rows
    results = [run_resolution(t, options, device, text_tokens, peak, not a.no_plan, a.peak_breakdown)
               for t in targets]
    flex = run_flex(device, a.dry_run, peak) if a.flex else None
    out = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "memory_cap_gib": a.memory_cap_gib,
           "peak_tflops": peak, "peak_source": source, "torch": torch.__version__, "results": results, "flex": flex}
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"{out['device_name']}: dense peak {peak:.3g} TFLOPS ({source}); torch {torch.__version__}")
    for r in results:
        print(f"\n{r['target']} ({MemoryOptions(**r['options']).describe()}): {r['total_s']:.1f} s without loading")
        print(f"{'stage':<12}{'seconds':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'predicted':>10}")
        for s in r["stages"]:
            print(f"{s['stage']:<12}{s['seconds']:>9.2f}{s.get('tflops_per_s', 0):>9.1f}"
                  f"{100 * s.get('mfu', 0):>6.1f}%{s['peak_bytes'] / GIB:>10.2f}"
                  f"{s.get('predicted_peak_bytes', 0) / GIB:>10.2f}")
    if flex:
        print(f"\npacked forward, {flex['visual_tokens']} visual tokens, {flex['flops']:.3g} FLOP:")
        for name, r in flex["backends"].items():
            diff = r.get("logits_max_abs_diff_vs_sdpa")
            print(f"  {name:<8}{r['seconds']:>8.3f} s  MFU {100 * r['mfu']:5.1f}%"
                  + ("" if diff is None else f"  logits max |diff| vs sdpa {diff:.3g}"))
        print("  one attention call in fp32, max |diff| vs sdpa: "
              + ", ".join(f"{k} {v:.3g}" for k, v in flex["attention_fp32_max_abs_diff_vs_sdpa"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
