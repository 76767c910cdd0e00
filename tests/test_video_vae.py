"""InfinityStar video tokenizer: fixture parity, strict official loading, chunking, input checks, persistence."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.parity import FixtureError, main as parity_main, run_checks
from infinitystar.tokenizer.video_vae import (VideoVAE, VideoVAEConfig, decode_chunks, encode_chunks,
                                              infer_config, quantizer_buffer_shapes)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "infinitystar" / "vae"
BUFFERS = ("quantizer.lfq_semantic.mask", "quantizer.lfq_detail.mask", "quantize.lfq_semantic.mask",
           "quantize.lfq_detail.mask")


@pytest.fixture(scope="module")
def official_sd():
    return load_file(str(FIXTURE / "weights.safetensors"))


@pytest.fixture(scope="module")
def model(official_sd):
    return VideoVAE.from_official(official_sd, VideoVAEConfig.tiny())


def _without_buffers(sd):
    return {k: v for k, v in sd.items() if k not in BUFFERS}


# --- parity -------------------------------------------------------------------------------------------------------
def test_parity_records_within_tolerance():
    records = list(run_checks(FIXTURE))
    names = {r.tensor for r in records}
    assert {"enc_h", "posterior_mean", "posterior_logvar", "z_sample", "z", "recon", "recon_extra"} <= names
    bad = [r.to_json() for r in records if not r.ok]
    assert not bad, bad
    # well inside the 1e-4 tolerance: any structural slip shows up orders of magnitude above this
    assert max(r.max_abs_err for r in records) < 1e-5


def test_parity_cli_exit_code():
    lines = []
    assert parity_main(str(FIXTURE), out=lines.append) == 0
    assert all("error" not in json.loads(line) for line in lines)


def test_parity_missing_io_tensor_is_named(tmp_path):
    for name in ("config.json", "weights.safetensors", "README.md"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    io = load_file(str(FIXTURE / "io.safetensors"))
    save_file({k: v for k, v in io.items() if k not in ("eps", "recon_extra")}, str(tmp_path / "io.safetensors"))
    with pytest.raises(FixtureError, match="eps, recon_extra"):
        list(run_checks(tmp_path))


def test_parity_missing_weights_is_named(tmp_path):
    for name in ("config.json", "io.safetensors"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    with pytest.raises(FixtureError, match="weights.safetensors"):
        list(run_checks(tmp_path))


def test_state_dict_matches_fixture_listing():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    m = VideoVAE(VideoVAEConfig.from_official_args(cfg["constructor_args"]))
    ref = [k for k in cfg["state_dict_keys_in_order"] if k not in BUFFERS]
    assert list(m.state_dict()) == ref
    shapes = cfg["state_dict_shapes_dtypes"]
    assert all(list(v.shape) == shapes[k][0] for k, v in m.state_dict().items())
    assert sum(p.numel() for p in m.parameters()) == cfg["n_params"]


def test_official_preset_size():
    with torch.device("meta"):
        m = VideoVAE(VideoVAEConfig.official())
    assert sum(p.numel() for p in m.parameters()) == 184_659_383  # spec 8.2: 184.66 M
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["decoder.up_blocks.1.upsamplers.0.conv.conv.conv.weight"] == (1536, 384, 3, 3, 3)
    assert shapes["decoder.up_blocks.3.upsamplers.0.conv.conv.conv.weight"] == (768, 192, 3, 3, 3)
    assert shapes["encoder.down_blocks.0.downsamplers.0.conv.conv.conv.weight"] == (48, 96, 3, 3, 3)
    # the config is readable from the official names alone (without allocating the weights)
    assert infer_config(m.state_dict()) == VideoVAEConfig.official()


# --- strict loading -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("buffers", [True, False], ids=["with-quantizer-buffers", "without"])
def test_loads_with_or_without_buffers(official_sd, model, buffers, tmp_path):
    sd = official_sd if buffers else _without_buffers(official_sd)
    for src in (sd, _save_pth(tmp_path / "a.pth", {"vae": sd}), _save_pth(tmp_path / "flat.pth", sd)):
        m = VideoVAE.from_official(src)  # config inferred from the tensors
        assert m.config == VideoVAEConfig.tiny()
        for k, v in m.state_dict().items():
            assert torch.equal(v, model.state_dict()[k]), k


def _save_pth(path, obj):
    torch.save(obj, str(path))
    return path


@pytest.mark.parametrize("buffers", [True, False], ids=["with-quantizer-buffers", "without"])
@pytest.mark.parametrize("fault", ["missing", "unexpected", "misshaped"])
def test_strict_errors_name_the_key(official_sd, tmp_path, buffers, fault):
    sd = dict(official_sd if buffers else _without_buffers(official_sd))
    key = "decoder.up_blocks.2.resnets.1.norm2.conv_b.conv.bias"
    if fault == "missing":
        del sd[key]
        pattern = f"missing keys: {key}"
    elif fault == "unexpected":
        key = "decoder.up_blocks.2.resnets.1.norm3.gamma"
        sd[key] = torch.zeros(8, 1, 1, 1)
        pattern = f"unexpected keys: {key}"
    else:
        sd[key] = torch.zeros(9)
        pattern = f"mis-shaped keys: {key}"
    path = tmp_path / "vae.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=pattern):
        VideoVAE.from_official(path, VideoVAEConfig.tiny())
    with pytest.raises(CheckpointError, match=pattern):
        VideoVAE.from_official(_save_pth(tmp_path / "vae.pth", {"vae": sd}), VideoVAEConfig.tiny())


def test_misshaped_quantizer_buffer_is_named(official_sd):
    sd = dict(official_sd)
    sd["quantize.lfq_detail.mask"] = torch.zeros(32, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"quantize\.lfq_detail\.mask"):
        VideoVAE.from_official(sd, VideoVAEConfig.tiny())


def test_wrong_config_is_a_checkpoint_error(official_sd):
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        VideoVAE.from_official(_without_buffers(official_sd), VideoVAEConfig(block_out_channels=(8, 8, 8, 8, 8)))


def test_unreadable_file(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        VideoVAE.from_official(tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        VideoVAE.from_official(tmp_path / "missing.pth")


# --- chunking -----------------------------------------------------------------------------------------------------
def test_chunk_plans():
    assert encode_chunks(17) == [9, 8]
    assert encode_chunks(81) == [9] + [8] * 9
    assert encode_chunks(1) == [1] and encode_chunks(5) == [5] and encode_chunks(13) == [13]
    assert encode_chunks(21) == [13, 8]
    assert decode_chunks(1) == [1] and decode_chunks(2) == [2] and decode_chunks(4) == [4]
    assert decode_chunks(5) == [3, 2]
    assert decode_chunks(8) == [4, 2, 2]
    assert decode_chunks(21) == [3] + [2] * 9
    assert decode_chunks(21, 1) == [2] + [1] * 19 and decode_chunks(2, 1) == [2] and decode_chunks(3, 1) == [2, 1]
    assert decode_chunks(21, 4) == [5] + [4] * 4 and decode_chunks(8, 3) == [5, 3] and decode_chunks(9, 3) == [6, 3]
    with pytest.raises(ValueError, match="at least one latent frame"):
        decode_chunks(5, 0)


@pytest.mark.parametrize("t_lat", [1, 2, 3, 4, 5, 6, 7])
def test_chunked_decode_equals_one_pass(model, t_lat):
    """Every chunk size (the official 2, and 1, 3, 4: odd later chunks too) gives the one-pass frames."""
    z = torch.randn(1, 64, t_lat, 1, 2, generator=torch.Generator().manual_seed(t_lat))
    with torch.no_grad():
        b = model.decode(z, chunked=False)
        for chunk in (2, 1, 3, 4):
            a = model.decode(z, chunk=chunk)
            assert a.shape == (1, 3, 1 + 4 * (t_lat - 1), 16, 32)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_decode_is_causal(model):
    # the first frames of a clip depend only on its first latent frames, for even and odd prefixes
    z = torch.randn(1, 64, 6, 1, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model.decode(z)
        for n in (1, 2, 3, 4):
            part = model.decode(z[:, :, :n])
            torch.testing.assert_close(part, full[:, :, :part.shape[2]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("frames", [1, 5, 21, 25])
def test_chunked_encode_equals_one_pass(model, frames):
    video = torch.rand(1, 3, frames, 16, 16, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    with torch.no_grad():
        a, b = model.encode_posterior(video), model.encode_posterior(video, chunked=False)
    assert a.mean.shape == (1, 64, 1 + (frames - 1) // 4, 1, 1)
    torch.testing.assert_close(a.enc_h, b.enc_h, rtol=0, atol=1e-5)


def test_bf16_encode_and_decode_stay_close_and_return_float32(model):
    """precision=bf16 runs the convolutions under autocast (the oneDNN conv path too); the latent and the video
    come back in float32, close to the fp32 results; the default stays exactly the fp32 path."""
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.randn(1, 64, 3, 1, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z32, z16 = model.encode(video), model.encode(video, precision=torch.bfloat16)
        v32, v16 = model.decode(z), model.decode(z, precision=torch.bfloat16)
        assert torch.equal(model.decode(z, precision=torch.float32), v32)
    assert z16.dtype == v16.dtype == torch.float32
    assert 0 < (z16 - z32).abs().max() <= 0.05 * z32.abs().max()
    assert 0 < (v16 - v32).abs().max() <= 0.05 * v32.abs().max()


# --- encode API and input checks ----------------------------------------------------------------------------------
def test_encode_mean_by_default_and_explicit_sampling(model):
    video = torch.rand(1, 3, 5, 16, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        post = model.encode_posterior(video)
        z = model.encode(video)
        torch.testing.assert_close(z, model.project_down(post.mean))
        noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(1))
        zs = model.encode(video, sample=True, noise=noise)
        torch.testing.assert_close(zs, model.project_down(post.mean + post.std * noise))
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(model.encode(video, sample=True, generator=g1), model.encode(video, sample=True, generator=g2))
        assert not torch.equal(zs, z)
    assert z.shape == (1, 64, 2, 1, 2)
    assert post.enc_h.shape == (1, 32, 2, 2, 4)
    with pytest.raises(ValueError, match="sample=True"):
        model.encode(video, noise=noise)


@pytest.mark.parametrize("frames,keep", [(18, 17), (4, 1), (7, 5)])
def test_bad_frame_count_says_how_to_fix(model, frames, keep):
    with pytest.raises(ValueError, match=rf"1 \+ 4k frames.*trim.*{keep} frames? \(video\[:, :, :{keep}\]\)"):
        model.encode(torch.zeros(1, 3, frames, 16, 16))


def test_bad_shapes(model):
    with pytest.raises(ValueError, match="4 channels"):
        model.encode(torch.zeros(1, 4, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of the tokenizer's spatial stride 16"):
        model.encode(torch.zeros(1, 3, 1, 24, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, T, H, W\)"):
        model.encode(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="32 channels"):
        model.decode(torch.zeros(1, 32, 1, 1, 1))


def test_input_dtype_follows_caller(model):
    video = torch.zeros(1, 3, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        z = model.encode(video)
        assert z.dtype == torch.float64
        assert model.decode(z).dtype == torch.float64


# --- config -------------------------------------------------------------------------------------------------------
def test_small_preset_fewer_stages():
    cfg = VideoVAEConfig.small()
    assert (cfg.spatial_stride, cfg.temporal_stride, cfg.codebook_dim) == (8, 4, 64)
    torch.manual_seed(0)
    m = VideoVAE(cfg).eval()
    with torch.no_grad():
        z = m.encode(torch.zeros(1, 3, 9, 64, 64))
        assert z.shape == (1, 64, 3, 8, 8)
        assert m.decode(z).shape == (1, 3, 9, 64, 64)
    one = VideoVAEConfig(block_out_channels=(4, 8, 8), spatial_compression_list=(2,), temporal_compression_list=())
    assert (one.spatial_stride, one.temporal_stride) == (4, 1)
    with torch.no_grad():
        m1 = VideoVAE(one).eval()
        z = m1.encode(torch.zeros(1, 3, 6, 8, 8))  # no temporal compression: any frame count
        assert z.shape == (1, 64, 6, 2, 2)
        assert m1.decode(z).shape == (1, 3, 6, 8, 8)
        torch.testing.assert_close(m1.decode(z), m1.decode(z, chunked=False), rtol=0, atol=1e-5)


def test_pixel_repeat_is_the_same_tokenizer_on_enlarged_frames():
    """pixel_repeat k: encoding a frame equals encoding its k-times pixel copy with k = 1, and decoding returns
    the k = 1 decoder's output averaged over k x k blocks, in one pass, in chunks and streamed."""
    base = VideoVAEConfig(block_out_channels=(4, 8, 8), spatial_compression_list=(2,), temporal_compression_list=(2,))
    rep = VideoVAEConfig.from_dict({**base.to_dict(), "pixel_repeat": 2})
    assert (base.spatial_stride, rep.spatial_stride) == (4, 2)
    torch.manual_seed(0)
    m1 = VideoVAE(base).eval()
    m2 = VideoVAE(rep).eval()
    m2.load_state_dict(m1.state_dict())
    video = torch.rand(1, 3, 5, 8, 12) * 2 - 1
    big = video.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
    with torch.no_grad():
        z = m2.encode(video)
        assert z.shape == (1, 64, 3, 4, 6)
        torch.testing.assert_close(z, m1.encode(big), rtol=0, atol=0)
        want = torch.nn.functional.avg_pool3d(m1.decode(z), (1, 2, 2))
        for out in (m2.decode(z), m2.decode(z, chunked=False), m2.decode_stream().decode(z)):
            assert out.shape == (1, 3, 5, 8, 12)
            torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of the tokenizer's spatial stride 2"):
        m2.encode(torch.zeros(1, 3, 5, 8, 7))
    with pytest.raises(ValueError, match="pixel_repeat must divide the tokenizer's stride 4, got 3"):
        VideoVAEConfig.from_dict({**base.to_dict(), "pixel_repeat": 3})


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(spatial_compression_list=(2, 4)), "every entry must be 2"),
    (dict(temporal_compression_list=(2, 2, 2, 2)), "temporal stages but only 3"),
    (dict(block_out_channels=(96, 192, 384, 384, 512)), "must be equal"),
    (dict(block_out_channels=(96, 190, 384, 384, 384)), "divisible by 4"),
    (dict(codebook_dim=32), "4 \\* latent_channels"),
    (dict(block_out_channels=(96,)), "at least two"),
    (dict(layers_per_block=0), "layers_per_block must be a positive integer"),
    (dict(block_out_channels=(8, 8), spatial_compression_list=(2, 2)), "need at least 2 blocks"),
])
def test_config_validation(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        VideoVAEConfig(**kwargs)


def test_official_args_mapping():
    args = json.loads((FIXTURE / "config.json").read_text())["constructor_args"]
    assert VideoVAEConfig.from_official_args(args) == VideoVAEConfig.tiny()
    with pytest.raises(ValueError, match="norm_type='group'"):
        VideoVAEConfig.from_official_args({**args, "norm_type": "group"})
    assert VideoVAEConfig.preset("official") == VideoVAEConfig.official()
    with pytest.raises(ValueError, match="unknown video VAE preset"):
        VideoVAEConfig.preset("huge")
    assert set(quantizer_buffer_shapes(VideoVAEConfig.tiny())) == set(BUFFERS)


# --- persistence --------------------------------------------------------------------------------------------------
def test_save_from_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["type"] == "video_vae"
    again = VideoVAE.from_pretrained(tmp_path / "tok")
    assert again.config == model.config
    sa, sb = model.state_dict(), again.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    z = torch.randn(1, 64, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.decode(z), again.decode(z))
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    (tmp_path / "tok" / "config.json").write_text(json.dumps({**cfg, "type": "infinity_vae"}))
    with pytest.raises(ValueError, match="infinity_vae"):
        VideoVAE.from_pretrained(tmp_path / "tok")
