"""The generator's training commands: `infinitystar train`, `infinitystar extract-features`, `infinitystar export`,
and `python -m infinitystar.train CONFIG` (what torchrun runs)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from infinitystar.cli.errors import run_command
from infinitystar.convert.strict import CheckpointError
from infinitystar.train.config import ConfigError, RunConfig, load_config
from infinitystar.train.distributed import resolve_device
from infinitystar.train.export import export_model
from infinitystar.train.features import extract_features
from infinitystar.train.trainer import load_tokenizer, spec_from_config, train


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (.yaml or .toml)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint of output_dir (or from a given checkpoint folder)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    p.add_argument("--until", type=int, default=None, metavar="STEP",
                   help="stop after this step and checkpoint (the LR schedule still runs to train.max_steps)")


def _cmd_train(args) -> int:
    result = train(args.config, resume=args.resume, overrides=args.overrides, until=args.until)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {result.step}, loss {result.loss}, checkpoint {result.checkpoint}")
    return 0


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
        raise SystemExit(f"error: {e}")
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
        raise SystemExit(f"error: {e}")
    print(f"exported {ckpt} -> {args.out}")
    return 0


def add_cli(subparsers) -> None:
    """Register `train`, `extract-features` and `export` on the `infinitystar` command's subparsers."""
    p = subparsers.add_parser("train", help="train the generator from a config file (torchrun: "
                                            "python -m infinitystar.train CONFIG)")
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


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m infinitystar.train CONFIG [--resume] [--set k=v]` (the torchrun entry point)."""
    p = argparse.ArgumentParser(prog="python -m infinitystar.train", description="train the InfinityStar generator")
    _add_train_args(p)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    return run_command(_cmd_train, p.parse_args(argv))
