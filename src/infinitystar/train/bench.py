"""Training throughput: the generator's packed step (`infinitystar bench --train`) and the tokenizer's step
(`infinitystar bench --tokenizer`), at a run config's model and batch, under a precision setting.

Generator: tokens per second of forward + backward + AdamW on random-weight models and a synthetic data mix
shaped like the default model's (images, 17/33-frame videos, 33-65-frame videos with a caption per clip, in the
4000 : 4000 : 1000 proportion of its data set; caption lengths 6-19 tokens), with the config's scale subsets,
text dropout and padding. Useful FLOPs are the matmul work of the packed step: linear layers on every real token,
attention scores and values only over the (query, key) pairs the attention pattern allows, embeddings and heads;
a step counts 3x the forward. Padding and masked-out pairs are not counted, so a kernel that computes them shows
as a lower useful fraction of the measured matmul rate (of the precision used).

Every result also runs from an older checkout of the package (benchmarks/speed_compare.py): only arguments that
differ from a default are passed on, and precision is applied by autocast around the step, as the trainers do.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from infinitystar.bench import matmul_rate
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.model.packing import PackedSequence
from infinitystar.runtime import autocast, peak_memory_mb, precision_name, resolve_device, resolve_precision
from infinitystar.train.config import load_config
from infinitystar.train.harness import adamw
from infinitystar.train.targets import PackedTrainModule, pack_batch, packed_loss, prepare_sample
from infinitystar.train.tokenizer import TokenizerTrainer, load_config as load_tokenizer_config

REPO = Path(__file__).resolve().parents[3]
DEFAULT_TRAIN_CONFIG = REPO / "configs" / "default_model.yaml"
DEFAULT_TOKENIZER_CONFIG = REPO / "configs" / "default_tokenizer_continuous.yaml"
MIX = ((4, (1,)), (4, (17, 33)), (1, (33, 49, 65)))   # (weight, frame counts); the last kind: caption per clip


def packed_forward_flops(cfg: TransformerConfig, packed: PackedSequence) -> float:
    """Useful matmul FLOPs of one forward over a packed sequence (see the module docstring)."""
    C, H, KV, hd, I = cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_hidden
    per_token = 2 * (C * H * hd + 2 * C * KV * hd + H * hd * C + 3 * C * I)
    lengths = torch.tensor(packed.segment_lengths[:-1], dtype=torch.float64)   # the last segment is padding
    table = packed.segment_table[:-1, :-1].to("cpu", torch.float64)
    pairs = float((lengths * (table @ lengths)).sum())
    latent = packed.num_visual + getattr(packed, "num_condition", 0)   # condition blocks: latent tokens too
    flops = cfg.depth * ((latent + packed.num_text) * per_token + 4 * H * hd * pairs)
    flops += 2 * cfg.latent_channels * C * latent + 2 * cfg.text_channels * C * packed.num_text
    flops += sum(2 * C * 2 * step.scale.bits * step.scale.tokens for _, step in packed.visual_segments)
    return float(flops)


def synthetic_batch(run, model_cfg: TransformerConfig, micro_batch: int, seed: int, device):
    """A packed batch of the data mix (module docstring), a pure function of `seed`."""
    t = run.train
    pyramid = run.pyramid.build()
    g = torch.Generator().manual_seed(seed)
    kinds = torch.tensor([w for w, _ in MIX], dtype=torch.float64)
    samples, texts = [], []
    for _ in range(micro_batch):
        kind = int(torch.multinomial(kinds, 1, generator=g))
        counts = MIX[kind][1]
        schedule = pyramid.build(counts[int(torch.randint(len(counts), (), generator=g))])
        per_clip = kind == len(MIX) - 1
        n_caps = schedule.num_clips if per_clip else 1
        of_clip = list(range(n_caps)) if per_clip else [0] * schedule.num_clips
        z = torch.randn(model_cfg.latent_channels, schedule.num_latent_frames, *schedule.full_hw, generator=g)
        s = prepare_sample(z, schedule, ["x"] * n_caps, of_clip, g, subset=t.scale_subset,
                           bsc_strength=t.bsc_strength, repetition=t.repetition, text_dropout=t.text_dropout,
                           reweight_by_scale=t.reweight_by_scale, max_reweight=t.max_reweight,
                           bit_weighting=t.bit_weighting)
        samples.append(s)
        texts.append([torch.randn(int(torch.randint(6, 20, (), generator=g)), model_cfg.text_channels, generator=g)
                      for _ in s.captions])
    return pack_batch(samples, texts, model_cfg.text_maxlen, t.pad_multiple, device)


def run_train_bench(config=None, precision: str = "auto", device: Optional[str] = None, steps: int = 5,
                    micro_batch: Optional[int] = None, backend: Optional[str] = None, seed: int = 0,
                    compile: Optional[bool] = None, as_json: bool = False) -> dict:
    """Median tokens/s of `steps` optimizer steps (after one warm-up step) at a run config's model, micro-batch
    and packing (configs/default_model.yaml by default). backend: the attention backend (None: the model's).
    compile: the blocks under torch.compile (None: the config's `train.compile`); the warm-up then runs every timed
    batch once, so it holds the compiling and the timed steps are steady-state."""
    run = load_config(config or DEFAULT_TRAIN_CONFIG)
    dev = resolve_device(device or "auto")
    dtype = resolve_precision(precision, dev)
    mb = micro_batch or run.train.micro_batch
    compile = run.train.compile if compile is None else compile
    cfg = run.model.build()
    torch.manual_seed(seed)
    model = InfinityStarTransformer(cfg).to(dev).train()
    if compile:
        model.set_compile(True)
    module = PackedTrainModule(model)
    opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.97))      # as the trainer's
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    extra = {} if backend is None else {"backend": backend}

    def step(batch) -> tuple[float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(dev, dtype):
            logits, anchor = module(batch.x_visual, batch.captions, batch.packed, **extra)
        out = packed_loss(logits, batch, anchor)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), run.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    batches = [synthetic_batch(run, cfg, mb, seed * 1000 + i, dev) for i in range(steps + 1)]
    # warm-up: with compile, every timed batch once first (a packed length in a new power-of-two range compiles
    # again), so the timed steps are steady-state; the warm-up time is the compiling
    warm = [step(b) for b in (batches if compile else batches[:1])]
    warmup_s, warmup_cpu_s = sum(t for t, _ in warm), sum(c for _, c in warm)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, cpu = zip(*[step(b) for b in batches[1:]])
    tokens = [b.tokens for b in batches[1:]]
    flops = [3 * packed_forward_flops(cfg, b.packed) for b in batches[1:]]
    rate = matmul_rate(dev, dtype)
    useful = statistics.median(f / t for f, t in zip(flops, times))
    result = {
        "bench": "train", "config": str(config or DEFAULT_TRAIN_CONFIG.relative_to(REPO)), "device": str(dev),
        "threads": torch.get_num_threads(), "precision": precision_name(dtype), "attention": backend or "default",
        "compile": compile,
        "model": f"width {cfg.width}, depth {cfg.depth}, heads {cfg.num_heads}/{cfg.num_kv_heads}",
        "micro_batch": mb, "steps": steps, "tokens_per_step": round(statistics.mean(tokens)),
        "tokens_per_s": round(statistics.median(n / t for n, t in zip(tokens, times)), 1),
        "step_s": round(statistics.median(times), 3),
        "tokens_per_cpu_s": round(statistics.median(n / c for n, c in zip(tokens, cpu)), 1),
        "warmup_step_s": round(warmup_s, 2), "warmup_cpu_s": round(warmup_cpu_s, 2),
        "useful_tflops": round(useful / 1e12, 6), "matmul_tflops": round(rate / 1e12, 4),
        "useful_fraction": round(useful / rate, 4), "peak_memory_mb": round(peak_memory_mb(dev), 1),
    }
    if as_json:
        print(json.dumps(result))
    else:
        print(f"generator training on {dev} ({result['threads']} threads, {result['precision']}), {result['model']}, "
              f"micro-batch {mb} (~{result['tokens_per_step']} tokens): {result['tokens_per_s']:.0f} tokens/s, "
              f"{result['step_s']:.2f} s/step; useful {result['useful_tflops']:.3f} TFLOP/s = "
              f"{100 * result['useful_fraction']:.1f}% of the measured {result['precision']} matmul rate "
              f"({result['matmul_tflops']:.3f} TFLOP/s); peak memory {result['peak_memory_mb']:.0f} MB")
    return result


def run_tokenizer_bench(config=None, precision: str = "auto", device: Optional[str] = None, steps: int = 5,
                        as_json: bool = False) -> dict:
    """Median seconds of the tokenizer trainer's own step (encode, decode, losses, backward, AdamW) at a
    tokenizer config (configs/default_tokenizer_continuous.yaml by default), random init, in `precision` (the
    trainer's train.precision)."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_tokenizer_config(config or DEFAULT_TOKENIZER_CONFIG, [
            f"output_dir={tmp}", f"device={device or 'auto'}", f"train.precision={precision}"])
        trainer = TokenizerTrainer(cfg)
        dev, dtype = trainer.device, trainer.dtype
        times, cpu = [], []
        try:
            for i in range(steps + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                trainer.train_step()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        finally:
            trainer.close()
    video = cfg.train.batch_size * cfg.data.frames
    result = {"bench": "tokenizer", "config": str(config or DEFAULT_TOKENIZER_CONFIG.relative_to(REPO)),
              "device": str(dev), "threads": torch.get_num_threads(), "precision": precision_name(dtype),
              "batch": f"{cfg.train.batch_size} x {cfg.data.frames} frames {cfg.data.height}x{cfg.data.width}",
              "steps": steps, "step_s": round(statistics.median(times[1:]), 3),
              "cpu_s": round(statistics.median(cpu[1:]), 3),
              "frames_per_s": round(video / statistics.median(times[1:]), 1),
              "matmul_tflops": round(matmul_rate(dev, dtype) / 1e12, 4), "peak_memory_mb": round(peak_memory_mb(dev), 1)}
    if as_json:
        print(json.dumps(result))
    else:
        print(f"tokenizer training on {dev} ({result['threads']} threads, {result['precision']}), {result['batch']}: "
              f"{result['step_s']:.2f} s/step ({result['frames_per_s']:.0f} frames/s); peak memory "
              f"{result['peak_memory_mb']:.0f} MB")
    return result
