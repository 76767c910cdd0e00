"""`infinitystar tokenizer derive`: the same weights with another pixel_repeat or pyramid."""
import json

import torch

from infinitystar.cli import main
from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig


def _folder(tmp_path):
    torch.manual_seed(0)
    cfg = VideoVAEConfig(block_out_channels=(4, 8, 8), spatial_compression_list=(2,), temporal_compression_list=(2,))
    src = tmp_path / "tok"
    VideoVAE(cfg).eval().save_pretrained(src)
    (src / "pyramid.json").write_text(json.dumps({"pn": None, "custom_scales": [[1, 1], [2, 2]],
                                                  "frames_per_clip": 2, "temporal_compression": 2,
                                                  "detail_min_tokens": 4}))
    return src


def test_derive_keeps_the_weights_and_changes_repeat_and_scales(tmp_path, capsys):
    src = _folder(tmp_path)
    assert main(["tokenizer", "derive", str(src), str(tmp_path / "x2"), "--pixel-repeat", "2",
                 "--scales", "1,2,3,4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (printed["pixel_repeat"], printed["spatial_stride"]) == (2, 2)
    a, b = VideoVAE.from_pretrained(src), VideoVAE.from_pretrained(tmp_path / "x2")
    assert b.config.pixel_repeat == 2 and b.config.block_out_channels == a.config.block_out_channels
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    pyr = json.loads((tmp_path / "x2" / "pyramid.json").read_text())
    assert pyr["custom_scales"] == [[1, 1], [2, 2], [3, 3], [4, 4]]
    assert pyr["image_repetition"] == pyr["video_repetition"] == [1, 1, 1, 1]
    assert pyr["frames_per_clip"] == 2


def test_derive_bad_input_is_one_line(tmp_path, capsys):
    src = _folder(tmp_path)
    assert main(["tokenizer", "derive", str(src), str(tmp_path / "o"), "--scales", "1,two"]) == 2
    assert "expected comma-separated sizes such as 1,2,4,8" in capsys.readouterr().err
    assert main(["tokenizer", "derive", str(src), str(tmp_path / "o"), "--pixel-repeat", "3"]) != 0
    assert "pixel_repeat must divide the tokenizer's stride 4, got 3" in capsys.readouterr().err
    assert main(["tokenizer", "derive", str(src), str(src)]) != 0
    assert "must differ from the source folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
