"""The InfinityStar video tokenizer: a causal 3-D convolutional VAE with pixel-shuffle ("DC") resamplers.

Weight-compatible with the released `infinitystar_videovae.pth` (its `['vae']` dict); every `state_dict()` key of
`VideoVAE` is the official name. Structure (widths `c = block_out_channels`, `n = len(c) - 1` blocks):

    encoder: conv_in (3 -> c0) -> down block i = 0..n-1: `layers_per_block` resnets at c[i], then a DC downsampler
             c[i] -> c[i+1] for the first len(spatial_compression_list) blocks (2x2 in space; 2x in time for the
             first len(temporal_compression_list) of them) -> mid (2 resnets at c[n]) -> RMS norm, SiLU,
             conv_out (c[n] -> 2 * latent_channels)
    decoder: conv_in (latent_channels -> c[n]) -> mid (2 resnets) -> up block i = 0..n-1 over the reversed widths:
             `layers_per_block + 1` resnets, then a DC upsampler on the last len(spatial) blocks (2x in time on the
             last len(temporal) ones) -> spatial norm, SiLU, conv_out (c0 -> 3)
    resnet:  x + conv2(silu(norm2(conv1(silu(norm1(x)))))); every conv is causal in time (3x3x3 unless noted)
    norms:   RMS over channels (`gamma` (C,1,1,1)); decoder norms are RMS(f) * conv_y(zq) + conv_b(zq) with zq the
             decoder's input latent, nearest-resized to f (first frame on its own when f has an odd frame count)

Around the encoder/decoder ("absorbed patchify"): the encoder output (2 * latent_channels) is pixel-unshuffled
2x2 per frame, then split into a Gaussian posterior (mean = first 4 * latent_channels channels = codebook_dim,
log-variance = the rest, clamped to [-30, 20]); `proj_down` (Linear over channels) and the learned scale
`scale_learnable_parameters[0]` give the latent the generator sees. `decode` inverts that: divide, `proj_up`,
pixel-shuffle, decoder. `proj_down_two` / `proj_up_two` belong to an unused training branch and are kept only so
the official files load strictly.

Long clips are processed in causal chunks carrying the last frames of every temporal conv (see `encode_chunks`,
`decode_chunks`); at the tested sizes this is exactly equal to one pass, so it only bounds memory.

Released config: `VideoVAEConfig.official()` (184.66 M parameters, 16x space, 4x time, 64 latent channels).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from infinitystar.checkpoint_io import CheckpointError, PretrainedMixin, load_strict, read_state_dict
from infinitystar.config import ArchConfig
from infinitystar.runtime import autocast

PathLike = Union[str, Path]

CONFIG_TYPE = "video_vae"

# Input frames per encoder chunk and latent frames per decoder chunk (the official values; the first chunk of
# either also takes the remainder).
ENCODE_CHUNK_FRAMES = 8
DECODE_CHUNK_LATENTS = 2

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

# Spatial tiling of the decoder (`VideoVAE.decode(tile=...)`): latent cells shared by neighbouring tiles.
TILE_OVERLAP = 4

# The official module registers its (unused here) BSQ quantizer twice, so its state dict carries these int64
# bit-mask buffers under two prefixes. They hold no learned values: the loader checks their shape and drops them.
_QUANT_PREFIXES = ("quantizer", "quantize")


def quantizer_buffer_shapes(config: "VideoVAEConfig") -> dict[str, tuple[int, ...]]:
    return {f"{p}.lfq_{kind}.mask": (dim,)
            for p in _QUANT_PREFIXES
            for kind, dim in (("semantic", config.semantic_scale_dim), ("detail", config.codebook_dim))}


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class VideoVAEConfig(ArchConfig):
    """Shape of a video tokenizer.

    block_out_channels: widths c0..cn; n = len - 1 encoder/decoder blocks.
    layers_per_block: resnets per encoder block (decoder blocks have one more).
    latent_channels: encoder output channels per posterior half before the 2x2 patchify.
    spatial_compression_list: one entry (2) per DC resampling stage; the encoder's first blocks down-sample, the
        decoder's last blocks up-sample. Fewer entries = fewer stages (each halves the latent stride).
    temporal_compression_list: one entry (2) per stage that also resamples time; at most as many as spatial ones.
    codebook_dim: channels of the latent after patchify = 4 * latent_channels (the generator's bits per token).
    semantic_scale_dim: bits of the quantizer's semantic scales (only used to check the dropped mask buffers).
    decoder_block_out_channels: the decoder's widths c0..cn when they differ from the encoder's (None: the same, as
        in every official file); as many as block_out_channels, under the same resampler rules.
    pixel_repeat: each frame is enlarged by this factor (pixel copies) before the encoder, and the decoder's output
        is averaged back down by it, so the tokenizer works at k times the resolution it is given and one latent
        cell covers spatial_stride = (its stride) / k pixels. 1 in every official file. Used by the built-in model:
        its 8x tokenizer with k = 2 keeps small shapes that its 8x latents blur (docs/default_model_log.md).
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (96, 192, 384, 384, 384)
    layers_per_block: int = 2
    latent_channels: int = 16
    spatial_compression_list: tuple[int, ...] = (2, 2, 2)
    temporal_compression_list: tuple[int, ...] = (2, 2)
    codebook_dim: int = 64
    semantic_scale_dim: int = 16
    decoder_block_out_channels: Optional[tuple[int, ...]] = None
    pixel_repeat: int = 1

    def __post_init__(self):
        self.block_out_channels = _int_tuple("block_out_channels", self.block_out_channels)
        if self.decoder_block_out_channels is not None:
            self.decoder_block_out_channels = _int_tuple("decoder_block_out_channels",
                                                         self.decoder_block_out_channels)
        self.spatial_compression_list = _int_tuple("spatial_compression_list", self.spatial_compression_list)
        self.temporal_compression_list = _int_tuple("temporal_compression_list", self.temporal_compression_list)
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "codebook_dim",
                     "semantic_scale_dim", "pixel_repeat"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VideoVAEConfig.{name} must be a positive integer, got {v!r}")
        c = self.block_out_channels
        if len(c) < 2 or min(c) < 1:
            raise ValueError(f"VideoVAEConfig.block_out_channels needs at least two positive widths, got {list(c)}")
        n, ns, nt = len(c) - 1, len(self.spatial_compression_list), len(self.temporal_compression_list)
        if any(f != 2 for f in self.spatial_compression_list):
            raise ValueError(f"VideoVAEConfig.spatial_compression_list: DC resamplers are 2x2 pixel shuffles, every "
                             f"entry must be 2, got {list(self.spatial_compression_list)}")
        if any(f != 2 for f in self.temporal_compression_list):
            raise ValueError(f"VideoVAEConfig.temporal_compression_list: every entry must be 2, got "
                             f"{list(self.temporal_compression_list)}")
        if ns > n:
            raise ValueError(f"VideoVAEConfig: {ns} spatial stages need at least {ns} blocks, i.e. "
                             f"{ns + 1} block_out_channels (got {len(c)})")
        if nt > ns:
            raise ValueError(f"VideoVAEConfig: {nt} temporal stages but only {ns} spatial ones (a temporal stage "
                             f"is a spatial stage that also resamples time)")
        if 2 ** nt > ENCODE_CHUNK_FRAMES:
            raise ValueError(f"VideoVAEConfig: temporal stride {2 ** nt} exceeds the {ENCODE_CHUNK_FRAMES}-frame "
                             f"encoder chunk")
        dec = self.decoder_block_out_channels
        if dec is not None and (len(dec) != len(c) or min(dec) < 1):
            raise ValueError(f"VideoVAEConfig.decoder_block_out_channels needs {len(c)} positive widths (as many as "
                             f"block_out_channels), got {list(dec)}")
        self._check_widths("block_out_channels", c, down=True, up=dec is None)
        if dec is not None:
            self._check_widths("decoder_block_out_channels", dec, down=False, up=True)
        if (2 * self.encoder_spatial_stride) % self.pixel_repeat:
            raise ValueError(f"VideoVAEConfig.pixel_repeat must divide the tokenizer's stride "
                             f"{2 * self.encoder_spatial_stride}, got {self.pixel_repeat}")
        if self.codebook_dim != 4 * self.latent_channels:
            raise ValueError(f"VideoVAEConfig.codebook_dim must be 4 * latent_channels = {4 * self.latent_channels} "
                             f"(the 2x2 patchify of the posterior), got {self.codebook_dim}")

    def _check_widths(self, name: str, c: tuple[int, ...], down: bool, up: bool) -> None:
        ns, nt = len(self.spatial_compression_list), len(self.temporal_compression_list)
        for i in range(len(c) - 1):
            cin, cout = c[i], c[i + 1]
            if i >= ns:
                if cin != cout:
                    raise ValueError(f"VideoVAEConfig.{name} {list(c)}: block {i} has no resampler, so "
                                     f"widths {i} and {i + 1} must be equal ({cin} != {cout})")
                continue
            # down: conv to cout/4 then 2x2 space-to-depth; shortcut averages 4*cin channels in groups to cout
            if down and (cout % 4 or (4 * cin) % cout):
                raise ValueError(f"VideoVAEConfig.{name} {list(c)}: the DC downsampler {cin} -> {cout} "
                                 f"needs {cout} divisible by 4 and 4*{cin} divisible by {cout}")
            # up (mirrored): conv to cin*4*tf then depth-to-space; shortcut tiles cout channels up to cin*4*tf
            tf = 2 if i < nt else 1
            if up and (cin * 4 * tf) % cout:
                raise ValueError(f"VideoVAEConfig.{name} {list(c)}: the DC upsampler {cout} -> {cin} "
                                 f"needs {cin}*4*{tf} divisible by {cout}")

    # --- derived sizes ------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels) - 1

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        """The decoder's widths c0..cn (it runs them from cn down to c0)."""
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def encoder_spatial_stride(self) -> int:
        return math.prod(self.spatial_compression_list)

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent cell along H and W (the encoder's stride times the absorbed 2x2 patchify, divided by
        pixel_repeat)."""
        return 2 * self.encoder_spatial_stride // self.pixel_repeat

    @property
    def temporal_stride(self) -> int:
        return math.prod(self.temporal_compression_list)

    def latent_frames(self, frames: int) -> int:
        if frames < 1 or (frames - 1) % self.temporal_stride:
            raise ValueError(frame_count_message(frames, self.temporal_stride))
        return 1 + (frames - 1) // self.temporal_stride

    def pixel_frames(self, latent_frames: int) -> int:
        if latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_stride

    # --- presets / serialisation --------------------------------------------------------------------------------
    @classmethod
    def official(cls) -> "VideoVAEConfig":
        """The released tokenizer (`infinitystar_videovae.pth`): 16x space, 4x time, 64 latent channels."""
        return cls()

    @classmethod
    def tiny(cls) -> "VideoVAEConfig":
        """The released stage layout at widths 4..8 (the parity fixture's shape): for tests only."""
        return cls(block_out_channels=(4, 8, 8, 8, 8))

    @classmethod
    def small(cls) -> "VideoVAEConfig":
        """Two resampling stages (8x space incl. patchify, 4x time), narrow: sized for 64x64 clips on a CPU."""
        return cls(block_out_channels=(16, 32, 64, 64), spatial_compression_list=(2, 2),
                   temporal_compression_list=(2, 2))

    @classmethod
    def preset(cls, name: str) -> "VideoVAEConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown video VAE preset {name!r} (known: {', '.join(PRESETS)})")
        return getattr(cls, name)()

    @classmethod
    def from_official_args(cls, args: Mapping[str, Any]) -> "VideoVAEConfig":
        """Map the official constructor arguments (`AutoencoderKLCogVideoX(**args)`) to a config; arguments that
        select a structure this module does not implement are an error naming them."""
        fixed = {"down_block_mode": "dc", "up_block_mode": "dc", "down_layer": "3d-dc", "up_layer": "3d-dc",
                 "down_norm": True, "up_norm": True, "norm_type": "rms", "pad_mode": "constant",
                 "use_quant_conv": False, "use_post_quant_conv": False, "use_feat_proj": 2, "act_fn": "silu"}
        bad = [f"{k}={args[k]!r} (supported: {v!r})" for k, v in fixed.items() if k in args and args[k] != v]
        for k in ("down_block_types", "up_block_types"):
            kinds = set(args.get(k, ()))
            if kinds - {"CogVideoXDownBlock3D", "CogVideoXUpBlock3D"}:
                bad.append(f"{k}={sorted(kinds)}")
        if float(args.get("dropout_z", 0.0)) != 0.0:
            bad.append(f"dropout_z={args['dropout_z']!r} (supported: 0.0)")
        if bad:
            raise ValueError("unsupported official video VAE arguments: " + "; ".join(bad))
        latent = int(args.get("latent_channels", 16))
        if "detail_scale_dim" in args:
            codebook = int(args["detail_scale_dim"])
        elif "codebook_dim_low" in args:
            codebook = 4 * int(args["codebook_dim_low"])
        else:
            codebook = 4 * latent
        cfg = cls(in_channels=int(args.get("in_channels", 3)), out_channels=int(args.get("out_channels", 3)),
                  block_out_channels=args.get("block_out_channels", cls.block_out_channels),
                  layers_per_block=int(args.get("layers_per_block", 2)), latent_channels=latent,
                  spatial_compression_list=args.get("spatial_compression_list", (2, 2, 2)),
                  temporal_compression_list=args.get("temporal_compression_list", (2, 2)),
                  codebook_dim=codebook, semantic_scale_dim=int(args.get("semantic_scale_dim", 16)))
        for k in ("down_block_types", "up_block_types"):
            if k in args and len(args[k]) != cfg.num_blocks:
                raise ValueError(f"{k} lists {len(args[k])} blocks, block_out_channels implies {cfg.num_blocks}")
        return cfg


PRESETS = ("official", "tiny", "small")


def _int_tuple(name: str, v) -> tuple[int, ...]:
    try:
        out = tuple(v)
    except TypeError:
        raise ValueError(f"VideoVAEConfig.{name} must be a list of integers, got {v!r}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in out):
        raise ValueError(f"VideoVAEConfig.{name} must be a list of integers, got {list(out)}")
    return out


def frame_count_message(frames: int, temporal_stride: int) -> str:
    s = temporal_stride
    if frames < 1:
        return f"the video has {frames} frames; the tokenizer needs 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, ...)"
    keep = 1 + (frames - 1) // s * s
    return (f"the video has {frames} frames; the tokenizer needs 1 + {s}k frames (1, {1 + s}, {1 + 2 * s}, ...): "
            f"trim it to the nearest such count, {keep} frame{'s' if keep > 1 else ''} (video[:, :, :{keep}])")


# --- chunk plans ---------------------------------------------------------------------------------------------------
def encode_chunks(frames: int) -> list[int]:
    """Input frames per encoder chunk: 8 each, the first taking the remainder too (9 for 17 frames: [9, 8])."""
    if frames < 1:
        raise ValueError(f"need at least one frame, got {frames}")
    rest = frames % ENCODE_CHUNK_FRAMES
    if frames < ENCODE_CHUNK_FRAMES + rest:
        return [frames]
    return [ENCODE_CHUNK_FRAMES + rest] + [ENCODE_CHUNK_FRAMES] * (frames // ENCODE_CHUNK_FRAMES - 1)


def decode_chunks(latent_frames: int, size: int = DECODE_CHUNK_LATENTS) -> list[int]:
    """Latent frames per decoder chunk: `size` each, the first chunk also taking the clip's lone first frame and
    the remainder (the official plan with size 2: 3, 2, 2, ... for an odd count, 4, 2, ... for an even one); a
    count up to size + 1 is one chunk. Any plan gives the one-pass frames: every temporal conv carries its last
    frames from chunk to chunk, and only the first chunk's first frame decodes to a single frame."""
    n = latent_frames
    if n < 1:
        raise ValueError(f"need at least one latent frame, got {n}")
    if size < 1:
        raise ValueError(f"decoder chunks need at least one latent frame, got {size}")
    if n <= size + 1:
        return [n]
    first = 1 + size + (n - 1 - size) % size
    return [first] + [size] * ((n - first) // size)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """First cells of overlapping tiles covering `size` cells: stride tile - overlap, the last tile flush with the
    end (so it may overlap its neighbour by more)."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, tile - overlap)) + [size - tile]


def _blend_ramp(n: int, ramp: int, rise: bool, fall: bool, dtype, device) -> torch.Tensor:
    """Per-pixel weights of a tile side of n pixels: linear over `ramp` pixels at an edge shared with a neighbour,
    1 elsewhere (normalised by the sum of all tiles' weights afterwards)."""
    w = torch.ones(n, dtype=dtype, device=device)
    if ramp:
        edge = (torch.arange(ramp, dtype=dtype, device=device) + 0.5) / ramp
        if rise:
            w[:ramp] = edge
        if fall:
            w[n - ramp:] = edge.flip(0)
    return w


# ---------------------------------------------------------------------------------------------------------------
_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")
_MKLDNN_DTYPES = (torch.float32, torch.bfloat16)

# Building blocks. `cache` is a dict shared by all convs of one chunked pass (None = one pass, no state): each
# temporal conv stores there the last k-1 frames of its padded input for the next chunk.
Cache = Optional[dict]


class CausalConv3d(nn.Module):
    """3-D conv, causal in time: k-1 leading frames copied from the first frame (or the previous chunk's tail);
    zero padding k//2 in space; stride 1. Parameters sit under `.conv` (official names)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.time_pad = kernel_size - 1
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, padding=(0, kernel_size // 2, kernel_size // 2))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        if self.time_pad:
            head = cache.get(id(self)) if cache is not None else None
            if head is None:
                head = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([head, x], dim=2)
            if cache is not None:
                # clone: a slice would keep the whole padded chunk alive until the next chunk
                cache[id(self)] = x[:, :, -self.time_pad:].clone()
        return self._conv(x)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if (x.device.type == "cpu" and x.dtype in _MKLDNN_DTYPES and c.weight.dtype == torch.float32
                and _MKLDNN and torch.backends.mkldnn.enabled and not torch.compiler.is_compiling()):
            # For small CPU inputs (N*C*T*H < 20480) PyTorch picks its im2col conv3d, which is 5-10x slower here
            # and allocates C_in*k^3*T*H*W of scratch (it made chunked decoding use more memory than one pass);
            # oneDNN's kernel computes the same convolution (differentiable too) without that. Autocast does not
            # see this call, so its dtype is applied here. Under torch.compile inductor picks its own conv kernels.
            dt = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
            w, b = c.weight.to(dt), None if c.bias is None else c.bias.to(dt)
            return torch.mkldnn_convolution(x.to(dt).contiguous(), w, b, c.padding, c.stride, c.dilation, c.groups)
        return c(x)


class RMSNorm(nn.Module):
    """Per-position L2 normalisation over channels, times sqrt(C) and a learned per-channel gain."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = channels ** 0.5
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.normalize's x / max(||x||, 1e-12), written as x * rsqrt(max(sum x^2, 1e-24)): the CPU's vector norm over
        # the channel dim (not the innermost one) made the norms 2-4x slower, forward and backward. The sum of
        # squares is taken in float32 and the output keeps x's dtype: under bf16 autocast the float32 gain used to
        # promote every normalised map to float32, which the next convolution cast back (tokenizer training step
        # 1.12x less CPU time; fp32 runs compute exactly as before)
        gamma = self.gamma.to(x.dtype)
        inv = x.square().sum(1, keepdim=True, dtype=torch.float32)
        if torch.is_grad_enabled():
            return x * (inv.clamp_min(1e-24).rsqrt() * self.scale).to(x.dtype) * gamma
        inv = inv.clamp_min_(1e-24).rsqrt_().mul_(self.scale).to(x.dtype)    # inference: in place
        return (x * inv).mul_(gamma)


def _resize_parts(frames: int, size: tuple[int, int, int]) -> list[tuple[slice, tuple[int, int, int]]]:
    """The nearest resize of a `frames`-frame latent to a feature map's (t, h, w), as (frames of both, size of the
    part) pairs: with an odd frame count > 1 the first frame maps to the first frame alone (it is the clip's lone
    first frame), the rest to the rest."""
    t, h, w = size
    if t > 1 and t % 2 == 1 and frames > 1:
        return [(slice(0, 1), (1, h, w)), (slice(1, None), (t - 1, h, w))]
    return [(slice(None), size)]


def _resize_latent(zq: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    parts = [F.interpolate(zq[:, :, frames], size=s, mode="nearest") for frames, s in _resize_parts(zq.shape[2], size)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class _LatentCond:
    """The decoder's conditioning latent of one chunk, which every decoder norm reads through its own 1x1x1 convs.

    A 1x1x1 convolution acts on each position alone, so it commutes with the nearest resize: the convs run on the
    latent at its own resolution and their outputs are resized, the same numbers as convolving the latent resized
    to the feature map (the default model's 17-frame decode: 1.15x less CPU time; those full-size convolutions
    over 16 channels ran at a few GFLOP/s)."""

    def __init__(self, zq: torch.Tensor):
        self.zq = zq

    def resized(self, conv: "CausalConv3d", size: tuple[int, int, int]) -> torch.Tensor:
        return _resize_latent(conv(self.zq), size)

    def modulate_(self, out: torch.Tensor, conv_y: "CausalConv3d", conv_b: "CausalConv3d") -> torch.Tensor:
        """out * conv_y(zq) + conv_b(zq) in place, zq resized to out, part by part (no full-size concatenation:
        at 720p a decoder feature map is 3 GiB)."""
        y, b = conv_y(self.zq), conv_b(self.zq)
        for frames, size in _resize_parts(self.zq.shape[2], tuple(out.shape[2:])):
            part = out[:, :, frames]
            part.mul_(F.interpolate(y[:, :, frames], size=size, mode="nearest"))
            part.add_(F.interpolate(b[:, :, frames], size=size, mode="nearest"))
        return out


class SpatialNorm3D(nn.Module):
    """Decoder norm: RMS(f) * conv_y(zq) + conv_b(zq) with zq resized to f (1x1x1 causal convs)."""

    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm_layer = RMSNorm(channels)
        self.conv_y = CausalConv3d(zq_channels, channels, kernel_size=1)
        self.conv_b = CausalConv3d(zq_channels, channels, kernel_size=1)

    def forward(self, f: torch.Tensor, cond: _LatentCond) -> torch.Tensor:
        if torch.is_grad_enabled():
            size = tuple(f.shape[2:])
            return self.norm_layer(f) * cond.resized(self.conv_y, size) + cond.resized(self.conv_b, size)
        # inference: the same operations in place, so one full-size temporary fewer is alive at a time
        return cond.modulate_(self.norm_layer(f), self.conv_y, self.conv_b)


class EncoderResnet(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = RMSNorm(channels)
        self.norm2 = RMSNorm(channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.conv2 = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return x + h


class DecoderResnet(nn.Module):
    def __init__(self, channels: int, zq_channels: int):
        super().__init__()
        self.norm1 = SpatialNorm3D(channels, zq_channels)
        self.norm2 = SpatialNorm3D(channels, zq_channels)
        self.conv1 = CausalConv3d(channels, channels)
        self.conv2 = CausalConv3d(channels, channels)

    def forward(self, x: torch.Tensor, cond: _LatentCond, cache: Cache = None) -> torch.Tensor:
        inplace = not torch.is_grad_enabled()      # the norms' outputs are fresh temporaries
        h = self.conv1(F.silu(self.norm1(x, cond), inplace=inplace), cache)
        h = self.conv2(F.silu(self.norm2(h, cond), inplace=inplace), cache)
        return x + h


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, 2H, 2W) -> (B, 4C, T, H, W), channel = (ph*2 + pw)*C + c (the official (ph pw c) order)."""
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // 2, 2, w // 2, 2)
    return x.permute(0, 4, 6, 1, 2, 3, 5).reshape(b, 4 * c, t, h // 2, w // 2)


def depth_to_space(x: torch.Tensor, tf: int) -> torch.Tensor:
    """(B, tf*4*C, T, H, W) -> (B, C, T*tf, 2H, 2W), input channel = ((pt*2 + ph)*2 + pw)*C + c."""
    b, ch, t, h, w = x.shape
    c = ch // (4 * tf)
    x = x.reshape(b, tf, 2, 2, c, t, h, w)
    return x.permute(0, 4, 5, 1, 6, 2, 7, 3).reshape(b, c, t * tf, 2 * h, 2 * w)


def temporal_mean(x: torch.Tensor, tf: int) -> torch.Tensor:
    """Average frames in groups of tf; with an odd count the first frame stays alone (the causal first frame)."""
    if tf == 1:
        return x
    b, c, t, h, w = x.shape
    if t % 2:
        rest = x[:, :, 1:].reshape(b, c, (t - 1) // tf, tf, h, w).mean(3)
        return torch.cat([x[:, :, :1], rest], dim=2)
    return x.reshape(b, c, t // tf, tf, h, w).mean(3)


class DCDown3d(nn.Module):
    """norm -> SiLU -> conv to out/4 -> 2x2 space-to-depth (+ time mean), plus a parameter-free shortcut: the
    input space-to-depth'd (+ time mean) with its 4*in channels averaged in groups down to out."""

    def __init__(self, in_channels: int, out_channels: int, time_factor: int):
        super().__init__()
        self.out_channels = out_channels
        self.time_factor = time_factor
        self.norm = RMSNorm(in_channels)
        self.conv = CausalConv3d(in_channels, out_channels // 4)

    def forward(self, h: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        x = temporal_mean(space_to_depth(self.conv(F.silu(self.norm(h)), cache)), self.time_factor)
        y = temporal_mean(space_to_depth(h), self.time_factor)
        b, c4, t, hh, ww = y.shape
        y = y.reshape(b, c4 // self.out_channels, self.out_channels, t, hh, ww).mean(1)
        return x + y


class DCUp3d(nn.Module):
    """norm -> SiLU -> conv to out*4*tf -> depth-to-space (pt ph pw c), plus the input tiled along channels and
    depth-to-space'd. With tf > 1 and `first` (h begins with the clip's first frame) the first tf output frames
    are averaged into one, so 1 + n frames give 1 + tf*n frames (a later chunk's n frames give tf*n)."""

    def __init__(self, in_channels: int, out_channels: int, time_factor: int):
        super().__init__()
        self.time_factor = time_factor
        self.out_channels = out_channels
        self.repeats = out_channels * 4 * time_factor // in_channels
        self.norm = RMSNorm(in_channels)
        self.conv = CausalConv3d(in_channels, out_channels * 4 * time_factor)

    def forward(self, h: torch.Tensor, cache: Cache = None, first: bool = True) -> torch.Tensor:
        tf = self.time_factor
        if not torch.is_grad_enabled() and h.shape[1] % self.out_channels == 0:
            return self._forward_inference(h, cache, first)
        x = depth_to_space(self.conv(F.silu(self.norm(h)), cache), tf)
        y = depth_to_space(h.repeat(1, self.repeats, 1, 1, 1), tf)
        if tf > 1 and first:
            x = torch.cat([x[:, :, :tf].mean(2, keepdim=True), x[:, :, tf:]], dim=2)
            y = torch.cat([y[:, :, :tf].mean(2, keepdim=True), y[:, :, tf:]], dim=2)
        return x + y

    def _forward_inference(self, h: torch.Tensor, cache: Cache, first: bool) -> torch.Tensor:
        """`forward`'s values with two full-size temporaries fewer (the last upsampler's output is the decoder's
        largest tensor): the shortcut is written straight into the output from h's channels (no tiled copy), the
        convolution is added to it as a permuted view (no depth-to-space copy), and the averaged first frame is
        computed from the first latent frame alone and written in place."""
        tf, c = self.time_factor, self.out_channels
        b, cin, t, hh, ww = h.shape
        conv = self.conv(F.silu(self.norm(h), inplace=True), cache)
        out = h.new_empty(b, c, t, tf, hh, 2, ww, 2)
        for pt in range(tf):            # depth_to_space(h.repeat(...)): input channel ((pt*2 + ph)*2 + pw)*c + co
            for ph in range(2):
                for pw in range(2):
                    k = ((pt * 2 + ph) * 2 + pw) * c % cin
                    out[:, :, :, pt, :, ph, :, pw] = h[:, k:k + c]
        average = tf > 1 and first
        if average:
            y0 = out[:, :, :1].reshape(b, c, tf, 2 * hh, 2 * ww).mean(2, keepdim=True)
            first = depth_to_space(conv[:, :, :1], tf).mean(2, keepdim=True) + y0
        out += conv.view(b, tf, 2, 2, c, t, hh, ww).permute(0, 4, 5, 1, 6, 2, 7, 3)
        del conv
        out = out.view(b, c, t * tf, 2 * hh, 2 * ww)
        if not average:
            return out
        out[:, :, tf - 1:tf] = first
        return out[:, :, tf - 1:]


class _Resampler(nn.Module):
    """Holder that reproduces the official `...samplers.0.conv.` name level."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv


class DownBlock(nn.Module):
    def __init__(self, channels: int, layers: int, out_channels: Optional[int], time_factor: int):
        super().__init__()
        self.resnets = nn.ModuleList(EncoderResnet(channels) for _ in range(layers))
        self.downsamplers = (nn.ModuleList([_Resampler(DCDown3d(channels, out_channels, time_factor))])
                             if out_channels is not None else None)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0].conv(x, cache)
        return x


class UpBlock(nn.Module):
    def __init__(self, channels: int, layers: int, zq_channels: int, out_channels: Optional[int],
                 time_factor: int):
        super().__init__()
        self.resnets = nn.ModuleList(DecoderResnet(channels, zq_channels) for _ in range(layers))
        self.upsamplers = (nn.ModuleList([_Resampler(DCUp3d(channels, out_channels, time_factor))])
                           if out_channels is not None else None)

    def forward(self, x: torch.Tensor, cond: _LatentCond, cache: Cache = None, first: bool = True):
        for r in self.resnets:
            x = r(x, cond, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0].conv(x, cache, first)
        return x


class EncoderMid(nn.Module):
    def __init__(self, channels: int, layers: int = 2):
        super().__init__()
        self.resnets = nn.ModuleList(EncoderResnet(channels) for _ in range(layers))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, cache)
        return x


class DecoderMid(nn.Module):
    def __init__(self, channels: int, zq_channels: int, layers: int = 2):
        super().__init__()
        self.resnets = nn.ModuleList(DecoderResnet(channels, zq_channels) for _ in range(layers))

    def forward(self, x: torch.Tensor, cond: _LatentCond, cache: Cache = None) -> torch.Tensor:
        for r in self.resnets:
            x = r(x, cond, cache)
        return x


class Encoder(nn.Module):
    """Video (B, 3, T, H, W) -> (B, 2*latent, 1 + (T-1)/st, H/ss, W/ss)."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        c = config.block_out_channels
        ns, nt = len(config.spatial_compression_list), len(config.temporal_compression_list)
        self.conv_in = CausalConv3d(config.in_channels, c[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(c[i], config.layers_per_block, c[i + 1] if i < ns else None, 2 if i < nt else 1)
            for i in range(config.num_blocks))
        self.mid_block = EncoderMid(c[-1])
        self.norm_out = RMSNorm(c[-1])
        self.conv_out = CausalConv3d(c[-1], 2 * config.latent_channels)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    """Latent (B, latent, T_lat, h, w) -> video (B, 3, 1 + st*(T_lat-1), h*ss, w*ss), or st*T_lat frames for a
    later chunk of a clip (`first=False`: z does not begin with the clip's first frame; see DCUp3d)."""

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        c = config.decoder_channels[::-1]
        n, ns, nt = config.num_blocks, len(config.spatial_compression_list), len(config.temporal_compression_list)
        z = config.latent_channels
        self.conv_in = CausalConv3d(z, c[0])
        self.mid_block = DecoderMid(c[0], z)
        self.up_blocks = nn.ModuleList(
            UpBlock(c[i], config.layers_per_block + 1, z, c[i + 1] if i >= n - ns else None,
                    2 if i >= n - nt else 1)
            for i in range(n))
        self.norm_out = SpatialNorm3D(c[-1], z)
        self.conv_out = CausalConv3d(c[-1], config.out_channels)

    def forward(self, z: torch.Tensor, cache: Cache = None, first: bool = True) -> torch.Tensor:
        cond = _LatentCond(z)
        x = self.conv_in(z, cache)
        x = self.mid_block(x, cond, cache)
        for block in self.up_blocks:
            x = block(x, cond, cache, first)
        return self.conv_out(F.silu(self.norm_out(x, cond), inplace=not torch.is_grad_enabled()), cache)


# ---------------------------------------------------------------------------------------------------------------
def patchify(h: torch.Tensor) -> torch.Tensor:
    """Per-frame pixel_unshuffle(2): (B, C, T, H, W) -> (B, 4C, T, H/2, W/2), channel = c*4 + i*2 + j."""
    b, c, t, hh, ww = h.shape
    x = F.pixel_unshuffle(h.transpose(1, 2).reshape(b * t, c, hh, ww), 2)
    return x.reshape(b, t, 4 * c, hh // 2, ww // 2).transpose(1, 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """Inverse of `patchify`: per-frame pixel_shuffle(2)."""
    b, c, t, hh, ww = z.shape
    x = F.pixel_shuffle(z.transpose(1, 2).reshape(b * t, c, hh, ww), 2)
    return x.reshape(b, t, c // 4, 2 * hh, 2 * ww).transpose(1, 2)


def _channel_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer(x.movedim(1, -1)).movedim(-1, 1)


@dataclass
class VideoVAEPosterior:
    """Diagonal Gaussian over the patchified latent (before proj_down). `enc_h` is the encoder output before
    patchify (2 * latent_channels channels)."""
    mean: torch.Tensor
    logvar: torch.Tensor
    enc_h: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """mean + std * noise; noise defaults to a standard normal draw (from `generator` if given)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                                dtype=self.mean.dtype)
        elif tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)}, the posterior {tuple(self.mean.shape)}")
        return self.mean + self.std * noise.to(device=self.mean.device, dtype=self.mean.dtype)


class VideoVAE(PretrainedMixin, nn.Module):
    """The video tokenizer. Use `encode` / `decode` (continuous latents; quantization is the generator's job).
    Our folder (`save_pretrained` / `from_pretrained`) holds the official key names, without quantizer buffers."""
    config_type, folder_what, config_class = CONFIG_TYPE, "video tokenizer", VideoVAEConfig

    def __init__(self, config: VideoVAEConfig):
        super().__init__()
        if not isinstance(config, VideoVAEConfig):
            raise TypeError(f"VideoVAE needs a VideoVAEConfig, got {type(config).__name__}")
        self.config = config
        d = config.codebook_dim
        # registration order = the official state-dict order
        self.scale_learnable_parameters = nn.Parameter(torch.ones(4))
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.proj_down = nn.Linear(d, d)
        self.proj_down_two = nn.Linear(d, d)  # unused (official 256-px training branch); kept for strict loading
        self.proj_up = nn.Linear(d, d)
        self.proj_up_two = nn.Linear(d, d)  # unused, as above

    # --- input checks -----------------------------------------------------------------------------------------
    def _param(self) -> torch.Tensor:
        return self.scale_learnable_parameters

    def _prepare(self, x: torch.Tensor, what: str) -> torch.Tensor:
        p = self._param()
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor")
        if x.device != p.device:
            raise ValueError(f"{what} is on {x.device} but the tokenizer is on {p.device}; move one of them "
                             f"(tokenizer.to(device))")
        return x.to(p.dtype)

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be (B, {cfg.in_channels}, T, H, W), got {shape}")
        if video.shape[1] != cfg.in_channels:
            raise ValueError(f"video has {video.shape[1]} channels, the tokenizer takes {cfg.in_channels} "
                             f"(layout (B, C, T, H, W), values in [-1, 1])")
        frames, h, w = video.shape[2:]
        if frames < 1 or (frames - 1) % cfg.temporal_stride:
            raise ValueError(frame_count_message(frames, cfg.temporal_stride))
        s = cfg.spatial_stride
        if h % s or w % s or h == 0 or w == 0:
            raise ValueError(f"video is {h}x{w} pixels; height and width must be positive multiples of the "
                             f"tokenizer's spatial stride {s} (crop or resize to "
                             f"{max(s, h // s * s)}x{max(s, w // s * s)})")
        return self._prepare(video, "video")

    # --- encode ---------------------------------------------------------------------------------------------
    def encode_posterior(self, video: torch.Tensor, chunked: bool = True,
                         precision: torch.dtype = torch.float32) -> VideoVAEPosterior:
        """Posterior of a (B, 3, T, H, W) video in [-1, 1], T = 1 + 4k: mean / clamped log-variance
        (B, codebook_dim, T_lat, H/16, W/16) and the raw encoder output. `chunked=False` runs one pass (more
        memory, same result). precision: the resolved compute dtype of the encoder (autocast); the posterior is
        in the tokenizer's dtype."""
        x = self._check_video(video)
        k = self.config.pixel_repeat
        if k > 1:
            x = x.repeat_interleave(k, dim=3).repeat_interleave(k, dim=4)
        with autocast(x.device, precision):
            if chunked:
                cache: dict = {}
                parts, start = [], 0
                for n in encode_chunks(x.shape[2]):
                    parts.append(self.encoder(x[:, :, start:start + n], cache))
                    start += n
                h = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
            else:
                h = self.encoder(x)
        h = h.to(x.dtype)
        mean, logvar = patchify(h).chunk(2, dim=1)
        return VideoVAEPosterior(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX), h)

    def project_down(self, z_raw: torch.Tensor) -> torch.Tensor:
        """Patchified posterior latent -> generator latent: proj_down over channels, times the learned scale."""
        return _channel_linear(self.proj_down, z_raw) * self.scale_learnable_parameters[0]

    def project_up(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse direction of `project_down` (learned, not an exact inverse): divide by the scale, proj_up."""
        return _channel_linear(self.proj_up, z / self.scale_learnable_parameters[0])

    def encode(self, video: torch.Tensor, sample: bool = False, noise: Optional[torch.Tensor] = None,
               generator: Optional[torch.Generator] = None, precision: torch.dtype = torch.float32) -> torch.Tensor:
        """Video (B, 3, T, H, W) in [-1, 1], T = 1 + 4k -> latent (B, 64, 1 + (T-1)/4, H/16, W/16) (released
        strides), in the input's dtype.

        Deterministic by default: the posterior mean. The official code always samples
        (`posterior.sample()`, also at inference and feature extraction); pass `sample=True` to do the same, with
        `noise` (the standard-normal draw, the posterior's shape) or `generator` for reproducibility.
        precision: the encoder's compute dtype (autocast); the projection and the latent stay in float32.
        """
        if noise is not None and not sample:
            raise ValueError("noise was given but sample=False; pass sample=True to sample the posterior")
        post = self.encode_posterior(video, precision=precision)
        z_raw = post.sample(noise, generator) if sample else post.mean
        return self.project_down(z_raw).to(video.dtype)

    # --- decode ---------------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, chunked: bool = True, precision: torch.dtype = torch.float32,
               tile: Optional[int] = None, tile_overlap: int = TILE_OVERLAP,
               chunk: int = DECODE_CHUNK_LATENTS) -> torch.Tensor:
        """Latent (B, 64, T_lat, h, w) -> video (B, 3, 1 + 4(T_lat-1), 16h, 16w) (released strides), roughly in
        [-1, 1] (not clamped), in the input's dtype. Any T_lat >= 1 works. `chunked=False` runs one pass.
        precision: the decoder's compute dtype (autocast); the latent projection stays in float32.

        chunk: latent frames per decoder chunk (`decode_chunks`; 2, the official plan, by default). The decoder's
        activations grow with the chunk's frames (4 output frames per latent frame), so 1 bounds them lowest; the
        frames are those of one pass whatever the chunk (the causal convs carry their state across chunks).

        tile: decode a latent larger than `tile` x `tile` cells in overlapping spatial tiles of at most that size
        (each tile still chunked in time), blended linearly over `tile_overlap` cells. It bounds memory by the
        tile's size; the decoder's convolutions see zero padding at a tile's inner edges, so the result differs
        from one pass near tile seams (the tests state the tolerance)."""
        self._check_latent(z)
        if tile is not None:
            if tile < 1 or not 0 <= tile_overlap < tile:
                raise ValueError(f"tile must be a positive number of latent cells larger than tile_overlap >= 0, "
                                 f"got tile={tile}, tile_overlap={tile_overlap}")
            if max(z.shape[3:]) > tile:
                return self._decode_tiled(self._prepare(z, "latent"), chunked and chunk, precision, tile,
                                          tile_overlap).to(z.dtype)
        return self._decode_latent(self._prepare(z, "latent"), chunked and chunk, precision).to(z.dtype)

    def _check_latent(self, z: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(z, torch.Tensor) or z.dim() != 5:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latent must be (B, {cfg.codebook_dim}, T_lat, h, w), got {shape}")
        if z.shape[1] != cfg.codebook_dim:
            raise ValueError(f"latent has {z.shape[1]} channels, the tokenizer's latent has {cfg.codebook_dim}")
        if min(z.shape[2:]) < 1:
            raise ValueError(f"latent has an empty dimension: {tuple(z.shape)}")

    def _decode_latent(self, z: torch.Tensor, chunk: int, precision: torch.dtype) -> torch.Tensor:
        """chunk: latent frames per decoder chunk; 0: one pass."""
        zq = unpatchify(self.project_up(z))
        with autocast(zq.device, precision):
            if chunk:
                return self._decode_chunks(zq, {}, decode_chunks(zq.shape[2], chunk), first=True)
            return self.shrink(self.decoder(zq, None))

    def _decode_tiled(self, z: torch.Tensor, chunk: int, precision: torch.dtype, tile: int,
                      overlap: int) -> torch.Tensor:
        s = self.config.spatial_stride
        rows, cols = tile_starts(z.shape[3], tile, overlap), tile_starts(z.shape[4], tile, overlap)
        th, tw = min(tile, z.shape[3]), min(tile, z.shape[4])
        out = wy = wx = None
        for y in rows:
            for x in cols:
                part = self._decode_latent(z[:, :, :, y:y + th, x:x + tw], chunk, precision)
                if out is None:        # blended in float32 (at least) whatever the decoder computed in
                    dt = torch.promote_types(part.dtype, torch.float32)
                    out = part.new_zeros(*part.shape[:3], z.shape[3] * s, z.shape[4] * s, dtype=dt)
                    wy, wx = out.new_zeros(out.shape[3]), out.new_zeros(out.shape[4])
                ry = _blend_ramp(th * s, overlap * s, y > 0, y + th < z.shape[3], out.dtype, part.device)
                rx = _blend_ramp(tw * s, overlap * s, x > 0, x + tw < z.shape[4], out.dtype, part.device)
                out[..., y * s:(y + th) * s, x * s:(x + tw) * s] += part * (ry[:, None] * rx)
                if x == cols[0]:
                    wy[y * s:(y + th) * s] += ry
                if y == rows[0]:
                    wx[x * s:(x + tw) * s] += rx
                del part
        return out.div_(wy[:, None] * wx)

    def _decode_chunks(self, zq: torch.Tensor, cache: dict, plan: list[int], first: bool) -> torch.Tensor:
        """Decode zq in chunks of `plan` latent frames, carrying `cache`; `first`: zq begins with the clip's first
        frame."""
        parts, start = [], 0
        for i, n in enumerate(plan):
            parts.append(self.shrink(self.decoder(zq[:, :, start:start + n], cache, first and i == 0)))
            start += n
        return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

    def shrink(self, frames: torch.Tensor) -> torch.Tensor:
        """The decoder's (B, C, T, kH, kW) output averaged over k x k blocks (k = pixel_repeat)."""
        k = self.config.pixel_repeat
        if k == 1:
            return frames
        b, c, t, h, w = frames.shape
        return frames.reshape(b, c, t, h // k, k, w // k, k).mean(dim=(4, 6))

    def decode_stream(self, chunk: int = DECODE_CHUNK_LATENTS) -> "DecodeStream":
        """A decoder for a latent video that arrives piece by piece (clip-by-clip generation), in decoder chunks of
        `chunk` latent frames."""
        return DecodeStream(self, chunk)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(video))

    # --- loading / saving -----------------------------------------------------------------------------------
    @classmethod
    def from_official(cls, path_or_state_dict: Union[PathLike, Mapping[str, torch.Tensor]],
                      config: Optional[VideoVAEConfig] = None) -> "VideoVAE":
        """Load the released tokenizer (`infinitystar_videovae.pth`, whose `['vae']` entry is used, or a flat
        `.pth` / `.safetensors` / in-memory dict with the official names). Strict: a missing, unexpected or
        mis-shaped key is a `CheckpointError` naming it. The quantizer's mask buffers are optional; when present
        their shapes are checked and they are dropped. Without `config` the shape is read from the tensors."""
        if isinstance(path_or_state_dict, Mapping):
            sd, source = dict(path_or_state_dict), "state dict"
        else:
            sd, source = read_official_video_vae(path_or_state_dict), str(path_or_state_dict)
        if config is None:
            config = infer_config(sd, source)
        sd = drop_quantizer_buffers(sd, config, source)
        model = cls(config)
        load_strict(model, sd, source)
        return model.eval()



# ---------------------------------------------------------------------------------------------------------------
class DecodeStream:
    """Decodes a latent video piece by piece, keeping the decoder's causal state (the last frames each temporal
    conv saw) between pieces, so the frames of all pieces equal one chunked `VideoVAE.decode` of their
    concatenation, at a cost per piece that does not grow with the video. The first piece may have any number of
    latent frames; the later ones an even number (whole 2-latent decoder chunks: a 20- or 4-frame clip). chunk:
    latent frames per decoder chunk, as in `VideoVAE.decode`."""

    def __init__(self, vae: VideoVAE, chunk: int = DECODE_CHUNK_LATENTS):
        self.vae = vae
        self.chunk = chunk
        self.cache: dict = {}
        self.latent_frames = 0

    def decode(self, z: torch.Tensor, precision: torch.dtype = torch.float32) -> torch.Tensor:
        """The frames of the next latent piece (B, C, n, h, w): 1 + 4(n - 1) frames for the first piece, 4n after.
        precision: the decoder's compute dtype (autocast), as in `VideoVAE.decode`."""
        vae = self.vae
        vae._check_latent(z)
        n = z.shape[2]
        if self.latent_frames and n % DECODE_CHUNK_LATENTS:
            raise ValueError(f"a continuing piece must have a multiple of {DECODE_CHUNK_LATENTS} latent frames "
                             f"(whole decoder chunks), got {n}")
        first = not self.latent_frames
        plan = decode_chunks(n, self.chunk) if first else [self.chunk] * (n // self.chunk) + [n % self.chunk] * (
            n % self.chunk > 0)
        zq = unpatchify(vae.project_up(vae._prepare(z, "latent")))
        with autocast(zq.device, precision):
            out = vae._decode_chunks(zq, self.cache, plan, first)
        self.latent_frames += n
        return out.to(z.dtype)


def read_official_video_vae(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a released tokenizer file: the `'vae'` entry of a `.pth` if it has one, else the flat dict."""
    return read_state_dict(path, (("vae",),))


def drop_quantizer_buffers(state_dict: Mapping[str, torch.Tensor], config: VideoVAEConfig,
                           source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Remove the quantizer's mask buffers (any subset may be present) after checking their shapes."""
    expected = quantizer_buffer_shapes(config)
    out = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__})")
        if k in expected:
            if tuple(v.shape) != expected[k]:
                raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, expected {expected[k]}")
            continue
        out[k] = v
    return out


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return 1 + max((int(m[1]) for k in sd if (m := rx.match(k))), default=-1)


def infer_config(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> VideoVAEConfig:
    """Read the tokenizer's shape from official-named tensors; the strict load afterwards checks every key.
    The encoder's temporal stages cannot be seen in shapes: they are taken to mirror the decoder's (as released)."""
    sd = state_dict

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: cannot infer the video VAE shape, missing key {key}")
        return sd[key]

    n = _count(sd, r"encoder\.down_blocks\.(\d+)\.")
    layers = _count(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    if n < 1 or layers < 1:
        raise CheckpointError(f"{source}: cannot infer the video VAE shape (no encoder.down_blocks.* keys)")
    widths = [int(need(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight").shape[0]) for i in range(n)]
    widths.append(int(need("encoder.mid_block.resnets.0.conv1.conv.weight").shape[0]))
    ns = sum(f"encoder.down_blocks.{i}.downsamplers.0.conv.norm.gamma" in sd for i in range(n))
    rev = widths[::-1]
    nt = 0
    for i in range(n):
        key = f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.conv.weight"
        if key in sd and int(sd[key].shape[0]) == 8 * rev[i + 1]:
            nt += 1
    sem = sd.get("quantizer.lfq_semantic.mask", sd.get("quantize.lfq_semantic.mask"))
    try:
        return VideoVAEConfig(in_channels=int(need("encoder.conv_in.conv.weight").shape[1]),
                              out_channels=int(need("decoder.conv_out.conv.weight").shape[0]),
                              block_out_channels=tuple(widths), layers_per_block=layers,
                              latent_channels=int(need("decoder.conv_in.conv.weight").shape[1]),
                              spatial_compression_list=(2,) * ns, temporal_compression_list=(2,) * nt,
                              codebook_dim=int(need("proj_down.weight").shape[0]),
                              semantic_scale_dim=int(sem.shape[0]) if sem is not None and sem.dim() == 1 else 16)
    except ValueError as e:
        raise CheckpointError(f"{source}: the tensors describe no valid video VAE ({e})") from None


__all__ = ["VideoVAEConfig", "VideoVAE", "VideoVAEPosterior", "PRESETS", "Encoder", "Decoder", "CausalConv3d",
           "RMSNorm", "SpatialNorm3D", "DCDown3d", "DCUp3d", "encode_chunks", "decode_chunks", "patchify",
           "unpatchify", "tile_starts", "read_official_video_vae", "drop_quantizer_buffers", "infer_config",
           "quantizer_buffer_shapes", "frame_count_message"]
