"""What every architecture config dataclass shares (`TransformerConfig` in model/infinitystar.py, `InfinityConfig`
in model/infinity.py, `VideoVAEConfig` and `InfinityVAEConfig` in tokenizer/, `PyramidConfig` in
schedules/pyramid.py, `InteractConfig` in quant/interact.py): each sits next to its model with its presets."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ArchConfig:
    """`to_dict` (JSON-ready: tuples as lists) and a strict `from_dict` (an unknown field is an error that names
    it; a model folder's "type" key is skipped)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"type"})
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})
