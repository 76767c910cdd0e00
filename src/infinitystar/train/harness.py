"""The training harness every trainer shares: device and precision, resume, seeding, the optimizer and its LR
schedule, the optimizer step, checkpoints, metrics and the loop `fit(until=)`.

A trainer subclasses `Harness` and says only what differs: how its model and data are built (in `__init__`, after
`super().__init__`, ending with `self.begin()`), one step's forward and backward (`forward_backward`), and where it
has them, validation (`validate`), the checkpoint's model files (`write_weights` / `load_weights`) and the finished
model folder (`export`).

Everything random in a step is a pure function of (seed, step) or is restored from the checkpoint, so a resumed
run replays an uninterrupted one exactly; the learning rate is a pure function of the step (`lr_at`).

Precision: `train.precision` (auto | fp32 | bf16) is resolved once by `runtime.resolve_precision`; a subclass
computes its forward inside `self.autocast()` and keeps losses, bit heads and quantizer sign decisions in fp32
(`runtime.fp32_region`). The precision used is written into every metrics line and the run's summary.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from infinitystar.checkpoint_io import load_strict, read_tensors
from infinitystar.runtime import autocast, peak_memory_mb, precision_name, resolve_device, resolve_precision
from infinitystar.train.checkpoint import (EMA, STEP_DIR, TRAINER_FILE, CheckpointManager, _atomic_write_text,
                                           list_checkpoints, load_optimizer_file, publish_checkpoint, read_meta,
                                           save_optimizer)
from infinitystar.train.config import ConfigError, FileConfig, OptimConfig
from infinitystar.train.data import derive_seed
from infinitystar.train.distributed import DistInfo, full_tensor
from infinitystar.train.lock import lock_run
from infinitystar.train.metrics import MetricsLogger


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant / cosine / linear decay
    to lr * min_lr_ratio at max_steps, all counted from `optim.start_step` (earlier steps: as at that step). A pure
    function of the step, so resuming needs no scheduler state."""
    step = max(0, step - optim.start_step)
    max_steps -= optim.start_step
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    lo = optim.min_lr_ratio
    if optim.decay == "cosine":
        return optim.lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress)))
    return optim.lr * (lo + (1 - lo) * (1 - progress))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters: weight decay on matrices only; biases, norm weights and the
    null text are not decayed."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and name.rsplit(".", 1)[-1] != "null_text" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW over `params` (tensors or groups), fused into one kernel over all of them where every
    parameter is a plain tensor on the CPU or CUDA: on one CPU core the built-in model's step takes 3.5 ms
    instead of the per-parameter loop's 17 ms (the same update to float rounding). Sharded parameters (FSDP's
    DTensors) keep torch's default."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(type(p) in (torch.Tensor, nn.Parameter) and p.device.type in ("cpu", "cuda")
                and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, **({"fused": True} if fused else {}), **kwargs)


@dataclass
class TrainResult:
    step: int
    output_dir: Path
    precision: str                        # what the run computed in: "bf16" or "fp32"
    checkpoint: Optional[Path] = None     # the last checkpoint written (or resumed from)
    model_dir: Optional[Path] = None      # the exported model folder, once train.max_steps is reached
    loss: Optional[float] = None          # the last logged training loss
    val_psnr: Optional[float] = None      # the last validation PSNR (trainers that validate)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The JSON summary the train commands print."""
        return {"step": self.step, "output_dir": str(self.output_dir),
                "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "model": str(self.model_dir) if self.model_dir else None, "loss": self.loss,
                "val_psnr": self.val_psnr, "precision": self.precision, "seconds": round(self.seconds, 1)}


def single_process(device: str) -> DistInfo:
    return DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device), owns_group=False)


def publish_folder(directory: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder through `write(tmp)` next to `directory`, then replace `directory` with it, so a crash never
    leaves a half-written model folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".tmp-{directory.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


class Harness:
    """One training run; see the module docstring for what a subclass provides.

    resume: None (a fresh run; an output folder with checkpoints is an error), "latest" (the newest complete
    checkpoint of the run, or a fresh start when there is none) or a checkpoint folder."""

    name = "train"                        # the progress bar's label
    config_class: type[FileConfig]        # the trainer's run config

    @classmethod
    def train(cls, config, *, resume: Optional[str] = None, overrides: Optional[Sequence[str]] = None,
              until: Optional[int] = None, **components) -> TrainResult:
        """Train from a config object or file (plus `key=value` overrides), then release what the run holds
        (threads, the process group, open logs). `components`: what the trainer's __init__ accepts besides."""
        trainer = cls(cls.config_class.resolve(config, overrides), resume=resume, **components)
        try:
            return trainer.fit(until=until)
        finally:
            trainer.close()

    def __init__(self, config, resume: Optional[str] = None):
        self.config = cfg = config
        if cfg.train.threads is not None:
            torch.set_num_threads(cfg.train.threads)
        self.info = self.setup_process()
        self.device = self.info.device
        self.dtype = resolve_precision(cfg.train.precision, self.device)
        self.precision = precision_name(self.dtype)
        self.out = Path(cfg.output_dir)
        self.lock = lock_run(self.out, self.info)   # one run per output_dir, until close()
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.info, cfg.checkpoint.keep_last)
        if resume is None and list_checkpoints(self.ckpt.root):
            raise ConfigError(f"{self.out} already holds a run (checkpoints in {self.ckpt.root}): pass --resume to "
                              f"continue it, or choose another output_dir")
        self.start: Optional[Path] = self.ckpt.resolve(resume)
        if resume is not None and self.start is None and self.info.is_main:
            print(f"no checkpoint in {self.ckpt.root}; starting from step 0", file=sys.stderr, flush=True)
        self.step = 0
        self.nonfinite_steps = 0
        self.ema: Optional[EMA] = None
        self.logger: Optional[MetricsLogger] = None
        self.last_checkpoint: Optional[Path] = None
        self.last_val: Optional[dict] = None

    # --- set-up -------------------------------------------------------------------------------------------------
    def setup_process(self) -> DistInfo:
        """One process on the config's device; the generator joins a torchrun process group instead."""
        return single_process(self.config.device)

    def seed_of(self, *name) -> int:
        """A seed derived from the run's seed and `name`, e.g. ("data", step)."""
        return derive_seed(self.config.seed, *name)

    @contextmanager
    def seeded(self, *name) -> Iterator[None]:
        """Draw from torch's global RNG seeded by `seed_of(*name)`; the caller's RNG state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_of(*name))
            yield

    def setup_optimizer(self, module: nn.Module, ema_decay: Optional[float] = None) -> None:
        """AdamW over `module`'s trainable parameters (see `param_groups`), and an EMA of them when asked."""
        o = self.config.optim
        self.optimizer = adamw(param_groups(module, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.ema = EMA(module, ema_decay) if ema_decay else None

    def begin(self) -> None:
        """Last step of a subclass's `__init__`: restore the resume point, or start a fresh run folder (log
        cleared, config written); open the metrics log."""
        if self.start is not None:
            self.restore(self.start)
        self.last_checkpoint = self.start
        if not self.info.is_main:
            return
        if self.start is not None:
            print(f"resumed from {self.start} at step {self.step}", file=sys.stderr, flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / "metrics.jsonl"
        if self.start is None and log.exists():
            log.unlink()
        _atomic_write_text(self.out / "config.yaml", self.config.to_yaml())
        cfg = self.config.log
        self.logger = MetricsLogger(log, self.out / "tensorboard" if cfg.tensorboard else None)
        if self.start is not None:   # lines logged after this checkpoint by the interrupted run are redone
            self.logger.truncate_after(self.step)

    def autocast(self):
        """The training precision's autocast (nothing for fp32) around a forward."""
        return autocast(self.device, self.dtype)

    # --- what a subclass provides -------------------------------------------------------------------------------
    def forward_backward(self) -> dict[str, Any]:
        """Forward and backward of step `self.step`; returns the terms to log (numbers or 0-d tensors)."""
        raise NotImplementedError

    def validate(self) -> Optional[dict[str, float]]:
        """Validation metrics, or None for a trainer without validation."""
        return None

    def due_for_validation(self) -> bool:
        return False

    def describe(self, stop: int) -> str:
        """The one-line banner printed when `fit` starts."""
        n = sum(p.numel() for p in self.params)
        return (f"{self.name}: {n:,} trainable parameters on {self.device} ({self.precision}), "
                f"step {self.step} -> {stop}")

    def write_weights(self, folder: Path) -> None:
        """The model files of a checkpoint (a loadable model folder)."""
        self.model.save_pretrained(folder)

    def load_weights(self, folder: Path, meta: dict) -> None:
        load_strict(self.model, read_tensors(folder / "model.safetensors"), str(folder / "model.safetensors"))

    def checkpoint_meta(self) -> dict[str, Any]:
        """Extra entries of a checkpoint's trainer.json."""
        return {}

    def save_state(self, folder: Path) -> None:
        """Extra training state of a checkpoint (e.g. a discriminator and its optimizer), written into `folder`."""

    def load_state(self, folder: Path, meta: dict) -> None:
        """Restore what `save_state` wrote."""

    def export(self, directory: Path) -> Optional[Path]:
        """Write the finished model folder (called when train.max_steps is reached); None: nothing to export."""
        return None

    # --- one optimizer step ---------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg = self.config
        lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        terms = self.forward_backward()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        norm = float(full_tensor(torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None],
                                                               clip)))
        if math.isfinite(norm):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.step)
        else:   # skipped; the norm is global, so every rank decides the same
            self.nonfinite_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {**terms, "lr": lr, "grad_norm": norm}

    # --- the loop -------------------------------------------------------------------------------------------------
    def fit(self, until: Optional[int] = None) -> TrainResult:
        """Train to train.max_steps, or stop after step `until` (the LR schedule still follows max_steps) and
        checkpoint there, as an interrupted run would; export the model folder when max_steps is reached."""
        cfg = self.config
        if until is not None and until <= self.step:   # nothing to do is not a success to report
            raise ConfigError(f"--until {until}: the run is already at step {self.step}")
        stop = cfg.train.max_steps if until is None else min(until, cfg.train.max_steps)
        t0 = time.perf_counter()
        if self.info.is_main:
            print(self.describe(stop), file=sys.stderr, flush=True)
        if self.step == 0:
            self._log(self.first_record())
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=self.name, dynamic_ncols=True, file=sys.stderr,
                   disable=not (self.info.is_main and cfg.log.progress))
        window: dict[str, Any] = {}
        n, t_last, last_loss = 0, time.perf_counter(), None
        while self.step < stop:
            terms = self.train_step()
            bar.update(1)
            for k, v in terms.items():
                window[k] = window.get(k, 0.0) + v
            n += 1
            rec: dict[str, Any] = {}
            if self.step % cfg.log.every == 0 or self.step == stop:
                rec = self.log_record(window, n, time.perf_counter() - t_last, terms)
                window, n, t_last = {}, 0, time.perf_counter()
                last_loss = rec.get("loss", last_loss)
            if self.due_for_validation() or self.step == cfg.train.max_steps:
                val = self.validate()
                if val is not None:
                    self.last_val = val
                    rec = {"step": self.step, **rec, **val}
                    t_last = time.perf_counter()   # validation time is not training time
            if rec:
                self._log(rec)
                bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "val_psnr") if k in rec})
            every = cfg.checkpoint.every
            if (every and self.step % every == 0) or self.step == stop:
                self.last_checkpoint = self.save()
        bar.close()
        model_dir = None
        if self.step >= cfg.train.max_steps and self.info.is_main:
            model_dir = self.export(self.out / "model")
        return TrainResult(self.step, self.out, self.precision, self.last_checkpoint, model_dir, last_loss,
                           (self.last_val or {}).get("val_psnr"), time.perf_counter() - t0)

    def first_record(self) -> Optional[dict[str, Any]]:
        """A step-0 line before training (the trainers that validate log their starting point)."""
        val = self.validate()
        if val is None:
            return None
        self.last_val = val
        return {"step": 0, **val}

    def log_record(self, window: dict[str, Any], n: int, seconds: float, last: dict[str, Any]) -> dict[str, Any]:
        """The metrics line of `n` steps: the window's means, the last step's lr, time per step, peak memory."""
        return {"step": self.step, **{k: round(float(v) / n, 6) for k, v in window.items()}, "lr": last["lr"],
                "s_per_step": round(seconds / n, 4), "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                "precision": self.precision}

    def _log(self, rec: Optional[dict]) -> None:
        if rec and self.logger is not None:
            self.logger.log(rec)

    # --- checkpoints ------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """A single-process checkpoint: the model folder, ema.safetensors, the optimizer state and trainer.json,
        written to a temporary folder that is renamed into place before `latest` moves."""
        root = self.ckpt.root
        root.mkdir(parents=True, exist_ok=True)
        for stray in root.glob(".tmp-*"):
            shutil.rmtree(stray, ignore_errors=True)
        final = root / STEP_DIR.format(self.step)
        tmp = root / f".tmp-{final.name}"
        tmp.mkdir()
        self.write_weights(tmp)
        if self.ema is not None:
            save_file({k: v.contiguous() for k, v in self.ema.full_state_dict().items()}, str(tmp / "ema.safetensors"))
        keep_optimizer = self.config.checkpoint.save_optimizer
        if keep_optimizer:
            save_optimizer(tmp, self.optimizer)
        self.save_state(tmp)
        meta = {"step": self.step, "has_optimizer": keep_optimizer, "has_ema": self.ema is not None,
                "nonfinite_steps": self.nonfinite_steps, **self.checkpoint_meta(), "config": self.config.to_dict()}
        _atomic_write_text(tmp / TRAINER_FILE, json.dumps(meta, indent=1))
        publish_checkpoint(tmp, final, self.config.checkpoint.keep_last)
        return final

    def restore(self, path: Path) -> None:
        meta = read_meta(path)
        self.load_weights(path, meta)
        load_optimizer_file(path, meta, self.optimizer, self.device)
        self.load_state(path, meta)
        if self.ema is not None:
            self.ema.load_full(read_tensors(path / "ema.safetensors") if meta.get("has_ema")
                               else {n: p.detach() for n, p in self.ema.params})   # EMA switched on: from the weights
        self.step = int(meta["step"])
        self.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        self.restored(meta)

    def restored(self, meta: dict) -> None:
        """Restore what a subclass keeps in trainer.json (see `checkpoint_meta`)."""

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.lock.release()


__all__ = ["Harness", "TrainResult", "adamw", "lr_at", "param_groups", "publish_folder", "single_process"]
