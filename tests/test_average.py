import pytest
import torch

from infinitystar.cli import main
from infinitystar.pipelines import InfinityStarPipeline
from infinitystar.train.average import average_models, average_state_dicts, normalized_weights


def _fine_tune_of(pipe: InfinityStarPipeline, seed: int) -> InfinityStarPipeline:
    """A stand-in for a fine-tune: the same tokenizer, the transformer and text encoder moved by noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.transformer, pipe.text_encoder):
            for p in module.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return pipe


@pytest.fixture
def folders(tmp_path):
    a = InfinityStarPipeline.random_tiny(seed=0).save_pretrained(tmp_path / "a")
    b = _fine_tune_of(InfinityStarPipeline.random_tiny(seed=0), seed=1).save_pretrained(tmp_path / "b")
    other = InfinityStarPipeline.random_tiny(seed=5).save_pretrained(tmp_path / "other_tokenizer")
    return a, b, other


def test_average_is_the_weighted_mean_and_keeps_the_tokenizer(folders, tmp_path):
    a, b, _ = folders
    out = average_models([a, b], tmp_path / "avg", weights=[3, 1])
    pa, pb, avg = (InfinityStarPipeline.from_pretrained(d) for d in (a, b, out))
    for part in ("transformer", "text_encoder"):
        sa, sb, s = (getattr(p, part).state_dict() for p in (pa, pb, avg))
        assert set(s) == set(sa)
        for k in s:
            torch.testing.assert_close(s[k], 0.75 * sa[k] + 0.25 * sb[k], rtol=0, atol=1e-6, msg=k)
        assert any(not torch.equal(s[k], sa[k]) for k in s)      # the average moved every part
    for k, v in avg.tokenizer.state_dict().items():
        assert torch.equal(v, pa.tokenizer.state_dict()[k]), k
    assert avg.card.source == f"weight average: 0.75 x {a}, 0.25 x {b}"
    assert avg.index_fields() == pa.index_fields()


def test_averaging_a_model_with_itself_changes_nothing(folders, tmp_path):
    a, _, _ = folders
    out = average_models([a, a, a], tmp_path / "same")
    pa, avg = InfinityStarPipeline.from_pretrained(a), InfinityStarPipeline.from_pretrained(out)
    for k, v in avg.transformer.state_dict().items():
        torch.testing.assert_close(v, pa.transformer.state_dict()[k], rtol=0, atol=1e-7, msg=k)


def test_weights_and_state_dicts_are_checked():
    assert normalized_weights(None, 4) == [0.25] * 4
    assert normalized_weights([1, 3], 2) == [0.25, 0.75]
    with pytest.raises(ValueError, match="at least two"):
        normalized_weights(None, 1)
    with pytest.raises(ValueError, match="3 weights for 2 model folders"):
        normalized_weights([1, 1, 1], 2)
    with pytest.raises(ValueError, match="finite and positive"):
        normalized_weights([1, -1], 2)
    with pytest.raises(ValueError, match="missing keys: w2"):
        average_state_dicts([{"w": torch.ones(2), "w2": torch.ones(1)}, {"w": torch.ones(2)}], [0.5, 0.5], ["x", "y"])
    with pytest.raises(ValueError, match="y: non-float tensor n differs"):
        average_state_dicts([{"n": torch.tensor(1)}, {"n": torch.tensor(2)}], [0.5, 0.5], ["x", "y"])


def test_average_command_writes_a_folder_and_refuses_bad_requests(folders, tmp_path, capsys):
    a, b, other = folders
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "mid")]) == 0
    assert "averaged 2 models" in capsys.readouterr().out
    frames = InfinityStarPipeline.from_pretrained(tmp_path / "mid")(
        "a small red circle on a black background", num_frames=1, generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 1, 64, 64, 3)
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "mid")]) == 2
    assert "exists: give a new folder" in capsys.readouterr().err
    assert main(["average", str(a), str(other), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {other}: its tokenizer differs from {a}'s") and "\n" not in err
    assert main(["average", str(a), "--out", str(tmp_path / "y")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "z"), "--weights", "1,x"]) == 2
    assert "not a comma-separated list of numbers" in capsys.readouterr().err
    assert main(["average", str(a), str(tmp_path / "nowhere"), "--out", str(tmp_path / "w")]) == 2
    assert "not an infinitystar model folder" in capsys.readouterr().err
