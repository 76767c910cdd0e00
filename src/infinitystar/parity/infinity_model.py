"""Parity checkers for the Infinity transformer fixtures: `infinity/bsq`, `infinity/transformer`, `infinity/sampling`.

Each builds everything from the folder's config.json and runs the code users run:
  bsq          `teacher_forcing` (the shared residual loop) without flips and with the recorded flip masks,
               and `replay_bits` (the sampler's bits -> inputs/codes path) on the no-flip bits
  transformer  `load_official_infinity` on weights.safetensors, then `encode_text` (pooled text, cross-attention
               memory, shared adaLN), the first block, the teacher-forced forward and the trainer loss
  sampling     `generate_infinity` (KV cache, CFG on logits, per-scale tau, per-bit top-p) with the folder's
               kwargs; the model comes from the folder named by the config ("../transformer")
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from infinitystar.convert.infinity_official import load_official_infinity
from infinitystar.model.attention import AttentionContext
from infinitystar.model.infinity import InfinityConfig, InfinityTransformer, block_causal_mask
from infinitystar.parity import Fixture, FixtureError, Record, compare
from infinitystar.sampling.guidance import Guidance
from infinitystar.sampling.infinity_generate import generate_infinity
from infinitystar.schedules.infinity_resolution import rope_anchor, template_anchor
from infinitystar.train.infinity_targets import (forward_loss, recorded_flips, reduce_loss, replay_bits,
                                                 teacher_forcing, token_weights)


def _tols(fx: Fixture) -> dict[str, float]:
    return {k: float(v) for k, v in fx.need("outputs", fx.need("tensors")).items()}


def _scales(fx: Fixture, c: dict | None = None) -> list[tuple[int, int]]:
    c = fx.config if c is None else c
    sched = fx.need("scale_schedule", c)
    if any(len(s) != 3 or int(s[0]) != 1 for s in sched):
        raise FixtureError(f"{fx.path}: scale_schedule must list (1, h, w) triples, got {sched}")
    scales = [(int(s[1]), int(s[2])) for s in sched]
    if "scale_token_offsets" in fx.config:
        offsets = [0]
        for h, w in scales:
            offsets.append(offsets[-1] + h * w)
        if offsets != list(fx.config["scale_token_offsets"]):
            raise FixtureError(f"{fx.path}: scale_token_offsets {fx.config['scale_token_offsets']} do not match "
                               f"the schedule ({offsets})")
    return scales


def _anchor(fx: Fixture, scales, fallback: Fixture | None = None) -> tuple[int, int]:
    """The RoPE anchor the reference used: the 1M grid of the fixture's template, else of the template the
    schedule is a prefix of (a schedule too short to tell takes the fallback folder's template)."""
    for f in (fx, fallback):
        if f is not None and "h_div_w_template" in f.config:
            return template_anchor(float(f.config["h_div_w_template"]))
        if f is fx:
            try:
                return rope_anchor(scales)
            except ValueError:
                continue
    raise FixtureError(f"{fx.path}: the schedule does not determine the RoPE anchor; add h_div_w_template")


# ---------------------------------------------------------------------------------------------------------------
def check_bsq(fx: Fixture) -> Iterator[Record]:
    io, tol = "io.safetensors", _tols(fx)
    d = int(fx.need("codebook_dim"))
    scales = _scales(fx)
    f = fx.tensor(io, "f")
    runs = {"noflip": "", "flip": "flip_"}
    for run, prefix in runs.items():
        rc = fx.need(run)
        patchify = bool(int(rc.get("apply_spatial_patchify", 0)))
        bits_per_token = 4 * d if patchify else d
        if f.dim() != 4 or f.shape[1] != d:
            raise FixtureError(f"{fx.path}: f must be (B, {d}, H, W), got {tuple(f.shape)}")
        flip = None
        if run == "flip" and int(rc.get("noise_apply_requant", 1)):
            mask = fx.tensor(io, "flip_mask")
            if mask.shape[-1] != bits_per_token:
                raise FixtureError(f"{fx.path}: flip_mask has {mask.shape[-1]} bits per token, expected {bits_per_token}")
            flip = recorded_flips(mask, scales, patchify, int(rc.get("noise_apply_layers", len(scales))))
        t = teacher_forcing(f, scales, flip, spatial_patchify=patchify)
        yield compare(f"{prefix}bits", t.bits, fx.tensor(io, f"{prefix}bits"), tol.get(f"{prefix}bits"))
        yield compare(f"{prefix}x_BLC_wo_prefix", t.inputs, fx.tensor(io, f"{prefix}x_BLC_wo_prefix"),
                      tol.get(f"{prefix}x_BLC_wo_prefix"))
        yield compare(f"{prefix}f_hat", t.codes, fx.tensor(io, f"{prefix}f_hat"), tol.get(f"{prefix}f_hat"))
        if run == "noflip":
            # the sampler's path (bits -> inputs and summed codes) on the same bits
            r = replay_bits(fx.tensor(io, "bits"), scales, patchify)
            yield compare("replay/x_BLC_wo_prefix", r.inputs, fx.tensor(io, "x_BLC_wo_prefix"),
                          tol.get("x_BLC_wo_prefix"), "replay_bits on the reference bits")
            yield compare("replay/f_hat", r.codes, fx.tensor(io, "f_hat"), tol.get("f_hat"),
                          "replay_bits on the reference bits")


# ---------------------------------------------------------------------------------------------------------------
_REQUIRED_FLAGS = {
    "shared_aln": True, "rope2d_each_sa_layer": 1, "rope2d_normalized_by_hw": 2,
    "add_lvl_embeding_only_first_block": 1, "use_bit_label": 1, "cos_attn": True, "head_aln": True,
    "rms_norm": False, "nm0": False, "swiglu": False, "head_depth": 1,
}


def _model_config(fx: Fixture, c: dict) -> InfinityConfig:
    kw = fx.need("constructor_kwargs", c)
    for k, v in _REQUIRED_FLAGS.items():
        if k in kw and kw[k] != v and not (isinstance(v, bool) and bool(kw[k]) == v):
            raise FixtureError(f"{fx.path}: {k}={kw[k]!r} is not supported (only {v!r}, the released setting)")
    if float(kw.get("cross_attn_layer_scale", -1.0)) >= 0:
        raise FixtureError(f"{fx.path}: a learnable cross-attention layer scale is not supported (released: -1)")
    try:
        return InfinityConfig(
            depth=int(kw["depth"]), width=int(kw["embed_dim"]), num_heads=int(kw["num_heads"]),
            latent_channels=int(fx.need("codebook_dim", c)),
            spatial_patchify=bool(int(kw.get("apply_spatial_patchify", 0))),
            text_channels=int(kw["text_channels"]), text_maxlen=int(kw["text_maxlen"]),
            mlp_ratio=float(kw.get("mlp_ratio", 4.0)), norm_eps=float(kw.get("norm_eps", 1e-6)),
            drop_path_rate=float(kw.get("drop_path_rate", 0.0)), cond_drop_rate=float(kw.get("cond_drop_rate", 0.0)))
    except KeyError as e:
        raise FixtureError(f"{fx.path}: constructor_kwargs has no '{e.args[0]}'") from None
    except ValueError as e:
        raise FixtureError(f"{fx.path}: constructor_kwargs describe no valid Infinity model ({e})") from None


def _load_model(fx: Fixture, c: dict, weights: Path) -> InfinityTransformer:
    config = _model_config(fx, c)
    for key, ours in (("ffn_hidden", config.ffn_hidden), ("head_dim", config.head_dim), ("V", 2 * config.bits),
                      ("pooler_heads", config.pooler_heads)):
        if key in c and int(c[key]) != ours:
            raise FixtureError(f"{fx.path}: {key} {c[key]} differs from ours ({ours}) for these constructor kwargs")
    if not weights.is_file():
        raise FixtureError(f"{fx.path}: missing file {weights.name}")
    model = load_official_infinity(weights, config).eval()
    if "n_params" in c and sum(p.numel() for p in model.parameters()) != int(c["n_params"]):
        raise FixtureError(f"{fx.path}: the model has {sum(p.numel() for p in model.parameters())} parameters, "
                           f"the reference {c['n_params']}")
    return model


def _varlen(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Padded (B, Lt, C) -> the reference's varlen rows (sum lens, C)."""
    return x[mask]


def check_transformer(fx: Fixture) -> Iterator[Record]:
    io, c, tol = "io.safetensors", fx.config, _tols(fx)
    model = _load_model(fx, c, fx.path / "weights.safetensors")
    scales = _scales(fx)
    anchor = _anchor(fx, scales)
    text, mask = fx.tensor(io, "text_emb"), fx.tensor(io, "text_mask").bool()
    x, gt = fx.tensor(io, "x_BLC_wo_prefix"), fx.tensor(io, "gt_bits")
    if "kv_compact" in fx.tensors(io):
        yield compare("text_layout/kv_compact", _varlen(text, mask), fx.tensor(io, "kv_compact"), 0.0,
                      "informational: the padded text's real rows are the reference's varlen rows")

    tc = model.encode_text(text, mask)
    yield compare("cond_BD", tc.cond, fx.tensor(io, "cond_BD"), tol.get("cond_BD"))
    yield compare("ca_kv_compact", _varlen(tc.memory, mask), fx.tensor(io, "ca_kv_compact"), tol.get("ca_kv_compact"))
    yield compare("shared_ada_lin_out", tc.ada, fx.tensor(io, "shared_ada_lin_out"), tol.get("shared_ada_lin_out"))

    h = model.embed(tc, x, scales)
    cos, sin = model.rope_cos_sin(scales, anchor)
    h0 = model.blocks[0](h, tc, cos, sin, AttentionContext(mask=block_causal_mask(scales)), 0)
    yield compare("h_block0", h0, fx.tensor(io, "h_block0"), tol.get("h_block0"))

    logits = model(text, mask, x, scales, rope_anchor=anchor)
    yield compare("logits", logits.flatten(-2), fx.tensor(io, "logits"), tol.get("logits"))
    per_token, _ = forward_loss(model, text, mask, x, gt, scales, rope_anchor=anchor)
    loss = reduce_loss(per_token, token_weights(scales))
    yield compare("loss", loss.reshape(1), fx.tensor(io, "loss"), tol.get("loss"),
                  "per-bit 2-class CE, mean over bits, weights 1/L, mean over the batch")


# ---------------------------------------------------------------------------------------------------------------
def check_sampling(fx: Fixture) -> Iterator[Record]:
    io, c, tol = "io.safetensors", fx.config, _tols(fx)
    kw = fx.need("kwargs")
    model_cfg_path = (fx.path / str(c.get("model_config", "../transformer/config.json"))).resolve()
    weights = (fx.path / str(c.get("weights", "../transformer/weights.safetensors"))).resolve()
    mfx = Fixture(model_cfg_path.parent)
    model = _load_model(mfx, mfx.config, weights)

    if list(kw.get("cfg_insertion_layer", [0])) != [0]:
        raise FixtureError(f"{fx.path}: cfg_insertion_layer {kw['cfg_insertion_layer']} is not supported (only [0], "
                           f"guidance on logits, as every released script)")
    if kw.get("negative_label_B_or_BLT") is not None:
        raise FixtureError(f"{fx.path}: negative prompts are not stored in this fixture layout")
    top_p = float(kw.get("top_p", 0.0))
    if not 0 < top_p <= 0.5:
        raise FixtureError(f"{fx.path}: top_p={top_p} leaves random draws (the reference's torch.multinomial stream "
                           f"cannot be reproduced); parity needs 0 < top_p <= 0.5, where every bit is decided")
    scales = _scales(fx, kw)
    anchor = _anchor(fx, scales, fallback=mfx)
    text, mask = fx.tensor(io, "text_emb"), fx.tensor(io, "text_mask").bool()
    out = generate_infinity(model, text, mask, scales, guidance=Guidance(kw["cfg_list"]), tau=kw["tau_list"], top_p=top_p,
                            generator=torch.Generator().manual_seed(int(kw.get("g_seed", 0))), rope_anchor=anchor,
                            record=True)
    yield compare("bits", out.token_bits, fx.tensor(io, "bits"), tol.get("bits"))
    yield compare("f_hat", out.codes, fx.tensor(io, "f_hat"), tol.get("f_hat"))
    guided = torch.cat([r["guided"] for r in out.logits], 1).flatten(-2)
    yield compare("logits_cfg", guided, fx.tensor(io, "logits_cfg"), tol.get("logits_cfg"))
    n = int(c.get("logits_cond_uncond_tokens", fx.tensor(io, "logits_cond").shape[1]))
    for half in ("cond", "uncond"):
        raw = torch.cat([r[half] for r in out.logits], 1).flatten(-2)[:, :n]
        yield compare(f"logits_{half}", raw, fx.tensor(io, f"logits_{half}"), tol.get(f"logits_{half}"))
        yield compare(f"cond_BD_{half}", out.text[half], fx.tensor(io, f"cond_BD_{half}"), tol.get(f"cond_BD_{half}"))
    yield compare("uncond_kv_compact", _varlen(model.null_text_features(mask), mask),
                  fx.tensor(io, "uncond_kv_compact"), tol.get("uncond_kv_compact"))
    replay = replay_bits(out.token_bits, scales, model.config.spatial_patchify)
    yield compare("x_BLC_wo_prefix", replay.inputs, fx.tensor(io, "x_BLC_wo_prefix"), tol.get("x_BLC_wo_prefix"))
    margin = (guided.view(*guided.shape[:-1], -1, 2).diff(dim=-1).abs().min().item())
    # KV-cached logits equal the teacher-forced forward on the sampled bits (the §9 regression test)
    tf = model(text, mask, replay.inputs, scales, rope_anchor=anchor)
    kv = torch.cat([r["cond"] for r in out.logits], 1)
    yield compare("kv_cache_vs_teacher_forced/cond", kv, tf, None,
                  f"self-consistency, not a reference tensor; smallest |l1 - l0| after CFG {margin:.3g}")
