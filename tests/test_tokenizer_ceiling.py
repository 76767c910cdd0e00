"""scripts/tokenizer_ceiling.py: the 2x-enlarged round trip comes back to the frame it started from."""
import numpy as np
import pytest


@pytest.fixture(scope="module")
def ceiling(load_script):
    return load_script("scripts/tokenizer_ceiling.py")


def test_shrink_undoes_pixel_copies_and_averages_blocks(ceiling):
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    big = frames.repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(ceiling.shrink(big, 2), frames)
    assert ceiling.shrink(frames, 1) is frames
    block = np.array([[0, 10], [20, 31]], dtype=np.uint8)[None, :, :, None].repeat(3, axis=3)
    assert ceiling.shrink(block, 2)[0, 0, 0].tolist() == [15, 15, 15]      # 61 / 4 = 15.25


def test_upscale_must_be_positive(capsys, ceiling):
    with pytest.raises(SystemExit):
        ceiling.main(["some/folder", "--upscale", "0"])
    assert "--upscale must be a positive integer, got 0" in capsys.readouterr().err
