"""`infinitystar convert --release DIR OUT`: an official release folder -> a complete model folder in one step.

DIR holds what the official scripts expect side by side (names as released; `--transformer`, `--vae` and
`--text-encoder` point elsewhere):

    InfinityStar  infinitystar_8b_480p_weights/ or infinitystar_8b_720p_weights/ (HF shards) or a training .pth,
                  infinitystar_videovae.pth, text_encoder/flan-t5-xl-official/ (a local flan-t5-xl folder)
    Infinity      infinity_2b_reg.pth + infinity_vae_d32reg.pth, or infinity_8b_weights/ +
                  infinity_vae_d56_f8_14_patchify.pth, and a flan-t5-xl folder

The transformer and the tokenizer are converted by `convert` (strict, official key names checked), the flan-t5-xl
files are linked (or copied) in, and `model_index.json` gets the released sampling settings (InfinityStar: the
480p/720p pyramid, APG with cfg 34, tau 1.0 on image scales and 0.4 on video scales, 16 fps; Infinity: CFG 3, tau
0.5 for the 2B and 1.0 for the 8B, top-p 0.97) and a model card (source, licence, our version, parity evidence).
Everything is written to a temporary sibling folder first, so an interrupted conversion leaves no partial OUT.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from infinitystar import __version__
from infinitystar.checkpoint_io import CheckpointError, umask_mode, write_json, write_text
from infinitystar.convert.cli import ConvertResult, convert
from infinitystar.pipelines.base import CARD_FILE, INDEX_FILE, ModelCard, index_data, render_card
from infinitystar.pipelines.infinity import InfinityDefaults
from infinitystar.pipelines.infinitystar import GenerationDefaults
from infinitystar.schedules.pyramid import pyramid_preset
from infinitystar.text.t5 import check_t5_dir
from infinitystar.tokenizer.video_vae import VideoVAEConfig

PathLike = Union[str, Path]

# How the released files are named (the reference scripts' paths), per role.
_TRANSFORMERS = {"infinitystar": re.compile(r"^infinitystar.*(weights|\.pth)$", re.I),
                 "infinity": re.compile(r"^infinity_(?!vae)\w*?(\d+b)\w*(weights|\.pth)$", re.I)}
_VAES = {"infinitystar": re.compile(r"^.*videovae.*\.pth$", re.I),
         "infinity": re.compile(r"^infinity_vae.*\.pth$", re.I)}
_T5_FILES = re.compile(r"^(config\.json|model.*\.safetensors(\.index\.json)?|tokenizer(_config)?\.json|spiece\.model|"
                       r"special_tokens_map\.json|generation_config\.json)$")
_SOURCES = {"infinitystar": "FoundationVision/InfinityStar", "infinity": "FoundationVision/Infinity"}
# Licences as the source repositories state them (the Infinity repository's README: MIT). Not recorded for
# InfinityStar by this converter: pass --license with what the release says.
_LICENSES = {"infinity": "mit (as the FoundationVision/Infinity repository states; check the weights' terms)",
             "infinitystar": "not recorded by the converter: see the FoundationVision/InfinityStar release"}
# What the golden fixtures (tests/fixtures, made by the official code) show for each family's architecture.
_PARITY = {
    "infinitystar": "transformer logits within 1.5e-6 and video tokenizer within 1.9e-6 of the official code on "
                    "its golden fixtures (`infinitystar parity tests/fixtures/infinitystar/transformer`, `.../vae`)",
    "infinity": "transformer within 7e-6 (bits exact) and tokenizer within 1.0e-5 of the official code on its "
                "golden fixtures (`infinitystar parity tests/fixtures/infinity/...`)",
}


@dataclass
class ReleaseParts:
    family: str
    transformer: Path
    vae: Path
    text_encoder: Path


def _under(root: Path, given: Optional[PathLike]) -> Optional[Path]:
    if given is None:
        return None
    p = Path(given)
    return p if p.is_absolute() or p.exists() else root / p


def _one(found: list[Path], what: str, flag: str, root: Path) -> Path:
    if not found:
        raise CheckpointError(f"{root}: no {what} found; pass {flag} PATH")
    if len(found) > 1:
        names = ", ".join(p.name for p in sorted(found))
        raise CheckpointError(f"{root}: several {what}s ({names}); choose one with {flag} PATH")
    return found[0]


def find_release_parts(root: PathLike, transformer: Optional[PathLike] = None, vae: Optional[PathLike] = None,
                       text_encoder: Optional[PathLike] = None) -> ReleaseParts:
    """The transformer, tokenizer and flan-t5 folder of a release folder (by their released names), or the given
    paths; one-line errors for what is missing or ambiguous."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such release folder")
    entries = sorted(root.iterdir())
    transformer = _under(root, transformer)
    if transformer is None:
        found = [p for p in entries if any(rx.match(p.name) for rx in _TRANSFORMERS.values())
                 and not any(rx.match(p.name) for rx in _VAES.values())]
        transformer = _one(found, "transformer (infinitystar_*_weights/, infinity_2b_reg.pth, ...)", "--transformer",
                           root)
    family = "infinitystar" if transformer.name.lower().startswith("infinitystar") else "infinity"
    released = "infinitystar_videovae.pth" if family == "infinitystar" else "infinity_vae_*.pth"
    vae = _under(root, vae) or _one([p for p in entries if _VAES[family].match(p.name)],
                                    f"{family} tokenizer ({released})", "--vae", root)
    text_encoder = _under(root, text_encoder)
    if text_encoder is None:
        t5 = [p.parent for p in sorted(root.glob("**/config.json")) if len(p.relative_to(root).parts) <= 4
              and _is_t5(p)]
        text_encoder = _one(t5, "flan-t5 text encoder folder", "--text-encoder", root)
    for p, what in ((transformer, "transformer"), (vae, "tokenizer")):
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such {what} file or folder")
    check_t5_dir(text_encoder)
    return ReleaseParts(family, transformer, vae, text_encoder)


def _is_t5(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("model_type") == "t5"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (no second copy of a 10 GB text encoder on the same disk), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
        os.chmod(dst, umask_mode())


def _variant(name: str, options: tuple[str, ...], given: Optional[str], what: str) -> str:
    if given is not None:
        if given not in options:
            raise ValueError(f"unknown {what} {given!r}; choose one of {', '.join(options)}")
        return given
    found = [o for o in options if o in name.lower()]
    if len(found) != 1:
        raise ValueError(f"cannot tell the {what} from the name {name!r}; pass --variant ({', '.join(options)})")
    return found[0]


@dataclass
class ReleaseResult:
    family: str
    out: Path
    parts: ReleaseParts
    transformer: ConvertResult
    tokenizer: ConvertResult


def convert_release(src: PathLike, out: PathLike, *, transformer: Optional[PathLike] = None,
                    vae: Optional[PathLike] = None, text_encoder: Optional[PathLike] = None,
                    variant: Optional[str] = None, license: Optional[str] = None, text_maxlen: Optional[int] = None,
                    dtype: Union[str, None] = None, overwrite: bool = False) -> ReleaseResult:
    """Convert an official release folder into a complete model folder (see the module docstring).

    variant: "480p" / "720p" (InfinityStar: the pyramid) or "2b" / "8b" (Infinity), read from the transformer's
    name when not given. license: the text for the model card. text_maxlen, dtype: as `convert`."""
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    parts = find_release_parts(src, transformer, vae, text_encoder)
    fam = parts.family
    variant = _variant(parts.transformer.name, ("480p", "720p") if fam == "infinitystar" else ("2b", "8b"), variant,
                       "InfinityStar resolution" if fam == "infinitystar" else "Infinity size")
    t5_width = json.loads((parts.text_encoder / "config.json").read_text()).get("d_model")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        if fam == "infinitystar":
            t = convert(parts.transformer, tmp / "transformer", "infinitystar-transformer", text_maxlen=text_maxlen,
                        dtype=dtype)
            k = convert(parts.vae, tmp / "tokenizer", "video-vae", dtype=dtype)
            pyramid = pyramid_preset(variant)
            h, w = pyramid.spatial_scales()[-1]
            stride = VideoVAEConfig.from_dict(_config(tmp / "tokenizer")).spatial_stride
            fields = {"pyramid": pyramid.to_dict(), "height": h * stride, "width": w * stride}
            defaults = GenerationDefaults(guidance_scale=34.0, guidance="apg", apg_eta=0.0, apg_norm_threshold=0.05,
                                          tau_image=1.0, tau_video=0.4, fps=16)
        else:
            big = variant == "8b"
            t = convert(parts.transformer, tmp / "transformer", "infinity-transformer",
                        preset="infinity_8b" if big else None, dtype=dtype)
            k = convert(parts.vae, tmp / "tokenizer", "infinity-vae",
                        preset="d56_f8_14_patchify" if big else None, dtype=dtype)
            fields = {}
            defaults = InfinityDefaults(guidance_scale=3.0, temperature=1.0 if big else 0.5, top_p=0.97)
        text_channels = _config(tmp / "transformer")["text_channels"]
        if t5_width != text_channels:
            raise CheckpointError(f"{parts.text_encoder}: a T5 with d_model {t5_width}, but the transformer reads "
                                  f"{text_channels}-channel text (flan-t5-xl: 2048)")
        (tmp / "text_encoder").mkdir()
        for f in sorted(parts.text_encoder.iterdir()):
            if f.is_file() and _T5_FILES.match(f.name):
                _link_or_copy(f, tmp / "text_encoder" / f.name)
        files = ", ".join(p.name for p in (parts.transformer, parts.vae, parts.text_encoder))
        card = ModelCard(
            source=f"the official {_SOURCES[fam]} release ({variant}): {files}",
            license=license or _LICENSES[fam],
            parity=f"every official tensor mapped strictly (transformer: {t.num_params / 1e6:.1f} M parameters, "
                   f"tokenizer: {k.num_params / 1e6:.1f} M; nothing missing, unexpected or mis-shaped); "
                   f"{_PARITY[fam]}",
            notes=f"Converted by `infinitystar convert --release` ({__version__}); the transformer's tensors are "
                  f"stored in {str(t.dtype).replace('torch.', '')}, the tokenizer's in "
                  f"{str(k.dtype).replace('torch.', '')}.")
        write_json(tmp / INDEX_FILE, index_data(fam, fields, defaults, card))
        title = f"{_SOURCES[fam].split('/')[1]} {variant}, converted for infinitystar"
        write_text(tmp / CARD_FILE, render_card(fam, title, card))
        if out.exists():
            shutil.rmtree(out)
        os.chmod(tmp, umask_mode(0o777))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReleaseResult(fam, out, parts, t, k)


def _config(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k != "type"}
