import pytest

from infinitystar.schedules import dynamic_resolution as dr
from infinitystar.schedules.pyramid import PyramidConfig, Schedule, latent_frames, pyramid_preset


def test_frame_count_must_be_1_plus_4k():
    assert latent_frames(81) == 21 and latent_frames(1) == 1
    with pytest.raises(ValueError, match=r"1 \+ 4k.*got 80; use 77 or 81"):
        latent_frames(80)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pyramid_preset("480p").build(16)


def test_unknown_pixel_budget_and_far_aspect_ratio():
    with pytest.raises(ValueError, match="unknown pixel budget '0.5M'"):
        PyramidConfig(pn="0.5M")
    with pytest.raises(ValueError, match="far from every template"):
        dr.nearest_template(10.0)
    assert dr.nearest_template(720 / 1280) == 0.562
    assert dr.nearest_template(1.0) == 1.0


def test_released_step_counts():
    assert len(pyramid_preset("480p").build(81).steps) == 81
    assert len(pyramid_preset("480p").build(161).steps) == 120
    assert len(pyramid_preset("720p").build(81).steps) == 85
    s = pyramid_preset("720p").build(81)
    assert [x.bits for x in s.clip_scales(0)] == [16] * 12 + [64] * 3


def test_partial_last_clip_keeps_its_own_size():
    # 8 + 3 latent frames after the image: one full clip of 8 and a partial one of 3 (official inference would
    # have resized the full clip to the partial clip's length)
    s = Schedule([(1, 1), (2, 2)], 12, 8, [1, 1], [1, 1], 100)
    assert s.clips == [(0, 1), (1, 8), (9, 3)]
    assert s.clip_size(1) == (8, 2, 2) and s.clip_size(2) == (3, 2, 2)
    assert [x.shape for x in s.clip_scales(2)] == [(3, 1, 1), (3, 2, 2)]
    assert s.scales[-1].frame_start == 9 and s.scales[-1].frame_end == 12


def test_custom_scales_repetitions_and_refs():
    p = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4]], frames_per_clip=4,
                      image_repetition=[2, 1, 1], video_repetition=[3, 2, 1], detail_min_tokens=16)
    s = p.build(17)                       # T_lat 5: image + one clip of 4
    assert [x.shape for x in s.scales] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (4, 1, 1), (4, 2, 2), (4, 4, 4)]
    assert [x.bits for x in s.scales] == [16, 16, 64] * 2
    assert [(st.scale.index, st.repetition) for st in s.steps] == [
        (0, 0), (0, 1), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (4, 0), (4, 1), (5, 0)]
    assert [s.refs(i) for i in range(6)] == [[], [], [], [2], [2], [2]]
    dense = p.build(17, attention="dense")
    assert dense.refs(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="video_repetition must list 3"):
        PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [4, 4]], video_repetition=[1, 1])


def test_last_reference_table_sparse():
    s = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2]], frames_per_clip=1).build(13)   # 4 clips
    # each clip's last scale is read by the next clip only
    assert s.last_reference == {1: 3, 3: 5, 5: 7}
