"""`infinitystar bench`: generation speed and memory (sparse vs dense attention, or a model folder's real
generations), generator training throughput (`--train`) and the tokenizer's training step (`--tokenizer`)."""
from __future__ import annotations

import argparse

from infinitystar import bench as generation_bench
from infinitystar.runtime import PRECISIONS
from infinitystar.train.bench import run_tokenizer_bench, run_train_bench


def _cmd_bench(args) -> int:
    if args.train:
        run_train_bench(args.config, precision=args.precision, device=args.device, steps=args.steps,
                        micro_batch=args.micro_batch, backend=args.attention_backend, compile=args.compile,
                        as_json=args.json)
    elif args.tokenizer:
        run_tokenizer_bench(args.config, precision=args.precision, device=args.device, steps=args.steps,
                            as_json=args.json)
    elif args.model is not None:
        generation_bench.run_model(args.model, num_frames=args.frames, device=args.device, as_json=args.json,
                                   precision=args.precision)
    else:
        generation_bench.run(clips=tuple(args.clips), device=args.device, as_json=args.json,
                             precision=args.precision, width=args.width, depth=args.depth)
    return 0


def add_cli(subparsers) -> None:
    sp = subparsers.add_parser("bench", help="speed and memory of generation (sparse vs dense attention, or a model "
                                             "folder), generator training (--train) or tokenizer training "
                                             "(--tokenizer)")
    sp.add_argument("--clips", type=int, nargs="+", default=[1, 2, 4, 8])
    sp.add_argument("--width", type=int, default=256, help="transformer width of the sparse/dense comparison")
    sp.add_argument("--depth", type=int, default=4, help="transformer depth of the sparse/dense comparison")
    sp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (the JSON says which ran)")
    sp.add_argument("--json", action="store_true", help="one JSON line per case")
    sp.add_argument("--train", action="store_true", help="generator training throughput instead of generation")
    sp.add_argument("--tokenizer", action="store_true", help="the tokenizer trainer's step time")
    sp.add_argument("--config", default=None, help="run config of --train / --tokenizer (default: "
                                                   "configs/default_model.yaml / default_tokenizer_continuous.yaml)")
    sp.add_argument("--steps", type=int, default=5, help="timed steps of --train / --tokenizer (median)")
    sp.add_argument("--micro-batch", type=int, default=None, help="--train: samples per step (default: the config's)")
    sp.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="--train: the blocks under torch.compile (default: the config's train.compile)")
    sp.add_argument("--attention-backend", default=None, choices=["grouped", "sdpa", "flex"],
                    help="--train: how the packed attention runs (default: auto)")
    sp.add_argument("--model", nargs="?", const="default", default=None,
                    help="time real generations with a model folder instead (no value: the shipped default model)")
    sp.add_argument("--frames", type=int, default=17, help="frames per video with --model")
    sp.set_defaults(func=_cmd_bench)
