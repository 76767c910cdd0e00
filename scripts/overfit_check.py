"""Gate 1 of the built-in model: no bug hides behind the numbers.

Train a generator on a handful of captioned Shapes World samples (8 images and 8 17-frame videos by default) until
it has memorised them, then sample every caption with the model's default settings, with and without guidance,
and judge the decoded samples with the reference decoder. A model that has memorised its data must reproduce it;
if it does not, training and inference disagree somewhere (inputs, positions, masks, BSC, EMA, guidance, text
dropout, temperature).

Only samples whose tokenizer round trip the decoder judges all-correct are used, so the check measures the
generator, not the tokenizer. Besides the decoder's verdict it reports how many summed-code values of each sample
equal the training target's (1.0: the memorised sample came back exactly).

    python scripts/overfit_check.py --out ~/runs/overfit                       # the default model's architecture
    python scripts/overfit_check.py --out /tmp/overfit --n 1 --lr 3e-3 --set model.preset=tiny \
        --set model.width=128 --set train.bsc_strength=0                   # the slow test's scale
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from infinitystar.pipelines.infinitystar import DEFAULT_MODEL_DIR, InfinityStarPipeline
from infinitystar.quant.residual import encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.shapes.data import load_manifest, load_media, write_dataset
from infinitystar.shapes.evaluate import score_image, score_video
from infinitystar.shapes.world import vocabulary
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.tokenizer.training_eval import frames_to_video, reconstruct, video_to_frames
from infinitystar.tokenizer.video_vae import VideoVAE
from infinitystar.train.config import load_config
from infinitystar.train.export import export_model
from infinitystar.train.features import extract_features
from infinitystar.train.trainer import spec_from_config, train

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = str(ROOT / "configs" / "default_v2" / "generator_x2.yaml")   # the shipped model's generator recipe


def judge(frames: np.ndarray, caption: str):
    return score_image(frames[0], caption) if len(frames) == 1 else score_video(frames, caption, task="t2v")


def select_samples(data_dir: Path, tokenizer_dir: Path, pipe_pyramid, n: int, seed: int) -> dict[str, Path]:
    """Render candidates, keep the first n images and n videos whose tokenizer round trip is all-correct, and
    write their manifests; returns {kind: manifest}."""
    tok = VideoVAE.from_pretrained(tokenizer_dir).eval()
    pool = write_dataset(data_dir / "pool", n_images=6 * n, n_videos=6 * n, seed=seed, video_frames=(17,),
                         video_format="npy")
    manifests = {}
    for kind, manifest in pool.items():
        kept = []
        for line in load_manifest(manifest):
            frames = load_media(line)
            caption = line.get("caption") or line["text"]
            with torch.no_grad():
                rec = video_to_frames(reconstruct(tok, frames_to_video(frames), pipe_pyramid).clamp(-1, 1))[0]
            if judge(rec, caption).all_correct:
                kept.append(line)
            if len(kept) == n:
                break
        if len(kept) < n:
            raise SystemExit(f"error: only {len(kept)} of {6 * n} {kind} candidates survive the tokenizer round "
                             f"trip; the tokenizer is too weak for this check")
        out = data_dir / manifest.name
        out.write_text("".join(json.dumps(line) + "\n" for line in kept))
        manifests[kind] = out
    return manifests


def teacher_forced_accuracy(pipe: InfinityStarPipeline, truth: np.ndarray, caption: str) -> list[float]:
    """Per step, the share of bits whose argmax equals the target when every earlier step is forced: the same
    quantity the trainer logs (acc_*), measured through the inference path (KV cache, one step at a time)."""
    schedule = pipe.pyramid.build(len(truth))
    with torch.no_grad():
        target = encode_targets(pipe.tokenizer.encode(frames_to_video(truth)), schedule).bits
        feats, mask = pipe.text_encoder.encode([caption], pipe.device)
    out = generate(pipe.transformer, schedule, Caption(feats, mask), prefix_bits=target, record_logits=True)
    return [round(float((lg["cond"].argmax(-1).reshape(t.shape) == t).float().mean()), 4)
            for lg, t in zip(out.logits, target)]


def evaluate(model_dir: Path, manifests: dict[str, Path], seed: int) -> dict:
    """Sample every training caption with the default settings, with guidance 1 (no CFG), and with the default
    guidance scale applied to bit probabilities (`cfg_prob`) instead of logits."""
    pipe = InfinityStarPipeline.from_pretrained(model_dir)
    prob = Guidance(pipe.defaults.guidance_scale, "cfg_prob")
    result = {}
    for label, cfg, guidance in (("default", None, None), ("no_cfg", 1.0, None), ("cfg_prob", None, prob)):
        rows = []
        for manifest in manifests.values():
            for i, line in enumerate(load_manifest(manifest)):
                truth = load_media(line)
                caption = line.get("caption") or line["text"]
                g = torch.Generator().manual_seed(seed + i)
                out = pipe(caption, num_frames=len(truth), guidance_scale=cfg, guidance=guidance, generator=g)
                with torch.no_grad():
                    z = pipe.tokenizer.encode(frames_to_video(truth))
                    target = encode_targets(z, pipe.pyramid.build(len(truth))).codes
                agree = float((out.codes - target).abs().le(1e-4).float().mean())
                s = judge(out.frames[0], caption)
                row = {"caption": caption, "frames": len(truth), "all_correct": s.all_correct,
                       "correct": s.correct, "code_agreement": round(agree, 4)}
                if label == "default":
                    row["teacher_forced_accuracy"] = teacher_forced_accuracy(pipe, truth, caption)
                rows.append(row)
        result[label] = {"all_correct": sum(r["all_correct"] for r in rows) / len(rows),
                         "code_agreement": float(np.mean([r["code_agreement"] for r in rows])), "samples": rows}
    return result


def overfit_check(out: Path, *, config: str = DEFAULT_CONFIG,
                  tokenizer: Path = DEFAULT_MODEL_DIR / "tokenizer", n: int = 8, steps: int = 1500,
                  lr: float = 1e-3, seed: int = 0, overrides: list[str] = ()) -> dict:
    """Select, train, export (raw and EMA weights), sample and judge; returns the report (also report.json)."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(tokenizer)
    pyramid_file = tokenizer / "pyramid.json"
    pyramid = (PyramidConfig.from_dict(json.loads(pyramid_file.read_text())) if pyramid_file.is_file()
               else PyramidConfig.from_dict(json.loads((tokenizer.parent / "model_index.json").read_text())["pyramid"]))
    manifests = select_samples(out / "data", tokenizer, pyramid, n, seed)
    text_dir = out / "text_encoder_init"
    if not (text_dir / "config.json").is_file():
        WordTextEncoder(vocabulary(), width=128).save_pretrained(text_dir)
    run_dir = out / "generator"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = load_config(config, [
        f"output_dir={run_dir}", f"tokenizer.path={tokenizer}", f"text_encoder.path={text_dir}",
        f"data.manifests=[{','.join(str(m) for m in manifests.values())}]", f"data.latent_cache={out / 'latents'}",
        "data.num_workers=0", f"train.max_steps={steps}", f"optim.lr={lr}", "optim.warmup_steps=20",
        f"train.micro_batch={min(8, 2 * n)}", f"checkpoint.every={steps}", "log.progress=false", f"seed={seed}",
        *overrides])
    # the latents once: the tokenizer is frozen, so encoding every sample at every step would be wasted work
    extract_features([str(m) for m in manifests.values()], VideoVAE.from_pretrained(tokenizer).eval(),
                     out / "latents", spec=spec_from_config(config), progress=False)
    train(config)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [m for m in metrics if "loss" in m][-1]
    report = {"steps": steps, "overrides": list(overrides), "final_loss": last["loss"],
              "final_bit_accuracy": {k: v for k, v in last.items() if k.startswith("acc")}}
    for ema in (False, True):
        model_dir = out / ("model_ema" if ema else "model")
        export_model(run_dir, model_dir, ema=ema, tokenizer=tokenizer)
        report["ema" if ema else "raw"] = evaluate(model_dir, manifests, seed)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="work folder (data, run, exported model, report.json)")
    ap.add_argument("--config", default=DEFAULT_CONFIG,
                    help="generator config whose architecture and recipe are checked")
    ap.add_argument("--tokenizer", default=str(DEFAULT_MODEL_DIR / "tokenizer"))
    ap.add_argument("--n", type=int, default=8, help="images and videos each")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="config override key=value (e.g. model.preset=tiny, "
                                                                 "train.bsc_strength=0)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    report = overfit_check(Path(a.out).expanduser(), config=a.config, tokenizer=Path(a.tokenizer), n=a.n,
                           steps=a.steps, lr=a.lr, seed=a.seed, overrides=a.set)
    summary = {k: {g: {m: report[k][g][m] for m in ("all_correct", "code_agreement")} for g in report[k]}
               for k in ("raw", "ema")}
    print(json.dumps({"final_loss": report["final_loss"], "final_bit_accuracy": report["final_bit_accuracy"],
                      **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
