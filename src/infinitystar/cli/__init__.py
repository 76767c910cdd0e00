"""The `infinitystar` command: one module per command group, each registering its subcommands with `add_cli`.
User errors end as one line and exit status 2 (`errors.run_command`); `--debug` shows their traceback."""
from __future__ import annotations

import argparse
from typing import Optional

from infinitystar.cli import bench, convert, demo, generate, infinity, parity, plan, tokenizer, train
from infinitystar.cli.args import OneLineParser
from infinitystar.cli.errors import USER_ERRORS, run_command


def _add_debug_flag(parser: argparse.ArgumentParser, top: bool) -> None:
    """`--debug` on the top parser and every subcommand, so it may be given anywhere on the line. Subparsers use
    SUPPRESS as default so they never overwrite a `--debug` given before the subcommand."""
    parser.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line (or set INFINITYSTAR_DEBUG=1)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_debug_flag(sub, top=False)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="infinitystar", description="Bitwise next-scale autoregressive video and image generation "
                                                      "(InfinityStar, Infinity).")
    sub = p.add_subparsers(dest="command", required=True)
    parity.add_cli(sub)
    generate.add_cli(sub)
    bench.add_cli(sub)
    plan.add_cli(sub)
    train.add_cli(sub)
    tokenizer.add_cli(sub)
    convert.add_cli(sub)
    infinity.add_cli(sub)
    demo.add_cli(sub)
    _add_debug_flag(p, top=True)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help (0), or a bad argument (2) whose one line argparse has printed
        return e.code
    return run_command(args.func, args)


__all__ = ["main", "build_parser", "USER_ERRORS"]
