"""`infinitystar convert SRC DST`: an official checkpoint -> our folder layout (config.json + model.safetensors).

Four kinds of released files are understood:

    infinitystar-transformer  the InfinityStar 8B (`infinitystar_8b_*_weights/`, HF shards) or a training .pth
    infinity-transformer      Infinity 2B / 8B (`infinity_2b_reg.pth`, `infinity_8b_weights/`)
    video-vae                 the InfinityStar video tokenizer (`infinitystar_videovae.pth`)
    infinity-vae              the Infinity image tokenizers (`infinity_vae_d32reg.pth`, `..._d56_f8_14_patchify.pth`)

The source is read once (a `.pth` with weights_only=True, descending into its "vae" or ["trainer"]["gpt_fsdp"]
entry; a `.safetensors` file; or a folder with an HF shard index), its kind is read from the key names unless given,
and it is loaded strictly into our module by the same loader that reads official files directly (so a converted
folder holds exactly the tensors a direct load gives). The module is then written with its own `save_pretrained`,
which is what the matching `from_pretrained` (and the pipelines) read.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from infinitystar.checkpoint_io import CheckpointError, read_state_dict
from infinitystar.convert.infinity_official import load_official_infinity, read_official_infinity
from infinitystar.convert.official import load_official_transformer
from infinitystar.model.infinity import InfinityTransformer
from infinitystar.model.infinitystar import InfinityStarTransformer, transformer_preset
from infinitystar.tokenizer.infinity_vae import InfinityVAE
from infinitystar.tokenizer.video_vae import VideoVAE, VideoVAEConfig

PathLike = Union[str, Path]

# Entries of an official .pth that hold the weights: the tokenizers' "vae", a training checkpoint's model.
_NESTED = (("vae",), ("trainer", "gpt_fsdp"))
_OUR_FILES = ("config.json", "model.safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- the four kinds -------------------------------------------------------------------------------------------------
def _load_infinitystar_transformer(sd, preset, text_maxlen):
    maxlen = 512 if text_maxlen is None else text_maxlen   # the released models' RoPE offset (not in the weights)
    config = transformer_preset(preset, text_maxlen=maxlen) if preset else None
    return load_official_transformer(sd, config=config, text_maxlen=maxlen)


def _load_dir_infinitystar_transformer(d: Path, device=None):
    return InfinityStarTransformer.from_pretrained(d, device=device)


def _load_infinity_transformer(sd, preset, text_maxlen):
    return load_official_infinity(sd, config=preset)


def _load_dir_infinity_transformer(d: Path, device=None):
    return InfinityTransformer.from_pretrained(d, device=device)


def _load_video_vae(sd, preset, text_maxlen):
    return VideoVAE.from_official(sd, config=VideoVAEConfig.preset(preset) if preset else None)


def _load_dir_video_vae(d: Path, device=None):
    return VideoVAE.from_pretrained(d, device=device)


def _load_infinity_vae(sd, preset, text_maxlen):
    return InfinityVAE.from_official(sd, config=preset)


def _load_dir_infinity_vae(d: Path, device=None):
    return InfinityVAE.from_pretrained(d, device=device)


def _save_module(model, d: Path) -> None:
    model.save_pretrained(d)


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    config_type: Optional[str]                     # the "type" our config.json carries (None: no type field)
    presets: str                                   # what --preset accepts, for help and errors
    load_official: Callable[[Mapping[str, torch.Tensor], Optional[str], Optional[int]], nn.Module]
    save: Callable[[nn.Module, Path], None]
    load_converted: Callable[..., nn.Module]


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("infinitystar-transformer", "InfinityStar transformer (8B, qwen blocks)", "infinitystar_transformer",
         "a TransformerConfig preset of infinitystar.model.infinitystar (infinity_qwen8b, ...)",
         _load_infinitystar_transformer, _save_module, _load_dir_infinitystar_transformer),
    Kind("infinity-transformer", "Infinity transformer (2B / 8B)", "infinity_transformer",
         "infinity_2b, infinity_8b (needed for the 8B: its 2x2 patchify is not visible in the weights), tiny",
         _load_infinity_transformer, _save_module, _load_dir_infinity_transformer),
    Kind("video-vae", "InfinityStar video tokenizer", "video_vae", "official, tiny, small",
         _load_video_vae, _save_module, _load_dir_video_vae),
    Kind("infinity-vae", "Infinity image tokenizer (BSQ-VAE)", "infinity_vae",
         "d16, d24, d32, d32reg, d64, d56_f8_14_patchify (the 8B's; records its patchify), tiny",
         _load_infinity_vae, _save_module, _load_dir_infinity_vae),
)}

# Key names that only one kind has (official spellings; the Infinity VAE in its plain or wrapped form).
_SIGNATURES: dict[str, re.Pattern] = {
    "infinitystar-transformer": re.compile(r"^(semantic_head2\.|norm_hidden_sates\.|"
                                           r"(blocks|block_chunks\.\d+\.module)\.\d+\.attn\.q_proj\.)"),
    "infinity-transformer": re.compile(r"^(shared_ada_lin\.|lvl_embed\.|pos_start$|text_proj_for_sos\.|"
                                       r"(blocks|block_chunks\.\d+\.module)\.\d+\.sa\.mat_qkv\.)"),
    "video-vae": re.compile(r"^(encoder\.down_blocks\.|decoder\.up_blocks\.|proj_down\.|scale_learnable_parameters$)"),
    "infinity-vae": re.compile(r"^(encoder\.down\.\d+\.block\.|decoder\.up\.\d+\.block\.)"),
}


def kinds_list() -> str:
    return "; ".join(f"{k.name} ({k.description})" for k in KINDS.values())


def detect_kind(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> str:
    """The kind of an official state dict, from its key names; an error listing the kinds if it is not clear."""
    found = [name for name, rx in _SIGNATURES.items() if any(rx.match(k) for k in state_dict)]
    if len(found) == 1:
        return found[0]
    sample = ", ".join(sorted(state_dict)[:6]) or "no tensors"
    if not found:
        raise CheckpointError(f"{source}: cannot tell which model these weights belong to (keys: {sample} ...); "
                              f"pass --kind, one of: {kinds_list()}")
    raise CheckpointError(f"{source}: the keys look like several models ({', '.join(found)}); pass --kind, one of: "
                          f"{', '.join(KINDS)}")


def read_official(path: PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an official file or HF-sharded folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return read_official_infinity(path)      # reads any HF shard index; nothing Infinity-specific for folders
    return read_state_dict(path, _NESTED)


def _dominant_float_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(v.dtype for v in sd.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def _write_folder(dst: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    """Write into a temporary sibling folder, then move the files in: an interrupted conversion leaves no
    half-written model.safetensors at `dst`."""
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} is a file; the destination is a folder")
    present = [n for n in _OUR_FILES if (dst / n).exists()]
    if present and not overwrite:
        raise FileExistsError(f"{dst} already holds {', '.join(present)}; pass --force to replace them")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
    try:
        write(tmp)
        dst.mkdir(exist_ok=True)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)    # safetensors writes 0600; a converted model is usually shared
            os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ConvertResult:
    kind: str
    src: Path
    dst: Path
    num_params: int
    dtype: torch.dtype


def convert(src: PathLike, dst: PathLike, kind: Optional[str] = None, *, text_maxlen: Optional[int] = None,
            preset: Optional[str] = None, dtype: Union[torch.dtype, str, None] = None,
            overwrite: bool = False) -> ConvertResult:
    """Convert an official checkpoint to our folder layout.

    kind: one of `KINDS` (None: read from the key names). text_maxlen: the RoPE offset of an InfinityStar
    transformer's visual tokens (not stored in checkpoints; default 512, the released value). preset: the
    architecture instead of inferring it from the tensor shapes (needed for the Infinity 8B transformer).
    dtype: of the written tensors (None: the checkpoint's own, so a bf16 release stays bf16 on disk; loading casts
    to the module's dtype exactly as a direct load of the official file does). overwrite: replace an existing
    converted folder.
    """
    src, dst = Path(src), Path(dst)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    sd = read_official(src)
    kind = kind or detect_kind(sd, str(src))
    if text_maxlen is not None and kind != "infinitystar-transformer":
        raise ValueError(f"--text-maxlen applies to infinitystar-transformer only (a {kind} stores its text length "
                         f"in the weights, or has none)")
    out_dtype = dtype or _dominant_float_dtype(sd)
    try:
        model = KINDS[kind].load_official(sd, preset, text_maxlen)
    except CheckpointError as e:
        raise CheckpointError(f"{src} (as {kind}): {e}") from None
    del sd
    model = model.to(dtype=out_dtype)
    _write_folder(dst, lambda d: KINDS[kind].save(model, d), overwrite)
    return ConvertResult(kind, src, dst, sum(p.numel() for p in model.parameters()), out_dtype)


def load_converted(directory: PathLike, kind: Optional[str] = None, device=None) -> nn.Module:
    """Load a converted folder with the `from_pretrained` of its kind (None: from config.json's "type")."""
    d = Path(directory)
    if kind is None:
        cfg = d / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{d}: not a converted model folder (no config.json)")
        t = json.loads(cfg.read_text()).get("type")
        by_type = {k.config_type: k.name for k in KINDS.values()}
        if t not in by_type:
            raise ValueError(f"{cfg}: unknown type {t!r}")
        kind = by_type[t]
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return KINDS[kind].load_converted(d, device=device)


__all__ = ["KINDS", "Kind", "ConvertResult", "convert", "detect_kind", "read_official", "load_converted"]
