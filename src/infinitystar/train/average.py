"""The weighted average of model folders' weights ("model soup"): one model between two fine-tunes of the same start.

Averaging is meaningful only between models that share an ancestor (e.g. a checkpoint and a fine-tune of it), the
same architecture and the same tokenizer: the generator's bits are the tokenizer's codes, so the tokenizer must be
identical and is copied, not averaged. The transformer and the text encoder are averaged parameter by parameter (in
float64, written in their own dtype); the first folder gives everything else (pyramid, generation defaults).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from infinitystar.checkpoint_io import check_state_dict, load_strict
from infinitystar.pipelines import load
from infinitystar.runtime import UserError

PathLike = Union[str, Path]
AVERAGED = ("transformer", "text_encoder")


def normalized_weights(weights: Optional[Sequence[float]], n: int) -> list[float]:
    """`weights` scaled to sum to 1 (equal weights when None); one per model, each finite and positive."""
    if n < 2:
        raise UserError(f"averaging needs at least two model folders, got {n}")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise UserError(f"{len(weights)} weights for {n} model folders: give one per folder")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"weights must be finite and positive, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def _first_difference(a: dict, b: dict) -> Optional[str]:
    """The first key whose tensor differs between two state dicts of the same keys (None when all are equal)."""
    return next((k for k in a if not torch.equal(a[k], b[k])), None)


def average_state_dicts(states: Sequence[dict], weights: Sequence[float], names: Sequence[str]) -> dict:
    """The weighted mean of state dicts with the same keys and shapes; integer tensors (buffers such as counters)
    must agree and are kept."""
    for state, name in zip(states[1:], names[1:]):
        check_state_dict(states[0], state, name)
    out = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            other = next((n for s, n in zip(states[1:], names[1:]) if not torch.equal(s[key], first)), None)
            if other is not None:
                raise UserError(f"{other}: non-float tensor {key} differs from {names[0]}'s; it cannot be averaged")
            out[key] = first.clone()
            continue
        acc = sum(w * s[key].double() for s, w in zip(states, weights))
        out[key] = acc.to(first.dtype)
    return out


def average_models(sources: Sequence[PathLike], out: PathLike, weights: Optional[Sequence[float]] = None) -> Path:
    """Write to `out` (which must not exist) the model folder whose transformer and text encoder are the
    `weights`-weighted mean of those of `sources` (equal weights by default). Returns `out`."""
    out = Path(out)
    weights = normalized_weights(weights, len(sources))
    if out.exists():
        raise UserError(f"{out} exists: give a new folder")
    try:
        pipes = [load(s, torch_dtype=torch.float32, device="cpu") for s in sources]
    except (FileNotFoundError, ValueError) as e:     # not a model folder, or an unreadable one: the user's input
        raise UserError(str(e)) from None
    names = [str(s) for s in sources]
    first = pipes[0]
    for pipe, name in zip(pipes[1:], names[1:]):
        if pipe.family != first.family or pipe.index_fields() != first.index_fields():
            raise UserError(f"{name}: its model_index.json (family, pyramid, size, inference mode) differs from "
                            f"{names[0]}'s; only models of the same architecture can be averaged")
        a, b = first.tokenizer.state_dict(), pipe.tokenizer.state_dict()
        check_state_dict(a, b, f"{name} tokenizer")
        key = _first_difference(a, b)
        if key is not None:
            raise UserError(f"{name}: its tokenizer differs from {names[0]}'s (first at {key}); average only models "
                            f"that share a tokenizer, since the generator's bits are its codes")
    for part in AVERAGED:
        modules = [getattr(p, part) for p in pipes]
        state = average_state_dicts([m.state_dict() for m in modules], weights,
                                    [f"{n} {part}" for n in names])
        load_strict(modules[0], state, f"the average of the {part}s")
    share = ", ".join(f"{w:.3g} x {n}" for w, n in zip(weights, names))
    first.card = dataclasses.replace(first.card, source=f"weight average: {share}")
    return first.save_pretrained(out)
