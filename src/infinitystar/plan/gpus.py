"""Accelerator specifications used to turn counted FLOPs and bytes into predicted times.

Peak numbers are the vendors' datasheet values for dense math (NVIDIA's datasheets print the 2:4-sparsity figure
with a footnote; dense is half of it); the sources are cited in docs/gpu.md. Host-to-device bandwidth is the
PCIe link's per-direction rate (the offloads move weights over it, each copy in one direction).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float          # device memory as the driver reports it (GiB; datasheet "80 GB" cards hold ~80 GiB)
    bf16_tflops: float         # dense BF16 tensor-core peak
    tf32_tflops: float         # dense TF32 tensor-core peak (fp32 convolutions and matmuls run on it by default)
    hbm_gbps: float            # device memory bandwidth
    h2d_gbps: float            # PCIe, one direction

    def peak_flops(self, dtype_name: str) -> float:
        return 1e12 * (self.bf16_tflops if dtype_name in ("bf16", "fp16") else self.tf32_tflops)


GPUS: dict[str, GPU] = {
    # A100 SXM4 80GB: BF16 312 TFLOPS, TF32 156 TFLOPS, 2,039 GB/s HBM2e, PCIe Gen4 x16 (32 GB/s per direction)
    "A100-80GB": GPU("A100-80GB", 80.0, 312.0, 156.0, 2039.0, 32.0),
    # H100 SXM5 80GB: BF16 989.4 TFLOPS, TF32 494.7 TFLOPS, 3.35 TB/s HBM3, PCIe Gen5 x16 (64 GB/s per direction)
    "H100-80GB": GPU("H100-80GB", 79.6, 989.4, 494.7, 3350.0, 64.0),
    # H200 SXM 141GB: the H100's compute with 141 GB HBM3e at 4.8 TB/s
    "H200-141GB": GPU("H200-141GB", 140.4, 989.4, 494.7, 4800.0, 64.0),
}

# Besides what PyTorch allocates, a CUDA process holds its context, kernels and library handles (typically
# 0.5-1 GiB; measured by benchmarks/gpu.py). A plan fits a card when peak + this margin <= the card's memory.
CONTEXT_GIB = 1.0

# Card sizes for the "which card needs which options" table, GiB (nominal "GB" of the card classes).
CARD_SIZES_GIB = (16, 24, 32, 40, 48, 80, 141)


def fits(peak_bytes: int, memory_gib: float) -> bool:
    """Whether a predicted peak plus the CUDA context margin fits a card with `memory_gib` GiB."""
    return peak_bytes + CONTEXT_GIB * 2 ** 30 <= memory_gib * 2 ** 30


__all__ = ["GPU", "GPUS", "CONTEXT_GIB", "CARD_SIZES_GIB", "fits"]
