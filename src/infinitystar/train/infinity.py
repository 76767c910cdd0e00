"""Training a small Infinity text-to-image transformer on Shapes World images, and exporting a model folder.

One step (everything random is a pure function of (seed, step), so a resumed run replays an uninterrupted one):
  1. a batch of train-split Shapes World images with their captions (the held-out colour/shape pairs never appear);
  2. the frozen tokenizer (`InfinityVAE`) encodes them; the frozen built-in text encoder (`WordTextEncoder`)
     encodes the captions;
  3. `teacher_forcing` runs the shared residual loop over the custom schedule with bitwise self-correction
     (`bitwise_self_correction`: per scale a flip rate p ~ U{0, .01, ..., strength}, the targets stay clean);
  4. `InfinityTransformer.forward_loss` with condition dropout (captions -> the learned null text with
     probability `train.cond_drop_rate`, for classifier-free guidance), reduced with `token_weights`;
  5. AdamW (weight decay on matrices only), linear warm-up then cosine decay, gradient clipping, optional EMA.

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

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml

from infinitystar.convert.strict import CheckpointError, load_strict, read_tensors
from infinitystar.model.infinity import (InfinityConfig, InfinityTransformer, bitwise_self_correction,
                                         teacher_forcing, token_weights)
from infinitystar.schedules.infinity_resolution import check_custom_scales
from infinitystar.tokenizer.infinity_training import (SHAPES_SCALES, build_config, load_yaml,
                                                      validate_scales)
from infinitystar.tokenizer.training import STEP_DIR, clips_to_video, resolve_device
from infinitystar.train.checkpoint import (EMA, _atomic_write_text, find_resume, list_checkpoints,
                                         load_optimizer_file, publish_checkpoint, read_meta, save_optimizer)
from infinitystar.train.config import CheckpointConfig, ConfigError, LogConfig, OptimConfig
from infinitystar.train.data import derive_seed
from infinitystar.train.lock import lock_run
from infinitystar.train.metrics import MetricsLogger, peak_memory_mb
from infinitystar.train.trainer import lr_at

TRAINING_FILE = "infinity_training.json"
# Fields of InfinityConfig that the trainer sets itself (from the tokenizer, the text encoder and the schedule).
DERIVED = ("latent_channels", "text_channels", "text_maxlen", "num_levels", "spatial_patchify", "cond_drop_rate")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclass
class InfinityTrainSection:
    max_steps: int = 400
    batch_size: int = 32
    bsc_strength: float = 0.3            # bitwise self-correction: flip rate ~ U{0, .01, ..., strength}; 0 = off
    bsc_layers: Optional[int] = None     # flip only the first k scales (None: all but the last)
    cond_drop_rate: float = 0.1          # caption -> null text (classifier-free guidance)
    reweight_by_scale: bool = False      # token_weights: uniform 1/L, or the official per-scale reweighting
    ema_decay: Optional[float] = None    # None: no EMA; else exported instead of the raw weights
    threads: Optional[int] = None        # torch.set_num_threads for this process (None: leave as is)


@dataclass
class SampleSection:
    """Sampling defaults written to the exported model_index.json."""
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_p: float = 0.0


@dataclass
class InfinityTrainConfig:
    output_dir: str = "runs/infinity"
    seed: int = 0
    device: str = "auto"
    tokenizer: str = "runs/infinity_shapes/tokenizer/model"      # InfinityVAE folder (frozen)
    text_encoder: str = "runs/infinity_shapes/text_encoder"      # WordTextEncoder folder (frozen)
    model: dict = field(default_factory=lambda: dict(depth=4, width=128, num_heads=4, pooler_head_dim=32))
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
        t, o, s = self.train, self.optim, self.sample
        for k, v in {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size, "optim.lr": o.lr,
                     "log.every": self.log.every, "sample.temperature": s.temperature}.items():
            if v <= 0:
                raise ConfigError(f"{k} must be positive, got {v}")
        for k, v in {"optim.warmup_steps": o.warmup_steps, "optim.grad_clip": o.grad_clip,
                     "optim.weight_decay": o.weight_decay, "checkpoint.every": self.checkpoint.every,
                     "checkpoint.keep_last": self.checkpoint.keep_last, "train.bsc_strength": t.bsc_strength}.items():
            if v < 0:
                raise ConfigError(f"{k} must be >= 0, got {v}")
        for k, v in {"train.cond_drop_rate": t.cond_drop_rate, "optim.min_lr_ratio": o.min_lr_ratio,
                     "sample.top_p": s.top_p, "train.bsc_strength": t.bsc_strength}.items():
            if not 0 <= v <= 1:
                raise ConfigError(f"{k} must be in [0, 1], got {v}")
        if t.ema_decay is not None and not 0 < t.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in (0, 1) or null, got {t.ema_decay}")
        if t.bsc_layers is not None and t.bsc_layers < 0:
            raise ConfigError(f"train.bsc_layers must be >= 0 or null, got {t.bsc_layers}")
        if t.threads is not None and t.threads < 1:
            raise ConfigError(f"train.threads must be >= 1 or null, got {t.threads}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
        validate_scales(self.scales, "scales")
        names = {f.name for f in dataclasses.fields(InfinityConfig)}
        for k in self.model:
            if k in DERIVED:
                raise ConfigError(f"model.{k}: set by the trainer (from the tokenizer, the text encoder and the "
                                  f"schedule); remove it")
            if k not in names:
                raise ConfigError(f"model.{k}: unknown key; known keys: "
                                  f"{', '.join(sorted(names - set(DERIVED)))}")

    def model_config(self, latent_channels: int, text_channels: int, text_maxlen: int) -> InfinityConfig:
        try:
            return InfinityConfig(**self.model, latent_channels=latent_channels, text_channels=text_channels,
                                  text_maxlen=text_maxlen, num_levels=len(self.scales), spatial_patchify=False,
                                  cond_drop_rate=self.train.cond_drop_rate)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _model_section(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of InfinityConfig fields, got {value!r}")
    return dict(value)


def _scales_value(value: Any, where: str) -> list[list[int]]:
    validate_scales(value, where)
    return [list(s) for s in value]


def config_from_dict(d: dict, overrides: Optional[list[str]] = None) -> InfinityTrainConfig:
    """Validate a raw mapping (plus `key=value` overrides) into a config; unknown keys name the dotted key."""
    return build_config(InfinityTrainConfig, d, overrides, {"model": _model_section, "scales": _scales_value},
                        "an Infinity training config")


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> InfinityTrainConfig:
    try:
        return config_from_dict(load_yaml(path), overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------

@dataclass
class InfinityTrainResult:
    step: int
    output_dir: Path
    model_dir: Optional[Path]
    loss: Optional[float]
    seconds: float


def _load_components(cfg: InfinityTrainConfig, device):
    from infinitystar.text.builtin import WordTextEncoder
    from infinitystar.tokenizer.infinity_vae import InfinityVAE
    for key, path in (("tokenizer", cfg.tokenizer), ("text_encoder", cfg.text_encoder)):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{key}: {path} is not a model folder (no config.json); train the tokenizer first "
                              f"(infinitystar infinity train-tokenizer) / make the text encoder "
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


class InfinityTrainer:
    """One run. resume: None (fresh; an output folder with checkpoints is an error), "latest" or a checkpoint."""

    def __init__(self, config: InfinityTrainConfig, resume: Optional[str] = None):
        self.config = cfg = config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.device)
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.lock = lock_run(self.out)   # one run per output_dir while this trainer lives
        self.scales = cfg.scale_list()
        self.anchor = self.scales[-1]      # RoPE-2D anchored to the schedule's own last grid (as the pipeline)
        self.step = 0
        start = None
        if resume is not None:
            start = find_resume(self.ckpt_root, resume)
            if start is None:
                raise CheckpointError(f"--resume: no complete checkpoint in {self.ckpt_root}")
        elif list_checkpoints(self.ckpt_root):
            raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it or choose another "
                              f"output_dir")
        self.tokenizer, self.text_encoder = _load_components(cfg, self.device)
        vc = self.tokenizer.config
        latent = tuple(self.scales[-1])
        self.image_hw = (latent[0] * vc.patch_size, latent[1] * vc.patch_size)
        if self.image_hw != (64, 64):
            raise ConfigError(f"scales: the last grid {list(latent)} at the tokenizer's stride {vc.patch_size} "
                              f"makes {self.image_hw[1]}x{self.image_hw[0]} images; Shapes World images are 64x64")
        self.model_config = cfg.model_config(vc.codebook_dim, self.text_encoder.channels, self.text_encoder.max_len)
        with torch.random.fork_rng(devices=[]):   # init from the seed; the caller's RNG is left as it was
            torch.manual_seed(derive_seed(cfg.seed, "init"))
            self.model = InfinityTransformer(self.model_config).to(self.device)
        self.model.train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (decay if p.dim() >= 2 and name != "null_text" else no_decay).append(p)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.weights = token_weights(self.scales, cfg.train.reweight_by_scale, self.device)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out / "metrics.jsonl")
        if start is not None:
            self._restore(start)
            self.logger.truncate_after(self.step)
        else:
            if (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            _atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
        self.last_checkpoint: Optional[Path] = start

    # --- pieces -------------------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, H, W) in [-1, 1] and captions of a step: a pure function of (seed, step)."""
        from infinitystar.shapes.data import iter_samples
        cfg = self.config
        samples = list(iter_samples(derive_seed(cfg.seed, "data", step), ("image",), "train",
                                    limit=cfg.train.batch_size))
        images = clips_to_video([s["frames"] for s in samples], self.device)[:, :, 0]
        return images, [s["caption"] for s in samples]

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: list[str]):
        return self.tokenizer.encode(images), self.text_encoder.encode(captions, self.device)

    def losses(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        images, captions = self.batch(step)
        f, text = self.encode(images, captions)
        g_bsc = torch.Generator().manual_seed(derive_seed(cfg.seed, "bsc", step))
        g_drop = torch.Generator().manual_seed(derive_seed(cfg.seed, "drop", step))
        flip = None
        if cfg.train.bsc_strength > 0:
            flip = bitwise_self_correction(self.scales, cfg.train.bsc_strength, cfg.train.bsc_layers, g_bsc)
        t = teacher_forcing(f, self.scales, flip)
        per_tok, acc = self.model.forward_loss(text.features, text.mask, t.inputs, t.bits, self.scales,
                                               rope_anchor=self.anchor, generator=g_drop)
        loss = (per_tok * self.weights).sum(-1).mean()
        terms = {"loss": float(loss.detach()), "bit_acc": float((acc * self.weights).sum(-1).mean())}
        start = 0
        for k, (h, w) in enumerate(self.scales):   # per-scale bit accuracy (teacher forced)
            terms[f"acc_s{k}"] = float(acc[:, start:start + h * w].mean())
            start += h * w
        return loss, terms

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, terms = self.losses(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            terms["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip))
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        terms["lr"] = lr
        return terms

    # --- checkpoints --------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Atomic: everything goes to `.tmp-step_X/`, renamed into place before `latest` moves."""
        from safetensors.torch import save_file
        root = self.ckpt_root
        root.mkdir(parents=True, exist_ok=True)
        for stray in root.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)
        final = root / STEP_DIR.format(self.step)
        tmp = root / f".tmp-{final.name}"
        tmp.mkdir()
        self.model.save_pretrained(tmp)
        if self.ema is not None:
            save_file({k: v.contiguous() for k, v in self.ema.full_state_dict().items()},
                      str(tmp / "ema.safetensors"))
        if self.config.checkpoint.save_optimizer:
            save_optimizer(tmp, self.optimizer)
        meta = {"step": self.step, "has_optimizer": self.config.checkpoint.save_optimizer,
                "has_ema": self.ema is not None, "config": self.config.to_dict()}
        _atomic_write_text(tmp / "trainer.json", json.dumps(meta, indent=1))
        publish_checkpoint(tmp, final, self.config.checkpoint.keep_last)
        self.last_checkpoint = final
        return final

    def _restore(self, path: Path) -> None:
        meta = read_meta(path)
        load_strict(self.model, read_tensors(path / "model.safetensors"), str(path / "model.safetensors"))
        load_optimizer_file(path, meta, self.optimizer, self.device)
        if self.ema is not None:
            if not (path / "ema.safetensors").is_file():
                raise CheckpointError(f"{path}: no ema.safetensors, but train.ema_decay is set")
            self.ema.load_full(read_tensors(path / "ema.safetensors"))
        self.step = int(meta["step"])

    def export(self, directory: Union[str, Path]) -> Path:
        """Write a model folder (`InfinityPipeline.from_pretrained`): the EMA weights when there are any."""
        from infinitystar.pipelines.infinity import InfinityDefaults, InfinityPipeline
        model = self.model
        if self.ema is not None:
            model = InfinityTransformer(self.model_config)
            model.load_state_dict({**self.model.state_dict(), **self.ema.full_state_dict()})
        s = self.config.sample
        defaults = InfinityDefaults(guidance_scale=s.guidance_scale, temperature=s.temperature, top_p=s.top_p,
                                    scales=[list(x) for x in self.scales])
        directory = Path(directory)
        tmp = directory.parent / f".tmp-{directory.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        InfinityPipeline(model.eval(), self.tokenizer, self.text_encoder, defaults).save_pretrained(tmp)
        cfg = self.config
        (tmp / TRAINING_FILE).write_text(json.dumps(
            {"steps": self.step, "seed": cfg.seed, "tokenizer": cfg.tokenizer, "text_encoder": cfg.text_encoder,
             "ema": self.ema is not None}, indent=1) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
        self.model.train()
        return directory

    # --- loop ---------------------------------------------------------------------------------------------
    def fit(self, until: Optional[int] = None) -> InfinityTrainResult:
        """Train to train.max_steps, or stop after step `until` (the LR schedule still follows max_steps) and
        checkpoint there, as an interrupted run would; export `OUTPUT/model/` when max_steps is reached."""
        from tqdm import tqdm
        cfg = self.config
        stop = cfg.train.max_steps if until is None else min(until, cfg.train.max_steps)
        t0 = time.perf_counter()
        if cfg.log.progress:
            n = sum(p.numel() for p in self.model.parameters())
            print(f"infinity train: {n:,} parameters on {self.device}, scales {[list(s) for s in self.scales]}, "
                  f"step {self.step} -> {stop}", file=sys.stderr, flush=True)
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, disable=not cfg.log.progress, desc="infinity",
                   dynamic_ncols=True, file=sys.stderr)
        window: dict[str, float] = {}
        n, t_last, last_loss = 0, time.perf_counter(), None
        while self.step < stop:
            terms = self.train_step()
            bar.update(1)
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v
            n += 1
            if self.step % cfg.log.every == 0 or self.step == stop:
                now = time.perf_counter()
                rec = {"step": self.step, **{k: round(v / n, 6) for k, v in window.items()}, "lr": terms["lr"],
                       "s_per_step": round((now - t_last) / n, 4),
                       "peak_memory_mb": round(peak_memory_mb(self.device), 1)}
                window, n, t_last = {}, 0, now
                last_loss = rec["loss"]
                self.logger.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", acc=f"{rec['bit_acc']:.3f}")
            ck = cfg.checkpoint.every
            if (ck and self.step % ck == 0) or self.step == stop:
                self.save()
        bar.close()
        model_dir = self.export(self.out / "model") if self.step >= cfg.train.max_steps else None
        self.logger.close()
        return InfinityTrainResult(self.step, self.out, model_dir, last_loss, time.perf_counter() - t0)


def train(config: Union[InfinityTrainConfig, str, Path], *, resume: Optional[str] = None,
          overrides: Optional[list[str]] = None, until: Optional[int] = None) -> InfinityTrainResult:
    """Train from a config object or a YAML file (plus `key=value` overrides)."""
    if not isinstance(config, InfinityTrainConfig):
        config = load_config(config, overrides)
    elif overrides:
        config = config_from_dict(config.to_dict(), overrides)
    return InfinityTrainer(config, resume=resume).fit(until=until)


def replace_tokenizer(model_dir: Union[str, Path], tokenizer_dir: Union[str, Path],
                      out_dir: Union[str, Path]) -> Path:
    """Copy the Infinity model folder `model_dir` to `out_dir` with the tokenizer of `tokenizer_dir` (an
    `InfinityVAE` folder, e.g. `OUTPUT/model/` of a decoder fine-tune). The transformer, the text encoder and the
    defaults are copied unchanged. The new tokenizer must have the same architecture, a bit-identical encoder and
    (when it names one) the same schedule: the transformer was trained on that encoder's codes. Raises ValueError
    otherwise; the folder's `infinity_training.json` records the swap. An existing `out_dir` is replaced only if it
    is a model folder (has `model_index.json`)."""
    from infinitystar.tokenizer.infinity_training import SCALES_FILE
    from infinitystar.tokenizer.infinity_vae import InfinityVAE
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


__all__ = ["InfinityTrainConfig", "InfinityTrainSection", "SampleSection", "InfinityTrainer", "InfinityTrainResult",
           "config_from_dict", "load_config", "train", "replace_tokenizer"]
