"""Text encoders: the built-in word encoder of the default model and T5 from a local folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union


def load_text_encoder(directory: Union[str, Path], device=None):
    """A text encoder folder: the built-in word encoder (config type "builtin") or a T5 folder."""
    d = Path(directory)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg} does not exist: not a text encoder folder")
    kind = json.loads(cfg.read_text()).get("type", "t5")
    if kind == "builtin":
        from infinitystar.text.builtin import WordTextEncoder
        return WordTextEncoder.from_pretrained(d, device)
    try:
        from infinitystar.text.t5 import T5TextEncoder
    except ImportError as e:
        raise ImportError(f"{d} is a {kind!r} text encoder, which needs the transformers package ({e})") from None
    return T5TextEncoder.from_pretrained(d, device=device)
