"""Plan a generation: run the pipeline's real code under the `Simulator` and collect per-stage memory and FLOPs.

Stages, in order: `load` (weights from host memory onto the device, as `pipeline.to(device)` places them under the
memory options), `text` (prompt encoding), `transformer` (every scale and clip, KV cache included), `decode` (the
VAE decoder and the conversion to frames). A stage starts at the first forward call of its part, so the work in
between (e.g. moving the text encoder) is booked where it happens.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from unittest import mock

import torch

import infinitystar.sampling.generate as gen
import infinitystar.sampling.infinity_generate as igen
from infinitystar.memory import MemoryOptions
from infinitystar.model.attention import KVCache
from infinitystar.plan.gpus import GPUS, fits
from infinitystar.plan.models import DEFAULT_TEXT_TOKENS, Target
from infinitystar.plan.simulate import KV_CACHE, META, Simulator, register_module

STAGES = ("load", "text", "transformer", "decode")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class PlanResult:
    target: str
    description: str
    options: MemoryOptions
    dtype: str
    batch: int
    text_tokens: int
    stages: list[dict]
    peak_bytes: int
    flops: float
    host_peak_bytes: int
    wall_s: float
    gpu_times: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["options"] = self.options.to_dict()
        return d


class StageHooks:
    """Call `on_stage(name)` at the first forward call of the part that starts each stage of a pipeline call
    ("transformer": its first module in generation; "decode": the tokenizer's decoder input), once each, in order.
    The caller starts "load" and "text" itself. Used by the planner and by benchmarks/gpu.py."""

    def __init__(self, pipe, family: str, on_stage: Callable[[str], None]):
        self.on_stage, self.done = on_stage, set()
        first = pipe.transformer.text_proj if family == "infinitystar" else pipe.transformer.text_norm
        decode = pipe.tokenizer.proj_up if family == "infinitystar" else pipe.tokenizer.decoder
        self.handles = [first.register_forward_pre_hook(self._hook("transformer")),
                        decode.register_forward_pre_hook(self._hook("decode"))]

    def _hook(self, name: str):
        def hook(*_):
            if name not in self.done:
                self.done.add(name)
                self.on_stage(name)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _tracked_cache(sim: Simulator):
    """A KVCache whose entries are booked as kv_cache memory while they stay in it."""

    class Layer(dict):
        def __setitem__(self, key, kv):
            super().__setitem__(key, kv)
            for t in kv:
                sim.recategorise(t, KV_CACHE)

    class TrackedKVCache(KVCache):
        def __init__(self, depth: int):
            super().__init__(depth)
            self.layers = [Layer() for _ in range(depth)]

    return TrackedKVCache


def plan(target: Target, options: Optional[MemoryOptions] = None, dtype: str = "bf16", batch: int = 1,
         text_tokens: int = DEFAULT_TEXT_TOKENS, mfu: float = 0.35, kernels: str = "cuda") -> PlanResult:
    """Run `target`'s generation under the simulator with the given memory options and weight dtype."""
    options = options or MemoryOptions()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    t0 = time.perf_counter()
    sim = Simulator(kernels)
    with sim:
        pipe = target.build(DTYPES[dtype], text_tokens)
        for part in (pipe.transformer, pipe.tokenizer, pipe.text_encoder):
            register_module(sim, part)            # the weights, read from the files into host memory
        pipe.memory = options
        pipe.set_progress_bar_config(disable=True)        # its rates would be the simulation's, not a GPU's
        cache = _tracked_cache(sim)
        with mock.patch.object(gen, "KVCache", cache), mock.patch.object(igen, "KVCache", cache):
            sim.begin("load")
            pipe.to(META)
            hooks = StageHooks(pipe, target.family, sim.begin)
            sim.begin("text")
            pipe([target.prompt] * batch, generator=torch.Generator().manual_seed(0), **target.call)
            sim.end()
        hooks.remove()
    stats = [s.to_dict() for s in sim.stages]
    flops = sum(s["flops"] for s in stats)
    res = PlanResult(target.name, target.description, options, dtype, batch, text_tokens, stats,
                     max(s["peak_bytes"] for s in stats), flops, max(s["host_peak_bytes"] for s in stats),
                     time.perf_counter() - t0)
    res.gpu_times = predict_times(stats, mfu, dtype)
    return res


def predict_times(stages: list[dict], mfu: float, dtype: str) -> dict:
    """Seconds per stage on each GPU: FLOPs at `mfu` of the dense peak (bf16 for the transformer and text encoder
    in bf16; TF32 for the fp32 VAE decoder), plus copies between host and device at the PCIe rate."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    out = {"mfu": mfu}
    for name, gpu in GPUS.items():
        per = {}
        for s in stages:
            kind = "tf32" if s["name"] == "decode" or dtype == "fp32" else "bf16"
            per[s["name"]] = s["flops"] / (gpu.peak_flops(kind) * mfu) + s["transfer_bytes"] / (gpu.h2d_gbps * 1e9)
        out[name] = {"stages_s": per, "total_s": sum(per.values()),
                     "fits": fits(max(s["peak_bytes"] for s in stages), gpu.memory_gib)}
    return out


# The option ladder of `plan --compare` and docs/gpu.md: nothing (the official decode chunks), the defaults, then
# what a smaller card needs (VAE tiles change pixels near the seams; the offloads are exact but cost copies).
LADDER = (("none", {"text_encoder": "device", "token_chunk": None, "vae_chunk": 2}),
          ("defaults", {}),
          ("defaults + offload for decode", {"offload_for_decode": True}),
          ("defaults + VAE tiles 32", {"vae_tile": 32}),
          ("defaults + sequential offload", {"sequential_offload": True}),
          ("defaults + sequential offload + VAE tiles 32", {"vae_tile": 32, "sequential_offload": True}))


def compare_options(target: Target, **kw) -> list[tuple[str, PlanResult]]:
    """(label, plan) along the option ladder (sequential offload only for InfinityStar models)."""
    return [(label, plan(target, MemoryOptions(**o), **kw)) for label, o in LADDER
            if target.family == "infinitystar" or not o.get("sequential_offload")]


__all__ = ["plan", "compare_options", "PlanResult", "predict_times", "StageHooks", "STAGES", "DTYPES", "LADDER"]
