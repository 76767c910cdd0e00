"""Training the 2-D Infinity image tokenizer (`InfinityVAE`) on images, with the video tokenizer's trainer.

The loop, the optimizer, the learning-rate schedule, the losses (L1 + MSE, optional object weighting, the BSQ
aux loss), stochastic quantizer depth, checkpoints, resume, the progress bar and the JSONL log are those of
`infinitystar.tokenizer.training` (`InfinityTokenizerTrainer` subclasses `TokenizerTrainer` and only replaces
what is specific to the model: building it, one batch's losses, validation and the saved folder). Images travel
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

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import numpy as np
import torch
import yaml

from infinitystar.quant.residual import quantize_multiscale
from infinitystar.schedules.infinity_resolution import check_custom_scales, image_schedule
from infinitystar.tokenizer.infinity_vae import (CONFIG_TYPE as VAE_CONFIG_TYPE, PRESETS as VAE_PRESETS, InfinityVAE,
                                                 InfinityVAEConfig)
from infinitystar.tokenizer.training import (LossConfig, QuantConfig, TokenizerTrainer, TokenizerTrainSection,
                                             TrainResult, bit_usage, clips_to_video, reconstruction_loss,
                                             resolve_device, sample_drop)
from infinitystar.tokenizer.training_eval import psnr, ssim, video_to_frames
from infinitystar.train.checkpoint import find_resume, list_checkpoints
from infinitystar.train.config import (CheckpointConfig, ConfigError, LogConfig, OptimConfig, _build, _coerce,
                                       _unknown, set_dotted)
from infinitystar.train.data import derive_seed
from infinitystar.train.lock import lock_run
from infinitystar.convert.strict import CheckpointError

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


@dataclass
class InfinityTokenizerTrainConfig:
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
        t, d, o, q, lo = self.train, self.data, self.optim, self.quant, self.loss
        for k, v in {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size, "data.height": d.height,
                     "data.width": d.width, "data.val_samples": d.val_samples, "optim.lr": o.lr,
                     "log.every": self.log.every, "loss.inv_temperature": lo.inv_temperature,
                     "quant.calibration_clips": q.calibration_clips}.items():
            if v <= 0:
                raise ConfigError(f"{k} must be positive, got {v}")
        for k, v in {"train.val_every": t.val_every, "optim.warmup_steps": o.warmup_steps,
                     "optim.grad_clip": o.grad_clip, "optim.weight_decay": o.weight_decay,
                     "checkpoint.every": self.checkpoint.every, "checkpoint.keep_last": self.checkpoint.keep_last,
                     "loss.l1_weight": lo.l1_weight, "loss.l2_weight": lo.l2_weight,
                     "loss.content_weight": lo.content_weight, "loss.quant_weight": lo.quant_weight,
                     "loss.commitment_weight": lo.commitment_weight, "loss.entropy_weight": lo.entropy_weight}.items():
            if v < 0:
                raise ConfigError(f"{k} must be >= 0, got {v}")
        for k, v in {"quant.drop_prob": q.drop_prob, "optim.min_lr_ratio": o.min_lr_ratio}.items():
            if not 0 <= v <= 1:
                raise ConfigError(f"{k} must be in [0, 1], got {v}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if t.threads is not None and t.threads < 1:
            raise ConfigError(f"train.threads must be >= 1 or null, got {t.threads}")
        if q.sample_posterior:
            raise ConfigError("quant.sample_posterior: the Infinity VAE has no posterior (its encoder output is "
                              "quantized directly); set it to false")
        bad = [f for f in t.freeze if f not in FREEZABLE_2D]
        if bad:
            raise ConfigError(f"train.freeze: unknown part(s) {bad}; choose from {', '.join(FREEZABLE_2D)}")
        if set(FREEZABLE_2D) <= set(t.freeze):
            raise ConfigError("train.freeze: everything would be frozen")
        if self.model is not None and self.model.preset != "shapes" and self.model.preset not in VAE_PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.model.preset!r}; choose shapes or one of "
                              f"{', '.join(VAE_PRESETS)}")
        if self.calibrates() and "encoder" in t.freeze:
            raise ConfigError("quant.calibrate_scale (on by default without init) rescales the encoder's last "
                              "convolution, which train.freeze keeps fixed; set quant.calibrate_scale: false or "
                              "unfreeze the encoder")
        vae = self.vae_config()
        if self.init is not None:
            if self.model is not None:
                # one file may name both, as long as they agree
                mine, theirs = self.model.build().to_dict(), vae.to_dict()
                diff = sorted(k for k in mine if mine[k] != theirs[k])
                if diff:
                    raise ConfigError(f"model: init {self.init} has a different architecture ("
                                      + ", ".join(f"{k}: {theirs[k]} there, {mine[k]} here" for k in diff)
                                      + "); remove the model section or make it match")
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

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        sec = out["model"]
        if sec is not None:
            out["model"] = {"preset": sec["preset"], **sec["overrides"]}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


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
    if raw.get("type", VAE_CONFIG_TYPE) != VAE_CONFIG_TYPE:   # a folder without a type is taken as one (read_folder)
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


def validate_scales(scales: Any, key: str) -> None:
    """An image schedule starting at [1, 1] whose grids grow (`check_custom_scales`), as a ConfigError."""
    try:
        check_custom_scales(scales, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_config(cls, d: dict, overrides: Optional[list[str]], sections: dict, what: str):
    """Validate a raw mapping (plus `key=value` overrides, values parsed as YAML) into `cls`: unknown keys and
    ill-typed values are `ConfigError`s naming the dotted key; a dataclass section given in part keeps the
    defaults of the rest; `sections` maps a field name to its own builder (value, key) -> object."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a mapping at the top level, got {type(d).__name__}")
    d = json.loads(json.dumps(d))   # deep copy; also rejects non-JSON values early
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        set_dotted(d, k.strip(), yaml.safe_load(v))
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    _unknown(set(fields), d, "")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        tp = hints[name]
        if name in sections:
            kwargs[name] = sections[name](value, name)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
            default = dataclasses.asdict(fields[name].default_factory())
            kwargs[name] = _build(tp, {**default, **value}, name)
        else:
            kwargs[name] = _coerce(value, tp, name)
    return cls(**kwargs)


def _vae_section(value: Any, where: str) -> Optional[InfinityVAESection]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    value = dict(value)
    preset = value.pop("preset", "shapes")
    if not isinstance(preset, str):
        raise ConfigError(f"{where}.preset: expected a string, got {preset!r}")
    names = {f.name for f in dataclasses.fields(InfinityVAEConfig)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; known keys: preset, {', '.join(sorted(names))}")
    return InfinityVAESection(preset, value)


def _scales_value(value: Any, where: str) -> list[list[int]]:
    validate_scales(value, where)
    return [list(s) for s in value]


def config_from_dict(d: dict, overrides: Optional[list[str]] = None) -> InfinityTokenizerTrainConfig:
    return build_config(InfinityTokenizerTrainConfig, d, overrides, {"model": _vae_section, "scales": _scales_value},
                        "an Infinity tokenizer training config")


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> InfinityTokenizerTrainConfig:
    try:
        return config_from_dict(load_yaml(path), overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------

def shapes_images(seed: int, n: int, split: str = "train") -> list[np.ndarray]:
    """n rendered Shapes World images (1, 64, 64, 3) uint8 of a split, a pure function of the seed."""
    from infinitystar.shapes.data import iter_samples
    return [s["frames"] for s in iter_samples(seed, ("image",), split, limit=n)]


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

class InfinityTokenizerTrainer(TokenizerTrainer):
    """`TokenizerTrainer` for the 2-D Infinity VAE: same loop, checkpoints and logs (see the module docstring)."""

    def __init__(self, config: InfinityTokenizerTrainConfig, resume: Optional[str] = None):
        self.config = cfg = config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.lock = lock_run(self.out)   # one run per output_dir while this trainer lives
        self.scales = cfg.scale_list()
        self.step = 0
        start = None
        if resume is not None:
            start = find_resume(self.ckpt_root, resume)
            if start is None:
                raise CheckpointError(f"--resume: no complete checkpoint in {self.ckpt_root}")
        elif list_checkpoints(self.ckpt_root):
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another "
                              f"output_dir")
        if cfg.init is not None and start is None:
            try:   # strict: every key and shape of the folder must match the model
                self.model = InfinityVAE.from_pretrained(cfg.init, device=self.device)
            except (CheckpointError, ValueError, TypeError) as e:
                raise ConfigError(f"init: {e}") from None
        else:
            with torch.random.fork_rng(devices=[]):   # init from the seed; the caller's RNG is left as it was
                torch.manual_seed(derive_seed(cfg.seed, "init"))
                self.model = InfinityVAE(cfg.vae_config()).to(self.device)
        self.model.train()
        self.calibration: Optional[dict] = None
        if start is None and cfg.calibrates():
            imgs = shapes_images(derive_seed(cfg.seed, "calibrate"), cfg.quant.calibration_clips)
            self.calibration = calibrate_latent(self.model, self._batch_of(imgs)[:, :, 0], self.scales)
        self._init_optimization(tuple(f"{part}." for part in cfg.train.freeze), start)
        self.val_clips = shapes_images(cfg.data.val_seed, cfg.data.val_samples)
        self.last_checkpoint: Optional[Path] = start

    def _batch_of(self, clips: list[np.ndarray]) -> torch.Tensor:
        return clips_to_video(clips, self.device)          # (B, 3, 1, H, W)

    def batch(self, step: int) -> torch.Tensor:
        cfg = self.config
        return self._batch_of(shapes_images(derive_seed(cfg.seed, "data", step), cfg.train.batch_size))

    def losses(self, video: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        cfg, m = self.config, self.model
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "noise", step))
        drop = sample_drop(cfg.quant.depth_mode, cfg.quant.drop_prob, len(self.scales), g)
        q = quantize_image_latent(m.encode(video[:, :, 0]), self.scales, drop_scales=drop,
                                  inv_temperature=cfg.loss.inv_temperature)
        recon = m.decode(q.codes, clamp=False).unsqueeze(2)   # unclamped: a clamp would stop gradients at +-1
        rec_loss, terms = reconstruction_loss(recon, video, cfg.loss)
        aux = q.aux_loss(cfg.loss.commitment_weight, cfg.loss.entropy_weight)
        loss = rec_loss + cfg.loss.quant_weight * aux
        terms.update(aux=float(aux.detach()), commitment=float(q.commitment.detach()),
                     entropy=float(q.entropy.detach()), dropped=len(drop), **bit_usage(q))
        terms["loss"] = float(loss.detach())
        return loss, terms, recon.clamp(-1, 1)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean PSNR / SSIM of the fixed validation images (uint8), quantized with every scale."""
        self.model.eval()
        ps, ss = [], []
        bs = self.config.train.batch_size
        for i in range(0, len(self.val_clips), bs):
            clips = self.val_clips[i:i + bs]
            rec = reconstruct_images(self.model, self._batch_of(clips)[:, :, 0], self.scales)
            for ref, out in zip(clips, video_to_frames(rec.unsqueeze(2))):
                ps.append(psnr(ref, out))
                ss.append(ssim(ref, out))
        self.model.train()
        return {"val_psnr": round(sum(ps) / len(ps), 4), "val_ssim": round(sum(ss) / len(ss), 5)}

    def _write_model(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        (folder / SCALES_FILE).write_text(json.dumps({"scales": [list(s) for s in self.scales]}) + "\n")


def train(config: Union[InfinityTokenizerTrainConfig, str, Path], *, resume: Optional[str] = None,
          overrides: Optional[list[str]] = None, until: Optional[int] = None) -> TrainResult:
    """Train the 2-D tokenizer from a config object or a YAML file (plus `key=value` overrides)."""
    if not isinstance(config, InfinityTokenizerTrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        config = config_from_dict(config.to_dict(), overrides)
    return InfinityTokenizerTrainer(config, resume=resume).fit(until=until)


__all__ = ["InfinityTokenizerTrainConfig", "InfinityTokenizerTrainer", "InfinityVAESection", "ImageDataConfig",
           "ImageQuantConfig", "init_vae_config", "init_scales", "FREEZABLE_2D",
           "config_from_dict", "load_config", "train", "calibrate_latent", "reconstruct_images",
           "quantize_image_latent", "validate_scales", "build_config", "shapes_images", "SHAPES_VAE",
           "SHAPES_SCALES", "SCALES_FILE"]
