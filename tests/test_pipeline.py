"""The pipeline and the generate command, on a tiny random-weight model (every code path, no quality claims)."""
import json
import re

import numpy as np
import pytest
import torch

from infinitystar.cli import main as cli_main
from infinitystar.media import load_video
from infinitystar.pipelines.infinitystar import InfinityStarPipeline


@pytest.fixture(scope="module")
def pipe():
    return InfinityStarPipeline.random_tiny(seed=0)


def test_tasks_shapes_and_seeds(pipe):
    g = lambda s: torch.Generator().manual_seed(s)
    a = pipe("a large red circle moving right quickly on a black background", num_frames=17, generator=g(1))
    b = pipe("a large red circle moving right quickly on a black background", num_frames=17, generator=g(1))
    assert a.frames[0].shape == (17, 64, 64, 3) and a.frames[0].dtype == np.uint8
    assert np.array_equal(a.frames[0], b.frames[0])
    t2i = pipe(["a red circle on a black background", "a blue square on a white background"], num_frames=1)
    assert len(t2i.images) == 2 and t2i.images[0].shape == (64, 64, 3)
    story = pipe([["a red circle moving right slowly on a black background",
                   "a red circle moving up slowly on a black background"]], num_frames=33)
    assert story.frames[0].shape == (33, 64, 64, 3)


def test_conditioning_inputs(pipe):
    with pytest.warns(UserWarning, match="resized to the model's 64x64"):
        out = pipe("a red circle", num_frames=17, image=np.zeros((32, 48, 3), np.uint8))
    assert out.frames[0].shape == (17, 64, 64, 3)
    out = pipe(["a red circle"] * 2, num_frames=33, video=[np.zeros((17, 64, 64, 3), np.uint8)] * 2)
    assert len(out.frames) == 2 and out.frames[1].shape == (33, 64, 64, 3)
    with pytest.raises(ValueError, match="continuation needs at least 17 frames"):
        pipe("a red circle", num_frames=33, video=np.zeros((9, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="nothing left to generate"):
        pipe("a red circle", num_frames=17, video=np.zeros((17, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="empty prompt"):
        pipe("", num_frames=1)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        pipe("a red circle", num_frames=16)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    again = InfinityStarPipeline.from_pretrained(tmp_path / "model")
    g = lambda: torch.Generator().manual_seed(3)
    assert np.array_equal(pipe("a red circle", num_frames=5, generator=g()).frames[0],
                          again("a red circle", num_frames=5, generator=g()).frames[0])
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        InfinityStarPipeline.from_pretrained(tmp_path)


def test_generate_command(tmp_path, capsys, pipe):
    out = tmp_path / "v.mp4"
    assert cli_main(["generate", "--prompt", "a red circle moving left slowly on a gray background",
                     "--out", str(out), "--frames", "9", "--json", "--seed", "4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["frames"] == 9 and summary["seed"] == 4 and summary["output"] == str(out)
    assert load_video(out).shape == (9, 64, 64, 3)
    png = tmp_path / "i.png"
    assert cli_main(["generate", "--prompt", "a red circle", "--out", str(png)]) == 0 and png.is_file()
    capsys.readouterr()
    assert cli_main(["generate", "--prompt", "x", "--out", str(tmp_path / "missing" / "v.mp4")]) == 2
    assert re.fullmatch(r"error: output folder .* does not exist\n", capsys.readouterr().err)
    assert cli_main(["generate", "--prompt", " ", "--out", str(out)]) == 2
    assert "non-empty --prompt" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*"))            # no temporary files left behind
