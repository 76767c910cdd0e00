"""Where and how numbers are computed: device and precision, resolved once and checked before any work.

Every entry point that computes (training, generation, reconstruction, benchmarks) takes a device spec and a
precision spec and resolves them here, so the rules and the error messages exist in one place.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
import resource
import shutil
import sys
import warnings
from typing import Callable, Literal, Optional

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
SEED_MAX = 2 ** 64 - 1   # torch.Generator.manual_seed takes at most 64 bits


class UserError(ValueError):
    """A problem with what the user asked for; the CLI prints it as one line and exits with status 2."""


def read_utf8(path, what: str, error: type[Exception] = UserError) -> str:
    """The text of a file a user named; a missing or non-UTF-8 file is `error` naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (invalid byte at {e.start})") from None


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """"auto"/None: cuda (the local rank's GPU) when available, else cpu. An unknown or absent device is a
    UserError naming what this machine has."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {spec!r}; available here: {', '.join(available_devices())}") from None
    have = available_devices()
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {spec!r} asked for, but this torch has no CUDA device; available here: "
                            f"{', '.join(have)}")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise UserError(f"device {spec!r} does not exist; available here: {', '.join(have)}")
    elif dev.type == "mps":
        if "mps" not in have:
            raise UserError(f"device {spec!r} asked for, but MPS is not available; available here: {', '.join(have)}")
    elif dev.type != "cpu":
        raise UserError(f"device {spec!r} is not supported; available here: {', '.join(have)}")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX512-BF16 or AMX), read from the processor's flags."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    # No /proc/cpuinfo (macOS, Windows): ask oneDNN through torch's own capability string.
    cap = str(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")())
    return "AMX" in cap.upper()


def resolve_precision(spec: str, device: torch.device) -> torch.dtype:
    """The autocast dtype to compute in: torch.bfloat16 or torch.float32.

    "auto" is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere. "bf16" forced on a CPU without native
    support is allowed (it is correct, only slow) with a warning; anything else is a UserError."""
    if spec not in PRECISIONS:
        raise UserError(f"precision {spec!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if spec == "fp32":
        return torch.float32
    native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    if spec == "auto":
        return torch.bfloat16 if native else torch.float32
    if not native:
        warnings.warn(f"bf16 forced on {device.type} without native bf16 support: correct but slower than fp32",
                      stacklevel=2)
    return torch.bfloat16


def precision_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast on the device, or nothing for fp32. Code that must stay fp32 inside (bit heads, losses,
    sign decisions) opens `fp32_region(device)`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for the device's type (never on the meta device, which has no autocast)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def fp32_region(device: torch.device):
    """Turn autocast off for a block that must compute in fp32; inputs must be cast with .float() by the caller.
    On the meta device (memory plans, `infinitystar plan`) there is no autocast to turn off."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024   # bytes on macOS, KiB on Linux


def cpp_compiler() -> Optional[str]:
    """Path of the C++ compiler that torch.compile's inductor builds CPU kernels with (its `cpp.cxx` search list:
    $CXX, else g++ or clang++), or None when none is installed."""
    try:
        from torch._inductor import config as inductor_config
        names = inductor_config.cpp.cxx
    except ImportError:
        names = ("g++",)
    for name in names if isinstance(names, (list, tuple)) else (names,):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Compiler:
    """Functions put under torch.compile together (inductor; `dynamic`: one graph serves every sequence length,
    else one graph per input shape), each compiled on its first call. Where compiling cannot work - no C++
    compiler for CPU inputs, or it fails - the group warns once and runs its functions eagerly from then on, so
    turning compilation on never stops a run. An error that the eager function raises too is the caller's own and
    propagates unchanged."""

    def __init__(self, what: str, dynamic: bool = True):
        self.what = what
        self.dynamic = dynamic
        self.failed = False

    def wrap(self, fn: Callable) -> Callable:
        compiled: Optional[Callable] = None

        def call(*args):
            nonlocal compiled
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if self.failed or any(t.device.type == "meta" for t in tensors):   # meta: memory plans
                return fn(*args)
            if compiled is None:
                if any(t.device.type == "cpu" for t in tensors) and cpp_compiler() is None:
                    return self._give_up(fn, args, "no C++ compiler found (inductor needs g++ or clang++, or $CXX)")
                compiled = torch.compile(fn, dynamic=self.dynamic)
            try:
                return compiled(*args)
            except Exception as e:                 # noqa: BLE001 - told apart below by running eagerly
                first = (str(e).strip().splitlines() or [""])[0][:200]
                return self._give_up(fn, args, f"compiling failed ({type(e).__name__}: {first})")

        return call

    def _give_up(self, fn: Callable, args, why: str):
        out = fn(*args)          # an error of the call itself raises here, without the warning
        if not self.failed:
            warnings.warn(f"torch.compile of {self.what} is off: {why}; running eagerly", stacklevel=4)
        self.failed = True
        return out
