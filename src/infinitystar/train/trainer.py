"""The generator trainer: one code path for one process and for `torchrun` (FSDP2 or DDP when world_size > 1).

One optimizer step = `grad_accum` micro-steps; a micro-step packs `micro_batch` samples per rank into one
sequence (visual tokens of the selected steps, captions, padding) with the spacetime-sparse segment mask.
Every random choice made for a sample (caption, sentence cut, scale subset, repetition, bit flips, text
dropout) comes from a generator seeded by (run seed, epoch, global position of the sample), so a run is
reproducible, a resumed run continues exactly, and W processes see the same global batches as one process
with a W times larger batch.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from infinitystar.checkpoint_io import load_strict, read_tensors
from infinitystar.model.attention import resolve_backend
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig
from infinitystar.runtime import peak_memory_mb
from infinitystar.text.base import PromptCutWarning, prompt_overflow
from infinitystar.text import load_text_encoder as load_text_folder
from infinitystar.tokenizer.video_vae import VideoVAE
from infinitystar.train.checkpoint import rng_state, set_rng_state
from infinitystar.train.config import ConfigError, RunConfig
from infinitystar.train.data import SKIP_REASONS, SampleLoader, SampleSpec, ShardedOrder, derive_seed, read_manifests
from infinitystar.train.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown, wrap_model
from infinitystar.train.features import encode_pixels
from infinitystar.train.harness import Harness, lr_at
from infinitystar.train.latent_cache import cache_meta, cache_path, write_latent
from infinitystar.train.metrics import ScaleAccuracy
from infinitystar.train.targets import (PackedTrainModule, boost_scale_weights, TextRow, pack_batch, packed_loss,
                                        prepare_interact_samples, prepare_sample)


def load_text_encoder(path: str, device):
    """The text encoder folder of `text_encoder.path` (built-in word encoder or T5)."""
    try:
        return load_text_folder(path, device=device)
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise ConfigError(f"text_encoder.path: {e}") from None


def load_tokenizer(path: str, device):
    """The frozen video tokenizer (`VideoVAE` folder); training encodes its posterior mean (deterministic)."""
    try:
        return VideoVAE.from_pretrained(path, device=device).eval()
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"tokenizer.path: {e}") from None


def captions_cut(encoder, prompts: Sequence[str], lengths: Sequence[int], max_len: int) -> int:
    """Captions cut by any limit: the encoder's own (words or tokens it does not read) or the transformer's
    `max_len` text tokens. Counted in `captions_cut` of the metrics instead of a warning per batch."""
    over = prompt_overflow(encoder, prompts)
    return sum(o > 0 or int(n) > max_len for o, n in zip(over, lengths))


def encode_texts(encoder, prompts: Sequence[str], device, max_len: int) -> tuple[list[torch.Tensor], int]:
    """Per-prompt features (L_i, C) with padding removed (length from the mask), cut to max_len tokens.
    Accepts encoders returning (features, mask) or an object with .features / .mask. Returns (features,
    number of prompts that were cut by the encoder or to max_len)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptCutWarning)
        out = encoder.encode(list(prompts), device)
    if isinstance(out, (tuple, list)):
        feats, mask = out[0], out[1] if len(out) > 1 else None
    else:
        feats, mask = out.features, getattr(out, "mask", None)
    if feats.dim() != 3 or feats.shape[0] != len(prompts):
        raise ValueError(f"text encoder returned features of shape {tuple(feats.shape)} for {len(prompts)} prompts")
    lengths = mask.sum(1).tolist() if mask is not None else [feats.shape[1]] * len(prompts)
    cut = captions_cut(encoder, prompts, lengths, max_len)
    return [feats[i, :max(1, min(int(n), max_len))].float() for i, n in enumerate(lengths)], cut


class Trainer(Harness):
    """The generator's run, from a RunConfig. Components can be passed in (tests, notebooks); otherwise they are
    loaded from the config's paths. Call `fit()`; `close()` releases threads and the process group.

    What differs from the other trainers: one optimizer step is `grad_accum` packed micro-batches, the model may be
    sharded over torchrun's processes (FSDP2 or DDP), checkpoints go through `CheckpointManager` (sharded
    optimizer state, per-rank data position and RNG), and logged numbers are reduced over the ranks."""

    name = "train"
    config_class = RunConfig

    def __init__(self, config: RunConfig, *, transformer: Optional[nn.Module] = None, text_encoder=None,
                 tokenizer=None, resume: Optional[str] = None):
        cfg = config
        if not cfg.data.manifests:
            raise ConfigError("data.manifests is empty: give at least one JSONL manifest (or folder of them)")
        super().__init__(config, resume)
        info = self.info

        # --- model (same initial weights on every rank: seeded before construction) -------------------
        torch.manual_seed(cfg.seed)
        if transformer is None:
            transformer = InfinityStarTransformer(cfg.model.build())
            if cfg.model.init_from is not None:
                f = Path(cfg.model.init_from) / "model.safetensors"
                load_strict(transformer, read_tensors(f), str(f))
        self.transformer = transformer.to(self.device).train()
        self.model_config: TransformerConfig = transformer.config
        transformer.gradient_checkpointing = cfg.train.activation_checkpointing
        if cfg.train.compile:
            transformer.set_compile(True)

        # --- text encoder (frozen, or trained with the transformer) and the frozen tokenizer ---------------
        if text_encoder is None:
            if cfg.text_encoder.path is None:
                raise ConfigError("text_encoder.path is not set")
            text_encoder = load_text_encoder(cfg.text_encoder.path, device=self.device)
        if tokenizer is None and cfg.tokenizer.path is not None:
            tokenizer = load_tokenizer(cfg.tokenizer.path, self.device)
        if tokenizer is None and cfg.data.latent_cache is None:
            raise ConfigError("neither tokenizer.path nor data.latent_cache is set: training needs latents")
        self.text_trainable = cfg.text_encoder.trainable
        if self.text_trainable and not (isinstance(text_encoder, nn.Module) and hasattr(text_encoder, "tokenize")):
            raise ConfigError(f"text_encoder.trainable: only the built-in word encoder can be trained with the "
                              f"generator, got {type(text_encoder).__name__}")
        for comp in (text_encoder, tokenizer):
            if isinstance(comp, nn.Module):
                comp.eval().requires_grad_(False)
        if self.text_trainable:
            torch.manual_seed(derive_seed(cfg.seed, "text_encoder"))
            text_encoder.to(self.device).train().requires_grad_(True)
        self.train_module = PackedTrainModule(transformer, text_encoder if self.text_trainable else None)
        self.module = wrap_model(self.train_module, transformer.blocks, info, cfg.train.parallel)
        channels = getattr(text_encoder, "channels", None)
        if isinstance(channels, int) and channels != self.model_config.text_channels:
            raise ConfigError(f"the text encoder gives {channels}-channel features, the model expects "
                              f"{self.model_config.text_channels} (model.text_channels)")
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_max_len = min(self.model_config.text_maxlen, self.model_config.null_text_len)
        self.setup_optimizer(self.train_module, cfg.train.ema_decay)

        # --- data ------------------------------------------------------------------------------------------
        d = cfg.data
        self.records = read_manifests(d.manifests, d.video_caption_fields, d.image_caption_fields)
        self.spec = spec_from_config(cfg)
        if tokenizer is None:
            self.spec.require_cache = True   # nothing could encode an uncached sample: skip and count it
        order = ShardedOrder(len(self.records), cfg.seed, info.rank, info.world_size, d.shuffle)
        self.loader = SampleLoader(self.records, self.spec, order, d.num_workers)
        per_clip = cfg.pyramid.build().build(1).scales_per_clip
        self.scale_acc = ScaleAccuracy(per_clip, self.device)
        for key in ("clip_scale_boost", "first_frame_scale_boost"):
            boost = getattr(cfg.train, key)
            if boost is not None and (len(boost) != per_clip or min(boost) <= 0):
                raise ConfigError(f"train.{key}: expected {per_clip} positive factors (one per scale of a "
                                  f"clip), got {boost}")

        # --- state: seeded per rank, then the checkpoint (if any) restores it ---------------------------
        self.text_cut = 0
        random.seed(derive_seed(cfg.seed, "python", info.rank))
        np.random.seed(derive_seed(cfg.seed, "numpy", info.rank) % 2 ** 32)
        torch.manual_seed(derive_seed(cfg.seed, "torch", info.rank))
        self.begin()

    def setup_process(self) -> DistInfo:
        return init_distributed(self.config.device)

    # ------------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return resolve_backend(self.config.train.attention_backend, self.device)

    def _latent(self, raw) -> torch.Tensor:
        if raw.latent is not None:
            self.loader.stats.cache_hits += 1
            return raw.latent.to(self.device)
        self.loader.stats.encoded += 1
        z = encode_pixels(self.tokenizer, raw.pixels, self.device, self.spec.pixels_per_latent,
                          self.spec.pyramid.temporal_compression)
        if self.spec.latent_cache is not None and self.config.data.cache_write:
            path = cache_path(self.spec.latent_cache, raw.record)
            if not path.exists():   # a file made for other settings is another run's: left as it is
                write_latent(path, z, cache_meta(raw.record, self.spec, raw.num_frames))
        return z

    def micro_step(self, scale: float) -> tuple[torch.Tensor, int, int]:
        """Forward and backward of one micro-batch; returns (detached loss, real tokens, samples)."""
        t = self.config.train
        raws = self.loader.batch(t.micro_batch)
        samples = []
        for raw in raws:
            z = self._latent(raw)
            gen = torch.Generator().manual_seed(derive_seed(raw.seed, "targets"))
            common = dict(subset=t.scale_subset, bsc_strength=t.bsc_strength, repetition=t.repetition,
                          text_dropout=t.text_dropout, reweight_by_scale=t.reweight_by_scale,
                          max_reweight=t.max_reweight, bit_weighting=t.bit_weighting)
            if self.config.interact is not None:
                samples += prepare_interact_samples(z, raw.pyramid, raw.num_frames, self.config.interact,
                                                    raw.captions, raw.caption_of_clip, gen,
                                                    first_segment=t.interact_first_segment, **common)
            else:
                samples.append(prepare_sample(z, raw.pyramid.build(raw.num_frames), raw.captions,
                                              raw.caption_of_clip, gen, **common))
        if t.clip_scale_boost is not None or t.first_frame_scale_boost is not None:
            samples = [boost_scale_weights(s, t.clip_scale_boost, t.first_frame_scale_boost) for s in samples]
        prompts = [c for s in samples for c in s.captions]
        text_tokens = None
        if self.text_trainable:   # encoded inside the module, with gradients
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", PromptCutWarning)
                ids, mask = self.text_encoder.tokenize(prompts)
            lengths = mask.sum(1).tolist()
            feats = [TextRow(i, min(int(n), self.text_max_len)) for i, n in enumerate(lengths)]
            cut = captions_cut(self.text_encoder, prompts, lengths, self.text_max_len)
            text_tokens = (ids.to(self.device), mask.to(self.device))
        else:
            feats, cut = encode_texts(self.text_encoder, prompts, self.device, self.text_max_len)
        self.text_cut += cut
        per_sample, i = [], 0
        for s in samples:
            per_sample.append(feats[i:i + len(s.captions)])
            i += len(s.captions)
        batch = pack_batch(samples, per_sample, self.model_config.text_maxlen, t.pad_multiple, self.device)
        with self.autocast():   # the bit heads run in fp32 inside (InfinityStarTransformer.logits)
            logits, anchor = self.module(batch.x_visual, batch.captions, batch.packed, self.backend, text_tokens,
                                         batch.conditions)
        out = packed_loss(logits, batch, anchor, self.config.train.focal_gamma)
        (out.loss * scale).backward()
        for step, acc in out.scale_acc:   # image scales have t == 1 in clip 0; an interactive segment's t > 1
            self.scale_acc.add(step.scale.clip > 0 or step.scale.t > 1, step.scale.in_clip, acc)
        return out.loss.detach(), batch.tokens, len(samples)

    def forward_backward(self) -> dict[str, Any]:
        """`grad_accum` micro-steps; gradients are reduced over the ranks only on the last."""
        accum = self.config.train.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        tokens = samples = 0
        for m in range(accum):
            self._set_sync(m == accum - 1)
            loss, n_tok, n_s = self.micro_step(1.0 / accum)
            loss_sum += loss / accum
            tokens += n_tok
            samples += n_s
        return {"loss": loss_sum, "tokens": tokens, "samples": samples}

    def _set_sync(self, sync: bool) -> None:
        """Skip gradient reduction on all but the last micro-step of an accumulation."""
        if hasattr(self.module, "set_requires_gradient_sync"):     # FSDP2
            self.module.set_requires_gradient_sync(sync)
        elif hasattr(self.module, "require_backward_grad_sync"):   # DDP
            self.module.require_backward_grad_sync = sync

    # ------------------------------------------------------------------------------------------------------
    def describe(self, stop: int) -> str:
        cfg, info = self.config, self.info
        how = (f"{info.world_size} processes ({'FSDP2' if cfg.train.parallel == 'fsdp' else 'DDP'})"
               if info.distributed else "1 process")
        n_params = sum(p.numel() for p in self.params)
        return (f"infinitystar train: {how} on {self.device} ({self.precision}), {n_params:,} parameters, "
                f"{len(self.records)} samples, starting at step {self.step}\n--- config ---\n{cfg.to_yaml()}"
                f"--------------")

    def log_record(self, window: dict[str, Any], n: int, seconds: float, last: dict[str, Any]) -> dict[str, Any]:
        """Sums over the ranks: loss, tokens, samples, cache and skip counts, per-scale accuracy; the peak memory of
        the fullest rank."""
        info = self.info
        stats = self.loader.stats
        vec = torch.cat([
            torch.tensor([float(window["loss"]), window["tokens"], window["samples"], stats.cache_hits,
                          stats.encoded, self.text_cut] + [stats.skipped.get(k, 0) for k in SKIP_REASONS],
                         dtype=torch.float64, device=self.device),
            self.scale_acc.packed()])
        vec = all_reduce_sum(vec, info)
        peak = torch.tensor([peak_memory_mb(self.device)], device=self.device)
        if info.distributed:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        k = len(SKIP_REASONS)
        rec = {"step": self.step,
               "loss": round(float(vec[0]) / info.world_size / max(1, n), 6),
               "lr": last["lr"], "grad_norm": round(last["grad_norm"], 6),
               "tokens_per_s": round(float(vec[1]) / seconds, 1),
               "samples_per_s": round(float(vec[2]) / seconds, 3),
               "peak_memory_mb": round(float(peak), 1),
               "cache_hits": int(vec[3]), "encoded": int(vec[4]), "captions_cut": int(vec[5])}
        rec.update({f"skipped_{r}": int(v) for r, v in zip(SKIP_REASONS, vec[6:6 + k].tolist())})
        rec["nonfinite_steps"] = self.nonfinite_steps
        rec.update(self.scale_acc.summary(vec[6 + k:]))
        rec["precision"] = self.precision
        self.scale_acc.reset()
        return rec

    # ------------------------------------------------------------------------------------------------------
    def save(self) -> Path:
        cfg = self.config
        trainer_state = {"lr": lr_at(max(0, self.step - 1), cfg.optim, cfg.train.max_steps),
                         "lr_schedule": {"lr": cfg.optim.lr, "warmup_steps": cfg.optim.warmup_steps,
                                         "decay": cfg.optim.decay, "min_lr_ratio": cfg.optim.min_lr_ratio,
                                         "max_steps": cfg.train.max_steps},
                         "nonfinite_steps": self.nonfinite_steps, "config": cfg.to_dict()}
        stats = self.loader.stats
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state(self.device),
                      "stats": {"skipped": dict(stats.skipped), "cache_hits": stats.cache_hits,
                                "encoded": stats.encoded, "text_cut": self.text_cut}}
        opt = self.optimizer if cfg.checkpoint.save_optimizer else None
        return self.ckpt.save(self.step, self.module, self.model_config.to_dict(), opt, self.ema, trainer_state,
                              rank_state)

    def restore(self, path: Path) -> None:
        meta, rank_state = self.ckpt.load(path, self.module, self.train_module, self.optimizer, self.ema)
        self.step = int(meta["step"])
        self.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"], self.device)
            st = rank_state["stats"]
            self.loader.stats.skipped.update(st["skipped"])
            self.loader.stats.cache_hits, self.loader.stats.encoded = st["cache_hits"], st["encoded"]
            self.text_cut = st["text_cut"]
        else:
            # another world size: positions per rank do not carry over; restart the data at a fresh epoch
            samples = self.step * self.config.train.grad_accum * self.config.train.micro_batch
            epoch = 1 + samples * int(meta.get("world_size", 1)) // len(self.records)
            self.loader.order.epoch, self.loader.order.cursor = epoch, 0
            warnings.warn(f"{path} was written by {meta.get('world_size')} process(es), this run has "
                          f"{self.info.world_size}: data restarts at epoch {epoch}", stacklevel=2)

    def close(self) -> None:
        self.loader.close()
        super().close()
        shutdown(self.info)


def spec_from_config(cfg: RunConfig) -> SampleSpec:
    """The sample settings (bucket, duration, fps, captions, cache) of a run config; extraction uses the same."""
    d = cfg.data
    return SampleSpec(cfg.pyramid.build(), d.pixels_per_latent, d.fps, d.max_frames, cfg.duration_unit(),
                      d.short_caption_prob, d.duration_prefix, d.latent_cache, d.require_cache,
                      d.first_frame_all_captions)


train = Trainer.train
