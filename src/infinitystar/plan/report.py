"""Text and JSON renderings of a plan."""
from __future__ import annotations

from infinitystar.plan.gpus import CARD_SIZES_GIB, CONTEXT_GIB, GPUS, fits
from infinitystar.plan.run import PlanResult

GIB = 2 ** 30


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def render(res: PlanResult, compare: list = ()) -> str:
    o = res.options
    lines = [f"{res.target}: {res.description}",
             f"weights {res.dtype}, batch {res.batch}, {res.text_tokens}-token prompts (stand-in tokenizer for named "
             f"models), guidance on (conditional + unconditional halves)",
             f"memory options: {o.describe()}",
             f"simulated in {res.wall_s:.1f} s on the meta device: bytes as the CUDA caching allocator counts them "
             f"(512-byte blocks), GiB = 2^30 bytes", ""]
    names = list(GPUS)
    head = (f"{'stage':<12}{'peak GiB':>9}{'weights':>9}{'KV cache':>9}{'activ.':>9}{'wkspace':>9}{'FLOPs':>10}"
            + "".join(f"{n.split('-')[0] + ' s':>9}" for n in names))
    lines += [head, "-" * len(head)]
    for s in res.stages:
        row = (f"{s['name']:<12}{_gib(s['peak_bytes']):>9}{_gib(s['weights_bytes']):>9}{_gib(s['kv_cache_bytes']):>9}"
               f"{_gib(s['activations_bytes']):>9}{_gib(s['workspace_bytes']):>9}{s['flops']:>10.3g}")
        row += "".join(f"{res.gpu_times[n]['stages_s'][s['name']]:>9.2f}" for n in names)
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(f"{'total':<12}{_gib(res.peak_bytes):>9}{'':>45}{res.flops:>10.3g}"
                 + "".join(f"{res.gpu_times[n]['total_s']:>9.2f}" for n in names))
    mfu = res.gpu_times["mfu"]
    lines += ["", f"times: FLOPs at {100 * mfu:.0f}% of the dense peak (bf16; TF32 for the fp32 VAE decoder) plus "
                  f"host-device copies at the PCIe rate; peaks: " + ", ".join(
                      f"{n} {GPUS[n].bf16_tflops:g} TFLOPS" for n in names),
              f"host memory peak {_gib(res.host_peak_bytes)} GiB (weights read from the files, offloaded parts)",
              "fits (peak + %g GiB CUDA context): " % CONTEXT_GIB + ", ".join(
                  f"{gb} GiB {'yes' if fits(res.peak_bytes, gb) else 'no'}" for gb in CARD_SIZES_GIB)]
    worst = max(res.stages, key=lambda s: s["peak_bytes"])
    if worst["largest_at_peak"]:
        lines += ["", f"largest allocations at the {worst['name']} peak:"]
        for t in worst["largest_at_peak"]:
            lines.append(f"  {_gib(t['bytes']):>7} GiB  {t['category']:<12}{t['op']:<28}{t['shape']} {t['dtype']}")
    if compare:
        lines += ["", "options compared (peak GiB per stage; fits: peak + %g GiB on a card of that many GiB; times at "
                  "the same MFU, PCIe copies included):" % CONTEXT_GIB]
        stages = [s["name"] for s in compare[0][1].stages]
        head = (f"{'options':<46}" + "".join(f"{n:>12}" for n in stages) + f"{'peak':>8}"
                + "".join(f"{str(gb) + 'G':>5}" for gb in CARD_SIZES_GIB) + "".join(f"{n.split('-')[0] + ' s':>9}"
                                                                                  for n in names))
        lines += [head, "-" * len(head)]
        for label, r in compare:
            lines.append(f"{label:<46}" + "".join(f"{_gib(s['peak_bytes']):>12}" for s in r.stages)
                         + f"{_gib(r.peak_bytes):>8}"
                         + "".join(f"{'yes' if fits(r.peak_bytes, gb) else 'no':>5}" for gb in CARD_SIZES_GIB)
                         + "".join(f"{r.gpu_times[n]['total_s']:>9.1f}" for n in names))
    return "\n".join(lines)


def to_json(res: PlanResult, compare: list = ()) -> dict:
    d = res.to_dict()
    out = {"target": d.pop("target"), "peak_bytes": d.pop("peak_bytes"), "flops": d.pop("flops"), **d}
    if compare:
        out["compare"] = [{"label": label, "options": r.options.to_dict(), "peak_bytes": r.peak_bytes,
                           "flops": r.flops, "stages": {s["name"]: s["peak_bytes"] for s in r.stages},
                           "gpu_times": r.gpu_times} for label, r in compare]
    return out


__all__ = ["render", "to_json"]
