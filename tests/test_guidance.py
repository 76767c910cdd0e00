"""Guidance on bit logits: CFG on logits (the official rule) and on bit probabilities."""
import pytest
import torch

from infinitystar.sampling.guidance import Guidance, cfg, cfg_prob


def pairs(*margins):
    """(1, n, 2) logits with bit-1 margins `margins` (logit of bit 1 minus bit 0)."""
    m = torch.tensor(margins, dtype=torch.float32)
    return torch.stack([torch.zeros_like(m), m], -1)[None]


def test_logit_cfg_flips_a_bit_both_branches_are_sure_of_and_probability_cfg_does_not():
    # both branches certain of bit 1; the unconditional one a little more (margin 26 vs 20)
    cond, uncond = pairs(20.0), pairs(26.0)
    logit = cfg(cond.flatten(1), uncond.flatten(1), 5.0).view_as(cond)
    assert logit.argmax(-1).item() == 0          # 5 * 20 - 4 * 26 < 0: flipped
    prob = cfg_prob(cond.flatten(1), uncond.flatten(1), 5.0).view_as(cond)
    assert prob.argmax(-1).item() == 1
    assert prob.exp().sum(-1).sub(1).abs().max() < 1e-5     # log-probabilities of the pair


def test_probability_cfg_pushes_away_from_the_unconditional_branch():
    cond, uncond = pairs(0.5, -1.0, 3.0), pairs(-0.5, 1.0, 3.0)
    out = cfg_prob(cond.flatten(1), uncond.flatten(1), 3.0).view_as(cond).softmax(-1)[..., 1]
    p_cond = cond.softmax(-1)[..., 1]
    assert out[0, 0] > p_cond[0, 0] and out[0, 1] < p_cond[0, 1]    # amplified where the branches disagree
    assert torch.allclose(out[0, 2], p_cond[0, 2], atol=1e-6)        # unchanged where they agree exactly
    same = cfg_prob(cond.flatten(1), uncond.flatten(1), 1.0).view_as(cond)
    assert torch.allclose(same.softmax(-1), cond.softmax(-1), atol=1e-6)   # scale 1: the conditional branch


def test_guidance_method_is_checked():
    g = Guidance(5.0, "cfg_prob")
    cond, uncond = pairs(20.0, -3.0).flatten(1), pairs(24.0, 2.0).flatten(1)
    assert torch.equal(g(cond, uncond, 5.0), cfg_prob(cond, uncond, 5.0))
    with pytest.raises(ValueError, match="unknown guidance 'cfgprob'"):
        Guidance(5.0, "cfgprob")
