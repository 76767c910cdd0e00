"""Training throughput of a small random-weight InfinityStar generator: tokens/s and achieved FLOP rate against the
machine's measured matmul rate (fp32; bf16 too on CUDA, where training runs under bf16 autocast).

    python benchmarks/train_throughput.py                          # CPU (or CUDA when available)
    python benchmarks/train_throughput.py --device cuda --frames 65 --micro-batch 2 --checkpointing
    python benchmarks/train_throughput.py --json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import infinitystar  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main(argv=None) -> int:
    from infinitystar.train.bench import run_train_bench
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--frames", type=int, default=33, help="video frames per sample, 1 + 4k")
    p.add_argument("--micro-batch", type=int, default=1, help="samples packed into one sequence")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    run_train_bench(a.device, a.steps, a.frames, a.micro_batch, a.checkpointing, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
