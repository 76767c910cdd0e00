"""Text encoders: the built-in word encoder of the default model and T5 from a local folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.text.builtin import WordTextEncoder
from infinitystar.text.t5 import T5TextEncoder


def load_text_encoder(directory: Union[str, Path], *, torch_dtype=None, device=None):
    """A text encoder folder: the built-in word encoder (config type "builtin") or a T5 folder, loaded in
    `torch_dtype` (None: the encoder's default) on `device`."""
    d = Path(directory)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{d}: no text encoder (config.json missing); put a text encoder folder there: the "
                                f"built-in word encoder's, or the flan-t5-xl files (config.json, model.safetensors "
                                f"or its shards + index, tokenizer.json or spiece.model, tokenizer_config.json)")
    try:
        raw = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg}: not a JSON file ({e})") from None
    kind = raw.get("type", "t5") if isinstance(raw, dict) else None
    if kind == WordTextEncoder.config_type:
        return WordTextEncoder.from_pretrained(d, torch_dtype=torch_dtype, device=device)
    return T5TextEncoder.from_pretrained(d, torch_dtype=torch_dtype, device=device)


__all__ = ["load_text_encoder", "WordTextEncoder", "T5TextEncoder"]
