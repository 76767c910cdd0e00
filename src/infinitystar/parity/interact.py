"""Parity checker for the interactive long-video fixture (`infinitystar/interact`).

It builds the segment from the folder's config with the functions the pipeline runs (`segment_schedule`,
`condition_maps`, `generate` with condition blocks, `next_previous` / `decode_window`) and compares the condition
tokens and positions, the teacher-forced logits, and a greedy clip forced to the stored bits.
"""
from __future__ import annotations

from typing import Iterator

from infinitystar.convert.official import load_official_transformer, read_official_transformer
from infinitystar.model.rope import condition_positions, visual_positions
from infinitystar.parity import Fixture, FixtureError, Record, compare
from infinitystar.parity.infinitystar import (_exact, _replist, _transformer_config, greedy_mismatch_record,
                                              rope_table_records)
from infinitystar.quant.interact import InteractConfig, condition_maps, decode_window, next_previous, segment_schedule
from infinitystar.sampling.generate import Caption, generate
from infinitystar.sampling.guidance import Guidance
from infinitystar.schedules.pyramid import PyramidConfig

IO = "io.safetensors"


def _interact_config(fx: Fixture) -> tuple[PyramidConfig, InteractConfig]:
    c, args = fx.config, fx.need("args")
    for k, expected in (("z_interplote_down", "area"), ("z_interplote_up", "trilinear")):
        if c.get(k, expected) != expected:
            raise FixtureError(f"{fx.path}: {k}={c[k]!r} is not supported (only {expected!r})")
    scales = fx.need("scale_schedule")
    T = int(fx.need("T_new"))
    if any(s[0] != T for s in scales):
        raise FixtureError(f"{fx.path}: every scale of a segment must have t = T_new = {T}")
    cond = fx.need("conditions")
    sem, det = cond["semantic"], cond["detail"]
    tail = [i - (T - len(det["detail_frame_inds"])) for i in det["detail_frame_inds"]]
    if tail != list(range(len(tail))):
        raise FixtureError(f"{fx.path}: detail frames {det['detail_frame_inds']} are not the last ones of the "
                           f"previous segment (only that layout is supported)")
    maxlen = int(fx.need("kwargs")["text_maxlen"])
    pyramid = PyramidConfig(pn=None, custom_scales=[s[1:] for s in scales], frames_per_clip=T,
                            image_repetition=_replist(args["image_scale_repetition"]),
                            video_repetition=_replist(args["video_scale_repetition"]),
                            detail_min_tokens=int(args["detail_scale_min_tokens"]),
                            semantic_bits=int(args.get("semantic_scale_dim", 16)),
                            detail_bits=int(args.get("detail_scale_dim", 64)),
                            temporal_compression=int(args.get("temporal_compress_rate", 4)))
    interact = InteractConfig(semantic_scale=int(sem["semantic_scale_ind"]), detail_frames=len(tail),
                              semantic_position=int(sem["rope"]["scale_position"]) - maxlen,
                              detail_position=int(det["rope"]["scale_position"]) - maxlen)
    return pyramid, interact


def check_interact(fx: Fixture) -> Iterator[Record]:
    c = fx.config
    config = _transformer_config(fx)
    weights = fx.path / "weights.safetensors"
    if not weights.is_file():
        raise FixtureError(f"{fx.path}: missing file weights.safetensors")
    model = load_official_transformer(read_official_transformer(weights), config).eval()
    pyramid, interact = _interact_config(fx)
    schedule = segment_schedule(pyramid, interact)

    # the segment: scales, steps (bits, repetitions, positions) and condition blocks
    yield _exact("scale_schedule", [list(s.shape) for s in schedule.scales], c["scale_schedule"])
    steps = fx.need("steps")
    yield _exact("n_steps", len(schedule.steps), len(steps))
    ours_steps, ref_steps = [], []
    for st, ref in zip(schedule.steps, steps):
        pos = visual_positions(st, schedule.full_hw, config.text_maxlen)
        t, h, w = st.scale.shape
        grid = pos.view(t, h, w, 4)
        ours_steps.append([st.scale.index, st.repetition, st.scale.bits, st.is_last_repetition,
                           int(pos[0, 0]), grid[:, 0, 0, 1].tolist(), grid[0, :, 0, 2].tolist(),
                           grid[0, 0, :, 3].tolist()])
        ref_steps.append([ref["scale_index"], ref["repetition"], ref["bits_per_token"], ref["last_repetition"],
                          ref["rope_scale_position"], ref["rope_frames"], ref["rope_height_index"],
                          ref["rope_width_index"]])
    yield _exact("steps/scale_repetition_bits_last_positions", ours_steps, ref_steps)
    yield from rope_table_records(fx, model, IO)

    previous, first = fx.tensor(IO, "input/former_latents"), fx.tensor(IO, "input/first_latent")
    maps = condition_maps(previous, first, schedule)
    for block in schedule.conditions:
        key = f"cond/{block.name}"
        yield compare(f"{key}/tokens", maps[block.name][0].flatten(1).T, fx.tensor(IO, f"{key}/tokens"))
        yield compare(f"{key}/positions", condition_positions(block, schedule.full_hw, config.text_maxlen).int(),
                      fx.tensor(IO, f"{key}/positions"))

    text = fx.tensor(IO, "text/kv_compact")
    yield compare("text/cfg_uncond_rows", model.null_text_features(text.shape[0]),
                  fx.tensor(IO, "text/cfg_uncond_rows"))
    caption = Caption(text[None])
    guidance = fx.need("guidance")
    if not guidance.get("use_cfg", 1) or guidance.get("use_apg", 0):
        raise FixtureError(f"{fx.path}: only plain CFG (use_cfg=1, use_apg=0) is pinned by this checker")
    run = dict(conditions=maps, guidance=Guidance([float(g) for g in guidance["cfg_list"]]),
               tau=[float(t) for t in guidance["tau_list"]], record_logits=True)

    # (b) teacher-forced clip: cond / uncond logits of every step (detail steps: the stored frames only)
    n = len(schedule.steps)
    teacher = [fx.tensor(IO, f"teacher_forced/step{i:03d}/bits") for i in range(n)]
    out = generate(model, schedule, caption, prefix_bits=teacher, **run)
    for i, (st, ref) in enumerate(zip(schedule.steps, steps)):
        frames = ref.get("stored_logit_frames", "all")
        for half in ("cond", "uncond"):
            key = f"teacher_forced/step{i:03d}/logits_{half}"
            ours = out.logits[i][half][0].flatten(-2)
            if frames != "all":
                ours = ours.view(st.scale.t, -1, ours.shape[-1])[frames].flatten(0, 1)
            yield compare(key, ours, fx.tensor(IO, key))

    # (c) greedy clip forced to the stored bits: our argmax agrees outside the listed near ties, and the summed codes
    g = fx.need("greedy")
    stored = [fx.tensor(IO, f"greedy/step{i:03d}/bits") for i in range(n)]
    out = generate(model, schedule, caption, prefix_bits=stored, **run)
    yield greedy_mismatch_record("greedy/argmax_mismatches_outside_near_ties",
                                 [out.logits[i]["guided"][0] for i in range(n)], stored, g.get("near_ties", []))
    yield compare("greedy/new_clip_codes", out.codes, fx.tensor(IO, "greedy/new_clip_codes"))

    # the segment loop: what is decoded and what the next segment is conditioned on (shapes; values by construction)
    seg = c.get("segment", {})
    if seg:
        window = decode_window(previous, out.codes)
        yield _exact("segment/decode_input_latents", list(window.shape), seg["decode_input_latents"])
        yield _exact("segment/returned_next_former_latents", list(next_previous(previous, out.codes).shape),
                     seg["returned_next_former_latents"])
        yield _exact("segment/frames_kept_after_decode", pyramid.temporal_compression * schedule.frames_per_clip,
                     seg["frames_kept_after_decode"])
