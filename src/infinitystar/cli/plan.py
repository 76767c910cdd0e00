"""`infinitystar plan NAME`: memory and time of a generation, computed by running the real code on the meta device."""
from __future__ import annotations

import json

from infinitystar.memory import add_memory_flags, memory_from_args
from infinitystar.plan import compare_options, plan, render, resolve, to_json
from infinitystar.plan.models import DEFAULT_TEXT_TOKENS, NAMES
from infinitystar.runtime import UserError


def _cmd_plan(args) -> int:
    try:
        target = resolve(args.name, frames=args.frames, prompt=args.prompt)
        options = memory_from_args(args)
        kw = dict(dtype=args.dtype, batch=args.batch, text_tokens=args.text_tokens, mfu=args.mfu)
        res = plan(target, options, **kw)
        compare = compare_options(target, **kw) if args.compare else []
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    print(json.dumps(to_json(res, compare)) if args.json else render(res, compare))
    return 0


def add_cli(subparsers) -> None:
    sp = subparsers.add_parser(
        "plan", help="predicted GPU memory and time of a generation (the real code on the meta device, no GPU)",
        description="Run a generation's real code (text encoder, transformer over every scale and clip with its KV "
                    "cache, VAE decoder) on the meta device: per stage, peak memory (weights, KV cache, "
                    "activations, workspace), FLOPs and the predicted time on A100 / H100 / H200.")
    sp.add_argument("name", help=f"{', '.join(NAMES)}, 'default' (the shipped model) or a model folder")
    sp.add_argument("--json", action="store_true", help="print one JSON object (peak_bytes, flops, stages, ...)")
    sp.add_argument("--frames", type=int, default=None, help="video frames (default: 81 for the official models, "
                                                             "17 for a model folder)")
    sp.add_argument("--batch", type=int, default=1, help="prompts per call (default 1)")
    sp.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS,
                    help=f"prompt length in T5 tokens for the named models (default {DEFAULT_TEXT_TOKENS})")
    sp.add_argument("--prompt", default=None, help="the prompt for a model folder (its own tokenizer)")
    sp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                    help="transformer weights and activations (default bf16; the text encoder is fp16, the VAE fp32)")
    sp.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOPs utilisation (default 0.35)")
    sp.add_argument("--compare", action="store_true",
                    help="also plan the option ladder (none, defaults, + VAE tiles, + sequential offload, + both)")
    add_memory_flags(sp)
    sp.set_defaults(func=_cmd_plan)


__all__ = ["add_cli"]
