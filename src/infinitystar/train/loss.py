"""Training losses: per-token bitwise cross-entropy and the per-scale weighting of the official trainer."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def bitwise_loss(logits: torch.Tensor, bits: torch.Tensor, bit_weights: Optional[torch.Tensor] = None,
                 focal_gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (mean over bits of the 2-class cross-entropy, each bit's term times its weight when
    `bit_weights` (N, c) is given) and bit accuracy (unweighted). logits (N, c, 2), bits (N, c).
    `focal_gamma` > 0: each term times (1 - p_true)^gamma, a weight (not differentiated), so the bits the model
    gets wrong dominate the easy ones (e.g. the few bits of a step that only the text can decide)."""
    target = bits.long()
    ce = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
    if focal_gamma > 0:
        ce = ce * (-ce.detach()).exp().neg().add(1).pow(focal_gamma)
    if bit_weights is not None:
        ce = ce * bit_weights
    acc = (logits.argmax(-1) == target).float()
    return ce.mean(-1), acc.mean(-1)


def scale_loss_weights(volumes: Sequence[int], max_volume: int, reweight_by_scale: float = 4.0,
                       max_reweight: float = 40.0) -> torch.Tensor:
    """Normalised weight of each packed scale's mean loss: min(max_reweight, (V_max / V)^(1 / (1 + k))) * V.

    With the official k = 4 the cap never binds, so the weight is proportional to V^0.8: large scales count more
    than their share of steps, but less than their share of tokens. `max_volume` is the volume of the last scale
    of the full schedule."""
    v = torch.tensor([float(x) for x in volumes], dtype=torch.float64)
    w = torch.clamp((max_volume / v) ** (1.0 / (1.0 + reweight_by_scale)), max=max_reweight) * v
    return (w / w.sum()).float()
