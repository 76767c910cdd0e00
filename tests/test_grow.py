import pytest
import torch

from infinitystar.cli import main
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.model.packing import PackSample, pack_sequence, select_steps
from infinitystar.quant.residual import encode_targets
from infinitystar.sampling.generate import Caption, generate
from infinitystar.schedules.pyramid import PyramidConfig
from infinitystar.train.grow import RESIDUAL_OUTPUTS, grow_transformer, growth_plan

TINY = TransformerConfig(width=64, depth=2, num_heads=4, num_kv_heads=2, text_channels=16, text_maxlen=16,
                         null_text_len=32)


def _model():
    torch.manual_seed(0)
    m = InfinityStarTransformer(TINY).eval()
    with torch.no_grad():   # every parameter matters (the from-scratch init has zero biases, unit norms)
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _inputs():
    schedule = PyramidConfig(pn=None, custom_scales=[[1, 1], [2, 2], [3, 4]], frames_per_clip=2,
                             detail_min_tokens=12).build(9)
    z = torch.randn(1, 64, schedule.num_latent_frames, 3, 4, generator=torch.Generator().manual_seed(1))
    text = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    return schedule, encode_targets(z, schedule), text


def _packed_logits(model, schedule, targets, text):
    steps = select_steps(schedule, repetition="last")
    packed = pack_sequence([PackSample(schedule, steps, [5])], TINY.text_maxlen, pad_multiple=32)
    x = torch.cat([targets.inputs[st.index][0] for st in steps])
    return model.forward_packed(x, [text], packed)


def test_growth_plan_spreads_new_blocks_and_copies_the_block_before():
    assert growth_plan(4, 6) == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    assert growth_plan(2, 3) == [(0, False), (1, False), (1, True)]
    assert growth_plan(1, 3) == [(0, False), (0, True), (0, True)]
    with pytest.raises(ValueError, match="must be larger"):
        growth_plan(4, 4)


def test_grown_model_gives_the_same_logits_in_training_and_generation():
    model = _model()
    grown = grow_transformer(model, 4)
    assert grown.config.depth == 4 and len(grown.blocks) == 4
    schedule, targets, text = _inputs()
    for a, b in zip(_packed_logits(model, schedule, targets, text), _packed_logits(grown, schedule, targets, text)):
        assert torch.equal(a, b)
    caption = Caption(text[None])
    a = generate(model, schedule, caption, generator=torch.Generator().manual_seed(3), record_logits=True)
    b = generate(grown, schedule, caption, generator=torch.Generator().manual_seed(3), record_logits=True)
    assert torch.equal(a.codes, b.codes)
    assert all(torch.equal(x["cond"], y["cond"]) for x, y in zip(a.logits, b.logits))


def test_new_blocks_learn_from_the_first_step():
    """Only the zeroed projections get a gradient at first (the rest of a new block feeds them); a plain SGD step
    makes them non-zero, after which the whole block trains."""
    grown = grow_transformer(_model(), 3).train()          # plan: old 0, old 1, new (a copy of 1)
    schedule, targets, text = _inputs()
    loss = sum(lg.float().square().mean() for lg in _packed_logits(grown, schedule, targets, text))
    loss.backward()
    new = grown.blocks[2]
    for name, p in new.named_parameters():
        if name in RESIDUAL_OUTPUTS:
            assert torch.count_nonzero(p) == 0 and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, name
    assert grown.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_grow_command_writes_a_folder_and_refuses_bad_requests(tmp_path, capsys):
    src = _model().save_pretrained(tmp_path / "small")
    assert main(["grow", str(src), str(tmp_path / "deep"), "--depth", "3"]) == 0
    grown = InfinityStarTransformer.from_pretrained(tmp_path / "deep")
    assert grown.config.depth == 3
    assert torch.equal(grown.blocks[2].mlp.up_proj.weight, _model().blocks[1].mlp.up_proj.weight)
    assert torch.count_nonzero(grown.blocks[2].mlp.down_proj.weight) == 0
    capsys.readouterr()
    assert main(["grow", str(src), str(tmp_path / "deep"), "--depth", "3"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["grow", str(src), str(tmp_path / "same"), "--depth", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: growing depth 2 to 2: the new depth must be larger than the old"
    assert main(["grow", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--depth", "3"]) == 2
    assert "missing config.json" in capsys.readouterr().err
