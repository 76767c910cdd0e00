"""`infinitystar convert SRC DST` (one official checkpoint -> this package's folder layout) and
`infinitystar convert --release DIR OUT` (an official release folder -> a complete model folder)."""
from __future__ import annotations

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.convert.cli import DTYPES, KINDS, convert, kinds_list
from infinitystar.convert.release import convert_release
from infinitystar.runtime import UserError


def _cmd_convert(args) -> int:
    if args.release:
        return _cmd_release(args)
    given = [f for f, v in (("--text-encoder", args.text_encoder), ("--transformer", args.transformer),
                            ("--vae", args.vae), ("--variant", args.variant), ("--license", args.license)) if v]
    if given:
        raise UserError(f"{', '.join(given)} apply to --release only")
    try:
        res = convert(args.src, args.dst, args.kind, text_maxlen=args.text_maxlen, preset=args.preset,
                      dtype=None if args.dtype == "keep" else args.dtype, overwrite=args.force)
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        raise UserError(str(e)) from e
    print(f"converted {res.src} ({res.kind}, {res.num_params / 1e6:.2f} M parameters, "
          f"{str(res.dtype).replace('torch.', '')}) -> {res.dst}")
    return 0


def _cmd_release(args) -> int:
    if args.kind or args.preset:
        raise UserError("--kind and --preset do not apply to --release (each part's kind and preset follow from "
                        "the release's file names)")
    try:
        res = convert_release(args.src, args.dst, transformer=args.transformer, vae=args.vae,
                              text_encoder=args.text_encoder, variant=args.variant, license=args.license,
                              text_maxlen=args.text_maxlen, dtype=None if args.dtype == "keep" else args.dtype,
                              overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise UserError(str(e)) from None
    print(f"converted the {res.family} release {res.parts.transformer.name} + {res.parts.vae.name} + "
          f"{res.parts.text_encoder.name} ({res.transformer.num_params / 1e6:.2f} M + "
          f"{res.tokenizer.num_params / 1e6:.2f} M parameters) -> {res.out}")
    return 0


def add_cli(subparsers) -> None:
    """Register `infinitystar convert` on the main command's subparsers."""
    sp = subparsers.add_parser(
        "convert", help="convert an official checkpoint (or a whole release folder) to this package's layout",
        description="Read an official checkpoint (.pth, .safetensors, or a folder of HF shards), load it strictly "
                    "and write DST/config.json + DST/model.safetensors. Kinds: " + kinds_list() + ". With "
                    "--release, SRC is an official release folder (transformer, tokenizer, flan-t5-xl folder) and "
                    "DST becomes a complete model folder with model_index.json and a model card.")
    sp.add_argument("src", help="official file or HF-sharded folder (--release: the release folder)")
    sp.add_argument("dst", help="output folder")
    sp.add_argument("--release", action="store_true", help="convert a whole official release folder")
    sp.add_argument("--kind", choices=list(KINDS), default=None, help="what SRC holds (default: read from its keys)")
    sp.add_argument("--text-maxlen", type=int, default=None,
                    help="InfinityStar transformers: RoPE offset of visual tokens (default 512, as released)")
    sp.add_argument("--preset", default=None,
                    help="architecture preset instead of inferring it: " + " | ".join(
                        f"{k.name}: {k.presets}" for k in KINDS.values()))
    sp.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                    help="dtype of the written tensors (default: the checkpoint's)")
    sp.add_argument("--force", action="store_true", help="replace what DST already holds")
    sp.add_argument("--transformer", help="--release: the transformer, if its name is not the released one")
    sp.add_argument("--vae", help="--release: the tokenizer file, if its name is not the released one")
    sp.add_argument("--text-encoder", help="--release: the local flan-t5-xl folder (default: found in SRC)")
    sp.add_argument("--variant", help="--release: 480p or 720p (InfinityStar), 2b or 8b (Infinity); default: "
                                      "read from the transformer's name")
    sp.add_argument("--license", help="--release: the licence text for the model card")
    sp.set_defaults(func=_cmd_convert)
