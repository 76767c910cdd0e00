"""`infinitystar infinity train-tokenizer CONFIG`, `infinitystar infinity train CONFIG` and `infinitystar infinity
swap-tokenizer`: the tiny Infinity text-to-image model on Shapes World (docs/infinity.md, "A tiny Infinity on Shapes
World")."""
from __future__ import annotations

import json

from infinitystar.cli.train import add_legacy_flags, deprecated, legacy_overrides, run_training
from infinitystar.runtime import UserError
from infinitystar.train import infinity as infinity_train


def _alias(kind: str, old: str):
    """An older spelling of `infinitystar train KIND CONFIG`."""
    def cmd(args) -> int:
        deprecated(f"infinitystar infinity {old} {args.config}", f"infinitystar train {kind} {args.config}")
        return run_training(kind, args.config, legacy_overrides(args), args.resume, args.until, args.precision)
    return cmd


def _cmd_swap_tokenizer(args) -> int:
    try:
        out = infinity_train.replace_tokenizer(args.model, args.tokenizer, args.out)
    except ValueError as e:
        raise UserError(str(e)) from e
    print(json.dumps({"model": str(out), "tokenizer": args.tokenizer}))
    return 0


def add_cli(subparsers) -> None:
    top = subparsers.add_parser("infinity", help="train the tiny Infinity text-to-image model (2-D tokenizer, "
                                                 "transformer) on Shapes World images")
    sub = top.add_subparsers(dest="infinity_command", required=True)
    for name, kind in (("train-tokenizer", "infinity-tokenizer"), ("train", "infinity")):
        p = sub.add_parser(name, help=f"deprecated: use `infinitystar train {kind} CONFIG`")
        p.add_argument("config", help="YAML config; flags override it")
        add_legacy_flags(p)
        p.set_defaults(func=_alias(kind, name))
    p = sub.add_parser("swap-tokenizer", help="copy an Infinity model folder with another tokenizer whose encoder is "
                                              "bit-identical (a decoder fine-tune): same codes, new pixels")
    p.add_argument("--model", required=True, help="Infinity model folder (e.g. runs/infinity_shapes/transformer/model)")
    p.add_argument("--tokenizer", required=True, help="InfinityVAE folder (e.g. .../tokenizer_decoder/model)")
    p.add_argument("--out", required=True, help="new model folder")
    p.set_defaults(func=_cmd_swap_tokenizer)
