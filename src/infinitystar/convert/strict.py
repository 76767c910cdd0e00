"""Strict state-dict loading: every missing, unexpected or mis-shaped key is an error that names the key."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into (or cannot be read)."""


def _list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    bad_shapes = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if bad_shapes:
        problems.append(f"mis-shaped keys: {_list(bad_shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Check keys and shapes first (clear message), then copy the tensors (dtype-cast to the module's)."""
    check_state_dict(module.state_dict(), state_dict, source)
    module.load_state_dict(dict(state_dict), strict=True)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file (our own checkpoints), with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # truncated or foreign files raise several types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None


def read_state_dict(path: str | Path, nested: tuple[tuple[str, ...], ...] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: `.safetensors` (flat), or a `.pth` read with `weights_only=True`, descending
    into the first of the `nested` entry paths it has (e.g. ("vae",) or ("trainer", "gpt_fsdp")), else flat."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_tensors(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or pickled-object files raise many different types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    for keys in nested:
        node = raw
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            raw = node
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        have = list(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        wanted = "".join(f"a '{'/'.join(k)}' entry or " for k in nested)
        raise CheckpointError(f"{path}: expected {wanted}a flat dict of tensors (found {have})")
    return dict(raw)


CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def save_folder(directory: str | Path, kind: str, config: Mapping, module: nn.Module) -> Path:
    """Our model folder: `config.json` ({"type": kind, **config}) and `model.safetensors` (the state dict)."""
    import json
    from safetensors.torch import save_file
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG_FILE).write_text(json.dumps({"type": kind, **config}, indent=1) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(d / WEIGHTS_FILE))
    return d


def read_folder(directory: str | Path, kind: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config (without "type") and tensors of a folder written by `save_folder`; a folder without a "type"
    is accepted as the expected kind."""
    import json
    d = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: not a {what} folder, missing {name} (needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE})")
    raw = json.loads((d / CONFIG_FILE).read_text())
    if raw.get("type", kind) != kind:
        raise ValueError(f"{d / CONFIG_FILE}: type {raw.get('type')!r} is not {kind!r}")
    return {k: v for k, v in raw.items() if k != "type"}, read_tensors(d / WEIGHTS_FILE)
