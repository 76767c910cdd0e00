"""Training the 2-D Infinity image tokenizer (`InfinityVAE`) on images, with the video tokenizer's trainer.

The loop, the optimizer, the learning-rate schedule, the losses (L1 + MSE, optional object weighting, the BSQ
aux loss), stochastic quantizer depth, checkpoints, resume, the progress bar and the JSONL log are those of the
video tokenizer's trainer (`train.tokenizer`; `InfinityTokenizerTrainer` subclasses `TokenizerTrainer` and only
replaces what is specific to the model: building it, one batch's losses, validation and the saved folder). Images travel
as one-frame videos (B, 3, 1, H, W) so the shared pieces (`reconstruction_loss`, per-clip PSNR) apply unchanged.

Path of a batch: encode -> `quantize_multiscale` over the image schedule of `scales` (straight-through BSQ, the
same residual loop with bilinear code upsampling that the Infinity transformer's teacher forcing and sampler run)
-> decode. There is no posterior and no learned latent scale in this model; calibration multiplies the encoder's
last convolution instead, which changes the latent's magnitude exactly as the video tokenizer's scale does.

Data: Shapes World images rendered on the fly from the train split (the held-out colour/shape pairs never
appear), a pure function of (seed, step).

Starting from a trained tokenizer (`init: FOLDER`, an `InfinityVAE` folder with its `scales.json`): the weights are
loaded strictly, the architecture and the schedule come from the folder, and the step-0 calibration is skipped
unless `quant.calibrate_scale: true` (it rescales the encoder, which would change every code). With
`train.freeze: [encoder]` the encoder, hence the codes of every image, stays bit-identical: a decoder fine-tune
that a transformer trained on the old tokenizer's codes can use unchanged (configs/infinity_shapes_decoder.yaml).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import numpy as np
import torch

from infinitystar.quant.residual import quantize_multiscale
from infinitystar.schedules.infinity_resolution import check_custom_scales, image_schedule
from infinitystar.tokenizer.infinity_vae import (CONFIG_TYPE as VAE_CONFIG_TYPE, PRESETS as VAE_PRESETS, InfinityVAE,
                                                 InfinityVAEConfig)
from infinitystar.tokenizer.training_eval import video_to_frames
from infinitystar.train.config import (CheckpointConfig, ConfigError, FileConfig, LogConfig, OptimConfig,
                                       preset_section)
from infinitystar.train.tokenizer import (QuantConfig, TokenizerTrainer, TokenizerTrainSection,
                                          check_same_architecture, check_tokenizer_run)
from infinitystar.train.tokenizer_data import ShapesSource
from infinitystar.train.tokenizer_loss import LossConfig, bit_usage, reconstruction_loss, sample_drop
from infinitystar.checkpoint_io import CheckpointError

SCALES_FILE = "scales.json"       # next to the tokenizer's config.json: the image schedule it was trained with
# 64x64 Shapes World images -> 8x8 latents of 16 bits (stride 8: four levels, three halvings), narrow because the
# world is flat colours and the CPU budget is minutes. The widths in front of each GroupNorm-swish-conv_out (the
# encoder's last level, the decoder's first) are >= 2 channels per group: at one channel per group the norm is an
# instance norm, which erases spatially constant signals such as the background colour (measured: a 24-wide
# decoder level 0 stayed at 11 dB PSNR for 100 steps, the 48-wide one passed it in 50).
SHAPES_VAE = dict(codebook_dim=16, patch_size=8, base_ch=24, encoder_ch_mult=[1, 2, 2, 4],
                  decoder_ch_mult=[2, 2, 2, 4], num_res_blocks=1)
SHAPES_SCALES = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]]
FREEZABLE_2D = ("encoder", "decoder")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass
class InfinityVAESection:
    """A preset ('shapes', or one of `InfinityVAEConfig.preset`'s names) plus `InfinityVAEConfig` field overrides."""
    preset: str = "shapes"
    overrides: dict = field(default_factory=dict)

    def build(self) -> InfinityVAEConfig:
        try:
            base = dict(SHAPES_VAE) if self.preset == "shapes" else InfinityVAEConfig.preset(self.preset).to_dict()
            return InfinityVAEConfig.from_dict({**base, **self.overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class ImageQuantConfig(QuantConfig):
    """`QuantConfig` whose calibration defaults to "only when starting from random weights"."""
    calibrate_scale: Optional[bool] = None   # null: calibrate a random init, never an `init` folder; true / false


@dataclass
class ImageDataConfig:
    height: int = 64
    width: int = 64
    val_samples: int = 32                # fixed validation images, rendered once from val_seed (never trained on)
    val_seed: int = 1_000_003


def validate_scales(scales: Any, key: str) -> None:
    """An image schedule starting at [1, 1] whose grids grow (`check_custom_scales`), as a ConfigError."""
    try:
        check_custom_scales(scales, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def scales_value(value: Any, where: str) -> list[list[int]]:
    """A `scales` entry: an image schedule starting at [1, 1] whose grids grow."""
    validate_scales(value, where)
    return [list(s) for s in value]


@dataclass
class InfinityTokenizerTrainConfig(FileConfig):
    sections: ClassVar[dict] = {
        "model": preset_section(InfinityVAESection, InfinityVAEConfig, ["shapes", *VAE_PRESETS], "shapes",
                                nullable_preset=False, optional=True),
        "scales": scales_value}

    output_dir: str = "runs/infinity_tokenizer"
    init: Optional[str] = None           # InfinityVAE folder to start from (strict load; its architecture, schedule)
    seed: int = 0
    device: str = "auto"
    model: Optional[InfinityVAESection] = None   # null: the init folder's architecture, else the 'shapes' preset
    scales: list[list[int]] = field(default_factory=lambda: [list(s) for s in SHAPES_SCALES])
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    quant: ImageQuantConfig = field(default_factory=lambda: ImageQuantConfig(depth_mode="independent",
                                                                              drop_prob=0.1))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2e-3, betas=[0.9, 0.99], warmup_steps=20, decay="cosine", min_lr_ratio=0.1, grad_clip=1.0))
    train: TokenizerTrainSection = field(default_factory=lambda: TokenizerTrainSection(max_steps=300, batch_size=16))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100, keep_last=2))
    log: LogConfig = field(default_factory=LogConfig)

    # the shared trainer reads this: always the bitwise path
    mode = "bitwise"

    def __post_init__(self):
        self.validate()

    def vae_config(self) -> InfinityVAEConfig:
        """The init folder's architecture when `init` is set, else the model section's (default: 'shapes')."""
        if self.init is not None:
            return init_vae_config(self.init)
        return (self.model or InfinityVAESection()).build()

    def calibrates(self) -> bool:
        """Whether a fresh run calibrates at step 0: as configured, else only from random weights."""
        c = self.quant.calibrate_scale
        return self.init is None if c is None else c

    def scale_list(self) -> list[tuple[int, int]]:
        return [(int(h), int(w)) for h, w in self.scales]

    def validate(self) -> None:
        t, d, q = self.train, self.data, self.quant
        check_tokenizer_run(self, FREEZABLE_2D)
        if q.sample_posterior:
            raise ConfigError("quant.sample_posterior: the Infinity VAE has no posterior (its encoder output is "
                              "quantized directly); set it to false")
        if self.calibrates() and "encoder" in t.freeze:
            raise ConfigError("quant.calibrate_scale (on by default without init) rescales the encoder's last "
                              "convolution, which train.freeze keeps fixed; set quant.calibrate_scale: false or "
                              "unfreeze the encoder")
        vae = self.vae_config()
        if self.init is not None:
            if self.model is not None:
                check_same_architecture(self.init, self.model.build().to_dict(), vae.to_dict())
            theirs = init_scales(self.init)
            if theirs is not None and theirs != [list(s) for s in self.scales]:
                raise ConfigError(f"scales: init {self.init} was trained with the schedule {theirs} "
                                  f"({SCALES_FILE}), not {[list(s) for s in self.scales]}; the codes would differ")
        if vae.spatial_patchify:
            raise ConfigError("model.spatial_patchify: training a patchified (8B-style) tokenizer is not supported")
        validate_scales(self.scales, "scales")
        try:
            latent = vae.latent_hw(d.height, d.width)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None
        if tuple(self.scales[-1]) != latent:
            raise ConfigError(f"scales: the last scale {list(self.scales[-1])} must be the latent size "
                              f"{list(latent)} of {d.height}x{d.width} images at stride {vae.patch_size}")


def init_vae_config(folder: Union[str, Path]) -> InfinityVAEConfig:
    """The architecture of an `init` tokenizer folder, with `init:`-prefixed errors."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"init: {folder} is not a tokenizer folder (no config.json)")
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"init: {path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"init: {path}: expected a JSON object")
    if raw.get("type", VAE_CONFIG_TYPE) != VAE_CONFIG_TYPE:   # a folder without a type is taken as one (read_config)
        raise ConfigError(f"init: {folder} holds a {raw['type']!r} model, not an Infinity VAE ({VAE_CONFIG_TYPE!r})")
    try:
        return InfinityVAEConfig.from_dict({k: v for k, v in raw.items() if k != "type"})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"init: {path}: {e}") from None


def init_scales(folder: Union[str, Path]) -> Optional[list[list[int]]]:
    """The schedule an `init` folder was trained with (its scales.json), None for a folder without one."""
    path = Path(folder) / SCALES_FILE
    if not path.is_file():
        return None
    try:
        return [list(s) for s in json.loads(path.read_text())["scales"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"init: {path}: not a schedule file ({e})") from None


config_from_dict = InfinityTokenizerTrainConfig.from_dict
load_config = InfinityTokenizerTrainConfig.load


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------

def quantize_image_latent(z: torch.Tensor, scales, **kw):
    """(B, d, H, W) latent -> `MultiScaleQuant` of the image schedule (codes (B, d, 1, H, W))."""
    return quantize_multiscale(z.unsqueeze(2), image_schedule(scales, z.shape[1]), **kw)


@torch.no_grad()
def reconstruct_images(model: InfinityVAE, images: torch.Tensor, scales) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> reconstruction through all scales of the schedule (clamped)."""
    return model.decode(quantize_image_latent(model.encode(images), scales).codes)


@torch.no_grad()
def calibrate_latent(model: InfinityVAE, images: torch.Tensor, scales) -> dict[str, float]:
    """Scale the encoder's last convolution so that the latent's size suits the residual loop (each scale adds one
    unit-norm code per token whatever the residual's size): the best of octaves 2^-6..2^6 / RMS token norm, then
    quarter octaves around it, by quantization error."""
    conv = model.encoder.conv_out
    z = model.encode(images)
    rms = max(float(z.square().sum(1).mean().sqrt()), 1e-12)

    def error(f: float) -> float:
        s = f / rms
        return float((quantize_image_latent(z * s, scales).codes.squeeze(2) / s - z).square().mean())

    best = min((2.0 ** k for k in range(-6, 7)), key=error)
    errors = {float(f): error(float(f)) for f in best * 2.0 ** torch.linspace(-1, 1, 9)}
    f = min(errors, key=errors.get)
    conv.weight.mul_(f / rms)
    conv.bias.mul_(f / rms)
    return {"scale": f / rms, "token_rms": rms, "relative_error": errors[f] / max(float(z.square().mean()), 1e-30)}


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------

def encode_images(model: InfinityVAE, images: torch.Tensor) -> torch.Tensor:
    return model.encode(images)


def decode_unclamped(model: InfinityVAE, codes: torch.Tensor) -> torch.Tensor:
    return model.decode(codes, clamp=False)      # a clamp would stop gradients at +-1


class InfinityTokenizerTrainer(TokenizerTrainer):
    """`TokenizerTrainer` for the 2-D Infinity VAE: same loop, checkpoints and logs (see the module docstring).
    Images travel as one-frame videos (B, 3, 1, H, W)."""

    config_class = InfinityTokenizerTrainConfig
    encode_fn = staticmethod(encode_images)
    decode_fn = staticmethod(decode_unclamped)

    def setup_data(self) -> None:
        d = self.config.data
        self.scales = self.config.scale_list()
        self.source = ShapesSource(1, d.height, d.width, d.val_seed, d.val_samples)

    def build_model(self) -> torch.nn.Module:
        cfg = self.config
        if cfg.init is not None and self.start is None:
            try:   # strict: every key and shape of the folder must match the model
                return InfinityVAE.from_pretrained(cfg.init, device=self.device).train()
            except (CheckpointError, ValueError, TypeError) as e:
                raise ConfigError(f"init: {e}") from None
        with self.seeded("init"):
            return InfinityVAE(cfg.vae_config()).to(self.device).train()

    def calibrates(self) -> bool:
        return self.config.calibrates()

    def calibrate(self, video: torch.Tensor) -> dict:
        return calibrate_latent(self.model, video[:, :, 0], self.scales)

    def frozen_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{part}." for part in self.config.train.freeze)

    def losses(self, video: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        cfg, m = self.config, self.model
        g = torch.Generator().manual_seed(self.seed_of("noise", step))
        drop = sample_drop(cfg.quant.depth_mode, cfg.quant.drop_prob, len(self.scales), g)
        with self.autocast():
            q = quantize_image_latent(self.encode_pass(m, video[:, :, 0]), self.scales, drop_scales=drop,
                                      inv_temperature=cfg.loss.inv_temperature)
            recon = self.decode_pass(m, q.codes).unsqueeze(2)
        rec_loss, terms = reconstruction_loss(recon, video, cfg.loss)
        aux = q.aux_loss(cfg.loss.commitment_weight, cfg.loss.entropy_weight).float()
        loss = rec_loss + cfg.loss.quant_weight * aux
        terms.update(aux=float(aux.detach()), commitment=float(q.commitment.detach()),
                     entropy=float(q.entropy.detach()), dropped=len(drop), **bit_usage(q))
        terms["loss"] = float(loss.detach())
        return loss, terms, recon.float().clamp(-1, 1)

    def reconstruct_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        with self.autocast():
            rec = reconstruct_images(self.model, self.clips_to_video(clips)[:, :, 0], self.scales)
        return video_to_frames(rec.unsqueeze(2))

    def write_weights(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        (folder / SCALES_FILE).write_text(json.dumps({"scales": [list(s) for s in self.scales]}) + "\n")


train = InfinityTokenizerTrainer.train


__all__ = ["InfinityTokenizerTrainConfig", "InfinityTokenizerTrainer", "InfinityVAESection", "ImageDataConfig",
           "ImageQuantConfig", "init_vae_config", "init_scales", "FREEZABLE_2D", "config_from_dict", "load_config",
           "train", "calibrate_latent", "reconstruct_images", "quantize_image_latent", "validate_scales",
           "scales_value", "SHAPES_VAE", "SHAPES_SCALES", "SCALES_FILE"]
