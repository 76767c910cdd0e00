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

Everything random is a pure function of (seed, step): the batch (`tokenizer_data`: Shapes World rendered on the fly,
or windows of manifest videos), the posterior noise and the dropped scales; validation clips are held aside. The
loop, resume, checkpoints and logs are the harness's (`train.harness`); each checkpoint is also a tokenizer folder
(`VideoVAE.from_pretrained` loads it). The finished model goes to `OUTPUT/model/`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import torch

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.quant.residual import quantize_multiscale
from infinitystar.schedules.pyramid import PYRAMID_PRESETS, PyramidConfig, Schedule
from infinitystar.tokenizer.training_eval import frames_to_video, psnr, reconstruct, ssim, video_to_frames
from infinitystar.checkpoint_io import CONFIG_FILE as CONFIG_NAME
from infinitystar.runtime import Compiler
from infinitystar.tokenizer.video_vae import PRESETS, VideoVAE, VideoVAEConfig, VideoVAEPosterior
from infinitystar.train.config import (CheckpointConfig, ConfigError, FileConfig, LogConfig, OptimConfig,
                                       PyramidSection, TrainBase, check_ranges, check_run, preset_section)
from infinitystar.train.adversarial import Adversary
from infinitystar.train.harness import Harness, publish_folder
from infinitystar.train.tokenizer_data import ManifestSource, ShapesSource
from infinitystar.train.tokenizer_loss import (LossConfig, bit_usage, calibrate_scale, kl_divergence,
                                               reconstruction_loss, sample_drop)

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
    in favour of the init folder's config.json when `init` is set, except `decoder_block_out_channels`: a new
    decoder of those widths on the init folder's encoder)."""
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
    val_manifests: list[str] = field(default_factory=list)   # held-aside validation videos (source: manifest)
    val_fraction: float = 0.1            # without val_manifests: the share of manifest items held aside
    frames: int = 17                     # frames per training clip, 1 + k * temporal stride
    height: int = 64
    width: int = 64
    val_samples: int = 16                # fixed validation clips, drawn once from val_seed (never trained on)
    val_seed: int = 1_000_003


@dataclass
class QuantConfig:
    """Stochastic quantizer depth and the latent scale (bitwise mode)."""
    depth_mode: Literal["none", "coarse", "fine", "independent"] = "coarse"
    drop_prob: float = 0.1               # per batch (coarse / fine) or per scale (independent)
    calibrate_scale: bool = True         # at step 0, set the latent scale that minimises the quantization error
    calibration_clips: int = 8           # training clips the calibration measures the error on
    sample_posterior: bool = False       # quantize a posterior sample instead of the mean


@dataclass
class TokenizerTrainSection(TrainBase):
    max_steps: int = 500
    batch_size: int = 4
    freeze: list[str] = field(default_factory=list)   # any of encoder, decoder, proj, scale
    val_every: int = 25                  # steps between validations (0: only at the start and the end)
    # the training step's encoder and decoder passes under torch.compile (needs a C++ compiler on the CPU; without
    # one, or when compiling fails, one warning and eager steps): ~1.1x faster CPU steps after about a minute of
    # compiling per process; validation stays eager
    compile: bool = False


def check_tokenizer_run(cfg, freezable: tuple[str, ...]) -> None:
    """Checks both tokenizer run configs share (besides `check_run`)."""
    t, d, q, lo = cfg.train, cfg.data, cfg.quant, cfg.loss
    check_run(cfg)
    check_ranges(positive={"train.batch_size": t.batch_size, "data.height": d.height, "data.width": d.width,
                           "loss.discriminator_channels": lo.discriminator_channels,
                           "data.val_samples": d.val_samples, "loss.inv_temperature": lo.inv_temperature,
                           "quant.calibration_clips": q.calibration_clips},
                 non_negative={"train.val_every": t.val_every, "loss.l1_weight": lo.l1_weight,
                               "loss.l2_weight": lo.l2_weight, "loss.kl_weight": lo.kl_weight,
                               "loss.content_weight": lo.content_weight, "loss.content_margin": lo.content_margin,
                               "loss.edge_weight": lo.edge_weight, "loss.adversarial_weight": lo.adversarial_weight,
                               "loss.worst_pixel_weight": lo.worst_pixel_weight,
                               "loss.adversarial_start": lo.adversarial_start,
                               "loss.quant_weight": lo.quant_weight,
                               "loss.commitment_weight": lo.commitment_weight,
                               "loss.entropy_weight": lo.entropy_weight},
                 unit={"quant.drop_prob": q.drop_prob})
    if not 0 < lo.worst_pixel_fraction <= 1:
        raise ConfigError(f"loss.worst_pixel_fraction: expected a share in (0, 1], got {lo.worst_pixel_fraction}")
    bad = [f for f in t.freeze if f not in freezable]
    if bad:
        raise ConfigError(f"train.freeze: unknown part(s) {bad}; choose from {', '.join(freezable)}")
    if set(freezable) <= set(t.freeze):
        raise ConfigError("train.freeze: everything would be frozen")


def check_same_architecture(init: str, mine: dict, theirs: dict) -> None:
    """One file may name both a model section and an init folder, as long as they agree."""
    diff = sorted(k for k in mine if mine[k] != theirs[k])
    if diff:
        raise ConfigError(f"model: init {init} has a different architecture ("
                          + ", ".join(f"{k}: {theirs[k]} there, {mine[k]} here" for k in diff)
                          + "); remove the model section or make it match")


NEW_DECODER_KEY = "decoder_block_out_channels"


@dataclass
class TokenizerTrainConfig(FileConfig):
    sections: ClassVar[dict] = {"model": preset_section(VAESection, VideoVAEConfig, list(PRESETS), "small"),
                                # a full PyramidConfig (no preset unless one is named)
                                "pyramid": preset_section(PyramidSection, PyramidConfig, list(PYRAMID_PRESETS), None)}

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
        init = self.init_config()
        if NEW_DECODER_KEY not in self.model.overrides:
            return init
        try:
            return VideoVAEConfig.from_dict({**init.to_dict(), NEW_DECODER_KEY: self.model.overrides[NEW_DECODER_KEY]})
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model: {e}") from None

    def init_config(self) -> VideoVAEConfig:
        """The architecture of the `init` folder."""
        path = Path(self.init) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"init: {self.init} is not a tokenizer folder (no {CONFIG_NAME})")
        try:
            return VideoVAEConfig.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"init: {path}: {e}") from None

    def new_decoder(self) -> bool:
        """Whether the run starts a decoder of other widths on the `init` folder's encoder."""
        return self.init is not None and self.vae_config().decoder_channels != self.init_config().decoder_channels

    def validate(self) -> None:
        d = self.data
        check_tokenizer_run(self, FREEZABLE)
        check_ranges(positive={"data.frames": d.frames}, unit={"data.val_fraction": d.val_fraction})
        if self.init is not None and set(self.model.overrides) - {NEW_DECODER_KEY}:
            mine, theirs = self.model.build().to_dict(), self.init_config().to_dict()
            mine.pop(NEW_DECODER_KEY), theirs.pop(NEW_DECODER_KEY)
            check_same_architecture(self.init, mine, theirs)
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


config_from_dict = TokenizerTrainConfig.from_dict
load_config = TokenizerTrainConfig.load


def make_source(cfg: TokenizerTrainConfig):
    d = cfg.data
    if d.source == "shapes":
        return ShapesSource(d.frames, d.height, d.width, d.val_seed, d.val_samples)
    return ManifestSource(d.manifests, d.frames, d.height, d.width, d.val_seed, d.val_samples, d.val_manifests,
                          d.val_fraction)


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------

def save_tokenizer_folder(model: VideoVAE, pyramid: PyramidConfig, folder: Path) -> None:
    """A tokenizer folder: the weights and config, and beside them the pyramid it quantizes with."""
    model.save_pretrained(folder)
    (Path(folder) / PYRAMID_FILE).write_text(json.dumps(pyramid.to_dict(), indent=1) + "\n")


def encode_one_pass(model: VideoVAE, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training step's encoder pass (one pass, no chunks): the posterior's fields as a tuple of tensors, which
    torch.compile returns as they are."""
    post = model.encode_posterior(video, chunked=False)
    return post.mean, post.logvar, post.enc_h


def decode_one_pass(model: VideoVAE, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z, chunked=False)


class TokenizerTrainer(Harness):
    """The video tokenizer's run: its model (random, or an `init` folder), calibration, one step's losses and
    validation; the harness does the rest. resume: None, "latest" or a checkpoint folder."""

    config_class = TokenizerTrainConfig
    # the training step's model passes, (model, input) -> output, put under torch.compile with train.compile
    encode_fn = staticmethod(encode_one_pass)
    decode_fn = staticmethod(decode_one_pass)
    new_decoder_widths: Optional[tuple[int, ...]] = None   # set when the run starts a new decoder on an init encoder

    def __init__(self, config: TokenizerTrainConfig, resume: Optional[str] = None):
        super().__init__(config, resume)
        cfg = config
        self.name = cfg.mode
        self.setup_data()
        self.model = self.build_model()
        compiler = Compiler("the tokenizer's training step", dynamic=False)   # one batch shape throughout
        self.encode_pass, self.decode_pass = ((compiler.wrap(f) if cfg.train.compile else f)
                                              for f in (self.encode_fn, self.decode_fn))
        self.calibration: Optional[dict] = None
        if self.start is None and self.calibrates():
            self.calibration = self.calibrate(self.clips_to_video(
                self.source.train_clips(self.seed_of("calibrate"), cfg.quant.calibration_clips)))
        for name, p in self.model.named_parameters():
            if name.startswith(self.frozen_prefixes()):
                p.requires_grad_(False)
        self.setup_optimizer(self.model)
        self.adversary: Optional[Adversary] = None
        if cfg.loss.adversarial_weight > 0:
            with self.seeded("discriminator"):
                self.adversary = Adversary(cfg.loss.discriminator_channels, cfg.optim.lr, self.device)
        self.begin()
        self.val_clips = self.source.val_clips()

    # --- what differs between the video and the image tokenizer ------------------------------------------------------
    def setup_data(self) -> None:
        self.pyramid = self.config.pyramid.build()
        self.source = make_source(self.config)

    def build_model(self) -> torch.nn.Module:
        cfg = self.config
        if cfg.init is not None and self.start is None and not cfg.new_decoder():
            return VideoVAE.from_pretrained(cfg.init, device=self.device).train()
        with self.seeded("init"):   # random init from the seed
            model = VideoVAE(cfg.vae_config()).to(self.device).train()
        if cfg.init is not None and self.start is None:     # a new decoder: everything else from the init folder
            self.new_decoder_widths = model.config.decoder_channels
            # strict: the fresh decoder's own tensors plus every other tensor of the init folder, so a key missing,
            # left over or mis-shaped there is an error that names it
            state = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
            state.update((k, v) for k, v in VideoVAE.from_pretrained(cfg.init).state_dict().items()
                         if not k.startswith("decoder."))
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise CheckpointError(f"init: {cfg.init} does not fit the new-decoder model: {e}") from None
        return model

    def calibrates(self) -> bool:
        return self.config.mode == "bitwise" and self.config.quant.calibrate_scale

    def calibrate(self, video: torch.Tensor) -> dict:
        return calibrate_scale(self.model, video, self.pyramid.build(self.config.data.frames))

    def frozen_prefixes(self) -> tuple[str, ...]:
        groups = {"encoder": ("encoder.",), "decoder": ("decoder.",), "proj": ("proj_down.", "proj_up."),
                  "scale": ("scale_learnable_parameters",)}
        return UNUSED_PARAMS + tuple(p for part in self.config.train.freeze for p in groups[part])

    def clips_to_video(self, clips: list[np.ndarray]) -> torch.Tensor:
        return frames_to_video(clips, self.device)

    def batch(self, step: int) -> torch.Tensor:
        """The training batch of a step: a pure function of (seed, step)."""
        cfg = self.config
        return self.clips_to_video(self.source.train_clips(self.seed_of("data", step), cfg.train.batch_size))

    def schedule(self, frames: int) -> Schedule:
        return self.pyramid.build(frames)

    def losses(self, video: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """(loss, logged terms, reconstruction) of one batch at `step` (noise and drops drawn from the step). The
        forward runs in the training precision; the quantizer and the losses in fp32."""
        cfg, m = self.config, self.model
        g = torch.Generator().manual_seed(self.seed_of("noise", step))
        terms: dict[str, float] = {}
        with self.autocast():
            post = VideoVAEPosterior(*self.encode_pass(m, video))
            if cfg.mode == "continuous":
                noise = torch.randn(post.mean.shape, generator=g).to(self.device)
                recon = self.decode_pass(m, m.project_down(post.sample(noise)))
            else:
                if cfg.quant.sample_posterior:
                    z_raw = post.sample(torch.randn(post.mean.shape, generator=g).to(self.device))
                else:
                    z_raw = post.mean
                schedule = self.schedule(video.shape[2])
                drop = sample_drop(cfg.quant.depth_mode, cfg.quant.drop_prob, schedule.scales_per_clip, g)
                q = quantize_multiscale(m.project_down(z_raw), schedule, drop_scales=drop,
                                        inv_temperature=cfg.loss.inv_temperature)
                recon = self.decode_pass(m, q.codes)
        rec_loss, rec_terms = reconstruction_loss(recon, video, cfg.loss)
        terms.update(rec_terms)
        if cfg.mode == "continuous":
            kl = kl_divergence(post.mean, post.logvar)
            loss = rec_loss + cfg.loss.kl_weight * kl
            terms["kl"] = float(kl.detach())
        else:
            aux = q.aux_loss(cfg.loss.commitment_weight, cfg.loss.entropy_weight).float()
            loss = rec_loss + cfg.loss.quant_weight * aux
            terms.update(aux=float(aux.detach()), commitment=float(q.commitment.detach()),
                         entropy=float(q.entropy.detach()), per_sample_entropy=float(q.per_sample_entropy.detach()),
                         codebook_entropy=float(q.codebook_entropy.detach()), dropped=len(drop), **bit_usage(q))
        terms["loss"] = float(loss.detach())
        return loss, terms, recon.float()

    def reconstruct_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        """uint8 reconstructions of validation clips: quantized with all scales in bitwise mode, through the
        posterior mean in continuous mode."""
        pyramid = self.pyramid if self.config.mode == "bitwise" else None
        with self.autocast():
            return video_to_frames(reconstruct(self.model, self.clips_to_video(clips), pyramid))

    def write_weights(self, folder: Path) -> None:
        save_tokenizer_folder(self.model, self.pyramid, folder)

    # --- harness hooks -----------------------------------------------------------------------------------------------
    def forward_backward(self) -> dict[str, Any]:
        video = self.batch(self.step)
        loss, terms, recon = self.losses(video, self.step)
        adversarial = self.adversary is not None and self.step >= self.config.loss.adversarial_start
        if adversarial:
            g_loss = self.adversary.generator_loss(recon)
            loss = loss + self.config.loss.adversarial_weight * g_loss
            terms["g_loss"] = float(g_loss.detach())
        loss.backward()
        if adversarial:
            terms.update(self.adversary.step(video, recon, self.optimizer.param_groups[0]["lr"]))
        # mean of per-clip PSNRs, like validation (an overall-MSE PSNR is dominated by the hardest clip)
        terms["psnr"] = sum(psnr(r, v) for r, v in zip(recon.detach(), video)) / len(video)
        return terms

    def due_for_validation(self) -> bool:
        every = self.config.train.val_every
        return bool(every) and self.step % every == 0

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean PSNR / SSIM over the held-aside validation clips (uint8 outputs)."""
        self.model.eval()
        ps, ss = [], []
        bs = self.config.train.batch_size
        for i in range(0, len(self.val_clips), bs):
            clips = self.val_clips[i:i + bs]
            for ref, rec in zip(clips, self.reconstruct_clips(clips)):
                ps.append(psnr(ref, rec))
                ss.append(ssim(ref, rec))
        self.model.train()
        return {"val_psnr": round(sum(ps) / len(ps), 4), "val_ssim": round(sum(ss) / len(ss), 5)}

    def first_record(self) -> Optional[dict[str, Any]]:
        rec = super().first_record()
        return {**rec, "calibration": self.calibration} if self.calibration else rec

    def describe(self, stop: int) -> str:
        cfg = self.config
        line = super().describe(stop) + (f"; inherited from {cfg.init}" if cfg.init else "")
        if self.new_decoder_widths:
            line += f" (all but the decoder: new, widths {list(self.new_decoder_widths)})"
        if self.calibration and self.step == 0:
            line += (f"; latent scale calibrated to {self.calibration['scale']:.4g} (quantization error "
                     f"{self.calibration['relative_error']:.3f} of the latent's power)")
        return line

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "calibration": self.calibration, "adversarial": self.adversary is not None}

    def load_weights(self, folder: Path, meta: dict) -> None:
        if meta.get("mode", self.config.mode) != self.config.mode:
            raise CheckpointError(f"{folder}: a {meta.get('mode')} checkpoint cannot resume a {self.config.mode} run")
        super().load_weights(folder, meta)

    def save_state(self, folder: Path) -> None:
        if self.adversary is not None:
            self.adversary.save(folder)

    def load_state(self, folder: Path, meta: dict) -> None:
        if self.adversary is not None and meta.get("adversarial"):
            self.adversary.load(folder)   # a checkpoint from before the term was switched on: a fresh discriminator

    def restored(self, meta: dict) -> None:
        self.calibration = meta.get("calibration")

    def training_record(self) -> dict[str, Any]:
        cfg = self.config
        return {"mode": cfg.mode, "init": cfg.init, "steps": self.step, "seed": cfg.seed,
                "calibration": self.calibration, "precision": self.precision, **(self.last_val or {})}

    def export(self, directory: Path) -> Path:
        def write(tmp: Path) -> None:
            self.write_weights(tmp)
            (tmp / TRAINING_FILE).write_text(json.dumps(self.training_record(), indent=1) + "\n")
        return publish_folder(directory, write)


train = TokenizerTrainer.train


__all__ = ["TokenizerTrainConfig", "TokenizerTrainer", "VAESection", "TokenizerDataConfig", "QuantConfig",
           "TokenizerTrainSection", "config_from_dict", "load_config", "train", "make_source", "PYRAMID_FILE",
           "save_tokenizer_folder",
           "DEFAULT_PYRAMID", "TRAINING_FILE", "check_tokenizer_run", "check_same_architecture"]
