"""Checkpoints a user is handed: nothing in them runs code, damage is found (which file) and skipped on resume,
and one output folder serves one run at a time."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinitystar.checkpoint_io import CheckpointError
from infinitystar.train.checkpoint import (MANIFEST, find_latest, load_optimizer, read_state, save_optimizer,
                                           verify_checkpoint, write_manifest, write_state)
from infinitystar.train.config import config_from_dict
from infinitystar.train.lock import RunLock, RunLockError, lock_run
from test_train import SRC, HashTextEncoder, LinearTokenizer, run_training, tiny_config, weights, write_dataset

STEP2, STEP4 = "step_00000002", "step_00000004"


class Payload:
    """Unpickling this creates the marker file: proof that a loader ran code from the checkpoint."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> tuple[Path, dict]:
    """A finished 4-step run (EMA on, checkpoints at steps 2 and 4) that the tests copy and damage."""
    root = tmp_path_factory.mktemp("base")
    manifest = write_dataset(root / "data")
    raw = tiny_config(root / "run", manifest, train={"max_steps": 4, "ema_decay": 0.9}, checkpoint={"every": 2})
    run_training(raw)
    return root / "run", raw


def copy_run(base_run, dest: Path) -> tuple[Path, dict]:
    run, raw = base_run
    shutil.copytree(run, dest)
    return dest / "checkpoints", {**raw, "output_dir": str(dest)}


def trainer(raw: dict, resume):
    from infinitystar.train.trainer import Trainer
    return Trainer(config_from_dict(raw), text_encoder=HashTextEncoder(32), tokenizer=LinearTokenizer(),
                   resume=resume)


def one_line(msg: str) -> str:
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------
# Nothing runs
# --------------------------------------------------------------------------------------------------

def checkpoint_files(ckpt: Path) -> list[str]:
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())


@pytest.mark.parametrize("forge_manifest", [False, True], ids=["manifest-kept", "manifest-forged"])
def test_planted_pickle_in_any_file_never_runs(base_run, tmp_path, forge_manifest):
    """Every file of a checkpoint replaced by a pickle payload in turn. With the manifest kept, its checksum names
    the file; with a manifest forged to match (a checksum is no signature), the file's own reader refuses it.
    Either way the payload never runs."""
    from infinitystar.train.export import export_model
    run, _ = base_run
    files = checkpoint_files(run / "checkpoints" / STEP4)
    assert {"model.safetensors", "ema.safetensors", "config.json", "trainer.json", "rank_00000.safetensors",
            "optimizer/rank_00000.safetensors", MANIFEST} <= set(files)
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    for i, rel in enumerate(files):
        ckpts, raw = copy_run(base_run, tmp_path / f"run{i}")
        shutil.rmtree(ckpts / STEP2)   # the damaged checkpoint is the only one
        ckpt = ckpts / STEP4
        (ckpt / rel).write_bytes(payload)
        if forge_manifest and rel != MANIFEST:
            write_manifest(ckpt)
        with pytest.raises(CheckpointError) as err:
            if rel == "config.json" and forge_manifest:
                # resuming does not read config.json (the weights are checked key by key); export does
                export_model(ckpt, tmp_path / f"model{i}")
            else:
                trainer(raw, resume=str(ckpt))
        assert rel in one_line(str(err.value)), (rel, str(err.value))
        assert not marker.exists(), f"unpickled {rel}"
    # a planted torch.distributed.checkpoint metadata file (pickle) is not part of the checkpoint
    ckpts, raw = copy_run(base_run, tmp_path / "dcp")
    (ckpts / STEP4 / "optimizer" / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"optimizer/\.metadata: not in manifest\.json"):
        trainer(raw, resume=str(ckpts / STEP4))
    assert not marker.exists()


def test_state_files_round_trip_without_pickle(tmp_path):
    state = {"rng": {"python": [3, list(range(5)), None], "torch": torch.get_rng_state()},
             "data": {"epoch": 2, "cursor": 7}, "x": 0.1, "nested": [(1, 2.5, "a"), {"t": torch.arange(3)}]}
    write_state(tmp_path / "s.safetensors", state)
    back = read_state(tmp_path / "s.safetensors")
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"]) and back["rng"]["python"] == [3, [0, 1, 2, 3, 4], None]
    assert back["data"] == state["data"] and back["x"] == 0.1 and back["nested"][0] == [1, 2.5, "a"]
    assert torch.equal(back["nested"][1]["t"], torch.arange(3))
    (tmp_path / "p.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"p\.safetensors: not a readable state file"):
        read_state(tmp_path / "p.safetensors")


def test_optimizer_state_round_trips_exactly(tmp_path):
    """One process, keyed by index (single-file trainers) and by parameter name (the generator's trainer)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    for module in (None, model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
        for _ in range(3):
            model(torch.randn(5, 4)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        folder = tmp_path / ("named" if module is not None else "indexed")
        folder.mkdir()
        save_optimizer(folder, opt, module)
        fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
        load_optimizer(folder, fresh, module)
        a, b = opt.state_dict(), fresh.state_dict()
        assert a["param_groups"] == b["param_groups"] and isinstance(b["param_groups"][0]["betas"], tuple)
        for k in a["state"]:
            for name in a["state"][k]:
                assert torch.equal(a["state"][k][name], b["state"][k][name]), (k, name)
    other = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters())
    with pytest.raises(CheckpointError, match="does not fit this optimizer"):
        load_optimizer(tmp_path / "indexed", other)


# --------------------------------------------------------------------------------------------------
# Damaged checkpoints are reported and skipped
# --------------------------------------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", truncate),
    "truncated optimizer shard": ("optimizer/rank_00000.safetensors", truncate),
    "truncated rank file": ("rank_00000.safetensors", truncate),
    "truncated trainer.json": ("trainer.json", truncate),
    "flipped byte in ema.safetensors": ("ema.safetensors",
                                        lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x00")),
    "deleted rank file": ("rank_00000.safetensors", Path.unlink),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_and_skipped(base_run, tmp_path, kind):
    rel, damage = DAMAGE[kind]
    ckpts, raw = copy_run(base_run, tmp_path / "run")
    damage(ckpts / STEP4 / rel)
    with pytest.raises(CheckpointError, match=rel.replace(".", r"\.")):
        verify_checkpoint(ckpts / STEP4)
    with pytest.warns(UserWarning, match=rf"skipping a damaged checkpoint: .*{STEP4}/{rel}"):
        tr = trainer(raw, resume="latest")
    try:
        assert tr.step == 2
    finally:
        tr.close()
    # an explicitly named damaged checkpoint is an error, not a fallback
    with pytest.raises(CheckpointError, match=f"{STEP4}/{rel}"):
        trainer(raw, resume=str(ckpts / STEP4))


def test_resume_after_skipping_a_damaged_checkpoint_is_exact(base_run, tmp_path):
    run, _ = base_run
    ckpts, raw = copy_run(base_run, tmp_path / "run")
    (ckpts / STEP4 / "rank_00000.safetensors").unlink()
    with pytest.warns(UserWarning, match="rank_00000.safetensors: missing"):
        res = run_training(raw, resume="latest")
    assert res.step == 4
    for name in ("model.safetensors", "ema.safetensors"):
        want, got = weights(run / "checkpoints" / STEP4, name), weights(res.checkpoint, name)
        assert all(torch.equal(want[k], got[k]) for k in want), name
    verify_checkpoint(res.checkpoint)   # the re-saved step is whole again


def test_every_checkpoint_damaged_is_an_error_naming_the_file(base_run, tmp_path):
    ckpts, raw = copy_run(base_run, tmp_path / "run")
    for step in (STEP2, STEP4):
        truncate(ckpts / step / "model.safetensors")
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint") as seen:
        assert find_latest(ckpts) is None
    assert len(seen) == 2
    with pytest.raises(CheckpointError, match=r"no valid checkpoint to resume from; .*model\.safetensors"), \
            pytest.warns(UserWarning):
        trainer(raw, resume="latest")


# --------------------------------------------------------------------------------------------------
# One run per output folder
# --------------------------------------------------------------------------------------------------

HOLD = ("import sys, time; from infinitystar.train.lock import lock_run; "
        "lock = lock_run(sys.argv[1]); print('held', flush=True); time.sleep(120)")


def hold_lock(directory: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_in_the_same_folder_is_refused_until_the_first_ends(base_run, tmp_path):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(RunLockError) as err:
            lock_run(out)
        msg = one_line(str(err.value))
        assert f"pid {holder.pid}" in msg and "in use by another run" in msg and str(out) in msg
        # the trainer takes the lock first thing: a second training run stops before touching anything
        _, raw = base_run
        with pytest.raises(RunLockError, match=f"pid {holder.pid}"):
            trainer({**raw, "output_dir": str(out)}, resume=None)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)   # dies without releasing: the kernel drops the lock
        holder.wait()
    with pytest.warns(UserWarning, match=rf"pid {holder.pid} .*ended without releasing it; taking it over"):
        lock = lock_run(out)
    lock.release()
    assert (out / ".lock").read_text() == ""   # a clean release leaves nothing stale
    with RunLock(out):
        again = RunLock(out).acquire()    # the same process may take it again (shared)
        again.release()
