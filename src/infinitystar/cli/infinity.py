"""`infinitystar infinity train-tokenizer CONFIG`, `infinitystar infinity train CONFIG` and `infinitystar infinity
swap-tokenizer`: the tiny Infinity text-to-image model on Shapes World (docs/infinity.md, "A tiny Infinity on Shapes
World")."""
from __future__ import annotations

import json

from infinitystar.convert.strict import CheckpointError
from infinitystar.tokenizer import infinity_training
from infinitystar.train import infinity as infinity_train
from infinitystar.train.config import ConfigError


def _overrides(args) -> list[str]:
    """Flags -> `key=value` overrides, applied after the config file (flags win)."""
    pairs = {"output_dir": args.output_dir, "seed": args.seed, "device": args.device,
             "train.max_steps": args.steps, "train.batch_size": args.batch_size, "train.threads": args.threads}
    return [f"{k}={json.dumps(v)}" for k, v in pairs.items() if v is not None] + list(args.overrides)


def _cmd_train_tokenizer(args) -> int:
    try:
        r = infinity_training.train(args.config, resume=args.resume, overrides=_overrides(args), until=args.until)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"step": r.step, "output_dir": str(r.output_dir), "model": str(r.model_dir) if r.model_dir
                      else None, "val_psnr": r.val_psnr, "seconds": round(r.seconds, 1)}))
    return 0


def _cmd_train(args) -> int:
    try:
        r = infinity_train.train(args.config, resume=args.resume, overrides=_overrides(args), until=args.until)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"step": r.step, "output_dir": str(r.output_dir), "model": str(r.model_dir) if r.model_dir
                      else None, "loss": r.loss, "seconds": round(r.seconds, 1)}))
    return 0


def _cmd_swap_tokenizer(args) -> int:
    try:
        out = infinity_train.replace_tokenizer(args.model, args.tokenizer, args.out)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(json.dumps({"model": str(out), "tokenizer": args.tokenizer}))
    return 0


def add_cli(subparsers) -> None:
    top = subparsers.add_parser("infinity", help="train the tiny Infinity text-to-image model (2-D tokenizer, "
                                                 "transformer) on Shapes World images")
    sub = top.add_subparsers(dest="infinity_command", required=True)
    for name, func, help_ in (
            ("train-tokenizer", _cmd_train_tokenizer,
             "train the 2-D BSQ tokenizer (configs/infinity_shapes_tokenizer.yaml)"),
            ("train", _cmd_train, "train the transformer and export a model folder (configs/infinity_shapes.yaml)")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", help="YAML config; flags override it")
        p.add_argument("--output-dir", help="run folder (checkpoints, metrics.jsonl, model/)")
        p.add_argument("--steps", type=int, help="train.max_steps")
        p.add_argument("--batch-size", type=int, help="train.batch_size")
        p.add_argument("--seed", type=int)
        p.add_argument("--device", help="cpu, cuda, cuda:1 or auto")
        p.add_argument("--threads", type=int, help="torch threads for this run")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="override any config key, e.g. --set optim.lr=5e-4 (repeatable)")
        p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue from the latest checkpoint of the run (or the one given)")
        p.add_argument("--until", type=int, metavar="STEP", help="stop (and checkpoint) after this step")
        p.set_defaults(func=func)
    p = sub.add_parser("swap-tokenizer", help="copy an Infinity model folder with another tokenizer whose encoder is "
                                              "bit-identical (a decoder fine-tune): same codes, new pixels")
    p.add_argument("--model", required=True, help="Infinity model folder (e.g. runs/infinity_shapes/transformer/model)")
    p.add_argument("--tokenizer", required=True, help="InfinityVAE folder (e.g. .../tokenizer_decoder/model)")
    p.add_argument("--out", required=True, help="new model folder")
    p.set_defaults(func=_cmd_swap_tokenizer)
