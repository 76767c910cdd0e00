"""Flan-T5 text encoder (the encoder half of T5), used by Infinity and InfinityStar.

Official semantics: tokenize with max_length 512 and truncation (T5 appends the end-of-text token `</s>`), run the
encoder, take `last_hidden_state` as float32; a prompt's length is attention_mask.sum(), EOS included. We pad to
the longest prompt of the batch instead of to 512: T5 attention ignores padded keys, so the features of the valid
tokens are those of the official max_length run (up to float rounding; the tests check this). Padding rows of
`TextFeatures.features` are zero.

Everything is read from a local folder (`local_files_only=True`); nothing is downloaded at run time. For
google/flan-t5-xl (d_model 2048) the folder needs:
    config.json
    model.safetensors.index.json + the shards it lists (model-00001-of-00002.safetensors,
        model-00002-of-00002.safetensors), or a single model.safetensors
        (the full encoder-decoder checkpoint is fine: decoder weights are ignored; any missing encoder weight
        is an error, never a random initialisation)
    tokenizer.json (preferred) or spiece.model (needs `sentencepiece`)
    tokenizer_config.json
    special_tokens_map.json (optional: T5's defaults <pad>, </s>, <unk> apply without it)
e.g. `huggingface-cli download google/flan-t5-xl --local-dir flan-t5-xl --include "*.json" "*.safetensors"
"spiece.model"` once, on a machine with network access. `pytorch_model*.bin` files are not read (pickle).

Requires the optional dependencies: pip install "infinitystar[t5]" (transformers, sentencepiece).
Defaults: float16 on an accelerator, float32 on CPU; the model is frozen and in eval mode.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.text.base import PromptCutWarning, TextEncoder, TextFeatures, check_prompts

MAX_LENGTH = 512
REQUIRED_FILES = ("config.json", "model.safetensors (or model.safetensors.index.json and its shards)",
                  "tokenizer.json (or spiece.model)", "tokenizer_config.json")
INSTALL_HINT = 'pip install "infinitystar[t5]"'


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"the T5 text encoder needs the optional dependency 'transformers' "
                          f"(and 'sentencepiece'): {INSTALL_HINT}") from e
    return transformers


def _needed() -> str:
    return "a T5 text-encoder folder needs: " + ", ".join(REQUIRED_FILES)


def check_t5_dir(directory: Union[str, Path]) -> Path:
    """Raise a FileNotFoundError naming every missing file (shards included) of a local T5 folder."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such directory; {_needed()}")
    missing = []
    if not (d / "config.json").is_file():
        missing.append("config.json")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise FileNotFoundError(f"{index}: unreadable index ({e}); {_needed()}") from None
        missing += [f"{s} (listed in model.safetensors.index.json)" for s in shards if not (d / s).is_file()]
    elif not (d / "model.safetensors").is_file():
        bins = sorted(p.name for p in d.glob("pytorch_model*.bin"))
        hint = f" (found {', '.join(bins)}: convert them to safetensors, .bin files are not read)" if bins else ""
        missing.append("model.safetensors or model.safetensors.index.json" + hint)
    if not ((d / "tokenizer.json").is_file() or (d / "spiece.model").is_file()):
        missing.append("tokenizer.json or spiece.model")
    if not (d / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    if missing:
        raise FileNotFoundError(f"{d}: missing {'; '.join(missing)} ({_needed()})")
    return d


def _dtype_kwarg(transformers) -> str:
    from packaging.version import Version
    return "dtype" if Version(transformers.__version__).release[:2] >= (4, 56) else "torch_dtype"


class T5TextEncoder(TextEncoder, nn.Module):
    """A frozen T5 encoder and its tokenizer. Build with `from_pretrained(local_dir)`."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = MAX_LENGTH):
        nn.Module.__init__(self)
        if max_length < 2:
            raise ValueError(f"max_length must leave room for a token and EOS, got {max_length}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        nn.Module.train(self, False)

    @property
    def channels(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> "T5TextEncoder":
        """The encoder stays frozen and in eval mode (no dropout), whatever the caller's mode."""
        return nn.Module.train(self, False)

    # --- loading / saving ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, local_dir: Union[str, Path], *, torch_dtype: Optional[torch.dtype] = None, device=None,
                        max_length: int = MAX_LENGTH) -> "T5TextEncoder":
        """Load config, encoder weights and tokenizer from a local folder (never downloads).

        device: where the encoder runs (default CPU). torch_dtype: default float16 off-CPU, float32 on CPU.
        """
        transformers = _import_transformers()
        d = check_t5_dir(local_dir)
        device = torch.device(device if device is not None else "cpu")
        dtype = torch_dtype
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else torch.float16
        model_type = json.loads((d / "config.json").read_text()).get("model_type")
        if model_type != "t5":
            raise ValueError(f"{d / 'config.json'}: model_type {model_type!r} is not 't5'")
        model, info = transformers.T5EncoderModel.from_pretrained(
            str(d), local_files_only=True, use_safetensors=True, output_loading_info=True,
            **{_dtype_kwarg(transformers): dtype})
        missing = sorted(info.get("missing_keys") or [])
        mismatched = info.get("mismatched_keys") or []
        if missing or mismatched:
            more = f" ... and {len(missing) - 8} more" if len(missing) > 8 else ""
            raise CheckpointError(f"{d}: the checkpoint does not fill the T5 encoder: missing keys "
                                  f"{', '.join(missing[:8])}{more}; mis-shaped {mismatched[:8]}")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(d), local_files_only=True, legacy=True,
                                                               padding_side="right")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError(f"{d}: the tokenizer defines no pad or eos token (T5 uses <pad> and </s>)")
        return cls(model.to(device=device, dtype=dtype), tokenizer, max_length)

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write the encoder (safetensors) and the tokenizer files to a folder `from_pretrained` reads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(d), safe_serialization=True)
        self.tokenizer.save_pretrained(str(d))

    # --- encoding ---------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and the bool mask of real tokens (EOS included), padded to the longest prompt."""
        prompts = check_prompts(prompts)
        tok = self.tokenizer(prompts, max_length=self.max_length, padding="longest", truncation=True,
                             return_tensors="pt")
        ids, mask = tok["input_ids"], tok["attention_mask"].bool()
        full = [p for p, n in zip(prompts, mask.sum(1).tolist()) if n >= self.max_length]
        cut = [n for n in self.overflow(full) if n > 0] if full else []
        if cut:
            warnings.warn(PromptCutWarning(f"{len(cut)} prompt(s) truncated to {self.max_length} tokens (as the "
                                           f"reference does): up to {max(cut)} tokens cut"), stacklevel=3)
        return ids, mask

    def overflow(self, prompts: Sequence[str]) -> list[int]:
        """How many tokens of each prompt (EOS counted) are beyond max_length."""
        lens = [len(x) for x in self.tokenizer(list(prompts), truncation=False)["input_ids"]]
        return [max(0, n - self.max_length) for n in lens]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device=None) -> TextFeatures:
        ids, mask = self.tokenize(prompts)
        run = self.device
        ids, mask = ids.to(run), mask.to(run)
        h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        h = h * mask[..., None]
        out = torch.device(device) if device is not None else run
        return TextFeatures(h.to(out), mask.to(out), mask.sum(1).to(device=out, dtype=torch.long))

    def __repr__(self) -> str:
        return (f"T5TextEncoder(d_model={self.channels}, layers={self.model.config.num_layers}, "
                f"dtype={self.dtype}, device={self.device}, max_length={self.max_length})")
