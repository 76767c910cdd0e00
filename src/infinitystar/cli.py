"""The `infinitystar` command."""
from __future__ import annotations

import argparse
import sys


def _cmd_parity(args) -> int:
    from infinitystar.parity import main as parity_main
    return parity_main(args.dir)


def _cmd_bench(args) -> int:
    from infinitystar.bench import run
    run(clips=tuple(args.clips), device=args.device, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinitystar", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("parity", help="check a fixture folder made by the official code against this implementation")
    sp.add_argument("dir")
    sp.set_defaults(func=_cmd_parity)
    sp = sub.add_parser("bench", help="generation speed and memory: sparse vs dense attention as videos grow")
    sp.add_argument("--clips", type=int, nargs="+", default=[1, 2, 4, 8])
    sp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    sp.add_argument("--json", action="store_true", help="one JSON line per case")
    sp.set_defaults(func=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
