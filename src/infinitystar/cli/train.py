"""`infinitystar train {generator,tokenizer,infinity,infinity-tokenizer} CONFIG`, `infinitystar extract-features`,
`infinitystar export`, `infinitystar grow`, `infinitystar average`, and `python -m infinitystar.train [generator]
CONFIG` (what torchrun runs).

Every training command prints one JSON summary line (`TrainResult.summary`). The older spellings
(`infinitystar train CONFIG`, `infinitystar tokenizer train MODE`, `infinitystar infinity train[-tokenizer]`) are
aliases that print a one-line deprecation note and run `run_training`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from infinitystar.cli.args import OneLineParser, positive_int
from infinitystar.cli.errors import run_command
from infinitystar.checkpoint_io import CheckpointError
from infinitystar.runtime import PRECISIONS, UserError, resolve_device
from infinitystar.train import infinity, infinity_tokenizer, tokenizer, trainer
from infinitystar.train.average import average_models
from infinitystar.train.config import ConfigError, RunConfig, load_config
from infinitystar.train.export import export_model
from infinitystar.train.features import extract_features
from infinitystar.train.grow import grow_folder
from infinitystar.train.trainer import load_tokenizer, spec_from_config

# kind -> train(config, *, resume, overrides, until) of that trainer
TRAINERS = {"generator": trainer.train, "tokenizer": tokenizer.train, "infinity": infinity.train,
            "infinity-tokenizer": infinity_tokenizer.train}


def deprecated(old: str, new: str) -> None:
    print(f"note: `{old}` is deprecated and will be removed; use `{new}`", file=sys.stderr)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags every training command shares."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of output_dir (or from a given checkpoint folder)")
    p.add_argument("--until", type=positive_int, default=None, metavar="STEP",
                   help="stop after this step and checkpoint (the LR schedule still runs to train.max_steps)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="train.precision: auto (bf16 autocast on CUDA and on CPUs with native bf16), fp32 or bf16")


# flags of the older spellings -> the config keys they set
LEGACY_FLAGS = {"output_dir": ("output_dir", str, "run folder (checkpoints, metrics.jsonl, model/)"),
                "steps": ("train.max_steps", int, "train.max_steps"),
                "batch_size": ("train.batch_size", int, "train.batch_size"),
                "seed": ("seed", int, "seed"), "device": ("device", str, "cpu, cuda, cuda:1 or auto"),
                "threads": ("train.threads", int, "torch threads for this run")}


def add_legacy_flags(p: argparse.ArgumentParser) -> None:
    """The older spellings' shorthand flags, each one config key (`--set` says the same)."""
    for name, (_, tp, help_) in LEGACY_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=tp, help=help_)
    add_run_args(p)


def legacy_overrides(args, **extra: str) -> list[str]:
    """`key=value` overrides from the shorthand flags (and `extra`: attribute -> key), before the `--set` ones."""
    keys = {name: key for name, (key, _, _) in LEGACY_FLAGS.items()} | extra
    return [f"{key}={json.dumps(getattr(args, name))}" for name, key in keys.items()
            if getattr(args, name) is not None] + list(args.overrides)


def run_training(kind: str, config, overrides: Sequence[str] = (), resume: Optional[str] = None,
                 until: Optional[int] = None, precision: Optional[str] = None) -> int:
    """Train `kind` from a config file (or config object) and print the JSON summary (rank 0)."""
    overrides = [*overrides, *([f"train.precision={precision}"] if precision else [])]
    try:
        result = TRAINERS[kind](config, resume=resume, overrides=overrides, until=until)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.summary()), flush=True)
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", metavar="KIND", help=f"what to train: {', '.join(TRAINERS)}")
    p.add_argument("config", nargs="?", help="the run's config file (.yaml, .toml or .json)")
    add_run_args(p)


def _cmd_train(args) -> int:
    kind, config = args.kind, args.config
    if kind not in TRAINERS:
        if config is not None:
            raise UserError(f"unknown training kind {kind!r}; choose one of {', '.join(TRAINERS)}")
        deprecated(f"infinitystar train {kind}", f"infinitystar train generator {kind}")
        kind, config = "generator", kind
    elif config is None:
        raise UserError(f"give the run's config file: infinitystar train {kind} CONFIG")
    return run_training(kind, config, args.overrides, args.resume, args.until, args.precision)


def _cmd_extract(args) -> int:
    try:
        cfg = load_config(args.config, args.overrides) if args.config else RunConfig()
        rank = int(os.environ.get("RANK", "0")) if args.rank is None else args.rank
        world = int(os.environ.get("WORLD_SIZE", "1")) if args.world_size is None else args.world_size
        device = resolve_device(args.device or cfg.device, int(os.environ.get("LOCAL_RANK", rank)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tok_path = args.tokenizer or cfg.tokenizer.path
        if tok_path is None:
            raise ConfigError("give --tokenizer (or tokenizer.path in --config)")
        manifests = args.manifest or cfg.data.manifests
        if not manifests:
            raise ConfigError("give a manifest (or data.manifests in --config)")
        out = args.out or cfg.data.latent_cache
        if out is None:
            raise ConfigError("give --out (or data.latent_cache in --config)")
        stats = extract_features(manifests, load_tokenizer(tok_path, device), out, rank, world,
                                 spec=spec_from_config(cfg), device=device,
                                 video_caption_fields=cfg.data.video_caption_fields,
                                 image_caption_fields=cfg.data.image_caption_fields, progress=not args.json)
    except (ConfigError, ValueError) as e:
        raise UserError(str(e)) from e
    summary = {"rank": rank, "world_size": world, "out": str(out), **stats.to_dict()}
    print(json.dumps(summary) if args.json else
          f"rank {rank}/{world}: wrote {stats.written}, already cached {stats.existing}, skipped {stats.skipped} "
          f"in {stats.seconds:.1f} s -> {out}")
    for m in stats.messages:
        print(f"  skipped {m}", file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    try:
        defaults = json.loads(args.defaults) if args.defaults else None
        ckpt = export_model(args.checkpoint, args.out, ema=not args.raw, tokenizer=args.tokenizer,
                            text_encoder=args.text_encoder, defaults=defaults)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as e:
        raise UserError(str(e)) from e
    print(f"exported {ckpt} -> {args.out}")
    return 0


def _cmd_grow(args) -> int:
    try:
        out = grow_folder(args.src, args.out, args.depth)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        raise UserError(str(e)) from e
    print(f"grew {args.src} to depth {args.depth} -> {out}")
    return 0


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _cmd_average(args) -> int:
    out = average_models(args.models, args.out, args.weights)   # its errors are UserError / CheckpointError
    print(f"averaged {len(args.models)} models -> {out}")
    return 0


def add_cli(subparsers) -> None:
    """Register `train`, `extract-features`, `export`, `grow` and `average` on the `infinitystar` command's
    subparsers."""
    p = subparsers.add_parser("train", help="train the generator, a tokenizer or the Infinity model from a config "
                                            "file (torchrun: python -m infinitystar.train CONFIG)",
                              description="infinitystar train {generator,tokenizer,infinity,infinity-tokenizer} CONFIG "
                                          "[--set k=v] [--resume] [--until N] [--precision P]")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)
    p = subparsers.add_parser("extract-features", help="encode manifest samples once into a latent cache "
                                                       "(torchrun splits the samples across ranks)")
    p.add_argument("manifest", nargs="*", help="JSONL manifest(s) or folders (default: data.manifests of --config)")
    p.add_argument("--config", help="training config whose data settings (size, fps, duration) to use")
    p.add_argument("--tokenizer", help="video tokenizer folder (default: tokenizer.path of --config)")
    p.add_argument("--out", help="cache folder (default: data.latent_cache of --config)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the config's device)")
    p.add_argument("--rank", type=int, default=None, help="this worker's shard (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides")
    p.add_argument("--json", action="store_true", help="print a JSON summary line")
    p.set_defaults(func=_cmd_extract)
    p = subparsers.add_parser("export", help="turn a training checkpoint into a model folder for the pipeline")
    p.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    p.add_argument("out", help="model folder to write")
    p.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the run's tokenizer.path)")
    p.add_argument("--text-encoder", help="text encoder folder (default: the run's text_encoder.path)")
    p.add_argument("--defaults", help="generation defaults as JSON, e.g. '{\"guidance_scale\": 3}'")
    p.set_defaults(func=_cmd_export)
    p = subparsers.add_parser("grow", help="write a deeper copy of a transformer folder that gives the same outputs "
                                           "(new blocks start as the identity); train it with model.init_from")
    p.add_argument("src", help="transformer folder (config.json + model.safetensors), e.g. a model folder's "
                               "transformer/")
    p.add_argument("out", help="folder to write (must not exist)")
    p.add_argument("--depth", type=positive_int, required=True, help="number of blocks of the grown transformer")
    p.set_defaults(func=_cmd_grow)
    p = subparsers.add_parser("average", help="write a model folder whose transformer and text encoder are the "
                                              "weighted mean of those of model folders sharing a tokenizer")
    p.add_argument("models", nargs="+", help="model folders (two or more; the first gives the pyramid and defaults)")
    p.add_argument("--out", required=True, help="model folder to write (must not exist)")
    p.add_argument("--weights", type=_weights, default=None,
                   help="one weight per model, comma-separated, scaled to sum to 1 (default: equal)")
    p.set_defaults(func=_cmd_average)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m infinitystar.train [generator] CONFIG [--resume] [--set k=v] ...` (the torchrun entry point)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in TRAINERS:
        argv.insert(0, "generator")   # the module trains the generator unless told otherwise
    p = OneLineParser(prog="python -m infinitystar.train", description="train from a config file")
    _add_train_args(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return run_command(_cmd_train, p.parse_args(argv))
