"""Tokenizer training: the differentiable multi-scale quantizer, the three training modes, exact resume,
knowledge inheritance, the reconstruct command and the PSNR/SSIM metrics. Tiny models on 5-frame 64x64 clips."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infinitystar.quant.residual import encode_targets, quantize_multiscale
from infinitystar.runtime import UserError, precision_name, resolve_precision
from infinitystar.schedules.pyramid import PyramidConfig, Schedule
from infinitystar.train.tokenizer import DEFAULT_PYRAMID, TokenizerTrainer, config_from_dict, train
from infinitystar.train.tokenizer_loss import (LossConfig, calibrate_scale, content_weights, edge_loss,
                                               reconstruction_loss, sample_drop, worst_pixel_loss)
from infinitystar.cli.tokenizer import add_cli
from infinitystar.tokenizer.training_eval import (PSNR_CAP_DB, fit_pyramid, psnr, psnr_per_frame, ssim,
                                                  ssim_per_frame)
from infinitystar.tokenizer.video_vae import VideoVAE
from infinitystar.train.config import ConfigError

TINY = {"block_out_channels": [4, 8, 8, 8]}     # 8x space (incl. patchify), 4x time, 64 latent channels


def _cfg(tmp_path, name, **over):
    d = {"output_dir": str(tmp_path / name), "seed": 3, "device": "cpu",
         "model": dict(TINY), "data": {"frames": 5, "val_samples": 1}, "quant": {"calibration_clips": 2},
         "train": {"max_steps": 4, "batch_size": 2, "val_every": 0, "precision": "fp32"},
         "optim": {"lr": 3e-3, "warmup_steps": 0},
         "checkpoint": {"every": 2}, "log": {"every": 1, "progress": False}}
    for k, v in over.items():
        if v is None:
            d.pop(k, None)
        elif isinstance(v, dict):
            d[k] = {**d.get(k, {}), **v}
        else:
            d[k] = v
    return config_from_dict(d)


@pytest.fixture(scope="module")
def continuous_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cont")
    res = train(_cfg(tmp, "run", mode="continuous", train={"max_steps": 6}))
    return res.model_dir


def _schedules():
    return [Schedule([(1, 1), (2, 3), (4, 6)], 5, 2, [2, 2, 1], [1, 2, 1], detail_min_tokens=20),
            PyramidConfig(pn=None, **DEFAULT_PYRAMID).build(17)]


# --- quantizer ----------------------------------------------------------------------------------------------------
def test_quantize_multiscale_equals_encode_targets_without_dropping():
    for i, s in enumerate(_schedules()):
        z = 2 * torch.randn(2, 64, s.num_latent_frames, *s.full_hw, generator=torch.Generator().manual_seed(i))
        t = encode_targets(z, s)
        q = quantize_multiscale(z.clone().requires_grad_(), s)
        assert torch.equal(q.codes.detach(), t.codes)          # bit-identical values
        assert len(q.bits) == len(t.bits) and all(torch.equal(a, b) for a, b in zip(q.bits, t.bits))
        assert [st.index for st in q.steps] == [st.index for st in t.steps]


def test_gradients_flow_through_straight_through_quantizer():
    s = _schedules()[1]
    z = torch.randn(1, 64, 5, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    q = quantize_multiscale(z, s)
    w = torch.randn(q.codes.shape, generator=torch.Generator().manual_seed(1))
    (q.codes * w).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    z.grad = None
    q = quantize_multiscale(z, s)
    q.aux_loss().backward()                                     # commitment + entropy reach z too
    assert z.grad.abs().sum() > 0


def test_dropped_scales_add_nothing_and_are_validated():
    s = _schedules()[1]
    z = torch.randn(1, 64, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    q = quantize_multiscale(z, s, drop_scales=2)
    assert [b is None for b in q.bits] == [i in (0, 1) for i in range(5)] * 2
    assert not torch.equal(q.codes, quantize_multiscale(z, s).codes)
    assert torch.equal(q.codes, quantize_multiscale(z, s, drop_scales={0, 1}).codes)
    with pytest.raises(ValueError, match="keep at least one"):
        quantize_multiscale(z, s, drop_scales=range(5))
    with pytest.raises(ValueError, match="out of range"):
        quantize_multiscale(z, s, drop_scales=[7])
    g = torch.Generator().manual_seed(0)
    draws = [sample_drop("coarse", 0.5, 5, g) for _ in range(200)]
    assert all(d == () or (d == tuple(range(len(d))) and len(d) < 5) for d in draws)
    assert 50 < sum(d != () for d in draws) < 150
    assert all(4 not in sample_drop("independent", 0.9, 5, g) for _ in range(50))   # the finest scale stays


# --- metrics ------------------------------------------------------------------------------------------------------
def test_identical_videos_have_ssim_one_and_capped_psnr():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    assert psnr(frames, frames) == PSNR_CAP_DB
    assert psnr_per_frame(frames, frames) == [PSNR_CAP_DB] * 5
    assert all(abs(v - 1.0) < 1e-9 for v in ssim_per_frame(frames, frames))
    noisy = np.clip(frames.astype(int) + rng.integers(-20, 21, frames.shape), 0, 255).astype(np.uint8)
    assert 15 < psnr(frames, noisy) < 40 and ssim(frames, noisy) < 0.99
    # known value: a constant offset of 1/255 everywhere -> PSNR = 20 log10(255)
    flat = np.full((1, 16, 16, 3), 100, np.uint8)
    assert abs(psnr(flat, flat + 1) - 20 * np.log10(255)) < 1e-9


def test_fit_pyramid_rescales_custom_scales():
    p = PyramidConfig(pn=None, **DEFAULT_PYRAMID)
    assert fit_pyramid(p, (8, 8)) is p
    assert fit_pyramid(p, (16, 16)).custom_scales == [[2, 2], [4, 4], [8, 8], [12, 12], [16, 16]]


# --- config -------------------------------------------------------------------------------------------------------
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="quant.drop_rate: unknown key"):
        _cfg(tmp_path, "x", quant={"drop_rate": 0.1})
    with pytest.raises(ConfigError, match="data.frames must be 1 \\+ k \\* 4"):
        _cfg(tmp_path, "x", data={"frames": 6})
    with pytest.raises(ConfigError, match="optim.lr: expected a number"):
        _cfg(tmp_path, "x", optim={"lr": "fast"})
    with pytest.raises(ConfigError, match="init: .* not a tokenizer folder"):
        _cfg(tmp_path, "x", mode="bitwise", init=str(tmp_path), model=None)
    with pytest.raises(ConfigError, match="loss.edge_weight"):
        _cfg(tmp_path, "x", loss={"edge_weight": -1.0})
    with pytest.raises(ConfigError, match="loss.worst_pixel_fraction"):
        _cfg(tmp_path, "x", loss={"worst_pixel_fraction": 0.0})
    cfg = _cfg(tmp_path, "x")
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()      # round trip


def test_edge_loss_penalises_a_blurred_step():
    step = torch.zeros(1, 3, 1, 4, 8)
    step[..., 4:] = 2.0                                 # one vertical edge of height 2 between columns 3 and 4
    blurred = step.clone()
    blurred[..., 3] = 1.0                               # the same edge spread over two columns
    assert float(edge_loss(step, step)) == 0.0
    # x-differences per row: target (0,0,0,2,0,0,0), blurred (0,0,1,1,0,0,0) -> mean |diff| 2/7; y: none
    assert float(edge_loss(blurred, step)) == pytest.approx(0.5 * 2 / 7)
    plain, _ = reconstruction_loss(blurred, step, LossConfig())
    with_edge, terms = reconstruction_loss(blurred, step, LossConfig(edge_weight=3.0))
    assert float(with_edge - plain) == pytest.approx(3.0 * terms["edge"]) and terms["edge"] == pytest.approx(1 / 7)


def test_worst_pixel_loss_is_the_mean_error_of_each_frames_worst_pixels():
    target = torch.zeros(1, 3, 2, 10, 10)               # 100 pixels per frame: fraction 0.02 -> the worst 2
    recon = target.clone()
    recon[0, :, 0, 0, 0] = torch.tensor([3.0, 4.0, 0.0])    # frame 0: one pixel off by 5 (Euclidean over RGB)
    recon[0, 0, 0, 5, :] = 0.1                          # ... and a row of small errors
    recon[0, 1, 1, 2, 3] = 2.0                          # frame 1: one pixel off by 2
    recon.requires_grad_(True)
    worst = worst_pixel_loss(recon - target, 0.02)
    assert float(worst.detach()) == pytest.approx(((5.0 + 0.1) + (2.0 + 0.0)) / 4, abs=1e-5)
    worst.backward()
    assert int((recon.grad.abs().sum(1) > 0).sum()) == 3     # only the counted pixels get a gradient
    plain, _ = reconstruction_loss(recon.detach(), target, LossConfig())
    total, terms = reconstruction_loss(recon.detach(), target, LossConfig(worst_pixel_weight=2.0))
    assert float(total - plain) == pytest.approx(2.0 * terms["worst_pixel"], abs=1e-5)


def test_content_weights_cover_both_sides_of_the_edge():
    frame = -torch.ones(1, 3, 2, 16, 16)
    frame[:, :, :, 6:10, 6:10] = 1.0                    # a 4x4 object on a flat background, two frames
    obj = torch.zeros(16, 16, dtype=torch.bool)
    obj[6:10, 6:10] = True
    ring = torch.zeros(16, 16, dtype=torch.bool)
    ring[4:12, 4:12] = True                             # the object and every pixel within 2 (Chebyshev) of it
    for margin, heavy in ((0, obj), (2, ring)):
        w = content_weights(frame, 10.0, margin)
        assert w.shape == (1, 1, 2, 16, 16)
        assert torch.equal(w[0, 0], torch.where(heavy, 11.0, 1.0).expand(2, 16, 16))
    # with the margin, painting the ring just outside costs as much as eroding the ring just inside
    grown, eroded = frame.clone(), frame.clone()
    grown[:, :, :, 5:11, 5:11] = 1.0
    eroded[:, :, :, 6:10, 6:10] = -1.0
    eroded[:, :, :, 7:9, 7:9] = 1.0
    cost = lambda x, m: float(reconstruction_loss(x, frame, LossConfig(l2_weight=0, content_weight=10.0,
                                                                       content_margin=m))[0])
    assert cost(grown, 2) == pytest.approx(cost(eroded, 2) * 20 / 12)   # 20 ring pixels outside, 12 inside
    assert cost(grown, 0) < cost(eroded, 0) / 5                        # object-only weights favour growing


# --- training -----------------------------------------------------------------------------------------------------
def _fixed_batch_loss(trainer: TokenizerTrainer, video: torch.Tensor) -> float:
    with torch.no_grad():
        return trainer.losses(video, 0)[1]["l1"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,inherit", [("continuous", False), ("bitwise", False), ("bitwise", True)])
def test_a_few_steps_reduce_the_loss(tmp_path, continuous_dir, mode, inherit):
    over = {"mode": mode, "train": {"max_steps": 8}, "checkpoint": {"every": 0},
            "quant": {"depth_mode": "none"}}
    if inherit:
        over["init"] = str(continuous_dir)
        over["model"] = None
    tr = TokenizerTrainer(_cfg(tmp_path, f"{mode}{inherit}", **over))
    video = tr.batch(1000)                                     # a batch the run never trains on
    before = _fixed_batch_loss(tr, video)
    res = tr.fit()
    assert res.step == 8 and res.model_dir is not None
    assert _fixed_batch_loss(tr, video) < before
    lines = [json.loads(x) for x in (tmp_path / f"{mode}{inherit}" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "val_psnr" in lines[0] and lines[-1]["step"] == 8
    if mode == "bitwise":
        assert {"commitment", "entropy", "bit_entropy", "psnr"} <= set(lines[1])
    reloaded = VideoVAE.from_pretrained(res.model_dir)           # the finished model is a tokenizer folder
    assert torch.equal(reloaded.proj_up.weight, tr.model.proj_up.weight)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, continuous_dir):
    over = {"mode": "bitwise", "init": str(continuous_dir), "model": None,
            "quant": {"drop_prob": 0.5, "sample_posterior": True}}
    full = train(_cfg(tmp_path, "full", **over))
    first = train(_cfg(tmp_path, "split", **over), until=2)
    assert first.step == 2 and first.model_dir is None
    with pytest.raises(ConfigError, match="already holds a run"):
        train(_cfg(tmp_path, "split", **over))
    resumed = train(_cfg(tmp_path, "split", **over), resume="latest")
    assert resumed.step == 4
    a = VideoVAE.from_pretrained(full.model_dir).state_dict()
    b = VideoVAE.from_pretrained(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ("s_per_step", "peak_memory_mb")} for r in recs]
    assert strip(log("full")) == strip(log("split"))


def test_adversarial_term_trains_a_discriminator_and_resumes_exactly(tmp_path):
    over = {"loss": {"adversarial_weight": 0.1, "adversarial_start": 1, "discriminator_channels": 8},
            "checkpoint": {"every": 1}}
    full = train(_cfg(tmp_path, "full", **over))
    train(_cfg(tmp_path, "split", **over), until=2)
    assert (tmp_path / "split" / "checkpoints" / "step_00000002" / "discriminator" / "model.safetensors").is_file()
    resumed = train(_cfg(tmp_path, "split", **over), resume="latest")
    a = VideoVAE.from_pretrained(full.model_dir).state_dict()
    b = VideoVAE.from_pretrained(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)     # the restored discriminator steers the same updates
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in lines}
    assert "g_loss" not in steps[1] and {"g_loss", "d_loss", "d_real", "d_fake"} <= set(steps[2])
    plain = train(_cfg(tmp_path, "plain"))              # the term changes what the decoder learns
    c = VideoVAE.from_pretrained(plain.model_dir).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not (Path(full.model_dir) / "discriminator").exists()   # the exported tokenizer has no discriminator
    with pytest.raises(ConfigError, match="loss.adversarial_weight"):
        _cfg(tmp_path, "x", loss={"adversarial_weight": -1.0})


def test_inheritance_loads_the_continuous_weights(tmp_path, continuous_dir):
    src = VideoVAE.from_pretrained(continuous_dir).state_dict()
    tr = TokenizerTrainer(_cfg(tmp_path, "inh", mode="bitwise", init=str(continuous_dir), model=None))
    got = tr.model.state_dict()
    for k in src:
        if k.startswith(("encoder.", "decoder.", "proj_")):
            assert torch.equal(src[k], got[k]), k
    # only the latent scale moves at step 0 (calibration), to the value with the least quantization error
    assert tr.calibration is not None and got["scale_learnable_parameters"][0] == tr.calibration["scale"]
    # one config may serve both runs when its model section agrees with the init folder; a mismatch is an error
    with pytest.raises(ConfigError, match="different architecture .*block_out_channels"):
        _cfg(tmp_path, "bad", mode="bitwise", init=str(continuous_dir), model={"block_out_channels": [4, 8, 16, 16]})
    scratch = TokenizerTrainer(_cfg(tmp_path, "scr", mode="bitwise"))
    key = "encoder.conv_in.conv.weight"
    assert not torch.equal(scratch.model.state_dict()[key], src[key])


def test_a_new_decoder_of_other_widths_trains_on_the_init_folders_encoder(tmp_path, continuous_dir):
    """model.decoder_block_out_channels with an init folder: everything but the decoder is inherited, the decoder
    starts fresh at the new widths, and the exported folder loads with them."""
    src = VideoVAE.from_pretrained(continuous_dir).state_dict()
    def cfg(steps):
        return _cfg(tmp_path, "dec", mode="bitwise", init=str(continuous_dir),
                    model={"decoder_block_out_channels": [8, 8, 8, 8]}, quant={"calibrate_scale": False},
                    train={"max_steps": steps, "freeze": ["encoder", "proj", "scale"]})
    assert cfg(2).new_decoder()
    first = train(cfg(2))
    res = train(cfg(3), resume="latest")                 # resumes from the new decoder's own checkpoint
    assert first.step == 2 and res.step == 3
    out = VideoVAE.from_pretrained(res.model_dir)
    assert out.config.decoder_channels == (8, 8, 8, 8) and out.config.block_out_channels == (4, 8, 8, 8)
    got = out.state_dict()
    assert got["decoder.conv_out.conv.weight"].shape[1] == 8 != src["decoder.conv_out.conv.weight"].shape[1]
    for k in src:
        if not k.startswith("decoder."):
            assert torch.equal(src[k], got[k]), k          # inherited and frozen
    # the widths follow the encoder's resampler rules (an upsampler 12 -> 4 cannot tile 12 channels to 4 * 4 * 2)
    with pytest.raises(ConfigError, match="decoder_block_out_channels .*DC upsampler 12 -> 4"):
        _cfg(tmp_path, "bad", mode="bitwise", init=str(continuous_dir),
             model={"decoder_block_out_channels": [4, 12, 12, 12]})


def test_calibration_beats_the_unit_scale(continuous_dir):
    vae = VideoVAE.from_pretrained(continuous_dir)
    video = torch.rand(2, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    schedule = PyramidConfig(pn=None, **DEFAULT_PYRAMID).build(5)
    one = calibrate_scale(vae, video, schedule, factors=torch.tensor([1.0]))
    best = calibrate_scale(vae, video, schedule)
    assert best["relative_error"] <= one["relative_error"]


# --- reconstruct command ------------------------------------------------------------------------------------------
def _run_cli(argv):
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_reconstruct_writes_a_video_and_prints_psnr_ssim(tmp_path, continuous_dir, capsys):
    from infinitystar.media import load_video
    from infinitystar.shapes.data import iter_samples
    frames = next(iter(iter_samples(0, ("video",), video_frames=(7,), limit=1)))["frames"]
    src = tmp_path / "in.npy"
    np.save(src, frames)
    out = tmp_path / "out.npy"
    assert _run_cli(["tokenizer", "reconstruct", str(src), str(out), "--model", str(continuous_dir),
                     "--scales", "2"]) == 0
    captured = capsys.readouterr()
    assert "7 frames is not 1 + 4k; using the first 5" in captured.err
    res = json.loads(captured.out)
    assert res["frames"] == 5 and res["scales"] == 2 and len(res["per_frame"]) == 5
    assert 0 < res["psnr"] < PSNR_CAP_DB and -1 <= res["ssim"] <= 1
    rec = load_video(out)
    assert rec.shape == (5, 64, 64, 3)
    assert abs(psnr(frames[:5], rec) - res["psnr"]) < 1e-3
    assert _run_cli(["tokenizer", "reconstruct", str(src), str(tmp_path / "o.mp4"), "--model",
                     str(continuous_dir)]) == 0
    res_auto = json.loads(capsys.readouterr().out)
    assert (tmp_path / "o.mp4").stat().st_size > 0 and res_auto["scales"] == "all"
    assert res["precision"] == res_auto["precision"] == precision_name(resolve_precision("auto", torch.device("cpu")))
    assert _run_cli(["tokenizer", "reconstruct", str(src), str(tmp_path / "o32.npy"), "--model",
                     str(continuous_dir), "--scales", "2", "--precision", "fp32"]) == 0
    res32 = json.loads(capsys.readouterr().out)
    assert res32["precision"] == "fp32" and abs(res32["psnr"] - res["psnr"]) < 0.5   # bf16 or fp32 alike


def test_reconstruct_errors_are_clear(tmp_path, continuous_dir):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(UserError, match="cannot read video"):
        _run_cli(["tokenizer", "reconstruct", str(bad), str(tmp_path / "o.npy"), "--model", str(continuous_dir)])
    with pytest.raises(UserError, match="does not exist"):
        _run_cli(["tokenizer", "reconstruct", str(tmp_path / "nope.mp4"), str(tmp_path / "o.npy"), "--model",
                  str(continuous_dir)])
    np.save(tmp_path / "ok.npy", np.zeros((5, 64, 64, 3), np.uint8))   # the input is read first, then the model
    with pytest.raises(UserError, match="not a tokenizer folder"):
        _run_cli(["tokenizer", "reconstruct", str(tmp_path / "ok.npy"), str(tmp_path / "o.npy"), "--model",
                  str(tmp_path)])
    np.save(tmp_path / "odd.npy", np.zeros((5, 60, 64, 3), np.uint8))
    with pytest.raises(UserError, match="multiples of the tokenizer's spatial stride"):
        _run_cli(["tokenizer", "reconstruct", str(tmp_path / "odd.npy"), str(tmp_path / "o.npy"), "--model",
                  str(continuous_dir)])


def test_train_command_via_parser(tmp_path, capsys):
    assert _run_cli(["tokenizer", "train", "continuous", "--output-dir", str(tmp_path / "cli"), "--steps", "2",
                     "--batch-size", "1", "--set", "model.block_out_channels=[4,8,8,8]", "--set", "data.frames=5",
                     "--set", "data.val_samples=1", "--set", "log.progress=false"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 2 and (tmp_path / "cli" / "model" / "model.safetensors").is_file()
