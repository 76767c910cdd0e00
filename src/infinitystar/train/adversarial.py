"""The tokenizers' optional adversarial term: a small patch discriminator on single frames with hinge losses.

Pixel losses (L1, MSE, the edge term) are minimised by a blurred edge wherever the decoder is not sure where the
edge lies; a discriminator that sees real and reconstructed frames pays for blur itself. It judges overlapping
patches (each logit sees about 22 x 22 pixels), so it rewards sharp local structure, not a global look.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from infinitystar.checkpoint_io import load_strict, read_tensors
from infinitystar.train.checkpoint import load_optimizer, save_optimizer
from infinitystar.train.harness import adamw

DISCRIMINATOR_DIR = "discriminator"
WEIGHTS_FILE = "model.safetensors"


class PatchDiscriminator(nn.Module):
    """Frames (N, 3, H, W) in [-1, 1] -> patch logits (N, 1, H/4, W/4)."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.layers = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 1, 3, padding=1))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.layers(frames)


def as_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) videos or (B, 3, H, W) images -> (N, 3, H, W) frames, in float32."""
    if x.dim() == 5:
        x = x.transpose(1, 2).flatten(0, 1)
    return x.float()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


class Adversary:
    """The discriminator of a tokenizer run, its optimizer and its checkpoint files."""

    def __init__(self, channels: int, lr: float, device: torch.device):
        self.net = PatchDiscriminator(channels).to(device)
        self.optimizer = adamw(self.net.parameters(), lr=lr, betas=(0.5, 0.9), weight_decay=0.0)

    def generator_loss(self, recon: torch.Tensor) -> torch.Tensor:
        """The reconstruction's side: -mean logit, with gradients to the reconstruction only."""
        self.net.requires_grad_(False)
        try:
            return -self.net(as_frames(recon)).mean()
        finally:
            self.net.requires_grad_(True)

    def step(self, real: torch.Tensor, recon: torch.Tensor, lr: float) -> dict[str, float]:
        """One hinge update of the discriminator on detached frames; returns its logged terms."""
        real_logits = self.net(as_frames(real))
        fake_logits = self.net(as_frames(recon.detach()))
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"d_loss": float(loss.detach()), "d_real": float(real_logits.detach().mean()),
                "d_fake": float(fake_logits.detach().mean())}

    def save(self, folder: Path) -> None:
        d = Path(folder) / DISCRIMINATOR_DIR
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(d / WEIGHTS_FILE))
        save_optimizer(d, self.optimizer)

    def load(self, folder: Path) -> None:
        d = Path(folder) / DISCRIMINATOR_DIR
        load_strict(self.net, read_tensors(d / WEIGHTS_FILE), str(d / WEIGHTS_FILE))
        load_optimizer(d, self.optimizer)


__all__ = ["PatchDiscriminator", "Adversary", "hinge_discriminator_loss", "as_frames", "DISCRIMINATOR_DIR"]
