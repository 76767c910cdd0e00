"""scripts/direction_pilot.py: its videos move as their captions say, one fifth per motion."""
import json

import numpy as np
import pytest

from infinitystar.shapes.decoder import decode_video
from infinitystar.shapes.world import parse_caption


@pytest.fixture(scope="module")
def pilot(load_script):
    return load_script("scripts/direction_pilot.py")


def test_data_videos_move_as_captioned(tmp_path, pilot):
    for vary in (False, True):
        manifest = pilot.write_data(tmp_path / str(vary), n=10, seed=1, vary=vary)
        rows = [json.loads(l) for l in manifest.read_text().splitlines()]
        assert len(rows) == 10
        captions = [parse_caption(r["caption"]) for r in rows]
        assert [c.get("direction", "still") for c in captions] == list(pilot.DIRECTIONS) * 2
        if not vary:
            assert {(c["color"], c["shape"], c["size"], c["background"]) for c in captions} == {
                ("red", "square", "large", "black")}
        for r, c in zip(rows, captions):
            got = decode_video(np.load(r["video_path"]))
            assert got.direction == c.get("direction", "still") and got.color == c["color"]


def test_motion_only_captions_name_the_motion_of_the_video(tmp_path, pilot):
    manifest = pilot.write_data(tmp_path, n=5, seed=2, vary=True, words="motion")
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["moving left quickly", "moving right quickly", "moving up quickly",
                                            "moving down quickly", "standing still"]
    assert [decode_video(np.load(r["video_path"])).direction for r in rows] == list(pilot.DIRECTIONS)


def test_vary_only_keeps_the_other_attributes_and_skips_held_out_pairs(tmp_path, pilot):
    manifest = pilot.write_data(tmp_path, n=40, seed=3, vary=True, only=("color",))
    captions = [parse_caption(json.loads(l)["caption"]) for l in manifest.read_text().splitlines()]
    assert {(c["shape"], c["size"], c["background"]) for c in captions} == {("square", "large", "black")}
    colors = {c["color"] for c in captions}
    assert len(colors) > 3 and "cyan" not in colors          # cyan square is a held-out pair


def test_vary_only_needs_vary_and_known_attributes(tmp_path, capsys, pilot):
    for args in (["--vary-only", "color"], ["--vary", "--vary-only", "colour"]):
        with pytest.raises(SystemExit):
            pilot.main(["data", str(tmp_path), *args])
        assert "--vary-only takes color, shape, size, background and needs --vary" in capsys.readouterr().err


def test_images_show_what_their_captions_say(tmp_path, pilot):
    manifest = pilot.write_data(tmp_path, n=12, seed=4, vary=True, only=("shape", "size"), images=True)
    assert manifest.name == "images.jsonl"
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    from infinitystar.media import load_image
    from infinitystar.shapes.decoder import decode_frame
    seen = set()
    for r in rows:
        c = parse_caption(r["text"])
        got = decode_frame(load_image(r["image_path"]))
        assert (got.color, got.shape, got.size, got.background) == (c["color"], c["shape"], c["size"],
                                                                     c["background"])
        assert (c["color"], c["background"]) == ("red", "black") and c.get("direction") is None
        seen.add((c["shape"], c["size"]))
    assert len(seen) >= 4


def test_images_take_no_motion_options(tmp_path, capsys, pilot):
    with pytest.raises(SystemExit):
        pilot.main(["data", str(tmp_path), "--images", "--words", "motion"])
    assert "--images takes neither --words motion nor --i2v" in capsys.readouterr().err
