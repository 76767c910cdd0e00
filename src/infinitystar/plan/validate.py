"""Check the simulator against real runs on this CPU: predicted versus measured peak memory of small workloads.

Each case builds the same modules and inputs twice: for real on the CPU (run in a fresh process, its peak resident
memory above the level before the call measured with the kernel's high-water mark) and on the meta device under
the `Simulator` with the CPU kernel profile (exact bytes; oneDNN's convolution buffers). Both numbers are the peak
of memory allocated *during* the call, on top of the weights and inputs that exist before it.

The measuring process sets MALLOC_MMAP_THRESHOLD_ so that every large buffer is its own mapping, returned to the
system when freed; the resident set then follows the live tensors. Run: `python benchmarks/plan_validation.py`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.plan.simulate import Simulator, register_module
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig

MMAP_THRESHOLD = 1 << 16


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[torch.device], tuple[list, Callable[[], object]]]   # device -> (modules, the call)


def _generation(token_chunk, size: int = 40):
    def build(device: torch.device):
        cfg = TransformerConfig(width=256, depth=4, num_heads=4, num_kv_heads=2, text_channels=64, text_maxlen=64,
                                null_text_len=64)
        pyr = PyramidConfig(pn=None, custom_scales=[[1, 1], [4, 4], [16, 16], [size, size]], frames_per_clip=4,
                            detail_min_tokens=64)
        torch.manual_seed(0)
        with torch.device(device):
            model = InfinityStarTransformer(cfg).eval()
            cap = Caption(torch.randn(1, 16, cfg.text_channels))
        model.set_token_chunk(token_chunk)
        model.set_cpu_block_rows(None)
        schedule = pyr.build(17)
        # without the CPU-only oneDNN weight packing (a copy of the block weights per generation) and row blocks
        # (above), so the real run takes the path the plan predicts for a GPU
        return [model], lambda: generate(model, schedule, cap, guidance=Guidance(3.0),
                                         generator=torch.Generator().manual_seed(0), pack_weights=False)
    return build


def _decode(tile, size: int = 48, chunk: int = 2):
    def build(device: torch.device):
        torch.manual_seed(0)
        with torch.device(device):
            vae = VideoVAE(VideoVAEConfig.small()).eval()
            z = torch.randn(1, vae.config.codebook_dim, 3, size, size)
        return [vae], lambda: vae.decode(z, tile=tile, chunk=chunk)
    return build


CASES = {c.name: c for c in (
    Case("generate", "transformer 256 wide x 4 blocks, one 4-frame clip up to 40x40 (6400 tokens per step, CFG "
                     "batch 2), fp32", _generation(None)),
    Case("generate-chunked", "the same with token chunks of 1024", _generation(1024)),
    Case("decode", "video VAE (small) decode of a 3x48x48 latent -> 9 frames of 384x384, fp32", _decode(None)),
    Case("decode-tiled", "the same in 24-cell tiles (overlap 4)", _decode(24)),
    Case("decode-chunk1", "the same in decoder chunks of 1 latent frame (2 + 1: 5 frames, then 4)",
         _decode(None, chunk=1)),
    # smaller versions for the test suite (tests/test_plan.py)
    Case("tiny-generate", "the transformer above, the clip up to 24x24 (2304 tokens per step)", _generation(None, 24)),
    Case("tiny-generate-chunked", "the same with token chunks of 256", _generation(256, 24)),
    Case("tiny-decode", "the small video VAE decoding a 3x16x16 latent -> 9 frames of 128x128", _decode(None, 16)),
    Case("tiny-decode-chunk1", "the same in decoder chunks of 1 latent frame", _decode(None, 16, 1)),
)}


def predict(case: Case) -> int:
    """Peak bytes allocated during the call, on top of what exists before it, by the simulator."""
    with Simulator("cpu") as sim:
        modules, call = case.build(torch.device("meta"))
        for m in modules:
            register_module(sim, m, host=False)
        with torch.no_grad(), sim.stage(case.name) as st:
            call()
    return st.peak_with_workspace - st.start_bytes


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_here(case: Case) -> int:
    """Peak resident bytes during the call above the level before it (Linux; call in a fresh process)."""
    modules, call = case.build(torch.device("cpu"))
    with torch.no_grad():
        call()                        # warm-up: lazy initialisation, thread pools, kernel caches
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")              # reset the high-water mark to the current resident size
        base = _status_kib("VmRSS")
        call()
        peak = _status_kib("VmHWM")
    return (peak - base) * 1024


def measure(case: Case) -> int:
    """`measure_here` in a fresh Python process with the large-allocation threshold set."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run([sys.executable, "-m", "infinitystar.plan.validate", "--measure", case.name], env=env,
                         capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["measured_bytes"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--measure", choices=list(CASES), help="(internal) measure one case in this process")
    p.add_argument("cases", nargs="*", default=list(CASES))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.measure:
        print(json.dumps({"case": a.measure, "measured_bytes": measure_here(CASES[a.measure])}))
        return 0
    for name in a.cases:
        case = CASES[name]
        pred, meas = predict(case), measure(case)
        err = (pred - meas) / meas
        if a.json:
            print(json.dumps({"case": name, "predicted_bytes": pred, "measured_bytes": meas, "error": err}))
        else:
            print(f"{name:<18} predicted {pred / 2 ** 20:8.1f} MiB  measured {meas / 2 ** 20:8.1f} MiB  "
                  f"error {100 * err:+5.1f}%   ({case.description})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
