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


def read_tensors(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file, or an official `.pth` with `weights_only=True` (optionally one entry of it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files raise many different types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if key is not None:
        if not isinstance(sd, dict) or key not in sd:
            have = list(sd)[:8] if isinstance(sd, dict) else type(sd).__name__
            raise CheckpointError(f"{path}: expected an entry '{key}' (found {have})")
        sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a flat dict of tensors")
    return sd
