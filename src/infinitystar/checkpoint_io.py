"""Model folders and strict checkpoint I/O: the bottom layer that models, converters, trainers and pipelines read
and write weights through. It imports no model, so every package can depend on it without a cycle.

- Strict loading: every missing, unexpected or mis-shaped key, and every weight holding NaN or infinity, is a
  `CheckpointError` that names the key.
- Our folder format: `config.json` ({"type": kind, **config}) + `model.safetensors`.
- `PretrainedMixin`: the one `save_pretrained` / `from_pretrained(path, torch_dtype=, device=)` of every module
  stored in that format. Loading builds the module on the meta device (no allocation, no random init) and
  assigns the file's tensors, converted one at a time to the requested dtype on the requested device: a bf16
  folder loaded as bf16 is never materialised in fp32.
- Written files are atomic (a temporary file renamed into place) and respect the umask.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

PathLike = Union[str, Path]
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint does not match the model it is loaded into (or cannot be read)."""


# --- writing --------------------------------------------------------------------------------------------------------
def umask_mode(mode: int = 0o666) -> int:
    """`mode` restricted by the process umask (what a plain `open` would have created)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; if the block succeeds, give it the umask's permissions and rename it
    over `path`, so an interrupted write never leaves a half-written file (and nothing comes out 0600)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=1) + "\n")


def write_tensors(path: PathLike, tensors: Mapping[str, torch.Tensor]) -> Path:
    """A `.safetensors` file of CPU copies of `tensors`, written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    return Path(path)


# --- reading --------------------------------------------------------------------------------------------------------
def _list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                     source: str = "checkpoint") -> None:
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_list(unexpected)}")
    bad_shapes = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if bad_shapes:
        problems.append(f"mis-shaped keys: {_list(bad_shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def check_finite(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Weights holding NaN or infinity are an error naming them: loaded, they would give NaN logits far into the
    work, or frames of nonsense without a word (a NaN in the decoder)."""
    floats = [(k, t) for k, t in tensors.items() if t.is_floating_point() and t.numel()]
    if not floats:
        return
    # min and max propagate NaN and show an infinity: one streaming pass without temporaries (isfinite makes a
    # mask, ~25x slower on bf16), and one device sync for the whole state dict
    ends = torch.stack([torch.stack(torch.aminmax(t.detach())).float() for _, t in floats]).cpu()
    if not bool(torch.isfinite(ends).all()):
        bad = [f"{k} ({'nan' if bool(e.isnan().any()) else 'inf'})"
               for (k, _), e in zip(floats, ends) if not bool(torch.isfinite(e).all())]
        raise CheckpointError(f"{source}: non-finite weights in {_list(bad)}")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Check keys, shapes and finiteness first (clear message), then copy the tensors (dtype-cast to the
    module's)."""
    check_state_dict(module.state_dict(), state_dict, source)
    check_finite(state_dict, source)
    module.load_state_dict(dict(state_dict), strict=True)


def _open_error(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})")


def read_tensors(path: PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file (our own checkpoints), with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated or foreign files raise several types
        raise _open_error(path, e) from None


def read_state_dict(path: PathLike, nested: tuple[tuple[str, ...], ...] = ()) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: `.safetensors` (flat), or a `.pth` read with `weights_only=True`, descending
    into the first of the `nested` entry paths it has (e.g. ("vae",) or ("trainer", "gpt_fsdp")), else flat."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_tensors(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or pickled-object files raise many different types
        raise _open_error(path, e) from None
    for keys in nested:
        node = raw
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            raw = node
            break
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        have = list(raw)[:8] if isinstance(raw, dict) else type(raw).__name__
        wanted = "".join(f"a '{'/'.join(k)}' entry or " for k in nested)
        raise CheckpointError(f"{path}: expected {wanted}a flat dict of tensors (found {have})")
    return dict(raw)


# --- our folder format --------------------------------------------------------------------------------------------
def save_folder(directory: PathLike, kind: str, config: Mapping, module: nn.Module) -> Path:
    """Our model folder: `config.json` ({"type": kind, **config}) and `model.safetensors` (the state dict)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / CONFIG_FILE, {"type": kind, **config})
    write_tensors(d / WEIGHTS_FILE, module.state_dict())
    return d


def read_config(directory: PathLike, kind: str, what: str) -> dict:
    """The config (without "type") of a folder written by `save_folder`, after checking both files are there; a
    folder without a "type" is accepted as the expected kind."""
    d = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d}: not a {what} folder, missing {name} (needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE})")
    try:
        raw = json.loads((d / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: not a JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{d / CONFIG_FILE}: expected a JSON object, found {type(raw).__name__}")
    if raw.get("type", kind) != kind:
        raise CheckpointError(f"{d / CONFIG_FILE}: type {raw.get('type')!r} is not {kind!r}")
    return {k: v for k, v in raw.items() if k != "type"}


def materialize(module: nn.Module, path: PathLike, torch_dtype: Optional[torch.dtype] = None,
                device=None) -> nn.Module:
    """Fill a module built on the meta device with the tensors of a `.safetensors` file, strictly.

    Each tensor is read, moved to `device` and cast to `torch_dtype` (floating tensors only; None keeps the dtype
    the module was built with) one at a time, then assigned: nothing is allocated twice and no random init runs.
    Non-persistent buffers (built on the CPU by their modules) are moved to the device in their own dtype."""
    path = Path(path)
    expected = module.state_dict()
    device = torch.device(device if device is not None else "cpu")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            check_state_dict(expected, {k: _Shape(f.get_slice(k).get_shape()) for k in f.keys()}, str(path))
            tensors = {}
            for k in f.keys():
                want = torch_dtype if (torch_dtype is not None and expected[k].is_floating_point()) \
                    else expected[k].dtype
                tensors[k] = f.get_tensor(k).to(device=device, dtype=want)
    except CheckpointError:
        raise
    except Exception as e:  # truncated or foreign files raise several types
        raise _open_error(path, e) from None
    check_finite(tensors, str(path))
    module.load_state_dict(tensors, strict=True, assign=True)
    for name, buf in module.named_buffers():
        if buf.is_meta:
            raise CheckpointError(f"{type(module).__name__}: buffer {name} is neither in {path.name} nor built on "
                                  f"a real device (create non-persistent buffers with device='cpu')")
    return module.to(device)


class _Shape:
    """Shape-only stand-in for a tensor, so the strict check can run before any tensor is read."""

    def __init__(self, shape):
        self.shape = tuple(shape)


# In-place writes that only change values (the initialisers and what they are made of), and random factories.
_VALUE_WRITES = frozenset({
    "normal_", "uniform_", "erfinv_", "exponential_", "log_normal_", "cauchy_", "geometric_", "bernoulli_",
    "random_", "fill_", "zero_", "copy_", "mul_", "div_", "add_", "sub_", "clamp_", "clamp_min_", "clamp_max_",
    "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "ones_", "zeros_",
    "constant_", "orthogonal_", "eye_", "dirac_", "sparse_"})
_RANDOM_FACTORIES = frozenset({torch.randn, torch.rand, torch.randint, torch.randperm})


class _SkipInit(TorchFunctionMode):
    """Inside `torch.device("meta")`: writes into meta tensors and random factories do nothing. The module gets its
    shapes and no values, which a loader assigns next; running the initialisers on meta tensors would compute
    nothing but cost the first-use import of torch's Python meta kernels (seconds)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")   # torch.nn.init passes its tensor by keyword
        if getattr(func, "__name__", None) in _VALUE_WRITES and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        if func in _RANDOM_FACTORIES:
            size = args[-1] if func is torch.randint else args[0]
            if func is torch.randperm:
                size = (size,)
            return torch.empty(size, dtype=kwargs.get("dtype"), device="meta")
        return func(*args, **kwargs)


@contextmanager
def init_empty() -> Iterator[None]:
    """Build modules with shapes only: parameters on the meta device, initialisers skipped. Buffers a module
    makes with an explicit `device="cpu"` stay real."""
    with torch.device("meta"), _SkipInit():
        yield


class PretrainedMixin:
    """`save_pretrained` / `from_pretrained` for an `nn.Module` stored as `config.json` + `model.safetensors`.

    A subclass names its `config_type` (the "type" in config.json) and `folder_what` (for error messages), and
    says how its config is written (`pretrained_config`, default `self.config.to_dict()`) and rebuilt
    (`from_config`, default `cls(cls.config_class.from_dict(d))`)."""

    config_type: ClassVar[str]
    folder_what: ClassVar[str]
    config_class: ClassVar[Any] = None

    def pretrained_config(self) -> dict:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, config: dict):
        return cls(cls.config_class.from_dict(config))

    def save_pretrained(self, directory: PathLike) -> Path:
        return save_folder(directory, self.config_type, self.pretrained_config(), self)

    @classmethod
    def from_pretrained(cls, directory: PathLike, *, torch_dtype: Optional[torch.dtype] = None, device=None):
        """Load a folder written by `save_pretrained` (or `infinitystar convert`, or a trainer's export), strictly,
        straight into `torch_dtype` (None: float32, as built) on `device` (None: cpu). Returns it in eval mode."""
        config = read_config(directory, cls.config_type, cls.folder_what)
        try:
            with init_empty():
                module = cls.from_config(config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: not a valid {cls.folder_what} config "
                                  f"({e})") from None
        return materialize(module, Path(directory) / WEIGHTS_FILE, torch_dtype, device).eval()
