"""Parity checkers for the Infinity (image) fixture family.

`check_vae` builds the BSQ-VAE from the folder's config, loads the plain-named weights through the loader users
run (`InfinityVAE.from_official`), and compares:
  f              our encoder on the reference image
  bits, f_hat    the shared residual loop (`infinitystar.quant.residual.encode_targets`) on our f, with the
                 fixture's scale schedule: area-downsampled residual (identity at full size), sign bits,
                 bilinear (trilinear with t=1) upsampling of the codes
  f_hat_from_bits  `decode_bits` on the reference bits (the weight-free bits -> summed codes path)
  decoded_raw, decoded, decoded_from_f   our decoder on the reference f_hat / f (the decoder apart from the
                 quantizer), without and with the [-1, 1] clamp
"""
from __future__ import annotations

from typing import Iterator

import torch

from infinitystar.parity import Fixture, FixtureError, Record, compare
from infinitystar.quant.residual import decode_bits, encode_targets
from infinitystar.schedules.pyramid import Schedule
from infinitystar.tokenizer.infinity_vae import InfinityVAE, InfinityVAEConfig, norm_groups


def _vae_config(fx: Fixture) -> InfinityVAEConfig:
    c = fx.config
    if c.get("cnn_attention", "no") != "no":
        raise FixtureError(f"{fx.path}: cnn_attention={c['cnn_attention']!r} is not supported (released: 'no')")
    if c.get("norm_type", "group") != "group":
        raise FixtureError(f"{fx.path}: norm_type={c['norm_type']!r} is not supported (released: 'group')")
    if c.get("use_vae", False):
        raise FixtureError(f"{fx.path}: use_vae=true (a Gaussian posterior) is not supported")
    num_res_blocks = int(fx.need("num_res_blocks"))
    if "decoder_blocks_per_level" in c and int(c["decoder_blocks_per_level"]) != num_res_blocks + 1:
        raise FixtureError(f"{fx.path}: decoder_blocks_per_level {c['decoder_blocks_per_level']} is not "
                           f"num_res_blocks + 1")
    try:
        cfg = InfinityVAEConfig(codebook_dim=int(fx.need("codebook_dim")), patch_size=int(fx.need("patch_size")),
                                base_ch=int(fx.need("base_ch")), encoder_ch_mult=fx.need("encoder_ch_mult"),
                                decoder_ch_mult=fx.need("decoder_ch_mult"), num_res_blocks=num_res_blocks,
                                norm_eps=float(c.get("norm_eps", 1e-6)))
    except ValueError as e:
        raise FixtureError(f"{fx.path}: config describes no valid Infinity VAE ({e})") from None
    for width, groups in c.get("group_norm_groups", {}).items():
        if norm_groups(int(width)) != int(groups):
            raise FixtureError(f"{fx.path}: GroupNorm of width {width} uses {groups} groups, ours "
                               f"{norm_groups(int(width))}")
    return cfg


def _image_schedule(fx: Fixture, d: int) -> Schedule:
    scales = fx.need("scale_schedule")
    if any(len(s) != 3 or int(s[0]) != 1 for s in scales):
        raise FixtureError(f"{fx.path}: scale_schedule must list (1, h, w) triples, got {scales}")
    spatial = [(int(s[1]), int(s[2])) for s in scales]
    ones = [1] * len(spatial)
    # one image (one latent frame), every scale once, every scale with d bits per token
    return Schedule(spatial, 1, 1, ones, ones, detail_min_tokens=0, semantic_bits=d, detail_bits=d)


def check_vae(fx: Fixture) -> Iterator[Record]:
    cfg = _vae_config(fx)
    vae = InfinityVAE.from_official(fx.path / "weights.safetensors", cfg, device="cpu")
    io = "io.safetensors"
    image = fx.tensor(io, "image")
    outputs = fx.need("outputs", fx.need("tensors"))
    tol = {k: float(v) for k, v in outputs.items()}

    f = vae.encode(image)
    yield compare("f", f, fx.tensor(io, "f"), tol.get("f"), "encoder on the reference image")

    schedule = _image_schedule(fx, cfg.codebook_dim)
    if tuple(f.shape[-2:]) != schedule.full_hw:
        raise FixtureError(f"{fx.path}: scale_schedule ends at {schedule.full_hw}, the latent is "
                           f"{tuple(f.shape[-2:])}")
    targets = encode_targets(f.unsqueeze(2), schedule, up_mode="trilinear")
    B = f.shape[0]
    bits = torch.cat([b.reshape(B, -1, b.shape[-1]) for b in targets.bits], dim=1)
    ref_bits = fx.tensor(io, "bits")
    yield compare("bits", bits, ref_bits, tol.get("bits"), "shared residual loop on our f")
    yield compare("f_hat", targets.codes[:, :, 0], fx.tensor(io, "f_hat"), tol.get("f_hat"),
                  "shared residual loop on our f")
    per_scale, start = [], 0
    for s in schedule.scales:
        per_scale.append(ref_bits[:, start:start + s.h * s.w].reshape(B, 1, s.h, s.w, -1))
        start += s.h * s.w
    f_hat_from_bits = decode_bits(per_scale, schedule, cfg.codebook_dim, up_mode="trilinear")
    yield compare("f_hat_from_bits", f_hat_from_bits[:, :, 0], fx.tensor(io, "f_hat"), tol.get("f_hat"),
                  "decode_bits on the reference bits")

    f_hat_ref = fx.tensor(io, "f_hat")
    yield compare("decoded_raw", vae.decode(f_hat_ref, clamp=False), fx.tensor(io, "decoded_raw"),
                  tol.get("decoded_raw"), "decoder on the reference f_hat, no clamp")
    yield compare("decoded", vae.decode(f_hat_ref), fx.tensor(io, "decoded"), tol.get("decoded"),
                  "decoder on the reference f_hat, clamped")
    yield compare("decoded_from_f", vae.decode(fx.tensor(io, "f")), fx.tensor(io, "decoded_from_f"),
                  tol.get("decoded_from_f"), "decoder on the reference f, clamped")
