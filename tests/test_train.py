"""Training stack: config validation, manifests and media, latent cache, targets, trainer, checkpoints, CLI.

Tiny everything: the "tiny" transformer (width 64, depth 2), the "tiny" pyramid (8x8 latents), 64x64 media,
a random linear stand-in for the video tokenizer and hashed word vectors for the text encoder.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from infinitystar.schedules.pyramid import pyramid_preset
from infinitystar.train.config import ConfigError, ScaleSubsetConfig, config_from_dict, load_config

SRC = Path(__file__).resolve().parent.parent / "src"
REPO = SRC.parent


# --------------------------------------------------------------------------------------------------
# Stand-ins (also used by test_train_distributed.py)
# --------------------------------------------------------------------------------------------------

class LinearTokenizer(nn.Module):
    """(B, 3, T, H, W) -> (B, 64, 1 + (T-1)/4, H/8, W/8): frame 0 alone, then 4-frame means, 8x8 patches through
    a fixed random linear map. Deterministic (no posterior sampling)."""

    def __init__(self, channels: int = 64, stride: int = 8, tc: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stride, self.tc = stride, tc
        self.proj = nn.Parameter(torch.randn(channels, 3 * stride * stride, generator=g)
                                 / math.sqrt(3 * stride * stride))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = x[:, :, :1], x[:, :, 1:]
        B, C, T, H, W = rest.shape
        if T:
            x = torch.cat([first, rest.reshape(B, C, T // self.tc, self.tc, H, W).mean(3)], 2)
        else:
            x = first
        Tl = x.shape[2]
        p = F.pixel_unshuffle(x.transpose(1, 2).flatten(0, 1), self.stride)
        z = torch.einsum("oc,nchw->nohw", self.proj, p)
        return z.unflatten(0, (B, Tl)).transpose(1, 2).contiguous()


class HashTextEncoder:
    """Each word -> a fixed random vector (seeded by its hash), plus an end token; (features, mask)."""

    def __init__(self, channels: int = 32):
        self.channels = channels

    def _vec(self, word: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(hashlib.sha256(word.encode()).hexdigest()[:12], 16))
        return torch.randn(self.channels, generator=g)

    def encode(self, prompts, device=None):
        rows = [[self._vec(w) for w in p.lower().split()] + [self._vec("<eos>")] for p in prompts]
        L = max(len(r) for r in rows)
        f = torch.zeros(len(rows), L, self.channels)
        m = torch.zeros(len(rows), L, dtype=torch.bool)
        for i, r in enumerate(rows):
            f[i, :len(r)] = torch.stack(r)
            m[i, :len(r)] = True
        return f.to(device), m.to(device)


def write_dataset(root: Path, n_videos: int = 6, n_images: int = 2, frames: int = 17, seed: int = 0,
                  extra: list | None = None) -> Path:
    """Smooth random videos (.npy) and images (.png) with a manifest using official field names."""
    from PIL import Image
    root = Path(root)
    (root / "media").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_videos):
        base = rng.integers(0, 256, (1, 8, 8, 3)).astype(np.float32)
        drift = rng.normal(0, 4, (frames, 1, 1, 3)).cumsum(0)
        v = np.clip(np.repeat(np.repeat(base + drift, 8, 1), 8, 2), 0, 255).astype(np.uint8)
        np.save(root / "media" / f"v{i}.npy", v)
        lines.append({"video_path": f"media/v{i}.npy", "begin_frame_id": 0, "end_frame_id": frames, "fps": 16,
                      "tarsier2_caption": f"a red circle number {i} moving right", "h_div_w": 1.0})
    for i in range(n_images):
        img = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3)), 8, 0), 8, 1).astype(np.uint8)
        Image.fromarray(img).save(root / "media" / f"i{i}.png")
        lines.append({"image_path": f"media/i{i}.png", "text": f"a blue square number {i}"})
    lines += extra or []
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def tiny_config(out_dir, manifest, **sections) -> dict:
    """A raw config dict for the tiny model; `sections` update the named sections."""
    d = {"output_dir": str(out_dir), "device": "cpu", "seed": 3,
         "model": {"preset": "tiny"}, "pyramid": {"preset": "tiny"},
         "data": {"manifests": [str(manifest)], "pixels_per_latent": 8, "max_frames": 17, "num_workers": 0},
         "train": {"max_steps": 4, "micro_batch": 2, "pad_multiple": 64, "scale_subset": {"mode": "random"},
                   "precision": "fp32"},
         "optim": {"lr": 1e-3, "warmup_steps": 1, "decay": "cosine"},
         "checkpoint": {"every": 2}, "log": {"every": 1, "progress": False}}
    for name, upd in sections.items():
        d.setdefault(name, {})
        d[name] = {**d[name], **upd} if isinstance(upd, dict) else upd
    return d


def run_training(raw: dict, until=None, resume=None, tokenizer="linear", **kw):
    from infinitystar.train.trainer import Trainer
    tok = LinearTokenizer() if tokenizer == "linear" else tokenizer
    tr = Trainer(config_from_dict(raw), text_encoder=HashTextEncoder(32), tokenizer=tok, resume=resume, **kw)
    try:
        return tr.fit(until=until)
    finally:
        tr.close()


def losses(out_dir) -> list[float]:
    from infinitystar.train.metrics import read_metrics
    return [r["loss"] for r in read_metrics(Path(out_dir) / "metrics.jsonl")]


def weights(ckpt: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(ckpt / name))


@pytest.fixture
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "data")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path):
    for raw, needle in [({"optim": {"lr": "fast"}}, "optim.lr: expected a number"),
                        ({"optm": {}}, "did you mean 'optim'"),
                        ({"model": {"preset": "tiny", "widht": 8}}, "model.widht: unknown key"),
                        ({"model": {"depth": "two"}}, "model.depth: expected an integer"),
                        ({"train": {"max_steps": 1.5}}, "train.max_steps: expected an integer"),
                        ({"train": {"scale_subset": {"mode": "some"}}}, "train.scale_subset.mode"),
                        ({"train": {"text_dropout": 2}}, "train.text_dropout must be in [0, 1]"),
                        ({"pyramid": {"preset": "huge"}}, "unknown preset 'huge'"),
                        ({"data": {"max_frames": 16}}, "data.max_frames must be 1 + k * 4")]:
        with pytest.raises(ConfigError, match=None) as e:
            config_from_dict(raw)
        assert needle in str(e.value), (needle, str(e.value))
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  betas: [0.9]\n")
    with pytest.raises(ConfigError, match="bad.yaml: optim.betas"):
        load_config(p)
    cfg = config_from_dict({"optim": {"lr": "4e-5"}}, overrides=["train.max_steps=7", "model.depth=3"])
    assert cfg.optim.lr == 4e-5 and cfg.train.max_steps == 7 and cfg.model.build().depth == 3
    t = tmp_path / "run.toml"
    t.write_text('seed = 5\n[train]\nmax_steps = 9\n[train.scale_subset]\nmode = "random"\n')
    cfg = load_config(t)
    assert cfg.seed == 5 and cfg.train.max_steps == 9 and cfg.train.scale_subset.mode == "random"


def test_example_config_validates():
    cfg = load_config(REPO / "configs" / "tiny_generator.yaml")
    assert cfg.model.build().width == 64 and cfg.data.pixels_per_latent == 8
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()   # printed config round-trips


def test_lr_schedule():
    from infinitystar.train.config import OptimConfig
    from infinitystar.train.harness import lr_at
    o = OptimConfig(lr=1.0, warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, o, 14) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1
    assert abs(lr_at(14, o, 14) - 0.1) < 1e-12
    assert lr_at(9, OptimConfig(lr=2.0, decay="linear"), 10) == pytest.approx(0.2)
    assert lr_at(9, OptimConfig(lr=2.0), 10) == 2.0
    # a restart at step 100 is the same schedule shifted by 100 steps
    r = OptimConfig(lr=1.0, warmup_steps=4, decay="cosine", min_lr_ratio=0.1, start_step=100)
    assert [lr_at(100 + s, r, 114) for s in range(15)] == [lr_at(s, o, 14) for s in range(15)]


def test_lr_restart_must_leave_steps_to_decay_over():
    from infinitystar.train.config import OptimConfig, check_run
    cfg = load_config(REPO / "configs" / "tiny_generator.yaml")
    cfg.optim = OptimConfig(start_step=cfg.train.max_steps)
    with pytest.raises(ConfigError, match=r"optim.start_step \(\d+\) must be below train.max_steps"):
        check_run(cfg)
    cfg.optim = OptimConfig(start_step=-1)
    with pytest.raises(ConfigError, match="optim.start_step must be >= 0"):
        check_run(cfg)


# --------------------------------------------------------------------------------------------------
# Manifests, durations, buckets, captions, media
# --------------------------------------------------------------------------------------------------

def test_manifest_errors_name_file_and_line(tmp_path):
    from infinitystar.manifest import ManifestError
    from infinitystar.train.data import read_manifests
    good = {"video_path": "a.mp4", "begin_frame_id": 0, "end_frame_id": 17, "fps": 16, "caption": "x"}
    for bad, needle in [({**good, "begin_frame_id": "0"}, "'begin_frame_id' must be an integer"),
                        ({**good, "end_frame_id": 0}, "'end_frame_id' must be an integer > begin"),
                        ({**good, "fps": -1}, "'fps' must be a positive number"),
                        ({k: v for k, v in good.items() if k != "caption"}, "no caption"),
                        ({**good, "captions_per_segment": "x"}, "captions_per_segment"),
                        ({"text": "x"}, "needs 'video_path' or 'image_path'")]:
        p = tmp_path / "m.jsonl"
        p.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(ManifestError) as e:
            read_manifests([p])
        assert f"m.jsonl:3" in str(e.value) and needle in str(e.value), str(e.value)
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ManifestError, match="m.jsonl:2: not JSON"):
        read_manifests([p])
    # folders are searched recursively; relative paths resolve against the manifest's folder
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "m.jsonl").unlink()
    recs = read_manifests([tmp_path])
    assert recs[0].path == str((tmp_path / "sub" / "a.mp4").resolve()) and recs[0].source.endswith("a.jsonl:1")


def test_durations_buckets_and_captions():
    import random
    from infinitystar.train.data import (MediaRecord, bucket_for_frame, bucket_for_latent, frame_offsets,
                                         sample_captions, truncate_sentences)
    # 2.1 s at 30 fps resampled to 16 fps: 34 frames available -> 33 = 1 + 2 * 16 (whole 1 s units)
    off = frame_offsets(64, 30.0, 16.0, 81, 16)
    assert len(off) == 33 and off[:4] == [0, 1, 3, 5] and off[-1] == 60
    assert len(frame_offsets(100, 16.0, 16.0, 33, 16)) == 33          # capped at max_frames
    assert frame_offsets(10, 16.0, 16.0, 81, 16) == [0]               # shorter than a unit: trained as an image
    assert len(frame_offsets(17, None, 16.0, 81, 4)) == 17
    # aspect buckets at the official budget, a fixed size with custom scales
    p480 = pyramid_preset("480p")
    pyr, size = bucket_for_frame(720, 1280, p480, 16)
    assert size == (480, 848) and pyr.spatial_scales()[-1] == (30, 53)
    assert bucket_for_frame(1080, 1080, p480, 16)[1] == (640, 640)
    assert bucket_for_latent(30, 53, p480).spatial_scales() == pyr.spatial_scales()
    assert bucket_for_frame(50, 90, pyramid_preset("tiny"), 8)[1] == (64, 64)
    # captions: segment captions follow clips (clip 0 and 1 use segment 0), unused ones are not packed
    rec = MediaRecord("m:1", "video", "/x.npy", ("first",), 0, 49, 16.0, ("a", "b", "c", "d"))
    caps, of_clip = sample_captions(rec, 3, random.Random(0), 0.0, None)
    assert caps == ["a", "b"] and of_clip == [0, 0, 1]
    # first_frame_all_captions: the first frame reads every segment's caption, the cut-off ones too
    caps, of_clip = sample_captions(rec, 3, random.Random(0), 0.0, None, first_frame_all=True)
    assert caps == ["a", "b", "c", "d"] and of_clip == [(0, 1, 2, 3), 0, 1]
    caps, _ = sample_captions(rec, 1, random.Random(0), 0.0, 2.0)
    assert caps == ["<<<t=2s>>> first"]
    cut = {truncate_sentences("One. Two. Three.", random.Random(s)) for s in range(30)}
    assert cut == {"One.", "One. Two.", "One. Two. Three."}


def test_media_decoding_and_skips(tmp_path):
    from infinitystar.media import export_to_video
    from infinitystar.train.data import (SampleLoader, SampleSpec, ShardedOrder, SkipSample, read_manifests,
                                         read_video_frames)
    frames = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    mp4 = export_to_video(frames, tmp_path / "v.mp4", fps=16, lossless=True)
    got = read_video_frames(str(mp4), [0, 3, 7])
    assert np.array_equal(got, frames[[0, 3, 7]])                      # PyAV, only the frames asked for
    with pytest.raises(SkipSample, match="short"):
        read_video_frames(str(mp4), [0, 25])
    (tmp_path / "bad.mp4").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    extra = [{"video_path": str(tmp_path / n), "begin_frame_id": 0, "end_frame_id": 17, "fps": 16, "caption": "c"}
             for n in ("bad.mp4", "bad.npy", "missing.mp4")]
    extra.append({"image_path": str(tmp_path / "missing.png"), "text": "c"})
    extra.append({"video_path": str(mp4), "begin_frame_id": 0, "end_frame_id": 20, "fps": 16, "caption": "ok"})
    manifest = write_dataset(tmp_path / "d", n_videos=0, n_images=0, extra=extra)
    recs = read_manifests([manifest])
    spec = SampleSpec(pyramid_preset("tiny"), pixels_per_latent=8, max_frames=17, unit=16)
    loader = SampleLoader(recs, spec, ShardedOrder(len(recs), 0, shuffle=False), num_workers=2)
    s = loader.next()
    assert s.num_frames == 17 and tuple(s.pixels.shape) == (3, 17, 64, 64) and s.captions == ["ok"]
    assert torch.equal(s.pixels, torch.from_numpy(frames[:17]).permute(3, 0, 1, 2).float() / 127.5 - 1)
    assert loader.stats.skipped["corrupt"] == 2 and loader.stats.skipped["missing"] == 2
    loader.close()
    # a dataset with no usable sample stops with an error instead of spinning
    bad = read_manifests([write_dataset(tmp_path / "e", 0, 0, extra=extra[:2])])
    loader = SampleLoader(bad, spec, ShardedOrder(len(bad), 0), num_workers=0, max_consecutive_skips=5)
    with pytest.raises(RuntimeError, match="consecutive samples were unusable"):
        loader.next()


def test_sharded_order_matches_one_process():
    from infinitystar.train.data import ShardedOrder
    one = ShardedOrder(10, seed=1)
    ranks = [ShardedOrder(10, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(12):   # crosses an epoch boundary
        a = {next(one) for _ in range(4)}
        b = {next(o) for o in ranks for _ in range(2)}
        assert a == b
    st = ranks[1].state_dict()
    nxt = next(ranks[1])
    again = ShardedOrder(10, seed=1, rank=1, world_size=2)
    again.load_state_dict(st)
    assert next(again) == nxt


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def test_scale_subsets_stay_in_range_and_keep_references():
    from infinitystar.train.targets import choose_scales, prepare_sample
    from infinitystar.model.packing import PackSample, pack_sequence
    pyr = pyramid_preset("tiny")
    g = torch.Generator().manual_seed(0)
    cfg = ScaleSubsetConfig(mode="random", clip_weights=[1, 1, 1, 5], earlier_full_prob=0.0)
    image = pyr.build(1)
    for _ in range(50):   # the official outcome lists index past an image's scales; ours never do
        s = choose_scales(image, cfg, g)
        assert s == list(range(s[-1] + 1)) and s[-1] < len(image.scales)
    long = pyr.build(49)   # image + 3 clips
    N, seen_lengths = long.scales_per_clip, set()
    for _ in range(200):
        s = choose_scales(long, cfg, g)
        for si in s:
            assert all(r in s for r in long.refs(si))
        last = long.scales[s[-1]].clip
        assert [long.scales[i].clip for i in s if long.scales[i].clip < last] == list(range(last))  # refs only
        seen_lengths.add(len(s))
    assert len(seen_lengths) > 4
    dense = pyramid_preset("tiny", attention="dense").build(33)
    s = choose_scales(dense, cfg, g)
    assert s == list(range(s[-1] + 1))
    # a prepared sample always packs (pack_sequence raises if a reference scale is missing)
    z = torch.randn(64, 13, 8, 8)
    for seed in range(5):
        for captions, of_clip in ((["a", "b"], [0, 0, 1, 1]), (["a", "b", "c"], [(0, 1, 2), 0, 1, 2])):
            p = prepare_sample(z, long, captions, of_clip, torch.Generator().manual_seed(seed), subset=cfg,
                               text_dropout=0.5)
            assert abs(float(p.weights.sum()) - 1) < 1e-6 and len(p.bits) == len(p.steps)
            pack_sequence([PackSample(p.schedule, p.steps, [3] * len(p.captions), p.caption_of_clip)], 64, 64)
            if isinstance(of_clip[0], tuple):   # the first frame keeps every caption, cut clips or not
                assert p.captions == captions and p.caption_of_clip == of_clip


def test_text_dropout_uses_the_null_text_of_the_same_length():
    from infinitystar.model.infinitystar import InfinityStarTransformer, transformer_preset
    from infinitystar.model.packing import PackSample, pack_sequence, select_steps
    from infinitystar.train.targets import PackedTrainModule
    torch.manual_seed(0)
    model = InfinityStarTransformer(transformer_preset("tiny")).eval()
    sched = pyramid_preset("tiny").build(1)
    steps = select_steps(sched, None, "last")
    packed = pack_sequence([PackSample(sched, steps, [5])], 64, 64)
    x = torch.randn(packed.num_visual, 64)
    with torch.no_grad():
        got, anchor = PackedTrainModule(model)(x, [5], packed)
        want = model.forward_packed(x, [model.null_text_features(5)], packed)
    assert float(anchor) == 0.0 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_loss_weighting_follows_official_exponent():
    from infinitystar.train.loss import scale_loss_weights
    w = scale_loss_weights([1, 32, 1024], 1024)
    v = torch.tensor([1.0, 32, 1024])
    assert torch.allclose(w, v ** 0.8 / (v ** 0.8).sum(), rtol=1e-5)
    flat = scale_loss_weights([1, 32, 1024], 1024, reweight_by_scale=0, max_reweight=1e9)
    assert torch.allclose(flat, torch.full((3,), 1 / 3))


def test_residual_bit_weighting_weights_each_bit_by_what_its_sign_costs():
    from infinitystar.quant.residual import encode_targets
    from infinitystar.train.loss import bitwise_loss
    from infinitystar.train.targets import prepare_sample
    sched = pyramid_preset("tiny").build(17)
    z = torch.randn(64, sched.num_latent_frames, *sched.full_hw, generator=torch.Generator().manual_seed(0))
    subset = ScaleSubsetConfig(mode="all")
    kw = dict(subset=subset, bsc_strength=0.0, repetition="last")
    plain = prepare_sample(z, sched, ["a"], [0] * sched.num_clips, torch.Generator().manual_seed(1), **kw)
    weighted = prepare_sample(z, sched, ["a"], [0] * sched.num_clips, torch.Generator().manual_seed(1),
                              bit_weighting="residual", **kw)
    assert plain.bit_weights is None and len(weighted.bit_weights) == len(weighted.steps)
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, weighted.bits))   # labels unchanged
    t = encode_targets(z[None], sched, magnitudes=True)
    for step, w, bits in zip(weighted.steps, weighted.bit_weights, weighted.bits):
        assert w.shape == bits.shape and abs(float(w.mean()) - 1) < 1e-5
        mag = t.magnitudes[step.index][0].reshape(w.shape)
        assert torch.allclose(w, mag / mag.mean())   # proportional to |residual|
    # the loss: each bit's cross-entropy times its weight; all-equal weights give the plain loss
    logits = torch.randn(5, 8, 2, generator=torch.Generator().manual_seed(2))
    bits = torch.randint(0, 2, (5, 8), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    ce, acc = bitwise_loss(logits, bits)
    assert torch.allclose(bitwise_loss(logits, bits, torch.ones(5, 8))[0], ce)
    w = torch.zeros(5, 8)
    w[:, 0] = 8.0   # all weight on bit 0: the loss is bit 0's cross-entropy alone
    only0 = torch.nn.functional.cross_entropy(logits[:, 0], bits[:, 0].long(), reduction="none")
    got, acc_w = bitwise_loss(logits, bits, w)
    assert torch.allclose(got, only0) and torch.equal(acc_w, acc)
    with pytest.raises(ValueError, match="bit_weighting"):
        prepare_sample(z, sched, ["a"], [0] * sched.num_clips, torch.Generator(), bit_weighting="magnitude", **kw)


def test_focal_gamma_weights_each_bit_by_how_wrong_the_model_is():
    from infinitystar.train.loss import bitwise_loss
    logits = torch.randn(6, 8, 2, generator=torch.Generator().manual_seed(0))
    bits = torch.randint(0, 2, (6, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    ce = F.cross_entropy(logits.flatten(0, 1), bits.flatten().long(), reduction="none").view(6, 8)
    p_true = logits.softmax(-1).gather(-1, bits.long()[..., None])[..., 0]
    got, acc = bitwise_loss(logits, bits, focal_gamma=2.0)
    assert torch.allclose(got, (ce * (1 - p_true) ** 2).mean(-1), atol=1e-6)
    assert torch.equal(acc, bitwise_loss(logits, bits)[1])
    assert torch.equal(bitwise_loss(logits, bits, focal_gamma=0.0)[0], ce.mean(-1))
    with pytest.raises(ConfigError, match="train.focal_gamma"):
        config_from_dict({"train": {"focal_gamma": -1.0}})


def test_clip_scale_boost_moves_loss_weight_to_the_chosen_clip_scales():
    from infinitystar.train.targets import boost_scale_weights, prepare_sample
    sched = pyramid_preset("tiny").build(17)
    z = torch.randn(64, sched.num_latent_frames, *sched.full_hw, generator=torch.Generator().manual_seed(0))
    plain = prepare_sample(z, sched, ["a"], [0] * sched.num_clips, torch.Generator().manual_seed(1),
                           subset=ScaleSubsetConfig(mode="all"), bsc_strength=0.0, repetition="last")
    n = sched.scales_per_clip
    boost = [5.0] + [1.0] * (n - 1)            # the first scale of every video clip
    got = boost_scale_weights(plain, boost)
    assert abs(float(got.weights.sum()) - 1) < 1e-6
    ratio = got.weights / plain.weights
    for st, r in zip(plain.steps, ratio.tolist()):
        boosted = st.scale.clip >= 1 and st.scale.in_clip == 0
        # every weight rescaled by the same normaliser, the boosted ones 5x more
        assert r == pytest.approx(float(ratio[0]) * (5.0 if boosted else 1.0), rel=1e-5)
    assert any(st.scale.clip >= 1 and st.scale.in_clip == 0 for st in plain.steps)
    assert torch.equal(boost_scale_weights(plain, [1.0] * n).weights, plain.weights / plain.weights.sum())


def test_first_frame_scale_boost_weights_a_videos_first_frame_and_leaves_images_alone():
    from infinitystar.train.targets import boost_scale_weights, prepare_sample
    common = dict(subset=ScaleSubsetConfig(mode="all"), bsc_strength=0.0, repetition="last")
    video = pyramid_preset("tiny").build(17)
    z = torch.randn(64, video.num_latent_frames, *video.full_hw, generator=torch.Generator().manual_seed(0))
    plain = prepare_sample(z, video, ["a"], [0] * video.num_clips, torch.Generator().manual_seed(1), **common)
    n = video.scales_per_clip
    first = [4.0, 2.0] + [1.0] * (n - 2)
    got = boost_scale_weights(plain, None, first)
    assert abs(float(got.weights.sum()) - 1) < 1e-6
    ratio = (got.weights / plain.weights).tolist()
    for st, r in zip(plain.steps, ratio):
        want = first[st.scale.in_clip] if st.scale.clip == 0 else 1.0
        assert r == pytest.approx(ratio[-1] * want, rel=1e-5)
    # with both boosts the clip's steps take clip_scale_boost, the first frame's first_frame_scale_boost
    both = boost_scale_weights(plain, [3.0] * n, first)
    r2 = (both.weights / plain.weights).tolist()
    for st, r in zip(plain.steps, r2):
        want = first[st.scale.in_clip] if st.scale.clip == 0 else 3.0
        assert r == pytest.approx(r2[0] / first[0] * want, rel=1e-5)
    image = pyramid_preset("tiny").build(1)
    zi = torch.randn(64, 1, *image.full_hw, generator=torch.Generator().manual_seed(2))
    img = prepare_sample(zi, image, ["a"], [0] * image.num_clips, torch.Generator().manual_seed(3), **common)
    assert torch.allclose(boost_scale_weights(img, None, first).weights, img.weights / img.weights.sum())


def test_first_frame_all_captions_trains_a_long_video_whose_first_frame_reads_every_segment(tmp_path):
    from infinitystar.train.data import SampleLoader, SampleSpec, ShardedOrder, read_manifests
    v = np.random.default_rng(0).integers(0, 256, (49, 64, 64, 3)).astype(np.uint8)
    np.save(tmp_path / "long.npy", v)
    extra = [{"video_path": str(tmp_path / "long.npy"), "begin_frame_id": 0, "end_frame_id": 49, "fps": 16,
              "caption": "one", "captions_per_segment": ["one", "two", "three"]}]
    manifest = write_dataset(tmp_path / "d", n_videos=0, n_images=1, extra=extra)
    recs = [r for r in read_manifests([manifest]) if r.kind == "video"]
    spec = SampleSpec(pyramid_preset("tiny"), pixels_per_latent=8, max_frames=33, unit=16,
                      first_frame_all_captions=True)
    loader = SampleLoader(recs, spec, ShardedOrder(1, 0, shuffle=False), num_workers=0)
    s = loader.next()
    loader.close()
    assert s.num_frames == 33 and s.captions == ["one", "two", "three"] and s.caption_of_clip[0] == (0, 1, 2)
    out = run_training(tiny_config(tmp_path / "run", manifest, data={"max_frames": 33,
                                                                    "first_frame_all_captions": True}))
    assert out.step == 4 and math.isfinite(out.loss)


def test_clip_scale_boost_trains_and_must_give_one_positive_factor_per_clip_scale(tmp_path):
    from infinitystar.train.trainer import Trainer
    manifest = write_dataset(tmp_path / "data", n_videos=2, n_images=1, seed=0)
    n = pyramid_preset("tiny").build(17).scales_per_clip
    out = run_training(tiny_config(tmp_path / "ok", manifest, train={"clip_scale_boost": [3.0] + [1.0] * (n - 1)}))
    assert out.step == 4 and math.isfinite(out.loss)
    out = run_training(tiny_config(tmp_path / "ff", manifest, train={"first_frame_scale_boost": [3.0] * n}))
    assert out.step == 4 and math.isfinite(out.loss)
    for key in ("clip_scale_boost", "first_frame_scale_boost"):
        for bad in ([2.0], [0.0] * n):
            raw = tiny_config(tmp_path / "bad", manifest, train={key: bad})
            with pytest.raises(ConfigError, match=f"{key}: expected {n} positive factors"):
                Trainer(config_from_dict(raw), text_encoder=HashTextEncoder(32), tokenizer=LinearTokenizer())


def test_ema_warms_up_instead_of_keeping_the_initialisation():
    from infinitystar.train.checkpoint import EMA
    layer = nn.Linear(3, 2, bias=False)
    start = layer.weight.detach().clone()
    ema = EMA(layer, decay=0.999)
    with torch.no_grad():
        layer.weight.add_(1.0)
    ema.update(0)           # first update: decay min(0.999, 1/10) keeps a tenth of the start
    torch.testing.assert_close(ema.shadow[0], start + 0.9)
    assert ema.decay_at(2000) == pytest.approx(2001 / 2010)
    assert ema.decay_at(10 ** 6) == 0.999   # the configured decay once warmed up


# --------------------------------------------------------------------------------------------------
# Latent cache
# --------------------------------------------------------------------------------------------------

def test_extract_features_sharded_resumable_no_collisions(tmp_path):
    from infinitystar.train.features import extract_features
    from infinitystar.train.latent_cache import cache_path
    from infinitystar.train.data import SampleSpec, read_manifests
    a, b = tmp_path / "a", tmp_path / "b"
    ma = write_dataset(a, n_videos=3, n_images=1, seed=0)
    write_dataset(b, n_videos=3, n_images=1, seed=1)   # the same file names in another folder
    lines = ma.read_text() + "".join(
        json.dumps({**json.loads(l), "video_path": str(b / json.loads(l)["video_path"])}) + "\n"
        for l in (b / "data.jsonl").read_text().splitlines() if "video_path" in l)
    lines += json.dumps({"video_path": str(tmp_path / "gone.npy"), "end_frame_id": 17, "caption": "x"}) + "\n"
    ma.write_text(lines)
    spec = SampleSpec(pyramid_preset("tiny"), pixels_per_latent=8, max_frames=17, unit=16)
    out = tmp_path / "cache"
    tok = LinearTokenizer()
    s0 = extract_features(ma, tok, out, 0, 2, spec=spec, progress=False)
    s1 = extract_features(ma, tok, out, 1, 2, spec=spec, progress=False)
    recs = read_manifests([ma])
    assert s0.written + s1.written == len(recs) - 1 and s0.skipped.get("missing", 0) + s1.skipped.get("missing", 0) == 1
    files = {cache_path(out, r) for r in recs}
    assert len(files) == len(recs)                                     # v0.npy in a/ and b/ do not collide
    (out / "ab").mkdir(exist_ok=True)
    (out / "ab" / ".partial.tmp").write_bytes(b"half")                 # a killed write leaves only a temp file
    again = extract_features(ma, tok, out, 0, 1, spec=spec, progress=False)
    assert again.written == 0 and again.existing == len(recs) - 1      # resumable: nothing is redone


def test_training_from_cache_equals_online_encoding(tmp_path, dataset):
    from infinitystar.train.features import extract_features
    from infinitystar.train.trainer import spec_from_config
    raw = tiny_config(tmp_path / "online", dataset, train={"max_steps": 2}, checkpoint={"every": 0})
    run_training(raw)
    cache = tmp_path / "cache"
    extract_features(dataset, LinearTokenizer(), cache, spec=spec_from_config(config_from_dict(raw)), progress=False)
    raw2 = tiny_config(tmp_path / "cached", dataset, train={"max_steps": 2}, checkpoint={"every": 0},
                       data={"latent_cache": str(cache), "require_cache": True})
    run_training(raw2, tokenizer=None)
    assert losses(tmp_path / "online") == losses(tmp_path / "cached")
    from infinitystar.train.metrics import read_metrics
    assert read_metrics(tmp_path / "cached" / "metrics.jsonl")[-1]["cache_hits"] == 4


def test_training_fills_the_latent_cache_as_it_encodes(tmp_path, dataset):
    from infinitystar.train.metrics import read_metrics
    cache = tmp_path / "cache"
    raw = tiny_config(tmp_path / "filling", dataset, train={"max_steps": 2}, checkpoint={"every": 0},
                      data={"latent_cache": str(cache)})
    run_training(raw)
    assert read_metrics(tmp_path / "filling" / "metrics.jsonl")[-1]["encoded"] == 4
    assert len(list(cache.rglob("*.safetensors"))) == 4
    # what it wrote is what extract_features would: a run that may only read the cache trains identically
    raw2 = tiny_config(tmp_path / "reading", dataset, train={"max_steps": 2}, checkpoint={"every": 0},
                       data={"latent_cache": str(cache), "require_cache": True})
    run_training(raw2, tokenizer=None)
    assert losses(tmp_path / "filling") == losses(tmp_path / "reading")
    assert read_metrics(tmp_path / "reading" / "metrics.jsonl")[-1]["cache_hits"] == 4
    # cache_write false leaves the folder as it is
    raw3 = tiny_config(tmp_path / "off", dataset, train={"max_steps": 2}, checkpoint={"every": 0},
                       data={"latent_cache": str(tmp_path / "untouched"), "cache_write": False})
    run_training(raw3)
    assert not (tmp_path / "untouched").exists()


# --------------------------------------------------------------------------------------------------
# Trainer, checkpoints
# --------------------------------------------------------------------------------------------------

def test_training_logs_and_learns(tmp_path, dataset):
    raw = tiny_config(tmp_path / "run", dataset, train={"max_steps": 12, "micro_batch": 2, "text_dropout": 0.2,
                                                        "bsc_strength": 0.0, "scale_subset": {"mode": "all"},
                                                        "ema_decay": 0.9, "activation_checkpointing": True,
                                                        "bit_weighting": "residual"},
                      optim={"lr": 3e-3, "warmup_steps": 2, "decay": "cosine"}, checkpoint={"every": 0})
    res = run_training(raw)
    from infinitystar.train.metrics import read_metrics
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, 13)) and res.step == 12
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "acc_image_s0", "acc_video_s3"):
        assert key in recs[-1], key
    assert recs[-1]["peak_memory_mb"] > 0 and recs[-1]["tokens_per_s"] > 0
    assert np.mean([r["loss"] for r in recs[-3:]]) < np.mean([r["loss"] for r in recs[:3]])
    ckpt = res.checkpoint
    assert (ckpt / "ema.safetensors").is_file()
    # the checkpoint folder is a loadable transformer (config.json + model.safetensors)
    from infinitystar.model.infinitystar import InfinityStarTransformer
    InfinityStarTransformer.from_pretrained(ckpt)
    assert (tmp_path / "run" / "config.yaml").is_file()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_training(raw)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, dataset):
    a = tiny_config(tmp_path / "a", dataset, train={"max_steps": 2, "micro_batch": 2, "grad_accum": 1},
                    checkpoint={"every": 0})
    b = tiny_config(tmp_path / "b", dataset, train={"max_steps": 2, "micro_batch": 1, "grad_accum": 2},
                    checkpoint={"every": 0})
    ra, rb = run_training(a), run_training(b)
    assert np.allclose(losses(tmp_path / "a"), losses(tmp_path / "b"), atol=1e-5)
    wa, wb = weights(ra.checkpoint), weights(rb.checkpoint)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_resume_is_bitwise_identical(tmp_path, dataset):
    extra = {"ema_decay": 0.8, "text_dropout": 0.3}
    straight = tiny_config(tmp_path / "straight", dataset, train={"max_steps": 6, **extra}, checkpoint={"every": 3},
                           data={"short_caption_prob": 0.5, "num_workers": 2})
    r1 = run_training(straight)
    split = tiny_config(tmp_path / "split", dataset, train={"max_steps": 6, **extra}, checkpoint={"every": 3},
                        data={"short_caption_prob": 0.5, "num_workers": 2})
    run_training(split, until=3)
    r2 = run_training(split, resume="latest")
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    for name in ("model.safetensors", "ema.safetensors"):
        w1, w2 = weights(r1.checkpoint, name), weights(r2.checkpoint, name)
        assert all(torch.equal(w1[k], w2[k]) for k in w1), name
    t1 = json.loads((r1.checkpoint / "trainer.json").read_text())
    assert t1["step"] == 6 and t1["lr"] == pytest.approx(json.loads((r2.checkpoint / "trainer.json").read_text())["lr"])


def test_interrupted_checkpoint_keeps_previous(tmp_path, dataset, monkeypatch):
    from infinitystar.train.checkpoint import find_latest
    raw = tiny_config(tmp_path / "run", dataset, train={"max_steps": 4}, checkpoint={"every": 2})
    run_training(raw, until=2)
    root = tmp_path / "run" / "checkpoints"
    good = weights(root / "step_00000002")
    import infinitystar.train.checkpoint as checkpoint

    def crash(tensors, filename, metadata=None):   # dies half-way through writing the weights
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        run_training(raw, resume="latest")
    monkeypatch.undo()
    assert (root / ".tmp-step_00000004").is_dir()                      # the interrupted save is left behind ...
    assert find_latest(root) == root / "step_00000002"                 # ... but latest is the previous one
    assert (root / "latest").read_text() == "step_00000002"
    # a pointer to a broken folder (crash between writes) falls back to the newest complete checkpoint
    (root / "step_00000003").mkdir()
    (root / "latest").write_text("step_00000003")
    assert find_latest(root) == root / "step_00000002"
    (root / "latest").unlink()
    assert find_latest(root) == root / "step_00000002"
    res = run_training(raw, resume="latest")                           # resumes from 2 and finishes
    assert res.step == 4 and not (root / ".tmp-step_00000004").exists()
    from infinitystar.train.metrics import read_metrics
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert (root / "latest").read_text() == "step_00000004"
    assert any(not torch.equal(good[k], weights(res.checkpoint)[k]) for k in good)


def test_captions_cut_counts_the_text_encoders_own_limit(tmp_path, dataset):
    """Captions of 5-7 words through a built-in encoder that reads 3 (max_len 4) are all counted as cut, although
    the model's text_maxlen (64) is far away; with max_len 16 none are."""
    from infinitystar.text.builtin import WordTextEncoder
    from infinitystar.train.metrics import read_metrics
    from infinitystar.train.trainer import Trainer
    cut = {}
    for max_len in (4, 16):
        torch.manual_seed(0)
        enc = WordTextEncoder("a red circle blue square number moving right 0 1 2 3 4 5".split(), width=32,
                              depth=1, num_heads=2, max_len=max_len)
        raw = tiny_config(tmp_path / f"run{max_len}", dataset, train={"max_steps": 1, "text_dropout": 0.0},
                          checkpoint={"every": 0})
        tr = Trainer(config_from_dict(raw), text_encoder=enc, tokenizer=LinearTokenizer())
        try:
            tr.fit()
        finally:
            tr.close()
        cut[max_len] = read_metrics(tmp_path / f"run{max_len}" / "metrics.jsonl")[-1]["captions_cut"]
    assert cut[4] >= 2 and cut[16] == 0   # micro_batch 2: at least one caption per sample


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def builtin_text_encoder(path: Path) -> Path:
    from infinitystar.text.builtin import WordTextEncoder
    torch.manual_seed(0)
    words = "a red circle blue square number moving right 0 1 2 3 4 5 6 7".split()
    WordTextEncoder(words, width=32, depth=1, num_heads=2, max_len=16).save_pretrained(path)
    return path


def test_add_cli_and_module_entry_point(tmp_path, dataset):
    import argparse
    import yaml
    from infinitystar.cli.train import add_cli
    from infinitystar.train.features import extract_features
    from infinitystar.train.trainer import spec_from_config
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers(dest="command"))
    a = p.parse_args(["train", "generator", "c.yaml", "--resume", "--set", "train.max_steps=3", "--precision", "fp32"])
    assert (a.kind, a.config, a.resume, a.overrides, a.precision) == ("generator", "c.yaml", "latest",
                                                                       ["train.max_steps=3"], "fp32")
    assert callable(a.func)
    a = p.parse_args(["extract-features", "m.jsonl", "--out", "cache", "--config", "c.yaml"])
    assert a.manifest == ["m.jsonl"] and a.out == "cache"
    # `python -m infinitystar.train CONFIG` end to end: builtin text encoder folder + latent cache
    raw = tiny_config(tmp_path / "run", dataset, train={"max_steps": 2}, checkpoint={"every": 0},
                      data={"latent_cache": str(tmp_path / "cache")},
                      text_encoder={"path": str(builtin_text_encoder(tmp_path / "te"))})
    extract_features(dataset, LinearTokenizer(), tmp_path / "cache", spec=spec_from_config(config_from_dict(raw)),
                     progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "infinitystar.train", str(cfg)], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "--- config ---" in r.stderr and summary["step"] == 2 and summary["precision"] == "fp32"
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    r = subprocess.run([sys.executable, "-m", "infinitystar.train", str(cfg), "--set", "optim.lr=fast"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "optim.lr: expected a number" in r.stderr


def test_extract_features_command_with_the_video_tokenizer(tmp_path, capsys):
    import argparse
    import yaml
    from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig
    from infinitystar.cli.train import add_cli
    from infinitystar.train.data import read_manifests
    from infinitystar.train.latent_cache import cache_path, read_cached_latent
    from infinitystar.train.trainer import spec_from_config
    torch.manual_seed(0)
    VideoVAE(VideoVAEConfig.small()).save_pretrained(tmp_path / "vae")   # 8x space, 4x time, 64 channels
    manifest = write_dataset(tmp_path / "d", n_videos=1, n_images=1)
    raw = tiny_config(tmp_path / "run", manifest, tokenizer={"path": str(tmp_path / "vae")},
                      data={"latent_cache": str(tmp_path / "cache")})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers(dest="command"))
    args = p.parse_args(["extract-features", "--config", str(tmp_path / "c.yaml"), "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 2 and summary["rank"] == 0
    spec = spec_from_config(config_from_dict(raw))
    video = next(r for r in read_manifests([manifest]) if r.kind == "video")
    z = read_cached_latent(tmp_path / "cache", video, spec, 17)
    assert tuple(z.shape) == (64, 5, 8, 8) and cache_path(tmp_path / "cache", video).is_file()


# --------------------------------------------------------------------------------------------------
# Joint training of the built-in text encoder, export to a model folder
# --------------------------------------------------------------------------------------------------

def test_trainable_text_encoder_learns_resumes_and_exports(tmp_path, dataset):
    from infinitystar.pipelines.infinitystar import InfinityStarPipeline
    from infinitystar.text.builtin import WordTextEncoder
    from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig
    from infinitystar.train.export import export_model
    from infinitystar.train.trainer import Trainer
    te = builtin_text_encoder(tmp_path / "te")
    initial = WordTextEncoder.from_pretrained(te).state_dict()

    def run(out, until=None, resume=None):
        raw = tiny_config(out, dataset, train={"max_steps": 4, "ema_decay": 0.5, "text_dropout": 0.0},
                          text_encoder={"path": str(te), "trainable": True})
        tr = Trainer(config_from_dict(raw), tokenizer=LinearTokenizer(), resume=resume)
        try:
            return tr.fit(until=until)
        finally:
            tr.close()

    straight = run(tmp_path / "straight")
    run(tmp_path / "split", until=2)
    split = run(tmp_path / "split", resume="latest")
    for name in ("model.safetensors", "ema.safetensors"):
        w1, w2 = weights(straight.checkpoint, name), weights(split.checkpoint, name)
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1), name
    text = {k[len("text_encoder."):]: v for k, v in weights(straight.checkpoint).items()
            if k.startswith("text_encoder.")}
    assert text.keys() == initial.keys()
    assert not torch.equal(text["embed.weight"], initial["embed.weight"])      # the encoder was trained

    vae = tmp_path / "vae"
    VideoVAE(VideoVAEConfig.small()).save_pretrained(vae)
    export_model(straight.checkpoint, tmp_path / "model", tokenizer=vae)
    pipe = InfinityStarPipeline.from_pretrained(tmp_path / "model")
    ema = weights(straight.checkpoint, "ema.safetensors")
    assert torch.equal(pipe.text_encoder.state_dict()["embed.weight"], ema["text_encoder.embed.weight"])
    assert torch.equal(pipe.transformer.state_dict()["null_text"], ema["null_text"])
    assert (pipe.height, pipe.width) == (64, 64)
    out = pipe("a red circle", num_frames=1, generator=torch.Generator().manual_seed(0))
    assert out.frames[0].shape == (1, 64, 64, 3)

    raw = tiny_config(tmp_path / "bad", dataset, text_encoder={"path": None, "trainable": True})
    with pytest.raises(ConfigError, match="only the built-in word encoder"):
        Trainer(config_from_dict(raw), text_encoder=HashTextEncoder(32), tokenizer=LinearTokenizer())
