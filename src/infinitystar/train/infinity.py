"""Training a small Infinity text-to-image transformer on Shapes World images, and exporting a model folder.

One step (everything random is a pure function of (seed, step), so a resumed run replays an uninterrupted one):
  1. a batch of train-split Shapes World images with their captions (the held-out colour/shape pairs never appear);
  2. the frozen tokenizer (`InfinityVAE`) encodes them; the frozen built-in text encoder (`WordTextEncoder`)
     encodes the captions;
  3. `teacher_forcing` runs the shared residual loop over the custom schedule with bitwise self-correction
     (`bitwise_self_correction`: per scale a flip rate p ~ U{0, .01, ..., strength}, the targets stay clean);
  4. `forward_loss` (`train.infinity_targets`) with condition dropout (captions -> the learned null text with
     probability `train.cond_drop_rate`, for classifier-free guidance), reduced with `token_weights`; the
     forward runs in the training precision, the bit head and the loss in fp32;
  5. the harness's step (`train.harness`): AdamW (weight decay on matrices only), linear warm-up then cosine
     decay, gradient clipping, optional EMA.

Why the text encoder is frozen: the Shapes World vocabulary is 26 words in fixed templates, and a randomly
initialised word encoder already maps every word and position to distinct features; the transformer's text
pooler, text MLP and cross-attention (all trained) learn to read them. Freezing costs no quality we could measure
in this budget, makes each step cheaper, and keeps "never trained on held-out pairs" trivially true for it.

Checkpoints (`OUTPUT/checkpoints/step_XXXXXXXX/`, written to a temporary folder and renamed into place) hold the
transformer (`config.json` + `model.safetensors`, loadable by `InfinityTransformer.from_pretrained`), the EMA
weights (`ema.safetensors`), the optimizer state and `trainer.json`. The finished run is exported to
`OUTPUT/model/`, a folder `InfinityPipeline.from_pretrained` and `infinitystar generate --model` read.

`replace_tokenizer` copies such a folder with another tokenizer whose encoder is bit-identical to the one the
transformer was trained with (a decoder-only fine-tune, `train.freeze: [encoder]`): the codes stay the same, only
the pixels change (`infinitystar infinity swap-tokenizer`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.model.infinity import INFINITY_PRESETS, InfinityConfig, InfinityTransformer
from infinitystar.pipelines.infinity import InfinityDefaults, InfinityPipeline
from infinitystar.schedules.infinity_resolution import check_custom_scales
from infinitystar.shapes.data import iter_samples
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.tokenizer.infinity_vae import InfinityVAE
from infinitystar.tokenizer.training_eval import frames_to_video
from infinitystar.train.config import (CheckpointConfig, ConfigError, FileConfig, LogConfig, OptimConfig,
                                       TrainBase, build_preset, check_ema_decay, check_ranges, check_run,
                                       preset_section)
from infinitystar.train.harness import Harness, publish_folder
from infinitystar.train.infinity_targets import bitwise_self_correction, forward_loss, teacher_forcing, token_weights
from infinitystar.train.infinity_tokenizer import SCALES_FILE, SHAPES_SCALES, scales_value

TRAINING_FILE = "infinity_training.json"
# Fields of InfinityConfig that the trainer sets itself (from the tokenizer, the text encoder and the schedule).
DERIVED = ("latent_channels", "text_channels", "text_maxlen", "num_levels", "spatial_patchify", "cond_drop_rate")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass
class InfinityModelSection:
    """The transformer: an `InfinityConfig` preset (or null) plus field overrides; the DERIVED fields come from the
    tokenizer, the text encoder and the schedule."""
    preset: Optional[str] = None
    overrides: dict = field(default_factory=lambda: dict(depth=4, width=128, num_heads=4, pooler_head_dim=32))

    def build(self, **derived) -> InfinityConfig:
        presets = {name: {k: v for k, v in p.items() if k not in DERIVED} for name, p in INFINITY_PRESETS.items()}
        return build_preset(InfinityConfig, presets, self.preset, {**self.overrides, **derived}, "model")


@dataclass
class InfinityTrainSection(TrainBase):
    max_steps: int = 400
    batch_size: int = 32
    bsc_strength: float = 0.3            # bitwise self-correction: flip rate ~ U{0, .01, ..., strength}; 0 = off
    bsc_layers: Optional[int] = None     # flip only the first k scales (None: all but the last)
    cond_drop_rate: float = 0.1          # caption -> null text (classifier-free guidance)
    reweight_by_scale: bool = False      # token_weights: uniform 1/L, or the official per-scale reweighting
    ema_decay: Optional[float] = None    # None: no EMA; else exported instead of the raw weights


@dataclass
class SampleSection:
    """Sampling defaults written to the exported model_index.json."""
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.0


@dataclass
class InfinityTrainConfig(FileConfig):
    sections: ClassVar[dict] = {"model": preset_section(InfinityModelSection, InfinityConfig, list(INFINITY_PRESETS),
                                                        None, derived=DERIVED),
                                "scales": scales_value}

    output_dir: str = "runs/infinity"
    seed: int = 0
    device: str = "auto"
    tokenizer: str = "runs/infinity_shapes/tokenizer/model"      # InfinityVAE folder (frozen)
    text_encoder: str = "runs/infinity_shapes/text_encoder"      # WordTextEncoder folder (frozen)
    model: InfinityModelSection = field(default_factory=InfinityModelSection)
    scales: list[list[int]] = field(default_factory=lambda: [list(s) for s in SHAPES_SCALES])
    train: InfinityTrainSection = field(default_factory=InfinityTrainSection)
    sample: SampleSection = field(default_factory=SampleSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-3, betas=[0.9, 0.97], weight_decay=0.05, warmup_steps=20, decay="cosine", min_lr_ratio=0.1,
        grad_clip=1.0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100, keep_last=2))
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        self.validate()

    def scale_list(self) -> list[tuple[int, int]]:
        return check_custom_scales(self.scales)

    def validate(self) -> None:
        t, s = self.train, self.sample
        check_run(self)
        check_ranges(positive={"train.batch_size": t.batch_size, "sample.temperature": s.temperature},
                     non_negative={"train.bsc_strength": t.bsc_strength},
                     unit={"train.cond_drop_rate": t.cond_drop_rate, "sample.top_p": s.top_p,
                           "train.bsc_strength": t.bsc_strength})
        check_ema_decay(t.ema_decay)
        if t.bsc_layers is not None and t.bsc_layers < 0:
            raise ConfigError(f"train.bsc_layers must be >= 0 or null, got {t.bsc_layers}")
        scales_value(self.scales, "scales")

    def model_config(self, latent_channels: int, text_channels: int, text_maxlen: int) -> InfinityConfig:
        return self.model.build(latent_channels=latent_channels, text_channels=text_channels, text_maxlen=text_maxlen,
                                num_levels=len(self.scales), spatial_patchify=False,
                                cond_drop_rate=self.train.cond_drop_rate)


config_from_dict = InfinityTrainConfig.from_dict
load_config = InfinityTrainConfig.load


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------

def load_components(cfg: InfinityTrainConfig, device) -> tuple[InfinityVAE, WordTextEncoder]:
    """The frozen tokenizer and text encoder of the config's folders."""
    for key, path in (("tokenizer", cfg.tokenizer), ("text_encoder", cfg.text_encoder)):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{key}: {path} is not a model folder (no config.json); train the tokenizer first "
                              f"(infinitystar train infinity-tokenizer) / make the text encoder "
                              f"(python -m infinitystar.text.builtin {path})")
    try:
        vae = InfinityVAE.from_pretrained(cfg.tokenizer, device=device)
    except (CheckpointError, ValueError) as e:
        raise ConfigError(f"tokenizer: {e}") from None
    try:
        text = WordTextEncoder.from_pretrained(cfg.text_encoder, device=device)
    except (CheckpointError, ValueError, TypeError) as e:
        raise ConfigError(f"text_encoder: {cfg.text_encoder} is not a built-in word encoder folder ({e})") from None
    for m in (vae, text):
        m.eval().requires_grad_(False)
    return vae, text


class InfinityTrainer(Harness):
    """The Infinity transformer's run: frozen tokenizer and text encoder, Shapes World image batches, the
    teacher-forced loss; the harness does the rest. resume: None, "latest" or a checkpoint folder."""

    name = "infinity"
    config_class = InfinityTrainConfig

    def __init__(self, config: InfinityTrainConfig, resume: Optional[str] = None):
        super().__init__(config, resume)
        cfg = config
        self.scales = cfg.scale_list()
        self.anchor = self.scales[-1]      # RoPE-2D anchored to the schedule's own last grid (as the pipeline)
        self.tokenizer, self.text_encoder = load_components(cfg, self.device)
        vc = self.tokenizer.config
        latent = tuple(self.scales[-1])
        self.image_hw = (latent[0] * vc.patch_size, latent[1] * vc.patch_size)
        if self.image_hw != (64, 64):
            raise ConfigError(f"scales: the last grid {list(latent)} at the tokenizer's stride {vc.patch_size} "
                              f"makes {self.image_hw[1]}x{self.image_hw[0]} images; Shapes World images are 64x64")
        self.model_config = cfg.model_config(vc.codebook_dim, self.text_encoder.channels, self.text_encoder.max_len)
        with self.seeded("init"):
            self.model = InfinityTransformer(self.model_config).to(self.device).train()
        self.setup_optimizer(self.model, cfg.train.ema_decay)
        self.weights = token_weights(self.scales, cfg.train.reweight_by_scale, self.device)
        self.begin()

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, H, W) in [-1, 1] and captions of a step: a pure function of (seed, step)."""
        samples = list(iter_samples(self.seed_of("data", step), ("image",), "train",
                                    limit=self.config.train.batch_size))
        images = frames_to_video([s["frames"] for s in samples], self.device)[:, :, 0]
        return images, [s["caption"] for s in samples]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: list[str]):
        """Frozen parts, in fp32: the codes the transformer learns are those inference decodes."""
        return self.tokenizer.encode(images), self.text_encoder.encode(captions, self.device)

    def losses(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        images, captions = self.batch(step)
        f, text = self.encode(images, captions)
        g_bsc = torch.Generator().manual_seed(self.seed_of("bsc", step))
        g_drop = torch.Generator().manual_seed(self.seed_of("drop", step))
        flip = None
        if cfg.train.bsc_strength > 0:
            flip = bitwise_self_correction(self.scales, cfg.train.bsc_strength, cfg.train.bsc_layers, g_bsc)
        t = teacher_forcing(f, self.scales, flip)
        with self.autocast():
            per_tok, acc = forward_loss(self.model, text.features, text.mask, t.inputs, t.bits, self.scales,
                                        rope_anchor=self.anchor, generator=g_drop)
        loss = (per_tok * self.weights).sum(-1).mean()
        terms = {"loss": float(loss.detach()), "bit_acc": float((acc * self.weights).sum(-1).mean())}
        start = 0
        for k, (h, w) in enumerate(self.scales):   # per-scale bit accuracy (teacher forced)
            terms[f"acc_s{k}"] = float(acc[:, start:start + h * w].mean())
            start += h * w
        return loss, terms

    def forward_backward(self) -> dict[str, Any]:
        loss, terms = self.losses(self.step)
        loss.backward()
        return terms

    def describe(self, stop: int) -> str:
        return super().describe(stop) + f", scales {[list(s) for s in self.scales]}"

    def export(self, directory: Path) -> Path:
        """Write a model folder (`InfinityPipeline.from_pretrained`): the EMA weights when there are any."""
        model = self.model
        if self.ema is not None:
            model = InfinityTransformer(self.model_config)
            model.load_state_dict({**self.model.state_dict(), **self.ema.full_state_dict()})
        s, cfg = self.config.sample, self.config
        defaults = InfinityDefaults(guidance_scale=s.guidance_scale, temperature=s.temperature, top_p=s.top_p,
                                    scales=[list(x) for x in self.scales])

        def write(tmp: Path) -> None:
            InfinityPipeline(model.eval(), self.tokenizer, self.text_encoder, defaults).save_pretrained(tmp)
            (tmp / TRAINING_FILE).write_text(json.dumps(
                {"steps": self.step, "seed": cfg.seed, "tokenizer": cfg.tokenizer, "text_encoder": cfg.text_encoder,
                 "ema": self.ema is not None, "precision": self.precision}, indent=1) + "\n")
        publish_folder(directory, write)
        self.model.train()
        return directory


train = InfinityTrainer.train


def replace_tokenizer(model_dir: Union[str, Path], tokenizer_dir: Union[str, Path],
                      out_dir: Union[str, Path]) -> Path:
    """Copy the Infinity model folder `model_dir` to `out_dir` with the tokenizer of `tokenizer_dir` (an
    `InfinityVAE` folder, e.g. `OUTPUT/model/` of a decoder fine-tune). The transformer, the text encoder and the
    defaults are copied unchanged. The new tokenizer must have the same architecture, a bit-identical encoder and
    (when it names one) the same schedule: the transformer was trained on that encoder's codes. Raises ValueError
    otherwise; the folder's `infinity_training.json` records the swap. An existing `out_dir` is replaced only if it
    is a model folder (has `model_index.json`)."""
    src, tok, out = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    index = src / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{src}: not a model folder (no model_index.json)")
    meta = json.loads(index.read_text())
    if meta.get("family") != "infinity":
        raise ValueError(f"{src} holds a {meta.get('family', 'infinitystar')!r} model, not an Infinity one")
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source folder; write the new model elsewhere")
    if out.exists() and not (out / "model_index.json").is_file():
        raise ValueError(f"{out} exists and is not a model folder; refusing to replace it")
    try:
        old = InfinityVAE.from_pretrained(src / "tokenizer")
        new = InfinityVAE.from_pretrained(tok)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    if old.config != new.config:
        raise ValueError(f"{tok}: a different architecture from {src / 'tokenizer'} ({new.config} vs {old.config})")
    a, b = old.state_dict(), new.state_dict()
    changed = [k for k in a if k.startswith("encoder.") and not torch.equal(a[k], b[k])]
    if changed:
        raise ValueError(f"{tok}: its encoder differs from the one the transformer was trained with ({len(changed)} "
                         f"tensors, e.g. {changed[0]}); only a decoder fine-tune (train.freeze: [encoder], no "
                         f"calibration) keeps the transformer's codes")
    scales_file = tok / SCALES_FILE
    model_scales = meta.get("defaults", {}).get("scales")
    if scales_file.is_file() and model_scales is not None:
        tok_scales = json.loads(scales_file.read_text())["scales"]
        if [list(x) for x in tok_scales] != [list(x) for x in model_scales]:
            raise ValueError(f"{tok}: trained with the schedule {tok_scales}, the model generates {model_scales}")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(tmp / "tokenizer")
    new.save_pretrained(tmp / "tokenizer")
    record_path = tmp / TRAINING_FILE
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record["tokenizer_replaced"] = {"from_model": str(src), "tokenizer": str(tok),
                                    "changed_tensors": sum(not torch.equal(a[k], b[k]) for k in a)}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


__all__ = ["InfinityTrainConfig", "InfinityTrainSection", "InfinityModelSection", "SampleSection",
           "InfinityTrainer", "config_from_dict", "load_config", "train", "replace_tokenizer", "load_components"]
