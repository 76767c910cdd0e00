"""`infinitystar parity DIR`: check a fixture folder made by the official code against this implementation."""
from __future__ import annotations

from infinitystar.cli.errors import debug_requested
from infinitystar.parity import main as parity_main


def _cmd_parity(args) -> int:
    return parity_main(args.dir, debug=debug_requested(getattr(args, "debug", False)))


def add_cli(subparsers) -> None:
    sp = subparsers.add_parser("parity", help="check a fixture folder made by the official code against this "
                                              "implementation")
    sp.add_argument("dir")
    sp.set_defaults(func=_cmd_parity)
