"""Cost of extending a video clip by clip (`pipe.start` / `stream.extend`): time and peak memory per extension as
the video grows. With spacetime-sparse attention the stream keeps only the previous clip's last scale and the
decoder's causal state, so both should stay flat.

Peak memory per extension: on CUDA `torch.cuda.max_memory_allocated` (reset before each call); on Linux CPUs the
process's peak RSS (VmHWM), reset before each call through /proc/self/clear_refs. CPU seconds (all threads of the
process) are printed beside the wall time: on a shared machine they vary less. The KV cache held between calls
and the frames kept for `stream.video()` (the output, which grows by one clip each call) are reported beside it.

    python benchmarks/stream_extend.py                       # the shipped default model, 16 extensions, CPU
    python benchmarks/stream_extend.py --threads 1           # on a busy machine: CPU seconds stay comparable
    python benchmarks/stream_extend.py --model DIR --device cuda --clips 16 --json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import infinitystar  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from infinitystar.pipelines.infinitystar import InfinityStarPipeline

PROMPTS = ["a large red circle moving right slowly on a black background",
           "a large red circle moving up slowly on a black background",
           "a small blue square moving left quickly on a white background",
           "a small green triangle moving down slowly on a gray background"]


def _reset_cpu_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")      # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _cpu_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="model folder (default: the shipped default model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clips", type=int, default=16, help="extensions after the first clip")
    ap.add_argument("--report", type=int, nargs="+", default=[1, 4, 16], help="extensions to print")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = InfinityStarPipeline.from_pretrained(args.model, device=args.device)
    cuda = pipe.device.type == "cuda"
    stream = pipe.start(PROMPTS[0], generator=torch.Generator().manual_seed(0))
    rows = []
    for k in range(1, args.clips + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif not _reset_cpu_peak():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux or CUDA")
        cpu0 = time.process_time()
        stream.extend(PROMPTS[k % len(PROMPTS)])
        if cuda:
            torch.cuda.synchronize()
        cpu_s = time.process_time() - cpu0
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else _cpu_peak_mb()
        state = getattr(stream, "state", None)
        rows.append({"extension": k, "video_frames": stream.num_frames, "seconds": stream.timings[-1]["seconds"],
                     "cpu_seconds": cpu_s, "peak_mb": peak, "kv_cache_mb": state.cache.nbytes() / 2 ** 20 if state else 0.0,
                     "frames_kept_mb": sum(c.nbytes for c in stream.clips) / 2 ** 20})
    head = (f"{args.model} ({pipe.inference} inference) on {pipe.device} ({torch.get_num_threads()} threads); "
            f"peak = {'max allocated' if cuda else 'peak RSS of the process'} during the call")
    if not args.json:
        print(head)
        print(f"{'extension':>9} {'frames':>7} {'time s':>7} {'CPU s':>7} {'peak MB':>8} {'KV MB':>7} "
              f"{'frames MB':>9}")
    for r in rows:
        if r["extension"] in args.report:
            print(json.dumps({**r, "model": args.model, "device": str(pipe.device)}) if args.json else
                  f"{r['extension']:>9} {r['video_frames']:>7} {r['seconds']:>7.2f} {r['cpu_seconds']:>7.2f} "
                  f"{r['peak_mb']:>8.0f} "
                  f"{r['kv_cache_mb']:>7.3f} {r['frames_kept_mb']:>9.2f}")


if __name__ == "__main__":
    main()
