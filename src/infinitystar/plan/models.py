"""What a plan runs: the official configurations by name, or a model folder, built as pipelines on the meta device.

Every part is the real module of this package (the transformer, the video VAE, the T5 encoder of `transformers`),
constructed on the meta device: shapes and dtypes exact, no memory. A named configuration has no files, so its T5
tokenizer is a stand-in that turns every prompt into `text_tokens` token ids; a model folder's own tokenizer files
are used when present.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from infinitystar.model.infinity import InfinityConfig, InfinityTransformer
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig, transformer_preset
from infinitystar.pipelines.base import DEFAULT_MODEL_DIR, INDEX_FILE, read_model_index
from infinitystar.pipelines.infinity import InfinityDefaults, InfinityPipeline
from infinitystar.pipelines.infinitystar import GenerationDefaults, InfinityStarPipeline
from infinitystar.schedules.pyramid import pyramid_preset
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.text.t5 import T5TextEncoder
from infinitystar.tokenizer.infinity_vae import InfinityVAE, InfinityVAEConfig
from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig

# flan-t5-xl's config.json (the text encoder of both official families): the encoder half is 1.22 B parameters.
FLAN_T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                  num_heads=32, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
                  decoder_start_token_id=0)

DEFAULT_TEXT_TOKENS = 128
SHAPES_PROMPT = "a large red circle moving right quickly on a black background"


@dataclass
class Target:
    """A plannable model: how to build its pipeline on the meta device and how to call it."""
    name: str
    family: str                                   # "infinitystar" or "infinity"
    description: str
    build: Callable[..., object]                  # (weights dtype, text tokens, device="meta") -> pipeline
    call: dict = field(default_factory=dict)      # keyword arguments of the pipeline call
    prompt: str = "a prompt"


class PlanTokenizer:
    """Stands in for a T5 tokenizer when there are no files: every prompt becomes `tokens` ids (EOS last)."""

    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, tokens: int):
        if tokens < 1:
            raise ValueError(f"text tokens must be positive, got {tokens}")
        self.tokens = tokens

    def __call__(self, prompts, max_length: int = 512, truncation: bool = True, return_tensors: str = "pt",
                 **_ignored):
        n = min(self.tokens, max_length) if truncation else self.tokens
        ids = torch.full((len(prompts), n), 3, dtype=torch.long)
        ids[:, -1] = self.eos_token_id
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _make(factory: Callable[[], nn.Module], dtype: Optional[torch.dtype], device="meta") -> nn.Module:
    """Construct a module on `device` (meta: no memory), its floating-point tensors created in `dtype` directly
    (a real device never holds an fp32 copy of a bf16 model)."""
    saved = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with torch.device(device):
            m = factory()
    finally:
        torch.set_default_dtype(saved)
    if dtype is not None:
        m.to(dtype)
    return m.eval()


def t5_encoder(config: dict, dtype: torch.dtype, tokenizer, device="meta") -> nn.Module:
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(**config)
    return T5TextEncoder(_make(lambda: T5EncoderModel(cfg), dtype, device), tokenizer)


def _infinitystar(pyramid: str, height: int, width: int, frames: int) -> Target:

    def build(dtype: torch.dtype, text_tokens: int, device="meta"):
        cfg: TransformerConfig = transformer_preset("infinity_qwen8b")
        transformer = _make(lambda: InfinityStarTransformer(cfg), dtype, device)
        vae = _make(lambda: VideoVAE(VideoVAEConfig.official()), None, device)
        text = t5_encoder(FLAN_T5_XL, torch.float16, PlanTokenizer(text_tokens), device)
        # the official inference settings (reference section 6): APG at scale 34, tau 1.0 / 0.4
        defaults = GenerationDefaults(guidance_scale=34.0, guidance="apg", apg_norm_threshold=0.05, tau_image=1.0,
                                      tau_video=0.4, fps=16)
        return InfinityStarPipeline(transformer, vae, text, pyramid_preset(pyramid), height, width, defaults)

    return Target(f"infinitystar-8b-{pyramid}", "infinitystar",
                  f"InfinityStar 8B, {pyramid} ({width}x{height}), {frames} frames ({(frames - 1) // 16} s at 16 fps), "
                  f"flan-t5-xl, video VAE", build, {"num_frames": frames})


def _infinity(preset: str, vae_preset: str) -> Target:

    def build(dtype: torch.dtype, text_tokens: int, device="meta"):
        cfg = InfinityConfig.preset(preset)
        transformer = _make(lambda: InfinityTransformer(cfg), dtype, device)
        vae = _make(lambda: InfinityVAE(InfinityVAEConfig.preset(vae_preset)), None, device)
        text = t5_encoder(FLAN_T5_XL, torch.float16, PlanTokenizer(text_tokens), device)
        return InfinityPipeline(transformer, vae, text, InfinityDefaults(pn="1M", aspect_ratio=1.0))

    size = preset.split("_")[1].upper()
    return Target(f"infinity-{size.lower()}", "infinity", f"Infinity {size}, 1024x1024 (pn 1M), flan-t5-xl, "
                  f"{vae_preset} tokenizer", build, {})


def named_targets(frames: Optional[int] = None) -> dict[str, Target]:
    return {t.name: t for t in (
        _infinitystar("720p", 720, 1280, frames or 81),
        _infinitystar("480p", 480, 848, frames or 81),
        _infinity("infinity_2b", "d32reg"),
        _infinity("infinity_8b", "d56_f8_14_patchify"),
    )}


NAMES = ("infinitystar-8b-720p", "infinitystar-8b-480p", "infinity-2b", "infinity-8b")


def folder_target(path: str, frames: Optional[int] = None, prompt: Optional[str] = None) -> Target:
    """A model folder (model_index.json + transformer/ tokenizer/ text_encoder/): configs are read, weights not."""
    d = Path(path)
    if not (d / INDEX_FILE).is_file():
        raise FileNotFoundError(f"{d}: not a model name ({', '.join(NAMES)}) nor a model folder (no {INDEX_FILE})")
    index = read_model_index(d)
    cls = InfinityPipeline if index.family == "infinity" else InfinityStarPipeline
    fields = cls._read_index(index)        # the pipeline's own fields, validated as loading does
    read = lambda sub: {k: v for k, v in json.loads((d / sub / "config.json").read_text()).items() if k != "type"}

    def text_encoder(text_tokens: int, device):
        cfg = json.loads((d / "text_encoder" / "config.json").read_text())
        if cfg.get("type") == WordTextEncoder.config_type:
            return _make(lambda: WordTextEncoder.from_config(read("text_encoder")), None, device)
        tokenizer = PlanTokenizer(text_tokens)
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(d / "text_encoder"), local_files_only=True, legacy=True)
        except (OSError, ValueError, ImportError):
            pass
        t5 = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type")}
        return t5_encoder(t5, torch.float16, tokenizer, device)

    def build(dtype, text_tokens, device="meta"):
        transformer = _make(lambda: cls.transformer_class.from_config(read("transformer")), dtype, device)
        vae = _make(lambda: cls.tokenizer_class.from_config(read("tokenizer")), None, device)
        return cls(transformer, vae, text_encoder(text_tokens, device), **fields)

    if index.family == "infinity":
        return Target(str(d), index.family, f"Infinity model folder {d}", build, {}, prompt or SHAPES_PROMPT)
    return Target(str(d), index.family, f"InfinityStar model folder {d} ({fields['width']}x{fields['height']})",
                  build, {"num_frames": frames or 17}, prompt or SHAPES_PROMPT)


def resolve(name: str, frames: Optional[int] = None, prompt: Optional[str] = None) -> Target:
    targets = named_targets(frames)
    if name in targets:
        return targets[name]
    if name == "default":
        return folder_target(str(DEFAULT_MODEL_DIR), frames, prompt)
    return folder_target(name, frames, prompt)


__all__ = ["Target", "PlanTokenizer", "named_targets", "folder_target", "resolve", "NAMES", "FLAN_T5_XL",
           "DEFAULT_TEXT_TOKENS"]
