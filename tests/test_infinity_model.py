"""Infinity transformer: fixture parity (bsq / transformer / sampling), schedules.json tables and RoPE-2D positions,
strict official loading, key-map round trip, KV-cached generation == teacher-forced forward, training pieces."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from infinitystar.convert.infinity_official import (config_from_state_dict, load_official_infinity,
                                                    official_to_ours, ours_to_official, read_official_infinity)
from infinitystar.checkpoint_io import CheckpointError
from infinitystar.model.infinity import INFINITY_PRESETS, InfinityConfig, InfinityTransformer, level_ids, text_from_varlen
from infinitystar.model.rope import Rope2D, apply_rope, rope2d_positions
from infinitystar.parity import CHECKERS, Fixture, run_checks
from infinitystar.sampling.bits import sample_bits
from infinitystar.sampling.guidance import Guidance
from infinitystar.sampling.infinity_generate import generate_infinity
from infinitystar.schedules import infinity_resolution as ir
from infinitystar.train.infinity_targets import (bitwise_self_correction, forward_loss, reduce_loss, replay_bits,
                                                 teacher_forcing, token_weights)


@pytest.fixture(scope="module")
def fx_dir(request):
    from pathlib import Path
    return Path(request.config.rootpath) / "tests" / "fixtures" / "infinity"


@pytest.fixture(scope="module")
def raw(fx_dir):
    return load_file(str(fx_dir / "transformer" / "weights.safetensors"))


@pytest.fixture(scope="module")
def model(raw):
    return load_official_infinity(raw, "tiny").eval()


def _records(path):
    """Through the registry once it points at this module; until then the checkers directly (same code)."""
    fx = Fixture(path)
    if CHECKERS.get(fx.kind, "").startswith("infinitystar.parity.infinity_model:"):
        return list(run_checks(path))
    from infinitystar.parity import infinity_model as im
    fn = {"infinity/bsq": im.check_bsq, "infinity/transformer": im.check_transformer,
          "infinity/sampling": im.check_sampling}[fx.kind]
    with torch.no_grad():
        return list(fn(fx))


# --- parity -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,expected", [
    ("bsq", {"bits", "x_BLC_wo_prefix", "f_hat", "flip_bits", "flip_x_BLC_wo_prefix", "flip_f_hat"}),
    ("transformer", {"logits", "loss", "cond_BD", "ca_kv_compact", "shared_ada_lin_out", "h_block0"}),
    ("sampling", {"bits", "f_hat", "logits_cfg", "logits_cond", "logits_uncond", "cond_BD_cond", "cond_BD_uncond",
                  "uncond_kv_compact", "x_BLC_wo_prefix"}),
])
def test_parity(fx_dir, name, expected):
    recs = {r.tensor: r for r in _records(fx_dir / name)}
    assert expected <= set(recs)
    outputs = json.loads((fx_dir / name / "config.json").read_text())["tensors"]["outputs"]
    for r in recs.values():
        assert r.ok, r
        if r.tensor in outputs:
            assert r.tol == outputs[r.tensor]
    for key in ("bits", "flip_bits"):
        if key in recs:
            assert recs[key].tol == 0.0 and recs[key].max_abs_err == 0.0


# --- schedules.json ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def schedules(fx_dir):
    return json.loads((fx_dir / "schedules.json").read_text())


def test_resolution_tables(schedules):
    assert ir.template_keys() == schedules["h_div_w_template_keys"]
    assert list(ir.all_templates()) == schedules["h_div_w_templates"]
    assert list(ir.PN_NUM_SCALES) == schedules["pns"]
    table = ir.dynamic_resolution_table()
    for skey, key in zip(schedules["h_div_w_template_keys"], table):
        for pn in schedules["pns"]:
            ref = schedules["dynamic_resolution_h_w"][skey][pn]
            assert [list(s) for s in table[key][pn]["scales"]] == ref["scales"], (skey, pn)
            assert list(table[key][pn]["pixel"]) == ref["pixel"], (skey, pn)
            assert ir.seq_len(ir.spatial_scales(pn, key)) == schedules["seq_len"][skey][pn]


def test_resolution_facts_from_the_spec():
    assert ir.seq_len(ir.spatial_scales("0.06M", 1.0)) == 521
    assert ir.seq_len(ir.spatial_scales("1M", 1.0)) == 10521
    assert ir.pixel_size(ir.spatial_scales("1M", 3.0)) == (1776, 592)
    assert ir.nearest_template(1.1) == 1.0 and ir.nearest_template(1.2) == 1.25 and ir.nearest_template(0.35) == 0.333
    for key, scales in ir.all_templates().items():   # shorter budgets are prefixes of 1M
        for pn in ir.PN_NUM_SCALES:
            assert ir.spatial_scales(pn, key) == scales[:ir.num_scales(pn)]
    with pytest.raises(ValueError, match="pixel budget"):
        ir.num_scales("2M")
    with pytest.raises(ValueError, match="aspect ratio"):
        ir.nearest_template(-1.0)
    with pytest.raises(ValueError, match="rope_anchor explicitly"):
        ir.rope_anchor([(1, 1), (2, 2)])
    assert ir.rope_anchor([(1, 1), (3, 5)]) == (3, 5)   # no template: anchored to itself


def test_rope2d_positions_and_levels(schedules):
    for skey, by_pn in schedules["rope2d_mode2_positions"].items():
        for pn, e in by_pn.items():
            scales = [tuple(s[1:]) for s in e["scales"]]
            assert ir.spatial_scales(pn, float(skey)) == scales
            anchor = ir.rope_anchor(scales)
            assert list(anchor) == e["ref_grid_hw"] == list(ir.template_anchor(float(skey)))
            pos = rope2d_positions(scales, anchor)
            assert pos.shape == (e["L"], 2)
            assert pos[:, 0].tolist() == e["row"], (skey, pn)
            assert pos[:, 1].tolist() == e["col"], (skey, pn)
            assert level_ids(scales).tolist() == e["level"]


def test_rope2d_frequency_layout():
    c = 16
    rope = Rope2D(c)
    theta = torch.tensor([10000 ** (-4 * p / c) for p in range(c // 4)])
    torch.testing.assert_close(rope.inv_freq, theta.float())
    x = torch.randn(1, 1, 1, c, dtype=torch.float64)
    cos, sin = rope.cos_sin(torch.tensor([[3, 5]]))
    y = apply_rope(x, cos.double(), sin.double())
    for p in range(c // 2):
        phi = (3 if p < c // 4 else 5) * theta[p % (c // 4)].item()
        a, b = x[..., 2 * p].item(), x[..., 2 * p + 1].item()
        assert y[..., 2 * p].item() == pytest.approx(a * math.cos(phi) - b * math.sin(phi), abs=1e-5)
        assert y[..., 2 * p + 1].item() == pytest.approx(a * math.sin(phi) + b * math.cos(phi), abs=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        Rope2D(18)


# --- configs ----------------------------------------------------------------------------------------------------------
def test_presets_and_parameter_counts():
    assert InfinityConfig.preset("tiny").num_params() == 232996          # the fixture model
    assert InfinityConfig.preset("tiny", text_maxlen=32).num_params() == 237092   # spec section 9
    c2 = InfinityConfig.preset("infinity_2b")
    assert (c2.ffn_hidden, c2.head_dim, c2.bits, c2.pooler_heads) == (8192, 128, 32, 16)
    assert round(c2.num_params() / 1e9, 3) == 2.205
    c8 = InfinityConfig.preset("infinity_8b")
    assert (c8.ffn_hidden, c8.bits, c8.pooler_heads, c8.width // c8.pooler_heads) == (14336, 56, 16, 224)
    assert round(c8.num_params() / 1e9, 3) == 8.376
    with torch.device("meta"):   # the formula is the module tree's count
        m = InfinityTransformer(c2)
    assert sum(p.numel() for p in m.parameters()) == c2.num_params()
    assert set(INFINITY_PRESETS) >= {"infinity_2b", "infinity_8b", "tiny"}


@pytest.mark.parametrize("kw,msg", [
    (dict(width=64, num_heads=3), "not divisible"),
    (dict(width=72, num_heads=4, text_channels=256), "multiple of 4"),
    (dict(width=32, num_heads=2, text_channels=256), "empty FFN"),
    (dict(text_channels=200), "pooler head dim"),
    (dict(depth=0), "positive integer"),
    (dict(cond_drop_rate=1.5), "cond_drop_rate"),
])
def test_config_validation(kw, msg):
    base = dict(text_channels=256, text_maxlen=16)
    with pytest.raises(ValueError, match=msg):
        InfinityConfig(**{**base, **kw})
    with pytest.raises(ValueError, match="unknown field"):
        InfinityConfig.from_dict({"depth": 2, "blocks": 3})
    assert InfinityConfig.from_dict(InfinityConfig.preset("tiny").to_dict()) == InfinityConfig.preset("tiny")


# --- strict loading and the key map -----------------------------------------------------------------------------------
def test_key_map_round_trip(raw, model):
    back = ours_to_official(model.state_dict(), block_chunks=2)
    assert set(back) == set(raw)
    for k in raw:
        assert torch.equal(back[k], raw[k]), k
    flat = ours_to_official(model.state_dict(), block_chunks=1)
    assert any(k.startswith("blocks.1.") for k in flat)
    m2 = load_official_infinity(flat)
    for k, v in model.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    assert config_from_state_dict(official_to_ours(raw)).to_dict() == {
        **InfinityConfig.preset("tiny").to_dict(), "pooler_head_dim": 128, "cond_drop_rate": 0.1}


def test_scale_mul_backend_variant_loads(raw, model):
    sd = dict(raw)
    for k in [k for k in sd if k.endswith("scale_mul_1H11")]:
        sd[k] = sd[k].reshape(1, 1, -1, 1)     # the custom-flash-kernel shape of the reference
    m = load_official_infinity(sd, "tiny")
    assert torch.equal(m.blocks[1].attn.log_scale, model.blocks[1].attn.log_scale)


@pytest.mark.parametrize("edit,msg", [
    (lambda sd: sd.pop("block_chunks.1.module.0.ffn.fc2.weight"), "missing keys: block_chunks.1.module.0.ffn.fc2.weight"),
    (lambda sd: sd.__setitem__("head_nm.extra", torch.zeros(1)), "unexpected keys: head_nm.extra"),
    (lambda sd: sd.__setitem__("word_embed.weight", torch.zeros(64, 32)), r"mis-shaped keys: word_embed.weight \(checkpoint \(64, 32\)"),
    (lambda sd: sd.__setitem__("block_chunks.0.module.0.sa.zero_k_bias", torch.ones(64)), "zero_k_bias should be all zeros"),
    (lambda sd: sd.__setitem__("block_chunks.2.module.3.ada_gss", torch.zeros(1, 1, 6, 64)), "not a full grid"),
])
def test_strict_loading_errors_name_keys(raw, edit, msg):
    sd = dict(raw)
    edit(sd)
    with pytest.raises(CheckpointError, match=msg):
        load_official_infinity(sd, "tiny")


def test_wrong_config_is_an_error(raw):
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_official_infinity(raw, InfinityConfig.preset("tiny", latent_channels=32))
    with pytest.raises(CheckpointError, match="block chunks cannot hold"):
        load_official_infinity(raw, InfinityConfig.preset("tiny", depth=3))


def test_files_pth_safetensors_and_shards(tmp_path, raw, model):
    torch.save({"trainer": {"gpt_fsdp": raw}}, tmp_path / "ckpt.pth")
    torch.save(raw, tmp_path / "plain.pth")
    for f in ("ckpt.pth", "plain.pth"):
        assert set(read_official_infinity(tmp_path / f)) == set(raw)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    keys = sorted(raw)
    parts = {"model-00001-of-00002.safetensors": keys[:30], "model-00002-of-00002.safetensors": keys[30:]}
    for name, ks in parts.items():
        save_file({k: raw[k].contiguous() for k in ks}, str(shard_dir / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    m = load_official_infinity(shard_dir, "tiny")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in model.state_dict().items())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.weight"):
        read_official_infinity(shard_dir)
    with pytest.raises(CheckpointError, match="no such file"):
        read_official_infinity(tmp_path / "missing.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="index.json"):
        read_official_infinity(tmp_path / "empty")


# --- generation -------------------------------------------------------------------------------------------------------
def _text(B=2, Lt=6, Ct=256, lens=(3, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, Lt, Ct, generator=g) * 0.3
    mask = torch.arange(Lt)[None] < torch.tensor(lens)[:, None]
    return feats, mask


@pytest.mark.parametrize("cfg,scales,patchify", [
    (3.0, ir.spatial_scales("0.06M", 1.333), False),   # another template, CFG on
    (1.0, [(1, 1), (2, 2), (3, 3), (5, 4)], False),     # no guidance: no uncond half
    (2.0, [(1, 1), (2, 2), (4, 3)], True),              # 8B-style tokens of 2x2 latent cells
])
def test_kv_cached_generation_equals_teacher_forcing(cfg, scales, patchify):
    torch.manual_seed(0)
    m = InfinityTransformer(InfinityConfig.preset("tiny", depth=3, num_heads=4, spatial_patchify=patchify,
                                                  latent_channels=4 if patchify else 16)).eval()
    with torch.no_grad():   # open the residual branches so every block matters
        for b in m.blocks:
            b.ada_bias.normal_(0, 0.3)
        m.head.weight.normal_(0, 0.3)
    text, mask = _text()
    anchor = (8, 6) if patchify else None
    out = generate_infinity(m, text, mask, scales, guidance=Guidance(cfg), tau=0.7, top_p=0.0, rope_anchor=anchor,
                            generator=torch.Generator().manual_seed(1), record=True)
    bits = out.token_bits
    assert bits.shape == (2, ir.seq_len(scales), m.config.bits)
    assert 0.05 < bits.float().mean() < 0.95
    r = replay_bits(bits, scales, patchify)
    assert torch.equal(r.codes, out.codes)
    with torch.no_grad():
        tf = m(text, mask, r.inputs, scales, rope_anchor=anchor)
        kv = torch.cat([x["cond"] for x in out.logits], 1)
        assert (tf - kv).abs().max() < 1e-5
        if cfg != 1.0:
            null = m.null_text_features(mask)
            tf_u = m(null, mask, r.inputs, scales, rope_anchor=anchor)
            assert (tf_u - torch.cat([x["uncond"] for x in out.logits], 1)).abs().max() < 1e-5
        else:
            assert out.logits[0]["uncond"] is None
    # teacher-forcing the sampled bits through prefix_bits reproduces the run
    again = generate_infinity(m, text, mask, scales, guidance=Guidance(cfg), tau=0.7, rope_anchor=anchor,
                              prefix_bits=out.bits)
    assert torch.equal(again.token_bits, bits)


def test_negative_prompt_and_padding_invariance(model):
    text, mask = _text()
    s = ir.spatial_scales("0.06M", 1.0)[:4]
    a = generate_infinity(model, text, mask, s, guidance=Guidance(3.0), greedy=True, record=True)
    # extra padded rows with garbage change nothing (keys are masked per sample)
    pad = torch.cat([text, torch.full((2, 3, 256), 123.0)], 1)
    pmask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    b = generate_infinity(model, pad, pmask, s, guidance=Guidance(3.0), greedy=True, record=True)
    assert torch.equal(a.token_bits, b.token_bits)
    assert (a.logits[-1]["guided"] - b.logits[-1]["guided"]).abs().max() < 1e-5
    neg, nmask = _text(seed=5, Lt=4, lens=(4, 2))
    c = generate_infinity(model, text, mask, s, guidance=Guidance(3.0), greedy=True, negative_text=neg,
                          negative_mask=nmask, record=True)
    assert not torch.equal(c.text["uncond"], a.text["uncond"])
    assert torch.equal(c.text["cond"], a.text["cond"])


def test_sample_bits_top_p_rule():
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(99.0)], [0.0, -math.log(9.0)]])   # p1 = .5, .99, .1
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_bits(logits, top_p=0.95, generator=g) for _ in range(400)]).float().mean(0)
    assert draws[1] == 1.0                         # min prob 0.01 <= 0.05: decided
    assert 0.3 < draws[0] < 0.7                     # 0.5: drawn
    assert 0.03 < draws[2] < 0.2                    # 0.1 > 0.05: drawn
    assert torch.equal(sample_bits(logits, top_p=0.5), torch.tensor([0, 1, 0], dtype=torch.uint8))
    assert torch.equal(sample_bits(logits, greedy=True), torch.tensor([0, 1, 0], dtype=torch.uint8))
    with pytest.raises(ValueError, match="top_p"):
        sample_bits(logits, top_p=1.5)


# --- training pieces --------------------------------------------------------------------------------------------------
def test_bsc_flips_history_not_targets(fx_dir):
    io = load_file(str(fx_dir / "bsq" / "io.safetensors"))
    scales = ir.spatial_scales("0.06M", 1.0)
    clean = teacher_forcing(io["f"], scales)
    zero = teacher_forcing(io["f"], scales, bitwise_self_correction(scales, strength=0.0))
    assert torch.equal(zero.bits, clean.bits) and torch.equal(zero.inputs, clean.inputs) and zero.flips is None
    g = torch.Generator().manual_seed(3)
    noisy = teacher_forcing(io["f"], scales, bitwise_self_correction(scales, 0.3, generator=g))
    assert noisy.flips is not None and noisy.flips[:, -256:].sum() == 0     # never at the last scale
    assert torch.equal(noisy.bits[:, :1], clean.bits[:, :1])               # first targets: no history yet
    assert not torch.equal(noisy.bits, clean.bits)                          # later targets correct the history
    first_two = teacher_forcing(io["f"], scales, bitwise_self_correction(scales, 0.3, num_layers=2,
                                                                        generator=torch.Generator().manual_seed(3)))
    assert first_two.flips is None or first_two.flips[:, 5:].sum() == 0


def test_training_forward_loss_and_condition_dropout(fx_dir, raw):
    io = load_file(str(fx_dir / "transformer" / "io.safetensors"))
    scales = ir.spatial_scales("0.06M", 1.0)
    m = load_official_infinity(raw, InfinityConfig.preset("tiny", cond_drop_rate=1.0))
    text, mask = io["text_emb"], io["text_mask"]
    before = text.clone()
    m.eval()   # dropout is a training-only regulariser (upstream drops in eval too)
    with torch.no_grad():
        l_eval, _ = forward_loss(m, text, mask, io["x_BLC_wo_prefix"], io["gt_bits"], scales)
    assert abs(reduce_loss(l_eval, token_weights(scales)).item() - io["loss"].item()) < 1e-4
    m.train()
    per_token, acc = forward_loss(m, text, mask, io["x_BLC_wo_prefix"], io["gt_bits"], scales)
    assert torch.equal(text, before)                                         # caller's tensor untouched
    null_loss, _ = forward_loss(m.eval(), m.null_text_features(mask), mask, io["x_BLC_wo_prefix"], io["gt_bits"], scales)
    assert (per_token - null_loss).abs().max() < 1e-5                        # p = 1: every caption dropped
    m.train()
    loss = reduce_loss(per_token, token_weights(scales, reweight_by_scale=True))
    loss.backward()
    assert m.head.weight.grad is not None and m.blocks[0].attn.log_scale.grad is not None
    assert per_token.shape == acc.shape == (2, 521)


def test_token_weights():
    scales = ir.spatial_scales("0.06M", 1.0)
    for rw in (False, True):
        w = token_weights(scales, rw)
        assert w.shape == (521,) and abs(w.sum().item() - 1) < 1e-6
    w = token_weights(scales, True).double()
    totals = torch.stack([x.sum() for x in w.split([h * ww for h, ww in scales])])
    areas = torch.tensor([h * ww for h, ww in scales], dtype=torch.float64)
    torch.testing.assert_close(totals / totals[-1], areas.sqrt() / areas[-1].sqrt(), rtol=1e-5, atol=0)


def test_text_from_varlen_and_input_checks(model):
    rows = torch.randn(7, 256)
    padded, mask = text_from_varlen(rows, [3, 4])
    assert padded.shape == (2, 4, 256) and torch.equal(padded[mask], rows)
    with pytest.raises(ValueError, match="lengths"):
        text_from_varlen(rows, [3, 3])
    with pytest.raises(ValueError, match="at least one real token"):
        model.encode_text(padded, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x_wo_prefix"):
        model(padded, mask, torch.zeros(2, 10, 16), ir.spatial_scales("0.06M", 1.0))
    with pytest.raises(ValueError, match="1x1 scale"):
        model(padded, mask, torch.zeros(2, 3, 16), [(2, 2)])
