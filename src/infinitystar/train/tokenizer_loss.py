"""The tokenizer trainers' losses and quantizer-path helpers: reconstruction (L1 + MSE, optionally weighted towards
the object and its edge, plus optional edge and worst-pixel terms), the KL term of the continuous VAE, stochastic
quantizer depth, bit usage and the latent-scale calibration of knowledge inheritance. Losses are computed in
float32 whatever the forward's precision."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from infinitystar.quant.residual import MultiScaleQuant, quantize_multiscale
from infinitystar.schedules.pyramid import Schedule
from infinitystar.tokenizer.video_vae import VideoVAE


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0               # squared error: L1 alone ignores small objects for long (docs)
    content_weight: float = 0.0          # extra per-pixel weight where the target differs from its frame's median
    content_margin: int = 2              # ... and within this many pixels of such a pixel (both sides of an edge)
    edge_weight: float = 0.0             # L1 between the spatial finite differences of recon and target (sharp edges)
    worst_pixel_weight: float = 0.0      # mean RGB error of each frame's worst pixels (thin features averages blur)
    worst_pixel_fraction: float = 0.02   # ... the share of a frame's pixels counted as its worst
    adversarial_weight: float = 0.0      # patch discriminator on frames, hinge loss (train/adversarial.py); 0: off
    adversarial_start: int = 0           # first step of the adversarial term (the discriminator trains from here too)
    discriminator_channels: int = 32
    kl_weight: float = 1e-5              # continuous mode only
    quant_weight: float = 1.0            # bitwise: weight of the BSQ aux loss (the official `lfq_weight` role)
    commitment_weight: float = 0.25      # official per-scale aux: 0.25 * commit + (entropy / 100) * 0.1
    entropy_weight: float = 0.001
    inv_temperature: float = 100.0


CONTENT_THRESHOLD = 0.1   # in [-1, 1] units: ~13 levels of uint8, above flat-region noise


def content_weights(video: torch.Tensor, weight: float, margin: int = 2) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, T, H, W): 1 + `weight` where any channel of the target is more than
    CONTENT_THRESHOLD away from its frame's per-channel median, or within `margin` pixels of such a pixel. On
    sparse content (a small object on a flat background) the median is the background, so the object is
    up-weighted; see docs/tokenizer.md. The margin weights both sides of the object's edge alike: without it a
    pixel the decoder is unsure of costs `weight` times more if left background than if painted, and objects
    come back a pixel too large all round."""
    median = video.flatten(3).median(dim=-1).values[..., None, None]
    salient = ((video - median).abs().amax(dim=1, keepdim=True) > CONTENT_THRESHOLD).to(video.dtype)
    if margin > 0:
        salient = torch.nn.functional.max_pool3d(salient, (1, 2 * margin + 1, 2 * margin + 1), stride=1,
                                                 padding=(0, margin, margin))
    return 1.0 + weight * salient


def reconstruction_loss(recon: torch.Tensor, video: torch.Tensor, loss: LossConfig) -> tuple[torch.Tensor, dict]:
    """l1_weight * L1 + l2_weight * MSE (means over pixels, weighted by `content_weights` when
    loss.content_weight > 0), plus the edge and worst-pixel terms where their weights are set."""
    diff = recon.float() - video.float()
    w = content_weights(video, loss.content_weight, loss.content_margin) if loss.content_weight > 0 else None
    l1 = diff.abs().mean() if w is None else (w * diff.abs()).mean()
    out = loss.l1_weight * l1
    terms = {"l1": float(l1.detach())}
    if loss.l2_weight > 0:
        mse = diff.square().mean() if w is None else (w * diff.square()).mean()
        out = out + loss.l2_weight * mse
        terms["mse"] = float(mse.detach())
    if loss.edge_weight > 0:
        edge = edge_loss(recon.float(), video.float())
        out = out + loss.edge_weight * edge
        terms["edge"] = float(edge.detach())
    if loss.worst_pixel_weight > 0:
        worst = worst_pixel_loss(diff, loss.worst_pixel_fraction)
        out = out + loss.worst_pixel_weight * worst
        terms["worst_pixel"] = float(worst.detach())
    return out, terms


def edge_loss(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the horizontal and vertical neighbour differences of `recon` and `video` (..., H, W).
    L1/MSE on pixels is minimised by a blurred edge when the decoder is unsure where the edge lies; matching
    the differences rewards a step of the right height at the right place instead."""
    dx = (recon.diff(dim=-1) - video.diff(dim=-1)).abs().mean()
    dy = (recon.diff(dim=-2) - video.diff(dim=-2)).abs().mean()
    return 0.5 * (dx + dy)


def worst_pixel_loss(diff: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean, over frames, of the Euclidean (over channels) error of each frame's worst `fraction` of pixels;
    `diff` is recon - target (B, C, T, H, W). A one-pixel-wide feature is a few dozen of a frame's thousands of
    pixels, so averaged losses pay little for blurring it away; here those pixels are the loss."""
    err = diff.square().sum(1).add(1e-12).sqrt().flatten(2)              # (B, T, H*W)
    k = max(1, round(fraction * err.shape[-1]))
    return err.topk(k, dim=-1).values.mean()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), mean over elements."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()


def sample_drop(mode: str, prob: float, scales_per_clip: int, generator: torch.Generator) -> tuple[int, ...]:
    """In-clip scales to skip for one batch (stochastic quantizer depth).

    coarse: with probability `prob`, the k coarsest scales, k ~ U{1..n-1} (the finest always stays).
    fine: with probability `prob`, the scales after the first K, K ~ U{1..n-1} (decoding from a coarse prefix).
    independent: every scale but the finest is skipped with probability `prob` (the Infinity BitVAE recipe).
    """
    n = scales_per_clip
    if mode == "none" or n < 2 or prob <= 0:
        return ()
    u = torch.rand(n, generator=generator)
    if mode == "independent":
        return tuple(i for i in range(n - 1) if u[i] < prob)
    if u[0] >= prob:
        return ()
    k = int(torch.randint(1, n, (), generator=generator))
    return tuple(range(k)) if mode == "coarse" else tuple(range(k, n))


def bit_usage(q: MultiScaleQuant) -> dict[str, float]:
    """Share of 1 bits, and the mean binary entropy (in bits, 1 = balanced) of each bit channel's usage over the
    batch's tokens, averaged over the quantized steps."""
    ones, ent = [], []
    for b in q.bits:
        if b is None:
            continue
        p = b.float().flatten(0, -2).mean(0)
        ones.append(float(p.mean()))
        h = -(p * torch.log2(p.clamp_min(1e-12)) + (1 - p) * torch.log2((1 - p).clamp_min(1e-12)))
        ent.append(float(h.mean()))
    return {"bit_ones": sum(ones) / len(ones), "bit_entropy": sum(ent) / len(ent)} if ones else {}


@torch.no_grad()
def calibrate_scale(model: VideoVAE, video: torch.Tensor, schedule: Schedule,
                    factors: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Set `scale_learnable_parameters[0]` to the value minimising the quantization error of the posterior-mean
    latent of `video`, measured where the decoder reads it (after dividing by the scale).

    BSQ adds one unit-norm code per token and scale, whatever the residual's size, so the latent's norm has to
    be of the order of a few codes for the residual loop to approximate it; a continuous VAE leaves it wherever
    its KL term put it. The search (quantization only, cheap) takes the best of `factors` / RMS token norm;
    by default octaves 2^-6..2^6, then quarter octaves around the best one."""
    z = model.project_down(model.encode_posterior(video, chunked=False).mean)
    z = z / model.scale_learnable_parameters[0]          # unscaled latent
    rms = max(float(z.square().sum(1).mean().sqrt()), 1e-12)

    def error(f: float) -> float:
        s = f / rms
        return float((quantize_multiscale(z * s, schedule).codes / s - z).square().mean())

    if factors is None:
        best = min((2.0 ** k for k in range(-6, 7)), key=error)
        factors = best * 2.0 ** torch.linspace(-1, 1, 9)
    errors = {float(f): error(float(f)) for f in factors}
    f = min(errors, key=errors.get)
    model.scale_learnable_parameters[0] = f / rms
    return {"scale": f / rms, "token_rms": rms, "relative_error": errors[f] / max(float(z.square().mean()), 1e-30)}
