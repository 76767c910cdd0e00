"""Training checkpoints that survive a crash at any point.

Layout of `RUN/checkpoints/`:
    step_00000200/
        model.safetensors     full transformer weights under their own names, plus `text_encoder.*` when the
                              text encoder is trained (`infinitystar export` splits them into a model folder)
        config.json           the TransformerConfig
        ema.safetensors       EMA weights (when EMA is on), same keys
        optimizer/            AdamW state, sharded per rank (torch.distributed.checkpoint; any world size)
        rank_00000.pt         per-rank data position, RNG states and data statistics
        trainer.json          step, LR schedule, world size; written last inside the folder
    latest                    the name of the newest complete checkpoint folder

Everything is written into `.tmp-step_XXXXXXXX/` first; rank 0 renames the folder into place (atomic on POSIX)
and only then replaces `latest` (temp file + os.replace). A crash leaves either the previous checkpoint as
`latest` or a stray temp folder, which is ignored and removed by the next save. Loading falls back to the newest
complete folder when `latest` is missing or points to something unusable.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from infinitystar.convert.strict import CheckpointError, check_state_dict
from infinitystar.model.infinitystar import CONFIG_TYPE
from infinitystar.train.distributed import DistInfo, barrier, broadcast_object, full_tensor

PREFIX = "transformer."           # the transformer's keys inside PackedTrainModule
TEXT_PREFIX = "text_encoder."     # a trained text encoder's keys (kept in the checkpoint's files)
STEP_DIR = "step_{:08d}"


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


# --------------------------------------------------------------------------------------------------
# RNG states (stored as plain lists/tensors so the files load with weights_only=True)
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
    updated once per optimizer step."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.params = [(_strip(n), p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for _, p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, (_, p) in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

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
# Save / load
# --------------------------------------------------------------------------------------------------

def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def _model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {_strip(k): v.detach().contiguous().cpu() for k, v in sd.items()}


@contextmanager
def _quiet_single_process():
    """torch.distributed.checkpoint warns on every single-process save/load, which is our intended use."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_complete(path: Path) -> bool:
    return (path / "trainer.json").is_file() and (path / "model.safetensors").is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def find_latest(root: Path) -> Optional[Path]:
    """The folder named by `latest` if it is complete, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        cand = root / name
        if name and "/" not in name and is_complete(cand):
            return cand
    found = list_checkpoints(root)
    return found[-1] if found else None


def publish_checkpoint(tmp: Path, final: Path, keep_last: int) -> None:
    """Move a completely written `tmp` folder to `final` (a re-saved step replaces the old folder), point
    `latest` at it, and delete all but the newest `keep_last` complete checkpoints (0: keep all)."""
    root = final.parent
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


def load_optimizer_file(path: Path, meta: dict, optimizer: torch.optim.Optimizer, device) -> None:
    """Restore `path/optimizer.pt` (single-process trainers); a checkpoint without it cannot resume exactly."""
    file = Path(path) / "optimizer.pt"
    if not meta.get("has_optimizer") or not file.is_file():
        raise CheckpointError(f"{path}: saved without optimizer state; cannot resume exactly")
    optimizer.load_state_dict(torch.load(file, map_location=device, weights_only=True))


class CheckpointManager:
    def __init__(self, root, info: DistInfo, keep_last: int = 3):
        self.root = Path(root)
        self.info = info
        self.keep_last = keep_last

    def save(self, step: int, module: nn.Module, transformer_config: dict, optimizer: Optional[torch.optim.Optimizer],
             ema: Optional[EMA], trainer_state: dict, rank_state: dict) -> Path:
        """Collective: every rank calls it. Returns the final folder."""
        from safetensors.torch import save_file
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
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
            with _quiet_single_process():
                dcp.save({"optimizer": get_optimizer_state_dict(module, optimizer)},
                         checkpoint_id=str(tmp / "optimizer"), no_dist=not info.distributed)
        torch.save(rank_state, tmp / f"rank_{info.rank:05d}.pt")
        barrier(info)
        if info.is_main:
            meta = dict(trainer_state, step=step, world_size=info.world_size, has_optimizer=optimizer is not None,
                        has_ema=ema is not None)
            _atomic_write_text(tmp / "trainer.json", json.dumps(meta, indent=1))
            publish_checkpoint(tmp, final, self.keep_last)
        barrier(info)
        return final

    def load(self, path: Path, module: nn.Module, unwrapped: nn.Module, optimizer: Optional[torch.optim.Optimizer],
             ema: Optional[EMA]) -> tuple[dict, Optional[dict]]:
        """Restore weights, optimizer and EMA; returns (trainer state, this rank's state or None). `unwrapped`:
        the PackedTrainModule before distributed wrapping (its state dict gives the expected keys)."""
        from infinitystar.convert.strict import read_tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        path = Path(path)
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no trainer.json / model.safetensors)")
        meta = json.loads((path / "trainer.json").read_text())
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
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
            state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=str(path / "optimizer"), no_dist=not self.info.distributed)
            set_optimizer_state_dict(module, optimizer, state["optimizer"])
        rank_file = path / f"rank_{self.info.rank:05d}.pt"
        rank_state = None
        if meta.get("world_size") == self.info.world_size and rank_file.is_file():
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        barrier(self.info)
        return meta, rank_state

    def resolve(self, resume: Optional[str]) -> Optional[Path]:
        """"latest" -> the newest complete checkpoint (or None); a path -> that folder. Same answer on all ranks."""
        if resume is None:
            return None
        if resume == "latest":
            found = find_latest(self.root)
        else:
            found = Path(resume)
            if not is_complete(found):
                raise CheckpointError(f"{found}: not a complete checkpoint folder")
        return broadcast_object(found, self.info)
