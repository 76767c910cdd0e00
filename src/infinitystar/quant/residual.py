"""The residual multi-scale bit loop, written once and shared by training targets, generation and decoding.

Per clip, a running code map F (the clip's full size, all latent channels) starts at zero. For every scale,
repeated as the schedule says:
    input  X = resize(F, scale, input_mode)                        -> the transformer input of the step
    label  b = sign bits of resize(Z - F, (bits, scale), "area")    -> training target (teacher bits)
    update F = F + resize(codes(b'), full size, up_mode)           (b' = b, or flipped bits under BSC,
                                                                    or sampled bits at generation)
The clips' final F maps, concatenated in time, are the latent handed to the tokenizer's decoder.

Tokenizer training runs the same loop differentiably (`quantize_multiscale`): each scale's residual goes through
`bsq_quantize`, whose straight-through codes are accumulated with `CodeAccumulator.add_codes`; whole scales may be
skipped (stochastic quantizer depth). Its forward values are exactly those of `encode_targets`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Optional, Sequence, Union

import torch

from infinitystar.quant.bsq import bits_to_codes, bsq_quantize, residual_to_bits
from infinitystar.quant.resample import resize
from infinitystar.runtime import fp32_region
from infinitystar.schedules.pyramid import Schedule, Step


class CodeAccumulator:
    """The running code map F of one clip, shape (B, C, t, H, W)."""

    def __init__(self, batch: int, channels: int, full_size: tuple[int, int, int], *,
                 device=None, dtype=torch.float32, input_mode: str = "area", up_mode: str = "trilinear"):
        self.channels = channels
        self.full_size = tuple(full_size)
        self.input_mode = input_mode
        self.up_mode = up_mode
        self.F = torch.zeros(batch, channels, *full_size, device=device, dtype=dtype)

    def inputs(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """Transformer input tokens for a scale: (B, t*h*w, C), tokens in (t, h, w) row-major order."""
        x = resize(self.F, (self.channels, *shape), self.input_mode)
        return x.flatten(2).transpose(1, 2)

    def residual(self, z: torch.Tensor, shape: tuple[int, int, int], bits: int) -> torch.Tensor:
        """The residual z - F area-resized to a scale, channel-first: (B, bits, t, h, w)."""
        return resize(z - self.F, (bits, *shape), "area")

    def add(self, bits: torch.Tensor) -> None:
        """Add the codes of bits (B, t, h, w, c) upsampled to the full size (channel axis too, c -> C)."""
        self.add_codes(bits_to_codes(bits, self.F.dtype).permute(0, 4, 1, 2, 3))

    def add_codes(self, codes: torch.Tensor) -> None:
        """Add channel-first codes (B, c, t, h, w) upsampled to the full size; any values, e.g. straight-through
        codes carrying a gradient (tokenizer training)."""
        self.F = self.F + resize(codes, (self.channels, *self.full_size), self.up_mode)


FlipSource = Callable[[Step, torch.Tensor], Optional[torch.Tensor]]


class BitwiseSelfCorrection:
    """Training-time bit flips (BSC): per step draw p ~ U{0, .01, ..., strength}, flip each bit with prob. p.

    The label stays the clean bits; only the accumulated map sees the flips, so later labels learn to correct
    earlier mistakes. The last scale of the whole schedule is never flipped (as in the reference).
    """

    def __init__(self, schedule: Schedule, strength: Union[float, Sequence[float]] = 0.3,
                 generator: Optional[torch.Generator] = None):
        self.last_scale = len(schedule.scales) - 1
        self.strength = strength
        self.generator = generator

    def _strength(self, scale_index: int) -> float:
        s = self.strength
        return float(s if isinstance(s, (int, float)) else s[min(scale_index, len(s) - 1)])

    def __call__(self, step: Step, bits: torch.Tensor) -> Optional[torch.Tensor]:
        if step.scale.index >= self.last_scale:
            return None
        top = round(100 * self._strength(step.scale.index))
        p = torch.randint(0, top + 1, (), generator=self.generator).item() / 100
        if p == 0:
            return None
        u = torch.rand(bits.shape, generator=self.generator).to(bits.device)
        return (u < p).to(torch.uint8)


class RecordedFlips:
    """Replays flip masks (one per step index, or None) — for tests and parity with recorded runs."""

    def __init__(self, masks: dict[int, torch.Tensor]):
        self.masks = masks

    def __call__(self, step: Step, bits: torch.Tensor) -> Optional[torch.Tensor]:
        m = self.masks.get(step.index)
        return None if m is None else m.to(bits.device, torch.uint8).reshape(bits.shape)


@dataclass
class Targets:
    """Per-step transformer inputs and labels for the steps of the encoded clips, and the final code map."""
    steps: list[Step]
    inputs: list[torch.Tensor]         # (B, tokens, C) per step
    bits: list[torch.Tensor]           # (B, t, h, w, c) uint8 per step: clean labels
    flips: list[Optional[torch.Tensor]]
    codes: torch.Tensor                # (B, C, T, H, W): the accumulated maps (with flips) of the encoded clips
    magnitudes: list[torch.Tensor] = field(default_factory=list)   # |residual| (B, t, h, w, c) per step, when
                                                                    # asked: what a wrong sign would cost


def _clip_slice(z: torch.Tensor, schedule: Schedule, clip: int) -> torch.Tensor:
    fs, t = schedule.clips[clip]
    return z[:, :, fs:fs + t]


StepVisitor = Callable[[CodeAccumulator, torch.Tensor, Step], None]


def _run_loop(z: torch.Tensor, schedule: Schedule, num_clips: Optional[int], input_mode: str, up_mode: str,
              visit: StepVisitor) -> torch.Tensor:
    """The loop skeleton shared by `encode_targets` and `quantize_multiscale`: one accumulator per clip, `visit`
    called for every step in schedule order with the clip's slice of z. Returns the clips' F maps along time
    (float32 for a half-precision z: the loop always runs in float32, with autocast off)."""
    n_clips = schedule.num_clips if num_clips is None else num_clips
    need_frames = sum(t for _, t in schedule.clips[:n_clips])
    if z.dim() != 5 or z.shape[2] < need_frames or tuple(z.shape[3:]) != schedule.full_hw:
        raise ValueError(f"latent of shape {tuple(z.shape)} does not fit the schedule "
                         f"(needs (B, C, >= {need_frames}, {schedule.full_hw[0]}, {schedule.full_hw[1]}))")
    B, C = z.shape[:2]
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    maps = []
    with fp32_region(z.device):   # residuals and sign decisions in float32, whatever precision made z
        for clip in range(n_clips):
            zc = _clip_slice(z, schedule, clip)
            acc = CodeAccumulator(B, C, schedule.clip_size(clip), device=z.device, dtype=z.dtype,
                                  input_mode=input_mode, up_mode=up_mode)
            for scale in schedule.clip_scales(clip):
                for step in schedule.scale_steps(scale.index):
                    visit(acc, zc, step)
            maps.append(acc.F)
    return torch.cat(maps, dim=2)


def encode_targets(z: torch.Tensor, schedule: Schedule, flip: Optional[FlipSource] = None,
                   num_clips: Optional[int] = None, input_mode: str = "area",
                   up_mode: str = "trilinear", magnitudes: bool = False) -> Targets:
    """Run the residual loop on a continuous latent z (B, C, T_lat, H, W).

    `num_clips` limits the work to the first clips (teacher-forced prefixes); by default every clip is encoded.
    `magnitudes` also keeps |residual| per label bit: a bit's sign decides between codes +a and -a, so choosing the
    wrong one adds 4a|r| to the squared error of the code map (the residual-weighted training loss reads it).
    """
    out = Targets([], [], [], [], z.new_zeros(0))

    def visit(acc: CodeAccumulator, zc: torch.Tensor, step: Step) -> None:
        scale = step.scale
        x = acc.inputs(scale.shape)
        r = acc.residual(zc, scale.shape, scale.bits)
        bits = residual_to_bits(r).permute(0, 2, 3, 4, 1)
        if magnitudes:
            out.magnitudes.append(r.abs().permute(0, 2, 3, 4, 1))
        mask = flip(step, bits) if flip is not None else None
        acc.add(bits if mask is None else bits ^ mask)
        out.steps.append(step)
        out.inputs.append(x)
        out.bits.append(bits)
        out.flips.append(mask)

    out.codes = _run_loop(z, schedule, num_clips, input_mode, up_mode, visit)
    return out


@dataclass
class MultiScaleQuant:
    """Differentiable multi-scale quantization of a latent (tokenizer training).

    `codes` equals `encode_targets(z, ...).codes` in value (with no dropped scales) and carries straight-through
    gradients to z. The aux terms are means over the quantized steps (the official per-scale BSQ terms, averaged
    over scales as in the reference VAE).
    """
    steps: list[Step]
    bits: list[Optional[torch.Tensor]]   # (B, t, h, w, c) uint8 per step; None for a dropped scale
    codes: torch.Tensor                  # (B, C, T, H, W)
    commitment: torch.Tensor
    entropy: torch.Tensor                # per-sample entropy - codebook entropy (minimised)
    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor

    def aux_loss(self, commitment_weight: float = 0.25, entropy_weight: float = 0.1 / 100) -> torch.Tensor:
        """The official BSQ auxiliary loss: 0.25 * commitment + (entropy penalty / 100) * 0.1 by default."""
        return commitment_weight * self.commitment + entropy_weight * self.entropy


def dropped_scale_set(drop_scales: Union[int, Collection[int]], scales_per_clip: int) -> frozenset[int]:
    """In-clip scale indices to skip: an int k means the k coarsest scales, a collection names them. At least
    one scale per clip must stay."""
    n = scales_per_clip
    if isinstance(drop_scales, bool):
        raise TypeError("drop_scales must be an int or a collection of in-clip scale indices, not a bool")
    if isinstance(drop_scales, int):
        if not 0 <= drop_scales < n:
            raise ValueError(f"drop_scales={drop_scales}: can drop 0..{n - 1} of the {n} scales per clip")
        return frozenset(range(drop_scales))
    out = frozenset(int(i) for i in drop_scales)
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad:
        raise ValueError(f"drop_scales {bad} out of range: in-clip scale indices are 0..{n - 1}")
    if len(out) >= n:
        raise ValueError(f"drop_scales would drop all {n} scales of a clip; keep at least one")
    return out


def quantize_multiscale(z: torch.Tensor, schedule: Schedule, *,
                        drop_scales: Union[int, Collection[int]] = 0, num_clips: Optional[int] = None,
                        inv_temperature: float = 100.0, up_mode: str = "trilinear") -> MultiScaleQuant:
    """The residual loop on z (B, C, T_lat, H, W) with straight-through BSQ at every step (tokenizer training).

    drop_scales: in-clip scales skipped in every clip (stochastic quantizer depth): an int k skips the k coarsest,
        a collection names the indices. A skipped scale adds nothing; the next scale quantizes what is left.
    Gradients reach z through every step's straight-through codes and through the residual chain (the
    accumulated map is not detached, as in the reference VAE training).
    """
    drop = dropped_scale_set(drop_scales, schedule.scales_per_clip)
    steps: list[Step] = []
    bits_out: list[Optional[torch.Tensor]] = []
    terms: dict[str, list[torch.Tensor]] = {"commitment": [], "entropy": [], "per_sample_entropy": [],
                                            "codebook_entropy": []}

    def visit(acc: CodeAccumulator, zc: torch.Tensor, step: Step) -> None:
        scale = step.scale
        steps.append(step)
        if scale.in_clip in drop:
            bits_out.append(None)
            return
        r = acc.residual(zc, scale.shape, scale.bits)
        q_st, _, aux = bsq_quantize(r, dim=1, inv_temperature=inv_temperature)
        # The value added is the exact code of the bits (as in `add`); the straight-through part contributes a
        # gradient but exactly zero in value, so the forward pass equals encode_targets bit for bit.
        bits = residual_to_bits(r).permute(0, 2, 3, 4, 1)
        exact = bits_to_codes(bits, acc.F.dtype).permute(0, 4, 1, 2, 3)
        acc.add_codes(exact + (q_st - q_st.detach()))
        bits_out.append(bits)
        for k in terms:
            terms[k].append(aux[k])

    codes = _run_loop(z, schedule, num_clips, "area", up_mode, visit)
    mean = {k: torch.stack(v).mean() if v else z.new_zeros(()) for k, v in terms.items()}
    return MultiScaleQuant(steps, bits_out, codes, **mean)


def decode_bits(bits: Sequence[torch.Tensor], schedule: Schedule, channels: int, *, device=None,
                dtype=torch.float32, up_mode: str = "trilinear") -> torch.Tensor:
    """Rebuild the code map (B, C, T, H, W) from the bits of the first len(bits) steps (whole clips)."""
    if not bits:
        raise ValueError("no bits to decode")
    B = bits[0].shape[0]
    maps, acc, clip = [], None, -1
    for step, b in zip(schedule.steps, bits):
        if step.scale.clip != clip:
            if acc is not None:
                maps.append(acc.F)
            clip = step.scale.clip
            acc = CodeAccumulator(B, channels, schedule.clip_size(clip), device=device or b.device,
                                  dtype=dtype, up_mode=up_mode)
        acc.add(b.reshape(B, *step.scale.shape, step.scale.bits))
    maps.append(acc.F)
    return torch.cat(maps, dim=2)
