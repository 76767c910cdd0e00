"""Training the video tokenizer (`VideoVAE`): a continuous VAE, and the bitwise (multi-scale BSQ) tokenizer either
inherited from a continuous VAE ("knowledge inheritance") or trained from scratch.

Modes (`TokenizerTrainConfig.mode`):
    continuous  encode -> posterior sample (reparameterised) -> project_down -> project_up -> decode;
                loss = l1_weight * L1 + l2_weight * MSE + kl_weight * KL(posterior || N(0, 1)) (means over elements).
    bitwise     encode -> posterior mean -> project_down (x learned scale) -> `quantize_multiscale` (straight-through
                BSQ over the spacetime pyramid, random scale dropping) -> project_up -> decode;
                loss = l1_weight * L1 + l2_weight * MSE + quant_weight * (0.25 * commitment + 0.001 * entropy
                penalty), the official per-scale BSQ terms averaged over scales. With `init` the weights start
                from a continuous VAE folder (inheritance), otherwise from random initialisation.
The reasons behind every default are in docs/tokenizer.md.

Everything random is a pure function of (seed, step): the batch (Shapes World rendered on the fly, train split
only, or windows of manifest videos), the posterior noise and the dropped scales. So a resumed run replays exactly
what an uninterrupted one does. Checkpoints (`OUTPUT/checkpoints/step_XXXXXXXX/`) are written to a temporary folder
and renamed into place; each is also a tokenizer folder (`VideoVAE.from_pretrained` loads it). The finished model
goes to `OUTPUT/model/`. Metrics are JSON lines in `OUTPUT/metrics.jsonl`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_type_hints

import numpy as np
import torch
import yaml

from infinitystar.convert.strict import CheckpointError, load_strict, read_tensors
from infinitystar.quant.residual import MultiScaleQuant, quantize_multiscale
from infinitystar.schedules.pyramid import Schedule
from infinitystar.tokenizer.training_eval import psnr, reconstruct, ssim, video_to_frames
from infinitystar.tokenizer.video_vae import CONFIG_NAME, PRESETS, VideoVAE, VideoVAEConfig
from infinitystar.train.checkpoint import (_atomic_write_text, find_resume, list_checkpoints, load_optimizer_file,
                                         publish_checkpoint, read_meta, save_optimizer)
from infinitystar.train.config import (CheckpointConfig, ConfigError, FileConfig, LogConfig, OptimConfig,
                                       PyramidSection, _build, _coerce, _unknown, set_dotted)
from infinitystar.train.data import derive_seed
from infinitystar.train.lock import lock_run
from infinitystar.train.metrics import MetricsLogger, peak_memory_mb

PYRAMID_FILE = "pyramid.json"          # next to a tokenizer's config.json: the pyramid it was trained with
TRAINING_FILE = "tokenizer_training.json"
# The default model's pyramid (64x64 frames, 8x8 latents; 6x6 and 8x8 are 64-bit detail scales).
DEFAULT_PYRAMID = dict(custom_scales=[[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]], frames_per_clip=4,
                       detail_min_tokens=36)
FREEZABLE = ("encoder", "decoder", "proj", "scale")
UNUSED_PARAMS = ("proj_down_two.", "proj_up_two.")   # kept for strict official loading; never trained


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass
class VAESection:
    """The architecture when training from scratch: a `VideoVAEConfig` preset plus field overrides (ignored
    in favour of the init folder's config.json when `init` is set)."""
    preset: Optional[str] = "small"
    overrides: dict = field(default_factory=dict)

    def build(self) -> VideoVAEConfig:
        try:
            base = {} if self.preset is None else VideoVAEConfig.preset(self.preset).to_dict()
            return VideoVAEConfig.from_dict({**base, **self.overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class TokenizerDataConfig:
    source: Literal["shapes", "manifest"] = "shapes"
    manifests: list[str] = field(default_factory=list)   # JSONL with video_path / image_path (source: manifest)
    frames: int = 17                     # frames per training clip, 1 + k * temporal stride
    height: int = 64
    width: int = 64
    val_samples: int = 16                # fixed validation clips, rendered once from val_seed (never trained on)
    val_seed: int = 1_000_003


@dataclass
class LossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 1.0               # squared error: L1 alone ignores small objects for long (docs)
    content_weight: float = 0.0          # extra per-pixel weight where the target differs from its frame's median
    kl_weight: float = 1e-5              # continuous mode only
    quant_weight: float = 1.0            # bitwise: weight of the BSQ aux loss (the official `lfq_weight` role)
    commitment_weight: float = 0.25      # official per-scale aux: 0.25 * commit + (entropy / 100) * 0.1
    entropy_weight: float = 0.001
    inv_temperature: float = 100.0


@dataclass
class QuantConfig:
    """Stochastic quantizer depth and the latent scale (bitwise mode)."""
    depth_mode: Literal["none", "coarse", "fine", "independent"] = "coarse"
    drop_prob: float = 0.1               # per batch (coarse / fine) or per scale (independent)
    calibrate_scale: bool = True         # at step 0, set the latent scale that minimises the quantization error
    calibration_clips: int = 8           # training clips the calibration measures the error on
    sample_posterior: bool = False       # quantize a posterior sample instead of the mean


@dataclass
class TokenizerTrainSection:
    max_steps: int = 500
    batch_size: int = 4
    freeze: list[str] = field(default_factory=list)   # any of encoder, decoder, proj, scale
    val_every: int = 25                  # steps between validations (0: only at the start and the end)
    threads: Optional[int] = None        # torch.set_num_threads for this process (None: leave as is)


@dataclass
class TokenizerTrainConfig(FileConfig):
    mode: Literal["continuous", "bitwise"] = "continuous"
    init: Optional[str] = None           # tokenizer folder to start from (bitwise: knowledge inheritance)
    output_dir: str = "runs/tokenizer"
    seed: int = 0
    device: str = "auto"                 # auto: cuda when available, else cpu
    model: VAESection = field(default_factory=VAESection)
    pyramid: PyramidSection = field(default_factory=lambda: PyramidSection(None, dict(DEFAULT_PYRAMID)))
    data: TokenizerDataConfig = field(default_factory=TokenizerDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, betas=[0.9, 0.99], warmup_steps=20, decay="cosine", min_lr_ratio=0.1, grad_clip=1.0))
    train: TokenizerTrainSection = field(default_factory=TokenizerTrainSection)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100, keep_last=2))
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        self.validate()

    def vae_config(self) -> VideoVAEConfig:
        if self.init is None:
            return self.model.build()
        path = Path(self.init) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"init: {self.init} is not a tokenizer folder (no {CONFIG_NAME})")
        try:
            raw = json.loads(path.read_text())
            return VideoVAEConfig.from_dict(raw)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"init: {path}: {e}") from None

    def validate(self) -> None:
        t, d, o, q, lo = self.train, self.data, self.optim, self.quant, self.loss
        for k, v in {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size, "data.frames": d.frames,
                     "data.height": d.height, "data.width": d.width, "data.val_samples": d.val_samples,
                     "optim.lr": o.lr, "log.every": self.log.every, "loss.inv_temperature": lo.inv_temperature,
                     "quant.calibration_clips": q.calibration_clips}.items():
            if v <= 0:
                raise ConfigError(f"{k} must be positive, got {v}")
        for k, v in {"train.val_every": t.val_every, "optim.warmup_steps": o.warmup_steps,
                     "optim.grad_clip": o.grad_clip, "optim.weight_decay": o.weight_decay,
                     "checkpoint.every": self.checkpoint.every, "checkpoint.keep_last": self.checkpoint.keep_last,
                     "loss.l1_weight": lo.l1_weight, "loss.l2_weight": lo.l2_weight, "loss.kl_weight": lo.kl_weight,
                     "loss.content_weight": lo.content_weight,
                     "loss.quant_weight": lo.quant_weight, "loss.commitment_weight": lo.commitment_weight,
                     "loss.entropy_weight": lo.entropy_weight}.items():
            if v < 0:
                raise ConfigError(f"{k} must be >= 0, got {v}")
        for k, v in {"quant.drop_prob": q.drop_prob, "optim.min_lr_ratio": o.min_lr_ratio}.items():
            if not 0 <= v <= 1:
                raise ConfigError(f"{k} must be in [0, 1], got {v}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        if t.threads is not None and t.threads < 1:
            raise ConfigError(f"train.threads must be >= 1 or null, got {t.threads}")
        bad = [f for f in t.freeze if f not in FREEZABLE]
        if bad:
            raise ConfigError(f"train.freeze: unknown part(s) {bad}; choose from {', '.join(FREEZABLE)}")
        if set(FREEZABLE) <= set(t.freeze):
            raise ConfigError("train.freeze: everything would be frozen")
        if self.model.preset is not None and self.model.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.model.preset!r}; choose one of "
                              f"{', '.join(PRESETS)} or null")
        if self.init is not None and self.model.overrides:
            # one file can serve both the inherited and the from-scratch run, as long as they agree
            mine, theirs = self.model.build().to_dict(), self.vae_config().to_dict()
            diff = sorted(k for k in mine if mine[k] != theirs[k])
            if diff:
                raise ConfigError(f"model: init {self.init} has a different architecture ("
                                  + ", ".join(f"{k}: {theirs[k]} there, {mine[k]} here" for k in diff)
                                  + "); remove the model section or make it match")
        if d.source == "manifest" and not d.manifests:
            raise ConfigError("data.manifests: give at least one manifest for data.source 'manifest'")
        vae, pyramid = self.vae_config(), self.pyramid.build()
        ts, ss = vae.temporal_stride, vae.spatial_stride
        if (d.frames - 1) % ts:
            raise ConfigError(f"data.frames must be 1 + k * {ts} (the tokenizer's temporal stride), got {d.frames}")
        if d.height % ss or d.width % ss:
            raise ConfigError(f"data.height/width must be multiples of the tokenizer's spatial stride {ss}, got "
                              f"{d.height}x{d.width}")
        if pyramid.temporal_compression != ts:
            raise ConfigError(f"pyramid.temporal_compression ({pyramid.temporal_compression}) must equal the "
                              f"tokenizer's temporal stride ({ts})")
        if pyramid.detail_bits != vae.codebook_dim or pyramid.semantic_bits > vae.codebook_dim:
            raise ConfigError(f"pyramid bits ({pyramid.semantic_bits}/{pyramid.detail_bits}) must fit the "
                              f"tokenizer's {vae.codebook_dim} latent channels (detail_bits = {vae.codebook_dim})")
        latent = (d.height // ss, d.width // ss)
        if tuple(pyramid.spatial_scales()[-1]) != latent:
            raise ConfigError(f"pyramid: the last scale {list(pyramid.spatial_scales()[-1])} must be the latent size "
                              f"{list(latent)} of {d.height}x{d.width} frames")



def _build_model_section(d: Any, where: str) -> VAESection:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    d = dict(d)
    preset = d.pop("preset", "small")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"{where}.preset: expected a string or null, got {preset!r}")
    names = {f.name for f in dataclasses.fields(VideoVAEConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; known keys: preset, {', '.join(sorted(names))}")
    return VAESection(preset, d)


def config_from_dict(d: dict, overrides: Optional[list[str]] = None) -> TokenizerTrainConfig:
    """Validate a raw mapping (plus `key=value` overrides, values parsed as YAML) into a config. Unknown keys and
    ill-typed values are `ConfigError`s naming the dotted key; omitted keys keep TokenizerTrainConfig's defaults
    (a `pyramid` mapping without `preset` is a full PyramidConfig, not an override of a preset)."""
    if not isinstance(d, dict):
        raise ConfigError(f"a tokenizer training config must be a mapping at the top level, got {type(d).__name__}")
    d = json.loads(json.dumps(d))   # deep copy; also rejects non-JSON values early
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        k, v = item.split("=", 1)
        set_dotted(d, k.strip(), yaml.safe_load(v))
    fields = {f.name: f for f in dataclasses.fields(TokenizerTrainConfig)}
    hints = get_type_hints(TokenizerTrainConfig)
    _unknown(set(fields), d, "")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        tp = hints[name]
        if name == "model":
            kwargs[name] = _build_model_section(value, name)
        elif name == "pyramid":
            if not isinstance(value, dict):
                raise ConfigError(f"pyramid: expected a mapping, got {value!r}")
            kwargs[name] = _build(PyramidSection, {"preset": None, **value}, name)
        elif dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
            default = dataclasses.asdict(fields[name].default_factory())
            kwargs[name] = _build(tp, {**default, **value}, name)
        else:
            kwargs[name] = _coerce(value, tp, name)
    return TokenizerTrainConfig(**kwargs)


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> TokenizerTrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    return config_from_dict(raw, overrides)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

class ShapesSource:
    """Shapes World clips rendered on the fly from the train split (held-out colour/shape pairs never appear)."""

    def __init__(self, frames: int, height: int, width: int):
        from infinitystar.shapes.world import CANVAS
        if (height, width) != (CANVAS, CANVAS):
            raise ConfigError(f"data: Shapes World frames are {CANVAS}x{CANVAS}, got {height}x{width}")
        self.frames = frames

    def clips(self, seed: int, n: int, split: str = "train") -> list[np.ndarray]:
        from infinitystar.shapes.data import iter_samples
        kinds = ("image",) if self.frames == 1 else ("video",)
        return [s["frames"] for s in iter_samples(seed, kinds, split, video_frames=(self.frames,), limit=n)]


class ManifestSource:
    """Random windows of `frames` frames from the videos (or single images) listed in JSONL manifests
    (`video_path` or `image_path`, relative to the manifest; optional `begin_frame_id` / `end_frame_id`),
    cover-resized and centre-cropped to height x width."""

    def __init__(self, manifests: list[str], frames: int, height: int, width: int):
        from infinitystar.train.data import find_manifests
        self.frames, self.height, self.width = frames, height, width
        self.items: list[tuple[str, str, int, Optional[int]]] = []
        for path in find_manifests(manifests):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{path}:{i}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{where}: not JSON ({e})") from None
                key = "video_path" if "video_path" in rec else "image_path" if "image_path" in rec else None
                if key is None or not isinstance(rec[key], str):
                    raise ConfigError(f"{where}: a line needs a string video_path or image_path")
                if key == "image_path" and frames != 1:
                    continue   # an image cannot fill a multi-frame clip
                media = rec[key] if os.path.isabs(rec[key]) else str((path.parent / rec[key]).resolve())
                self.items.append((key, media, int(rec.get("begin_frame_id", 0) or 0), rec.get("end_frame_id")))
        if not self.items:
            raise ConfigError(f"data.manifests: no usable {'image or video' if frames == 1 else 'video'} lines "
                              f"in {manifests}")

    def _load(self, item, rng: random.Random) -> Optional[np.ndarray]:
        from infinitystar.media import MediaError, load_image, load_video
        from infinitystar.train.data import resize_cover_crop
        key, media, begin, end = item
        try:
            arr = load_image(media)[None] if key == "image_path" else load_video(media)
        except MediaError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            return None
        arr = arr[begin:end]
        if len(arr) < self.frames:
            return None
        start = rng.randrange(len(arr) - self.frames + 1)
        return resize_cover_crop(arr[start:start + self.frames], self.height, self.width)

    def clips(self, seed: int, n: int, split: str = "train") -> list[np.ndarray]:
        rng = random.Random(seed)
        out = []
        for _ in range(50 * n):
            if len(out) == n:
                return out
            clip = self._load(self.items[rng.randrange(len(self.items))], rng)
            if clip is not None:
                out.append(clip)
        raise RuntimeError(f"could not read {n} clips of {self.frames} frames from the manifests (too short or "
                           f"unreadable files)")


def make_source(cfg: TokenizerTrainConfig):
    d = cfg.data
    if d.source == "shapes":
        return ShapesSource(d.frames, d.height, d.width)
    return ManifestSource(d.manifests, d.frames, d.height, d.width)


def clips_to_video(clips: list[np.ndarray], device) -> torch.Tensor:
    """uint8 clips (T, H, W, 3) -> (B, 3, T, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.stack(clips)).to(device)
    return x.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


# --------------------------------------------------------------------------------------------------
# Losses and the quantizer path
# --------------------------------------------------------------------------------------------------

CONTENT_THRESHOLD = 0.1   # in [-1, 1] units: ~13 levels of uint8, above flat-region noise


def content_weights(video: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, T, H, W): 1 + `weight` where any channel of the target is more than
    CONTENT_THRESHOLD away from its frame's per-channel median. On sparse content (a small object on a flat
    background) the median is the background, so the object is up-weighted; see docs/tokenizer.md."""
    median = video.flatten(3).median(dim=-1).values[..., None, None]
    salient = (video - median).abs().amax(dim=1, keepdim=True) > CONTENT_THRESHOLD
    return 1.0 + weight * salient.to(video.dtype)


def reconstruction_loss(recon: torch.Tensor, video: torch.Tensor, loss: LossConfig) -> tuple[torch.Tensor, dict]:
    """l1_weight * L1 + l2_weight * MSE (means over pixels, weighted by `content_weights` when
    loss.content_weight > 0)."""
    diff = recon - video
    w = content_weights(video, loss.content_weight) if loss.content_weight > 0 else None
    l1 = diff.abs().mean() if w is None else (w * diff.abs()).mean()
    out = loss.l1_weight * l1
    terms = {"l1": float(l1.detach())}
    if loss.l2_weight > 0:
        mse = diff.square().mean() if w is None else (w * diff.square()).mean()
        out = out + loss.l2_weight * mse
        terms["mse"] = float(mse.detach())
    return out, terms


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), mean over elements."""
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


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name} requested but CUDA is not available")
    return dev


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    from infinitystar.train.trainer import lr_at as generator_lr_at   # the generator trainer's schedule
    return generator_lr_at(step, optim, max_steps)


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    model_dir: Optional[Path]
    val_psnr: Optional[float]
    seconds: float


STEP_DIR = "step_{:08d}"


class TokenizerTrainer:
    """One training run. `fit()` trains to train.max_steps (or `until`), validating, logging and checkpointing.

    resume: None (fresh run; an output folder with checkpoints is an error), "latest" or a checkpoint folder."""

    def __init__(self, config: TokenizerTrainConfig, resume: Optional[str] = None):
        self.config = cfg = config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.lock = lock_run(self.out)   # one run per output_dir while this trainer lives
        self.pyramid = cfg.pyramid.build()
        self.source = make_source(cfg)
        self.step = 0

        start = None
        if resume is not None:
            start = find_resume(self.ckpt_root, resume)
            if start is None:
                raise CheckpointError(f"--resume: no complete checkpoint in {self.ckpt_root}")
        elif list_checkpoints(self.ckpt_root):
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another "
                              f"output_dir")

        vae_cfg = cfg.vae_config()
        if cfg.init is not None and start is None:
            self.model = VideoVAE.from_pretrained(cfg.init, device=self.device)
        else:
            # random init is a function of the seed; the caller's global RNG state is left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(cfg.seed, "init"))
                self.model = VideoVAE(vae_cfg).to(self.device)
        self.model.train()
        self.calibration: Optional[dict] = None
        if start is None and cfg.mode == "bitwise" and cfg.quant.calibrate_scale:
            clips = self.source.clips(derive_seed(cfg.seed, "calibrate"), cfg.quant.calibration_clips)
            video = self._batch_of(clips)
            self.calibration = calibrate_scale(self.model, video, self.pyramid.build(cfg.data.frames))

        groups = {"encoder": ("encoder.",), "decoder": ("decoder.",), "proj": ("proj_down.", "proj_up."),
                  "scale": ("scale_learnable_parameters",)}
        frozen = tuple(p for part in cfg.train.freeze for p in groups[part])
        self._init_optimization(UNUSED_PARAMS + frozen, start)
        self.val_clips = self.source.clips(cfg.data.val_seed, cfg.data.val_samples)
        self.last_checkpoint: Optional[Path] = start

    # --- pieces -------------------------------------------------------------------------------------------
    def _init_optimization(self, frozen: tuple[str, ...], start: Optional[Path]) -> None:
        """AdamW over the parameters outside the `frozen` name prefixes (weight decay on matrices only), the JSONL
        log, then either the checkpoint `start` restored or a fresh run folder (log cleared, config written)."""
        cfg = self.config
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if name.startswith(frozen):
                p.requires_grad_(False)
                continue
            (decay if p.dim() >= 2 else no_decay).append(p)
        self.params = decay + no_decay
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out / "metrics.jsonl")
        if start is not None:
            self._restore(start)
            self.logger.truncate_after(self.step)
        else:
            if (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            _atomic_write_text(self.out / "config.yaml", cfg.to_yaml())

    def _batch_of(self, clips: list[np.ndarray]) -> torch.Tensor:
        return clips_to_video(clips, self.device)

    def batch(self, step: int) -> torch.Tensor:
        """The training batch of a step: a pure function of (seed, step)."""
        cfg = self.config
        return self._batch_of(self.source.clips(derive_seed(cfg.seed, "data", step), cfg.train.batch_size))

    def schedule(self, frames: int) -> Schedule:
        return self.pyramid.build(frames)

    def losses(self, video: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """(loss, logged terms, reconstruction) of one batch at `step` (noise and drops drawn from the step)."""
        cfg, m = self.config, self.model
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, "noise", step))
        post = m.encode_posterior(video, chunked=False)
        terms: dict[str, float] = {}
        if cfg.mode == "continuous":
            noise = torch.randn(post.mean.shape, generator=g).to(self.device)
            recon = m.decode(m.project_down(post.sample(noise)), chunked=False)
            kl = kl_divergence(post.mean, post.logvar)
            rec_loss, rec_terms = reconstruction_loss(recon, video, cfg.loss)
            loss = rec_loss + cfg.loss.kl_weight * kl
            terms.update(**rec_terms, kl=float(kl.detach()))
        else:
            if cfg.quant.sample_posterior:
                z_raw = post.sample(torch.randn(post.mean.shape, generator=g).to(self.device))
            else:
                z_raw = post.mean
            schedule = self.schedule(video.shape[2])
            drop = sample_drop(cfg.quant.depth_mode, cfg.quant.drop_prob, schedule.scales_per_clip, g)
            q = quantize_multiscale(m.project_down(z_raw), schedule, drop_scales=drop,
                                    inv_temperature=cfg.loss.inv_temperature)
            recon = m.decode(q.codes, chunked=False)
            rec_loss, rec_terms = reconstruction_loss(recon, video, cfg.loss)
            aux = q.aux_loss(cfg.loss.commitment_weight, cfg.loss.entropy_weight)
            loss = rec_loss + cfg.loss.quant_weight * aux
            terms.update(**rec_terms, aux=float(aux.detach()), commitment=float(q.commitment.detach()),
                         entropy=float(q.entropy.detach()),
                         per_sample_entropy=float(q.per_sample_entropy.detach()),
                         codebook_entropy=float(q.codebook_entropy.detach()),
                         dropped=len(drop), **bit_usage(q))
        terms["loss"] = float(loss.detach())
        return loss, terms, recon

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        video = self.batch(self.step)
        loss, terms, recon = self.losses(video, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            terms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip))
        self.optimizer.step()
        self.step += 1
        # mean of per-clip PSNRs, like validation (an overall-MSE PSNR is dominated by the hardest clip)
        terms["psnr"] = sum(psnr(r, v) for r, v in zip(recon.detach(), video)) / len(video)
        terms["lr"] = lr
        return terms

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean PSNR / SSIM over the fixed validation clips (uint8 outputs), after quantization with all scales in
        bitwise mode, through the posterior mean in continuous mode."""
        cfg = self.config
        pyramid = self.pyramid if cfg.mode == "bitwise" else None
        ps, ss = [], []
        bs = cfg.train.batch_size
        for i in range(0, len(self.val_clips), bs):
            clips = self.val_clips[i:i + bs]
            out = video_to_frames(reconstruct(self.model, self._batch_of(clips), pyramid))
            for ref, rec in zip(clips, out):
                ps.append(psnr(ref, rec))
                ss.append(ssim(ref, rec))
        return {"val_psnr": round(sum(ps) / len(ps), 4), "val_ssim": round(sum(ss) / len(ss), 5)}

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _write_model(self, folder: Path) -> None:
        self.model.save_pretrained(folder)
        (folder / PYRAMID_FILE).write_text(json.dumps(self.pyramid.to_dict(), indent=1) + "\n")

    def save(self) -> Path:
        """Atomic: everything goes to `.tmp-step_X/`, which is renamed into place before `latest` moves."""
        root = self.ckpt_root
        root.mkdir(parents=True, exist_ok=True)
        for stray in root.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)
        final = root / STEP_DIR.format(self.step)
        tmp = root / f".tmp-{final.name}"
        tmp.mkdir()
        self._write_model(tmp)
        if self.config.checkpoint.save_optimizer:
            save_optimizer(tmp, self.optimizer)
        meta = {"step": self.step, "mode": self.config.mode, "calibration": self.calibration,
                "has_optimizer": self.config.checkpoint.save_optimizer, "config": self.config.to_dict()}
        _atomic_write_text(tmp / "trainer.json", json.dumps(meta, indent=1))
        publish_checkpoint(tmp, final, self.config.checkpoint.keep_last)
        self.last_checkpoint = final
        return final

    def _restore(self, path: Path) -> None:
        meta = read_meta(path)
        if meta.get("mode") != self.config.mode:
            raise CheckpointError(f"{path}: a {meta.get('mode')} checkpoint cannot resume a {self.config.mode} run")
        load_strict(self.model, read_tensors(path / "model.safetensors"), str(path / "model.safetensors"))
        load_optimizer_file(path, meta, self.optimizer, self.device)
        self.step = int(meta["step"])
        self.calibration = meta.get("calibration")

    # --- loop -------------------------------------------------------------------------------------------------
    def fit(self, until: Optional[int] = None) -> TrainResult:
        """Train to train.max_steps, or stop after step `until` (the LR schedule still follows max_steps) and
        checkpoint there, as an interrupted run would."""
        from tqdm import tqdm
        cfg = self.config
        stop = cfg.train.max_steps if until is None else min(until, cfg.train.max_steps)
        t0 = time.perf_counter()
        n_params = sum(p.numel() for p in self.params)
        if cfg.log.progress:
            print(f"tokenizer train ({cfg.mode}{', inherited from ' + cfg.init if cfg.init else ''}): "
                  f"{n_params:,} trainable parameters on {self.device}, step {self.step} -> {stop}"
                  + (f"; latent scale calibrated to {self.calibration['scale']:.4g} (quantization error "
                     f"{self.calibration['relative_error']:.3f} of the latent's power)"
                     if self.calibration and self.step == 0 else ""), file=sys.stderr, flush=True)
        last_val = None
        if self.step == 0:
            last_val = self.validate()
            self.logger.log({"step": 0, **last_val, **({"calibration": self.calibration} if self.calibration
                                                        else {})})
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not cfg.log.progress, desc=cfg.mode,
                   dynamic_ncols=True, file=sys.stderr)
        window: dict[str, float] = {}
        n, t_last = 0, time.perf_counter()
        while self.step < stop:
            terms = self.train_step()
            bar.update(1)
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v
            n += 1
            rec: dict[str, Any] = {}
            if self.step % cfg.log.every == 0 or self.step == stop:
                now = time.perf_counter()
                rec = {"step": self.step, **{k: round(v / n, 6) for k, v in window.items()},
                       "lr": terms["lr"], "s_per_step": round((now - t_last) / n, 4),
                       "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
                window, n, t_last = {}, 0, now
            every = cfg.train.val_every
            if (every and self.step % every == 0) or self.step == cfg.train.max_steps:
                last_val = self.validate()
                rec = {"step": self.step, **rec, **last_val}
                t_last = time.perf_counter()   # validation time is not training time
            if rec:
                self.logger.log(rec)
                bar.set_postfix(loss=f"{rec.get('loss', terms['loss']):.4f}",
                                psnr=f"{rec.get('val_psnr', rec.get('psnr', terms['psnr'])):.2f}")
            ck = cfg.checkpoint.every
            if (ck and self.step % ck == 0) or self.step == stop:
                self.save()
        bar.close()
        model_dir = None
        if self.step >= cfg.train.max_steps:
            model_dir = self.out / "model"
            tmp = self.out / ".tmp-model"
            shutil.rmtree(tmp, ignore_errors=True)
            self._write_model(tmp)
            (tmp / TRAINING_FILE).write_text(json.dumps(
                {"mode": cfg.mode, "init": cfg.init, "steps": self.step, "seed": cfg.seed,
                 "calibration": self.calibration, **(last_val or {})}, indent=1) + "\n")
            if model_dir.exists():
                shutil.rmtree(model_dir)
            os.replace(tmp, model_dir)
        self.logger.close()
        return TrainResult(self.step, self.out, model_dir, (last_val or {}).get("val_psnr"),
                           time.perf_counter() - t0)


def train(config: Union[TokenizerTrainConfig, str, Path], *, resume: Optional[str] = None,
          overrides: Optional[list[str]] = None, until: Optional[int] = None) -> TrainResult:
    """Train a tokenizer from a config object or a YAML file (plus `key=value` overrides)."""
    if not isinstance(config, TokenizerTrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        config = config_from_dict(config.to_dict(), overrides)
    return TokenizerTrainer(config, resume=resume).fit(until=until)


__all__ = ["TokenizerTrainConfig", "TokenizerTrainer", "TrainResult", "VAESection", "TokenizerDataConfig",
           "LossConfig", "QuantConfig", "TokenizerTrainSection", "config_from_dict", "load_config", "train",
           "calibrate_scale", "sample_drop", "kl_divergence", "bit_usage", "PYRAMID_FILE",
           "DEFAULT_PYRAMID"]
