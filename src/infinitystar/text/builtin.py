"""The built-in text encoder of the default model: a word-level vocabulary and a small transformer encoder.

It plays the role T5 plays for the released models (features plus a mask of real tokens, an end-of-text token
counted in the length) but is small enough to train with the generator on a CPU. Nothing in a prompt is dropped
silently: words outside the vocabulary (non-ASCII ones included, read whole) map to <unk> with a warning that
names them and lists what the model understands, and words beyond `max_len - 1` are cut with a
`PromptCutWarning` that says how many (an error where the warning filter makes it one: `generate --strict-prompt`).
"""
from __future__ import annotations

import argparse
import re
import unicodedata
import warnings
from typing import Sequence

import torch
from torch import nn

from infinitystar.checkpoint_io import PretrainedMixin
from infinitystar.shapes.world import vocabulary
from infinitystar.text.base import PromptCutWarning, TextEncoder, TextFeatures, check_prompts

SPECIAL = ("<pad>", "<eos>", "<unk>")
PAD, EOS, UNK = 0, 1, 2
# letters and digits of any script, or one other non-ASCII character (an emoji, a symbol); ASCII punctuation and
# spaces separate words. On ASCII text this is exactly [a-z0-9]+ after lower-casing.
_WORD = re.compile(r"[^\W_]+|[^\x00-\x7f\s]")


def split_words(prompt: str) -> list[str]:
    """Lower-cased words; non-ASCII words stay whole (so they are named as unknown rather than half-read), and
    non-ASCII punctuation (curly quotes, dashes) separates words like ASCII punctuation does."""
    text = unicodedata.normalize("NFC", prompt).lower()
    return [w for w in _WORD.findall(text) if not (len(w) == 1 and unicodedata.category(w).startswith(("P", "Z")))]


class WordTextEncoder(PretrainedMixin, nn.Module, TextEncoder):
    config_type, folder_what = "builtin", "built-in text encoder"

    def __init__(self, vocab: Sequence[str], width: int = 128, depth: int = 2, num_heads: int = 4,
                 max_len: int = 32):
        super().__init__()
        # config.json feeds these straight in: a wrong type is named here, not a TypeError deep in nn.Module
        if isinstance(vocab, str) or not all(isinstance(w, str) for w in vocab):
            raise ValueError(f"vocab must be a list of words, got {vocab!r:.60}")
        for name, value, least in (("width", width, 1), ("depth", depth, 1), ("num_heads", num_heads, 1),
                                   ("max_len", max_len, 2)):   # max_len: at least one word and the end token
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
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
        self.pos = nn.Parameter(nn.init.normal_(torch.empty(max_len, width), std=0.02))   # = randn * 0.02
        layer = nn.TransformerEncoderLayer(width, num_heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    @property
    def channels(self) -> int:
        return self.config["width"]

    def _words(self, prompts: Sequence[str]) -> list[list[str]]:
        out = []
        for p in check_prompts(prompts):
            words = split_words(p)
            if not words:
                raise ValueError(f"empty prompt {p!r}: describe what to generate, e.g. "
                                 f"'a large red circle moving right quickly on a black background'")
            out.append(words)
        return out

    def overflow(self, prompts: Sequence[str]) -> list[int]:
        """How many words of each prompt are beyond the encoder's length (max_len - 1 words, then EOS)."""
        return [max(0, len(w) - (self.max_len - 1)) for w in self._words(prompts)]

    def tokenize(self, prompts: Sequence[str], warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) padded to the longest prompt, and the mask of real tokens (EOS included). Words beyond
        max_len - 1 are cut with a PromptCutWarning (always: `warn` only silences the unknown-word warning)."""
        keep = self.max_len - 1
        rows, unknown = [], []
        for i, words in enumerate(self._words(prompts)):
            unknown += [w for w in words if w not in self.index]
            if len(words) > keep:
                cut = words[keep:]
                warnings.warn(PromptCutWarning(
                    f"prompt {i} has {len(words)} words; the built-in text encoder reads {keep}: {len(cut)} cut "
                    f"({' '.join(cut[:8])}{' ...' if len(cut) > 8 else ''})"), stacklevel=3)
            rows.append([self.index.get(w, UNK) for w in words][:keep] + [EOS])
        if unknown and warn:
            words = sorted(set(unknown))
            foreign = [w for w in words if not w.isascii()]
            note = f" (non-ASCII: {', '.join(foreign)})" if foreign else ""
            warnings.warn(f"unknown word(s) {', '.join(words)}{note} ignored by the built-in text encoder; "
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

    def pretrained_config(self) -> dict:
        return self.config

    @classmethod
    def from_config(cls, config: dict) -> "WordTextEncoder":
        return cls(**config)


def main(argv=None) -> int:
    """`python -m infinitystar.text.builtin OUT`: a freshly initialised encoder over the Shapes World vocabulary
    (the starting point that `text_encoder.trainable` trains with the generator)."""
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
