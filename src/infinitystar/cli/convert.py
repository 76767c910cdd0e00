"""`infinitystar convert SRC DST`: an official checkpoint -> this package's folder layout."""
from __future__ import annotations

from infinitystar.convert.cli import DTYPES, KINDS, kinds_list, convert
from infinitystar.convert.strict import CheckpointError


def _cmd_convert(args) -> int:
    try:
        res = convert(args.src, args.dst, args.kind, text_maxlen=args.text_maxlen, preset=args.preset,
                      dtype=None if args.dtype == "keep" else args.dtype, overwrite=args.force)
    except (CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"error: {e}")
    print(f"converted {res.src} ({res.kind}, {res.num_params / 1e6:.2f} M parameters, "
          f"{str(res.dtype).replace('torch.', '')}) -> {res.dst}")
    return 0


def add_cli(subparsers) -> None:
    """Register `infinitystar convert` on the main command's subparsers."""
    sp = subparsers.add_parser(
        "convert", help="convert an official checkpoint to this package's folder layout",
        description="Read an official checkpoint (.pth, .safetensors, or a folder of HF shards), load it strictly "
                    "and write DST/config.json + DST/model.safetensors. Kinds: " + kinds_list())
    sp.add_argument("src", help="official file or HF-sharded folder")
    sp.add_argument("dst", help="output folder")
    sp.add_argument("--kind", choices=list(KINDS), default=None, help="what SRC holds (default: read from its keys)")
    sp.add_argument("--text-maxlen", type=int, default=None,
                    help="infinitystar-transformer only: RoPE offset of visual tokens (default 512, as released)")
    sp.add_argument("--preset", default=None,
                    help="architecture preset instead of inferring it: " + " | ".join(
                        f"{k.name}: {k.presets}" for k in KINDS.values()))
    sp.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                    help="dtype of the written tensors (default: the checkpoint's)")
    sp.add_argument("--force", action="store_true", help="replace DST's existing config.json/model.safetensors")
    sp.set_defaults(func=_cmd_convert)
