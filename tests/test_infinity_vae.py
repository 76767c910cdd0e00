"""Infinity BSQ-VAE: fixture parity through the CLI path, strict loading of both key forms, persistence, config."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.parity import main as parity_main
from infinitystar.tokenizer.infinity_vae import (PRESETS, InfinityVAE, InfinityVAEConfig, infer_config,
                                                 norm_groups)


@pytest.fixture(scope="module")
def vae_dir(request):
    from pathlib import Path
    return Path(request.config.rootpath) / "tests" / "fixtures" / "infinity" / "vae"


@pytest.fixture(scope="module")
def plain(vae_dir):
    return load_file(str(vae_dir / "weights.safetensors"))


@pytest.fixture(scope="module")
def wrapped(vae_dir, plain):
    pairs = json.loads((vae_dir / "config.json").read_text())["plain_to_wrapper_key"]
    return {pairs[k]: v for k, v in plain.items()}


def _same_modules(a: InfinityVAE, b: InfinityVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- parity ---------------------------------------------------------------------------------------------------------
def test_parity_cli_path(vae_dir):
    lines = []
    assert parity_main(str(vae_dir), out=lines.append) == 0
    recs = {r["tensor"]: r for r in map(json.loads, lines)}
    assert {"f", "bits", "f_hat", "decoded_raw", "decoded", "decoded_from_f"} <= set(recs)
    for r in recs.values():
        assert r["max_abs_err"] <= r["tol"], r
    assert recs["bits"]["tol"] == 0.0 and recs["bits"]["max_abs_err"] == 0.0


# --- strict loading ---------------------------------------------------------------------------------------------------
def test_plain_and_wrapped_names_load_identical_modules(plain, wrapped):
    assert set(plain) != set(wrapped)
    a = InfinityVAE.from_official(plain, "tiny")
    b = InfinityVAE.from_official(wrapped, "tiny")
    _same_modules(a, b)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.encode(x), b.encode(x))


def test_config_inferred_from_either_key_form(plain, wrapped):
    tiny = InfinityVAEConfig.preset("tiny")
    assert infer_config(plain) == tiny
    assert infer_config(wrapped) == tiny
    _same_modules(InfinityVAE.from_official(wrapped), InfinityVAE.from_official(plain, tiny))


def test_official_pth_with_vae_entry(tmp_path, wrapped, plain):
    p = tmp_path / "infinity_vae_tiny.pth"
    torch.save({"vae": wrapped, "step": torch.tensor(3)}, p)
    _same_modules(InfinityVAE.from_official(p, "tiny"), InfinityVAE.from_official(plain, "tiny"))
    q = tmp_path / "flat.safetensors"
    save_file(plain, str(q))
    _same_modules(InfinityVAE.from_official(q), InfinityVAE.from_official(plain, "tiny"))
    with pytest.raises(CheckpointError, match="no such file"):
        InfinityVAE.from_official(tmp_path / "missing.pth", "tiny")
    r = tmp_path / "other.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, r)
    with pytest.raises(CheckpointError, match="'vae' entry"):
        InfinityVAE.from_official(r, "tiny")


def test_strict_errors_name_the_key(plain):
    extra = dict(plain)
    extra["encoder.down.0.block.0.attn.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys: encoder\.down\.0\.block\.0\.attn\.weight"):
        InfinityVAE.from_official(extra, "tiny")

    missing = dict(plain)
    del missing["decoder.up.3.block.2.conv1.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.up\.3\.block\.2\.conv1\.bias"):
        InfinityVAE.from_official(missing, "tiny")

    bad = dict(plain)
    bad["encoder.conv_out.weight"] = torch.zeros(8, 32, 3, 3)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: encoder\.conv_out\.weight"):
        InfinityVAE.from_official(bad, "tiny")

    dup = dict(plain)
    dup["encoder.conv_in.conv.weight"] = plain["encoder.conv_in.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight.*encoder\.conv_in\.conv\.weight"):
        InfinityVAE.from_official(dup, "tiny")

    mask = dict(plain)
    mask["quantizer.lfq.mask"] = torch.zeros(32, dtype=torch.long)
    with pytest.raises(CheckpointError, match=r"quantizer\.lfq\.mask"):
        InfinityVAE.from_official(mask, "tiny")

    # a d32 release loaded as d16 is caught on the shapes (not silently half-loaded)
    d32 = InfinityVAEConfig(**{**PRESETS["tiny"], "codebook_dim": 32})
    with pytest.raises(CheckpointError, match=r"lfq\.mask has shape \(16,\), expected \(32,\)"):
        InfinityVAE.from_official(plain, d32)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys: .*encoder\.conv_out\.weight"):
        InfinityVAE.from_official({k: v for k, v in plain.items() if "lfq" not in k}, d32)

    # wrapped name on a module that has no wrapper (a stray ".conv." in a name) is not guessed
    odd = dict(plain)
    odd["encoder.mid.conv.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.conv\.weight"):
        InfinityVAE.from_official(odd, "tiny")


def test_quantizer_buffers_are_optional(plain):
    no_buffers = {k: v for k, v in plain.items() if "lfq" not in k}
    _same_modules(InfinityVAE.from_official(no_buffers, "tiny"), InfinityVAE.from_official(plain, "tiny"))


# --- persistence ------------------------------------------------------------------------------------------------------
def test_save_from_pretrained_round_trip(tmp_path, plain):
    a = InfinityVAE.from_official(plain, "tiny")
    a.save_pretrained(tmp_path / "vae")
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert cfg["type"] == "infinity_vae" and cfg["codebook_dim"] == 16
    b = InfinityVAE.from_pretrained(tmp_path / "vae", device="cpu")
    assert b.config == a.config and not b.training
    _same_modules(a, b)
    z = torch.randn(1, 16, 2, 3)
    with torch.no_grad():
        assert torch.equal(a.decode(z), b.decode(z))

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        InfinityVAE.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "type": "video_vae"}))
    with pytest.raises(ValueError, match="video_vae"):
        InfinityVAE.from_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "config.json").write_text(json.dumps({**cfg, "base_ch": 64}))
    with pytest.raises(CheckpointError, match="mis-shaped"):
        InfinityVAE.from_pretrained(tmp_path / "vae")


# --- model behaviour -------------------------------------------------------------------------------------------------
def test_shapes_clamp_and_input_checks(plain):
    vae = InfinityVAE.from_official(plain, "tiny")
    with torch.no_grad():
        f = vae.encode(torch.zeros(2, 3, 32, 48))
        assert f.shape == (2, 16, 2, 3) and f.dtype == torch.float32
        raw = vae.decode(f * 40, clamp=False)
        out = vae.decode(f.unsqueeze(2) * 40)          # (B, d, 1, h, w) from the residual loop
        assert out.shape == (2, 3, 32, 48)
        assert torch.equal(out, raw.clamp(-1, 1)) and raw.abs().max() > 1
    with pytest.raises(ValueError, match="multiple of the VAE stride 16"):
        vae.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        vae.decode(torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="one latent frame"):
        vae.decode(torch.zeros(1, 16, 2, 2, 2))


def test_patchify_channel_order():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    y = InfinityVAE.patchify(x)
    assert y.shape == (1, 8, 2, 2)
    # channel c*4 + dy*2 + dx holds x[c, 2i+dy, 2j+dx]
    assert y[0, 1 * 4 + 1 * 2 + 0, 1, 0] == x[0, 1, 3, 0]
    assert torch.equal(InfinityVAE.unpatchify(y), x)


def test_presets_match_released_parameter_counts():
    # [measured] counts of the official modules: d16 109.97M, d32 110.12M, d64 110.41M, 8B tokenizer 81.62M
    expected = {"d16": 109.97, "d32": 110.12, "d32reg": 110.12, "d64": 110.41, "d56_f8_14_patchify": 81.62}
    for name, millions in expected.items():
        with torch.device("meta"):
            m = InfinityVAE(InfinityVAEConfig.preset(name))
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 2) == millions, name
    d56 = InfinityVAEConfig.preset("infinity_vae_d56_f8_14_patchify.pth")
    assert (d56.codebook_dim, d56.patch_size, d56.bits_per_token, d56.token_stride) == (14, 8, 56, 16)
    assert InfinityVAEConfig.preset("d24").bits_per_token == 24


def test_config_validation():
    with pytest.raises(ValueError, match="must list 5 positive multipliers"):
        InfinityVAEConfig(encoder_ch_mult=(1, 2, 4, 4))
    with pytest.raises(ValueError, match="power of two"):
        InfinityVAEConfig(patch_size=12)
    with pytest.raises(ValueError, match="codebook_dim"):
        InfinityVAEConfig(codebook_dim=0)
    with pytest.raises(ValueError, match="GroupNorm"):
        InfinityVAEConfig(base_ch=20)
    with pytest.raises(ValueError, match="unknown field"):
        InfinityVAEConfig.from_dict({"codebook_dim": 16, "attention": True})
    with pytest.raises(ValueError, match="unknown Infinity VAE preset"):
        InfinityVAEConfig.preset("d48")
    assert (norm_groups(64), norm_groups(48)) == (32, 24)
    c = InfinityVAEConfig(base_ch=48, encoder_ch_mult=(1, 2, 1, 1, 1), decoder_ch_mult=(1, 1, 1, 1, 1),
                          codebook_dim=8)
    assert InfinityVAEConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    m = InfinityVAE(c)
    assert m.encoder.norm_out.num_groups == 24
    with torch.no_grad():
        assert m.decode(m.encode(torch.zeros(1, 3, 16, 16))).shape == (1, 3, 16, 16)
