"""Parity checker for the InfinityStar video tokenizer fixture (`infinitystar/vae`).

Builds `VideoVAE` from the fixture's official constructor arguments (any widths), loads `weights.safetensors`
through the loader users run (`VideoVAE.from_official`, which drops the duplicated quantizer buffers), and
compares, each through the public API:
  enc_h, posterior_mean, posterior_logvar   `encode_posterior(video)`
  z_sample                                  `posterior.sample(noise=eps)` with the stored eps
  z                                         `encode(video, sample=True, noise=eps)`
  recon, recon_extra                        `decode` of the reference z / z_extra (so errors do not compound)
plus the state-dict key order and the encoder/decoder chunk plans when the config records them (exact).
"""
from __future__ import annotations

from typing import Iterator

import torch

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.parity import Fixture, FixtureError, Record, compare
from infinitystar.tokenizer.video_vae import (VideoVAE, VideoVAEConfig, decode_chunks, encode_chunks,
                                              quantizer_buffer_shapes)

IO_TENSORS = ("video", "enc_h", "posterior_mean", "posterior_logvar", "eps", "z_sample", "z", "recon", "z_extra",
              "recon_extra")


def _load(fx: Fixture) -> VideoVAE:
    try:
        cfg = VideoVAEConfig.from_official_args(fx.need("constructor_args"))
    except (ValueError, TypeError) as e:
        raise FixtureError(f"{fx.path}: constructor_args describe no supported video VAE ({e})") from None
    weights = fx.path / "weights.safetensors"
    if not weights.is_file():
        raise FixtureError(f"{fx.path}: missing file weights.safetensors")
    try:
        return VideoVAE.from_official(weights, cfg)
    except CheckpointError as e:
        raise FixtureError(f"{fx.path}: weights do not load into our module tree ({e})") from None


def _chunk_record(name: str, ours: list, ref) -> Record:
    ours_t, ref_t = torch.tensor(ours, dtype=torch.int64), torch.tensor(ref, dtype=torch.int64)
    return compare(name, ours_t, ref_t, note=f"ours {ours}, reference {ref}")


def check_vae(fx: Fixture) -> Iterator[Record]:
    tensors = fx.tensors("io.safetensors")
    missing = [k for k in IO_TENSORS if k not in tensors]
    if missing:
        raise FixtureError(f"{fx.path / 'io.safetensors'}: missing tensors {', '.join(missing)}")
    t = {k: tensors[k].float() for k in IO_TENSORS}
    model = _load(fx).float()

    ref_keys = fx.config.get("state_dict_keys_in_order")
    if ref_keys is not None:
        buffers = set(quantizer_buffer_shapes(model.config))
        ref_keys = [k for k in ref_keys if k not in buffers]
        ours = list(model.state_dict())
        diff = sum(a != b for a, b in zip(ours, ref_keys)) + abs(len(ours) - len(ref_keys))
        yield Record("state_dict_keys", float(diff), 0.0, f"{len(ours)} keys in the official order"
                     if not diff else f"{diff} positions differ from the official order")

    post = model.encode_posterior(t["video"])
    yield compare("enc_h", post.enc_h, t["enc_h"])
    yield compare("posterior_mean", post.mean, t["posterior_mean"])
    yield compare("posterior_logvar", post.logvar, t["posterior_logvar"])
    yield compare("z_sample", post.sample(noise=t["eps"]), t["z_sample"], note="stored eps")
    yield compare("z", model.encode(t["video"], sample=True, noise=t["eps"]), t["z"], note="stored eps")
    yield compare("recon", model.decode(t["z"]), t["recon"], note="decode of the reference z")
    yield compare("recon_extra", model.decode(t["z_extra"]), t["recon_extra"],
                  note=f"{t['z_extra'].shape[2]} latent frames")

    cfg = fx.config
    if "encode_chunks_input_frames" in cfg:
        yield _chunk_record("encode_chunks", encode_chunks(t["video"].shape[2]), cfg["encode_chunks_input_frames"])
    for key, name, z in (("decode_chunks_main_latent_frames_and_split_first", "decode_chunks", t["z"]),
                         ("decode_chunks_extra_latent_frames_and_split_first", "decode_chunks_extra", t["z_extra"])):
        if key in cfg:
            # the official decoder tells the lone first frame by an odd count: an even first chunk is flagged
            ours = [[n, int(i == 0 and n % 2 == 0)] for i, n in enumerate(decode_chunks(z.shape[2]))]
            yield _chunk_record(name, ours, [[int(n), int(s)] for n, s in cfg[key]])
