"""`infinitystar generate` (a video, or an image from an Infinity model) and `infinitystar eval shapes`: the
commands that run a model folder. The folder's model_index.json is read once and names the pipeline; the output
path, the device and the options are checked before any weights are read."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from infinitystar.cli import interactive
from infinitystar.cli.args import (check_image_file, check_output_file, check_prompts_read_whole, finite_float,
                                   positive_float, positive_int, seed)
from infinitystar.generation import (IMAGE_SUFFIXES, check_output, generate_image, generate_video, load_pipeline,
                                     model_index, save_result)
from infinitystar.memory import add_memory_flags, memory_from_args
from infinitystar.runtime import PRECISIONS, UserError, peak_memory_mb, read_utf8, resolve_device
from infinitystar.shapes.benchmark import evaluate, infinity_generator, pipeline_generator


WEIGHT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_dtypes(name: str) -> dict:
    """`--dtype`: the transformer's load dtype (the other parts keep theirs)."""
    return {"transformer": WEIGHT_DTYPES[name]}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in WEIGHT_DTYPES.items()}.get(dtype, str(dtype))


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        text = read_utf8(args.prompts_file, "prompts file")
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or not all(p.strip() for p in prompts):
        raise UserError("give a non-empty --prompt (several --prompt flags, or --prompts-file, make a long video "
                        "whose prompt changes clip by clip)")
    return prompts


def _print_notes(notes: list[str]) -> None:
    for note in notes:                    # e.g. unknown words, a snapped size: a note, not a traceback line
        print(f"note: {note}", file=sys.stderr)


def _cmd_generate(args) -> int:
    out = Path(args.out)
    check_output_file(out)
    check_output(out)
    if args.image is not None:
        check_image_file(args.image)
    resolve_device(args.device)
    index = model_index(args.model)
    if index.family == "infinity":
        return _generate_infinity(args, out, index)
    if args.aspect_ratio is not None or args.pn is not None:
        raise UserError("--aspect-ratio and --pn apply to Infinity (text-to-image) models; this model's frame size "
                        "is fixed")
    if args.interactive:
        return _generate_interactive(args, out, index)
    if args.inference is not None:
        raise UserError("--inference applies to --interactive (a whole video follows the model folder's own path)")
    image_out = out.suffix.lower() in IMAGE_SUFFIXES
    frames = args.frames if args.frames is not None else (1 if image_out else 17)
    if image_out and frames != 1:
        raise UserError(f"{out} is an image; use a video output (.mp4, .gif) for {frames} frames")
    prompts = _read_prompts(args)
    t0 = time.perf_counter()
    pipe = load_pipeline(index, args.device, args.precision, memory_from_args(args), weight_dtypes(args.dtype))
    load_s = time.perf_counter() - t0
    if args.strict_prompt:
        check_prompts_read_whole(pipe.text_encoder, prompts)
    result = generate_video(pipe, prompts, frames, image=args.image, video=args.video, guidance_scale=args.cfg,
                            temperature=args.tau, seed=args.seed, progress=not args.json,
                            negative_prompt=args.negative_prompt)
    _print_notes(result.notes)
    fps = args.fps or result.fps
    save_result(result.frames, out, fps=fps, lossless=args.lossless)
    summary = {"output": str(out), "prompts": prompts, "frames": int(result.frames.shape[0]), "fps": fps,
               "seed": args.seed, "load_s": round(load_s, 3), **{k: round(v, 3) for k, v in result.timings.items()},
               "precision": result.precision, "dtype": dtype_name(pipe.dtype),
               "peak_memory_mb": round(peak_memory_mb(pipe.device), 1), "device": str(pipe.device)}
    print(json.dumps(summary) if args.json else f"wrote {out} ({result.frames.shape[0]} frames, "
          f"{result.timings['total_s']:.2f} s)")
    return 0


def _generate_interactive(args, out: Path, index) -> int:
    """`generate --interactive`: prompts from standard input, one clip each (see cli/interactive.py)."""
    given = [flag for flag, v in (("--prompt", args.prompt), ("--prompts-file", args.prompts_file),
                                  ("--frames", args.frames)) if v is not None]
    if given:
        raise UserError(f"{', '.join(given)} cannot be used with --interactive: the prompts come from standard input, "
                        "one line per clip")
    if out.suffix.lower() != ".mp4":
        raise UserError(f"--interactive writes a video: --out must end in .mp4, got {out.name}")
    pipe = load_pipeline(index, args.device, args.precision, memory_from_args(args), weight_dtypes(args.dtype))
    return interactive.run(pipe, out, seed=args.seed, guidance_scale=args.cfg, temperature=args.tau,
                           inference=args.inference, image=args.image, video=args.video, as_json=args.json)


def _generate_infinity(args, out, index) -> int:
    """`generate` with an Infinity (text-to-image) model folder: one prompt, one image."""
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"an Infinity model makes images: --out must end in .png or .jpg, got {out.name}")
    unused = [flag for flag, v in (("--image", args.image), ("--video", args.video), ("--fps", args.fps))
              if v is not None]
    if args.interactive:
        unused.append("--interactive")
    if args.frames not in (None, 1):
        unused.append("--frames")
    if unused:
        raise UserError(f"{', '.join(unused)} do not apply to an Infinity (text-to-image) model")
    prompts = _read_prompts(args)
    if len(prompts) != 1:
        raise UserError(f"an Infinity model makes one image from one prompt; {len(prompts)} were given")
    t0 = time.perf_counter()
    pipe = load_pipeline(index, args.device, args.precision, memory_from_args(args), weight_dtypes(args.dtype))
    load_s = time.perf_counter() - t0
    if args.strict_prompt:
        check_prompts_read_whole(pipe.text_encoder, prompts)
    result = generate_image(pipe, prompts[0], aspect_ratio=args.aspect_ratio, pn=args.pn, guidance_scale=args.cfg,
                            temperature=args.tau, seed=args.seed, progress=not args.json,
                            negative_prompt=args.negative_prompt)
    _print_notes(result.notes)
    save_result(result.image, out)
    summary = {"output": str(out), "prompts": prompts, "height": result.height, "width": result.width,
               "template_h_div_w": result.template, "pn": result.pn, "seed": args.seed, "load_s": round(load_s, 3),
               **{k: round(v, 3) for k, v in result.timings.items()}, "precision": result.precision,
               "dtype": dtype_name(pipe.dtype), "peak_memory_mb": round(peak_memory_mb(pipe.device), 1),
               "device": str(pipe.device)}
    print(json.dumps(summary) if args.json else f"wrote {out} ({result.width}x{result.height}, "
          f"{result.timings['total_s']:.2f} s)")
    return 0


def _cmd_eval(args) -> int:
    resolve_device(args.device)
    index = model_index(args.model)
    if index.family == "infinity":   # a text-to-image model: the t2i task only
        bad = [t for t in args.tasks if t != "t2i"]
        if bad and args.tasks != EVAL_TASKS:
            raise UserError(f"an Infinity (text-to-image) model has no {', '.join(bad)} task; use --tasks t2i")
    pipe = load_pipeline(index, args.device, args.precision)
    pipe.set_progress_bar_config(disable=True)     # the evaluation shows its own progress
    if index.family == "infinity":
        gen, tasks = infinity_generator(pipe, args.cfg, args.tau), ["t2i"]
    else:
        gen, tasks = pipeline_generator(pipe, args.cfg), args.tasks
    res = evaluate(gen, n_per_task=args.n, seed=args.seed, tasks=tasks, batch_size=args.batch_size,
                   out_dir=Path(args.out_dir), grid_per_task=args.grid, samples_per_prompt=args.samples_per_prompt)
    print(json.dumps({t: {k: r[k].get("all_correct") for k in ("overall", "seen", "heldout")}
                      for t, r in res["by_task"].items()}))
    for t, r in res["by_task"].items():
        if "all_correct_per_round" in r:
            print(f"{t}: all-correct per sampling round {r['all_correct_per_round']}; prompts with an all-correct "
                  f"sample {r['prompts_with_a_correct_sample']:.3f}")
    for group, g in res["by_task"].get("long", {}).get("segments", {}).items():
        print(f"long, {group}: {g['moved']} of {g['n']} segments moved as captioned")
    out = Path(args.out_dir)
    print(f"wrote {out / 'results.json'}, {out / 'samples.jsonl'} and {out / 'grid.png'}")
    return 0


EVAL_TASKS = ["t2i", "t2v", "i2v", "continuation", "long"]


def add_cli(subparsers) -> None:
    """Register `generate` and `eval`."""
    sp = subparsers.add_parser("generate", help="generate a video (.mp4, .gif) or an image (.png) from text")
    sp.add_argument("--prompt", action="append", help="text prompt; repeat for a prompt per clip")
    sp.add_argument("--negative-prompt", default=None,
                    help="what to steer away from: replaces the learned null text of guidance")
    sp.add_argument("--prompts-file", help="a file with one prompt per line (one per clip)")
    sp.add_argument("--out", required=True, help="output .mp4 or .gif (video), .png or .jpg (image)")
    sp.add_argument("--frames", type=positive_int, default=None,
                    help="number of frames, 1 + k x the model's temporal compression (4 for the shipped model: "
                         "17, 33, ...; default 17; 1 for .png)")
    sp.add_argument("--seed", type=seed, default=0, help="0 .. 2**64-1")
    sp.add_argument("--image", help="first frame for image-to-video")
    sp.add_argument("--video", help="video to continue")
    sp.add_argument("--cfg", type=finite_float, default=None, help="guidance scale (default: the model's)")
    sp.add_argument("--tau", type=positive_float, default=None, help="sampling temperature (default: the model's)")
    sp.add_argument("--strict-prompt", action="store_true",
                    help="a prompt longer than the text encoder reads is an error (default: a warning saying how "
                         "much is cut)")
    sp.add_argument("--aspect-ratio", default=None,
                    help="Infinity models: h/w (0.5625) or width:height ('16:9'), snapped to the nearest template")
    sp.add_argument("--pn", default=None, choices=["0.06M", "0.25M", "0.60M", "1M"],
                    help="Infinity models: pixel budget (default: the model's)")
    sp.add_argument("--model", default="default",
                    help="model folder or Hugging Face Hub repo id, InfinityStar or Infinity as its model_index.json "
                         "says (default: the shipped model)")
    sp.add_argument("--fps", type=positive_float, default=None,
                    help="frame rate of a written video (default: the model's)")
    sp.add_argument("--lossless", action="store_true",
                    help="lossless RGB (4:4:4) H.264 instead of yuv420p (exact colours; fewer players open it)")
    sp.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16, else fp32; fp32; bf16")
    sp.add_argument("--dtype", choices=sorted(WEIGHT_DTYPES), default="fp32",
                    help="the transformer's weights, read straight into this dtype (bf16: half the memory, never an "
                         "fp32 copy; the VAE stays fp32, the text encoder keeps its own); default fp32")
    sp.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (checked before any work)")
    sp.add_argument("--json", action="store_true", help="print a JSON summary line (no progress bar)")
    sp.add_argument("--interactive", action="store_true",
                    help="read one prompt per line from standard input and add a clip for each: after every clip "
                         "--out holds the whole video and OUT_clipNNN.mp4 the new clip")
    sp.add_argument("--inference", choices=["clips", "interact"], default=None,
                    help="with --interactive: how clips continue (default: the model folder's; 'interact' needs an "
                         "InfinityStar-Interact model)")
    add_memory_flags(sp)
    sp.set_defaults(func=_cmd_generate)
    sp = subparsers.add_parser("eval", help="evaluate a model on a synthetic world")
    esub = sp.add_subparsers(dest="world", required=True)
    ep = esub.add_parser("shapes", help="Shapes World: five tasks, judged by the reference decoder")
    ep.add_argument("--model", default="default")
    ep.add_argument("--n", type=int, default=200, help="samples per task")
    ep.add_argument("--tasks", nargs="+", default=EVAL_TASKS,
                    help="tasks to run (an Infinity text-to-image model runs t2i only)")
    ep.add_argument("--seed", type=seed, default=0)
    ep.add_argument("--batch-size", type=int, default=25)
    ep.add_argument("--cfg", type=finite_float, default=None)
    ep.add_argument("--tau", type=positive_float, default=None, help="Infinity models: sampling temperature")
    ep.add_argument("--device", default="cpu")
    ep.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="auto (default): bf16 autocast on CUDA and on CPUs with native bf16, else fp32; fp32; "
                         "bf16 (docs/default_model.md's numbers: auto on a CPU with native bf16)")
    ep.add_argument("--out-dir", default="eval_shapes")
    ep.add_argument("--grid", type=int, default=6, help="samples per task in grid.png")
    ep.add_argument("--samples-per-prompt", type=positive_int, default=1,
                    help="sample every prompt this many times (other seeds) and average: one sample per prompt "
                         "varies by several points between seeds; default 1")
    ep.set_defaults(func=_cmd_eval)
