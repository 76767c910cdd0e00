import torch

from infinitystar.quant.bsq import bits_to_codes, bsq_quantize
from infinitystar.quant.resample import resize
from infinitystar.quant.residual import BitwiseSelfCorrection, decode_bits, encode_targets
from infinitystar.schedules.pyramid import Schedule


def _schedule():
    return Schedule([(1, 1), (2, 3), (4, 6)], 5, 2, [2, 2, 1], [1, 2, 1], detail_min_tokens=20)


def test_bsc_at_flip_rate_zero_equals_plain_quantization():
    s = _schedule()
    z = torch.randn(2, 64, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    plain = encode_targets(z, s)
    bsc = encode_targets(z, s, BitwiseSelfCorrection(s, strength=0.0, generator=torch.Generator().manual_seed(1)))
    assert all(torch.equal(a, b) for a, b in zip(plain.bits, bsc.bits))
    assert all(torch.equal(a, b) for a, b in zip(plain.inputs, bsc.inputs))
    assert torch.equal(plain.codes, bsc.codes)


def test_bsc_flips_change_later_labels_but_keep_clean_labels():
    s = _schedule()
    z = torch.randn(1, 64, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    bsc = encode_targets(z, s, BitwiseSelfCorrection(s, strength=0.3, generator=torch.Generator().manual_seed(3)))
    assert bsc.flips[-1] is None                     # the last scale of the schedule is never flipped
    assert any(m is not None and m.any() for m in bsc.flips)
    # labels are the clean bits of the residual left by the corrupted accumulation: decoding the *flipped* bits
    # reproduces the accumulated map
    used = [b if m is None else b ^ m for b, m in zip(bsc.bits, bsc.flips)]
    assert torch.allclose(decode_bits(used, s, 64), bsc.codes, atol=1e-6)


def test_decode_bits_round_trip_and_convergence():
    s = _schedule()
    z = torch.randn(1, 64, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    t = encode_targets(z, s)
    assert torch.equal(decode_bits(t.bits, s, 64), t.codes)
    # first step of every clip sees a zero input
    assert t.inputs[0].abs().max() == 0 and t.inputs[5].abs().max() == 0
    # the residual shrinks as scales are added
    assert (z - t.codes).norm() < z.norm()


def test_channel_axis_interpolation_of_semantic_scales():
    x = torch.zeros(1, 16, 1, 1, 1)
    x[0, 5] = 1.0
    up = resize(x, (64, 1, 1, 1), "trilinear")[0, :, 0, 0, 0]
    expected = torch.zeros(64)
    expected[18:26] = torch.tensor([.125, .375, .625, .875, .875, .625, .375, .125])
    assert torch.allclose(up, expected)
    y = torch.arange(64.0).view(1, 64, 1, 1, 1)
    down = resize(y, (16, 1, 1, 1), "area")[0, :, 0, 0, 0]
    assert torch.allclose(down, torch.arange(16.0) * 4 + 1.5)       # mean of channels 4j..4j+3


def test_area_windows_overlap_for_non_integer_ratios():
    x = torch.arange(5.0).view(1, 1, 1, 1, 5)
    out = resize(x, (1, 1, 1, 3), "area")[0, 0, 0, 0]
    assert torch.allclose(out, torch.tensor([0.5, 2.0, 3.5]))      # windows {0,1}, {1,2,3}, {3,4}


def test_codes_have_unit_norm_and_bsq_straight_through():
    bits = torch.randint(0, 2, (10, 16), dtype=torch.uint8)
    assert torch.allclose(bits_to_codes(bits).norm(dim=-1), torch.ones(10))
    r = torch.randn(2, 16, 1, 2, 2, requires_grad=True)
    q, b, aux = bsq_quantize(r)
    assert torch.equal(b, (r > 0).to(torch.uint8))
    (q.sum() + aux["commitment"] + aux["entropy"]).backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()
