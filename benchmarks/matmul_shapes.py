"""Matmul rate at the shapes the built-in model's training step multiplies, against the square-matrix rate that
`infinitystar bench` quotes: how much of "the machine's bf16 rate" a width-256 model can use at all.

    python benchmarks/matmul_shapes.py [--tokens 1171] [--threads 1]
    python benchmarks/matmul_shapes.py --inference [--width 384] [--tokens 1152] [--threads 1]

For each linear layer of configs/default_model.yaml's transformer (tokens x width products, forward and the two
backward products) it times fp32, bf16 on bf16 tensors, and bf16 under autocast from fp32 weights (what training
runs: every call casts the weight), and prints TFLOP/s and the share of the 2048^3 rate of the same precision.
--inference times the forward products only, as generation runs them: torch's linear (fp32; bf16 under autocast)
against oneDNN's linear on a weight packed once (`infinitystar.model.layers.PackedWeights`). --width overrides
the config's width (the heads stay; `infinitystar bench --width 384` is such a model).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

from infinitystar.bench import matmul_rate
from infinitystar.model.infinitystar import TransformerConfig
from infinitystar.model.layers import PackedWeights, linear
from infinitystar.train.config import load_config


def best_time(fn, seconds: float = 0.5) -> float:
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default_model.yaml")
    ap.add_argument("--tokens", type=int, default=1171, help="tokens of one packed micro-batch (bench --train: 1171)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    ap.add_argument("--inference", action="store_true", help="forward products: torch's linear vs packed oneDNN")
    ap.add_argument("--width", type=int, default=None, help="override the config's width")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg: TransformerConfig = load_config(a.config).model.build()
    if a.width:
        cfg = TransformerConfig(**{**cfg.to_dict(), "width": a.width})
    C, hd = cfg.width, cfg.head_dim
    layers = {"qkv": (C, (cfg.num_heads + 2 * cfg.num_kv_heads) * hd), "attn out": (cfg.num_heads * hd, C),
              "mlp in (gate+up)": (C, 2 * cfg.mlp_hidden), "mlp out": (cfg.mlp_hidden, C)}
    square = {dt: matmul_rate(torch.device("cpu"), dt) for dt in (torch.float32, torch.bfloat16)}
    if a.inference:
        return inference(layers, a.tokens, square)
    print(f"threads {torch.get_num_threads()}, {a.tokens} tokens; 2048^3 rate: fp32 {square[torch.float32] / 1e12:.3f}"
          f", bf16 {square[torch.bfloat16] / 1e12:.3f} TFLOP/s")
    print(f"{'layer':18} {'k x n':>11} {'fp32':>14} {'bf16':>14} {'bf16 autocast':>14}   (TFLOP/s, share of square)")
    totals = {"fp32": 0.0, "bf16": 0.0, "autocast": 0.0}
    flops_total = 0.0
    for name, (k, n) in layers.items():
        flops = 3 * 2 * a.tokens * k * n   # forward, grad of input, grad of weight
        row = []
        for label, dt, cast in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                ("autocast", torch.float32, True)):
            x = torch.randn(a.tokens, k, dtype=dt if not cast else torch.float32)
            w = torch.randn(n, k, dtype=dt if not cast else torch.float32)
            g = torch.randn(a.tokens, n, dtype=torch.bfloat16 if dt == torch.bfloat16 or cast else torch.float32)

            def step():
                if cast:
                    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
                else:
                    xb, wb = x, w
                xb @ wb.t()
                g @ wb
                g.t() @ xb
            t = best_time(step)
            totals[label] += t
            rate = flops / t
            ref = square[torch.bfloat16 if label != "fp32" else torch.float32]
            row.append(f"{rate / 1e12:6.3f} {rate / ref:5.0%}")
        flops_total += flops
        print(f"{name:18} {f'{k}x{n}':>11} {row[0]:>14} {row[1]:>14} {row[2]:>14}")
    print("per transformer block, all four layers: " + ", ".join(
        f"{k} {flops_total / v / 1e12:.3f} TFLOP/s" for k, v in totals.items())
          + f"; bf16-autocast vs fp32 time: {totals['fp32'] / totals['autocast']:.2f}x")
    return 0


def inference(layers: dict, tokens: int, square: dict) -> int:
    """Forward products at `tokens` rows: torch's linear against oneDNN on a packed weight, fp32 and bf16."""
    print(f"threads {torch.get_num_threads()}, {tokens} tokens, forward only; 2048^3 rate: fp32 "
          f"{square[torch.float32] / 1e12:.3f}, bf16 {square[torch.bfloat16] / 1e12:.3f} TFLOP/s")
    print(f"{'layer':18} {'k x n':>11} {'fp32':>14} {'fp32 packed':>14} {'bf16 autocast':>14} {'bf16 packed':>14}"
          "   (TFLOP/s, share of square)")
    totals = [0.0] * 4
    flops_total = 0.0
    with torch.no_grad():
        for name, (k, n) in layers.items():
            x, layer = torch.randn(tokens, k), torch.nn.Linear(k, n, bias=False)
            packed = PackedWeights()
            packed.weight(layer, torch.float32, PackedWeights.FP32_AFTER_ROWS)   # past the threshold: packed now
            flops = 2 * tokens * k * n
            row = []
            for i, (dt, use) in enumerate(((torch.float32, False), (torch.float32, True), (torch.bfloat16, False),
                                           (torch.bfloat16, True))):
                def step():
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16), \
                            (packed.use() if use else contextlib.nullcontext()):
                        linear(layer, x)
                t = best_time(step)
                totals[i] += t
                row.append(f"{flops / t / 1e12:6.3f} {flops / t / square[dt]:5.0%}")
            flops_total += flops
            print(f"{name:18} {f'{k}x{n}':>11} " + " ".join(f"{r:>14}" for r in row))
    names = ("fp32", "fp32 packed", "bf16 autocast", "bf16 packed")
    print("per transformer block, all four layers: " + ", ".join(
        f"{k} {flops_total / v / 1e12:.3f} TFLOP/s" for k, v in zip(names, totals))
          + f"; packed vs torch's linear: fp32 {totals[0] / totals[1]:.2f}x, bf16 {totals[2] / totals[3]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
