"""Peak memory of the video tokenizer's decode (and encode) against clip length, chunked vs one pass.

Each case runs in its own process so that peaks do not mix: on CPU the peak is the growth of the process's
max RSS (`resource.getrusage`) across the call, on CUDA `torch.cuda.max_memory_allocated` above the memory
held before the call (after a warm-up call on a minimal input). With chunking the peak should stay about flat as the clip grows (only the output grows);
one pass grows with the clip.

    python benchmarks/vae_memory.py                      # small preset, 128x128, 17/33/65 frames, CPU
    python benchmarks/vae_memory.py --device cuda --size 256 --preset tiny
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    import infinitystar  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _rss_mb() -> float:
    """Current resident size (Linux /proc); elsewhere the high-water mark, which can only under-report."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (OSError, ValueError, IndexError):
        return _max_rss_mb()


def child(args) -> dict:
    import torch
    from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = VideoVAEConfig.preset(args.preset)
    model = VideoVAE(cfg).to(device).eval()
    chunked = args.mode == "chunked"
    t_lat = cfg.latent_frames(args.frames)
    side = args.size // cfg.spatial_stride
    if args.what == "decode":
        x = torch.randn(1, cfg.codebook_dim, t_lat, side, side, device=device)
        run = lambda: model.decode(x, chunked=chunked)  # noqa: E731
    else:
        x = torch.rand(1, cfg.in_channels, args.frames, args.size, args.size, device=device) * 2 - 1
        run = lambda: model.encode_posterior(x, chunked=chunked).mean  # noqa: E731
    with torch.no_grad():
        # warm-up on a minimal input so library workspaces and lazy inits are not counted as the call's memory
        if args.what == "decode":
            model.decode(torch.zeros(1, cfg.codebook_dim, 1, 1, 1, device=device))
        else:
            model.encode_posterior(torch.zeros(1, cfg.in_channels, 1, cfg.spatial_stride, cfg.spatial_stride,
                                               device=device))
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = run()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        else:
            base = _rss_mb()
            t0 = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t0
            peak = _max_rss_mb() - base
    return {"what": args.what, "mode": args.mode, "frames": args.frames, "latent_frames": t_lat,
            "peak_mb": round(peak, 1), "output_mb": round(out.numel() * out.element_size() / 2 ** 20, 1),
            "seconds": round(seconds, 2), "device": str(device)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="VideoVAEConfig preset (small, tiny, official)")
    p.add_argument("--size", type=int, default=128, help="frame height = width in pixels")
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65])
    p.add_argument("--what", nargs="+", default=["decode"], choices=["decode", "encode"])
    p.add_argument("--modes", nargs="+", default=["chunked", "one-pass"], choices=["chunked", "one-pass"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per case")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.what, args.frames = args.what[0], args.frames[0]
        print(json.dumps(child(args)))
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.device == "cpu":
        # glibc otherwise raises its mmap threshold as large blocks are freed and keeps later ones on the heap, so
        # the RSS high-water mark would count freed tensors; a fixed threshold returns every large block on free
        # (more page faults: CPU timings here are pessimistic)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    print(f"video tokenizer peak memory: preset {args.preset}, {args.size}x{args.size}, device {args.device} "
          f"({'max RSS growth' if args.device == 'cpu' else 'max_memory_allocated above baseline'})")
    print(f"{'what':7} {'mode':9} {'frames':>6} {'T_lat':>5} {'peak MB':>8} {'output MB':>9} {'s':>6}")
    for what in args.what:
        for mode in args.modes:
            for frames in args.frames:
                cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--size", str(args.size),
                       "--frames", str(frames), "--what", what, "--mode", mode, "--device", args.device,
                       "--threads", str(args.threads)]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if res.returncode:
                    print(res.stderr, file=sys.stderr)
                    return res.returncode
                r = json.loads(res.stdout.strip().splitlines()[-1])
                print(f"{r['what']:7} {r['mode']:9} {r['frames']:6d} {r['latent_frames']:5d} {r['peak_mb']:8.1f} "
                      f"{r['output_mb']:9.1f} {r['seconds']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
