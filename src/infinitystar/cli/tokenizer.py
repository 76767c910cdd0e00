"""`infinitystar tokenizer train ...`, `infinitystar tokenizer reconstruct IN OUT ...` and
`infinitystar tokenizer derive SRC DST ...`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import infinitystar
from infinitystar.cli.args import check_output_file, positive_int
from infinitystar.cli.train import add_legacy_flags, deprecated, legacy_overrides, run_training
from infinitystar.checkpoint_io import CheckpointError
from infinitystar.media import MediaError, export_to_video, load_image, load_video, save_image
from infinitystar.runtime import PRECISIONS, UserError, precision_name, resolve_device, resolve_precision
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.tokenizer.training_eval import (frames_to_video, psnr, psnr_per_frame, reconstruct, ssim,
                                                  ssim_per_frame, video_to_frames)
from infinitystar.tokenizer.video_vae import VideoVAE
from infinitystar.train.tokenizer import (DEFAULT_PYRAMID, PYRAMID_FILE, config_from_dict, load_config,
                                         save_tokenizer_folder)


def default_tokenizer_dir() -> Path:
    """The built-in tokenizer shipped as package data."""
    return Path(infinitystar.__file__).parent / "weights" / "default" / "tokenizer"


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    """The older spelling of `infinitystar train tokenizer CONFIG --set mode=MODE`."""
    deprecated(f"infinitystar tokenizer train {args.mode}" + (f" --config {args.config}" if args.config else ""),
               f"infinitystar train tokenizer {args.config or 'CONFIG'} --set mode={args.mode}")
    overrides = [f"mode={args.mode}", *legacy_overrides(args, init="init", lr="optim.lr")]
    cfg = load_config(args.config, overrides) if args.config else config_from_dict({}, overrides)
    return run_training("tokenizer", cfg, resume=args.resume, until=args.until, precision=args.precision)


# --------------------------------------------------------------------------------------------------
# reconstruct
# --------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_input(path: Path):
    """uint8 frames (T, H, W, 3) of a video (.mp4 and anything PyAV reads, .npy/.npz) or an image."""
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return load_image(path)[None]
        return load_video(path)
    except MediaError as e:
        raise UserError(str(e)) from e
    except (OSError, ValueError) as e:   # e.g. a .npy that is not an array of frames
        raise UserError(f"cannot read {path}: {e}")


def trim_frames(frames, temporal_stride: int, warn=None):
    """Keep the largest 1 + k * stride prefix; warn when frames are dropped."""
    n = len(frames)
    keep = 1 + (n - 1) // temporal_stride * temporal_stride
    if keep != n and warn is not None:
        warn(f"warning: {n} frames is not 1 + {temporal_stride}k; using the first {keep}")
    return frames[:keep]


def load_tokenizer_folder(model: Optional[str], device):
    """(VideoVAE, pyramid or None, folder) from a tokenizer folder; the default is the built-in one."""
    folder = Path(model) if model else default_tokenizer_dir()
    if not (folder / "config.json").is_file():
        hint = ("this version ships no built-in tokenizer; pass --model DIR (a folder written by "
                "`infinitystar tokenizer train`)" if model is None else "not a tokenizer folder (no config.json)")
        raise UserError(f"{folder}: {hint}")
    try:
        vae = VideoVAE.from_pretrained(folder, device=device)
        pfile = folder / PYRAMID_FILE
        pyramid = (PyramidConfig.from_dict(json.loads(pfile.read_text())) if pfile.is_file()
                   else PyramidConfig(pn=None, temporal_compression=vae.config.temporal_stride, **DEFAULT_PYRAMID))
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as e:   # FileNotFoundError: a missing part
        raise UserError(f"{folder}: {e}")
    return vae, pyramid, folder


def write_output(frames, out: Path, fps: int, lossless: bool) -> None:
    try:
        if out.suffix.lower() in IMAGE_SUFFIXES:
            if len(frames) != 1:
                raise UserError(f"{out} is an image but the reconstruction has {len(frames)} frames; "
                                f"use .mp4 or .npy")
            save_image(frames[0], out)
        else:
            export_to_video(frames, out, fps=fps, lossless=lossless)
    except MediaError as e:
        raise UserError(str(e)) from e
    except OSError as e:   # disk full, quota: the write is atomic, an existing file is intact
        raise UserError(f"{out}: cannot write ({e.strerror or e})")


def cmd_reconstruct(args) -> int:
    t0 = time.perf_counter()
    src, out = Path(args.input), Path(args.output)
    check_output_file(out, "output")
    if out.suffix.lower() not in (".mp4", ".npy", *IMAGE_SUFFIXES):
        raise UserError(f"output must end in .mp4, .npy or an image suffix, got {out.name}")
    if args.scales is not None and args.continuous:
        raise UserError("--scales and --continuous exclude each other")
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    frames = read_input(src)
    vae, pyramid, folder = load_tokenizer_folder(args.model, device)
    frames = trim_frames(frames, vae.config.temporal_stride, lambda m: print(m, file=sys.stderr))
    try:
        video = frames_to_video(frames, device)
        recon = reconstruct(vae, video, None if args.continuous else pyramid, args.scales, precision=dtype)
    except ValueError as e:
        raise UserError(str(e)) from e
    rec = video_to_frames(recon)[0]
    write_output(rec, out, args.fps, args.lossless)
    per_psnr, per_ssim = psnr_per_frame(frames, rec), ssim_per_frame(frames, rec)
    summary = {"input": str(src), "output": str(out), "model": str(folder), "frames": int(len(frames)),
               "height": int(frames.shape[1]), "width": int(frames.shape[2]),
               "scales": "continuous" if args.continuous else (args.scales if args.scales is not None else "all"),
               "precision": precision_name(dtype), "psnr": round(psnr(frames, rec), 4),
               "ssim": round(ssim(frames, rec), 5),
               "per_frame": [{"frame": i, "psnr": round(p, 4), "ssim": round(s, 5)}
                             for i, (p, s) in enumerate(zip(per_psnr, per_ssim))],
               "seconds": round(time.perf_counter() - t0, 3)}
    print(json.dumps(summary))
    return 0


# --------------------------------------------------------------------------------------------------
# derive
# --------------------------------------------------------------------------------------------------

def parse_scales(text: str) -> list[list[int]]:
    """"1,2,4,8" -> [[1, 1], [2, 2], [4, 4], [8, 8]]; "1x2,2x4" -> [[1, 2], [2, 4]] (h x w)."""
    try:
        out = [[int(v) for v in (part.split("x") if "x" in part else (part, part))] for part in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(hw) != 2 or min(hw) < 1 for hw in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 1,2,4,8 or 1x2,2x4, got {text!r}")
    return out


def cmd_derive(args) -> int:
    """The same weights with another pixel_repeat and/or pyramid, as a new tokenizer folder."""
    vae, pyramid, src = load_tokenizer_folder(args.source, "cpu")
    out = Path(args.output)
    if out.resolve() == src.resolve():
        raise UserError("the output folder must differ from the source folder")
    config = vae.config.to_dict()
    if args.pixel_repeat is not None:
        config["pixel_repeat"] = args.pixel_repeat
    pyr = pyramid.to_dict()
    if args.scales is not None:
        n = len(args.scales)
        pyr.update(custom_scales=args.scales, image_repetition=[1] * n, video_repetition=[1] * n)
    try:
        derived = VideoVAE(type(vae.config).from_dict(config))
        pyramid = PyramidConfig.from_dict(pyr)
        pyramid.build(1)
    except ValueError as e:
        raise UserError(str(e)) from e
    derived.load_state_dict(vae.state_dict())
    save_tokenizer_folder(derived, pyramid, out)
    print(json.dumps({"output": str(out), "pixel_repeat": derived.config.pixel_repeat,
                      "spatial_stride": derived.config.spatial_stride, "scales": pyramid.custom_scales}))
    return 0


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------

def add_cli(subparsers) -> None:
    """Register `tokenizer` with its `train`, `reconstruct` and `derive` subcommands on the main command's
    subparsers."""
    tok = subparsers.add_parser("tokenizer", help="train the video tokenizer or measure its reconstructions")
    sub = tok.add_subparsers(dest="tokenizer_command", required=True)

    p = sub.add_parser("train", help="deprecated: use `infinitystar train tokenizer CONFIG`",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=["continuous", "bitwise"],
                   help="continuous VAE, or the multi-scale bitwise tokenizer (from --init or from scratch)")
    p.add_argument("--config", help="YAML config (configs/tokenizer_*.yaml); flags override it")
    p.add_argument("--init", help="tokenizer folder to start from (bitwise: knowledge inheritance from a "
                                  "continuous VAE)")
    p.add_argument("--lr", type=float, help="optim.lr")
    add_legacy_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("reconstruct", help="encode, quantize and decode a video; print PSNR/SSIM as JSON")
    p.add_argument("input", help="video (.mp4, .npy) or image; frames must be multiples of the spatial stride")
    p.add_argument("output", help="reconstruction (.mp4, .npy, or .png for one frame)")
    p.add_argument("--scales", type=int, default=None, metavar="K",
                   help="use only the first K scales of every clip's pyramid (default: all)")
    p.add_argument("--continuous", action="store_true", help="skip the quantizer (continuous VAE round trip)")
    p.add_argument("--model", default=None, help="tokenizer folder (default: the built-in tokenizer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto (default): bf16 autocast for the encoder and decoder on CUDA and on CPUs with native "
                        "bf16, else fp32; fp32; bf16 (the quantizer always runs in fp32)")
    p.add_argument("--fps", type=positive_int, default=16, help="frame rate of an .mp4 output")
    p.add_argument("--lossless", action="store_true", help="lossless RGB H.264 for an .mp4 output")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("derive", help="write a tokenizer folder with the same weights and another pixel_repeat "
                                      "or pyramid")
    p.add_argument("source", help="tokenizer folder")
    p.add_argument("output", help="new tokenizer folder")
    p.add_argument("--pixel-repeat", type=positive_int, default=None,
                   help="enlarge frames by this factor before encoding and average the output back (the latent "
                        "grid grows by it)")
    p.add_argument("--scales", type=parse_scales, default=None,
                   help="the pyramid's scales, e.g. 1,2,3,4,6,8,12,16 (repetitions reset to 1)")
    p.set_defaults(func=cmd_derive)

