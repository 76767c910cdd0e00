"""The Infinity image tokenizer: a 2-D convolutional BSQ-VAE (encoder, decoder and checkpoint loading).

Architecture (no attention anywhere, no quant_conv, no normalisation of the latent):

    encoder: conv_in 3x3 (3 -> base) -> levels i = 0..n-1, each `num_res_blocks` ResnetBlocks to base*mult[i],
             levels 0..n-2 end with a Downsample (zero-pad right/bottom by 1, 3x3 conv stride 2, no padding)
             -> mid (2 ResnetBlocks) -> GroupNorm, swish, conv_out 3x3 -> codebook_dim channels (float32)
    decoder: conv_in 3x3 (codebook_dim -> base*mult[-1]) -> mid (2 ResnetBlocks) -> levels i = n-1..0, each
             `num_res_blocks + 1` ResnetBlocks to base*mult[i], levels n-1..1 end with an Upsample (nearest x2,
             3x3 conv) -> GroupNorm, swish, conv_out 3x3 -> 3, clamped to [-1, 1] by `decode`
    ResnetBlock: GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus the input (1x1 `nin_shortcut` when the
             width changes). GroupNorm: 32 groups (24 when the width is not a multiple of 32), eps 1e-6, affine.

The multi-scale residual bit quantization is not here: it is the shared loop of `infinitystar.quant.residual`
(area-downsampled residual, sign bits, bilinear upsampling of the codes). This module maps images to the
continuous latent (`encode`) and summed codes back to images (`decode`).

Checkpoints: the released `infinity_vae_d*.pth` files hold a "vae" dict. Its names are accepted in two forms and
normalised to one layout (ours, the plain form):
    plain    encoder.conv_in.weight,           encoder.down.0.block.0.norm1.weight
    wrapped  encoder.conv_in.conv.weight,      encoder.down.0.block.0.norm1.norm.weight
(the official module tree wraps every conv in `.conv` and every GroupNorm in `.norm`). The two quantizer buffers
`quantizer.lfq.mask` / `quantize.lfq.mask` (int64 [d], unused by the bitwise path) are checked for shape and
dropped. Any other name, a missing name or a wrong shape is an error that names the key.
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

CONFIG_TYPE = "infinity_vae"
# Buffers of the official quantizer module: accepted (shape-checked) and dropped, they carry no weights.
QUANTIZER_BUFFERS = ("quantizer.lfq.mask", "quantize.lfq.mask")


def norm_groups(channels: int) -> int:
    """GroupNorm group count of the reference: 32, or 24 when the width is not a multiple of 32."""
    return 32 if channels % 32 == 0 else 24


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class InfinityVAEConfig(ArchConfig):
    """Shape of an Infinity BSQ-VAE.

    codebook_dim: latent channels = bits per latent cell (the vocabulary is 2**codebook_dim).
    patch_size: spatial stride (16 for the released d16/d24/d32/d64, 8 for the 8B tokenizer); a power of two
        with log2(patch_size) == len(ch_mult) - 1 (one down/upsample per level but the last).
    base_ch, encoder_ch_mult, decoder_ch_mult: level widths are base_ch * mult.
    num_res_blocks: ResnetBlocks per encoder level; decoder levels have one more.
    spatial_patchify: the transformer reads 2x2 latent cells as one token (4 * codebook_dim bits); the VAE itself
        is unchanged, the flag only records how the tokenizer is used (see `bits_per_token`).
    """
    codebook_dim: int = 32
    patch_size: int = 16
    base_ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    norm_eps: float = 1e-6
    spatial_patchify: bool = False

    def __post_init__(self):
        self.encoder_ch_mult = tuple(int(m) for m in self.encoder_ch_mult)
        self.decoder_ch_mult = tuple(int(m) for m in self.decoder_ch_mult)
        for name in ("codebook_dim", "patch_size", "base_ch", "num_res_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InfinityVAEConfig.{name} must be a positive integer, got {v!r}")
        if self.patch_size & (self.patch_size - 1) or self.patch_size < 2:
            raise ValueError(f"InfinityVAEConfig.patch_size must be a power of two >= 2, got {self.patch_size}")
        levels = int(math.log2(self.patch_size)) + 1
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if len(mult) != levels or any(m < 1 for m in mult):
                raise ValueError(f"InfinityVAEConfig.{name} must list {levels} positive multipliers for patch_size "
                                 f"{self.patch_size} (one level per halving, plus the last), got {list(mult)}")
            for m in mult:
                c = self.base_ch * m
                if c % norm_groups(c):
                    raise ValueError(f"InfinityVAEConfig.{name}: width base_ch * {m} = {c} is not a multiple of "
                                     f"32 or 24 (GroupNorm groups)")
        if not self.norm_eps > 0:
            raise ValueError(f"InfinityVAEConfig.norm_eps must be positive, got {self.norm_eps}")

    # --- derived -------------------------------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.encoder_ch_mult)

    @property
    def bits_per_token(self) -> int:
        """Bits per transformer token: codebook_dim, or 4 * codebook_dim with 2x2 spatial patchify."""
        return self.codebook_dim * (4 if self.spatial_patchify else 1)

    @property
    def token_stride(self) -> int:
        """Pixels per transformer token side."""
        return self.patch_size * (2 if self.spatial_patchify else 1)

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE stride {self.patch_size}")
        return height // self.patch_size, width // self.patch_size

    # --- (de)serialisation ---------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "InfinityVAEConfig":
        """A released tokenizer ('d16', 'd24', 'd32', 'd32reg', 'd64', 'd56_f8_14_patchify') or 'tiny'."""
        key = name.lower().replace("infinity_vae_", "").replace(".pth", "").replace("-", "_")
        if key not in PRESETS:
            raise ValueError(f"unknown Infinity VAE preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**PRESETS[key])


PRESETS: dict[str, dict[str, Any]] = {
    # stride 16, widths 128/256/512/512/512: the vocabulary-scaling tokenizers (the 2B uses d32 "reg")
    "d16": dict(codebook_dim=16),
    "d24": dict(codebook_dim=24),
    "d32": dict(codebook_dim=32),
    "d32reg": dict(codebook_dim=32),
    "d64": dict(codebook_dim=64),
    # the 8B tokenizer: d=14, stride 8 (widths 128/256/512/512); the transformer patchifies 2x2 -> 56 bits
    "d56_f8_14_patchify": dict(codebook_dim=14, patch_size=8, encoder_ch_mult=(1, 2, 4, 4),
                               decoder_ch_mult=(1, 2, 4, 4), spatial_patchify=True),
    # the parity fixture's instance (tests/fixtures/infinity/vae)
    "tiny": dict(codebook_dim=16, base_ch=32, encoder_ch_mult=(1, 2, 1, 1, 1), decoder_ch_mult=(1, 2, 1, 1, 1)),
}


# ---------------------------------------------------------------------------------------------------------------
def _norm(channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels, eps=eps, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float):
        super().__init__()
        self.norm1 = _norm(cin, eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Zero-pad one column right and one row bottom, then a 3x3 conv with stride 2 (halves even sizes)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, blocks: list[nn.Module], resample: Optional[nn.Module], resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        setattr(self, resample_name, resample)   # registers "downsample" / "upsample" (None: no resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.block:
            x = b(x)
        r = getattr(self, self.resample_name)
        return x if r is None else r(x)


class _Mid(nn.Module):
    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, eps)
        self.block_2 = ResnetBlock(channels, channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, cfg: InfinityVAEConfig):
        super().__init__()
        eps, base, mult = cfg.norm_eps, cfg.base_ch, cfg.encoder_ch_mult
        self.conv_in = nn.Conv2d(3, base, 3, padding=1)
        levels, cin = [], base
        for i, m in enumerate(mult):
            cout = base * m
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout, eps))
                cin = cout
            down = Downsample(cout) if i < len(mult) - 1 else None
            levels.append(_Level(blocks, down, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(cin, eps)
        self.norm_out = _norm(cin, eps)
        self.conv_out = nn.Conv2d(cin, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: InfinityVAEConfig):
        super().__init__()
        eps, base, mult = cfg.norm_eps, cfg.base_ch, cfg.decoder_ch_mult
        cin = base * mult[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, cin, 3, padding=1)
        self.mid = _Mid(cin, eps)
        levels: list[Optional[_Level]] = [None] * len(mult)
        for i in reversed(range(len(mult))):      # built (and run) from the coarsest level down to level 0
            cout = base * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout, eps))
                cin = cout
            levels[i] = _Level(blocks, Upsample(cout) if i > 0 else None, "upsample")
        self.up = nn.ModuleList(levels)           # up[i] is level i
        self.norm_out = _norm(cin, eps)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------------------------
class InfinityVAE(PretrainedMixin, nn.Module):
    """Encoder + decoder of the Infinity BSQ-VAE. Images are (B, 3, H, W) in [-1, 1], H and W multiples of
    `patch_size`; latents are (B, codebook_dim, H / patch_size, W / patch_size)."""
    config_type, folder_what, config_class = CONFIG_TYPE, "Infinity VAE", InfinityVAEConfig

    def __init__(self, config: InfinityVAEConfig):
        super().__init__()
        if not isinstance(config, InfinityVAEConfig):
            raise TypeError(f"expected an InfinityVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    # --- encode / decode -----------------------------------------------------------------------------------------
    def encode(self, image: torch.Tensor, precision: torch.dtype = torch.float32) -> torch.Tensor:
        """Continuous latent features (B, d, H/p, W/p), float32 (the input to the residual bit loop, whose sign
        decisions are taken in float32). precision: the resolved compute dtype of the convolutions (autocast)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image batch (B, 3, H, W), got shape {tuple(image.shape)}")
        self.config.latent_hw(image.shape[-2], image.shape[-1])   # stride check with a clear message
        with autocast(image.device, precision):
            return self.encoder(image.to(self.dtype)).float()

    def decode(self, codes: torch.Tensor, clamp: bool = True, precision: torch.dtype = torch.float32
               ) -> torch.Tensor:
        """Image (B, 3, H, W) from summed codes (B, d, h, w); a (B, d, 1, h, w) map (one latent frame, as the
        residual loop returns it) is accepted too. The reference clamps to [-1, 1]; clamp=False gives the raw
        decoder output. precision: the resolved compute dtype of the convolutions (autocast); the image is
        returned in the tokenizer's dtype."""
        if codes.dim() == 5:
            if codes.shape[2] != 1:
                raise ValueError(f"the image tokenizer decodes one latent frame, got shape {tuple(codes.shape)}")
            codes = codes[:, :, 0]
        if codes.dim() != 4 or codes.shape[1] != self.config.codebook_dim:
            raise ValueError(f"expected codes (B, {self.config.codebook_dim}, h, w), got shape {tuple(codes.shape)}")
        with autocast(codes.device, precision):
            x = self.decoder(codes.to(self.dtype)).to(self.dtype)
        return x.clamp(-1, 1) if clamp else x

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Encode and decode without quantization (a smoke path; tokenization goes through the residual loop)."""
        return self.decode(self.encode(image))

    # --- 8B spatial patchify (2x2 latent cells per transformer token) --------------------------------------------
    @staticmethod
    def patchify(x: torch.Tensor) -> torch.Tensor:
        """(B, d, 2h, 2w) -> (B, 4d, h, w), channel c*4 + dy*2 + dx (the reference's pixel_unshuffle order)."""
        return F.pixel_unshuffle(x, 2)

    @staticmethod
    def unpatchify(x: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify`: (B, 4d, h, w) -> (B, d, 2h, 2w)."""
        return F.pixel_shuffle(x, 2)

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def load_official_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Strictly load a released "vae" dict (plain or wrapped names, see the module docstring)."""
        load_strict(self, normalize_official_keys(self, state_dict, source), source)

    @classmethod
    def from_official(cls, checkpoint: Union[PathLike, Mapping[str, torch.Tensor]],
                      config: Union[InfinityVAEConfig, str, None] = None, device=None,
                      dtype: Optional[torch.dtype] = None) -> "InfinityVAE":
        """Build and strictly load a released tokenizer.

        checkpoint: an `infinity_vae_d*.pth` file (its "vae" entry, read with weights_only=True), a safetensors
            file, or an already-read dict. config: an `InfinityVAEConfig`, a preset name, or None to infer the
            shape from the tensors (the strict load still checks every key).
        """
        if isinstance(checkpoint, Mapping):
            sd, source = dict(checkpoint), "checkpoint"
        else:
            sd, source = read_official_vae(checkpoint), str(checkpoint)
        if config is None:
            config = infer_config(sd, source)
        elif isinstance(config, str):
            config = InfinityVAEConfig.preset(config)
        model = cls(config)
        model.load_official_state_dict(sd, source)
        return model.to(device=device, dtype=dtype).eval()



# ---------------------------------------------------------------------------------------------------------------
def read_official_vae(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a released tokenizer file: the "vae" entry of a `.pth`, or a flat dict of tensors."""
    return read_state_dict(path, (("vae",),))


def _wrapped_names(model: nn.Module) -> dict[str, str]:
    """wrapped official name -> our name, for every conv (`.conv.`) and GroupNorm (`.norm.`) parameter."""
    out = {}
    for mod_name, mod in model.named_modules():
        wrap = "conv" if isinstance(mod, nn.Conv2d) else "norm" if isinstance(mod, nn.GroupNorm) else None
        if wrap is None:
            continue
        for p in ("weight", "bias"):
            out[f"{mod_name}.{wrap}.{p}"] = f"{mod_name}.{p}"
    return out


def normalize_official_keys(model: "InfinityVAE", state_dict: Mapping[str, torch.Tensor],
                            source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Map plain and wrapped official names to ours; drop the quantizer buffers after a shape check.

    Unknown names pass through unchanged so that the strict check reports them by their own name.
    """
    ours = set(model.state_dict())
    wrapped = _wrapped_names(model)
    d = model.config.codebook_dim
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} is not a tensor ({type(v).__name__})")
        if k in QUANTIZER_BUFFERS:
            if tuple(v.shape) != (d,):
                raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, expected ({d},) for "
                                      f"codebook_dim {d}")
            continue
        name = k if k in ours else wrapped.get(k, k)
        if name in out:
            raise CheckpointError(f"{source}: keys {origin[name]!r} and {k!r} both name the parameter {name!r}")
        out[name] = v
        origin[name] = k
    return out


_WRAPPER = re.compile(r"\.(conv|norm)\.(weight|bias)$")
_PLAIN_CONV_OR_NORM = re.compile(r"(conv_in|conv_out|conv1|conv2|nin_shortcut|norm1|norm2|norm_out|"
                                 r"downsample\.conv|upsample\.conv)$")


def _unwrap_name(k: str) -> str:
    m = _WRAPPER.search(k)
    if m and _PLAIN_CONV_OR_NORM.search(k[:m.start()]):
        return k[:m.start()] + "." + m[2]
    return k


def infer_config(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> InfinityVAEConfig:
    """Read the VAE shape from the tensors (either key form); the strict load afterwards checks the rest."""
    sd = {_unwrap_name(k): v for k, v in state_dict.items()}

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise CheckpointError(f"{source}: cannot infer the VAE shape, missing key {key}")
        return sd[key]

    base = need("encoder.conv_in.weight").shape[0]
    d = need("encoder.conv_out.weight").shape[0]
    levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))), default=-1)
    dec_levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up\.(\d+)\.", k))), default=-1)
    blocks = 1 + max((int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))), default=-1)
    if levels < 2 or blocks < 1:
        raise CheckpointError(f"{source}: cannot infer the VAE shape (no encoder.down.* levels)")

    def mult(prefix: str, n: int) -> tuple[int, ...]:
        out = []
        for i in range(n):
            w = need(f"{prefix}.{i}.block.0.conv1.weight").shape[0]
            if w % base:
                raise CheckpointError(f"{source}: width {w} of {prefix}.{i} is not a multiple of conv_in's {base}")
            out.append(w // base)
        return tuple(out)

    try:
        return InfinityVAEConfig(codebook_dim=int(d), patch_size=2 ** (levels - 1), base_ch=int(base),
                                 encoder_ch_mult=mult("encoder.down", levels),
                                 decoder_ch_mult=mult("decoder.up", dec_levels), num_res_blocks=int(blocks))
    except ValueError as e:
        raise CheckpointError(f"{source}: the tensors describe no valid Infinity VAE ({e})") from None


__all__ = ["InfinityVAEConfig", "InfinityVAE", "PRESETS", "Encoder", "Decoder", "ResnetBlock", "Downsample",
           "Upsample", "norm_groups", "read_official_vae", "normalize_official_keys", "infer_config"]
