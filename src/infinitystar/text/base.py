"""The text-encoder interface shared by both families: prompts in, per-token features plus a mask out.

`TextFeatures` is the padded form (B, L, C) with a mask of real tokens (the end-of-text token included);
`TextFeatures.compact()` gives the official variable-length form the reference feeds to its varlen attention:
the valid rows of every prompt concatenated, their lengths, `cu_seqlens` = [0, cumsum(lengths)] (int32) and the
longest length.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch


class CompactText(NamedTuple):
    """The reference's varlen tuple, in its order: (kv_compact, lens, cu_seqlens_k, max_seqlen_k)."""
    features: torch.Tensor      # (sum(lengths), C) float32: each prompt's valid rows, prompts in batch order
    lengths: torch.Tensor       # (B,) long
    cu_seqlens: torch.Tensor    # (B + 1,) int32: [0, cumsum(lengths)]
    max_seqlen: int


@dataclass
class TextFeatures:
    """Per-token text features of a batch of prompts.

    features: (B, L, C) float32, zero at padding positions. mask: (B, L) bool, True for real tokens (EOS
    included); real tokens come first in every row. lengths: (B,) long = mask.sum(1).
    """
    features: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    def __post_init__(self):
        f, m, n = self.features, self.mask, self.lengths
        if f.dim() != 3 or m.shape != f.shape[:2] or n.shape != f.shape[:1]:
            raise ValueError(f"TextFeatures: features {tuple(f.shape)}, mask {tuple(m.shape)} and lengths "
                             f"{tuple(n.shape)} do not fit (B, L, C), (B, L), (B,)")
        if m.dtype != torch.bool:
            raise ValueError(f"TextFeatures: mask must be bool, got {m.dtype}")

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def channels(self) -> int:
        return self.features.shape[-1]

    def to(self, device) -> "TextFeatures":
        return TextFeatures(self.features.to(device), self.mask.to(device), self.lengths.to(device))

    def compact(self) -> CompactText:
        lengths = self.lengths.to(torch.long)
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        max_len = int(lengths.max().item()) if lengths.numel() else 0
        return CompactText(self.features[self.mask], lengths, cu, max_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        """`features, mask = encoder.encode(...)`: unpacks like the (features, mask) pair older callers expect."""
        yield self.features
        yield self.mask


class PromptCutWarning(UserWarning):
    """A prompt was longer than the text encoder reads; the message says how much was cut. `generate
    --strict-prompt` turns it into an error."""


def prompt_overflow(encoder, prompts: Sequence[str]) -> list[int]:
    """Tokens each prompt loses to the encoder's own length limit (zeros for encoders without `overflow`)."""
    fn = getattr(encoder, "overflow", None)
    return list(fn(prompts)) if fn is not None else [0] * len(prompts)


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A non-empty list of non-blank strings (a single string is accepted as a batch of one)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass a non-empty list of texts")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, not a string")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: give a text describing what to generate")
    return prompts


class TextEncoder(ABC):
    """Prompts -> `TextFeatures`. Implementations are frozen, in eval mode, and return float32 features."""

    @property
    @abstractmethod
    def channels(self) -> int:
        """Feature width C (2048 for flan-t5-xl)."""

    @abstractmethod
    def encode(self, prompts: Sequence[str], device=None) -> TextFeatures:
        """Encode a batch of prompts; features land on `device` (default: the encoder's device)."""
