"""Generation quality under bf16: the Shapes World evaluation of the shipped default model, text-to-image and
text-to-video, with the sampling loop and the decoder in fp32 and in the `auto` precision (same seeds).

    python benchmarks/precision_eval.py [--n 50] [--out precision_eval.json]

Generation goes through the sampling loop and the tokenizer's decoder directly (the pipeline's model defaults:
CFG, temperatures), which take a resolved precision.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from infinitystar.pipelines.infinitystar import InfinityStarPipeline
from infinitystar.runtime import precision_name, resolve_device, resolve_precision
from infinitystar.sampling.generate import Caption, generate
from infinitystar.shapes.benchmark import evaluate


def generator_for(pipe, dtype: torch.dtype):
    d = pipe.defaults

    def run(items, seed: int):
        schedule = pipe.pyramid.build(items[0].num_frames)
        tau = [d.tau_image if s.clip == 0 else d.tau_video for s in schedule.scales]
        feats, mask = pipe.text_encoder.encode([it.prompts[0] for it in items], pipe.device)
        out = generate(pipe.transformer, schedule, Caption(feats, mask), guidance=d.guidance_config(), tau=tau,
                       generator=torch.Generator().manual_seed(seed), precision=dtype)
        video = pipe.tokenizer.decode(out.codes, precision=dtype)
        frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        return list(frames)
    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="samples per task")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=Path("precision_eval.json"))
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    pipe = InfinityStarPipeline.from_pretrained("default", device=device)
    results = {}
    for prec in ("fp32", "auto"):
        dtype = resolve_precision(prec, device)
        r = evaluate(generator_for(pipe, dtype), n_per_task=a.n, tasks=("t2i", "t2v"), progress=False)
        results[precision_name(dtype)] = r
        print(json.dumps({"precision": precision_name(dtype), **{k: v for k, v in r.items() if k != "samples"}}),
              flush=True)
    a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
