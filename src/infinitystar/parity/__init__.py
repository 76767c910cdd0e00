"""`infinitystar parity DIR`: run a fixture folder made by the official code against this implementation.

A fixture folder holds `config.json` (whose `kind` names family and folder), safetensors files and a README.
Each kind has a checker that builds our implementation from the config, runs the documented inputs through the
same code users run, and yields one `Record` per compared tensor.
"""
from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file

# kind -> "module:function"; modules are imported lazily so one family's missing extras never break another.
CHECKERS: dict[str, str] = {
    "infinitystar/schedules": "infinitystar.parity.infinitystar:check_schedules",
    "infinitystar/quantizer": "infinitystar.parity.infinitystar:check_quantizer",
    "infinitystar/transformer": "infinitystar.parity.infinitystar:check_transformer",
    "infinitystar/apg": "infinitystar.parity.infinitystar:check_apg",
    "infinitystar/interact": "infinitystar.parity.interact:check_interact",
    "infinitystar/vae": "infinitystar.parity.video_vae:check_vae",
    "infinity/vae": "infinitystar.parity.infinity:check_vae",
    "infinity/bsq": "infinitystar.parity.infinity_model:check_bsq",
    "infinity/transformer": "infinitystar.parity.infinity_model:check_transformer",
    "infinity/sampling": "infinitystar.parity.infinity_model:check_sampling",
}

FLOAT_TOL = 1e-4


class FixtureError(Exception):
    """The fixture folder is malformed or of a kind this version cannot check (exit status 2)."""


@dataclass
class Record:
    tensor: str
    max_abs_err: float
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tol

    def to_json(self) -> str:
        d = {"tensor": self.tensor, "max_abs_err": self.max_abs_err, "tol": self.tol}
        if self.note:
            d["note"] = self.note
        return json.dumps(d)


def compare(name: str, ours, ref, tol: float | None = None, note: str = "") -> Record:
    """Max abs error between two tensors (or arrays / nested lists). Integer and bool data are compared exactly."""
    ours_t = torch.as_tensor(ours)
    ref_t = torch.as_tensor(ref)
    if tuple(ours_t.shape) != tuple(ref_t.shape):
        return Record(name, float("inf"), 0.0 if tol is None else tol,
                      f"shape mismatch: ours {tuple(ours_t.shape)} vs reference {tuple(ref_t.shape)}")
    exact = not (ref_t.is_floating_point() or ours_t.is_floating_point())
    if tol is None:
        tol = 0.0 if exact else FLOAT_TOL
    if ours_t.numel() == 0:
        return Record(name, 0.0, tol, note)
    err = (ours_t.double() - ref_t.double()).abs().max().item()
    return Record(name, err, tol, note)


class Fixture:
    """Read access to a fixture folder with errors that name what is missing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FixtureError(f"{self.path}: not a directory")
        self.config = self.json("config.json")
        self.kind = self.config.get("kind")
        if not isinstance(self.kind, str):
            raise FixtureError(f"{self.path / 'config.json'}: no 'kind' field")
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    def json(self, name: str) -> dict:
        p = self.path / name
        if not p.is_file():
            raise FixtureError(f"{self.path}: missing file {name}")
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise FixtureError(f"{p}: invalid JSON ({e})") from None

    def need(self, key: str, source: dict | None = None):
        source = self.config if source is None else source
        if key not in source:
            raise FixtureError(f"{self.path / 'config.json'}: missing field '{key}'")
        return source[key]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._tensors:
            p = self.path / name
            if not p.is_file():
                raise FixtureError(f"{self.path}: missing file {name}")
            try:
                self._tensors[name] = load_file(str(p))
            except Exception as e:  # safetensors raises several types for corrupt files
                raise FixtureError(f"{p}: unreadable safetensors file ({e})") from None
        return self._tensors[name]

    def tensor(self, file: str, key: str) -> torch.Tensor:
        t = self.tensors(file)
        if key not in t:
            raise FixtureError(f"{self.path / file}: missing tensor '{key}'")
        return t[key]

    def sibling(self, name: str) -> "Fixture":
        return Fixture(self.path.parent / name)


def run_checks(path: str | Path) -> Iterator[Record]:
    fx = Fixture(path)
    target = CHECKERS.get(fx.kind)
    if target is None:
        raise FixtureError(f"{fx.path}: kind '{fx.kind}' is not supported (known: {', '.join(sorted(CHECKERS))})")
    module_name, fn_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("infinitystar"):
            raise FixtureError(f"kind '{fx.kind}' is not implemented yet in this version ({e.name} missing)") from None
        raise
    checker: Callable[[Fixture], Iterator[Record]] = getattr(module, fn_name, None)
    if checker is None:
        raise FixtureError(f"kind '{fx.kind}' is not implemented yet in this version ({target} missing)")
    with torch.no_grad():
        yield from checker(fx)


# What interpreting a fixture's config and files raises when they are malformed (an ill-typed or missing field, a
# weights file that does not match the config: CheckpointError is a ValueError).
MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)


def main(path: str, out=print, debug: bool = False) -> int:
    """Print one JSON line per compared tensor; return 0 (all within tolerance), 1 (some exceed) or 2 (bad folder:
    unreadable, of an unknown kind, or with a config or weights this version cannot interpret; `debug` re-raises
    the latter with its traceback)."""
    failed = 0
    try:
        for rec in run_checks(path):
            out(rec.to_json())
            failed += not rec.ok
    except FixtureError as e:
        error = str(e)
    except MALFORMED as e:
        if debug:
            raise
        error = f"{path}: malformed fixture ({type(e).__name__}: {e}); --debug shows where"
    else:
        return 1 if failed else 0
    out(json.dumps({"error": error}))
    print(f"error: {error}", file=sys.stderr)
    return 2
