"""JSONL manifests: one JSON object per line, with the official field names (`video_path` or `image_path`, relative
to the manifest's folder unless absolute). Found and read here once, for the Shapes World dataset reader
(shapes/data.py), the generator's training data (train/data.py) and the tokenizers' (train/tokenizer_data.py);
what the fields mean is each reader's."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Sequence

MEDIA_KEYS = ("video_path", "image_path")


class ManifestError(ValueError):
    """A manifest line is not valid JSON or has a missing / ill-typed field (the message names file:line)."""


def find_manifests(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; folders are searched recursively for *.jsonl (sorted, so every rank sees one order)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(p.rglob("*.jsonl"))
            if not found:
                raise ManifestError(f"{p}: folder holds no *.jsonl manifest")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ManifestError(f"{p}: no such manifest file or folder")
    return out


def manifest_lines(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, dict, Path]]:
    """(source "file:line", parsed JSON object, folder of the manifest) of every non-empty manifest line."""
    for path in find_manifests(paths):
        with open(path, "rb") as fh:
            for n, line in enumerate(fh, 1):
                source = f"{path}:{n}"
                try:
                    raw = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ManifestError(f"{source}: not UTF-8 text (byte {e.start} of the line)") from None
                if not raw.strip():
                    continue
                try:
                    d = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{source}: not JSON ({e})") from None
                if not isinstance(d, dict):
                    raise ManifestError(f"{source}: expected a JSON object, got {type(d).__name__}")
                yield source, d, path.parent


def media_path(path: str, folder: Path) -> str:
    """A line's media path as an absolute path (a relative one is relative to the manifest's `folder`)."""
    return path if os.path.isabs(path) else str((folder / path).resolve())
