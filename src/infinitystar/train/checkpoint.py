"""Training checkpoints: a crash at any point leaves a usable one, and reading one never runs code.

Layout of `RUN/checkpoints/` (the generator's trainer; the tokenizer and Infinity trainers write the same kinds of
files without the per-rank ones):
    step_00000200/
        model.safetensors     full transformer weights under their own names, plus `text_encoder.*` when the
                              text encoder is trained (`infinitystar export` splits them into a model folder)
        config.json           the TransformerConfig
        ema.safetensors       EMA weights (when EMA is on), same keys
        optimizer/rank_00000.safetensors ...
                              AdamW state: each rank writes its shard of every state tensor (the whole tensor in
                              one process), the header (JSON) records where the shard sits in the whole tensor and
                              the parameter groups, so any number of processes can read it back
        rank_00000.safetensors per-rank data position, RNG states and data statistics (JSON header + tensors)
        trainer.json          step, LR schedule, world size
        manifest.json         size and sha256 of every other file; written last
    latest                    the name of the newest checkpoint folder

Nothing here is unpickled: tensors are read by safetensors, everything else is JSON (a checkpoint may come from
someone else's run). Everything is written into `.tmp-step_XXXXXXXX/` first; rank 0 writes the manifest, renames
the folder into place (atomic on POSIX) and only then replaces `latest` (temp file + os.replace). A crash leaves
either the previous checkpoint as `latest` or a stray temp folder, which is ignored and removed by the next save.
A checkpoint is valid when its files match its manifest exactly; resuming "latest" takes the newest valid one and
warns about each damaged one it skips, naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from infinitystar.checkpoint_io import CheckpointError, check_state_dict, read_tensors
from infinitystar.model.infinitystar import CONFIG_TYPE
from infinitystar.train.distributed import DistInfo, barrier, broadcast_object, full_tensor

PREFIX = "transformer."           # the transformer's keys inside PackedTrainModule
TEXT_PREFIX = "text_encoder."     # a trained text encoder's keys (kept in the checkpoint's files)
STEP_DIR = "step_{:08d}"
TRAINER_FILE = "trainer.json"
MANIFEST = "manifest.json"
OPTIMIZER_DIR = "optimizer"
RANK_FILE = "rank_{:05d}.safetensors"
STATE_FORMAT = "infinitystar-state-1"   # in the header of our state files (optimizer shards, rank files)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path) -> Any:
    """A JSON file of a checkpoint; a missing, non-UTF-8 or malformed file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({type(e).__name__}: {e})") from None


def read_meta(path: Path) -> dict:
    """trainer.json of a checkpoint folder: a JSON object with an integer "step"."""
    file = Path(path) / TRAINER_FILE
    meta = read_json(file)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta["step"], bool):
        raise CheckpointError(f"{file}: not a training checkpoint's state (no integer \"step\")")
    return meta


# --------------------------------------------------------------------------------------------------
# State files: nested JSON values and tensors in one safetensors file (the JSON in its header)
# --------------------------------------------------------------------------------------------------

def _encode(obj, tensors: dict[str, torch.Tensor]):
    """JSON-able copy of `obj` with each tensor replaced by {"__tensor__": name} and put into `tensors`."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().contiguous().cpu()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"state files hold dicts with string keys only, got keys {list(obj)[:4]}")
        return {k: _encode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(obj, handle, path: Path):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            name = obj["__tensor__"]
            if not isinstance(name, str) or name not in handle.keys():
                raise CheckpointError(f"{path}: the header names a tensor {name!r} that the file lacks")
            return handle.get_tensor(name)
        return {k: _decode(v, handle, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, handle, path) for v in obj]
    return obj


def write_state(path: Path, obj, tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write nested dicts/lists of JSON values and tensors (plus named `tensors`, kept under their names)."""
    tensors = dict(tensors or {})
    header = _encode(obj, tensors)
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, "state": json.dumps(header)})


def _open_state(path: Path, stack: ExitStack):
    """(safetensors handle, decoded header) of a state file; any defect is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        handle = stack.enter_context(safe_open(str(path), framework="pt"))
        meta = handle.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"no {STATE_FORMAT!r} header")
        return handle, _decode(json.loads(meta["state"]), handle, path)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and json raise several types for foreign or damaged files
        raise CheckpointError(f"{path}: not a readable state file ({type(e).__name__}: {e})") from None


def read_state(path: Path):
    """The object `write_state` wrote."""
    with ExitStack() as stack:
        return _open_state(path, stack)[1]


# --------------------------------------------------------------------------------------------------
# RNG states (plain lists and tensors: they go into a state file as JSON + tensors)
# --------------------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [npy[0], torch.from_numpy(npy[1].astype(np.int64)), int(npy[2]), int(npy[3]), float(npy[4])],
           "torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of the trained parameters (the transformer's under their own names, a trained
    text encoder's under `text_encoder.`), kept in the parameters' own sharding (a DTensor shard under FSDP2),
    updated once per optimizer step.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates: with the constant decay from step 0 the
    average kept 0.999^n of the random initialisation (37 % at step 1,000, 14 % at 2,000), which drew worse
    samples than the raw weights at every early evaluation."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [(_strip(n), p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for _, p in self.params]

    def decay_at(self, updates_done: int) -> float:
        return min(self.decay, (1.0 + updates_done) / (10.0 + updates_done))

    @torch.no_grad()
    def update(self, updates_done: int) -> None:
        """`updates_done`: optimizer steps before this one (the trainer's step counter, so a resumed run continues
        the same warm-up)."""
        weight = 1.0 - self.decay_at(updates_done)
        for s, (_, p) in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), weight)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full tensors on CPU (a collective under FSDP: every rank must call it)."""
        return {n: full_tensor(s).detach().cpu() for s, (n, _) in zip(self.shadow, self.params)}

    @torch.no_grad()
    def load_full(self, sd: dict[str, torch.Tensor]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor
        for s, (n, _) in zip(self.shadow, self.params):
            if n not in sd:
                raise CheckpointError(f"EMA weights lack {n}")
            full = sd[n].to(s.device, s.dtype)
            s.copy_(distribute_tensor(full, s.device_mesh, s.placements) if isinstance(s, DTensor) else full)



# --------------------------------------------------------------------------------------------------
# Optimizer state: safetensors shards with their place in the whole tensors
# --------------------------------------------------------------------------------------------------

def _shard(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(local tensor, offset of it in the whole tensor): a DTensor's shard, or a plain tensor itself at 0."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), list(offset)
    return t, [0] * t.dim()


def _with_tuples(saved: list, current: list) -> list:
    """Parameter groups read from JSON, with the lists that are tuples in the live groups (betas) made tuples."""
    out = []
    for i, g in enumerate(saved):
        cur = current[i] if i < len(current) else {}
        out.append({k: tuple(v) if isinstance(v, list) and isinstance(cur.get(k), tuple) else v for k, v in g.items()})
    return out


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer, module: Optional[nn.Module] = None,
                   rank: int = 0) -> None:
    """Write this rank's part of the optimizer state to `folder/optimizer/rank_XXXXX.safetensors`.

    With `module` (the generator's trainer: one process, DDP or FSDP2) the state is keyed by parameter name and
    every rank writes the shards it holds (plain tensors, replicated on every rank, only from rank 0); without it,
    `optimizer.state_dict()` (keyed by parameter index) of a single process."""
    if module is None:
        osd = optimizer.state_dict()
    else:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        osd = get_optimizer_state_dict(module, optimizer)
    from torch.distributed.tensor import DTensor
    tensors: dict[str, torch.Tensor] = {}
    pieces, values = [], []
    for key, entries in osd["state"].items():
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                values.append([key, name, value])
                continue
            if rank != 0 and not isinstance(value, DTensor):
                continue
            local, offset = _shard(value)
            if local.numel() == 0 and value.numel() > 0:   # an empty shard (more ranks than rows)
                continue
            tname = f"p{len(pieces)}"
            tensors[tname] = local.detach().contiguous().cpu()
            pieces.append([tname, key, name, list(value.shape), offset])
    header = {"rank": rank, "pieces": pieces, "values": values if rank == 0 else [],
              "param_groups": osd["param_groups"] if rank == 0 else None}
    d = Path(folder) / OPTIMIZER_DIR
    d.mkdir(exist_ok=True)
    write_state(d / RANK_FILE.format(rank), header, tensors)


def _assemble(pieces: list, offset: list[int], shape: list[int], whole: list[int], what: str) -> torch.Tensor:
    """The box [offset, offset + shape) of a whole tensor of shape `whole`, cut from the saved shards that overlap
    it (read lazily: only the needed rows of each file)."""
    out, covered = None, None
    for handle, tname, p_whole, p_off, file in pieces:
        if list(p_whole) != list(whole):
            raise CheckpointError(f"{file}: optimizer state {what} has shape {tuple(p_whole)}, the model's "
                                  f"parameter {tuple(whole)}")
        sl = handle.get_slice(tname)
        p_shape = sl.get_shape()
        if len(p_shape) != len(whole) or any(o < 0 or o + n > w for o, n, w in zip(p_off, p_shape, whole)):
            raise CheckpointError(f"{file}: optimizer state {what}: a shard of shape {tuple(p_shape)} at "
                                  f"{tuple(p_off)} does not fit in {tuple(whole)}")
        if not whole:
            return handle.get_tensor(tname)
        lo = [max(a, b) for a, b in zip(offset, p_off)]
        hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, p_off, p_shape)]
        if any(x >= y for x, y in zip(lo, hi)):
            continue
        part = sl[tuple(slice(x - b, y - b) for x, y, b in zip(lo, hi, p_off))]
        if out is None:
            out = torch.empty(shape, dtype=part.dtype)
            covered = torch.zeros(shape, dtype=torch.bool)
        dst = tuple(slice(x - a, y - a) for x, y, a in zip(lo, hi, offset))
        out[dst] = part
        covered[dst] = True
    if math.prod(shape) == 0:
        return torch.empty(shape) if out is None else out
    if out is None or not bool(covered.all()):
        raise CheckpointError(f"{pieces[0][4].parent}: optimizer state {what} is incomplete (a rank's file is "
                              f"missing)")
    return out


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer, module: Optional[nn.Module] = None) -> None:
    """Restore what `save_optimizer` wrote (with the same `module` choice), on any number of processes: each rank
    reads the rows of its own shards from whichever files hold them."""
    d = Path(folder) / OPTIMIZER_DIR
    files = sorted(d.glob("rank_*.safetensors")) if d.is_dir() else []
    if not files:
        raise CheckpointError(f"{d}: no optimizer state (optimizer/rank_*.safetensors)")
    with ExitStack() as stack:
        pieces: dict[tuple, list] = {}
        head, values, groups = None, {}, []
        for file in files:
            handle, h = _open_state(file, stack)
            try:
                for tname, key, name, whole, offset in h["pieces"]:
                    pieces.setdefault((key, name), []).append((handle, tname, list(whole), list(offset), file))
                if h["rank"] == 0:
                    head = h
                    values = {(k, n): v for k, n, v in h["values"]}
                    groups = list(h["param_groups"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{file}: malformed optimizer header ({type(e).__name__}: {e})") from None
        if head is None:
            raise CheckpointError(f"{d / RANK_FILE.format(0)}: missing")
        if module is None:
            state: dict = {}
            for (key, name), ps in pieces.items():
                whole = ps[0][2]
                state.setdefault(key, {})[name] = _assemble(ps, [0] * len(whole), whole, whole,
                                                            f"{key}/{name}")
            for (key, name), v in values.items():
                state.setdefault(key, {})[name] = v
            target = {"state": state, "param_groups": _with_tuples(groups, optimizer.state_dict()["param_groups"])}
            try:
                optimizer.load_state_dict(target)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(f"{d}: does not fit this optimizer ({e})") from None
            return
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
        target = get_optimizer_state_dict(module, optimizer)   # the live state, in this run's sharding
        want = {(k, n) for k, e in target["state"].items() for n in e}
        have = set(pieces) | set(values)
        if want != have:
            names = sorted(f"{k}/{n}" for k, n in want ^ have)
            raise CheckpointError(f"{d}: optimizer state does not match the model: "
                                  f"{'missing' if want - have else 'unexpected'} {', '.join(names[:4])}")
        for key, entries in target["state"].items():
            for name, value in entries.items():
                if not isinstance(value, torch.Tensor):
                    entries[name] = values[(key, name)]
                    continue
                local, offset = _shard(value)
                part = _assemble(pieces[(key, name)], offset, list(local.shape), list(value.shape),
                                 f"{key}/{name}")
                local.copy_(part)
        target["param_groups"] = _with_tuples(groups, target["param_groups"])
        try:
            set_optimizer_state_dict(module, optimizer, target)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{d}: does not fit this optimizer ({e})") from None


def load_optimizer_file(path: Path, meta: dict, optimizer: torch.optim.Optimizer, device=None) -> None:
    """Restore the optimizer of a single-process trainer's checkpoint; one without it cannot resume exactly."""
    if not meta.get("has_optimizer"):
        raise CheckpointError(f"{path}: saved without optimizer state; cannot resume exactly")
    load_optimizer(path, optimizer)


# --------------------------------------------------------------------------------------------------
# Manifest, validity, publishing
# --------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    """Relative paths of every file under `folder` except the manifest."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if not p.is_dir() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path) -> None:
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)} for rel in _files(folder)}
    _atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: Path) -> dict:
    """Check a checkpoint folder against its manifest (every listed file present with its size and sha256, no
    other file) and return its trainer.json. The first problem is a CheckpointError naming the file."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST}: no \"files\" table")
    for rel, want in files.items():
        parts = Path(rel).parts
        if (Path(rel).is_absolute() or ".." in parts or not isinstance(want, dict)
                or not isinstance(want.get("size"), int) or not isinstance(want.get("sha256"), str)):
            raise CheckpointError(f"{path / MANIFEST}: malformed entry {rel!r}")
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        if file.stat().st_size != want["size"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {want['size']} when written (truncated or "
                                  f"changed)")
    extra = sorted(set(_files(path)) - set(files))
    if extra:
        raise CheckpointError(f"{path / extra[0]}: not in {MANIFEST} (added after the checkpoint was written)")
    for rel, want in files.items():
        if _sha256(path / rel) != want["sha256"]:
            raise CheckpointError(f"{path / rel}: sha256 differs from the one recorded when it was written (damaged "
                                  f"or changed)")
    return read_meta(path)


def is_complete(path: Path) -> bool:
    """Has the files of a finished save (validity is `verify_checkpoint`'s job)."""
    path = Path(path)
    return (path / TRAINER_FILE).is_file() and (path / "model.safetensors").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def _newest_valid(root: Path) -> tuple[Optional[Path], list[str]]:
    """The folder named by `latest` if valid, else the newest valid one; and the problems of those skipped."""
    root = Path(root)
    found = list_checkpoints(root)[::-1]
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        named = [p for p in found if p.name == name]
        found = named + [p for p in found if p.name != name]
    problems = []
    for cand in found:
        try:
            verify_checkpoint(cand)
            return cand, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


def find_latest(root: Path) -> Optional[Path]:
    """The newest valid checkpoint under `root` (the one `latest` names first), or None; each damaged one skipped
    is reported in a warning that names the file."""
    found, problems = _newest_valid(root)
    for p in problems:
        warnings.warn(f"skipping a damaged checkpoint: {p}", stacklevel=2)
    return found


def find_resume(root: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint to resume from. None: a fresh run. "latest": the newest valid one under `root` (None when
    there is none; a CheckpointError when all are damaged). A folder: that one, verified."""
    if resume is None:
        return None
    if resume == "latest":
        found = find_latest(root)
        if found is None and list_checkpoints(root):
            raise CheckpointError(f"{root}: no valid checkpoint to resume from; "
                                  f"{_newest_valid(root)[1][0]}")
        return found
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint folder (no {TRAINER_FILE} / model.safetensors)")
    verify_checkpoint(path)
    return path


def publish_checkpoint(tmp: Path, final: Path, keep_last: int) -> None:
    """Record sizes and checksums of a completely written `tmp` folder, move it to `final` (a re-saved step
    replaces the old folder), point `latest` at it, and delete all but the newest `keep_last` complete
    checkpoints (0: keep all)."""
    root = final.parent
    write_manifest(tmp)
    if final.exists():   # re-saving a step (after a resume): move the old one aside first
        old = root / f".tmp-old-{final.name}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _atomic_write_text(root / "latest", final.name)
    if keep_last > 0:
        for p in list_checkpoints(root)[:-keep_last]:
            if p != final:
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The generator's checkpoints (one process, DDP or FSDP2)
# --------------------------------------------------------------------------------------------------

def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {_strip(k): v.detach().contiguous().cpu() for k, v in sd.items()}


class CheckpointManager:
    def __init__(self, root, info: DistInfo, keep_last: int = 3):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    def save(self, step: int, module: nn.Module, transformer_config: dict, optimizer: Optional[torch.optim.Optimizer],
             ema: Optional[EMA], trainer_state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        info = self.info
        final = self.root / STEP_DIR.format(step)
        tmp = self.root / f".tmp-{final.name}"
        if info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stray in self.root.glob(".tmp-step_*"):   # leftovers of an interrupted save
                shutil.rmtree(stray, ignore_errors=True)
            tmp.mkdir()
        barrier(info)
        model_sd = _model_state(module)                        # collective under FSDP
        ema_sd = ema.full_state_dict() if ema is not None else None
        if info.is_main:
            save_file(model_sd, str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps({"type": CONFIG_TYPE, **transformer_config}, indent=1))
            if ema_sd is not None:
                save_file(ema_sd, str(tmp / "ema.safetensors"))
        if optimizer is not None:
            save_optimizer(tmp, optimizer, module, info.rank)
        write_state(tmp / RANK_FILE.format(info.rank), rank_state)
        barrier(info)
        if info.is_main:
            meta = dict(trainer_state, step=step, world_size=info.world_size, has_optimizer=optimizer is not None,
                        has_ema=ema is not None)
            _atomic_write_text(tmp / TRAINER_FILE, json.dumps(meta, indent=1))
            publish_checkpoint(tmp, final, self.keep_last)
        barrier(info)
        return final

    def load(self, path: Path, module: nn.Module, unwrapped: nn.Module, optimizer: Optional[torch.optim.Optimizer],
             ema: Optional[EMA]) -> tuple[dict, Optional[dict]]:
        """Restore weights, optimizer and EMA of a checkpoint `resolve` returned; returns (trainer state, this
        rank's state or None). `unwrapped`: the PackedTrainModule before distributed wrapping (its state dict
        gives the expected keys)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_FILE} / model.safetensors)")
        meta = read_meta(path)
        sd = read_tensors(path / "model.safetensors")
        expected = {_strip(k): v for k, v in unwrapped.state_dict().items()}
        check_state_dict(expected, sd, str(path / "model.safetensors"))
        set_model_state_dict(module, {(k if k.startswith(TEXT_PREFIX) else PREFIX + k): v for k, v in sd.items()},
                             options=StateDictOptions(full_state_dict=True, strict=True))
        if ema is not None:
            if meta.get("has_ema"):
                ema.load_full(read_tensors(path / "ema.safetensors"))
            else:   # EMA switched on for a resumed run: start it from the weights
                ema.load_full(sd)
        if optimizer is not None:
            if not meta.get("has_optimizer"):
                raise CheckpointError(f"{path}: saved without optimizer state (checkpoint.save_optimizer was off)")
            load_optimizer(path, optimizer, module)
        rank_file = path / RANK_FILE.format(self.info.rank)
        rank_state = None
        if meta.get("world_size") == self.info.world_size:
            rank_state = read_state(rank_file)
        barrier(self.info)
        return meta, rank_state

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """"latest" -> the newest valid checkpoint (or None); a path -> that folder, verified. Rank 0 decides (and
        warns about damaged checkpoints it skips); every rank gets the same answer or the same error."""
        if resume is None:
            return None
        found, error = None, None
        if self.info.is_main:
            try:
                found = find_resume(self.root, resume)
            except CheckpointError as e:
                error = str(e)
        found, error = broadcast_object((found, error), self.info)
        if error is not None:
            raise CheckpointError(error)
        return found
