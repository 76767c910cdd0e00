"""The evaluation harness, driven by oracle generators (no model): a perfect renderer must score 100%."""
import dataclasses
import json

import pytest

from infinitystar.shapes.benchmark import ROUND_SEED_STRIDE, TASK_FRAMES, build_items, evaluate
from infinitystar.shapes.world import render


def oracle(items, seed):
    return [render(it.spec, it.num_frames) for it in items]


def recolour(items, seed):
    out = []
    for it in items:
        colour = "red" if it.spec.color != "red" else "blue"
        out.append(render(dataclasses.replace(it.spec, color=colour), it.num_frames))
    return out


def test_oracle_scores_perfectly_and_writes_outputs(tmp_path):
    res = evaluate(oracle, n_per_task=12, seed=3, batch_size=5, out_dir=tmp_path, progress=False)
    for task, r in res["by_task"].items():
        assert r["overall"]["all_correct"] == 1.0, (task, r)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["by_task"].keys() == set(TASK_FRAMES)
    assert (tmp_path / "grid.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 * len(TASK_FRAMES)
    t2i = [s for s in samples if s["task"] == "t2i"]
    assert all(s["all_correct"] and s["decoded"]["shape"] in s["prompts"][0] for s in t2i)
    assert all(len(s["decoded"]["segments"]) == 2 for s in samples if s["task"] == "long")


def test_wrong_colour_is_caught():
    res = evaluate(recolour, n_per_task=6, seed=0, tasks=("t2v", "t2i"), progress=False)
    assert res["by_task"]["t2v"]["overall"]["all_correct"] == 0.0
    assert res["by_task"]["t2i"]["overall"]["all_correct"] == 0.0


def test_items_are_seeded_and_cover_heldout_pairs():
    a, b = build_items("long", 40, seed=1), build_items("long", 40, seed=1)
    assert [x.prompts for x in a] == [x.prompts for x in b]
    assert all(len(x.prompts) == 2 and x.prompts[0] != x.prompts[1] for x in a)
    t2v = build_items("t2v", 200, seed=0)
    assert any(x.spec.is_heldout for x in t2v) and not all(x.spec.is_heldout for x in t2v)
    cont = build_items("continuation", 5, seed=0)
    assert all(x.condition.shape == (17, 64, 64, 3) and x.num_frames == 33 for x in cont)


def test_start_leaves_room_tells_a_cramped_start_from_a_good_one():
    from infinitystar.shapes.evaluate import score_video
    from infinitystar.shapes.world import Motion, ShapeSpec
    quick = "a large red circle moving right quickly on a black background"
    good = ShapeSpec("red", "circle", "large", "black", 16.0, 32.0, (Motion("right", "quickly"),))
    s = score_video(render(good, 17), quick)
    assert s.all_correct and s.extra["start_leaves_room"] == 1.0
    # the same object moving right slowly from the middle: too little room for the quick move the prompt asks
    cramped = dataclasses.replace(good, cx0=34.0, segments=(Motion("right", "slowly"),))
    s = score_video(render(cramped, 17), quick)
    assert s.extra["start_leaves_room"] == 0.0 and not s.correct["speed"]
    still = "a large red circle standing still on a black background"
    assert "start_leaves_room" not in score_video(render(dataclasses.replace(good, segments=(Motion("still", None),)),
                                                         17), still).extra
    res = evaluate(oracle, n_per_task=8, seed=0, tasks=("t2v",), progress=False)
    assert res["by_task"]["t2v"]["overall"]["start_leaves_room"] == 1.0


def test_later_segment_start_leaves_room_tells_a_cramped_switch_from_a_good_one():
    from infinitystar.shapes.evaluate import score_video
    from infinitystar.shapes.world import Motion, ShapeSpec, captions_per_segment
    # right slowly (16 px), then left quickly (32 px): from x 30 the switch happens at x 46, room for the move
    good = ShapeSpec("red", "circle", "large", "black", 30.0, 32.0,
                     (Motion("right", "slowly"), Motion("left", "quickly")))
    s = score_video(render(good, 33), captions_per_segment(good))
    assert s.all_correct and s.extra["later_segment_start_leaves_room"] == 1.0
    # prompted right quickly, then right quickly again: the video that moves right quickly from x 16 reaches x 48
    # by the switch, where the second 32 px no longer fit; its second segment cannot move as prompted
    prompts = captions_per_segment(dataclasses.replace(good, segments=(Motion("right", "quickly"),) * 2))
    drawn = dataclasses.replace(good, cx0=16.0, segments=(Motion("right", "quickly"), Motion("still", None)))
    s = score_video(render(drawn, 33), prompts)
    assert s.extra["later_segment_start_leaves_room"] == 0.0 and not s.correct["speed"]
    res = evaluate(oracle, n_per_task=8, seed=0, tasks=("long",), progress=False)
    assert res["by_task"]["long"]["overall"]["later_segment_start_leaves_room"] == 1.0


def test_segment_breakdown_groups_segments_by_place_motion_and_room():
    from infinitystar.shapes.evaluate import score_video, segment_breakdown
    from infinitystar.shapes.world import Motion, ShapeSpec, captions_per_segment
    good = ShapeSpec("red", "circle", "large", "black", 30.0, 32.0,
                     (Motion("right", "slowly"), Motion("left", "quickly")))
    ok = score_video(render(good, 33), captions_per_segment(good))
    # prompted right quickly twice, drawn right quickly then still: the second start (x 48) leaves no room
    prompts = captions_per_segment(dataclasses.replace(good, segments=(Motion("right", "quickly"),) * 2))
    drawn = dataclasses.replace(good, cx0=16.0, segments=(Motion("right", "quickly"), Motion("still", None)))
    cramped = score_video(render(drawn, 33), prompts)
    still = dataclasses.replace(good, segments=(Motion("still", None), Motion("left", "slowly")))
    held = score_video(render(still, 33), captions_per_segment(still))
    assert segment_breakdown([ok, cramped, held]) == {
        "first quickly, room": {"n": 1, "moved": 1}, "first slowly, room": {"n": 1, "moved": 1},
        "first still": {"n": 1, "moved": 1}, "later quickly, no room": {"n": 1, "moved": 0},
        "later quickly, room": {"n": 1, "moved": 1}, "later slowly, room": {"n": 1, "moved": 1}}
    res = evaluate(oracle, n_per_task=8, seed=0, tasks=("long",), progress=False)
    groups = res["by_task"]["long"]["segments"]
    assert sum(g["n"] for g in groups.values()) == 16 and all(g["moved"] == g["n"] for g in groups.values())


def test_several_samples_per_prompt_average_every_round(tmp_path):
    # right in round 0, wrong colour in round 1: the mean is one half, and every prompt has a right sample
    def alternate(items, seed):
        return (oracle if seed < ROUND_SEED_STRIDE else recolour)(items, seed)

    seeds = []
    res = evaluate(lambda items, seed: seeds.append(seed) or alternate(items, seed), n_per_task=6, seed=2,
                   tasks=("t2i",), batch_size=4, out_dir=tmp_path, progress=False, samples_per_prompt=2)
    t2i = res["by_task"]["t2i"]
    assert t2i["overall"]["all_correct"] == 0.5
    assert t2i["all_correct_per_round"] == [1.0, 0.0]
    assert t2i["prompts_with_a_correct_sample"] == 1.0
    assert res["samples_per_prompt"] == 2 and res["timings"]["t2i"]["samples"] == 12
    # round 0 keeps the single-sample seeds, so one sample per prompt is unchanged by the option
    single = []
    evaluate(lambda items, seed: single.append(seed) or oracle(items, seed), n_per_task=6, seed=2, tasks=("t2i",),
             batch_size=4, progress=False)
    assert seeds[:2] == single and len(set(seeds)) == 4
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0] * 6 + [1] * 6
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate(oracle, n_per_task=2, tasks=("t2i",), progress=False, samples_per_prompt=0)
