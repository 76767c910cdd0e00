"""Argument types and early checks shared by the commands. Each rejects a bad value with one line that names it,
before any model is loaded or any work is done."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from infinitystar.runtime import SEED_MAX, UserError
from infinitystar.text.base import PromptCutWarning


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit status 2) instead of the usage block plus a line."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def seed(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 .. 2**64-1")
    return value


def check_writable_folder(folder: Path, what: str) -> None:
    """Create and remove a probe file in `folder`: a read-only, foreign or full-of-inodes folder fails here, before
    the work whose result would have nowhere to go."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as e:
        raise UserError(f"{what} {folder} is not writable ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: Path, flag: str = "--out") -> None:
    """The folder exists and is writable, and `path` is not a folder (the extension is the command's business)."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"output folder {path.parent} does not exist")
    check_writable_folder(path.parent, f"{flag} folder")


def check_prompts_read_whole(encoder, prompts) -> None:
    """`--strict-prompt`: a prompt longer than the text encoder reads is an error (the encoder's own message: how
    many words or tokens it would cut), raised before any generation work."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptCutWarning)
        try:
            encoder.tokenize(list(prompts))
        except PromptCutWarning as w:
            raise UserError(f"--strict-prompt: {w}") from None


def check_image_file(path: str, flag: str = "--image") -> None:
    """A readable image within Pillow's decompression-bomb limit (checked from the header; the warning zone
    between the limit and twice it is refused too, rather than decoded)."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path):   # reads the header only; the size check happens here
                pass
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise UserError(f"{flag} {path}: refused as a possible decompression bomb ({e})") from None
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"{flag} {path}: not a readable image ({e})") from None
