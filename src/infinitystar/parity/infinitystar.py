"""Parity checkers for the InfinityStar fixture family (schedules, quantizer, transformer, apg).

Every checker builds our implementation from the folder's config and runs it through the code users run:
the scale tables and `Schedule`, `encode_targets`, `pack_sequence`, `load_official_transformer`, `generate`.
"""
from __future__ import annotations

import json
import re
from typing import Iterator

import numpy as np
import torch

from infinitystar.convert.official import load_official_transformer, read_official_transformer
from infinitystar.model.attention import dense_mask
from infinitystar.model.infinitystar import TransformerConfig
from infinitystar.model.packing import PackSample, pack_sequence
from infinitystar.model.rope import text_positions
from infinitystar.parity import Fixture, FixtureError, Record, compare
from infinitystar.quant.residual import RecordedFlips, encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance, apg, cfg
from infinitystar.schedules import dynamic_resolution as dr
from infinitystar.schedules.pyramid import Schedule, latent_frames
from infinitystar.train.loss import bitwise_loss, scale_loss_weights

OFFICIAL_FRAMES_PER_CLIP = 20


def _frames_per_clip(name: str | None) -> int:
    m = re.search(r"clip(\d+)frames", name or "")
    return int(m[1]) if m else OFFICIAL_FRAMES_PER_CLIP


def _replist(v) -> list[int]:
    return json.loads(v) if isinstance(v, str) else list(v)


def _exact(name: str, ours, ref, note: str = "") -> Record:
    """Structured (non-tensor) values: the error is the number of differing entries."""
    if ours == ref:
        return Record(name, 0.0, 0.0, note)
    a, b = np.asarray(ours, dtype=object).ravel(), np.asarray(ref, dtype=object).ravel()
    diff = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b)) if a.shape == b.shape else max(len(a), len(b))
    return Record(name, float(max(diff, 1)), 0.0, note or f"ours {str(ours)[:200]} vs reference {str(ref)[:200]}")


def _schedule_from(fx: Fixture, cfg_src: dict, scales_key: str = "schedule", **kw) -> Schedule:
    scales = fx.need(scales_key, cfg_src)
    n = int(fx.need("scales_in_one_clip", cfg_src)) if "scales_in_one_clip" in cfg_src else None
    if n is None:  # the image pyramid is the run of t == 1 scales at the start
        n = next((i for i, s in enumerate(scales) if s[0] != 1), len(scales))
    spatial = [tuple(s[1:]) for s in scales[:n]]
    return Schedule(spatial, int(fx.need("T_lat", cfg_src)), kw.pop("frames_per_clip", OFFICIAL_FRAMES_PER_CLIP),
                    kw.pop("image_repetition"), kw.pop("video_repetition"), **kw)


# ---------------------------------------------------------------------------------------------------------------
def check_schedules(fx: Fixture) -> Iterator[Record]:
    tables = fx.json("tables.json")
    fpc = _frames_per_clip(fx.config.get("schedule_name"))
    templates = dr.all_templates()
    yield _exact("template_keys_in_dict_order", list(templates), fx.need("template_keys_in_dict_order", tables))
    yield _exact("pn_to_num_scales", dr.PN_NUM_SCALES, fx.need("pn_to_num_scales", tables))
    for r, scales in fx.need("base_ratios_h_div_w", tables).items():
        yield _exact(f"base_ratios/{r}", [list(s) for s in dr.base_ratio_scales(float(r))], scales)
    for key, by_pn in fx.need("spatial_tables", tables).items():
        for pn, e in by_pn.items():
            ours = dr.all_templates()[dr.nearest_template(float(key))][: dr.num_scales(pn)]
            got = {"scales_hw": [list(s) for s in ours], "pixel_hw": list(dr.pixel_size(ours)),
                   "tokens_per_scale": [h * w for h, w in ours], "total_image_tokens": sum(h * w for h, w in ours)}
            yield _exact(f"spatial_tables/{key}/{pn}", got, {k: e[k] for k in got if k in e})

    small = fx.need("pt2scale_schedule_small_case", tables)
    spatial = dr.spatial_scales(small["pn"], float(small["h_div_w_template"]))
    ones = [1] * len(spatial)
    for vf, case in small["by_video_frames"].items():
        T = latent_frames(int(vf))
        yield _exact(f"pt2scale/{vf}/T_lat", T, case["T_lat"])
        yield _exact(f"pt2scale/{vf}/scales_in_one_clip", len(spatial), case["scales_in_one_clip"])
        full = Schedule(spatial, T, fpc, ones, ones, 1)
        yield _exact(f"pt2scale/{vf}/max_video_scales", len(full.scales), case["max_video_scales"])
        for pt, sched in case["pt2scale_schedule"].items():
            s = Schedule(spatial, int(pt), fpc, ones, ones, 1)
            yield _exact(f"pt2scale/{vf}/{pt}", [list(x.shape) for x in s.scales], sched)
        if "full_schedule_context" in case:
            ours = {str(x.index): {"clip": x.clip, "frame_start": x.frame_start, "frame_end": x.frame_end,
                                   "ref_sids": full.refs(x.index)} for x in full.scales}
            yield _exact(f"pt2scale/{vf}/full_schedule_context", ours, case["full_schedule_context"])

    for group in fx.need("repetition_lists", tables).values():
        for name, e in group.items():
            if not e.get("pn") or "visual_steps" not in e:
                continue
            sp = dr.spatial_scales(e["pn"], float(small["h_div_w_template"]))
            for vf, v in e["visual_steps"].items():
                s = Schedule(sp, latent_frames(int(vf)), fpc, e["image"], e["video"], e["detail_scale_min_tokens"])
                yield _exact(f"repetition_lists/{name}/{vf}", [len(s.scales), len(s.steps), len(s.steps) + 1],
                             [v["n_scales"], v["visual_steps"], v["forward_passes_incl_text"]])

    for res, e in fx.need("semantic_detail_classification", tables).items():
        for key, t in e["templates"].items():
            ours = dr.all_templates()[dr.nearest_template(float(key))][: dr.num_scales(e["pn"])]
            s = Schedule(ours, 1, fpc, [1] * len(ours), [1] * len(ours), e["detail_scale_min_tokens"])
            yield _exact(f"semantic_detail/{res}/{key}", [x.bits for x in s.scales], t["bits"])

    # one packed training sequence
    meta = fx.json("packed_sequence.json")
    io = fx.tensors("packed_sequence.safetensors")
    reps_img, reps_vid = _replist(meta["image_scale_repetition"]), _replist(meta["video_scale_repetition"])
    full = _schedule_from(fx, meta, "full_schedule", frames_per_clip=fpc, image_repetition=reps_img,
                          video_repetition=reps_vid, detail_min_tokens=1)
    yield _exact("packed/full_schedule", [list(s.shape) for s in full.scales], meta["full_schedule"])
    packed = _packed_from_meta(fx, meta, full)
    yield _exact("packed/segment_lengths", packed.segment_lengths, meta["segment_lengths"])
    yield _exact("packed/ref_sids_full_schedule", {str(s.index): full.refs(s.index) for s in full.scales},
                 meta["ref_sids_full_schedule"])
    n_pos = packed.num_visual + packed.num_text
    yield compare("packed/positions", packed.positions[:n_pos].int(), fx.tensor("packed_sequence.safetensors", "positions"))
    yield compare("packed/document_id", packed.document_id.int(), fx.tensor("packed_sequence.safetensors", "document_id"))
    yield compare("packed/segment_table", packed.segment_table.to(torch.uint8),
                  fx.tensor("packed_sequence.safetensors", "segment_table"))
    yield compare("packed/mask_row_per_segment", packed.segment_table[:, packed.document_id].to(torch.uint8),
                  fx.tensor("packed_sequence.safetensors", "mask_row_per_segment"))
    dense = dense_mask(packed.document_id, packed.segment_table)
    L = dense.shape[0]
    ref_dense = np.unpackbits(fx.tensor("packed_sequence.safetensors", "dense_mask_packbits").numpy(), axis=1)[:, :L]
    yield compare("packed/dense_mask", dense.to(torch.uint8), torch.from_numpy(ref_dense.astype(np.uint8)))
    bs = int(meta.get("block_mask_block_size", 128))
    nb = -(-L // bs)
    padded = torch.zeros(nb * bs, nb * bs, dtype=torch.bool)
    padded[:L, :L] = dense
    blocks = padded.view(nb, bs, nb, bs).any(3).any(1)
    yield compare("packed/block_mask_dense", blocks.to(torch.uint8), io["block_mask_dense"])


def _packed_from_meta(fx: Fixture, meta: dict, full: Schedule):
    sel = fx.need("selected_scale_indices_in_full_schedule", meta)
    reps = fx.need("selected_repetition_per_full_scale", meta)
    steps = [full.scale_steps(si)[reps[si]] for si in sel]
    sample = PackSample(full, steps, [int(fx.need("caption_len", meta))])
    return pack_sequence([sample], int(fx.need("text_maxlen", meta)), int(meta.get("pad_to_multiplier", 128)))


# ---------------------------------------------------------------------------------------------------------------
def _quantizer_schedule(fx: Fixture, c: dict) -> Schedule:
    for k, expected in (("z_interplote_down", "area"), ("z_interplote_up", "trilinear"), ("noise_input", 0),
                        ("inner_scale_boost", 0), ("use_learnable_dim_proj", 0)):
        if k in c and c[k] != expected:
            raise FixtureError(f"{fx.path}: {k}={c[k]!r} is not supported (only {expected!r}, the released setting)")
    return _schedule_from(fx, c, image_repetition=_replist(fx.need("image_scale_repetition", c)),
                          video_repetition=_replist(fx.need("video_scale_repetition", c)),
                          detail_min_tokens=int(fx.need("detail_scale_min_tokens", c)),
                          semantic_bits=int(c.get("semantic_scale_dim", 16)),
                          detail_bits=int(c.get("detail_scale_dim", 64)))


def check_quantizer(fx: Fixture) -> Iterator[Record]:
    c = fx.config
    schedule = _quantizer_schedule(fx, c)
    yield _exact("schedule", [list(s.shape) for s in schedule.scales], c["schedule"])
    io = "io.safetensors"
    z = fx.tensor(io, "z")
    n = len(schedule.steps)
    yield _exact("n_steps", n, int(c.get("n_steps", n)))
    masks = {i: fx.tensor(io, f"bsc/step{i:03d}/flip_mask") for i in range(n)}
    for tag, flip in (("nobsc", None), ("bsc", RecordedFlips(masks))):
        t = encode_targets(z, schedule, flip)
        for i in range(n):
            yield compare(f"{tag}/step{i:03d}/X", t.inputs[i][0], fx.tensor(io, f"{tag}/step{i:03d}/X"))
            yield compare(f"{tag}/step{i:03d}/bits", t.bits[i][0].reshape(-1, t.bits[i].shape[-1]),
                          fx.tensor(io, f"{tag}/step{i:03d}/bits"))
        yield compare(f"F_{tag}", t.codes, fx.tensor(io, f"F_{tag}"))


# ---------------------------------------------------------------------------------------------------------------
def _transformer_config(fx: Fixture) -> TransformerConfig:
    kw = fx.need("kwargs")
    if kw.get("arch", "qwen") != "qwen":
        raise FixtureError(f"{fx.path}: arch {kw.get('arch')!r} is not supported (only 'qwen')")
    if int(kw.get("apply_spatial_patchify", 0)) or int(kw.get("add_lvl_embeding_on_first_block", 0)):
        raise FixtureError(f"{fx.path}: spatial patchify / level embeddings are not part of the InfinityStar model")
    shapes = fx.need("state_dict_shapes")
    args = fx.config.get("args", {})
    return TransformerConfig(
        width=int(kw["embed_dim"]), depth=int(kw["depth"]), num_heads=int(kw["num_heads"]),
        num_kv_heads=int(kw.get("num_key_value_heads") or kw["num_heads"]), mlp_ratio=float(kw["mlp_ratio"]),
        qkvo_bias=bool(kw.get("qwen_qkvo_bias", False)), text_channels=int(kw["text_channels"]),
        text_maxlen=int(kw["text_maxlen"]), null_text_len=int(shapes["cfg_uncond"][0]),
        latent_channels=int(args.get("detail_scale_dim", 64)), semantic_bits=int(args.get("semantic_scale_dim", 16)),
        norm_eps=float(kw.get("norm_eps", 1e-6)))


def rope_table_records(fx: Fixture, model, io: str) -> Iterator[Record]:
    """Our RoPE angles (computed from positions on the fly) against the reference's per-axis tables."""
    config = model.config
    q = config.head_dim // 8
    for axis, name, offset in ((0, "scales", config.text_maxlen), (1, "frames", 0), (2, "height", 0), (3, "width", 0)):
        key = f"rope/freqs_{name}"
        if key in fx.tensors(io):
            ref = fx.tensor(io, key)
            pos = torch.zeros(ref.shape[1], 4, dtype=torch.long)
            pos[:, axis] = torch.arange(ref.shape[1]) + offset
            cos, sin = model.rope.cos_sin(pos)
            yield compare(key, torch.stack([cos, sin])[:, :, axis * q:(axis + 1) * q], ref)
    if "rope/freqs_text" in fx.tensors(io):
        ref = fx.tensor(io, "rope/freqs_text")
        cos, sin = model.rope.cos_sin(text_positions(ref.shape[-2]))
        yield compare("rope/freqs_text", torch.stack([cos, sin]).reshape(ref.shape), ref)


def greedy_mismatch_record(name: str, guided_logits: list[torch.Tensor], stored: list[torch.Tensor],
                           near_ties: list[dict]) -> Record:
    """Our argmax bits (under the stored bits forced at every step) against the stored greedy bits; bits listed as
    near ties in the fixture may differ."""
    ties = {(t["step"], t["token"], t["bit"]) for t in near_ties}
    mismatches, tie_mismatches = 0, 0
    for i, (logits, bits) in enumerate(zip(guided_logits, stored)):
        ours = logits.softmax(-1).argmax(-1).to(torch.uint8)
        for tok, bit in (ours != bits).nonzero().tolist():
            if (i, tok, bit) in ties:
                tie_mismatches += 1
            else:
                mismatches += 1
    return Record(name, float(mismatches), 0.0, f"{tie_mismatches} listed near ties differ (allowed)")


def check_transformer(fx: Fixture) -> Iterator[Record]:
    c, io = fx.config, "io.safetensors"
    config = _transformer_config(fx)
    weights = fx.path / "weights.safetensors"
    if not weights.is_file():
        raise FixtureError(f"{fx.path}: missing file weights.safetensors")
    model = load_official_transformer(read_official_transformer(weights), config).eval()
    args = fx.need("args")
    schedule = _schedule_from(fx, c, image_repetition=_replist(args["image_scale_repetition"]),
                              video_repetition=_replist(args["video_scale_repetition"]),
                              detail_min_tokens=int(args["detail_scale_min_tokens"]),
                              semantic_bits=config.semantic_bits, detail_bits=config.detail_bits,
                              frames_per_clip=int(args.get("frames_inner_clip", OFFICIAL_FRAMES_PER_CLIP)))
    yield _exact("schedule", [list(s.shape) for s in schedule.scales], c["schedule"])
    n = len(schedule.steps)

    yield from rope_table_records(fx, model, io)

    text = fx.tensor(io, "text/kv_compact")
    if "text/cfg_uncond_rows" in fx.tensors(io):
        yield compare("text/cfg_uncond_rows", model.null_text_features(text.shape[0]), fx.tensor(io, "text/cfg_uncond_rows"))
    caption = Caption(text[None])
    tau = [float(t) for t in fx.need("tau_list")]

    # (a) teacher-forced KV-cached inference: every step forced to the quantizer's bits
    qfx = fx.sibling("quantizer")
    teacher = [qfx.tensor("io.safetensors", f"nobsc/step{i:03d}/bits") for i in range(n)]
    tf = c.get("teacher_forced", {})
    run = tf.get("cfg_run", {"cfg": 3.0})
    out = generate(model, schedule, caption, guidance=Guidance(float(run.get("cfg", 3.0))), tau=tau,
                   prefix_bits=teacher, record_logits=True)
    for i in range(n):
        for half in ("cond", "uncond"):
            key = f"teacher_forced/step{i:03d}/logits_{half}"
            yield compare(key, out.logits[i][half][0].flatten(-2), fx.tensor(io, key))
    yield compare("teacher_forced/summed_codes_vs_quantizer_F_nobsc", out.codes, qfx.tensor("io.safetensors", "F_nobsc"))

    # (b) greedy APG run, checked robustly: force the stored bits, our argmax must agree outside near ties
    g = fx.need("greedy_apg")
    stored = [fx.tensor(io, f"greedy_apg/step{i:03d}/bits") for i in range(n)]
    apg_guidance = Guidance(float(g["cfg"]), "apg", apg_eta=float(g.get("eta", 0.0)),
                            apg_norm_threshold=float(g.get("apg_norm_threshold", 0.05)))
    out = generate(model, schedule, caption, guidance=apg_guidance, tau=tau, prefix_bits=stored, record_logits=True)
    yield greedy_mismatch_record("greedy_apg/argmax_mismatches_outside_near_ties",
                                 [out.logits[i]["guided"][0] for i in range(n)], stored, g.get("near_ties", []))
    yield compare("greedy_apg/summed_codes", out.codes, fx.tensor(io, "greedy_apg/summed_codes"))

    # (c) packed training forward
    sfx = fx.sibling("schedules")
    meta = sfx.json("packed_sequence.json")
    packed = _packed_from_meta(sfx, meta, schedule)
    targets = encode_targets(qfx.tensor("io.safetensors", "z"), schedule)
    step_ids = [st.index for _, st in packed.visual_segments]
    x = torch.cat([targets.inputs[s][0] for s in step_ids])
    yield compare("train/x_BLC", x, fx.tensor(io, "train/x_BLC"))
    logits = model.forward_packed(x, [text], packed)
    losses, accs, volumes = [], [], []
    for k, s in enumerate(step_ids):
        bits = targets.bits[s][0].reshape(-1, targets.bits[s].shape[-1])
        yield compare(f"train/scale{k:02d}/gt_bits", bits, fx.tensor(io, f"train/scale{k:02d}/gt_bits"))
        yield compare(f"train/scale{k:02d}/logits", logits[k].flatten(-2), fx.tensor(io, f"train/scale{k:02d}/logits"))
        loss, acc = bitwise_loss(logits[k], bits)
        losses.append(loss)
        accs.append(acc)
        volumes.append(schedule.steps[s].scale.tokens)
    yield compare("train/loss_per_token", torch.cat(losses), fx.tensor(io, "train/loss_per_token"))
    yield compare("train/bit_acc_per_token", torch.cat(accs), fx.tensor(io, "train/bit_acc_per_token"))
    tw = c.get("train", {}).get("trainer_weighted_loss")
    if tw:
        w = scale_loss_weights(volumes, schedule.scales[-1].tokens, tw.get("reweight_loss_by_scale", 4),
                               tw.get("max_reweight_value", 40))
        total = sum(wi * l.mean() for wi, l in zip(w, losses))
        yield compare("train/trainer_weighted_loss", total, torch.tensor(tw["value"]))


# ---------------------------------------------------------------------------------------------------------------
def check_apg(fx: Fixture) -> Iterator[Record]:
    io = "io.safetensors"
    for case in fx.need("cases"):
        name = case["name"]
        cond, uncond = fx.tensor(io, f"{name}/cond"), fx.tensor(io, f"{name}/uncond")
        for key in fx.tensors(io):
            if not key.startswith(name + "/") or key.endswith(("/cond", "/uncond")):
                continue
            run = key.split("/", 1)[1]
            if m := re.fullmatch(r"apg_cfg([\d.]+)_thr([\d.]+)_eta([\d.]+)", run):
                ours = apg(cond, uncond, float(m[1]), eta=float(m[3]), norm_threshold=float(m[2]))
            elif m := re.fullmatch(r"plain_cfg([\d.]+)", run):
                ours = cfg(cond, uncond, float(m[1]))
            else:
                raise FixtureError(f"{fx.path}: unknown run '{run}' in {key}")
            yield compare(key, ours, fx.tensor(io, key))
