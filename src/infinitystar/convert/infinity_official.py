"""Official Infinity transformer checkpoints: explicit key map, config inference and strict loading.

Official names -> ours (shapes are reshaped where ours are plainer):
    cfg_uncond                              -> null_text
    pos_start [1, 1, C]                     -> start_pos [C]
    text_norm.weight                        -> text_norm.weight
    text_proj_for_sos.ca.mat_q [1, Hp, dp]  -> text_pool.query [Hp, dp]
    text_proj_for_sos.ca.mat_kv.weight      -> text_pool.kv_proj.weight
    text_proj_for_sos.ca.v_bias             -> text_pool.v_bias
    text_proj_for_sos.ca.proj.*             -> text_pool.out_proj.*
    text_proj_for_ca.{0,2}.*                -> text_mlp.{fc1,fc2}.*
    lvl_embed.weight                        -> level_embed.weight
    word_embed.*, head.*                    -> word_embed.*, head.*
    shared_ada_lin.1.*                      -> ada_lin.*
    head_nm.ada_lin.1.*                     -> head_ada_lin.*
  per block, `block_chunks.{i}.module.{j}` (n = i * per_chunk + j) or `blocks.{n}` -> `blocks.{n}`:
    ada_gss [1, 1, 6, C]                    -> ada_bias [6, C]
    sa.mat_qkv.weight, sa.q_bias, sa.v_bias -> attn.qkv.weight, attn.q_bias, attn.v_bias
    sa.scale_mul_1H11 [1,H,1,1] | [1,1,H,1] -> attn.log_scale [H]  (the shape depends on the reference's backend)
    sa.proj.*                               -> attn.proj.*
    ca.mat_q.*, ca.mat_kv.weight, ca.v_bias, ca.proj.* -> cross.q_proj.*, cross.kv_proj.weight, cross.v_bias, cross.proj.*
    ca_norm.*                               -> cross_norm.*
    ffn.fc1.*, ffn.fc2.*                    -> mlp.fc1.*, mlp.fc2.*
The `zero_k_bias` buffers (pooler, every sa and ca) are constant zeros: they are checked to be zero and dropped.
Buffers the reference itself discards on load (`lvl_1L`, `attn_bias_for_masking`) are dropped. Everything else
(missing, unexpected or mis-shaped keys) is an error naming the key in the official layout.

Files: `infinity_2b_reg.pth` (a plain state dict, or a training checkpoint's ['trainer']['gpt_fsdp']), a
.safetensors file, or a folder of HF shards with `model.safetensors.index.json` (the 8B) or
`pytorch_model.bin.index.json`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from infinitystar.checkpoint_io import CheckpointError, check_state_dict, read_tensors
from infinitystar.model.infinity import InfinityConfig, InfinityTransformer

PathLike = Union[str, Path]

_TOP: dict[str, str] = {
    "cfg_uncond": "null_text",
    "pos_start": "start_pos",
    "text_norm.weight": "text_norm.weight",
    "text_proj_for_sos.ca.mat_q": "text_pool.query",
    "text_proj_for_sos.ca.mat_kv.weight": "text_pool.kv_proj.weight",
    "text_proj_for_sos.ca.v_bias": "text_pool.v_bias",
    "text_proj_for_sos.ca.proj.weight": "text_pool.out_proj.weight",
    "text_proj_for_sos.ca.proj.bias": "text_pool.out_proj.bias",
    "text_proj_for_ca.0.weight": "text_mlp.fc1.weight",
    "text_proj_for_ca.0.bias": "text_mlp.fc1.bias",
    "text_proj_for_ca.2.weight": "text_mlp.fc2.weight",
    "text_proj_for_ca.2.bias": "text_mlp.fc2.bias",
    "lvl_embed.weight": "level_embed.weight",
    "word_embed.weight": "word_embed.weight",
    "word_embed.bias": "word_embed.bias",
    "shared_ada_lin.1.weight": "ada_lin.weight",
    "shared_ada_lin.1.bias": "ada_lin.bias",
    "head_nm.ada_lin.1.weight": "head_ada_lin.weight",
    "head_nm.ada_lin.1.bias": "head_ada_lin.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_BLOCK: dict[str, str] = {
    "ada_gss": "ada_bias",
    "sa.mat_qkv.weight": "attn.qkv.weight",
    "sa.q_bias": "attn.q_bias",
    "sa.v_bias": "attn.v_bias",
    "sa.scale_mul_1H11": "attn.log_scale",
    "sa.proj.weight": "attn.proj.weight",
    "sa.proj.bias": "attn.proj.bias",
    "ca.mat_q.weight": "cross.q_proj.weight",
    "ca.mat_q.bias": "cross.q_proj.bias",
    "ca.mat_kv.weight": "cross.kv_proj.weight",
    "ca.v_bias": "cross.v_bias",
    "ca.proj.weight": "cross.proj.weight",
    "ca.proj.bias": "cross.proj.bias",
    "ca_norm.weight": "cross_norm.weight",
    "ca_norm.bias": "cross_norm.bias",
    "ffn.fc1.weight": "mlp.fc1.weight",
    "ffn.fc1.bias": "mlp.fc1.bias",
    "ffn.fc2.weight": "mlp.fc2.weight",
    "ffn.fc2.bias": "mlp.fc2.bias",
}
_ZERO_BUFFERS = ("text_proj_for_sos.ca.zero_k_bias",)
_BLOCK_ZERO_BUFFERS = ("sa.zero_k_bias", "ca.zero_k_bias")
_DISCARDED = ("lvl_1L", "attn_bias_for_masking")
_CHUNKED = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_FLAT = re.compile(r"^blocks\.(\d+)\.(.+)$")
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _to_ours_shape(name: str, v: torch.Tensor) -> torch.Tensor:
    """Reshape the official tensors whose shapes carry broadcasting singleton axes."""
    if name == "start_pos":
        return v.reshape(-1)
    if name == "text_pool.query":
        return v.reshape(v.shape[-2], v.shape[-1])
    if name.endswith("ada_bias"):
        return v.reshape(6, -1)
    if name.endswith("attn.log_scale"):
        if v.dim() != 4 or sorted(v.shape)[:3] != [1, 1, 1]:
            raise CheckpointError(f"per-head attention scale of shape {tuple(v.shape)} is neither (1, H, 1, 1) "
                                  f"nor (1, 1, H, 1)")
        return v.reshape(-1)
    return v


def _check_zero(key: str, v: torch.Tensor) -> None:
    if bool(v.ne(0).any()):
        raise CheckpointError(f"checkpoint buffer {key} should be all zeros (the keys carry no bias), "
                              f"max |value| {v.abs().max().item():.3g}")


def official_to_ours(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and reshape) an official state dict to our layout. Unknown names pass through unchanged so that
    the strict check reports them by their own name."""
    chunks: dict[int, set[int]] = {}
    for k in sd:
        if m := _CHUNKED.match(k):
            chunks.setdefault(int(m[1]), set()).add(int(m[2]))
    per_chunk = 0
    if chunks:
        sizes = {len(js) for js in chunks.values()}
        per_chunk = max(max(js) for js in chunks.values()) + 1
        if sorted(chunks) != list(range(len(chunks))) or any(js != set(range(per_chunk)) for js in chunks.values()):
            raise CheckpointError(f"block chunks are not a full grid: chunk -> block indices "
                                  f"{ {i: sorted(js) for i, js in sorted(chunks.items())} } (sizes {sorted(sizes)})")
    if chunks and any(_FLAT.match(k) for k in sd):
        raise CheckpointError("checkpoint mixes block_chunks.{i}.module.{j} and blocks.{n} names")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in _DISCARDED:
            continue
        if k in _ZERO_BUFFERS:
            _check_zero(k, v)
            continue
        if k in _TOP:
            name = _TOP[k]
        elif (m := _CHUNKED.match(k)) or (m := _FLAT.match(k)):
            if m.re is _CHUNKED:
                n, rest = int(m[1]) * per_chunk + int(m[2]), m[3]
            else:
                n, rest = int(m[1]), m[2]
            if rest in _BLOCK_ZERO_BUFFERS:
                _check_zero(k, v)
                continue
            name = f"blocks.{n}.{_BLOCK[rest]}" if rest in _BLOCK else k
        else:
            name = k
        if name in out:
            raise CheckpointError(f"checkpoint key {k} duplicates {name}")
        out[name] = _to_ours_shape(name, v) if name != k else v
    return out


def ours_to_official(sd: Mapping[str, torch.Tensor], block_chunks: int = 1,
                     include_buffers: bool = True) -> dict[str, torch.Tensor]:
    """Our state dict -> the official layout (for export and round-trip tests). block_chunks > 1 writes
    `block_chunks.{i}.module.{j}` names as the released 2B (chunks of depth / block_chunks blocks)."""
    inv_top = {v: k for k, v in _TOP.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    depth = 1 + max((int(m[1]) for k in sd if (m := _OURS_BLOCK.match(k))), default=-1)
    if block_chunks < 1 or depth % block_chunks:
        raise ValueError(f"depth {depth} cannot be split into {block_chunks} equal chunks")
    per_chunk = depth // block_chunks
    prefix = (lambda n: f"block_chunks.{n // per_chunk}.module.{n % per_chunk}") if block_chunks > 1 \
        else (lambda n: f"blocks.{n}")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in inv_top:
            name = inv_top[k]
            if k == "start_pos":
                v = v.reshape(1, 1, -1)
            elif k == "text_pool.query":
                v = v.reshape(1, *v.shape)
            out[name] = v
            if include_buffers and name == "text_proj_for_sos.ca.v_bias":
                out["text_proj_for_sos.ca.zero_k_bias"] = torch.zeros_like(v)
        elif m := _OURS_BLOCK.match(k):
            n, rest = int(m[1]), m[2]
            if rest not in inv_block:
                raise ValueError(f"no official name for {k}")
            off = inv_block[rest]
            if rest == "ada_bias":
                v = v.reshape(1, 1, 6, -1)
            elif rest == "attn.log_scale":
                v = v.reshape(1, -1, 1, 1)
            out[f"{prefix(n)}.{off}"] = v
            if include_buffers and off in ("sa.v_bias", "ca.v_bias"):
                out[f"{prefix(n)}.{off[:3]}zero_k_bias"] = torch.zeros_like(v)
        else:
            raise ValueError(f"no official name for {k}")
    return out


def config_from_state_dict(sd: Mapping[str, torch.Tensor], spatial_patchify: bool = False,
                           **overrides) -> InfinityConfig:
    """Infer the architecture from our-layout weights. `spatial_patchify` cannot be seen in the weights (a
    token's 4d bits look like d' = 4d): the 8B needs it."""
    try:
        C, bits = sd["word_embed.weight"].shape
        depth = 1 + max(int(m[1]) for k in sd if (m := _OURS_BLOCK.match(k)))
        heads = sd["blocks.0.attn.log_scale"].shape[0]
        Lt, Ct = sd["null_text"].shape
        hp = sd["text_pool.query"].shape[0]
        F_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
        levels = sd["level_embed.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"cannot infer the Infinity architecture: checkpoint has no key {e.args[0]}") from None
    if spatial_patchify and bits % 4:
        raise CheckpointError(f"spatial_patchify needs 4d bits per token, the checkpoint has {bits}")
    kw = dict(depth=depth, width=C, num_heads=heads, latent_channels=bits // 4 if spatial_patchify else bits,
              spatial_patchify=spatial_patchify, text_channels=Ct, text_maxlen=Lt, mlp_ratio=F_hidden / C,
              num_levels=levels, pooler_head_dim=Ct // hp)
    kw.update(overrides)
    try:
        return InfinityConfig(**kw)
    except ValueError as e:
        raise CheckpointError(f"checkpoint describes no valid Infinity transformer ({e})") from None


def _read_index(folder: Path) -> dict[str, torch.Tensor]:
    for index_name, is_st in (("model.safetensors.index.json", True), ("pytorch_model.bin.index.json", False)):
        index = folder / index_name
        if index.is_file():
            break
    else:
        raise CheckpointError(f"{folder}: folder without model.safetensors.index.json or pytorch_model.bin.index.json")
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not an HF shard index ({type(e).__name__}: {e})") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        sd.update(read_tensors(folder / shard))
    listed, found = set(weight_map), set(sd)
    if listed - found:
        raise CheckpointError(f"{index}: keys listed but absent from their shards: {sorted(listed - found)[:8]}")
    if found - listed:
        raise CheckpointError(f"{index}: shards hold keys the index does not list: {sorted(found - listed)[:8]}")
    return sd


def read_official_infinity(path: PathLike) -> dict[str, torch.Tensor]:
    """Read official weights (see the module docstring for the accepted files)."""
    path = Path(path)
    if path.is_dir():
        return _read_index(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return read_tensors(path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files raise many types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("trainer"), dict):
        raw = raw["trainer"].get("gpt_fsdp", raw["trainer"])
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: not an Infinity transformer state dict")
    return raw


def _file_chunks(raw: Mapping[str, torch.Tensor]) -> int:
    """Number of block chunks the file's names use (1 for flat `blocks.{n}` names)."""
    ids = [int(m[1]) for k in raw if (m := _CHUNKED.match(k))]
    return max(ids) + 1 if ids else 1


def check_official(model: InfinityTransformer, raw: Mapping[str, torch.Tensor],
                   source: str = "official Infinity checkpoint") -> None:
    """Compare a file's keys and shapes with what the model needs, in the file's own layout (its names, its
    block chunking, its shapes), so every error names keys as the file spells them."""
    given = {k: v for k, v in raw.items() if k not in _DISCARDED}
    for k, v in list(given.items()):
        if k.endswith("sa.scale_mul_1H11") and v.dim() == 4 and v.shape[1] == 1:
            given[k] = v.reshape(1, -1, 1, 1)   # the (1, 1, H, 1) variant of the reference's flash backend
    chunks = _file_chunks(raw)
    depth = model.config.depth
    if depth % chunks:
        raise CheckpointError(f"{source}: {chunks} block chunks cannot hold the model's {depth} blocks")
    expected = ours_to_official(model.state_dict(), block_chunks=chunks)
    check_state_dict(expected, given, source)


def load_official_infinity(source: Union[PathLike, Mapping[str, torch.Tensor]],
                           config: Union[InfinityConfig, str, None] = None, *, spatial_patchify: bool = False,
                           device=None, dtype: Optional[torch.dtype] = None) -> InfinityTransformer:
    """Build an InfinityTransformer from official weights (a path or a state dict), strictly.

    config: an InfinityConfig, a preset name, or None to infer it from the weights (then `spatial_patchify`
    says whether a token covers 2x2 latent cells, as in the 8B)."""
    name = "official Infinity checkpoint" if isinstance(source, Mapping) else f"{source}"
    raw = source if isinstance(source, Mapping) else read_official_infinity(source)
    sd = official_to_ours(raw)
    if isinstance(config, str):
        config = InfinityConfig.preset(config)
    config = config or config_from_state_dict(sd, spatial_patchify)
    big = config.num_params() > 50_000_000
    with torch.device("meta" if big else "cpu"):   # big models: shapes only, no init work before the copy
        model = InfinityTransformer(config)
    check_official(model, raw, name)
    if big:
        model = model.to_empty(device=device or "cpu")
    model.load_state_dict(sd, strict=True)
    return model.to(device=device, dtype=dtype)
