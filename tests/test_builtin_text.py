import pytest
import torch

from infinitystar.text.builtin import WordTextEncoder


def test_tokenize_mask_eos_and_unknown_word_warning():
    enc = WordTextEncoder("a large red circle moving right on black background".split(), width=32, num_heads=4)
    ids, mask = enc.tokenize(["a large red circle", "a red circle moving right on a black background"])
    assert mask.sum(1).tolist() == [5, 10]                    # words + EOS
    with pytest.warns(UserWarning, match=r"unknown word\(s\) purple.*understands: a background black"):
        enc.tokenize(["a purple circle"])
    with pytest.raises(ValueError, match="empty"):
        enc.tokenize(["  "])


def test_padding_does_not_change_features_and_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = WordTextEncoder("a large red circle moving right".split(), width=32, num_heads=4).eval()
    both = enc.encode(["a red circle", "a large red circle moving right"])
    alone = enc.encode(["a red circle"])
    assert torch.allclose(both.features[0, :4], alone.features[0], atol=1e-5)
    assert both.features[0, 4:].abs().max() == 0
    enc.save_pretrained(tmp_path)
    again = WordTextEncoder.from_pretrained(tmp_path)
    assert torch.equal(again.encode(["a red circle"]).features, alone.features)
