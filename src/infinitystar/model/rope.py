"""4-D rotary position embedding: [scale step, latent frame, height, width], and its position rules.

The head dim is split into hd/2 interleaved pairs (x[2i], x[2i+1]); blocks of hd/8 pairs belong to the four
axes in the order above, with inv_freq_j = base^(-j / (hd/8)) per axis.

Positions (the rules both training and generation use):
  * text token j of a caption: (j, 0, 0, 0);
  * a visual token of global step s, latent frame f, row i, column j of an (h, w) scale:
    (text_maxlen + s, f, round(i * H / h), round(j * W / w)), (H, W) the largest scale of the schedule, rounding
    half to even as torch.round does;
  * a condition block of the interactive model: (text_maxlen + its position (800, 801), its frames, rows and
    columns as above).
"""
from __future__ import annotations

import torch

from infinitystar.schedules.pyramid import ConditionBlock, Step


def text_positions(length: int, device=None, order: int = 0) -> torch.Tensor:
    """(length, 4) positions of a caption's tokens: 0..length-1 on the first axis, `order` on the frame axis (its
    place among captions a clip reads together, `caption_orders`; 0 in the official layout)."""
    pos = torch.zeros(length, 4, dtype=torch.long, device=device)
    pos[:, 0] = torch.arange(length, device=device)
    pos[:, 1] = order
    return pos


def _grid_positions(scale_position: int, frames: torch.Tensor, h: int, w: int, full_hw: tuple[int, int],
                    device=None) -> torch.Tensor:
    """(len(frames)*h*w, 4) positions of an (h, w) grid over the given latent frames, (t, h, w) row-major."""
    H, W = full_hw
    rows = (torch.arange(h, dtype=torch.float32, device=device) * (H / h)).round().long()
    cols = (torch.arange(w, dtype=torch.float32, device=device) * (W / w)).round().long()
    f, r, c = torch.meshgrid(frames, rows, cols, indexing="ij")
    s = torch.full_like(f, scale_position)
    return torch.stack([s, f, r, c], dim=-1).reshape(-1, 4)


def visual_positions(step: Step, full_hw: tuple[int, int], text_maxlen: int, device=None) -> torch.Tensor:
    """(t*h*w, 4) positions of one step's tokens in (t, h, w) row-major order."""
    t, h, w = step.scale.shape
    frames = torch.arange(step.scale.frame_start, step.scale.frame_start + t, device=device)
    return _grid_positions(text_maxlen + step.index, frames, h, w, full_hw, device)


def condition_positions(block: ConditionBlock, full_hw: tuple[int, int], text_maxlen: int,
                        device=None) -> torch.Tensor:
    """(t*h*w, 4) positions of a condition block (interactive model): scale axis text_maxlen + block.position,
    its own frame list, and the same height/width rule as the generated scales."""
    frames = torch.tensor(block.frames, dtype=torch.long, device=device)
    return _grid_positions(text_maxlen + block.position, frames, block.h, block.w, full_hw, device)


class _Frequencies:
    """RoPE inverse frequencies: float32, computed once on the CPU, copied to each device on first use. Not a
    buffer, on purpose: `module.to(torch.bfloat16)` must not round them (at the visual tokens' positions, 512 and
    up, a bf16 frequency puts the angle off by up to a radian), and a module built on the meta device (loading)
    still has them."""

    def __init__(self, cpu: torch.Tensor):
        self._by_device = {torch.device("cpu"): cpu}

    def on(self, device: torch.device) -> torch.Tensor:
        f = self._by_device.get(device)
        if f is None:
            f = self._by_device[device] = self._by_device[torch.device("cpu")].to(device)
        return f


class Rope4D(torch.nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 8:
            raise ValueError(f"4-D RoPE needs a head dim divisible by 8, got {head_dim}")
        quarter = head_dim // 4
        self._freqs = _Frequencies(1.0 / (base ** (torch.arange(0, quarter, 2, dtype=torch.float32, device="cpu")
                                                   / quarter)))

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._freqs.on(torch.device("cpu"))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., 4) -> cos, sin (..., hd/2), float32."""
        angles = positions.to(torch.float32).unsqueeze(-1) * self._freqs.on(positions.device)   # (..., 4, hd/8)
        angles = angles.flatten(-2)
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., hd) by angles cos/sin (..., hd/2) that broadcast against it: for x
    (B, heads, L, hd), cos (L, hd/2) or (B, 1, L, hd/2); for x (B, L, heads, hd), cos (L, 1, hd/2).

    One complex product in float32 (at least), returned in x's dtype: a fifth of the time of the six real
    products and a stack it replaces, and no less exact under bf16 autocast (the reference rotates in bf16).
    Under torch.compile the real products are written out instead: inductor has no complex kernels, and fuses
    the real form into one loop."""
    dt = torch.promote_types(x.dtype, torch.float32)
    if torch.compiler.is_compiling():
        x0, x1 = x.to(dt).unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos.to(dt), sin.to(dt)
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2).to(x.dtype)
    rot = torch.complex(cos.to(dt), sin.to(dt))
    pairs = torch.view_as_complex(x.to(dt).unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# 2-D RoPE of the Infinity image model (rows and columns only; scales are told apart by the level embedding)
# ---------------------------------------------------------------------------------------------------------------

def rope2d_positions(scales, anchor: tuple[int, int], device=None) -> torch.Tensor:
    """(L, 2) (row, col) positions of every token of a schedule of (h, w) grids, scale after scale, row-major.

    Token (i, j) of an h x w grid sits at (round(i * Hu / h), round(j * Wu / w)) on the anchor grid (Hu, Wu):
    the product in float32 and round half to even, as the reference's table was built (1.333 at 16x12 on the
    72x54 anchor: rows 13.5 -> 14, 22.5 -> 22)."""
    Hu, Wu = anchor
    out = []
    for h, w in scales:
        rows = (torch.arange(h, dtype=torch.float32, device=device) * (Hu / h)).round().long()
        cols = (torch.arange(w, dtype=torch.float32, device=device) * (Wu / w)).round().long()
        r, c = torch.meshgrid(rows, cols, indexing="ij")
        out.append(torch.stack([r, c], dim=-1).reshape(-1, 2))
    return torch.cat(out)


class Rope2D(torch.nn.Module):
    """Frequencies of the 2-D RoPE: head dim c has c/2 interleaved pairs; pairs p < c/4 rotate by
    row * theta_p, pairs p >= c/4 by col * theta_(p - c/4), theta_p = base^(-4p/c). Use with `apply_rope`."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
        quarter = head_dim // 4
        self._freqs = _Frequencies(1.0 / (base ** (torch.arange(0, quarter, dtype=torch.float32, device="cpu") * 4
                                                   / head_dim)))

    @property
    def inv_freq(self) -> torch.Tensor:
        return self._freqs.on(torch.device("cpu"))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (..., 2) -> cos, sin (..., hd/2), float32: row angles first, then column angles."""
        angles = (positions.to(torch.float32).unsqueeze(-1) * self._freqs.on(positions.device)).flatten(-2)
        return angles.cos(), angles.sin()
