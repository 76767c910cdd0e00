"""Shapes World: exact geometry, render->decode round trips, splits, captions, datasets, scoring."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from infinitystar.media import export_to_video, load_video

from infinitystar.shapes import data as sdata
from infinitystar.shapes.decoder import (
    decode_frame, decode_segments, decode_video, label_components, segment_range,
)
from infinitystar.shapes.evaluate import aggregate, save_grid, score, score_image, score_video
from infinitystar.shapes.world import (
    BACKGROUNDS, CANVAS, COLORS, DIRECTION_NAMES, HELD_OUT_PAIRS, MOVING_DIRECTIONS, PALETTE, SHAPES,
    SIZE_NAMES, SPEED_NAMES, Motion, ShapeSpec, caption_for, caption_image, caption_video,
    captions_per_segment, centres, fits_canvas, parse_caption, render, sample_image, sample_long_video,
    sample_video, shape_mask,
)


# ------------------------------------------------------------------------------------------- constants


def test_constants_match_the_spec():
    assert BACKGROUNDS == {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
    assert PALETTE == {"red": (230, 40, 40), "green": (40, 190, 70), "blue": (40, 90, 230),
                       "yellow": (240, 210, 40), "purple": (160, 60, 200), "cyan": (40, 200, 210)}
    assert HELD_OUT_PAIRS == {("purple", "triangle"), ("yellow", "circle"), ("cyan", "square")}


# ------------------------------------------------------------------------------------ exact geometry


def _box(mask):
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


def test_square_pixel_counts_by_parity():
    # integer centre 32: pixel centres x+0.5 in [26, 38] -> x = 26..37, 12 columns
    m = shape_mask("square", "small", 32, 32)
    assert m.sum() == 144 and _box(m) == (26, 26, 37, 37)
    # half-integer centre 32.5: x+0.5 in [26.5, 38.5] -> x = 26..38, 13 columns (edge pixels included)
    m = shape_mask("square", "small", 32.5, 32.5)
    assert m.sum() == 169 and _box(m) == (26, 26, 38, 38)
    m = shape_mask("square", "large", 32, 32)
    assert m.sum() == 400 and _box(m) == (22, 22, 41, 41)
    m = shape_mask("square", "large", 32.5, 32)
    assert m.sum() == 21 * 20


def test_circle_pixel_count_by_hand():
    # offsets of pixel centres are +-0.5 .. +-5.5; per |v| the |u| with u^2 + v^2 <= 36:
    # |v|=0.5,1.5 -> |u|<=5.5 (12 px); 2.5,3.5 -> 4.5 (10); 4.5 -> 3.5 (8); 5.5 -> 1.5 (4); x2 halves
    m = shape_mask("circle", "small", 32, 32)
    assert m.sum() == 2 * (12 + 12 + 10 + 10 + 8 + 4) == 112
    rows = m.sum(axis=1)
    assert rows[26:38].tolist() == [4, 8, 10, 10, 12, 12, 12, 12, 10, 10, 8, 4]


def test_triangle_pixel_counts_with_edge_pixels():
    # apex (32, 26), base y = 38; row with centre Y has half-width (Y - 26)/2.
    # Y = 26.5 -> 0.25: no half-integer offset fits -> 0 px; then 2,2,4,4,...,12
    m = shape_mask("triangle", "small", 32, 32)
    rows = m.sum(axis=1)
    assert rows[26:38].tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12]
    assert m.sum() == 72 and _box(m) == (27, 26, 37, 37)
    # half-integer centre: apex pixel centre lies exactly on the apex, and each row's end pixels lie
    # exactly on the slanted edges (half-width (Y - 26.5)/2 = 0, 0.5, 1, ...): 1,1,3,3,...,11,11,13
    m = shape_mask("triangle", "small", 32.5, 32.5)
    rows = m.sum(axis=1)
    assert rows[26:39].tolist() == [1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13]
    assert m.sum() == 85 and m[26, 32] and not m[26, 31] and not m[26, 33]
    assert m[28, 31] and m[28, 33] and not m[28, 30]  # Y = 28.5: half-width 1, ends exactly on the edges


def test_renderer_has_no_antialiasing_and_exact_colours():
    spec = ShapeSpec("purple", "circle", "large", "gray", 20, 30, (Motion("right", "slowly"),))
    v = render(spec, 17)
    colours = {tuple(c) for c in v.reshape(-1, 3).tolist()}
    assert colours == {PALETTE["purple"], BACKGROUNDS["gray"]}
    assert v.shape == (17, 64, 64, 3) and v.dtype == np.uint8
    assert np.array_equal(centres(spec, 17)[[0, 16]], [[20, 30], [36, 30]])


def test_renderer_refuses_to_clip_and_non_half_integer_centres():
    with pytest.raises(ValueError, match="leaves the canvas"):
        render(ShapeSpec("red", "square", "large", "black", 40, 32, (Motion("right", "quickly"),)), 17)
    with pytest.raises(ValueError, match="multiple of 0.5"):
        ShapeSpec("red", "square", "large", "black", 32.25, 32)
    with pytest.raises(ValueError, match="speed"):
        Motion("left", None)
    with pytest.raises(ValueError, match="unknown color"):
        ShapeSpec("pink", "square", "large", "black", 32, 32)


# ------------------------------------------------------------------------------- render -> decode


def _static_ok(d, spec):
    return (d.background, d.color, d.shape, d.size) == (spec.background, spec.color, spec.shape, spec.size)


def test_images_decode_exactly():
    rng = np.random.default_rng(0)
    for _ in range(400):
        spec = sample_image(rng, "all")
        d = decode_frame(render(spec, 1)[0])
        assert _static_ok(d, spec), (spec, d)


@pytest.mark.parametrize("num_frames,count", [(17, 150), (33, 60)])
def test_single_caption_videos_decode_exactly(num_frames, count):
    rng = np.random.default_rng(num_frames)
    seen_speeds = set()
    for _ in range(count):
        spec = sample_video(rng, num_frames, "all")
        (m,) = spec.segments
        seen_speeds.add(m.speed)
        d = decode_video(render(spec, num_frames))
        assert _static_ok(d, spec) and (d.direction, d.speed) == (m.direction, m.speed), (spec, d.to_dict())
        assert d.consistency == 1.0
    expected = {None, "slowly", "quickly"} if num_frames == 17 else {None, "slowly"}
    assert seen_speeds == expected


@pytest.mark.parametrize("num_frames,count", [(65, 60), (49, 20), (33, 20)])
def test_long_videos_decode_exactly_per_segment(num_frames, count):
    rng = np.random.default_rng(100 + num_frames)
    for _ in range(count):
        spec = sample_long_video(rng, num_frames, "all")
        assert len(spec.segments) == (num_frames - 1) // 16
        v = render(spec, num_frames)
        for k, (m, d) in enumerate(zip(spec.segments, decode_segments(v))):
            assert _static_ok(d, spec) and (d.direction, d.speed) == (m.direction, m.speed), (k, spec)
            a, b = segment_range(k, num_frames)
            assert decode_video(v, a, b).direction == m.direction


def test_long_video_motion_is_continuous_and_per_segment():
    spec = ShapeSpec("red", "circle", "small", "black", 10, 40,
                     (Motion("right", "slowly"), Motion("up", "slowly"), Motion("right", "quickly"),
                      Motion("still")))
    c = centres(spec, 65)
    assert c[16].tolist() == [26, 40] and c[32].tolist() == [26, 24] and c[48].tolist() == [58, 24]
    assert c[64].tolist() == [58, 24]
    assert np.abs(np.diff(c, axis=0)).max() == 2  # no jumps between segments
    with pytest.raises(ValueError, match="describes exactly 65 frames"):
        centres(spec, 49)


def test_objects_never_leave_the_canvas():
    rng = np.random.default_rng(7)
    samplers = [lambda: (sample_image(rng, "all"), 1), lambda: (sample_video(rng, 17, "all"), 17),
                lambda: (sample_video(rng, 33, "all"), 33), lambda: (sample_long_video(rng, 65, "all"), 65)]
    for draw in samplers * 150:
        spec, T = draw()
        c, s = centres(spec, T), spec.half_extent
        assert (c - s >= 0).all() and (c + s <= CANVAS).all() and fits_canvas(spec, T)
        assert float(spec.cx0).is_integer() and float(spec.cy0).is_integer()  # the documented integer grid


def test_start_positions_cover_the_valid_range():
    rng = np.random.default_rng(11)
    xs = {sample_image(rng, "all").cx0 for _ in range(3000)}
    assert min(xs) == 6 and max(xs) == 58  # small objects reach both edges; nothing outside [s, 64-s]


# ---------------------------------------------------------------------------------------- splits


def test_heldout_pairs_never_in_train_and_only_in_heldout():
    rng = np.random.default_rng(1)
    train_pairs, heldout_pairs = set(), set()
    for _ in range(1500):
        for spec in (sample_image(rng, "train"), sample_video(rng, 17, "train"), sample_long_video(rng, 65, "train")):
            train_pairs.add((spec.color, spec.shape))
        for spec in (sample_image(rng, "heldout"), sample_video(rng, 17, "heldout")):
            heldout_pairs.add((spec.color, spec.shape))
    assert not train_pairs & HELD_OUT_PAIRS
    assert len(train_pairs) == 18 - 3
    assert heldout_pairs == HELD_OUT_PAIRS
    for _ in range(300):
        spec = sample_video(rng, 17, "heldout")
        assert (spec.color, spec.shape) in HELD_OUT_PAIRS
    with pytest.raises(ValueError, match="unknown split"):
        sample_image(rng, "test")


def test_samplers_are_reproducible():
    a = [sample_long_video(np.random.default_rng(5), 65) for _ in range(3)]
    b = [sample_long_video(np.random.default_rng(5), 65) for _ in range(3)]
    assert a == b


# -------------------------------------------------------------------------------------- captions


def test_caption_templates_are_exact():
    spec = ShapeSpec("red", "circle", "large", "black", 20, 20, (Motion("right", "quickly"),))
    assert caption_video(spec) == "a large red circle moving right quickly on a black background"
    still = ShapeSpec("cyan", "triangle", "small", "gray", 20, 20, (Motion("still"),))
    assert caption_video(still) == "a small cyan triangle standing still on a gray background"
    assert caption_image(still) == "a small cyan triangle on a gray background"
    long = ShapeSpec("blue", "square", "small", "white", 20, 40, (Motion("right", "slowly"), Motion("up", "slowly")))
    assert captions_per_segment(long) == ["a small blue square moving right slowly on a white background",
                                          "a small blue square moving up slowly on a white background"]


def test_parse_caption_round_trips_every_caption():
    motions = [("still", None)] + list(itertools.product(MOVING_DIRECTIONS, SPEED_NAMES)) + [(None, None)]
    n = 0
    for size, color, shape, bg, (direction, speed) in itertools.product(SIZE_NAMES, COLORS, SHAPES, BACKGROUNDS, motions):
        text = caption_for(size, color, shape, bg, direction, speed)
        p = parse_caption(text)
        assert (p["size"], p["color"], p["shape"], p["background"], p["direction"], p["speed"]) == \
            (size, color, shape, bg, direction, speed)
        assert p["kind"] == ("image" if direction is None else "still" if direction == "still" else "moving")
        assert caption_for(p["size"], p["color"], p["shape"], p["background"], p["direction"], p["speed"]) == text
        n += 1
    assert n == 2 * 6 * 3 * 3 * 10
    assert set(DIRECTION_NAMES) == {"left", "right", "up", "down", "still"}


@pytest.mark.parametrize("bad", [
    "a large red circle moving right quickly on a black background.",
    "A large red circle on a black background",
    "a large red  circle on a black background",
    "a huge red circle on a black background",
    "a large pink circle on a black background",
    "a large red circle moving right on a black background",
    "a large red circle moving still slowly on a black background",
    "a large red circle standing still quickly on a black background",
    "a cat on a mat",
    "",
])
def test_parse_caption_rejects_other_text(bad):
    with pytest.raises(ValueError, match="not a Shapes World caption"):
        parse_caption(bad)


# --------------------------------------------------------------------------------------- decoder


def test_connected_components_are_4_connected():
    m = np.zeros((6, 6), dtype=bool)
    m[0, 0] = m[1, 1] = True  # diagonal only: two components
    m[3:5, 2:6] = True
    m[5, 5] = True
    lab = label_components(m)
    assert lab[0, 0] != lab[1, 1]
    assert len(set(lab[m].tolist())) == 3
    rng = np.random.default_rng(0)
    for _ in range(20):  # label constant within 4-neighbours, differs across touching-free pixels
        m = rng.random((32, 32)) < 0.55
        lab = label_components(m)
        both = m[:, 1:] & m[:, :-1]
        assert (lab[:, 1:][both] == lab[:, :-1][both]).all()
        both = m[1:, :] & m[:-1, :]
        assert (lab[1:, :][both] == lab[:-1, :][both]).all()
    try:
        from scipy import ndimage
    except ImportError:
        return
    for _ in range(20):
        m = rng.random((64, 64)) < rng.random()
        lab = label_components(m)
        ref, n = ndimage.label(m)
        assert len(set(zip(lab[m].tolist(), ref[m].tolist()))) == n == len(set(lab[m].tolist()))


def test_decoder_handles_empty_frames_and_noise():
    empty = np.zeros((64, 64, 3), dtype=np.uint8)
    d = decode_frame(empty)
    assert d.background == "black" and not d.has_object
    spec = ShapeSpec("green", "square", "small", "white", 32, 32, (Motion("down", "slowly"),))
    v = render(spec, 17)
    v[5:] = 255  # object vanishes after frame 4
    dv = decode_video(v)
    assert dv.color == "green" and dv.consistency == pytest.approx(5 / 17)
    tiny = np.full((64, 64, 3), 128, dtype=np.uint8)
    tiny[10:13, 10:13] = PALETTE["red"]  # 9 px < 12: no object
    assert not decode_frame(tiny).has_object


# -------------------------------------------------------------------------------------- datasets


@pytest.mark.parametrize("video_format", ["mp4", "npy"])
def test_write_dataset_manifests_and_exact_round_trip(tmp_path, video_format):
    if video_format == "mp4":
        pytest.importorskip("av")
    pytest.importorskip("PIL")
    out = tmp_path / "ds"
    manifests = sdata.write_dataset(out, n_images=3, n_videos=4, n_long=2, seed=3, split="train",
                                    video_format=video_format, relative_paths=(video_format == "npy"))
    assert set(manifests) == {"image", "video", "long"}
    raw = [json.loads(line) for line in manifests["video"].read_text().splitlines()]
    assert len(raw) == 4
    for line in sdata.load_manifest(manifests["video"]):
        assert {"video_path", "begin_frame_id", "end_frame_id", "fps", "caption", "tarsier2_caption"} <= set(line)
        assert line["begin_frame_id"] == 0 and line["fps"] == 16 and line["end_frame_id"] in (17, 33)
        assert line["tarsier2_caption"] == line["caption"]
        spec = ShapeSpec.from_dict(line["shapes"])
        assert line["caption"] == caption_video(spec)
        frames = sdata.load_media(line)
        assert frames.dtype == np.uint8 and np.array_equal(frames, render(spec, line["end_frame_id"]))
        assert not spec.is_heldout
    for line in sdata.load_manifest(manifests["long"]):
        spec = ShapeSpec.from_dict(line["shapes"])
        assert line["captions_per_segment"] == captions_per_segment(spec)
        assert line["caption"] == line["tarsier2_caption"] == line["captions_per_segment"][0]
        assert len(line["captions_per_segment"]) == (line["end_frame_id"] - 1) // 16
        assert np.array_equal(sdata.load_media(line), render(spec, line["end_frame_id"]))
    for line in sdata.load_manifest(manifests["image"]):
        assert {"image_path", "text", "long_caption"} <= set(line)
        spec = ShapeSpec.from_dict(line["shapes"])
        assert line["text"] == line["long_caption"] == caption_image(spec)
        assert np.array_equal(sdata.load_media(line), render(spec, 1))
    # same seed, same data; the image stream does not depend on how many videos are written
    again = sdata.write_dataset(tmp_path / "again", n_images=3, seed=3, video_format=video_format)
    first = [ShapeSpec.from_dict(x["shapes"]) for x in sdata.load_manifest(manifests["image"])]
    second = [ShapeSpec.from_dict(x["shapes"]) for x in sdata.load_manifest(again["image"])]
    assert first == second


def test_mp4_is_lossless_on_arbitrary_pixels(tmp_path):
    pytest.importorskip("av")
    noise = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    p = export_to_video(noise, tmp_path / "noise.mp4", lossless=True)
    assert np.array_equal(load_video(p), noise)


def test_iter_samples():
    it = sdata.iter_samples(seed=1, kinds=("image", "video", "long"), split="heldout",
                            video_frames=(17, 33), long_frames=(33, 65), limit=12)
    samples = list(it)
    assert len(samples) == 12
    for s in samples:
        assert s["frames"].dtype == np.uint8 and s["frames"].shape == (s["num_frames"], 64, 64, 3)
        assert s["heldout"] and s["caption"] == s["captions"][0]
        if s["kind"] == "long":
            assert len(s["captions"]) == (s["num_frames"] - 1) // 16
    again = list(sdata.iter_samples(seed=1, kinds=("image", "video", "long"), split="heldout",
                                    video_frames=(17, 33), long_frames=(33, 65), limit=12))
    assert [s["caption"] for s in samples] == [s["caption"] for s in again]


# -------------------------------------------------------------------------------------- evaluation


def test_scoring_ground_truth_is_perfect_and_errors_are_caught(tmp_path):
    rng = np.random.default_rng(2)
    scores = []
    for split in ("train", "heldout"):
        for _ in range(4):
            img = sample_image(rng, split)
            scores.append(score_image(render(img, 1)[0], caption_image(img)))
            vid = sample_video(rng, 17, split)
            v = render(vid, 17)
            scores.append(score_video(v, caption_video(vid)))
            scores.append(score_video(v, caption_video(vid), condition_frames=v[:1]))
            cont = sample_video(rng, 33, split)
            c = render(cont, 33)
            scores.append(score_video(c, caption_video(cont), condition_frames=c[:17]))
            lv = sample_long_video(rng, 65, split)
            scores.append(score(render(lv, 65), captions_per_segment(lv)))
    assert all(s.all_correct for s in scores)
    agg = aggregate(scores)
    assert agg["seen"]["n"] == agg["heldout"]["n"] == 20
    assert agg["overall"]["all_correct"] == 1.0 and agg["overall"]["consistency"] == 1.0
    assert set(agg["by_task"]) == {"t2i", "t2v", "i2v", "continuation", "long"}

    # wrong words are caught attribute by attribute
    spec = ShapeSpec("red", "circle", "large", "black", 20, 32, (Motion("right", "quickly"),))
    v = render(spec, 17)
    s = score_video(v, "a large red square moving right slowly on a black background")
    assert not s.all_correct and not s.correct["shape"] and not s.correct["speed"]
    assert s.correct["color"] and s.correct["direction"] and s.split == "seen"
    # a wrong segment in a long video
    lv = ShapeSpec("yellow", "circle", "small", "gray", 10, 40, (Motion("right", "slowly"), Motion("up", "slowly")))
    s = score_video(render(lv, 33), ["a small yellow circle moving right slowly on a gray background",
                                     "a small yellow circle moving down slowly on a gray background"])
    assert s.split == "heldout" and not s.correct["direction"] and s.extra["segment_motion_accuracy"] == 0.5
    # a continuation that ignores its conditioning frames
    other = render(ShapeSpec("red", "circle", "large", "black", 40, 32, (Motion("still"),)), 33)
    cond = render(ShapeSpec("red", "circle", "large", "black", 12, 32, (Motion("right", "slowly"),)), 17)
    s = score_video(other, "a large red circle standing still on a black background", condition_frames=cond)
    assert s.task == "continuation" and not s.correct["condition"] and s.extra["condition_mae"] > 0
    with pytest.raises(ValueError, match="one object per video"):
        score_video(render(lv, 33), ["a small yellow circle moving right slowly on a gray background",
                                     "a large yellow circle moving up slowly on a gray background"])

    png = save_grid(tmp_path / "grid.png", [render(lv, 33), render(spec, 17), render(spec, 1)[0]],
                    ["long", "video", "image"])
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] > 64 and im.size[1] > 64
