"""The knowledge-inheritance study: does a bitwise tokenizer started from a continuous VAE converge faster than
one trained from scratch?

Three runs on Shapes World (17-frame 64x64 clips, train split, rendered on the fly):
  1. a continuous VAE                                  (configs/tokenizer_continuous.yaml)
  2. the bitwise tokenizer inherited from run 1         (configs/tokenizer_bitwise.yaml --init .../model)
  3. the bitwise tokenizer from scratch, same steps and batch size, same data order and seeds
Runs 2 and 3 log the validation PSNR (after quantization with all scales) on the same 16 held-aside clips every
`val_every` steps. The script then writes a table (markdown + JSON) and the plot docs/tokenizer_inheritance.png.

    PYTHONPATH=src python scripts/tokenizer_inheritance.py --out runs/tokenizer_study --threads 1
    PYTHONPATH=src python scripts/tokenizer_inheritance.py --out runs/tokenizer_study --report-only

Each stage is skipped when its run folder already holds the finished model, and resumed when it holds
checkpoints, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from infinitystar.train.tokenizer import load_config, train  # noqa: E402
from infinitystar.train.checkpoint import find_latest  # noqa: E402
from infinitystar.train.metrics import read_metrics  # noqa: E402


def run_stage(name: str, config: Path, out: Path, overrides: list[str]) -> float:
    """Train one stage (or resume / skip it); returns the wall time spent now (0 when skipped)."""
    folder = out / name
    if (folder / "model" / "model.safetensors").is_file():
        print(f"[{name}] already finished: {folder / 'model'}", flush=True)
        return 0.0
    resume = "latest" if find_latest(folder / "checkpoints") is not None else None
    over = [f"output_dir={folder}"] + overrides
    cmd = f"infinitystar train tokenizer {config.relative_to(ROOT)} " + " ".join(f"--set {o}" for o in over) + \
        (" --resume" if resume else "")
    print(f"[{name}] {cmd}", flush=True)
    t0 = time.perf_counter()
    train(load_config(config, over), resume=resume)
    return time.perf_counter() - t0


def val_curve(folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_psnr"]) for r in read_metrics(folder / "metrics.jsonl") if "val_psnr" in r]


def train_seconds(folder: Path) -> float:
    """Training time from the logged per-step times (validation excluded)."""
    recs = [r for r in read_metrics(folder / "metrics.jsonl") if "s_per_step" in r]
    total, last = 0.0, 0
    for r in recs:
        total += r["s_per_step"] * (r["step"] - last)
        last = r["step"]
    return total


def steps_to_reach(curve: list[tuple[int, float]], target: float):
    return next((s for s, p in curve if p >= target), None)


def report(out: Path, plot: Path) -> dict:
    cont, inh, scr = (val_curve(out / n) for n in ("continuous", "inherited", "scratch"))
    steps = sorted({s for s, _ in inh} | {s for s, _ in scr})
    di, ds = dict(inh), dict(scr)
    rows = ["| step | inherited PSNR (dB) | scratch PSNR (dB) |", "|---:|---:|---:|"]
    for s in steps:
        fmt = lambda d: f"{d[s]:.2f}" if s in d else ""
        rows.append(f"| {s} | {fmt(di)} | {fmt(ds)} |")
    final_scr = scr[-1][1] if scr else None
    summary = {
        "continuous_final_psnr": cont[-1][1] if cont else None,
        "inherited": inh, "scratch": scr,
        "inherited_final_psnr": inh[-1][1] if inh else None, "scratch_final_psnr": final_scr,
        "inherited_steps_to_scratch_final": steps_to_reach(inh, final_scr) if final_scr else None,
        "train_seconds": {n: round(train_seconds(out / n), 1) for n in ("continuous", "inherited", "scratch")
                          if (out / n / "metrics.jsonl").is_file()},
    }
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "study.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("inherited", "scratch")}, indent=1))
    draw(cont, inh, scr, plot, continuous_steps=cont[-1][0] if cont else 0)
    return summary


def draw(cont, inh, scr, path: Path, continuous_steps: int) -> None:
    """PSNR against bitwise steps (left) and against all steps including the continuous stage (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return draw_with_pillow(inh, scr, path)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110, sharey=True)
    for ax, shift in ((axes[0], 0), (axes[1], continuous_steps)):
        ax.plot([s + shift for s, _ in inh], [p for _, p in inh], "o-", ms=3, label="bitwise, inherited")
        ax.plot([s for s, _ in scr], [p for _, p in scr], "s-", ms=3, label="bitwise, from scratch")
        if cont:
            ax.axhline(cont[-1][1], color="gray", ls="--", lw=1, label="continuous VAE (no quantizer)")
        ax.grid(alpha=0.3)
    if cont:
        axes[1].plot([s for s, _ in cont], [p for _, p in cont], ":", color="gray", label="continuous stage")
    axes[0].set_xlabel("bitwise training steps")
    axes[1].set_xlabel("all training steps (inherited run shifted by the continuous stage)")
    axes[0].set_ylabel("validation PSNR (dB), all scales")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle("Knowledge inheritance on Shapes World (17x64x64 clips, same batches, same steps)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def draw_with_pillow(inh, scr, path: Path) -> None:
    from PIL import Image, ImageDraw
    W, H, m = 640, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = inh + scr
    if not pts:
        return
    xmax = max(s for s, _ in pts) or 1
    lo, hi = min(p for _, p in pts) - 1, max(p for _, p in pts) + 1
    X = lambda s: m + (W - 2 * m) * s / xmax
    Y = lambda p: H - m - (H - 2 * m) * (p - lo) / (hi - lo)
    d.rectangle([m, m, W - m, H - m], outline="black")
    for curve, color in ((inh, "blue"), (scr, "red")):
        if len(curve) > 1:
            d.line([(X(s), Y(p)) for s, p in curve], fill=color, width=2)
    d.text((m, 10), f"val PSNR (dB) {lo:.1f}..{hi:.1f} vs step 0..{xmax}; blue inherited, red scratch", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tokenizer_study", help="study folder (one sub-folder per run)")
    ap.add_argument("--continuous-steps", type=int, default=None, help="override train.max_steps of stage 1")
    ap.add_argument("--bitwise-steps", type=int, default=None, help="override train.max_steps of stages 2 and 3")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per run (1: robust on a shared machine, see docs/tokenizer.md)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "tokenizer_inheritance.png"))
    ap.add_argument("--report-only", action="store_true", help="only build the table and the plot")
    args = ap.parse_args(argv)
    out = Path(args.out)
    common = [f"train.threads={args.threads}", f"device={args.device}", "log.progress=true"]
    cont_cfg = ROOT / "configs" / "tokenizer_continuous.yaml"
    bit_cfg = ROOT / "configs" / "tokenizer_bitwise.yaml"
    if not args.report_only:
        c_steps = [f"train.max_steps={args.continuous_steps}"] if args.continuous_steps else []
        b_steps = [f"train.max_steps={args.bitwise_steps}"] if args.bitwise_steps else []
        wall = {"continuous": run_stage("continuous", cont_cfg, out, common + c_steps)}
        init = out / "continuous" / "model"
        wall["inherited"] = run_stage("inherited", bit_cfg, out, common + b_steps + [f"init={init}"])
        wall["scratch"] = run_stage("scratch", bit_cfg, out, common + b_steps)
        print("wall seconds this invocation:", json.dumps({k: round(v, 1) for k, v in wall.items()}))
    report(out, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
