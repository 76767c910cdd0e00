"""Official InfinityStar transformer checkpoints: key map, config inference and strict loading.

Official names -> ours (nanoGPT-style explicit map):
  cfg_uncond -> null_text, norm_hidden_sates -> final_norm, head -> head_detail, semantic_head2 -> head_semantic,
  blocks.{i} or block_chunks.{c}.module.{j} -> blocks.{c * per_chunk + j},
  input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm.
`sos_token` is allocated by the reference with torch.empty and never used: it is accepted and dropped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional

import torch

from infinitystar.checkpoint_io import CheckpointError, check_state_dict, read_state_dict, read_tensors
from infinitystar.model.infinitystar import InfinityStarTransformer, TransformerConfig

_TOP = {
    "cfg_uncond": "null_text",
    "norm_hidden_sates.weight": "final_norm.weight",
    "head.weight": "head_detail.weight", "head.bias": "head_detail.bias",
    "semantic_head2.weight": "head_semantic.weight", "semantic_head2.bias": "head_semantic.bias",
    "text_proj.weight": "text_proj.weight", "text_proj.bias": "text_proj.bias",
    "word_embed.weight": "word_embed.weight", "word_embed.bias": "word_embed.bias",
}
_DROPPED = {"sos_token"}
_BLOCK_SUB = {"input_layernorm.": "attn_norm.", "post_attention_layernorm.": "mlp_norm."}
_CHUNKED = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^blocks\.(\d+)\.(.+)$")


def official_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    chunked = [(int(m[1]), int(m[2])) for k in sd if (m := _CHUNKED.match(k))]
    per_chunk = max(j for _, j in chunked) + 1 if chunked else 0
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _DROPPED:
            continue
        if k in _TOP:
            name = _TOP[k]
        elif (m := _CHUNKED.match(k)) or (m := _FLAT.match(k)):
            if m.re is _CHUNKED:
                i, rest = int(m[1]) * per_chunk + int(m[2]), m[3]
            else:
                i, rest = int(m[1]), m[2]
            for a, b in _BLOCK_SUB.items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            name = f"blocks.{i}.{rest}"
        else:
            name = k  # unknown keys stay as they are, so the strict check reports them by their own name
        if name in out:
            raise CheckpointError(f"checkpoint key {k} duplicates {name}")
        out[name] = v
    return out


def ours_to_official(sd: Mapping[str, torch.Tensor], block_chunks: int = 1) -> dict[str, torch.Tensor]:
    """Inverse map (for tests and for exporting back); `block_chunks > 1` writes block_chunks.{c}.module.{j}."""
    inv_top = {v: k for k, v in _TOP.items()}
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if block_chunks > 1 and depth % block_chunks:
        raise ValueError(f"depth {depth} is not divisible into {block_chunks} chunks")
    per_chunk = depth // block_chunks if block_chunks > 1 else depth
    out = {}
    for k, v in sd.items():
        if k in inv_top:
            out[inv_top[k]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in _BLOCK_SUB.items():
                if rest.startswith(b):
                    rest = a + rest[len(b):]
            i = int(i)
            prefix = f"block_chunks.{i // per_chunk}.module.{i % per_chunk}" if block_chunks > 1 else f"blocks.{i}"
            out[f"{prefix}.{rest}"] = v
        else:
            out[k] = v
    return out


def config_from_state_dict(sd: Mapping[str, torch.Tensor], text_maxlen: int = 512) -> TransformerConfig:
    """Infer the architecture from our-layout weights. `text_maxlen` (the RoPE offset of visual tokens) is not
    stored in checkpoints: the released models use 512."""
    try:
        C, latent = sd["word_embed.weight"].shape
        hd = sd["blocks.0.attn.q_norm.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        return TransformerConfig(
            width=C, depth=depth, num_heads=sd["blocks.0.attn.q_proj.weight"].shape[0] // hd,
            num_kv_heads=sd["blocks.0.attn.k_proj.weight"].shape[0] // hd,
            mlp_ratio=sd["blocks.0.mlp.gate_proj.weight"].shape[0] / C,
            qkvo_bias="blocks.0.attn.q_proj.bias" in sd, text_channels=sd["text_proj.weight"].shape[1],
            text_maxlen=text_maxlen, null_text_len=sd["null_text"].shape[0], latent_channels=latent,
            semantic_bits=sd["head_semantic.weight"].shape[0] // 2)
    except KeyError as e:
        raise CheckpointError(f"cannot infer the architecture: checkpoint has no key {e.args[0]}") from None


def read_official_transformer(path: str | Path) -> dict[str, torch.Tensor]:
    """Read official weights: a .pth (a full training checkpoint's ['trainer']['gpt_fsdp'] or a plain state
    dict), a .safetensors file, or a folder of HF-sharded safetensors with model.safetensors.index.json."""
    path = Path(path)
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if not index.is_file():
            raise CheckpointError(f"{path}: folder without model.safetensors.index.json")
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(read_tensors(path / f))
        return sd
    return read_state_dict(path, (("trainer", "gpt_fsdp"),))


def load_official_transformer(source, config: Optional[TransformerConfig] = None, text_maxlen: int = 512,
                              device=None, dtype=None):
    """Build an InfinityStarTransformer from official weights (a path or a state dict), strictly."""
    sd = official_to_ours(source if isinstance(source, Mapping) else read_official_transformer(source))
    config = config or config_from_state_dict(sd, text_maxlen)
    model = InfinityStarTransformer(config)
    check_state_dict(model.state_dict(), sd, "official transformer checkpoint (keys shown in our layout)")
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype)
