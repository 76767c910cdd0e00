"""`infinitystar bench`: generation speed and memory (sparse vs dense attention, or a model folder's real
generations) and training throughput (`--train`)."""
from __future__ import annotations

from infinitystar import bench as generation_bench
from infinitystar.train.bench import run_train_bench


def _cmd_bench(args) -> int:
    if args.train:
        run_train_bench(device=args.device, as_json=args.json)
    elif args.model is not None:
        generation_bench.run_model(args.model, num_frames=args.frames, device=args.device, as_json=args.json)
    else:
        generation_bench.run(clips=tuple(args.clips), device=args.device, as_json=args.json)
    return 0


def add_cli(subparsers) -> None:
    sp = subparsers.add_parser("bench", help="generation speed and memory: sparse vs dense attention as videos grow")
    sp.add_argument("--clips", type=int, nargs="+", default=[1, 2, 4, 8])
    sp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    sp.add_argument("--json", action="store_true", help="one JSON line per case")
    sp.add_argument("--train", action="store_true", help="training throughput instead of generation")
    sp.add_argument("--model", nargs="?", const="default", default=None,
                    help="time real generations with a model folder instead (no value: the shipped default model)")
    sp.add_argument("--frames", type=int, default=17, help="frames per video with --model")
    sp.set_defaults(func=_cmd_bench)
