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


def test_long_prompts_are_cut_with_a_warning_that_counts_the_words():
    from infinitystar.text.base import PromptCutWarning
    enc = WordTextEncoder("a red circle".split(), width=32, num_heads=4, max_len=5)
    long = "a red circle a red circle a"                      # 7 words: 4 are read, 3 cut
    with pytest.warns(PromptCutWarning, match=r"prompt 1 has 7 words; the built-in text encoder reads 4: 3 cut "
                                              r"\(red circle a\)"):
        ids, mask = enc.tokenize(["a red circle", long])
    assert mask.sum(1).tolist() == [4, 5]
    assert enc.overflow(["a red circle", long]) == [0, 3]
    # two prompts that differ only after the cut encode alike: the warning is what tells the user
    with pytest.warns(PromptCutWarning):
        a, b = enc.encode([long + " red"]).features, enc.encode([long + " circle"]).features
    assert torch.equal(a, b)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCutWarning)   # what generate --strict-prompt does
        with pytest.raises(PromptCutWarning, match="3 cut"):
            enc.tokenize([long])
        enc.tokenize(["a red circle"])                      # short prompts pass


def test_non_ascii_words_are_read_whole_and_named():
    from infinitystar.text.builtin import split_words
    enc = WordTextEncoder("a red circle".split(), width=32, num_heads=4)
    assert split_words("A RED, circle!") == ["a", "red", "circle"]          # ASCII: as before
    assert split_words("a “red” circle — café 🔴") == ["a", "red", "circle", "café", "🔴"]
    assert split_words("cafe\u0301") == ["café"]                            # combining accent: one word
    with pytest.warns(UserWarning, match=r"unknown word\(s\) café, 🔴 \(non-ASCII: café, 🔴\)"):
        ids, _ = enc.tokenize(["a red café 🔴"])
    assert ids[0].tolist()[-3:] == [2, 2, 1]                                 # <unk> <unk> <eos>
