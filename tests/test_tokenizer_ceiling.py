"""scripts/tokenizer_ceiling.py: the 2x-enlarged round trip comes back to the frame it started from."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "tokenizer_ceiling.py"


def _script():
    spec = importlib.util.spec_from_file_location("tokenizer_ceiling", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shrink_undoes_pixel_copies_and_averages_blocks():
    ceiling = _script()
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    big = frames.repeat(2, axis=1).repeat(2, axis=2)
    assert np.array_equal(ceiling.shrink(big, 2), frames)
    assert ceiling.shrink(frames, 1) is frames
    block = np.array([[0, 10], [20, 31]], dtype=np.uint8)[None, :, :, None].repeat(3, axis=3)
    assert ceiling.shrink(block, 2)[0, 0, 0].tolist() == [15, 15, 15]      # 61 / 4 = 15.25


def test_upscale_must_be_positive(capsys):
    ceiling = _script()
    with pytest.raises(SystemExit):
        ceiling.main(["some/folder", "--upscale", "0"])
    assert "--upscale must be a positive integer, got 0" in capsys.readouterr().err
