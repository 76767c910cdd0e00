"""The built-in text encoder of the default model: a word-level vocabulary and a small transformer encoder.

It plays the role T5 plays for the released models (features plus a mask of real tokens, an end-of-text token
counted in the length) but is small enough to train with the generator on a CPU. Words outside the vocabulary
map to <unk> with a warning that names them and lists what the model understands.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from infinitystar.text.base import TextEncoder, TextFeatures, check_prompts

SPECIAL = ("<pad>", "<eos>", "<unk>")
PAD, EOS, UNK = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+")


def split_words(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


class WordTextEncoder(nn.Module, TextEncoder):
    def __init__(self, vocab: Sequence[str], width: int = 128, depth: int = 2, num_heads: int = 4,
                 max_len: int = 32):
        super().__init__()
        words = sorted(set(vocab) - set(SPECIAL))
        if not words:
            raise ValueError("the vocabulary is empty")
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.words = words
        self.index = {w: i + len(SPECIAL) for i, w in enumerate(words)}
        self.config = dict(vocab=words, width=width, depth=depth, num_heads=num_heads, max_len=max_len)
        self.max_len = max_len
        self.embed = nn.Embedding(len(SPECIAL) + len(words), width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    @property
    def channels(self) -> int:
        return self.config["width"]

    def tokenize(self, prompts: Sequence[str], warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) padded to the longest prompt, and the mask of real tokens (EOS included)."""
        rows, unknown = [], []
        for p in check_prompts(prompts):
            words = split_words(p)
            if not words:
                raise ValueError(f"empty prompt {p!r}: describe what to generate, e.g. "
                                 f"'a large red circle moving right quickly on a black background'")
            unknown += [w for w in words if w not in self.index]
            ids = [self.index.get(w, UNK) for w in words][: self.max_len - 1] + [EOS]
            rows.append(ids)
        if unknown and warn:
            warnings.warn(f"unknown word(s) {', '.join(sorted(set(unknown)))} ignored by the built-in text encoder; "
                          f"it understands: {' '.join(self.words)}", stacklevel=3)
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        return ids, ids != PAD

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        return self.norm(x) * mask[..., None]

    def encode(self, prompts: Sequence[str], device=None) -> TextFeatures:
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(self.embed.weight.device), mask.to(self.embed.weight.device)
        out = TextFeatures(self(ids, mask), mask, mask.sum(1))
        return out if device is None else out.to(device)

    def save_pretrained(self, directory: str | Path) -> None:
        from infinitystar.convert.strict import save_folder
        save_folder(directory, "builtin", self.config, self)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None) -> "WordTextEncoder":
        from infinitystar.convert.strict import load_strict, read_folder
        config, sd = read_folder(directory, "builtin", "built-in text encoder")
        model = cls(**config)
        load_strict(model, sd, f"{directory}/model.safetensors")
        return model.to(device).eval()


def main(argv=None) -> int:
    """`python -m infinitystar.text.builtin OUT`: a freshly initialised encoder over the Shapes World vocabulary
    (the starting point that `text_encoder.trainable` trains with the generator)."""
    import argparse
    from infinitystar.shapes.world import vocabulary
    p = argparse.ArgumentParser(prog="python -m infinitystar.text.builtin", description=main.__doc__)
    p.add_argument("out")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    WordTextEncoder(vocabulary(), a.width, a.depth, a.heads, a.max_len).save_pretrained(a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
